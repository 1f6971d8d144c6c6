"""kt_sft's node-shared AdamW for the expert LoRA (kt_sft/integration/expert_optimizer.py), in one process:
its ranges step bit for bit what torch.optim.AdamW steps on the whole tensors, and its checkpoints
resume with another number of ranks. The multi-rank runs are in tests/test_distributed.py."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch
from torch import nn

from kt_sft.integration import expert_optimizer as eo
from kt_sft.integration.checkpoints import checkpoint_problems

# two param groups as the Trainer makes them (decay / no decay), LoRA+-style different learning rates
GROUPS = [{"lr": 3e-3, "weight_decay": 0.1, "betas": (0.9, 0.999), "eps": 1e-8},
          {"lr": 1e-2, "weight_decay": 0.0, "betas": (0.8, 0.99), "eps": 1e-6}]
SHAPES = [(24, 7), (5, 40), (33,), (16, 16)]  # sizes off the 16-value range alignment


def make_params(seed: int) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def reference_and_ours(n_ranges: int, seed: int = 0, max_grad_norm: float | None = None, fused: bool = False):
    """torch.optim.AdamW on one set of parameters; n_ranges ExpertAdamW over a flat copy of another.
    fused: both use torch's fused kernel (the Trainer's default), else the single-tensor formula."""
    ref, ours = make_params(seed), make_params(seed)
    kind = {"fused": True} if fused else {"foreach": False}
    torch_opt = torch.optim.AdamW([{"params": ref[:2], **GROUPS[0]}, {"params": ref[2:], **GROUPS[1]}], **kind)
    trainer_opt = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(1))], **GROUPS[0]},
                                     {"params": [nn.Parameter(torch.zeros(1))], **GROUPS[1]}], **kind)
    numel = sum(p.numel() for p in ours)
    flat, slots, offset = torch.empty(numel), [], 0
    for i, p in enumerate(ours):
        flat[offset:offset + p.numel()] = p.data.reshape(-1)
        p.data = flat[offset:offset + p.numel()].view_as(p)
        slots.append(eo.Slot(f"p{i}", p, offset, 0 if i < 2 else 1))
        offset += p.numel()
    ranks = [eo.ExpertAdamW(slots, flat, *eo.shard_range(numel, r, n_ranges), trainer_opt.param_groups, max_grad_norm)
             for r in range(n_ranges)]
    for opt in ranks:
        opt.ranges = [eo.shard_range(numel, r, n_ranges) for r in range(n_ranges)]
    return ref, torch_opt, ours, trainer_opt, ranks


def step_all(ref, torch_opt, ours, trainer_opt, ranks, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for p, q in zip(ref, ours):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
    for i, (group, tgroup) in enumerate(zip(torch_opt.param_groups, trainer_opt.param_groups)):
        group["lr"] = tgroup["lr"] = GROUPS[i]["lr"] * (1 - 0.1 * step)  # a schedule: lr changes
    if ranks[0].max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(ref, ranks[0].max_grad_norm, foreach=False)
    torch_opt.step()
    for opt in ranks[:1]:
        opt.step()  # clips the shared gradients (once: every rank's are its own in a real run)
    for opt in ranks[1:]:
        opt.max_grad_norm, clip = None, opt.max_grad_norm
        opt.step()
        opt.max_grad_norm = clip


@pytest.mark.parametrize("fused", [False, True], ids=["single-tensor", "fused"])
@pytest.mark.parametrize("n_ranges", [1, 2, 3, 5])
def test_ranges_step_what_torch_adamw_steps(n_ranges, fused):
    ref, torch_opt, ours, trainer_opt, ranks = reference_and_ours(n_ranges, fused=fused)
    for step in range(6):
        step_all(ref, torch_opt, ours, trainer_opt, ranks, step)
    for p, q in zip(ref, ours):
        assert torch.equal(p, q), (p - q).abs().max()
    for i, p in enumerate(ref):
        state = torch_opt.state[p]
        got = torch.cat([opt.exp_avg for opt in ranks])[ours[i].data.storage_offset():][:p.numel()]
        assert torch.equal(got, state["exp_avg"].reshape(-1))
    assert all(opt.steps == {f"p{i}": 6 for i in range(len(SHAPES))} for opt in ranks)


def test_own_clipping_is_torchs_clip_grad_norm():
    """Under DeepSpeed (whose clipping sees only its own parameters) the expert LoRA is clipped by its
    own norm, as torch.nn.utils.clip_grad_norm_ would clip these tensors alone."""
    ref, torch_opt, ours, trainer_opt, ranks = reference_and_ours(2, max_grad_norm=0.5)
    for step in range(4):  # randn gradients over ~700 values: norm ~26, always clipped
        step_all(ref, torch_opt, ours, trainer_opt, ranks, step)
    for p, q in zip(ref, ours):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_learning_rate_followed_after_the_trainer_optimizer_loads_a_state():
    """A resume replaces the Trainer optimizer's group dicts (torch's load_state_dict): the schedule then
    writes the new ones, which the expert optimizer must read (a stale dict left DeepSpeed runs at lr 0)."""
    ref, torch_opt, ours, trainer_opt, ranks = reference_and_ours(2)
    for opt in ranks:
        opt.follow(trainer_opt)
    step_all(ref, torch_opt, ours, trainer_opt, ranks, 0)
    old = trainer_opt.param_groups[0]
    trainer_opt.load_state_dict(trainer_opt.state_dict())
    assert trainer_opt.param_groups[0] is not old
    for step in range(1, 4):
        step_all(ref, torch_opt, ours, trainer_opt, ranks, step)
    for p, q in zip(ref, ours):
        assert torch.equal(p, q), (p - q).abs().max()


def test_a_version_bump_per_step():
    """The recompute cache keys expert-LoRA results on the tensors' versions: a step must change them
    even on a rank that owns none of a tensor's values."""
    _, _, ours, _, ranks = reference_and_ours(2)
    before = [p._version for p in ours]
    for p in ours:
        p.grad = torch.ones_like(p)
    ranks[1].step()
    assert all(p._version > v for p, v in zip(ours, before))


@pytest.mark.parametrize("fused", [False, True], ids=["single-tensor", "fused"])
def test_checkpoint_resumes_with_another_number_of_ranges(tmp_path, fused):
    """3 steps on 2 ranges, saved; 3 more on 3 ranges loaded from it == 6 steps straight on torch's AdamW."""
    ref, torch_opt, ours, trainer_opt, ranks = reference_and_ours(2, fused=fused)
    for step in range(3):
        step_all(ref, torch_opt, ours, trainer_opt, ranks, step)
    for r, opt in enumerate(ranks):
        opt.save(tmp_path, write_index=r == 0)
    weights = [p.detach().clone() for p in ours]
    _, _, resumed, trainer_opt3, ranks3 = reference_and_ours(3, seed=7, fused=fused)  # other values: all loaded
    with torch.no_grad():
        for p, w in zip(resumed, weights):
            p.copy_(w)
    for opt in ranks3:
        opt.load(tmp_path)
    for step in range(3, 6):
        step_all(ref, torch_opt, resumed, trainer_opt3, ranks3, step)
    for p, q in zip(ref, resumed):
        assert torch.equal(p, q), (p - q).abs().max()


def test_checkpoint_of_another_model_is_refused(tmp_path):
    _, _, _, _, ranks = reference_and_ours(1)
    ranks[0].save(tmp_path, write_index=True)
    index = tmp_path / eo.CHECKPOINT_DIR / eo.INDEX
    data = json.loads(index.read_text())
    data["params"][1][1] += 16
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="differs from this model's.*p1"):
        ranks[0].load(tmp_path)


def test_incomplete_state_is_a_checkpoint_problem(tmp_path):
    _, _, _, _, ranks = reference_and_ours(2)
    for r, opt in enumerate(ranks):
        opt.save(tmp_path, write_index=r == 0)
    d = tmp_path / eo.CHECKPOINT_DIR
    assert eo.read_index(d)["numel"] == sum(torch.Size(s).numel() for s in SHAPES)
    assert checkpoint_problems(tmp_path) == [p for p in checkpoint_problems(tmp_path) if eo.CHECKPOINT_DIR not in p]
    second = sorted(d.glob("state-*.safetensors"))[1]
    second.write_bytes(second.read_bytes()[:100])
    assert any("truncated" in p for p in checkpoint_problems(tmp_path))
    second.unlink()
    assert any(f"{eo.CHECKPOINT_DIR}/{second.name} is missing" in p for p in checkpoint_problems(tmp_path))
    data = json.loads((d / eo.INDEX).read_text())
    data["shards"] = data["shards"][:1]
    (d / eo.INDEX).write_text(json.dumps(data))
    assert any("the state ranges end at" in p for p in checkpoint_problems(tmp_path))


@pytest.mark.parametrize("numel,size", [(0, 2), (5, 3), (100, 3), (4096, 7), (17, 1)])
def test_ranges_cover_the_buffer_on_line_bounds(numel, size):
    ranges = [eo.shard_range(numel, r, size) for r in range(size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == numel
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all(lo <= hi for lo, hi in ranges)
    assert all(lo % eo.ALIGN == 0 for lo, _ in ranges)


def test_choice_of_optimizer(monkeypatch):
    class Args:
        fp16 = False

    class T:
        args = Args()

    p = nn.Parameter(torch.zeros(2))
    monkeypatch.delenv("KT_SFT_EXPERT_OPTIMIZER", raising=False)
    assert eo.wanted(T(), torch.optim.AdamW([p])) is None
    assert "SGD" in eo.wanted(T(), torch.optim.SGD([p], lr=0.1))
    assert "amsgrad" in eo.wanted(T(), torch.optim.AdamW([p], amsgrad=True))
    T.args.fp16 = True
    assert "fp16" in eo.wanted(T(), torch.optim.AdamW([p]))
    monkeypatch.setenv("KT_SFT_EXPERT_OPTIMIZER", "trainer")
    assert "trainer" in eo.wanted(T(), torch.optim.AdamW([p]))
    monkeypatch.setenv("KT_SFT_EXPERT_OPTIMIZER", "sharded")
    with pytest.raises(ValueError, match="node_shared or trainer, got 'sharded'"):
        eo.wanted(T(), torch.optim.AdamW([p]))


def _model_with_expert_lora() -> nn.Module:
    from kt_sft.integration.distributed import expert_lora_sync
    from kt_sft.integration.peft_lora import LoraCPUExperts

    ex = LoraCPUExperts.from_tensors(torch.randn(4, 32, 16) * 0.1, torch.randn(4, 16, 16) * 0.1, format="bf16",
                                     compute_mode="f32")
    ex.update_layer("default", 2, 4, 0.0, True, False)
    holder = nn.Module()
    holder.experts = ex
    expert_lora_sync(holder)  # what kt_sft's model class does once PEFT injected the adapter
    return holder


def test_attach_takes_the_expert_lora_out_of_the_trainer_optimizer(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.delenv("KT_SFT_EXPERT_OPTIMIZER", raising=False)
    model = _model_with_expert_lora()
    other = nn.Parameter(torch.zeros(3))
    lora = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": lora + [other]}], lr=1e-3)
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(fp16=False, max_grad_norm=1.0, device=torch.device("cpu")))
    ours = eo.attach(trainer, opt)
    assert ours is not None and eo.attach(trainer, opt) is ours  # once per optimizer
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(other)]
    assert ours.numel == sum(p.numel() for p in lora) and (ours.lo, ours.hi) == (0, ours.numel)
    assert all(p.data.untyped_storage().data_ptr() == ours.flat.untyped_storage().data_ptr() for p in lora)


def test_zero3_on_gpu_ranks_is_refused_clearly(monkeypatch):
    """ZeRO-3 would partition the expert LoRA off the CPU: on GPU ranks that is an error naming the fix."""
    from types import SimpleNamespace

    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    model = _model_with_expert_lora()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(fp16=False, max_grad_norm=1.0, device=torch.device("cuda")))
    config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        with pytest.raises(ValueError, match="needs ZeRO-1/2.*ds_z2_config.json"):
            eo.attach(trainer, opt)
        trainer.args.device = torch.device("cpu")  # on CPU ranks DeepSpeed's ZeRO-3 optimizer keeps it
        assert eo.attach(trainer, opt) is None
    finally:
        del config
        unset_hf_deepspeed_config()


class _OneProcessDist:
    """Just enough of torch.distributed for shared_buffer on local rank 0 (its collectives are no-ops)."""

    def broadcast_object_list(self, box, src, group):
        pass

    def barrier(self, group):
        pass


def test_shared_buffer_is_shared_and_leaves_no_file(tmp_path, monkeypatch):
    """Local rank 0's buffer is a file mapping another rank sees writes through, and the file is gone
    once mapped."""
    monkeypatch.setattr(eo, "SHM_DIR", str(tmp_path))
    unlinked = []
    real_unlink = os.unlink

    def unlink_later(path):  # another rank maps the file before it goes
        other = torch.from_file(path, shared=True, size=1000, dtype=torch.float32)
        unlinked.append(other)
        real_unlink(path)

    monkeypatch.setattr(eo.os, "unlink", unlink_later)
    flat, path = eo.shared_buffer(1000, eo.Node(object(), 0, 2, [0, 1], True), _OneProcessDist())
    (other,) = unlinked
    assert flat.shape == (1000,) and not flat.any() and path.startswith(str(tmp_path))
    flat[123] = 4.5
    assert other[123] == 4.5
    assert not list(tmp_path.iterdir())


def test_too_little_shared_memory_is_a_clear_error(tmp_path, monkeypatch):
    class Full:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(eo, "SHM_DIR", str(tmp_path))
    monkeypatch.setattr(eo.os, "statvfs", lambda _: Full())
    with pytest.raises(RuntimeError, match=r"needs 0\.04 GiB of shared memory.*--shm-size.*KT_SFT_EXPERT_OPTIMIZER=trainer"):
        eo.shared_buffer(10_000_000, eo.Node(object(), 0, 2, [0, 1], True), _OneProcessDist())
    assert not list(tmp_path.iterdir())

"""Gradient checkpointing with CPU experts: same gradients as without it, and the experts' forward is
served from the recompute cache instead of running again (LLaMA-Factory's default is reentrant)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from kt_sft.engine import recompute_cache
from kt_sft.engine.experts import CPUExperts
from kt_sft.fixtures import build_fixtures
from kt_sft.integration.convert import convert


@pytest.fixture(scope="module")
def kt_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    build_fixtures(root / "fx", archs=["deepseek_v2"], log=None)
    convert(root / "fx" / "models" / "deepseek_v2", root / "kt", "int8", progress=False)
    return root / "kt"


def grads_of(kt_dir, checkpointing, reentrant=True, cache=True, expert_lora=False):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(kt_dir, trust_remote_code=True, dtype=torch.float32)
    if expert_lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "experts"]))
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if "lora_" in name:
                    p.normal_(std=0.05)
    model.train()
    experts = [m for m in model.modules() if isinstance(m, CPUExperts)]
    if not cache:
        for m in experts:
            m.recompute_cache = None
    if checkpointing:
        base = model.get_base_model() if expert_lora else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        base.enable_input_require_grads()
    ids = torch.randint(0, 1000, (2, 19), generator=torch.Generator().manual_seed(1))
    recompute_cache.reset_stats()
    model(ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, recompute_cache.stats(), len(experts)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointing_reuses_experts_and_keeps_gradients(kt_dir, reentrant):
    ref, _, _ = grads_of(kt_dir, checkpointing=False)
    got, stats, n_layers = grads_of(kt_dir, checkpointing=True, reentrant=reentrant)
    assert stats["hits"] == n_layers and stats["misses"] == 0, stats  # every recomputation served
    assert stats["bytes"] == 0 and stats["peak_bytes"] > 0  # all entries consumed by the backward
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointing_with_expert_lora(kt_dir, reentrant):
    """The cached first pass is reused only for the same LoRA weights; gradients (expert LoRA's
    included) equal the run without checkpointing."""
    ref, _, _ = grads_of(kt_dir, checkpointing=False, expert_lora=True)
    got, stats, n_layers = grads_of(kt_dir, checkpointing=True, reentrant=reentrant, expert_lora=True)
    assert stats["hits"] == n_layers and stats["misses"] == 0, stats
    assert set(got) == set(ref) and any("experts.lora_gu_A" in n for n in got)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_cache_off_recomputes_with_same_gradients(kt_dir):
    ref, _, _ = grads_of(kt_dir, checkpointing=False)
    got, stats, _ = grads_of(kt_dir, checkpointing=True, cache=False)
    assert stats["hits"] == 0 and stats["stored"] == 0
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_no_cache_without_checkpointing_or_in_eval(kt_dir):
    _, stats, _ = grads_of(kt_dir, checkpointing=False)
    assert stats["stored"] == 0
    model = AutoModelForCausalLM.from_pretrained(kt_dir, trust_remote_code=True).eval()
    recompute_cache.reset_stats()
    with torch.no_grad():
        model(torch.randint(0, 1000, (1, 7)))
    assert recompute_cache.stats()["stored"] == 0

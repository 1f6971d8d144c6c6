"""kt_sft's optimizer for the expert LoRA: AdamW over one node-shared copy, its state split over the node's ranks.

Why: the expert LoRA is large. At r=16 on DeepSeek-V3 it is ~4.9G fp32 values: 19.5 GB of weights and
39 GB of AdamW state. Held by the Trainer's optimizer, every rank keeps all of it, N copies per node.
Here (issue #14 item 4):

    weights      one flat fp32 buffer per node in shared memory (a /dev/shm file every local rank maps;
                 the parameters are views into it): one copy per node
    AdamW state  local rank i of n owns the contiguous range [i*numel/n, (i+1)*numel/n) of the flat buffer
                 and only that range's exp_avg / exp_avg_sq: one copy per node, split n ways
    gradients    per rank (each rank's backward writes its own); ExpertLoraSync averages them across all
                 ranks once per optimizer step, as before
    step         right after the Trainer's optimizer steps (so after its clipping, which counts these
                 gradients: they are still the model's parameters), each rank steps its range with the
                 hyperparameters and current learning rate of the param group the tensor was created in,
                 then the node's ranks meet at a barrier so the next forward reads a whole update. Every
                 node steps the same ranges from the same averaged gradients, so the nodes' copies stay
                 identical bit for bit without exchanging weights

AdamW is elementwise, so stepping a range of a tensor gives bit for bit what stepping the whole tensor
gives: with torch's fused kernel where the Trainer's AdamW is fused (transformers' default optim,
`adamw_torch_fused`), else in the single-tensor formula's order of operations (tests/test_expert_optimizer.py).

Used when the Trainer's optimizer is torch.optim.AdamW (transformers' default `adamw_torch*`, LLaMA-Factory's
LoRA+ groups included), without DeepSpeed and without fp16 loss scaling; anything else leaves the expert
LoRA in the Trainer's optimizer (every rank its own copy), as does `KT_SFT_EXPERT_OPTIMIZER=trainer`.
Checkpoints hold the state in `kt_expert_lora_optimizer/` (one safetensors file per range and an index), so
a run resumes with any number of ranks.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

CHECKPOINT_DIR = "kt_expert_lora_optimizer"
INDEX = "index.json"
ALIGN = 16  # range bounds on 64-byte lines: two ranks never write one cache line
SHM_DIR = "/dev/shm"


def shard_range(numel: int, rank: int, size: int) -> tuple[int, int]:
    """[lo, hi) of local rank `rank` of `size` over a flat buffer of `numel` values."""
    def bound(i):
        return numel if i == size else min(numel, (numel * i // size) // ALIGN * ALIGN)
    return bound(rank), bound(rank + 1)


def adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
           lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step in place on 1-d views, in torch.optim.AdamW's single-tensor order of operations."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


@dataclass
class Slot:
    """One expert-LoRA tensor: its place in the flat buffer and the index of the Trainer param group it
    came from."""
    name: str
    param: nn.Parameter
    offset: int
    group: int


class ExpertAdamW:
    """AdamW over the range [lo, hi) of `flat`, which holds the `slots` back to back. Each slot's
    hyperparameters (and the scheduled learning rate) are read at each step from its group in `groups`,
    the Trainer optimizer's param groups (kept as a list of their dicts: DeepSpeed steps the optimizer one
    group at a time, swapping its list for a one-group list; `rebind` after a load_state_dict, which
    replaces the dicts)."""

    def __init__(self, slots: list[Slot], flat: torch.Tensor, lo: int, hi: int, groups: list[dict],
                 max_grad_norm: float | None = None):
        self.slots, self.flat, self.lo, self.hi = slots, flat, lo, hi
        self.rebind(groups)
        self.max_grad_norm = max_grad_norm  # clip these gradients by their own norm (under DeepSpeed, whose
        # clipping sees only its own parameters); None: they were clipped with the model's (the Trainer's)
        self.exp_avg = torch.zeros(hi - lo, dtype=torch.float32)
        self.exp_avg_sq = torch.zeros(hi - lo, dtype=torch.float32)
        self.steps = {s.name: 0 for s in slots}
        self.ranges = [(lo, hi)]  # every range of this node, for the checkpoint index (attach sets it)

    @property
    def numel(self) -> int:
        return self.flat.numel()

    def state_bytes(self) -> int:
        return (self.exp_avg.numel() + self.exp_avg_sq.numel()) * 4

    @torch.no_grad()
    def step(self) -> None:
        if self.max_grad_norm is not None and self.max_grad_norm > 0:
            self._clip(self.max_grad_norm)
        fused: dict[int, list] = {}  # group -> its segments, stepped together by torch's fused kernel
        for s in self.slots:
            if s.param.grad is None:
                continue
            self.steps[s.name] += 1  # every rank counts every slot: any rank can write the index
            n = s.param.numel()
            a, b = max(self.lo, s.offset), min(self.hi, s.offset + n)
            if a >= b:
                continue
            seg = (self.flat[a:b], s.param.grad.reshape(-1)[a - s.offset:b - s.offset],
                   self.exp_avg[a - self.lo:b - self.lo], self.exp_avg_sq[a - self.lo:b - self.lo], self.steps[s.name])
            g = self.groups[s.group]
            if g.get("fused"):
                fused.setdefault(s.group, []).append(seg)
                continue
            beta1, beta2 = g["betas"]
            adamw_(*seg, float(g["lr"]), beta1, beta2, g["eps"], g["weight_decay"])
        for group, segs in fused.items():
            g = self.groups[group]
            beta1, beta2 = g["betas"]
            # torch.optim.AdamW(fused=True)'s own kernel (transformers' default optim, adamw_torch_fused),
            # called as torch's _fused_adamw does, with the step counts already advanced
            params, grads, avgs, avg_sqs, steps = zip(*segs)
            torch._fused_adamw_(list(params), list(grads), list(avgs), list(avg_sqs), [],
                                [torch.tensor(float(k)) for k in steps], amsgrad=False, lr=float(g["lr"]),
                                beta1=beta1, beta2=beta2, weight_decay=g["weight_decay"], eps=g["eps"],
                                maximize=False, grad_scale=None, found_inf=None)
        for s in self.slots:  # the values changed under every rank's views: tell autograd and the
            torch.autograd.graph.increment_version(s.param)  # recompute cache's keys

    def rebind(self, groups: list[dict]) -> None:
        self.groups = list(groups)

    def follow(self, optimizer: torch.optim.Optimizer) -> None:
        """Reads `optimizer`'s groups again whenever it loads a state dict (a resume replaces the dicts)."""
        optimizer.register_load_state_dict_post_hook(lambda o: self.rebind(o.param_groups))

    def _clip(self, max_norm: float) -> None:
        """torch.nn.utils.clip_grad_norm_ over these gradients alone (every rank has the same averaged ones)."""
        grads = [s.param.grad for s in self.slots if s.param.grad is not None]
        if grads:
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef)

    # -- checkpoints --------------------------------------------------------------------------------

    def _layout(self) -> list[list]:
        return [[s.name, s.param.numel()] for s in self.slots]

    def save(self, directory: str | os.PathLike, write_index: bool) -> None:
        """Writes this range's state (and, if `write_index`, the index naming every range of the node)."""
        from safetensors.torch import save_file

        d = Path(directory, CHECKPOINT_DIR)
        d.mkdir(parents=True, exist_ok=True)
        name = _shard_name(self.lo, self.hi)
        tmp = d / f".{name}.tmp"
        save_file({"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}, str(tmp))
        os.replace(tmp, d / name)
        if write_index:
            index = {"format": 1, "numel": self.numel, "params": self._layout(), "steps": self.steps,
                     "shards": [[_shard_name(lo, hi), lo, hi] for lo, hi in self.ranges]}
            tmp = d / f".{INDEX}.tmp"
            tmp.write_text(json.dumps(index, indent=1))
            os.replace(tmp, d / INDEX)

    def load(self, directory: str | os.PathLike) -> None:
        """Reads this range's state from a checkpoint written with any number of ranges."""
        from safetensors import safe_open

        d = Path(directory, CHECKPOINT_DIR)
        index = read_index(d)
        if index["params"] != self._layout():
            mine = {n: k for n, k in self._layout()}
            theirs = {n: k for n, k in index["params"]}
            diff = sorted(set(mine.items()) ^ set(theirs.items()))
            raise ValueError(f"{d}: the checkpoint's expert LoRA differs from this model's (first difference "
                             f"{diff[0] if diff else 'in order'}): resume with the same model, lora_rank and lora_target")
        for name, lo, hi in index["shards"]:
            a, b = max(lo, self.lo), min(hi, self.hi)
            if a >= b:
                continue
            with safe_open(str(d / name), "pt") as f:
                for key, dst in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                    dst[a - self.lo:b - self.lo] = f.get_slice(key)[a - lo:b - lo]
        self.steps = {k: int(v) for k, v in index["steps"].items()}


def _shard_name(lo: int, hi: int) -> str:
    return f"state-{lo:012d}-{hi:012d}.safetensors"


def read_index(d: Path) -> dict:
    """The index of a `kt_expert_lora_optimizer/` directory, checked to cover [0, numel) without gaps."""
    try:
        index = json.loads((d / INDEX).read_text())
        shards = sorted((str(n), int(lo), int(hi)) for n, lo, hi in index["shards"])
        numel = int(index["numel"])
        index["params"], index["steps"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{d / INDEX} is missing or unreadable ({exc})") from None
    end = 0
    for _, lo, hi in shards:
        if lo != end:
            raise ValueError(f"{d / INDEX}: the state ranges leave [{end}, {lo}) uncovered")
        end = hi
    if end != numel:
        raise ValueError(f"{d / INDEX}: the state ranges end at {end}, the buffer has {numel} values")
    index["shards"] = shards
    return index


# ---- one node's ranks --------------------------------------------------------------------------------


@dataclass
class Node:
    """This rank's node: a gloo group of its ranks (None alone), its index there, their count, their
    global ranks, and whether it is the first node (the one that writes checkpoints)."""
    group: object
    rank: int
    size: int
    ranks: list[int]
    first: bool


def _node_key() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    # GROUP_RANK is torchrun's node rank: two launches on one machine (loopback tests) are two nodes
    return f"{socket.gethostname()}/{boot}/{os.environ.get('GROUP_RANK', '')}"


def find_node(dist, group=None) -> Node:
    """Groups the world's ranks by node (collective over `group`, every rank: call it once, in one order)."""
    if dist is None:
        return Node(None, 0, 1, [0], True)
    keys = [None] * dist.get_world_size()
    dist.all_gather_object(keys, _node_key(), group=group)
    me, node = dist.get_rank(), None
    for key in sorted(set(keys), key=keys.index):  # every rank creates every group, in one order
        ranks = [r for r, k in enumerate(keys) if k == key]
        group = dist.new_group(ranks, backend="gloo") if len(ranks) > 1 else None
        if me in ranks:
            node = Node(group, ranks.index(me), len(ranks), ranks, first=0 in ranks)
    return node


def shared_buffer(numel: int, node: Node, dist) -> tuple[torch.Tensor, str | None]:
    """A zeroed fp32 buffer of `numel` values mapped by every rank of `node` (a /dev/shm file that local
    rank 0 creates and unlinks once all have mapped it, during start-up: a run that dies later leaves
    nothing behind)."""
    if node.size == 1:
        return torch.zeros(numel, dtype=torch.float32), None
    path = None
    if node.rank == 0:
        where = SHM_DIR if os.path.isdir(SHM_DIR) else tempfile.gettempdir()
        st = os.statvfs(where)
        if st.f_bavail * st.f_frsize < numel * 4:
            path = f"error: {where} has {st.f_bavail * st.f_frsize / 2**30:.2f} GiB free"
        else:
            fd, path = tempfile.mkstemp(prefix="kt_sft_expert_lora_", dir=where)
            os.ftruncate(fd, numel * 4)
            os.close(fd)
    box = [path]
    dist.broadcast_object_list(box, src=node.ranks[0], group=node.group)
    path = box[0]
    if path.startswith("error: "):
        raise RuntimeError(f"the node-shared expert LoRA needs {numel * 4 / 2**30:.2f} GiB of shared memory but "
                           f"{path[7:]} (in a container: --shm-size); or set KT_SFT_EXPERT_OPTIMIZER=trainer to "
                           "keep a copy per rank in the Trainer's optimizer")
    flat = torch.from_file(path, shared=True, size=numel, dtype=torch.float32)
    dist.barrier(group=node.group)
    if node.rank == 0:
        os.unlink(path)
    return flat, path


# ---- the Trainer's side --------------------------------------------------------------------------------


def wanted(trainer, optimizer) -> str | None:
    """Why the Trainer's optimizer must keep the expert LoRA (None: kt_sft's optimizer takes it)."""
    from kt_sft.integration.distributed import deepspeed_active

    choice = os.environ.get("KT_SFT_EXPERT_OPTIMIZER", "node_shared").strip().lower() or "node_shared"
    if choice not in ("node_shared", "trainer"):
        raise ValueError(f"KT_SFT_EXPERT_OPTIMIZER should be node_shared or trainer, got {choice!r}")
    if choice == "trainer":
        return "KT_SFT_EXPERT_OPTIMIZER=trainer"
    if deepspeed_active() and _zero3():
        return "DeepSpeed ZeRO-3 partitions every parameter of the model"
    if type(optimizer) is not torch.optim.AdamW:
        return f"the optimizer is {type(optimizer).__name__}, not torch.optim.AdamW"
    if getattr(trainer.args, "fp16", False):
        return "fp16 loss scaling (its scaler unscales only the Trainer optimizer's gradients)"
    if any(g.get("amsgrad") or g.get("maximize") for g in optimizer.param_groups):
        return "amsgrad / maximize"
    return None


def _zero3() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def attach(trainer, optimizer) -> ExpertAdamW | None:
    """Moves the expert LoRA of the Trainer's model out of `optimizer` into a node-shared ExpertAdamW."""
    from kt_sft.integration.distributed import _dist, deepspeed_active, expert_lora_sync_of

    sync = expert_lora_sync_of(trainer.model)
    if sync is None or getattr(optimizer, "_kt_expert_optimizer", None) is not None:
        return getattr(optimizer, "_kt_expert_optimizer", None)
    named = sorted(((n, p) for n, p in sync._params.values() if p.requires_grad), key=lambda kv: kv[0])
    if not named:
        return None
    why = wanted(trainer, optimizer)
    device = getattr(trainer.args, "device", None)
    if why is not None and deepspeed_active() and getattr(device, "type", "cpu") != "cpu":
        raise ValueError(f"expert LoRA on GPU ranks under DeepSpeed needs ZeRO-1/2 (stage 3 partitions it off the CPU "
                         f"where the kernels read it) and torch AdamW without fp16 ({why}): use "
                         "yaml_configs/deepspeed/ds_z2_config.json or ds_z2_offload_config.json, or drop `experts` "
                         "from lora_target")
    if why is not None:
        print(f"[kt_sft] expert LoRA stepped by the Trainer's optimizer, a copy per rank ({why})", flush=True)
        return None
    where = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    missing = [n for n, p in named if id(p) not in where]
    if missing:
        raise RuntimeError(f"expert LoRA tensor {missing[0]} is trainable but not in the Trainer's optimizer")
    slots, offset = [], 0
    for name, p in named:
        slots.append(Slot(name, p, offset, where[id(p)]))
        offset += p.numel()
    ours = {id(p) for _, p in named}
    for g in optimizer.param_groups:
        g["params"] = [p for p in g["params"] if id(p) not in ours]

    dist = _dist()
    if dist is not None and dist.get_world_size() == 1:
        dist = None
    sync.owned_by_kt_sft = True  # first: under DeepSpeed, _gloo() is the gloo group only from here on
    gloo = sync._gloo()  # host tensors: every collective here runs on gloo, whatever the default backend
    node = find_node(dist, gloo)
    flat, path = shared_buffer(offset, node, dist)
    with torch.no_grad():
        for s in slots:
            if dist is not None:  # DDP's start-up broadcast skips these tensors: rank 0's values for all
                dist.broadcast(s.param.data, src=0, group=gloo)
            if node.rank == 0:
                flat[s.offset:s.offset + s.param.numel()].copy_(s.param.data.reshape(-1))
        if node.group is not None:
            dist.barrier(group=node.group)
        for s in slots:
            s.param.data = flat[s.offset:s.offset + s.param.numel()].view_as(s.param)
            # DeepSpeed's start-up broadcast skips parameters with this attribute (its own per-rank
            # tensors carry it); these are host tensors a NCCL broadcast would refuse, already in sync
            s.param.ds_optim_param = True
    sync._started = True  # the first forward's broadcast is done
    lo, hi = shard_range(offset, node.rank, node.size)
    opt = ExpertAdamW(slots, flat, lo, hi, optimizer.param_groups,
                      max_grad_norm=trainer.args.max_grad_norm if deepspeed_active() else None)
    opt.ranges = [shard_range(offset, r, node.size) for r in range(node.size)]
    opt.node, opt.dist, opt.path, opt.sync = node, dist, path, sync
    optimizer._kt_expert_optimizer = opt
    optimizer.register_step_post_hook(functools.partial(_after_step, opt))
    opt.follow(optimizer)
    from kt_sft.integration import memory_report

    memory_report.EXPERT_LORA.update(path=path, state_bytes=opt.state_bytes(), numel=offset)
    print(f"[kt_sft] expert LoRA: {offset * 4 / 2**20:.1f} MiB of fp32 weights "
          f"{'in memory shared by ' + str(node.size) + ' ranks' if path else 'in this process'}; this rank steps "
          f"[{lo}, {hi}) with {opt.state_bytes() / 2**20:.1f} MiB of AdamW state", flush=True)
    return opt


def _after_step(opt: ExpertAdamW, optimizer, args, kwargs) -> None:
    # once per optimizer step: DeepSpeed's ZeRO-1/2 optimizer steps the wrapped one once per param group
    if not opt.sync.step_ready:
        return
    opt.sync.step_ready = False
    opt.step()
    if opt.node.group is not None:
        opt.dist.barrier(group=opt.node.group)  # the next forward reads every rank's range
    opt.sync.after_expert_step()


def of_trainer(trainer) -> ExpertAdamW | None:
    opt = getattr(trainer, "optimizer", None)
    for _ in range(4):  # accelerate's wrapper, DeepSpeed's ZeRO optimizer, ... around the torch one
        if opt is None or hasattr(opt, "_kt_expert_optimizer"):
            break
        opt = getattr(opt, "optimizer", None)
    return getattr(opt, "_kt_expert_optimizer", None)


def save(trainer, output_dir: str) -> None:
    """Every rank of the first node writes its range; the index comes from its local rank 0. All ranks
    then wait, so the Trainer writes trainer_state.json (its 'checkpoint complete' mark) after them."""
    opt = of_trainer(trainer)
    if opt is None:
        return
    if opt.node.first:
        opt.save(output_dir, write_index=opt.node.rank == 0)
    if opt.dist is not None:
        opt.dist.barrier(group=opt.sync._gloo())


def check_checkpoint(trainer, checkpoint: str) -> None:
    """Before the Trainer loads its optimizer: a checkpoint without kt_sft's state (or with it while the
    Trainer's optimizer holds the expert LoRA) cannot resume; say so instead of torch's group mismatch."""
    ours = of_trainer(trainer) is not None
    has = Path(checkpoint, CHECKPOINT_DIR).is_dir()
    trainer_file = any(Path(checkpoint, n).is_file() for n in ("optimizer.pt", "optimizer.bin"))
    if ours and not has and trainer_file:
        raise ValueError(f"{checkpoint} holds the expert LoRA's AdamW state inside optimizer.pt (saved with "
                         "KT_SFT_EXPERT_OPTIMIZER=trainer or by kt_sft before 2026-12-02): resume it with "
                         "KT_SFT_EXPERT_OPTIMIZER=trainer")
    if not ours and has and not _deepspeed_enabled(trainer):
        raise ValueError(f"{checkpoint} keeps the expert LoRA's AdamW state in {CHECKPOINT_DIR}/, but this run's "
                         "Trainer optimizer holds the expert LoRA (KT_SFT_EXPERT_OPTIMIZER=trainer, or a non-AdamW "
                         "optimizer): resume with the run's original optimizer settings")


def _deepspeed_enabled(trainer) -> bool:
    return bool(getattr(trainer, "is_deepspeed_enabled", False))


def load(trainer, checkpoint: str) -> None:
    opt = of_trainer(trainer)
    if opt is not None and checkpoint is not None and Path(checkpoint, CHECKPOINT_DIR).is_dir():
        opt.load(checkpoint)


def install() -> None:
    """Wraps transformers.Trainer's optimizer creation, save and load (once per process)."""
    import transformers

    T = transformers.Trainer
    if getattr(T.create_optimizer, "_kt_sft_expert_optimizer", False):
        return
    create, save_state, load_state = T.create_optimizer, T._save_optimizer_and_scheduler, T._load_optimizer_and_scheduler

    @functools.wraps(create)
    def create_optimizer(self, *args, **kwargs):
        optimizer = create(self, *args, **kwargs)
        if optimizer is not None:
            attach(self, getattr(optimizer, "optimizer", optimizer))
        return optimizer

    @functools.wraps(save_state)
    def _save_optimizer_and_scheduler(self, output_dir):
        save_state(self, output_dir)
        save(self, output_dir)

    @functools.wraps(load_state)
    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is not None:
            check_checkpoint(self, checkpoint)
        load_state(self, checkpoint)
        load(self, checkpoint)

    create_optimizer._kt_sft_expert_optimizer = True
    T.create_optimizer = create_optimizer
    T._save_optimizer_and_scheduler = _save_optimizer_and_scheduler
    T._load_optimizer_and_scheduler = _load_optimizer_and_scheduler

"""kt_sft under several training processes (torchrun DDP through LLaMA-Factory's launcher; multi-node).

What each rank does: it maps the same expert pack read-only (the page cache holds it once per node,
whatever the number of ranks), runs its own tokens' experts on its share of the node's cores, and
trains its own copy of the expert LoRA, which must stay identical on every rank.

The expert-LoRA route (the same for CPU and GPU ranks)::

    DDP wrapper        ignores the expert-LoRA tensors (`_ddp_params_and_buffers_to_ignore`): on a GPU
                       rank they are fp32 CPU tensors, and DDP refuses a module spread over device types
    start              broadcast rank 0's expert LoRA (DDP's own start-up broadcast skipped them) when
                       the Trainer creates its optimizer, or at the first forward without one
    backward           a post-accumulate-grad hook per tensor; when the last one of the model has its
                       gradient (= the backward is complete for them, reentrant checkpointing or not)
                       and the Trainer says this micro-batch ends an optimizer step (accelerate's
                       `gradient_state.sync_gradients`), all expert-LoRA gradients are averaged in one
                       flat all-reduce on a gloo group: once per optimizer step, after gradient
                       accumulation, before clipping, as DDP does for the rest of the model
    optimizer          kt_sft's AdamW over one node-shared copy of the weights, its state split over the
                       node's ranks, stepped right after the Trainer's optimizer (after clipping, which
                       counts these gradients: the tensors are still the model's parameters); or the
                       Trainer's own, a copy per rank, where that cannot be (expert_optimizer.py)

Averaging = sum / world size, as DDP's: the Trainer already scales the loss for token-weighted means.

Switches (environment): KT_SFT_CHECK_RANK_SYNC=1 compares a checksum of every rank's expert LoRA after
each optimizer step and raises on a difference (the tests use it). KT_SFT_DEBUG_BREAK_EXPERT_LORA_SYNC=1
skips the all-reduce: a test-only knob that proves the parity test can fail.
"""

from __future__ import annotations

import hashlib
import os
import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from kt_sft.integration import memory_report

PEFT_ROOT_PREFIX = "base_model.model."  # a PeftModel's path to the model it wraps


def local_world_size(environ=None) -> int:
    """Processes of this job on this node (torchrun's LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    env = os.environ if environ is None else environ
    try:
        return max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_num_threads(environ=None) -> int:
    """Usable cores / local ranks (at least 1): the ranks of a node split its cores, none oversubscribes."""
    return max(1, usable_cores() // local_world_size(environ))


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _sync_step_wanted() -> bool:
    """True when this backward ends an optimizer step. HF's Trainer records it in accelerate's shared
    GradientState before every micro-batch (no_sync for the others); without accelerate: always."""
    try:
        from accelerate.state import GradientState
    except ImportError:
        return True
    if not GradientState._shared_state:  # never initialized: no Trainer in this process
        return True
    return bool(GradientState().sync_gradients)


def deepspeed_active() -> bool:
    """True when the Trainer runs DeepSpeed (its config is registered with transformers)."""
    try:
        from transformers.integrations.deepspeed import deepspeed_config
    except ImportError:
        return False
    return deepspeed_config() is not None


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


class ExpertLoraSync:
    """Keeps one model's expert-LoRA tensors identical across ranks (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)
        self._params: dict[int, tuple[str, nn.Parameter]] = {}
        self._pending: set[int] = set()
        self._hooked: set[int] = set()
        self._group = None
        self._started = False
        self.all_reduces = 0  # how many gradient all-reduces ran (tests read it)
        self.owned_by_kt_sft = False  # kt_sft's optimizer steps the expert LoRA (expert_optimizer.attach)
        self.step_ready = False  # a backward that ends an optimizer step has completed (and averaged)
        model.register_forward_pre_hook(self._on_forward)
        register_optimizer_step_post_hook(self._after_optimizer_step)

    def refresh(self) -> None:
        """Re-collects the expert-LoRA tensors (after PEFT injected or removed an adapter)."""
        from kt_sft.integration.peft_lora import LoraCPUExperts

        model = self._model()
        seen = {}
        for mod_name, module in model.named_modules():
            if not isinstance(module, LoraCPUExperts):
                continue
            for attr in module.adapter_layer_names:
                for adapter, linear in getattr(module, attr).items():
                    p = linear.weight
                    seen[id(p)] = (f"{mod_name}.{attr}.{adapter}.weight", p)
                    # frozen tensors (an adapter loaded for inference) take no gradient hook; a
                    # later refresh hooks them once they are trainable
                    if p.requires_grad and id(p) not in self._hooked:
                        p.register_post_accumulate_grad_hook(self._on_grad)
                        self._hooked.add(id(p))
        self._params = seen

    def ddp_ignore_names(self) -> list[str]:
        """Their names relative to the model and to a PeftModel around it (DDP is given the latter)."""
        names = [name for name, _ in self._params.values()]
        return names + [PEFT_ROOT_PREFIX + n for n in names]

    def _world(self):
        dist = _dist()
        if dist is None or dist.get_world_size() == 1 or (deepspeed_active() and not self.owned_by_kt_sft):
            return None  # DeepSpeed's optimizer holds and averages the expert LoRA (ZeRO-3: docs/usage.md)
        if self._group is None:
            # gloo whatever the default backend (the tensors live in host memory on every rank), and a
            # group of its own so these collectives never interleave with DDP's bucket all-reduces
            self._group = dist.new_group(backend="gloo")
        return dist

    def _gloo(self):
        """The gloo group over every rank (None with one rank or under DeepSpeed)."""
        return self._group if self._world() is not None else None

    def _trainable(self) -> list[nn.Parameter]:
        return [p for _, p in self._params.values() if p.requires_grad]

    # -- hooks ------------------------------------------------------------------------------------

    def _on_forward(self, module, args):
        if self._started:
            return
        self._started = True
        dist = self._world()
        if dist is None or not self._params:
            return
        with torch.no_grad():  # DDP's start-up broadcast skipped these tensors
            for _, p in sorted(self._params.values(), key=lambda kv: kv[0]):
                dist.broadcast(p.data, src=0, group=self._group)

    def _on_grad(self, param: nn.Parameter) -> None:
        if not self._pending:
            self._pending = {id(p) for p in self._trainable()}
        self._pending.discard(id(param))
        if self._pending or not _sync_step_wanted():
            return
        self.step_ready = True
        dist = self._world()
        if dist is None or _flag("KT_SFT_DEBUG_BREAK_EXPERT_LORA_SYNC"):
            return
        params = sorted(self._trainable(), key=lambda p: self._params[id(p)][0])
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, group=self._group)
        flat /= dist.get_world_size()
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()
        self.all_reduces += 1

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        """After the Trainer's optimizer stepped the expert LoRA (a copy per rank)."""
        if not _flag("KT_SFT_CHECK_RANK_SYNC") or not self._params:
            return  # a global hook: nothing to do on every optimizer step of the process otherwise
        ours = {id(p) for _, p in self._params.values()}
        if any(id(p) in ours for g in optimizer.param_groups for p in g["params"]):
            self.after_expert_step()

    def after_expert_step(self) -> None:
        """Once per optimizer step, on every rank, after the expert LoRA was stepped."""
        if not _flag("KT_SFT_CHECK_RANK_SYNC"):
            return
        self.check_rank_identical()
        memory_report.note_pack_memory()  # every rank is alive here: the check above was a collective

    def checksum(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for name, p in sorted(self._params.values(), key=lambda kv: kv[0]):
            h.update(name.encode())
            h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def check_rank_identical(self) -> None:
        """Raises on every rank if any rank's expert LoRA differs from rank 0's (bit for bit)."""
        dist = self._world()
        if dist is None:
            return
        sums = [None] * dist.get_world_size()
        dist.all_gather_object(sums, self.checksum(), group=self._group)
        if len(set(sums)) != 1:
            raise RuntimeError(f"expert LoRA differs across ranks after an optimizer step (checksums {sums}): "
                               "its gradients were not averaged")


def expert_lora_sync_of(model: nn.Module) -> ExpertLoraSync | None:
    """The ExpertLoraSync of the kt_sft model inside `model` (a PeftModel, a DDP wrapper...), if any."""
    for module in model.modules():
        sync = module.__dict__.get("_kt_expert_lora_sync")
        if sync is not None:
            return sync
    return None


def expert_lora_sync(model: nn.Module) -> ExpertLoraSync:
    """The model's ExpertLoraSync (made on first use), refreshed to its current adapters."""
    sync = model.__dict__.get("_kt_expert_lora_sync")
    if sync is None:
        sync = model.__dict__["_kt_expert_lora_sync"] = ExpertLoraSync(model)
    sync.refresh()
    return sync

"""Loading a converted model with upstream transformers: the class behind the converted directory's
`auto_map`, and the swap of each MoE block's experts for CPUExperts over the memory-mapped pack.

`from_pretrained(dir, trust_remote_code=True)` imports the directory's `modeling_kt_sft.py`, whose
class is the upstream one (e.g. Qwen3MoeForCausalLM) with one addition: after the upstream
`__init__`, every `model.layers.{i}.mlp.experts` becomes a CPUExperts reading layer i of the pack.
Router, shared experts, attention and norms stay ordinary torch modules (LoRA, the MoE aux loss and
gradient checkpointing work unchanged); the experts have no parameters, so nothing is allocated or
loaded for them, and `model.to("cuda")` leaves them in host memory.
"""

from __future__ import annotations

import atexit
import os
import re
from pathlib import Path

import torch
from torch import nn

from kt_sft.engine import runtime
from kt_sft.engine.experts import CPUExperts
from kt_sft.integration import memory_report
from kt_sft.integration.models import ARCHS
from kt_sft.integration.settings import KtSettings

MODELING_FILE = "modeling_kt_sft.py"
_EXPERTS_PATH = re.compile(r"^(?:.*\.)?layers\.(\d+)\.mlp\.experts$")
_CLASSES: dict[str, type] = {}


def modeling_source(model_type: str) -> str:
    return (
        f'"""Written by `kt-sft convert`: the upstream {ARCHS[model_type].causal_lm_class} with its routed\n'
        'experts served by kt_sft from this directory\'s expert pack. Needs `pip install kt_sft`."""\n\n'
        "from kt_sft.loading import kt_causal_lm_class\n\n"
        f'KtSftForCausalLM = kt_causal_lm_class("{model_type}")\n'
    )


_MEMORY_REPORT_REGISTERED = False


def experts_class() -> type[CPUExperts]:
    """LoraCPUExperts (a PEFT LoRA layer, so `lora_target: ...,experts` trains expert LoRA) when peft
    is installed, else the plain CPUExperts."""
    try:
        from kt_sft.integration.peft_lora import LoraCPUExperts
    except ImportError:
        return CPUExperts
    return LoraCPUExperts


def install_cpu_experts(model: nn.Module, config) -> int:
    """Replaces every fused experts module with CPUExperts over the pack; returns how many."""
    settings = KtSettings.from_config(getattr(config, "kt_sft", None))
    base = Path(getattr(config, "name_or_path", "") or ".")
    pack = Path(settings.pack) if Path(settings.pack).is_absolute() else base / settings.pack
    _set_threads(settings)
    swapped = 0
    for name, module in list(model.named_modules()):
        match = _EXPERTS_PATH.match(name)
        if match is None or not hasattr(module, "gate_up_proj"):
            continue
        # under DeepSpeed ZeRO-3 (zero.Init) the upstream parameter is already partitioned: its full
        # shape is ds_shape, `.shape` is the local shard's
        e, two_i, h = getattr(module.gate_up_proj, "ds_shape", None) or module.gate_up_proj.shape
        new = experts_class().from_pack(str(pack), int(match.group(1)), (e, h, two_i // 2), settings.compute_mode,
                                   verify=settings.verify)
        if not settings.checkpoint_cache:
            new.recompute_cache = None
        new.pin_memory = settings.pin_memory
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        swapped += 1
    if swapped == 0:
        raise ValueError(f"{type(model).__name__} has no fused experts modules to serve from {pack}")
    for module in model.modules():
        if type(module).__name__ == "DeepseekV2Moe":  # see _deepseek_v2_moe_forward
            module.__class__ = _deepseek_v2_moe_class(type(module))
    memory_report.PACKS.add(os.path.realpath(pack))
    global _MEMORY_REPORT_REGISTERED
    if os.environ.get("KT_SFT_MEMORY_REPORT", "") not in ("", "0") and not _MEMORY_REPORT_REGISTERED:
        atexit.register(memory_report.report_at_exit)  # e.g. at the end of a llamafactory-cli run
        _MEMORY_REPORT_REGISTERED = True
    return swapped


def _set_threads(settings: KtSettings) -> None:
    """Engine threads: the setting, else usable cores / ranks on this node. Several ranks per node
    also set torch's intra-op threads to their share (torchrun's default is 1;
    KT_SFT_TORCH_THREADS overrides), so a node's ranks together use its cores once."""
    from kt_sft.integration import distributed

    runtime.set_num_threads(settings.num_threads or distributed.default_num_threads())
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    elif distributed.local_world_size() > 1:
        torch.set_num_threads(distributed.default_num_threads())


def _router_logits(gate: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """fp32 router logits like upstream's F.linear(h.float(), gate.weight.float()), plus the gate's
    LoRA when PEFT wrapped it (lora_target `all` does: DeepSeek-V2's router is an nn.Linear)."""
    h = hidden_states.float()
    logits = nn.functional.linear(h, gate.weight.float())
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return logits
    if isinstance(gate, LoraLayer) and not gate.disable_adapters and not gate.merged:
        for name in gate.active_adapters:
            if name in gate.lora_A:
                a, b = gate.lora_A[name], gate.lora_B[name]
                logits = logits + b(a(gate.lora_dropout[name](h.to(a.weight.dtype)))).float() * gate.scaling[name]
    return logits


def _deepseek_v2_moe_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """DeepseekV2Moe.forward (transformers 5.6) with the router logits from _router_logits: upstream
    reads `self.gate.weight` directly, so a LoRA that PEFT puts on the router never trains there."""
    residuals, shape = hidden_states, hidden_states.shape
    topk_indices, topk_weights = self.route_tokens_to_experts(_router_logits(self.gate, hidden_states))
    flat = hidden_states.view(-1, hidden_states.shape[-1])
    return self.experts(flat, topk_indices, topk_weights).view(*shape) + self.shared_experts(residuals)


def _deepseek_v2_moe_class(upstream: type) -> type:
    """DeepseekV2Moe with _deepseek_v2_moe_forward, named DeepseekV2MoE: the name LLaMA-Factory 0.9.5
    marks as the ZeRO-3 leaf module (transformers 5.6 spells it DeepseekV2Moe, and the run would stop
    with "No modules of type ['DeepseekV2MoE'] found")."""
    name = "DeepseekV2MoE"
    if name not in _CLASSES:
        _CLASSES[name] = type(name, (upstream,), {"forward": _deepseek_v2_moe_forward, "__module__": upstream.__module__})
    return _CLASSES[name]


def kt_causal_lm_class(model_type: str) -> type:
    """The upstream causal-LM class of `model_type`, with experts served by kt_sft."""
    if model_type in _CLASSES:
        return _CLASSES[model_type]
    import transformers

    if model_type not in ARCHS:
        raise ValueError(f"kt_sft does not support model_type {model_type!r}; supported: {', '.join(sorted(ARCHS))}")
    arch = ARCHS[model_type]
    base = getattr(transformers, arch.causal_lm_class)

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        install_cpu_experts(self, config)

    def _get_peft_config(self):
        try:
            return self.__dict__["_kt_peft_config"]
        except KeyError:
            raise AttributeError("peft_config") from None

    def _set_peft_config(self, configs):
        # PEFT assigns this after every adapter injection: the moment to give the experts their LoRA
        self.__dict__["_kt_peft_config"] = configs
        from kt_sft.integration.peft_lora import attach_expert_lora

        attach_expert_lora(self, configs)
        if any(m.r for m in self.modules() if hasattr(m, "lora_gu_A")):
            from kt_sft.integration.distributed import expert_lora_sync

            expert_lora_sync(self)

    def _ddp_ignore(self):
        # DDP leaves the expert LoRA to kt_sft's own averaging (kt_sft.integration.distributed)
        sync = self.__dict__.get("_kt_expert_lora_sync")
        if sync is None:
            raise AttributeError("_ddp_params_and_buffers_to_ignore")
        return sync.ddp_ignore_names()

    attrs = {"__init__": __init__, "__doc__": base.__doc__, "__module__": base.__module__,
             "peft_config": property(_get_peft_config, _set_peft_config),
             "_ddp_params_and_buffers_to_ignore": property(_ddp_ignore)}
    if arch.keep_unquantized:  # bitsandbytes (QLoRA) skips these modules; they stay in fp32
        attrs["_keep_in_fp32_modules"] = list(getattr(base, "_keep_in_fp32_modules", None) or []) + list(arch.keep_unquantized)
    cls = type("KtSftForCausalLM", (base,), attrs)
    _CLASSES[model_type] = cls
    return cls

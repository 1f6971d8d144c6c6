"""LoRA on the routed experts as PEFT sees it: a layer PEFT trains and saves, and the config rewrite.

The math (PEFT's layout, ΔW, the forward through the C kernels) is kt_sft.engine.expert_lora.

`LoraCPUExperts` is a CPUExperts that is also a PEFT `LoraLayer`: when LLaMA-Factory's `lora_target`
names `experts`, PEFT finds a module that already is a LoRA layer and calls its `update_layer`, which
creates these tensors. They are registered parameters (the Trainer's optimizer steps them, PEFT saves
them), kept in fp32 on the CPU whatever `.to()` the model gets, and the C kernels compute their
forward and gradients (no ΔW is ever materialized). State-dict hooks give them PEFT's key names
(`experts.lora_A` for down_proj, `experts.base_layer.lora_A` for gate_up_proj), so the saved adapter
loads with plain transformers + peft on the original checkpoint once its config is rewritten
(attach_expert_lora, below).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from kt_sft.engine import functional as Fn
from kt_sft.engine.expert_lora import forward_with_lora, kernel_lora
from kt_sft.engine.experts import CPUExperts

# our attribute -> PEFT's key inside the experts module (gate_up_proj is PEFT's inner ParamWrapper)
PEFT_KEYS = {"lora_gu_A.": "base_layer.lora_A.", "lora_gu_B.": "base_layer.lora_B."}


class LoraCPUExperts(CPUExperts, LoraLayer):
    """CPUExperts with per-expert LoRA on gate_up_proj and down_proj (one active adapter)."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_gu_A", "lora_gu_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, *args, **kwargs):
        CPUExperts.__init__(self, *args, **kwargs)
        # LoraLayer's state, set here because LoraLayer.__init__ wants a separate base layer
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()        # down_proj
        self.lora_gu_A, self.lora_gu_B = nn.ModuleDict(), nn.ModuleDict()  # gate_up_proj
        self.lora_embedding_A, self.lora_embedding_B = nn.ParameterDict(), nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self.use_dora, self.use_rslora, self.lora_bias, self.lora_variant = {}, {}, {}, {}
        self._caches, self.kwargs = {}, {}
        self.ephemeral_gpu_offload = False
        self.cast_input_dtype_enabled = True
        self.in_features = self.out_features = self.hidden_dim
        self.register_state_dict_post_hook(_to_peft_keys)
        self._register_load_state_dict_pre_hook(_from_peft_keys, with_module=True)
        _install_save_names()

    # BaseTunerLayer's `weight`/`bias` read the base layer's, which is this module: there are none.
    @property
    def weight(self):
        raise AttributeError("CPUExperts keeps its weights packed (see .packed), not as a `weight` parameter")

    @property
    def bias(self):
        raise AttributeError("CPUExperts has no bias")

    def update_layer(self, adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora,
                     use_dora: bool = False, lora_bias: bool = False, inference_mode: bool = False, **kwargs):
        """PEFT calls this when `experts` is a LoRA target. Creates both adapters of `adapter_name`."""
        e, h, inter = self.num_experts, self.hidden_dim, self.intermediate_dim
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"expert LoRA rank must be a positive integer, got {r!r}")
        if r > min(h, inter):
            raise ValueError(f"expert LoRA rank {r} exceeds min(hidden, intermediate) = {min(h, inter)}: "
                             "the update could not have that rank")
        if use_dora:
            raise ValueError("DoRA is not supported on the routed experts (PEFT does not support it on experts either)")
        if lora_bias:
            raise ValueError("lora_bias is not supported on the routed experts")
        if kwargs.get("use_qalora") or kwargs.get("arrow_config") is not None:
            raise ValueError("QA-LoRA / Arrow are not supported on the routed experts")
        if lora_dropout:
            warnings.warn(f"lora_dropout={lora_dropout} does not apply to the routed experts (as in PEFT, dropout "
                          "cannot be factored out of a parameter-level LoRA); it applies to the other targets only",
                          stacklevel=2)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.use_rslora[adapter_name] = use_rslora
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        self.lora_dropout[adapter_name] = nn.Identity()
        # PEFT's shapes for parameters (E, N, K): lora_A = Linear(N, r*E), lora_B = Linear(r*E, K)
        self.lora_gu_A[adapter_name] = nn.Linear(2 * inter, r * e, bias=False)
        self.lora_gu_B[adapter_name] = nn.Linear(r * e, h, bias=False)
        self.lora_A[adapter_name] = nn.Linear(h, r * e, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * e, inter, bias=False)
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_lora_parameters(self, adapter_name, init_lora_weights):
        """PEFT's initializations: True (A Kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r)), False."""
        if init_lora_weights is False or adapter_name not in self.lora_A:
            return
        for a, b in ((self.lora_gu_A, self.lora_gu_B), (self.lora_A, self.lora_B)):
            if init_lora_weights is True:
                nn.init.kaiming_uniform_(a[adapter_name].weight, a=math.sqrt(5))
            elif isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
                nn.init.normal_(a[adapter_name].weight, std=1 / self.r[adapter_name])
            else:
                raise ValueError(f"init_lora_weights={init_lora_weights!r} is not supported on the routed experts "
                                 "(use true, false or gaussian)")
            nn.init.zeros_(b[adapter_name].weight)

    def _apply(self, fn, recurse=True):
        # Nothing here moves: the packed weights are attributes and the LoRA tensors stay fp32 on the
        # CPU, next to the kernels that use them (the optimizer steps them there).
        return self

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError("expert LoRA cannot be merged into packed weights; "
                                  "`kt-sft export` writes a merged HF checkpoint")

    def unmerge(self) -> None:
        raise NotImplementedError("expert LoRA is never merged")

    def _weights(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        return (self.lora_gu_A[adapter_name].weight, self.lora_gu_B[adapter_name].weight,
                self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight)

    def expert_lora(self, adapter_name: str) -> Fn.ExpertLora:
        """The adapter in the kernels' layout (differentiable views of the parameters)."""
        return kernel_lora(*self._weights(adapter_name), float(self.scaling[adapter_name]), self.num_experts)

    def _active_lora(self) -> str | None:
        if self.disable_adapters:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) > 1:
            raise NotImplementedError(f"one expert-LoRA adapter at a time, got active {active}")
        return active[0] if active else None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        name = self._active_lora()
        if name is None:
            return CPUExperts.forward(self, hidden_states, top_k_index, top_k_weights)
        return forward_with_lora(self, hidden_states, top_k_index, top_k_weights, self._weights(name),
                                 float(self.scaling[name]))

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{k}: r={v}" for k, v in self.r.items())
        return CPUExperts.extra_repr(self) + (f", lora=({ranks})" if ranks else "")


def _rename(state_dict, prefix: str, mapping: dict[str, str]) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for ours, theirs in mapping.items():
            if rest.startswith(ours):
                state_dict[prefix + theirs + rest[len(ours):]] = state_dict.pop(key)
                break


def _to_peft_keys(module, state_dict, prefix, local_metadata):
    _rename(state_dict, prefix, PEFT_KEYS)


def peft_names(model: nn.Module, state_dict: dict) -> dict:
    """A copy of `state_dict` (keys relative to `model`) with every LoraCPUExperts' tensors under
    PEFT's key names: what model.state_dict() gives through _to_peft_keys, for a dict that was
    built without state-dict hooks (DeepSpeed ZeRO-3 gathers its parameters by module walk)."""
    out = dict(state_dict)
    for name, module in model.named_modules():
        if isinstance(module, LoraCPUExperts):
            _rename(out, f"{name}." if name else "", PEFT_KEYS)
    return out


def _install_save_names() -> None:
    """transformers' Trainer saves a DeepSpeed ZeRO-3 model as model.save_pretrained(dir,
    state_dict=<the gathered parameters>), a dict built by walking the modules, which PEFT then
    filters and writes as given: the expert LoRA would be saved under kt_sft's attribute names, which
    plain PEFT does not load. PeftModel.save_pretrained is wrapped (once per process, only where
    kt_sft's expert LoRA exists) to give a passed state_dict PEFT's names first; without a
    state_dict PEFT calls model.state_dict(), whose hooks already do it."""
    from peft import PeftModel

    original = PeftModel.save_pretrained
    if getattr(original, "_kt_sft_names", False):
        return

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        if state_dict is not None:
            state_dict = peft_names(self, state_dict)
        return original(self, save_directory, *args, state_dict=state_dict, **kwargs)

    save_pretrained._kt_sft_names = True
    PeftModel.save_pretrained = save_pretrained


def _from_peft_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    _rename(state_dict, prefix, {v: k for k, v in PEFT_KEYS.items()})
    e = module.num_experts
    for key, value in state_dict.items():
        parts = key[len(prefix):].split(".") if key.startswith(prefix) else []
        if len(parts) != 3 or parts[0] not in module.adapter_layer_names or parts[1] not in getattr(module, parts[0]):
            continue
        have = getattr(module, parts[0])[parts[1]].weight
        if tuple(value.shape) != tuple(have.shape):
            dim = 0 if parts[0].endswith("A") else 1  # A (r*E, N), B (K, r*E)
            raise ValueError(
                f"{prefix}{parts[0]} of adapter {parts[1]!r}: the checkpoint holds shape {tuple(value.shape)} "
                f"(rank {value.shape[dim] // e} over {e} experts?), this model has {tuple(have.shape)} "
                f"(rank {have.shape[dim] // e}); resume with the same lora_rank and the same model")


# ---- PEFT configs ----------------------------------------------------------------------------

EXPERT_TARGET_MODULE = "experts"  # in LLaMA-Factory's lora_target / PEFT's target_modules
EXPERT_TARGET_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # PEFT's own spelling


def _wants_expert_lora(cfg) -> bool:
    modules = cfg.target_modules
    if isinstance(modules, (list, set, tuple)) and EXPERT_TARGET_MODULE in modules:
        return True
    params = getattr(cfg, "target_parameters", None) or []
    return any(p.endswith(t) or t.endswith(p) for p in params for t in EXPERT_TARGET_PARAMETERS)


def attach_expert_lora(model: nn.Module, configs: dict) -> None:
    """Called with PEFT's adapter configs once PEFT has injected them into a kt_sft model (PEFT assigns
    `model.peft_config` at the end of every injection; kt_sft's model class intercepts it).

    For each LoRA config that asks for expert LoRA -- `experts` in target_modules (LLaMA-Factory's
    lora_target) or PEFT's target_parameters on the experts -- every LoraCPUExperts gets the adapter
    (PEFT already created it when it matched the module by name), and the config is rewritten into
    PEFT's own form for fused experts (`experts` moved from target_modules to target_parameters), so
    the saved adapter_config.json loads with plain transformers + peft on the original checkpoint.
    A non-zero lora_dropout stays in effect on the module targets and is recorded as 0 (PEFT refuses
    dropout in a config with parameter targets)."""
    from peft.tuners.lora import LoraConfig
    from peft.utils.constants import DUMMY_TARGET_MODULES
    from peft.utils.other import get_pattern_key

    experts = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraCPUExperts)]
    for adapter, cfg in configs.items():
        if not isinstance(cfg, LoraConfig) or not _wants_expert_lora(cfg):
            continue
        for module_name, module in experts:
            if adapter not in module.lora_A:
                r = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), module_name), cfg.r)
                alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), module_name), cfg.lora_alpha)
                module.update_layer(adapter, r, lora_alpha=alpha, lora_dropout=cfg.lora_dropout,
                                    init_lora_weights=cfg.init_lora_weights, use_rslora=cfg.use_rslora,
                                    use_dora=cfg.use_dora, lora_bias=cfg.lora_bias,
                                    inference_mode=cfg.inference_mode)
                if not any(a in module.lora_A for a in module.active_adapters):
                    module.set_adapter(adapter, inference_mode=cfg.inference_mode)
        if isinstance(cfg.target_modules, (list, set, tuple)):
            rest = set(cfg.target_modules) - {EXPERT_TARGET_MODULE}
            cfg.target_modules = rest if rest else DUMMY_TARGET_MODULES
        cfg.target_parameters = sorted(set(cfg.target_parameters or []) | set(EXPERT_TARGET_PARAMETERS))
        if cfg.lora_dropout:
            # The modules already built keep their dropout; the saved config must say 0, or PEFT refuses
            # to load it (no dropout on parameter targets).
            warnings.warn(f"adapter {adapter!r}: training uses lora_dropout={cfg.lora_dropout} on the module targets "
                          "(none on the experts); its saved adapter_config.json records 0, which PEFT requires "
                          "for adapters with expert LoRA", stacklevel=2)
            cfg.lora_dropout = 0.0

"""One small adapter per MoE family: how its checkpoint stores the routed experts on disk, and which
transformers class runs it. Adding a family = adding one `MoEArch` to `ARCHS` (see docs/adding_a_model.md).

The in-memory layout is the same for every family in transformers 5.6 (a fused *Experts module with
`gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) at `model.layers.{i}.mlp.experts`), so swapping in
CPUExperts needs no per-family code; the on-disk names and the config keys differ.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MoEArch:
    model_type: str                      # config.json "model_type"
    causal_lm_class: str                 # transformers class that runs it
    disk_prefix: str                     # MoE block inside a layer on disk: "mlp" / "block_sparse_moe"
    expert_names: tuple[str, str, str]   # (gate, up, down) projection names of one expert on disk
    experts_key: tuple[str, ...]         # config keys that may hold the number of routed experts
    inter_key: str                       # config key: one expert's intermediate size
    notes: str = ""
    keep_unquantized: tuple[str, ...] = ()  # modules QLoRA must not quantize (upstream reads their .weight)

    def num_experts(self, config: dict) -> int:
        for key in self.experts_key:
            if config.get(key) is not None:
                return int(config[key])
        raise ValueError(f"{self.model_type} config has none of {self.experts_key} (number of experts)")

    def intermediate_size(self, config: dict) -> int:
        return int(config[self.inter_key])

    def expert_key(self, layer: int, expert: int, which: int) -> str:
        """Per-expert weight name on disk; which: 0 gate, 1 up, 2 down."""
        return f"model.layers.{layer}.{self.disk_prefix}.experts.{expert}.{self.expert_names[which]}.weight"

    def fused_keys(self, layer: int) -> tuple[str, str]:
        """Already-fused tensors (as transformers holds them in memory), accepted on disk too."""
        base = f"model.layers.{layer}.{self.disk_prefix}.experts"
        return f"{base}.gate_up_proj", f"{base}.down_proj"


_STD = ("gate_proj", "up_proj", "down_proj")

ARCHS: dict[str, MoEArch] = {a.model_type: a for a in (
    MoEArch("qwen3_moe", "Qwen3MoeForCausalLM", "mlp", _STD, ("num_experts", "num_local_experts"), "moe_intermediate_size",
            "Qwen3-30B-A3B, Qwen3-235B-A22B; layers in mlp_only_layers stay dense"),
    MoEArch("deepseek_v2", "DeepseekV2ForCausalLM", "mlp", _STD, ("n_routed_experts",), "moe_intermediate_size",
            "DeepSeek-V2 / V2-Lite: first_k_dense_replace dense layers, shared experts stay on the GPU",
            keep_unquantized=("mlp.gate",)),  # DeepseekV2Moe reads gate.weight directly
    MoEArch("deepseek_v3", "DeepseekV3ForCausalLM", "mlp", _STD, ("n_routed_experts",), "moe_intermediate_size",
            "DeepSeek-V3/R1, Kimi-K2: grouped top-k with score-correction bias; FP8 block-scaled on disk"),
    MoEArch("qwen2_moe", "Qwen2MoeForCausalLM", "mlp", _STD, ("num_experts", "num_local_experts"), "moe_intermediate_size",
            "Qwen1.5/2-MoE: a shared expert with a sigmoid gate"),
    MoEArch("mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"), ("num_local_experts",),
            "intermediate_size", "Mixtral: w1/w3/w2 = gate/up/down on disk"),
    MoEArch("olmoe", "OlmoeForCausalLM", "mlp", _STD, ("num_experts", "num_local_experts"), "intermediate_size", "OLMoE"),
)}


# model_types that ship under their own name but are another family's architecture; the converted
# config.json is rewritten to the family's model_type so upstream transformers can build it.
ALIASES = {"kimi_k2": "deepseek_v3"}  # Kimi-K2: DeepSeek-V3 architecture (DeepseekV3ForCausalLM)


def arch_for(config: dict) -> MoEArch:
    """The adapter for a config.json dict; an unsupported model gets an error listing the supported ones."""
    model_type = config.get("model_type")
    model_type = ALIASES.get(model_type, model_type)
    if model_type in ARCHS:
        return ARCHS[model_type]
    raise ValueError(
        f"kt_sft does not support model_type {model_type!r}; supported: {', '.join(sorted([*ARCHS, *ALIASES]))}. "
        "Adding a family is one entry in kt_sft/integration/models/__init__.py (docs/adding_a_model.md)."
    )

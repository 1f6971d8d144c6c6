"""Expert LoRA in PEFT's tensor layout, as the kernels use it: the layout change, ΔW, the forward.

PEFT 0.18 puts LoRA on transformers' fused experts with `target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"]`: two nested `lora.ParamWrapper`s, the outer one on down_proj, the inner one
(`base_layer`) on gate_up_proj, each holding per expert e a rank-r pair
    lora_A.weight (r*E, N) and lora_B.weight (K, r*E)       for a parameter (E, N, K),
with ΔW[e] = scaling * A_e^T B_e^T, A_e = lora_A.weight.view(E, r, N)[e] and
B_e = lora_B.weight.view(K, r, E)[:, :, e] (PEFT's `get_delta_weight`). In the forward this is
out += scaling * (x @ B_e) @ A_e: B maps the product's input to rank r, A maps rank r to its output.
The C kernels compute that forward and its gradients; no ΔW is ever materialized in training.

Plain torch: the PEFT layer that owns these tensors is kt_sft.integration.peft_lora.
"""

from __future__ import annotations

import torch

from kt_sft.engine import functional as Fn
from kt_sft.engine.autograd import cpu_experts
from kt_sft.engine.experts import CPUExperts, default_compute_mode


def kernel_layout(lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (lora_A.weight (r*E, N), lora_B.weight (K, r*E)) -> the kernels' A (E, r, N), B (E, r, K).
    Differentiable: gradients flow back to PEFT's tensors."""
    a = lora_a.view(num_experts, -1, lora_a.shape[1])
    b = lora_b.view(lora_b.shape[0], -1, num_experts).permute(2, 1, 0).contiguous()
    return a, b


def delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, num_experts: int) -> torch.Tensor:
    """ΔW (E, N, K) of one adapter, the formula of PEFT's ParamWrapper.get_delta_weight."""
    a = lora_a.reshape(num_experts, -1, lora_a.shape[-1])
    b = lora_b.reshape(lora_b.shape[0], -1, num_experts)
    return torch.einsum("o r e, e r i -> e i o", b, a) * scaling


def kernel_lora(gu_a: torch.Tensor, gu_b: torch.Tensor, d_a: torch.Tensor, d_b: torch.Tensor, scaling: float,
                num_experts: int) -> Fn.ExpertLora:
    """One adapter's four PEFT weights (gate_up_proj's lora_A, lora_B, then down_proj's) in the kernels'
    layout (differentiable views)."""
    gu_a, gu_b = kernel_layout(gu_a, gu_b, num_experts)
    d_a, d_b = kernel_layout(d_a, d_b, num_experts)
    return Fn.ExpertLora(gu_a, gu_b, d_a, d_b, float(scaling))


def forward_with_lora(experts: CPUExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor, weights: tuple[torch.Tensor, ...], scaling: float) -> torch.Tensor:
    """CPUExperts.forward plus one adapter; `weights` as for kernel_lora. The recompute cache is keyed
    on the weights' versions, which change when the optimizer steps them."""
    for p in weights:
        if p.device.type != "cpu" or p.dtype != torch.float32:
            raise TypeError(f"expert LoRA parameters must stay float32 on the CPU, got {p.dtype} on {p.device}")
    key = repr([(id(p), p._version) for p in weights]).encode()
    mode = experts.compute_mode or default_compute_mode(getattr(hidden_states, "dtype", None), experts.packed.format)
    cache = experts.recompute_cache if experts.training else None
    return cpu_experts(hidden_states, top_k_index, top_k_weights, experts.packed, mode, cache, experts.pin_memory,
                       lora=kernel_lora(*weights, scaling, experts.num_experts), lora_key=key)

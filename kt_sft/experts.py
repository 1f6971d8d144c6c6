"""CPUExperts: a drop-in for transformers 5.6's fused *Experts modules whose frozen weights live
quantized in host memory and run through the native engine."""

from __future__ import annotations

import torch
from torch import nn

from kt_sft import functional as Fn
from kt_sft.autograd import cpu_experts
from kt_sft.formats import ComputeMode, Format


def default_compute_mode(fmt: Format, x_dtype: torch.dtype) -> ComputeMode:
    """fp32 inputs keep the exact mode; bf16 inputs use bf16 products."""
    return ComputeMode.F32 if x_dtype == torch.float32 else ComputeMode.BF16


class CPUExperts(nn.Module):
    """forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H).

    The packed weights are plain attributes, not parameters or buffers: `model.to("cuda")` leaves
    them in host memory, and state_dict() does not carry them (they come from a conversion)."""

    def __init__(self, packed: Fn.PackedExperts, compute_mode: str | ComputeMode | None = None):
        super().__init__()
        self.packed = packed
        self.compute_mode = None if compute_mode is None else ComputeMode.parse(compute_mode)
        self.num_experts = packed.num_experts
        self.hidden_dim = packed.hidden_dim
        self.intermediate_dim = packed.intermediate_dim

    @classmethod
    def from_tensors(cls, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, format: str = "bf16",
                     compute_mode: str | ComputeMode | None = None) -> "CPUExperts":
        """gate_up_proj (E, 2I, H) and down_proj (E, H, I), fp32 or bf16, as transformers 5.6 stores them."""
        return cls(Fn.pack_experts(gate_up_proj, down_proj, format), compute_mode)

    @property
    def format(self) -> Format:
        return self.packed.format

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        mode = self.compute_mode or default_compute_mode(self.format, getattr(hidden_states, "dtype", None))
        return cpu_experts(hidden_states, top_k_index, top_k_weights, self.packed, mode)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj, down_proj) in fp32 as the kernels see them."""
        return Fn.dequantize_experts(self.packed)

    def extra_repr(self) -> str:
        mode = self.compute_mode.value if self.compute_mode else "auto"
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, format={self.format.value}, compute_mode={mode}, "
                f"packed={self.packed.nbytes / 2**20:.1f} MiB")

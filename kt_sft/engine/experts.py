"""CPUExperts: a drop-in for transformers 5.6's fused *Experts modules whose frozen weights live
quantized in host memory and run through the native engine."""

from __future__ import annotations

import torch
from torch import nn

from kt_sft.engine import functional as Fn
from kt_sft.engine.autograd import cpu_experts
from kt_sft.engine.formats import ComputeMode, Format
from kt_sft.engine.recompute_cache import RecomputeCache


def default_compute_mode(x_dtype: torch.dtype, fmt: Format | str = Format.BF16) -> ComputeMode:
    """fp32 inputs keep the exact mode. Other inputs (bf16 training): int8 and int4 packs use the
    int8 mode (integer products; its loss gap to plain training on the same weights was 1.3-1.5x the
    bf16 mode's in the LLaMA-Factory study of docs/formats.md, and its kernels are the fastest on
    every path), bf16 packs the bf16 mode. The same on every CPU: the mode never depends on the
    kernel path."""
    if x_dtype == torch.float32:
        return ComputeMode.F32
    return ComputeMode.INT8 if Format(fmt) in (Format.INT8, Format.INT4) else ComputeMode.BF16


class CPUExperts(nn.Module):
    """forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H).

    The packed weights are plain attributes, not parameters or buffers: `model.to("cuda")` leaves
    them in host memory, and state_dict() does not carry them (they come from a conversion)."""

    def __init__(self, packed: Fn.PackedExperts | None, compute_mode: str | ComputeMode | None = None,
                 source: tuple[str, int, tuple[int, int, int]] | None = None, verify: bool = False):
        super().__init__()
        if (packed is None) == (source is None):
            raise ValueError("CPUExperts needs either packed weights or a (pack path, layer, shape) source")
        self._packed = packed
        self._source = source
        self._verify = verify
        self.recompute_cache: RecomputeCache | None = RecomputeCache()  # None: checkpointing recomputes
        self.pin_memory = True  # stage CUDA activations through pinned host buffers
        self.compute_mode = compute_mode
        e, h, i = (packed.num_experts, packed.hidden_dim, packed.intermediate_dim) if packed else source[2]
        self.num_experts, self.hidden_dim, self.intermediate_dim = e, h, i

    @classmethod
    def from_pack(cls, path: str, layer: int, shape: tuple[int, int, int],
                  compute_mode: str | ComputeMode | None = None, verify: bool = False) -> "CPUExperts":
        """Experts of `layer` in a pack file, mapped on first use (so building a model on the meta
        device, as from_pretrained does, costs nothing). shape = (E, H, I) the model expects."""
        return cls(None, compute_mode, source=(str(path), int(layer), tuple(shape)), verify=verify)

    @property
    def compute_mode(self) -> ComputeMode | None:
        """f32 / bf16 / int8, or None for the default per input dtype and pack format (validated on assignment)."""
        return self._compute_mode

    @compute_mode.setter
    def compute_mode(self, value: str | ComputeMode | None) -> None:
        self._compute_mode = None if value is None else ComputeMode.parse(value)

    @property
    def packed(self) -> Fn.PackedExperts:
        if self._packed is None:
            from kt_sft.engine.pack_file import open_pack

            path, layer, shape = self._source
            packed = open_pack(path, self._verify).layer(layer)
            got = (packed.num_experts, packed.hidden_dim, packed.intermediate_dim)
            if got != tuple(shape):
                raise ValueError(f"{path} layer {layer}: experts are (E, H, I) = {got}, the model expects {tuple(shape)}")
            self._packed = packed
        return self._packed

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
        mode = self.compute_mode or default_compute_mode(getattr(hidden_states, "dtype", None), self.packed.format)
        cache = self.recompute_cache if self.training else None
        return cpu_experts(hidden_states, top_k_index, top_k_weights, self.packed, mode, cache, self.pin_memory)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj, down_proj) in fp32 as the kernels see them."""
        return Fn.dequantize_experts(self.packed)

    def extra_repr(self) -> str:
        mode = self.compute_mode.value if self.compute_mode else "auto"
        where = (f"format={self._packed.format.value}, packed={self._packed.nbytes / 2**20:.1f} MiB" if self._packed
                 else f"pack={self._source[0]} layer={self._source[1]} (not mapped yet)")
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, compute_mode={mode}, {where}")

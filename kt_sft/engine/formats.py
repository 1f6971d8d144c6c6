"""Frozen expert weight formats. Mirrors the table in native/kt_sft.h (a test checks they agree)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Format(str, enum.Enum):
    BF16 = "bf16"
    INT8 = "int8"
    INT4 = "int4"

    @classmethod
    def parse(cls, value: "str | Format") -> "Format":
        try:
            return cls(value.value if isinstance(value, Format) else str(value).lower())
        except ValueError:
            raise ValueError(
                f"unknown expert format {value!r}; supported: {', '.join(f.value for f in cls)}"
            ) from None


class ComputeMode(str, enum.Enum):
    """How activations enter the products (see docs/formats.md)."""

    F32 = "f32"    # fp32 activations, fp32 math on dequantized weights: the exact mode
    BF16 = "bf16"  # activations and weights rounded to bf16, fp32 accumulation
    INT8 = "int8"  # per-token int8 activations, integer products (int8 / int4 weights)

    @classmethod
    def parse(cls, value: "str | ComputeMode") -> "ComputeMode":
        try:
            return cls(value.value if isinstance(value, ComputeMode) else str(value).lower())
        except ValueError:
            raise ValueError(
                f"unknown compute mode {value!r}; supported: {', '.join(m.value for m in cls)}"
            ) from None


@dataclass(frozen=True)
class FormatTraits:
    c_id: int              # KT_FORMAT_* in kt_sft.h
    block: int             # elements per block along K (rows are zero-padded to a multiple)
    block_bytes: int       # sizeof(kt_block_*) in kt_sft.h
    bits_per_weight: float  # including scales (int8: one fp32 per row, amortised over K)
    scale: str             # what a scale covers


TRAITS: dict[Format, FormatTraits] = {
    Format.BF16: FormatTraits(c_id=0, block=32, block_bytes=64, bits_per_weight=16.0, scale="none"),
    Format.INT8: FormatTraits(c_id=1, block=64, block_bytes=64, bits_per_weight=8.0, scale="fp32 per row"),
    Format.INT4: FormatTraits(c_id=2, block=32, block_bytes=16, bits_per_weight=4.5, scale="fp16 per 32"),
}

COMPUTE_MODE_C_ID = {ComputeMode.F32: 0, ComputeMode.BF16: 1, ComputeMode.INT8: 2}


def padded_k(fmt: Format, k: int) -> int:
    block = TRAITS[fmt].block
    return (k + block - 1) // block * block


def matrix_bytes(fmt: Format, n: int, k: int) -> int:
    """Bytes of one packed N x K matrix; must equal kt_matrix_bytes (tested)."""
    k_pad = padded_k(fmt, k)
    if fmt is Format.BF16:
        rows, scales = n * k_pad * 2, 0
    elif fmt is Format.INT8:
        rows, scales = n * k_pad, n * 4
    else:
        rows, scales = n * k_pad // 2, n * (k_pad // 32) * 2
    rows = (rows + 63) // 64 * 64
    return (rows + scales + 63) // 64 * 64

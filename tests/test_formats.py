"""Formats: the C header, the Python table and the torch twin agree; quantization error is bounded."""

import pytest
import torch

from kt_sft.engine import functional as Fn
from kt_sft.engine import reference as R
from kt_sft.engine._native import ffi, lib
from kt_sft.engine.formats import TRAITS, Format, matrix_bytes, padded_k

# Relative Frobenius error of the dequantized weights vs the originals, Gaussian weights
# (documented in docs/formats.md). Measured: bf16 1.7e-3, int8 6e-3..8.3e-3, int4 8.6e-2.
QUANT_REL_ERR = {Format.BF16: 2.5e-3, Format.INT8: 1.5e-2, Format.INT4: 0.10}


def test_python_table_matches_c_header():
    for fmt, tr in TRAITS.items():
        assert getattr(lib, f"KT_FORMAT_{fmt.name}") == tr.c_id
        assert getattr(lib, f"KT_{fmt.name}_BLOCK") == tr.block
        assert ffi.sizeof(f"kt_block_{fmt.value}") == tr.block_bytes
        assert tr.block_bytes * 8 / tr.block == {Format.BF16: 16, Format.INT8: 8, Format.INT4: 4}[fmt]


@pytest.mark.parametrize("fmt", list(Format))
@pytest.mark.parametrize("n,k", [(1, 1), (3, 31), (5, 64), (7, 100), (16, 2048)])
def test_matrix_bytes_python_equals_c(fmt, n, k):
    assert matrix_bytes(fmt, n, k) == lib.kt_matrix_bytes(TRAITS[fmt].c_id, n, k)
    assert padded_k(fmt, k) == lib.kt_padded_k(TRAITS[fmt].c_id, k)
    assert matrix_bytes(fmt, n, k) % 64 == 0


@pytest.mark.parametrize("fmt", list(Format))
@pytest.mark.parametrize("k", [1, 33, 96, 200])
def test_torch_twin_packs_the_same_bytes(fmt, k, seed):
    w = torch.randn(2, 11, k) * torch.logspace(-3, 1, 11)[None, :, None]  # rows of very different scale
    w[0, 3] = 0.0  # an all-zero row: scale 0, no division by zero
    for e in range(2):
        c_bytes = torch.empty(matrix_bytes(fmt, 11, k), dtype=torch.uint8)
        assert lib.kt_quantize_matrix(TRAITS[fmt].c_id, ffi.cast("float *", w[e].data_ptr()), 11, k,
                                      ffi.cast("void *", c_bytes.data_ptr())) == 0
        assert torch.equal(R.pack_matrix(fmt, w[e]), c_bytes)
        c_deq = torch.empty(11, k)
        assert lib.kt_dequantize_matrix(TRAITS[fmt].c_id, ffi.cast("void *", c_bytes.data_ptr()), 11, k,
                                        ffi.cast("float *", c_deq.data_ptr())) == 0
        assert torch.equal(R.unpack_matrix(fmt, c_bytes, 11, k), c_deq)


@pytest.mark.parametrize("fmt", list(Format))
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_quantization_error_bounds(fmt, src_dtype, seed):
    gate_up = torch.randn(4, 2 * 96, 1000).to(src_dtype)
    down = torch.randn(4, 1000, 96).to(src_dtype)
    packed = Fn.pack_experts(gate_up, down, fmt)
    gu, dn = Fn.dequantize_experts(packed)
    for orig, deq in ((gate_up.float(), gu), (down.float(), dn)):
        rel = float((deq - orig).norm() / orig.norm())
        assert rel <= QUANT_REL_ERR[fmt], f"{fmt.value}: relative error {rel:.3g}"
        err = (deq - orig).abs()
        if fmt is Format.BF16:  # round to nearest: half an ulp of 8 mantissa bits
            assert torch.all(err <= orig.abs() * 2.0**-8)
        elif fmt is Format.INT8:  # half a step of the per-row grid
            step = orig.abs().amax(dim=-1, keepdim=True) / 127
            assert torch.all(err <= step * 0.5001 + 1e-12)
        else:  # one step of the per-block grid (the clamp at +7 can cost a full step; the fp16 scale
            # rounding, 2^-11 relative, adds up to 8 such errors: 1% covers it)
            pad = (-orig.shape[-1]) % 32
            blocks = torch.nn.functional.pad(orig, (0, pad)).reshape(*orig.shape[:-1], -1, 32)
            step = blocks.abs().amax(dim=-1, keepdim=True) / 8
            err = torch.nn.functional.pad(err, (0, pad)).reshape(blocks.shape)
            assert torch.all(err <= step * 1.01 + 1e-12)


def test_bf16_source_packs_like_its_fp32_value(seed):
    gate_up = torch.randn(2, 16, 40).to(torch.bfloat16)
    down = torch.randn(2, 40, 8).to(torch.bfloat16)
    for fmt in Format:
        a = Fn.pack_experts(gate_up, down, fmt)
        b = Fn.pack_experts(gate_up.float(), down.float(), fmt)
        assert torch.equal(a.gate_up, b.gate_up) and torch.equal(a.down, b.down)

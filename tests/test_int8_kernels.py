"""The int8 compute mode's integer products (nt_q8 / tn_q8) on every kernel path against the scalar
ones. Their integer sums are exact and the fp32 epilogue repeats the scalar order, so with int8 packs
the results are bitwise those of the scalar path; int4's forward (32-block sums, one multiply and one
add per block) is bitwise too. Outside the products the paths may differ: the avx512 / amx tables
compute SwiGLU with their own exp (about an ulp off expf), which can move a quantum of h. The
whole-layer bitwise checks therefore use gate pre-activations >= 20, where silu(g) = g exactly on
every path, so nothing but the integer products can make a difference."""

import pytest
import torch
from helpers import distinct_routing, skewed_routing

import kt_sft
from kt_sft.engine import functional as F
from kt_sft.engine import runtime
from kt_sft.engine.formats import ComputeMode

INT8 = ComputeMode.INT8


def _exact_swiglu_experts(e: int, h: int, inter: int, gen: torch.Generator):
    """Gate rows in [1, 2] (with x in [0.5, 1.5]: g = W_g x >= h / 2 >= 20, so silu(g) = g on every
    path), up and down rows random signed."""
    gate = 1.0 + torch.rand(e, inter, h, generator=gen)
    up = torch.randn(e, inter, h, generator=gen) / h**0.5
    down = torch.randn(e, h, inter, generator=gen) / inter**0.5
    return torch.cat([gate, up], dim=1), down


def _layer(path: str, packed, x, idx, w, dy):
    runtime.set_kernel_path(path)
    y, gu = F.moe_forward(packed, x, idx, w, INT8)
    dx, dw, _ = F.moe_backward(packed, dy, idx, w, gu, INT8)
    return {"y": y, "gu": gu, "dx": dx, "dw": dw}


@pytest.fixture
def restore_path():
    before = runtime.kernel_path()
    yield
    runtime.set_kernel_path(before)


# (E, H, I, T, k): off-block H and I, a single token, one expert taking every token (M = T: several
# 12-row tiles and a short one), H past one 64-byte step of the int8 rows.
SHAPES = [(8, 64, 32, 1, 2), (8, 70, 45, 19, 3), (4, 130, 40, 61, 2), (16, 256, 96, 200, 4), (4, 40, 7, 5, 4)]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_q8_products_bitwise_vs_scalar(kernel_path, restore_path, fmt, shape):
    e, h, inter, t, k = shape
    h = max(h, 40)  # g >= h / 2 >= 20
    gen = torch.Generator().manual_seed(7)
    packed = F.pack_experts(*_exact_swiglu_experts(e, h, inter, gen), fmt)
    x = 0.5 + torch.rand(t, h, generator=gen)
    idx, w = skewed_routing(t, e, k) if t > 10 else distinct_routing(t, e, k)
    dy = torch.randn(t, h, generator=gen)
    ref = _layer("scalar", packed, x, idx, w, dy)
    out = _layer(kernel_path, packed, x, idx, w, dy)
    assert ref["gu"][:, :inter].min() >= 20  # the premise: silu(g) = g exactly
    # int4's backward runs the float products (its per-block scales vary along the backward's sum)
    names = ("y", "gu", "dx") if fmt == "int8" else ("y", "gu")
    for name in names:
        assert torch.equal(out[name], ref[name]), (kernel_path, fmt, name, (out[name] - ref[name]).abs().max())
    if fmt == "int8":  # dw = <h, dhu>: dhu is bitwise, but a zmm SwiGLU sums the dot in its own order
        assert float((out["dw"] - ref["dw"]).norm() / ref["dw"].norm()) <= 1e-6


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_q8_forward_product_bitwise_random(kernel_path, restore_path, fmt, seed):
    """Random signed weights and activations: the first product (gu = W_gu x) is bitwise scalar's."""
    e, h, inter, t, k = 8, 200, 72, 90, 3
    packed = F.pack_experts(torch.randn(e, 2 * inter, h), torch.randn(e, h, inter), fmt)
    x = torch.randn(t, h) * 3
    idx, w = skewed_routing(t, e, k)
    dy = torch.randn(t, h)
    ref = _layer("scalar", packed, x, idx, w, dy)
    out = _layer(kernel_path, packed, x, idx, w, dy)
    assert torch.equal(out["gu"], ref["gu"])
    for name in ("y", "dx", "dw"):  # SwiGLU may move a quantum of h: close, not necessarily equal
        rel = float((out[name] - ref[name]).norm() / ref[name].norm())
        assert rel <= 2e-3, (name, rel)


def test_q8_long_rows_wrap_exactly(kernel_path, restore_path):
    """H = 70,016 > 66,311: the biased vpdpbusd sums (a + 128) w pass 2^31 and wrap; the wrapped
    difference with 128 sum w is still the exact sum (|sum a w| < 2^31 for K <= 131072)."""
    e, h, inter, t = 1, 70016, 8, 3
    gate_up = torch.ones(e, 2 * inter, h)  # quants +-127 everywhere: the largest sums there are
    gate_up[:, inter:] = -1.0
    down = torch.ones(e, h, inter)
    packed = F.pack_experts(gate_up, down, "int8")
    x = torch.ones(t, h)
    idx, w = torch.zeros(t, 1, dtype=torch.int64), torch.ones(t, 1)
    dy = torch.ones(t, h)
    ref = _layer("scalar", packed, x, idx, w, dy)
    out = _layer(kernel_path, packed, x, idx, w, dy)
    assert torch.equal(out["gu"], ref["gu"])
    assert float(ref["gu"][0, 0]) == pytest.approx(h, rel=1e-6)  # 127 * 127 * h * d_w * d_x = h
    assert torch.equal(out["dx"], ref["dx"])


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_q8_repeatable_across_threads(kernel_path, fmt, seed):
    e, h, inter, t, k = 16, 128, 64, 150, 4
    packed = F.pack_experts(torch.randn(e, 2 * inter, h), torch.randn(e, h, inter), fmt)
    x, dy = torch.randn(t, h), torch.randn(t, h)
    idx, w = skewed_routing(t, e, k)
    lora = F.ExpertLora(*(torch.randn(e, 8, n) * 0.1 for n in (2 * inter, h, h, inter)), scale=0.5)

    def run():
        y, gu = F.moe_forward(packed, x, idx, w, INT8, lora=lora)
        dx, dw, grads = F.moe_backward(packed, dy, idx, w, gu, INT8, x=x, lora=lora)
        return [y, dx, dw, *grads]

    first = run()
    try:
        for threads in (1, 3, 2):
            kt_sft.set_num_threads(threads)
            assert all(torch.equal(a, b) for a, b in zip(first, run())), f"differs with {threads} threads"
    finally:
        kt_sft.set_num_threads(2)

"""The amx kernel table (bf16 compute mode on AMX-BF16 tiles) against the avx512 path, which
computes the same bf16-mode products with fp32 FMAs, on shapes that pick every tile edge: token
counts per expert around 16 and 32 (one or two token tiles, partial tiles), H and I off the
16/32 grid, a single expert and many.

Tight where no bf16 rounding sits between the two paths' products: gu (the forward's gate/up
product, F1) and dw (<h, dhu>, from the backward's first product B1, given the same gu). y and dx
pass through an intermediate rounded to bf16 (h, dgu): a last-bit difference before that rounding
can move an element by one bf16 ulp (2^-8 relative) and with it every output it feeds, so there
the bound is looser -- still far below what a wrong layout or a lost tile would give (O(1))."""

import pytest
import torch
from helpers import distinct_routing, rel_err

from kt_sft import engine
from kt_sft.engine.formats import ComputeMode
from kt_sft.engine.functional import SELF_CHECK_FAILURES, ExpertLora, moe_backward, moe_forward, pack_experts

pytestmark = pytest.mark.skipif(
    not {"amx", "avx512"} <= set(engine.available_kernel_paths()), reason="no AMX-BF16 on this CPU/build"
)

# Relative (Frobenius) error of amx vs avx512 in the bf16 mode.
TIGHT_REL_ERR = 1e-5      # (seen: <= 4.5e-6) gu, dw: fp32 accumulation order and the 2^-17 hi/lo split of scaled weights
ROUNDED_REL_ERR = 1e-3    # y, dx: a few one-ulp bf16 flips of h / dgu (seen: <= 1.6e-4)


def _run(path, packed, x, idx, w, dy, gu_in=None, lora=None):
    before = engine.kernel_path()
    engine.set_kernel_path(path)
    try:
        y, gu = moe_forward(packed, x, idx, w, ComputeMode.BF16, lora=lora)
        dx, dw, _ = moe_backward(packed, dy, idx, w, gu if gu_in is None else gu_in, ComputeMode.BF16, x=x, lora=lora)
        # a path that fails the start-up self-check is swapped for the next one down: that would make
        # this comparison vacuous, so the path must still be the one asked for
        assert engine.kernel_path() == path, f"{path} was replaced after its self-check: {SELF_CHECK_FAILURES}"
    finally:
        engine.set_kernel_path(before)
    return y, gu, dx, dw


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize(
    "e,h,inter,t,k",
    [
        (1, 64, 32, 1, 1),
        (1, 70, 45, 15, 1),      # H, I off the 32 grid, one partial token tile
        (1, 96, 48, 16, 1),      # exactly one tile
        (1, 33, 7, 17, 1),       # two token tiles, the second with one row
        (1, 128, 80, 33, 1),     # three token tiles: a pair and a single
        (2, 150, 45, 70, 1),     # two experts, ~35 tokens each
        (64, 256, 96, 300, 6),   # DeepSeek-V2-Lite's E and k
        (4, 600, 300, 60, 2),    # backward in segments of 512 contraction rows (2I = 600, H = 600) and
                                 # 256-column chunks with tails (H = 600, I = 300), ~30 tokens per expert
        (2, 540, 270, 300, 1),   # ~150 tokens per expert: the one-pass backward (more than 8 token tiles)
    ],
)
def test_amx_matches_avx512(fmt, e, h, inter, t, k):
    gen = torch.Generator().manual_seed(e * 1000 + t)
    packed = pack_experts(torch.randn(e, 2 * inter, h, generator=gen) / h**0.5,
                          torch.randn(e, h, inter, generator=gen) / inter**0.5, fmt)
    idx, w = distinct_routing(t, e, k)
    x, dy = torch.randn(t, h, generator=gen), torch.randn(t, h, generator=gen)
    ref = _run("avx512", packed, x, idx, w, dy)
    got = _run("amx", packed, x, idx, w, dy, gu_in=ref[1])  # same gu: the backward starts equal
    errs = {name: rel_err(a, b) for name, a, b in zip(("y", "gu", "dx", "dw"), got, ref)}
    assert errs["gu"] <= TIGHT_REL_ERR and errs["dw"] <= TIGHT_REL_ERR, errs
    assert errs["y"] <= ROUNDED_REL_ERR and errs["dx"] <= ROUNDED_REL_ERR, errs


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_amx_with_lora_and_threads(fmt):
    """Expert LoRA rides on the same products; results are bitwise equal for 1 and 2 threads."""
    gen = torch.Generator().manual_seed(7)
    e, h, inter, t, k, r = 8, 96, 40, 50, 2, 4
    packed = pack_experts(torch.randn(e, 2 * inter, h, generator=gen) / h**0.5,
                          torch.randn(e, h, inter, generator=gen) / inter**0.5, fmt)
    lora = ExpertLora(*(torch.randn(e, r, n, generator=gen) * 0.1 for n in (2 * inter, h, h, inter)), scale=0.5)
    idx, w = distinct_routing(t, e, k)
    x, dy = torch.randn(t, h, generator=gen), torch.randn(t, h, generator=gen)
    ref = _run("avx512", packed, x, idx, w, dy, lora=lora)
    runs = []
    for threads in (1, 2):
        engine.set_num_threads(threads)
        try:
            runs.append(_run("amx", packed, x, idx, w, dy, gu_in=ref[1], lora=lora))
        finally:
            engine.set_num_threads(2)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert rel_err(runs[0][1], ref[1]) <= TIGHT_REL_ERR
    assert rel_err(runs[0][0], ref[0]) <= ROUNDED_REL_ERR

"""The avx512 kernel table (and its SIMDe twin) against the scalar path, on the shapes that pick each
of its forms: the nt dot form (<= 12 tokens per expert, bf16/int8), the tn direct form (<= 12), the
12 x 32 panel tiles with every tail height, several MC blocks, K and N off the 16/32 grid. One expert
and k = 1, so the token count is the M of every product."""

import pytest
import torch

from kt_sft import engine
from kt_sft.engine.formats import ComputeMode
from kt_sft.engine.functional import ExpertLora, moe_backward, moe_forward, pack_experts

PATHS = [p for p in ("avx512", "avx512-simde") if p in engine.available_kernel_paths()]
pytestmark = pytest.mark.skipif(not PATHS, reason="no avx512 kernel path in this CPU/build")

# f32 mode, same dequantized weights: only the summation order differs from scalar.
REL_ERR = 2e-5


def _run(path, packed, x, idx, w, dy, lora):
    before = engine.kernel_path()
    engine.set_kernel_path(path)
    try:
        y, gu = moe_forward(packed, x, idx, w, ComputeMode.F32, lora=lora)
        dx, dw, grads = moe_backward(packed, dy, idx, w, gu, ComputeMode.F32, x=x, lora=lora)
    finally:
        engine.set_kernel_path(before)
    return (y, gu, dx, dw) + (tuple(grads) if grads is not None else ())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("t", [1, 4, 12, 13, 37, 110])
def test_forms_match_scalar(path, fmt, t):
    gen = torch.Generator().manual_seed(t)
    h, inter = 150, 45  # K = 150 and 45: off the 16/32 grid; N = 90 and 150: partial panels
    packed = pack_experts(torch.randn(1, 2 * inter, h, generator=gen), torch.randn(1, h, inter, generator=gen), fmt)
    x, dy = torch.randn(t, h, generator=gen), torch.randn(t, h, generator=gen)
    idx, w = torch.zeros(t, 1, dtype=torch.int64), torch.rand(t, 1, generator=gen)
    lora = ExpertLora(*(torch.randn(1, 5, n, generator=gen) for n in (2 * inter, h, h, inter)), scale=0.5)
    fast = _run(path, packed, x, idx, w, dy, lora)
    ref = _run("scalar", packed, x, idx, w, dy, lora)
    for name, a, b in zip(("y", "gu", "dx", "dw", "dgu_a", "dgu_b", "dd_a", "dd_b"), fast, ref):
        err = float((a - b).norm() / b.norm().clamp_min(1e-30))
        assert err <= REL_ERR, f"{path}/{fmt}/t={t}: {name} rel err {err:.2e}"


@pytest.mark.parametrize("path", PATHS)
def test_bitwise_repeatable_across_thread_counts(path):
    gen = torch.Generator().manual_seed(7)
    e, h, inter, t = 4, 96, 40, 60
    packed = pack_experts(torch.randn(e, 2 * inter, h, generator=gen), torch.randn(e, h, inter, generator=gen), "int4")
    x, dy = torch.randn(t, h, generator=gen), torch.randn(t, h, generator=gen)
    idx = torch.argsort(torch.rand(t, e, generator=gen), dim=1)[:, :2].contiguous()
    w = torch.rand(t, 2, generator=gen)
    outs, before = [], engine.engine_info()["threads"]
    try:
        for n in (1, 2, 3):
            engine.set_num_threads(n)
            outs.append(_run(path, packed, x, idx, w, dy, None))
    finally:
        engine.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)

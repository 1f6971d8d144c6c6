"""Tier 1: the engine against a float64 torch reference on the *dequantized* weights (so indexing and
arithmetic are checked, not quantization), outputs and both gradients, every format and kernel path."""

import pytest
import torch
from helpers import distinct_routing, random_experts, rel_err, skewed_routing

import kt_sft
from kt_sft import CPUExperts
from kt_sft.engine import reference as R
from kt_sft.engine.formats import ComputeMode, Format

# Relative error (Frobenius) allowed vs the float64 reference, by compute mode.
KERNEL_REL_ERR = {ComputeMode.F32: 1e-4, ComputeMode.BF16: 1e-2}
ACT_DTYPE = {ComputeMode.F32: torch.float32, ComputeMode.BF16: torch.bfloat16}


def run_and_compare(ex: CPUExperts, x, idx, w, mode: ComputeMode):
    gu, dn = ex.dequantized()
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = ex(x, idx, w)
    assert y.dtype == x.dtype and y.shape == x.shape
    dy = torch.randn(y.shape).to(y.dtype)
    y.backward(dy)
    assert x.grad.dtype == x.dtype and w.grad.dtype == w.dtype
    args = (x.detach().double(), idx, w.detach().double(), gu.double(), dn.double())
    y_ref = R.moe_forward(*args)
    dx_ref, dw_ref = R.moe_backward(*args, dy.double())
    tol = KERNEL_REL_ERR[mode]
    errs = {"y": rel_err(y, y_ref), "dx": rel_err(x.grad, dx_ref), "dw": rel_err(w.grad, dw_ref)}
    assert max(errs.values()) <= tol, f"{ex.format.value}/{mode.value}: {errs} > {tol}"
    return y, x.grad, w.grad


@pytest.mark.parametrize("fmt", list(Format))
@pytest.mark.parametrize("mode", [ComputeMode.F32, ComputeMode.BF16])
@pytest.mark.parametrize(
    "e,h,inter,t,k",
    [
        (8, 64, 32, 1, 1),
        (8, 70, 45, 17, 3),      # H, I not multiples of any block
        (16, 128, 64, 33, 8),
        (64, 96, 40, 29, 6),     # E = 64, DeepSeek-V2-Lite's expert count and top-6
        (4, 33, 7, 5, 4),        # k = E
        (2, 70, 45, 130, 2),     # 130 rows per expert: avx512's prepared operand in 11 tiles, two C blocks
        (2, 300, 150, 300, 2),   # 300 rows per expert: avx512's k-outer form, two token groups, two K slices
    ],
)
def test_matches_float64_reference(kernel_path, fmt, mode, e, h, inter, t, k, seed):
    gate_up, down = random_experts(e, h, inter)
    ex = CPUExperts.from_tensors(gate_up, down, format=fmt.value, compute_mode=mode)
    idx, w = distinct_routing(t, e, k)
    x = torch.randn(t, h).to(ACT_DTYPE[mode])
    run_and_compare(ex, x, idx, w, mode)


@pytest.mark.parametrize("fmt", list(Format))
@pytest.mark.parametrize("k", range(1, 9))
def test_every_k(kernel_path, fmt, k, seed):
    gate_up, down = random_experts(12, 48, 24)
    ex = CPUExperts.from_tensors(gate_up, down, format=fmt.value, compute_mode="f32")
    idx, w = distinct_routing(9, 12, k)
    run_and_compare(ex, torch.randn(9, 48), idx, w, ComputeMode.F32)


@pytest.mark.parametrize("fmt", list(Format))
def test_skewed_routing(kernel_path, fmt, seed):
    gate_up, down = random_experts(16, 64, 40)
    ex = CPUExperts.from_tensors(gate_up, down, format=fmt.value, compute_mode="f32")
    idx, w = skewed_routing(41, 16, 4)
    run_and_compare(ex, torch.randn(41, 64), idx, w, ComputeMode.F32)
    # all tokens to a single expert with k = 1
    idx = torch.full((23, 1), 5, dtype=torch.int64)
    run_and_compare(ex, torch.randn(23, 64), idx, torch.rand(23, 1), ComputeMode.F32)


def test_zero_tokens(kernel_path, seed):
    ex = CPUExperts.from_tensors(*random_experts(4, 32, 16), format="int8")
    x = torch.zeros(0, 32, requires_grad=True)
    w = torch.zeros(0, 2, requires_grad=True)
    y = ex(x, torch.zeros(0, 2, dtype=torch.int64), w)
    assert y.shape == (0, 32)
    y.sum().backward()
    assert x.grad.shape == (0, 32) and w.grad.shape == (0, 2)


def test_duplicate_ids_are_summed(kernel_path, seed):
    """Defined behaviour: a token listing an expert twice gets that expert's output once per slot,
    each with its own weight (the formula sum_j w[t,j] * expert_{idx[t,j]}(x_t), as transformers' eager
    loop computes it)."""
    ex = CPUExperts.from_tensors(*random_experts(6, 32, 16), format="bf16", compute_mode="f32")
    idx = torch.tensor([[2, 2, 4], [1, 3, 1]])
    run_and_compare(ex, torch.randn(2, 32), idx, torch.rand(2, 3), ComputeMode.F32)


def test_int32_index_and_bf16_weights_accepted(seed):
    ex = CPUExperts.from_tensors(*random_experts(8, 32, 16), format="int4", compute_mode="f32")
    idx, w = distinct_routing(5, 8, 2)
    x = torch.randn(5, 32)
    y64 = ex(x, idx, w)
    y32 = ex(x, idx.int(), w)
    assert torch.equal(y64, y32)
    wb = w.bfloat16().requires_grad_(True)
    y = ex(x, idx, wb)
    y.sum().backward()
    assert wb.grad.dtype == torch.bfloat16


def test_repeatable_and_layers_in_a_row(kernel_path, seed):
    """Same inputs -> bitwise identical outputs and gradients, call after call and for any thread
    count (each output element is summed in a fixed order); several layers chained."""
    layers = [CPUExperts.from_tensors(*random_experts(16, 64, 32), format=f) for f in ("int8", "int4", "bf16")]
    idx = [distinct_routing(37, 16, 4) for _ in layers]
    x0 = torch.randn(37, 64)

    def run():
        x = x0.clone().requires_grad_(True)
        ws = [w.clone().requires_grad_(True) for _, w in idx]
        h = x
        for layer, (i, _), w in zip(layers, idx, ws):
            h = h + layer(h, i, w)
        h.square().sum().backward()
        return [h.detach(), x.grad] + [w.grad for w in ws]

    first = run()
    for threads in (1, 2, 3):
        kt_sft.set_num_threads(threads)
        again = run()
        assert all(torch.equal(a, b) for a, b in zip(first, again)), f"differs with {threads} threads"
    kt_sft.set_num_threads(2)


def test_non_finite_input_stays_in_its_token(kernel_path, seed):
    """Defined behaviour: NaN/Inf in a token's hidden state (or routing weight) makes that token's
    output and gradients non-finite; every other token's results are unchanged, bit for bit."""
    ex = CPUExperts.from_tensors(*random_experts(8, 48, 24), format="int8", compute_mode="f32")
    idx, w = distinct_routing(10, 8, 3)
    x = torch.randn(10, 48)
    dy = torch.randn(10, 48)

    def run(x, w):
        x = x.clone().requires_grad_(True)
        w = w.clone().requires_grad_(True)
        y = ex(x, idx, w)
        y.backward(dy)
        return y.detach(), x.grad, w.grad

    clean = run(x, w)
    bad_x = x.clone()
    bad_x[3, 5] = float("nan")
    bad_w = w.clone()
    bad_w[7, 1] = float("inf")
    for out, bad in ((run(bad_x, w), 3), (run(x, bad_w), 7)):
        keep = [t for t in range(10) if t != bad]
        assert not torch.isfinite(out[0][bad]).all()
        for got, ref in zip(out, clean):
            assert torch.equal(got[keep], ref[keep])


def test_no_parameters_and_weights_stay_on_host(seed):
    ex = CPUExperts.from_tensors(*random_experts(4, 32, 16), format="int8")
    assert list(ex.parameters()) == [] and list(ex.buffers()) == [] and ex.state_dict() == {}
    before = ex.packed.gate_up.data_ptr()
    ex.to(torch.float64)
    assert ex.packed.gate_up.data_ptr() == before and ex.packed.gate_up.dtype == torch.uint8
    assert "format=int8" in repr(ex)


@pytest.mark.gpu
def test_cuda_inputs_round_trip(seed):
    ex = CPUExperts.from_tensors(*random_experts(8, 64, 32), format="int8", compute_mode="f32")
    idx, w = distinct_routing(13, 8, 2)
    x = torch.randn(13, 64)
    y_cpu = ex(x, idx, w)
    xc = x.cuda().requires_grad_(True)
    wc = w.cuda().requires_grad_(True)
    y = ex(xc, idx.cuda(), wc)
    assert y.device.type == "cuda"
    torch.testing.assert_close(y.cpu(), y_cpu)
    y.sum().backward()
    assert xc.grad.device.type == "cuda" and wc.grad.device.type == "cuda"


def test_kernel_self_check_passes_and_catches_a_bad_path(monkeypatch, request):
    """The chosen SIMD path is checked against scalar before first use; a path that disagrees is
    replaced by the next path down that passes, with a warning (simulated here by a corrupted
    comparison), and the failure is recorded for `kt-sft doctor`."""
    from kt_sft import engine
    from kt_sft.engine import functional as Fn
    from kt_sft.engine import runtime

    paths = [p for p in engine.available_kernel_paths() if p != "avx512-simde"]
    if len(paths) < 2:
        pytest.skip("only the scalar path is available here")
    best = next(p for p in ("amx", "avx512", "avx2") if p in paths)  # whatever KT_SFT_ISA selected
    engine.set_kernel_path(best)
    Fn._VERIFIED.discard(engine.KERNEL_PATHS[best])
    Fn.verify_kernel_path()  # a correct path: no warning, stays selected
    assert engine.kernel_path() == best

    def forget():
        for p in paths:
            Fn._VERIFIED.discard(engine.KERNEL_PATHS[p])
            Fn.SELF_CHECK_FAILURES.pop(p, None)

    request.addfinalizer(lambda: (forget(), engine.set_kernel_path(best)))  # also when an assert fails

    # every path fails: the cascade ends on scalar
    forget()
    monkeypatch.setattr(Fn, "SELF_CHECK_REL_ERR", {"f32": -1.0, "bf16": -1.0, "int8": -1.0})  # any difference is wrong
    with pytest.warns(RuntimeWarning, match="disagrees with the scalar reference"):
        Fn.verify_kernel_path()
    assert engine.kernel_path() == "scalar"
    assert best in Fn.SELF_CHECK_FAILURES

    # only the best path fails: the next one down takes over
    monkeypatch.undo()
    forget()
    engine.set_kernel_path(best)
    real_check = Fn._self_check
    monkeypatch.setattr(Fn, "_self_check", lambda isa: {"f32": 1.0} if isa == engine.KERNEL_PATHS[best] else real_check(isa))
    with pytest.warns(RuntimeWarning, match=f"using '{runtime.path_name(runtime.next_path_down(engine.KERNEL_PATHS[best]))}'"):
        Fn.verify_kernel_path()
    assert engine.kernel_path() == runtime.path_name(runtime.next_path_down(engine.KERNEL_PATHS[best]))
    monkeypatch.undo()
    forget()
    engine.set_kernel_path(best)
    Fn._VERIFIED.discard(engine.KERNEL_PATHS[best])
    Fn.verify_kernel_path()  # a correct path: no warning, stays selected
    assert engine.kernel_path() == best

    Fn._VERIFIED.discard(engine.KERNEL_PATHS[best])
    monkeypatch.setattr(Fn, "SELF_CHECK_REL_ERR", {"f32": -1.0, "bf16": -1.0, "int8": -1.0})  # any difference is wrong
    with pytest.warns(RuntimeWarning, match="disagrees with the scalar reference"):
        Fn.verify_kernel_path()
    assert engine.kernel_path() == "scalar"
    # leave no simulated failure behind: later tests in this process would silently run another path
    monkeypatch.undo()
    forget()
    engine.set_kernel_path(best)


def _dpbf16_paths() -> set[str]:
    """Paths whose bf16 mode can run on vdpbf16ps: the SIMDe twin anywhere, avx512 where the CPU has
    AVX512-BF16 (the amx path has its own bf16 tiles)."""
    from kt_sft.engine._native import lib

    paths = {"avx512-simde"}
    if lib.kt_cpu_features() & lib.KT_CPU_AVX512BF16:
        paths.add("avx512")
    return paths


# The vdpbf16ps kernels sum in another order than the FMA kernels (pairs, the odd product first) and
# flush denormals; the bf16 mode then rounds h and the gradients to bf16, so an element whose fp32
# sum lies next to a rounding boundary flips by one bf16 ulp (2^-8) and carries that on. Measured
# 0.7-1.8e-4 (Frobenius, the shapes below, 10 seeds, both paths); a kernel that drops one product in a pair or
# one K slice misses it by 30x or more.
DPBF16_VS_FMA_REL_ERR = 1e-3


@pytest.mark.parametrize(
    "e,h,inter,t,k",
    [
        (1, 151, 45, 110, 1),    # odd contraction in tn (H = 151: a padding row in the last pair)
        (2, 300, 150, 300, 2),   # two token groups, two K slices, partial blocks
        (64, 96, 40, 290, 6),    # many experts of ~27 tokens; a few under the dot / direct forms' 13
    ],
)
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_dpbf16_kernels(kernel_path, fmt, e, h, inter, t, k, seed, monkeypatch):
    """The bf16 mode's vdpbf16ps kernels (KT_SFT_BF16_DOT=dpbf16; chosen automatically only where the
    core runs them faster than the zmm FMA) against the float64 reference and against the FMA kernels."""
    if kernel_path not in _dpbf16_paths():
        pytest.skip(f"{kernel_path} has no vdpbf16ps kernels")
    gate_up, down = random_experts(e, h, inter)
    idx, w = distinct_routing(t, e, k)
    x = torch.randn(t, h).to(torch.bfloat16)
    results = {}
    for dot in ("fma", "dpbf16"):
        monkeypatch.setenv("KT_SFT_BF16_DOT", dot)
        # a fresh layer each time: a layer's recompute cache would hand back the first forward's y
        ex = CPUExperts.from_tensors(gate_up, down, format=fmt, compute_mode=ComputeMode.BF16)
        torch.manual_seed(99)  # the same dy inside run_and_compare
        results[dot] = run_and_compare(ex, x, idx, w, ComputeMode.BF16)
    errs = {name: rel_err(a.double(), b.double()) for name, a, b in zip(("y", "dx", "dw"), results["dpbf16"], results["fma"])}
    assert max(errs.values()) <= DPBF16_VS_FMA_REL_ERR, f"{kernel_path} {fmt}: dpbf16 vs fma {errs}"
    # y leaves in bf16, which can hide the order difference; the gradients cannot all hide it
    assert max(errs.values()) > 0, f"{kernel_path}: dpbf16 gave the FMA kernels' bits: did it run?"


# The bf16 mode's backward against its twin (R.moe_backward_bf16: x, h, dy, dgu and the weights the
# gradients multiply rounded to bf16, float64 sums). The bound is the int8 mode's for its bf16
# gradients (tests/test_int8_mode.py, TWIN_BF16_GRAD_REL_ERR: one-ulp flips where the engine's fp32
# values and the twin's float64 ones straddle a bf16 rounding boundary). Measured on scalar, avx2,
# avx512 and amx over 5 seeds at these shapes and E=64, H=512, I=256, T=128, k=6: worst 1.25e-4
# (int4), while against a twin with the weights unrounded the int8 / int4 gradients are >= 2.8e-3
# off, so the test sees whether the weights are rounded.
BF16_TWIN_GRAD_REL_ERR = 5e-4


@pytest.mark.parametrize("fmt", list(Format))
@pytest.mark.parametrize("e,h,inter,t,k", [(8, 64, 32, 1, 2), (8, 70, 45, 19, 3), (16, 128, 96, 40, 6)])
def test_bf16_mode_backward_twin(kernel_path, fmt, e, h, inter, t, k, seed):
    gate_up, down = random_experts(e, h, inter)
    ex = CPUExperts.from_tensors(gate_up, down, format=fmt.value, compute_mode="bf16")
    gu, dn = ex.dequantized()
    idx, w = distinct_routing(t, e, k)
    x = torch.randn(t, h).requires_grad_(True)
    ww = w.clone().requires_grad_(True)
    dy = torch.randn(t, h)
    ex(x, idx, ww).backward(dy)
    dx_twin, dw_twin = R.moe_backward_bf16(x.detach(), idx, w, gu, dn, dy)
    errs = {"dx": rel_err(x.grad, dx_twin), "dw": rel_err(ww.grad, dw_twin)}
    assert max(errs.values()) <= BF16_TWIN_GRAD_REL_ERR, f"{kernel_path} {fmt.value}: {errs}"

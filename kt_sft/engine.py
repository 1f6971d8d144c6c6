"""Engine-wide settings: threads and the kernel path (ISA), plus a description for `kt-sft doctor`."""

from __future__ import annotations

import os

from kt_sft import _native
from kt_sft._native import lib

KERNEL_PATHS = {"scalar": 0, "avx2": 1, "avx512": 2}  # KT_ISA_*
_CPU_FLAGS = {
    "avx2": 1, "fma": 2, "f16c": 4, "avx512f": 8, "avx512bw": 16, "avx512vl": 32,
    "avx512_vnni": 64, "avx512_bf16": 128, "amx": 256, "avx_vnni": 512,
}


def set_num_threads(n: int) -> None:
    """Threads the C kernels use (default: KT_SFT_NUM_THREADS, else the CPUs this process may use)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of threads must be a positive int, got {n!r}")
    _native.check(lib.kt_set_num_threads(n), "kt_set_num_threads")


def available_kernel_paths() -> list[str]:
    return [name for name, isa in KERNEL_PATHS.items() if lib.kt_isa_supported(isa)]


def set_kernel_path(name: str) -> None:
    """Forces a kernel path ('scalar', 'avx2', 'avx512'); raises if this CPU or build lacks it."""
    if name not in KERNEL_PATHS:
        raise ValueError(f"unknown kernel path {name!r}; known: {', '.join(KERNEL_PATHS)}")
    if not lib.kt_isa_supported(KERNEL_PATHS[name]):
        raise ValueError(f"kernel path {name!r} is not available here; available: {available_kernel_paths()}")
    _native.check(lib.kt_select_isa(KERNEL_PATHS[name]), "kt_select_isa")


def kernel_path() -> str:
    isa = lib.kt_current_isa()
    return next(name for name, v in KERNEL_PATHS.items() if v == isa)


def engine_info() -> dict:
    feats = lib.kt_cpu_features()
    return {
        "kernel_path": kernel_path(),
        "available_kernel_paths": available_kernel_paths(),
        "threads": lib.kt_get_num_threads(),
        "cpu_flags": [name for name, bit in _CPU_FLAGS.items() if feats & bit],
        "abi_version": lib.kt_abi_version(),
    }


def _apply_env() -> None:
    path = os.environ.get("KT_SFT_ISA")
    if path and _native.available():
        set_kernel_path(path.lower())


_apply_env()


_VERIFIED: set[int] = set()
# Same inputs and mode: only the summation order differs between paths. In the bf16 and int8 modes
# that order can flip a rounding of h or of the gradients (one bf16 ulp, one int8 quantum), which
# the later products carry; measured on avx2 vs scalar: f32 3.4e-7, bf16 1.5e-4, int8 2.2e-7.
# A real kernel bug (indexing, a missed tail) is an O(1) error.
SELF_CHECK_REL_ERR = {"f32": 1e-4, "bf16": 2e-3, "int8": 2e-3}


def verify_kernel_path() -> None:
    """Before a SIMD path computes anything in this process, it must reproduce the scalar reference
    on a small random layer (every format and compute mode, few and many tokens per expert, forward
    and backward, with expert LoRA).
    A path that does not, on this CPU, is dropped for the scalar one with a warning: a wrong kernel
    costs a clear message and speed, never silently wrong numbers. Runs once per path (~10 ms)."""
    isa = lib.kt_current_isa()
    if isa == KERNEL_PATHS["scalar"] or isa in _VERIFIED:
        return
    _VERIFIED.add(isa)
    import warnings

    import torch

    from kt_sft import functional as Fn
    from kt_sft.formats import ComputeMode

    gen = torch.Generator().manual_seed(0)
    worst = {}  # mode -> worst relative error
    cases = [(f, m) for f in ("bf16", "int8", "int4") for m in (ComputeMode.F32, ComputeMode.BF16)]
    cases += [("int8", ComputeMode.INT8), ("int4", ComputeMode.INT8)]
    for fmt, mode in cases:
        packed = Fn.pack_experts(torch.randn(4, 2 * 24, 70, generator=gen), torch.randn(4, 70, 24, generator=gen), fmt)
        for t in (5, 61):
            x = torch.randn(t, 70, generator=gen)
            idx = torch.argsort(torch.rand(t, 4, generator=gen), dim=1)[:, :2].contiguous()
            w = torch.rand(t, 2, generator=gen)
            dy = torch.randn(t, 70, generator=gen)
            lora = Fn.ExpertLora(*(torch.randn(4, 3, n, generator=gen) for n in (48, 70, 70, 24)), scale=0.5)
            outs = []
            for path in (isa, KERNEL_PATHS["scalar"]):
                _native.check(lib.kt_select_isa(path), "kt_select_isa")
                y, gu = Fn.moe_forward(packed, x, idx, w, mode, lora=lora)
                dx, dw, grads = Fn.moe_backward(packed, dy, idx, w, gu, mode, x=x, lora=lora)
                outs.append((y, dx, dw, *grads))
            for fast, ref in zip(*outs):
                err = float((fast - ref).norm() / ref.norm().clamp_min(1e-30))
                worst[mode.value] = max(worst.get(mode.value, 0.0), err if err == err else float("inf"))
    bad = {m: e for m, e in worst.items() if not e <= SELF_CHECK_REL_ERR[m]}
    if not bad:
        _native.check(lib.kt_select_isa(isa), "kt_select_isa")
        return
    name = next(n for n, v in KERNEL_PATHS.items() if v == isa)
    warnings.warn(
        f"kt_sft: kernel path {name!r} disagrees with the scalar reference on this CPU (relative error by "
        f"compute mode {bad}, allowed {SELF_CHECK_REL_ERR}); using 'scalar' instead. Please report this with "
        "`kt-sft doctor`.",
        RuntimeWarning,
        stacklevel=3,
    )

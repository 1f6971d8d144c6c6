"""Engine-wide settings: threads and the kernel path (ISA), plus a description for `kt-sft doctor`.
The check that a chosen SIMD path agrees with scalar runs ops, so it lives with them
(functional.verify_kernel_path); this module needs only the binding."""

from __future__ import annotations

import os

from kt_sft.engine import _native
from kt_sft.engine._native import lib

KERNEL_PATHS = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512-simde": 3, "amx": 4}  # KT_ISA_*
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

"""Engine-wide settings: threads and the kernel path (ISA), plus a description for `kt-sft doctor`.
The check that a chosen SIMD path agrees with scalar runs ops, so it lives with them
(functional.verify_kernel_path); this module needs only the binding."""

from __future__ import annotations

import os
import sys

from kt_sft.engine import _native
from kt_sft.engine._native import lib

KERNEL_PATHS = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512-simde": 3, "amx": 4, "avx-vnni": 5}  # KT_ISA_*
_CPU_FLAGS = {
    "avx2": 1, "fma": 2, "f16c": 4, "avx512f": 8, "avx512bw": 16, "avx512vl": 32,
    "avx512_vnni": 64, "avx512_bf16": 128, "amx": 256, "avx_vnni": 512, "avx512dq": 1024, "amx_bf16": 2048,
    "amx_int8": 4096,
}


# Transparent huge pages for the packed weights. The kernels stream every expert matrix on each
# call, and the backward reads weight rows in column stripes a row apart (one 4 KiB page per row
# visited): with 4 KiB pages that walks the page tables constantly. Measured 2026-12-01 on the AMX
# Xeon: 2 MiB pages made a C loop reading 512-byte stripes of a 1.1 GB matrix 1.0-1.5x faster (the
# narrower the stripe the more) and the DeepSeek-V2-Lite layer's backward 3-13% faster
# (scripts/bench_hugepages.py, same packs with and without). Most distributions set THP to `madvise`,
# so kt_sft asks for it on the memory it allocates for packs (KT_SFT_HUGEPAGES=0 turns it off).
MADV_HUGEPAGE = 14  # Linux <sys/mman.h>
_HUGE = 2 << 20


def hugepages_enabled() -> bool:
    return os.environ.get("KT_SFT_HUGEPAGES", "1").strip().lower() not in ("0", "false", "no", "off")


def advise_hugepages(address: int, nbytes: int) -> bool:
    """madvise(MADV_HUGEPAGE) on the 2 MiB-aligned part of [address, address + nbytes), before the
    memory is first written (pages then come as huge pages at first touch). A hint: False, and no
    error, where the OS, the setting or the range does not allow it."""
    start, end = (address + _HUGE - 1) & ~(_HUGE - 1), (address + nbytes) & ~(_HUGE - 1)
    if end <= start or not hugepages_enabled() or not sys.platform.startswith("linux"):
        return False
    global _libc
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return _libc.madvise(start, end - start, MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


_libc = None


def set_num_threads(n: int) -> None:
    """Threads the C kernels use (default: KT_SFT_NUM_THREADS, else the CPUs this process may use)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of threads must be a positive int, got {n!r}")
    _native.check(lib.kt_set_num_threads(n), "kt_set_num_threads")


def num_threads() -> int:
    """Threads the C kernels use now."""
    return int(lib.kt_get_num_threads())


def available_kernel_paths() -> list[str]:
    return [name for name, isa in KERNEL_PATHS.items() if lib.kt_isa_supported(isa)]


def set_kernel_path(name: str) -> None:
    """Forces a kernel path ('scalar', 'avx2', 'avx512'); raises if this CPU or build lacks it."""
    if name not in KERNEL_PATHS:
        raise ValueError(f"unknown kernel path {name!r}; known: {', '.join(KERNEL_PATHS)}")
    if not lib.kt_isa_supported(KERNEL_PATHS[name]):
        raise ValueError(f"kernel path {name!r} is not available here; available: {available_kernel_paths()}")
    _native.check(lib.kt_select_isa(KERNEL_PATHS[name]), "kt_select_isa")


def path_name(isa: int) -> str:
    return next(name for name, v in KERNEL_PATHS.items() if v == isa)


def kernel_path() -> str:
    return path_name(lib.kt_current_isa())


# The automatic order (kt_core.c); avx512-simde is a test path, never a fallback.
_PREFERENCE = ("amx", "avx512", "avx-vnni", "avx2", "scalar")


def next_path_down(isa: int) -> int:
    """The next supported path below `isa` in the automatic order (scalar at the end)."""
    name = path_name(isa)
    below = _PREFERENCE[_PREFERENCE.index(name) + 1:] if name in _PREFERENCE else ("scalar",)
    return next(KERNEL_PATHS[n] for n in below if lib.kt_isa_supported(KERNEL_PATHS[n]))


# kt_peak_gops kinds (KT_PEAK_*): the instructions the kernel paths are built on.
PEAK_KINDS = {"fma_ymm": 0, "fma_zmm": 1, "dpbf16_zmm": 2, "amx_bf16": 3, "dpbusd_zmm": 4, "maddubs_ymm": 5,
              "amx_int8": 6, "maddwd_ymm": 7, "dpbusd_ymm": 8}
# The instruction whose peak bounds each (kernel path, compute mode); absent: scalar code.
_BOUND_BY = {
    ("avx2", "f32"): "fma_ymm", ("avx2", "bf16"): "fma_ymm",
    ("avx512", "f32"): "fma_zmm", ("avx512", "bf16"): "fma_zmm",
    ("avx512-simde", "f32"): "fma_ymm", ("avx512-simde", "bf16"): "fma_ymm",  # emulated on ymm
    ("amx", "f32"): "fma_zmm", ("amx", "bf16"): "amx_bf16",
    # vpdpbusd where the CPU has AVX512-VNNI (without it the table runs the avx2 vpmaddwd kernels and
    # the dpbusd_zmm peak reads None); int4 packs' backward in this mode is the bf16 mode's (FMA kernels).
    ("avx512", "int8"): "dpbusd_zmm",
    ("avx2", "int8"): "maddwd_ymm",
    # the avx2 table with AVX-VNNI's ymm vpdpbusd for the int8 mode
    ("avx-vnni", "f32"): "fma_ymm", ("avx-vnni", "bf16"): "fma_ymm", ("avx-vnni", "int8"): "dpbusd_ymm",
    # tdpbssd for int8 packs (int4 packs' forward runs on AMX-BF16 tiles, one step per 32-block)
    ("amx", "int8"): "amx_int8",
}


def measure_peaks(seconds: float = 0.25) -> dict[str, float | None]:
    """G operations/s (a multiply-add counts 2) of each instruction on all engine threads at once;
    None where this CPU or OS lacks it. Measured, so a busy machine reads low."""
    out = {}
    for name, kind in PEAK_KINDS.items():
        v = lib.kt_peak_gops(kind, seconds)
        out[name] = round(v, 1) if v >= 0 else None
    return out


def peak_instruction(path: str, mode: str) -> str | None:
    """The instruction whose peak bounds `path` in compute `mode` (None: scalar code, no SIMD bound);
    the avx512 path's bf16 mode runs on vdpbf16ps, every pack format, where bf16_dot() chose it."""
    if path == "avx512" and mode == "bf16" and bf16_dot() == "dpbf16":
        return "dpbf16_zmm"
    return _BOUND_BY.get((path, mode))


def bf16_dot() -> str:
    """The avx512 path's products in the bf16 mode on bf16 packs: "dpbf16" (vdpbf16ps) or "fma" (zmm FMA),
    whichever this core runs faster (KT_SFT_BF16_DOT=fma|dpbf16 forces one; dpbf16 needs AVX512-BF16)."""
    return "dpbf16" if lib.kt_bf16_dot() == lib.KT_BF16_DOT_DPBF16 else "fma"


def bf16_dot_ratio() -> float | None:
    """vdpbf16ps' multiply-add rate over the zmm FMA's on one core (measured once); None without AVX512-BF16."""
    r = lib.kt_bf16_dot_ratio()
    return round(r, 2) if r >= 0 else None


def engine_info() -> dict:
    feats = lib.kt_cpu_features()
    return {
        "kernel_path": kernel_path(),
        "available_kernel_paths": available_kernel_paths(),
        "threads": lib.kt_get_num_threads(),
        "cpu_flags": [name for name, bit in _CPU_FLAGS.items() if feats & bit],
        "abi_version": lib.kt_abi_version(),
        "bf16_dot": bf16_dot(),
        "bf16_dot_ratio": bf16_dot_ratio(),
    }


def _apply_env() -> None:
    path = os.environ.get("KT_SFT_ISA")
    if path and _native.available():
        set_kernel_path(path.lower())


_apply_env()

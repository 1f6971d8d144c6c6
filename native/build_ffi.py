"""cffi builder for kt_sft's native engine (API mode, out of line).

Used by setuptools through ``cffi_modules`` in pyproject/setup. The C declarations come from the
part of ``native/kt_sft.h`` between the ``cffi-begin``/``cffi-end`` markers, so the header stays
the one place the API is written down.
"""

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["kt_core.c", "kt_formats.c", "kt_moe.c", "kt_kernels_scalar.c", "kt_kernels_avx2.c",
           "kt_kernels_avx512.c", "kt_kernels_amx.c", "kt_swiglu_avx512.c",
           "kt_peak.c"]
INCLUDE_DIRS = [HERE]

# The avx512 kernels' SIMDe twin (kernel path "avx512-simde", a test path for CPUs without
# AVX-512) needs SIMDe's headers (Debian: libsimde-dev; elsewhere SIMDE_INCLUDE_DIR). Without them
# the build leaves it out and the path is simply absent.
_SIMDE_DIRS = [d for d in (os.environ.get("SIMDE_INCLUDE_DIR"), "/usr/include", "/usr/local/include") if d]
SIMDE_DIR = next((d for d in _SIMDE_DIRS if os.path.exists(os.path.join(d, "simde", "x86", "avx512.h"))), None)
_NO_SIMDE = bool(os.environ.get("KT_SFT_NO_SIMDE"))
if _NO_SIMDE:  # leave the twin out on purpose (scripts/sanitize.sh --quick: it compiles for minutes there)
    SIMDE_DIR = None
if SIMDE_DIR is None and not _NO_SIMDE and os.environ.get("KT_SFT_REQUIRE_SIMDE") == "1":  # CI: part of the suite
    raise RuntimeError("KT_SFT_REQUIRE_SIMDE=1 but SIMDe's headers are missing: apt-get install -y libsimde-dev "
                       "(or set SIMDE_INCLUDE_DIR)")
if SIMDE_DIR is not None:
    SOURCES.append("kt_kernels_avx512_simde.c")
    if SIMDE_DIR not in ("/usr/include", "/usr/local/include"):
        INCLUDE_DIRS.append(SIMDE_DIR)


def _cdef_from_header() -> str:
    with open(os.path.join(HERE, "kt_sft.h")) as f:
        text = f.read()
    match = re.search(r"/\* cffi-begin \*/(.*)/\* cffi-end \*/", text, re.S)
    if match is None:
        raise RuntimeError("kt_sft.h lost its cffi-begin/cffi-end markers")
    body = re.sub(r"/\*.*?\*/", "", match.group(1), flags=re.S)  # cffi cannot parse block comments
    return body


# KT_SFT_SANITIZE=address,undefined (any -fsanitize= list) builds the engine for the sanitizer runs
# (scripts/sanitize.sh): -O1 -g, frame pointers, and UBSan findings abort instead of printing and going
# on, so a test that triggers one fails. Python then needs the ASan runtime preloaded (the script does it).
SANITIZE = os.environ.get("KT_SFT_SANITIZE", "").strip()
SANITIZE_CFLAGS = ["-fsanitize=" + SANITIZE, "-fno-omit-frame-pointer", "-g", "-O1",
                   "-fno-sanitize-recover=all"] if SANITIZE else []
SANITIZE_LDFLAGS = ["-fsanitize=" + SANITIZE] if SANITIZE else []

ffibuilder = FFI()
ffibuilder.cdef(_cdef_from_header())
ffibuilder.set_source(
    "kt_sft._kt_native",
    '#include "kt_sft.h"',
    sources=[os.path.relpath(os.path.join(HERE, s)) for s in SOURCES],
    include_dirs=[os.path.relpath(d) for d in INCLUDE_DIRS],
    # No -march: the wheel must run on any x86-64 (or other) CPU; SIMD files opt in per function.
    extra_compile_args=["-O3", "-std=c11", "-fno-math-errno", "-Wall", "-Wno-unused-function"] + SANITIZE_CFLAGS,
    extra_link_args=["-pthread"] + SANITIZE_LDFLAGS,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

"""cffi builder for kt_sft's native engine (API mode, out of line).

Used by setuptools through ``cffi_modules`` in pyproject/setup. The C declarations come from the
part of ``native/kt_sft.h`` between the ``cffi-begin``/``cffi-end`` markers, so the header stays
the one place the API is written down.
"""

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["kt_core.c", "kt_formats.c", "kt_moe.c", "kt_kernels_scalar.c", "kt_kernels_avx2.c"]


def _cdef_from_header() -> str:
    with open(os.path.join(HERE, "kt_sft.h")) as f:
        text = f.read()
    match = re.search(r"/\* cffi-begin \*/(.*)/\* cffi-end \*/", text, re.S)
    if match is None:
        raise RuntimeError("kt_sft.h lost its cffi-begin/cffi-end markers")
    body = re.sub(r"/\*.*?\*/", "", match.group(1), flags=re.S)  # cffi cannot parse block comments
    return body


ffibuilder = FFI()
ffibuilder.cdef(_cdef_from_header())
ffibuilder.set_source(
    "kt_sft._kt_native",
    '#include "kt_sft.h"',
    sources=[os.path.relpath(os.path.join(HERE, s)) for s in SOURCES],
    include_dirs=[os.path.relpath(HERE)],
    # No -march: the wheel must run on any x86-64 (or other) CPU; SIMD files opt in per function.
    extra_compile_args=["-O3", "-std=c11", "-fno-math-errno", "-Wall", "-Wno-unused-function"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

/* The avx512 kernels compiled against SIMDe's portable AVX-512 with only AVX2 + FMA enabled: the
 * table kt_kernels_avx512_simde ("avx512-simde"), a test path that runs the zmm code on any AVX2
 * CPU (never chosen automatically; KT_SFT_ISA=avx512-simde or engine.set_kernel_path selects it).
 * Its int8-mode products run SIMDe's vpdpbusd, which matches the hardware bit for bit (always
 * taken here: the emulation needs no VNNI).
 * Built only where SIMDe's headers are installed (native/build_ffi.py). */
#define KT_SIMDE 1
#pragma GCC diagnostic ignored "-Wpsabi" /* SIMDe passes 64-byte vectors by value: a note, not a problem */
#include "kt_kernels_avx512.c"

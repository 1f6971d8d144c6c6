#!/usr/bin/env bash
# One core, the avx512 path's products in isolation (scripts/gemm_harness.c): the 12 x 32 micro-kernel
# on cached data against the whole nt / tn product whose panels read weights from memory, per pack
# format, as GFLOP/s and % of the core's zmm FMA peak. Needs gcc and a CPU with AVX-512 F/BW/VL/DQ (the avx512 table's needs; it exits 2 without).
#
#   scripts/gemm_harness.sh [M tokens, 96..252 (dp: 1..252); default 192] [experts; 16] [rounds; 5] [fma|dp|q8; fma]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
srcs=$(ls native/*.c | grep -v -e kt_kernels_avx512 -e simde)
gcc -O3 -std=c11 -fno-math-errno -Wno-psabi -Inative -o "$out/gemm_harness" scripts/gemm_harness.c $srcs -lpthread -lm
"$out/gemm_harness" "$@"

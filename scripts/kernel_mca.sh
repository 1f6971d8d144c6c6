#!/usr/bin/env bash
# llvm-mca model of the kernels' hot inner loops (issue #12 item 3).
#
# Compiles native/kt_kernels_{avx512,avx2}.c to assembly with the build's flags, cuts out the hot
# inner loop of each micro-kernel (the single-block loop with the most FMAs in the named function),
# runs llvm-mca on it for several CPUs and prints predicted cycles per iteration against the bound
# set by the FMA throughput in the same CPU model (FMAs per iteration x the model's reciprocal
# throughput of one FMA). AMX tile loops (kt_kernels_amx.c) are not modeled: llvm-mca has no AMX
# resources. Needs gcc and llvm-mca-19 (Debian: llvm-19; llvm-15 lacks znver4).
#
#   scripts/kernel_mca.sh            # table on stdout
#   KEEP=dir scripts/kernel_mca.sh   # also keeps the assembly and the extracted loops in dir
set -euo pipefail
cd "$(dirname "$0")/.."
MCA=${MCA:-llvm-mca-19}
command -v "$MCA" >/dev/null || { echo "kernel_mca.sh: $MCA not found (apt-get install llvm-19)" >&2; exit 1; }
WORK=${KEEP:-$(mktemp -d)}
mkdir -p "$WORK"
[ -n "${KEEP:-}" ] || trap 'rm -rf "$WORK"' EXIT
CFLAGS="-O3 -std=c11 -fno-math-errno -Wno-psabi"

gcc $CFLAGS -Inative -S native/kt_kernels_avx512.c -o "$WORK/avx512.s"
gcc $CFLAGS -Inative -S native/kt_kernels_avx2.c -o "$WORK/avx2.s"
# The AVX2 int8 candidate that lost (issue #13 item 2): a 6x16 tile of vpmaddubsw (u8 x s8 into
# int16 pairs) + vpmaddwd by ones + vpaddd over quads of the contraction. u8 x s8 with signed
# activations needs the sign trick per product: |a| as the unsigned operand (vpabsb once per
# broadcast) and the weights with a's signs (vpsignb per product, the panel being shared by tokens).
# Without it the int16 pair sums (a + 128) w reach 255 * 127 * 2 and saturate.
cat > "$WORK/cand.c" <<'C'
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
__attribute__((target("avx2"))) void cand_maddubs_6x16(int64_t nq, const int8_t *const *a, const __m256i *P,
                                                      __m256i *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i c[6][2];
    for (int i = 0; i < 6; i++) c[i][0] = c[i][1] = _mm256_setzero_si256();
    for (int64_t q = 0; q < nq; q++) {
        const __m256i w0 = _mm256_load_si256(P + 2 * q), w1 = _mm256_load_si256(P + 2 * q + 1);
#pragma GCC unroll 6
        for (int i = 0; i < 6; i++) {
            int32_t v;
            memcpy(&v, a[i] + 4 * q, 4);
            const __m256i b = _mm256_set1_epi32(v), u = _mm256_abs_epi8(b);
            c[i][0] = _mm256_add_epi32(c[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(w0, b)), ones));
            c[i][1] = _mm256_add_epi32(c[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(w1, b)), ones));
        }
    }
    for (int i = 0; i < 6; i++) out[2 * i] = c[i][0], out[2 * i + 1] = c[i][1];
}
C
gcc $CFLAGS -S "$WORK/cand.c" -o "$WORK/cand.s"

python3 - "$WORK" "$MCA" <<'PY'
import re, subprocess, sys

work, MCA_BIN = sys.argv[1], sys.argv[2]

# (source, function, what it is, CPUs)
ZMM_CPUS = ["znver4", "sapphirerapids"]
YMM_CPUS = ["znver3", "skylake", "znver4", "sapphirerapids", "alderlake", "znver5"]
LOOPS = [
    ("avx512", "ukernel_12", "12x32 panel tile (nt and tn, M >= 13)", ZMM_CPUS),
    ("avx512", "ukernel_8", "8x32 panel tile (a tail tile)", ZMM_CPUS),
    ("avx512", "ukernel_packed_12", "12x32 tile on the prepared operand", ZMM_CPUS),
    ("avx512", "ukernel_dp_12", "bf16 pairs 12x32 vdpbf16ps tile", ZMM_CPUS + ["znver5"]),
    ("avx512", "ukernel_lanes_8_3", "bf16 pack nt, 8 rows x 48 tokens in lanes", ZMM_CPUS + ["znver5"]),
    ("avx512", "ukernel_direct_bf16_12", "tn direct, bf16 dequant in loop (M <= 12)", ZMM_CPUS),
    ("avx512", "ukernel_direct_int8_12", "tn direct, int8 dequant in loop", ZMM_CPUS),
    ("avx512", "ukernel_direct_int4_12", "tn direct, int4 dequant in loop", ZMM_CPUS),
    ("avx512", "ukernel_direct_int8rw_12", "tn direct, int8, weights rounded to bf16", ZMM_CPUS),
    ("avx512", "ukernel_direct_int4rw_12", "tn direct, int4, table rounded to bf16", ZMM_CPUS),
    ("avx512", "nt_dot_bf16", "nt dot form 4x4, bf16 (M <= 12)", ZMM_CPUS),
    ("avx512", "nt_dot_int8", "nt dot form 6x4, int8", ZMM_CPUS),
    ("avx512", "dots_avx512", "LoRA dots, 4 rows", ZMM_CPUS),
    ("avx512", "nt_q8_int8_tile_12", "int8 mode, int8 nt 12x32 vpdpbusd tile", ZMM_CPUS),
    ("avx512", "tn_q8_tile_12", "int8 mode, int8 tn 12x32 vpdpbusd tile", ZMM_CPUS),
    ("avx512", "nt_q8_int4_tile_6", "int8 mode, int4 nt 6x32, one 32-block", ZMM_CPUS),
    ("avx2", "panel_times_rows", "avx2 6x16 panel tile (inlined there)", YMM_CPUS),
    ("avx2", "dots_avx2", "avx2 LoRA dots, 4 rows", YMM_CPUS),
    ("avx2", "q_nt_int8_tile_6", "avx2 int8 mode, int8 nt 6x16 vpmaddwd tile", YMM_CPUS),
    ("avx2", "q_tn_tile_6", "avx2 int8 mode, int8 tn 6x16 vpmaddwd tile", YMM_CPUS),
    ("avx2", "q_nt_int4_tile_3", "avx2 int8 mode, int4 nt 3x16, one 32-block", YMM_CPUS),
    ("cand", "cand_maddubs_6x16", "candidate: vpmaddubsw + sign trick 6x16", YMM_CPUS),
    ("avx2", "v_nt_int8_tile_6", "avx-vnni int8 nt 6x16 ymm vpdpbusd tile", ["alderlake", "znver5"]),
    ("avx2", "v_tn_tile_6", "avx-vnni int8 tn 6x16 ymm vpdpbusd tile", ["alderlake", "znver5"]),
]
# multiply-adds per dot-product instruction (op_of) of the avx2 tiles, for their comparison with the
# fp32 FMA tile: vfmadd ymm 8, vpmaddwd 16 (int16 pairs), 32 in the candidate (after vpmaddubsw)
MACS_PER_OP = {"panel_times_rows": 8, "q_nt_int8_tile_6": 16, "q_tn_tile_6": 16, "q_nt_int4_tile_3": 16,
               "cand_maddubs_6x16": 32, "v_nt_int8_tile_6": 32, "v_tn_tile_6": 32}


def op_of(func):
    """The dot-product instruction that bounds a loop: vpdpbusd in the avx512 int8 mode's, vpmaddwd
    in the avx2 one's (q_*), else the FMA."""
    return ("vpdpbusd" if "_q8_" in func or func.startswith("v_") else "vpmaddwd" if func.startswith(("q_", "cand_"))
            else "vdpbf16ps" if func.startswith(("ukernel_dp", "ukernel_lanes")) else "vfmadd")


def hot_loop(asm_lines, func):
    """Body of the single-basic-block backward-branch loop with the most dot-product instructions
    (op_of) in func."""
    start = next((i for i, l in enumerate(asm_lines) if l.startswith(func + ":")), None)
    if start is None:
        return None  # inlined into its caller
    end = next((i for i in range(start + 1, len(asm_lines))
                if re.match(r"\s*\.size\s+" + re.escape(func) + ",", asm_lines[i])), len(asm_lines))
    body = asm_lines[start:end]
    labels = {l.rstrip(":").strip(): i for i, l in enumerate(body) if re.match(r"^\.L\w+:", l)}
    best = None
    for i, l in enumerate(body):
        m = re.match(r"\s+j\w+\s+(\.L\w+)", l)
        if not (m and m.group(1) in labels and labels[m.group(1)] < i):
            continue
        loop = [x for x in body[labels[m.group(1)] + 1:i + 1]
                if x.strip() and not x.strip().startswith((".", "#")) and not re.match(r"^\.L\w+:", x)]
        if any(re.match(r"\s+j\w+\s+\.L", x) for x in loop[:-1]):
            continue  # more than one basic block
        score = sum(op_of(func) in x for x in loop)
        if best is None or score > best[0] or (score == best[0] and len(loop) < len(best[1])):
            best = (score, loop)
    if best is None or best[0] == 0:
        return None
    target = re.match(r"\s+j\w+\s+(\.L\w+)", best[1][-1]).group(1)
    return [target + ":"] + best[1]


def mca(loop_text, cpu, op):
    out = subprocess.run([MCA_BIN, f"-mcpu={cpu}", "-iterations=500", "-instruction-info"], input=loop_text,
                         capture_output=True, text=True, check=True).stdout
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", out).group(1)) / 500
    op_rt = [float(m.group(1)) for m in re.finditer(r"^\s*\d+\s+\d+\s+([\d.]+)\s+.*" + op, out, re.M)]
    return cycles, sum(op_rt)  # bound: each dot-product instruction's reciprocal throughput in this model


asm = {src: open(f"{work}/{src}.s").read().splitlines() for src in ("avx512", "avx2", "cand")}
fma_tile = {}  # cpu -> cycles per iteration of the avx2 fp32 FMA tile
print(f"{'loop':<26} {'what':<44} {'cpu':<15} {'ops':>4} {'cyc/iter':>8} {'op bound':>9} {'% bound':>7}")
worst = 100.0
for src, func, what, cpus in LOOPS:
    loop = hot_loop(asm[src], func)
    if loop is None:
        print(f"{func:<26} {what:<44} (no single-block FMA loop found)")
        continue
    open(f"{work}/{func}.loop.s", "w").write("\n".join(loop) + "\n")
    n_fma = sum(op_of(func) in l for l in loop)
    for cpu in cpus:
        cycles, bound = mca("\n".join(loop) + "\n", cpu, op_of(func))
        pct = 100.0 * bound / cycles
        worst = min(worst, pct) if "panel tile" in what and src == "avx512" else worst
        extra = ""
        if func in MACS_PER_OP:
            rate = MACS_PER_OP[func] * n_fma / cycles
            if func == "panel_times_rows":
                fma_tile[cpu] = rate
            extra = f"  {rate:5.1f} MACs/cycle, {rate / fma_tile[cpu]:.2f}x the fp32 FMA tile"
        print(f"{func:<26} {what:<44} {cpu:<15} {n_fma:>4} {cycles:>8.1f} {bound:>9.1f} {pct:>6.0f}%{extra}")
print(f"\navx512 panel tiles (the hot loop of every product with M >= 13): worst {worst:.0f}% of the FMA bound")
print("ops: the loop's dot-product instructions (vfmadd; vdpbf16ps in ukernel_dp_*; vpdpbusd in the *_q8_* integer tiles, vpmaddwd in the")
print("avx2 q_* ones, whose vpaddd the bound leaves out), bound: their")
print("reciprocal throughputs summed in the CPU model.")
print("The direct/dot forms (few tokens) dequantize inside the loop, so their bound is shared with the")
print("conversion uops; llvm-19's sapphirerapids model issues zmm FMAs on port 0 only (1/cycle), real")
print("Xeon Scalable parts with two 512-bit FMA units do 2/cycle.")
PY

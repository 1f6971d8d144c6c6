/*
 * kt_sft native engine: the single source of truth for the packed expert formats and the C API.
 *
 * Everything between "cffi-begin" and "cffi-end" is also fed to cffi's cdef (native/build_ffi.py),
 * so that part holds only plain declarations and integer #defines.
 *
 * ## Packed matrices
 *
 * A frozen expert matrix W has N rows (outputs) and K columns (inputs): gate_up_proj[e] is
 * (N=2I, K=H), down_proj[e] is (N=H, K=I), exactly as transformers 5.6 stores them. Every format
 * keeps W row-major (one row = one output channel, contiguous along K), because the forward
 * products contract along K (a dot product per row) and the backward products (dx = W^T d) read
 * the same rows and scale-accumulate them; a kernel that needs another interleaving repacks a
 * small panel in cache. So one copy of the weights serves both directions.
 *
 * Rows are padded with zeros to K_pad (a multiple of the format's block), so row starts stay
 * 64-byte aligned and any K is allowed. A matrix is [N rows of quants][per-row/per-block scales],
 * and E matrices sit back to back, each padded to a multiple of 64 bytes (kt_matrix_bytes).
 *
 *   format  quants per row            scales                       bits/weight
 *   bf16    K_pad(32) x bf16          none                         16
 *   int8    K_pad(64) x int8          N x fp32, one per row        8 + 32/K
 *   int4    K_pad(32)/2 bytes         N x K_pad/32 x fp16          4 + 16/32 = 4.5
 *
 * The math of each block is next to its struct below.
 */
#ifndef KT_SFT_H
#define KT_SFT_H

#include <stddef.h>
#include <stdint.h>

/* cffi-begin */

#define KT_ABI_VERSION 3

/* Weight formats (same lowercase names in Python, YAML and docs). */
#define KT_FORMAT_BF16 0
#define KT_FORMAT_INT8 1
#define KT_FORMAT_INT4 2

/* Elements per block along K. */
#define KT_BF16_BLOCK 32
#define KT_INT8_BLOCK 64
#define KT_INT4_BLOCK 32

/* bf16: w = bf16_to_fp32(v). 16 bits/weight, no scale. */
typedef struct {
    uint16_t v[32];     /* 32 consecutive weights of one row, raw bf16 bits */
} kt_block_bf16;

/* int8: w[n,k] = d[n] * q[n,k], d = absmax(row)/127, q = round(w/d) in [-127, 127].
 * One fp32 scale per row (stored after all rows), 8 bits/weight + 32 bits/row.
 * A per-row scale is what lets both directions run in integer arithmetic: the forward folds d[n]
 * into the output, the backward folds it into the incoming gradient (dx = sum_n (dh[n]*d[n]) q[n,:]). */
typedef struct {
    int8_t q[64];       /* 64 consecutive quants of one row */
} kt_block_int8;

/* int4: w[n,k] = d[n,b] * (q[n,k] - 8) for k in block b of 32, q in [0, 15].
 * d = m / -8 where m is the block's value of largest magnitude (keeps its sign), so the extreme
 * lands exactly on -8 and the grid is used fully. fp16 scales stored after all rows.
 * Byte j of a block holds element j in its low nibble and element j+16 in its high nibble, so a
 * 16-byte load splits into the two halves in order with one mask and one shift. 4.5 bits/weight. */
typedef struct {
    uint8_t qs[16];     /* 32 quants, 4 bits each */
} kt_block_int4;

/* Activation dtypes for x, dy (inputs) and fp32 outputs. */
#define KT_DTYPE_F32  0
#define KT_DTYPE_BF16 1

/* Compute modes: how activations enter the products.
 *   F32:  fp32 activations and fp32 math on the dequantized weights (the exact mode).
 *   BF16: activations rounded to bf16 (x, h, dy, dgu); weights as stored; fp32 accumulation.
 *   INT8: activations quantized per token to int8 (absmax), integer products (int8/int4 only). */
#define KT_ACT_F32  0
#define KT_ACT_BF16 1
#define KT_ACT_INT8 2

/* Kernel paths, chosen at run time from the CPU (kt_select_isa / KT_SFT_ISA). The automatic
 * choice is the highest supported one except AVX512_SIMDE (the AVX-512 source compiled against
 * SIMDe's portable emulation: a test path, selectable only by hand).
 *   AVX512: zmm fp32 FMA (needs F/BW/VL/DQ); AMX: the bf16 compute mode's products on AMX-BF16
 *   tiles, everything else as AVX512. */
#define KT_ISA_SCALAR 0
#define KT_ISA_AVX2   1
#define KT_ISA_AVX512 2
#define KT_ISA_AVX512_SIMDE 3
#define KT_ISA_AMX    4
#define KT_ISA_AVX_VNNI 5

/* CPU feature bits reported by kt_cpu_features. */
#define KT_CPU_AVX2        1
#define KT_CPU_FMA         2
#define KT_CPU_F16C        4
#define KT_CPU_AVX512F     8
#define KT_CPU_AVX512BW    16
#define KT_CPU_AVX512VL    32
#define KT_CPU_AVX512VNNI  64
#define KT_CPU_AVX512BF16  128
#define KT_CPU_AMX         256
#define KT_CPU_AVXVNNI     512
#define KT_CPU_AVX512DQ    1024
#define KT_CPU_AMXBF16     2048
#define KT_CPU_AMXINT8     4096

/* Instruction peaks measured by kt_peak_gops (see native/kt_peak.c). */
#define KT_PEAK_FMA_YMM     0
#define KT_PEAK_FMA_ZMM     1
#define KT_PEAK_DPBF16_ZMM  2
#define KT_PEAK_AMX_BF16    3
#define KT_PEAK_DPBUSD_ZMM  4
#define KT_PEAK_MADDUBS_YMM 5
#define KT_PEAK_AMX_INT8    6
#define KT_PEAK_MADDWD_YMM  7
#define KT_PEAK_DPBUSD_YMM  8

/* Return codes. On error kt_last_error() names the cause, file and line. */
#define KT_OK          0
#define KT_EINVAL      1
#define KT_ENOMEM      2
#define KT_EUNSUPPORTED 3

/* One MoE layer call. Shapes: P = T*k routing pairs, p = t*k + j.
 * The caller validates every input (kt_sft/functional.py); the C side asserts invariants only. */
typedef struct {
    int format;                 /* KT_FORMAT_* of both packed matrices */
    int act_mode;               /* KT_ACT_* */
    int64_t E, H, I;            /* experts, hidden size, intermediate size */
    int64_t T, k;               /* tokens, experts per token */

    const void *gate_up;        /* E x kt_matrix_bytes(format, 2I, H): [gate rows 0..I) then [up rows I..2I) */
    const void *down;           /* E x kt_matrix_bytes(format, H, I) */

    const int64_t *topk_idx;    /* (T, k) expert ids in [0, E) */
    const float *topk_w;        /* (T, k) routing weights */

    /* forward */
    const void *x;              /* (T, H), x_dtype */
    int x_dtype;
    float *y;                   /* (T, H) out: sum_j w[t,j] * expert_e(x[t]) */
    float *gu;                  /* (P, 2I) out of forward, in to backward: gate|up pre-activations */

    /* backward */
    const void *dy;             /* (T, H), dy_dtype */
    int dy_dtype;
    float *dx;                  /* (T, H) out */
    float *dw;                  /* (T, k) out: d loss / d topk_w */

    /* LoRA on the routed experts, optional (lora_r = 0: none). fp32, contiguous, per expert e:
     *   gate_up:  gu[p]  += s * A_gu[e]^T (B_gu[e] x[t])     B_gu (E, r, H),  A_gu (E, r, 2I)
     *   down:     out[p] += s * A_d[e]^T  (B_d[e] h[p])      B_d  (E, r, I),  A_d  (E, r, H)
     * s = lora_scale. B maps a product's input to rank r, A maps rank r to its output: PEFT's
     * ParamWrapper keeps A as lora_A.weight (r*E, N), which is A here as is, and B as
     * lora_B.weight (K, r*E) with the expert fastest, which kt_sft/lora.py permutes to (E, r, K).
     * The backward also needs x (the forward's input, same dtype rules) and writes the four
     * gradients (overwritten, zero for experts without pairs). */
    int64_t lora_r;
    float lora_scale;
    const float *lora_gu_a;
    const float *lora_gu_b;
    const float *lora_d_a;
    const float *lora_d_b;
    float *grad_gu_a;
    float *grad_gu_b;
    float *grad_d_a;
    float *grad_d_b;

    /* workspace, sized by the caller */
    int32_t *plan;              /* E + 1 + P: expert offsets, then pair ids grouped by expert */
    float *h;                   /* (P, I) forward: silu(g)*u; backward: d(expert output)/dh unweighted */
    float *dgu;                 /* (P, 2I) backward only: gradient w.r.t. gate|up pre-activations */
} kt_moe_args;

int kt_abi_version(void);
const char *kt_last_error(void);

/* CPU and threads */
unsigned kt_cpu_features(void);
int kt_isa_supported(int isa);
int kt_select_isa(int isa);           /* force a path; KT_EUNSUPPORTED if this CPU lacks it */
int kt_current_isa(void);
int kt_set_num_threads(int n);
int kt_get_num_threads(void);

/* Formats */
size_t kt_matrix_bytes(int format, int64_t N, int64_t K);
int64_t kt_padded_k(int format, int64_t K);
/* w is (N, K) fp32 row-major; dst has kt_matrix_bytes(format, N, K) bytes. Scalar reference. */
int kt_quantize_matrix(int format, const float *w, int64_t N, int64_t K, void *dst);
int kt_dequantize_matrix(int format, const void *src, int64_t N, int64_t K, float *w);
/* Quantize many matrices (E of them, each N x K) in parallel: src is (E, N, K), fp32 or bf16. */
int kt_quantize_experts(int format, const void *src, int src_dtype, int64_t E, int64_t N, int64_t K,
                        void *dst);

/* Peak of one instruction on all engine threads at once, in G operations/s (a multiply-add is
 * 2); runs for at least min_seconds. -1 where this CPU (or OS, for AMX) lacks the instruction. */
double kt_peak_gops(int kind, double min_seconds);

/* The avx512 path's products in the bf16 compute mode on bf16 packs (KT_SFT_BF16_DOT=fma|dpbf16|auto):
 * zmm FMA on fp32 panels, or vdpbf16ps on panels of bf16 pairs, whichever this core runs faster
 * (auto: decided once from kt_bf16_dot_ratio; vdpbf16ps only where the CPU has AVX512-BF16). */
#define KT_BF16_DOT_FMA    0
#define KT_BF16_DOT_DPBF16 1
int kt_bf16_dot(void);
/* vdpbf16ps' multiply-add rate over the zmm FMA's on the calling thread (best of a few short
 * interleaved runs of each probe; measured once, then cached); -1 without AVX512-BF16. */
double kt_bf16_dot_ratio(void);

/* The MoE expert layer */
int kt_moe_forward(const kt_moe_args *a);
int kt_moe_backward(const kt_moe_args *a);

/* cffi-end */

#endif /* KT_SFT_H */

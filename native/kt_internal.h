/* Internal declarations shared by the native sources (not part of the cffi API). */
#ifndef KT_INTERNAL_H
#define KT_INTERNAL_H

#include <assert.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kt_sft.h"

_Static_assert(sizeof(kt_block_bf16) == 2 * KT_BF16_BLOCK, "bf16 block: 16 bits/weight");
_Static_assert(sizeof(kt_block_int8) == KT_INT8_BLOCK, "int8 block: 8 bits/weight");
_Static_assert(sizeof(kt_block_int4) * 2 == KT_INT4_BLOCK, "int4 block: 4 bits/weight + fp16 scale");
_Static_assert(sizeof(kt_block_bf16) % 64 == 0 && sizeof(kt_block_int8) % 64 == 0,
               "row starts stay cache-line aligned");

/* ---- errors ------------------------------------------------------------------------------- */

void kt_set_error(const char *file, int line, const char *fmt, ...);
#define KT_FAIL(code, ...) do { kt_set_error(__FILE__, __LINE__, __VA_ARGS__); return (code); } while (0)

/* ---- scalar conversions ------------------------------------------------------------------- */

static inline float kt_bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even; NaN stays NaN (quiet). */
static inline uint16_t kt_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float kt_round_bf16(float f) { return kt_bf16_to_f32(kt_f32_to_bf16(f)); }

/* swiglu_bwd's rounding flags (kt_kernels.swiglu_bwd) */
#define KT_ROUND_H 1
#define KT_ROUND_GRAD 2

float kt_fp16_to_f32(uint16_t h);
uint16_t kt_f32_to_fp16(float f);

static inline float kt_silu(float g) { return g / (1.0f + expf(-g)); }

/* ---- the int8 mode's row quantization ------------------------------------------------------ */

/* z = v (* scale elementwise), s = max|z| / 127, q = lrint(z * (1 / s)): the scalar pieces of
 * kt_moe.c's reference loop, shared with the tables' vectorized quantize_row (which runs them on the
 * elements past its last full vector), so both stay the same operations. */
static inline float kt_quant_z(const float *v, const float *scale, int64_t i) {
    return scale ? v[i] * scale[i] : v[i];
}

/* Folds max |z| over [i0, n) into *amax; clears *finite when a z is not finite. */
static inline void kt_quant_absmax(const float *v, const float *scale, int64_t i0, int64_t n, float *amax,
                                   int *finite) {
    for (int64_t i = i0; i < n; i++) {
        const float a = fabsf(kt_quant_z(v, scale, i));
        *finite &= a <= 3.402823466e38f;
        *amax = a > *amax ? a : *amax;
    }
}

/* Zeroes q's padding [n, n_pad) and sets the row scale *sc and *inv = 1 / *sc; a non-finite row gets
 * *sc = NaN and q = 0 (returns 0: nothing left to round). */
static inline int kt_quant_scale(float amax, int finite, int64_t n, int64_t n_pad, int8_t *q, float *sc,
                                 float *inv) {
    memset(q + n, 0, (size_t)(n_pad - n));
    if (!finite) {
        memset(q, 0, (size_t)n);
        *sc = NAN;
        return 0;
    }
    *sc = amax / 127.0f;
    *inv = *sc > 0.0f ? 1.0f / *sc : 0.0f;
    return 1;
}

static inline void kt_quant_round(const float *v, const float *scale, int64_t i0, int64_t n, float inv,
                                  int8_t *q) {
    for (int64_t i = i0; i < n; i++) q[i] = (int8_t)lrintf(kt_quant_z(v, scale, i) * inv);
}

/* ---- packed matrix geometry ---------------------------------------------------------------- */

typedef struct {
    int format;
    int64_t N, K, K_pad;
    size_t row_bytes;      /* bytes of one row of quants */
    size_t scales_offset;  /* byte offset of the scales after the rows */
    size_t bytes;          /* whole matrix, padded to 64 */
} kt_matrix_layout;

int kt_matrix_layout_of(int format, int64_t N, int64_t K, kt_matrix_layout *out);

/* Dequantize columns [k0, k1) of row n into out[0 .. k1-k0). */
void kt_dequant_row_segment(const kt_matrix_layout *L, const uint8_t *mat, int64_t n, int64_t k0,
                            int64_t k1, float *out);

/* ---- threads ------------------------------------------------------------------------------ */

typedef void (*kt_task_fn)(void *ctx, int64_t task, int tid);
/* Runs fn(ctx, i, tid) for i in [0, n_tasks) on the pool; returns when all are done. */
void kt_parallel_for(int64_t n_tasks, kt_task_fn fn, void *ctx);

/* ---- workspace ---------------------------------------------------------------------------- */

/* A growable 64-byte-aligned scratch area owned by the engine; valid until the next call. */
void *kt_workspace(size_t bytes);

/* ---- kernels ------------------------------------------------------------------------------ */

/* One product against one packed matrix W (N x K), for M activation rows.
 *   nt: out_rows[m][n - lo] (+)= alpha[m] * sum_k a[m][k] * W[n][k]    for n in [lo, hi)
 *                                                         dot products, the forward direction
 *   tn: out_rows[m][c - lo] (+)= alpha[m] * sum_n a[m][n] * W[n][c]    for c in [lo, hi)
 *                                                         the transposed, backward direction
 * Float rows (a_scale == NULL) are fp32, already rounded to the compute mode's precision.
 * int8 rows (a_scale != NULL): a[m][k] = a_scale[m] * q[m][k], q zero-padded to a multiple of 64.
 * In tn with int8 rows the weights' per-row scales are already folded into q (int8 weights only),
 * so tn_q8 multiplies by the integer quants alone. */
typedef struct {
    const kt_matrix_layout *L;
    const uint8_t *w;
    int64_t M;
    const void *const *a_rows;  /* M rows: const float * or const int8_t * */
    const float *a_scale;       /* M scales for int8 rows, else NULL */
    float *const *out_rows;
    const float *alpha;         /* M multipliers, or NULL for 1 */
    int64_t lo, hi;
    int accumulate;             /* += (else =) */
    float *scratch;             /* per-thread, 64-byte aligned, kt_scratch_floats(table, N, K_pad) floats */
    /* The M rows again as one bf16 operand prepared by the job (tables with pack_bf16, bf16
     * compute mode only, else NULL): rows zero-padded to a multiple of 16 and columns to
     * round32(contraction length); layout KT_PACK_VNNI for nt, KT_PACK_ROWS for tn. */
    const uint16_t *a_bf16;
    /* Likewise for the int8 compute mode's int8 rows (tables with pack_q8, int8 weights only):
     * 64-column tiles of 16 rows x 64 bytes; KT_PACK_VNNI for nt_q8, KT_PACK_TILES for tn_q8. */
    const int8_t *a_q8;
    /* The M fp32 rows again as prepared by the job through the table's pack_f32 (f32 and bf16
     * compute modes, tables with pack_f32), in that table's own layout; else NULL. */
    const float *a_f32;
    /* Likewise for tables with pack_pairs (bf16 mode, pairs_enabled(), every format): the rows as
     * bf16 pairs of consecutive columns, one 32-bit word per pair, in layout KT_PAIRS_LANES for nt on
     * a bf16 pack, else in that table's own KT_PAIRS_TILES. */
    const uint32_t *a_pairs;
    /* tn only, set in the bf16 compute mode's backward on int8 / int4 weights: multiply by each
     * dequantized fp32 weight rounded to bf16 (nearest even, kt_round_bf16), W'[n][c] = r(W[n][c]),
     * on every path (docs/formats.md "Compute modes"). */
    int round_w;
} kt_gemm;

/* Layouts of a prepared bf16 operand of M rows (m) by C columns (the contraction), M16 = M
 * rounded up to 16, C32 = C rounded up to 32, padding zero. Both are blocks of 16 rows (block
 * b = m / 16 at b * 16 * C32, row i = m % 16) made of 1 KiB tiles, one per 32 columns (step
 * s = c / 32 at + s * 512), so a tile is one contiguous read:
 *   KT_PACK_TILES: the tile is row-major, element at i * 32 + c % 32 (AMX's A-operand layout).
 *   KT_PACK_VNNI:  the tile holds column pairs, element at (c % 32 / 2) * 32 + i * 2 + c % 2
 *                  (AMX's B-operand layout). */
#define KT_PACK_TILES 0
#define KT_PACK_VNNI 1
/* pack_pairs layouts (one 32-bit word per pair of columns, C32 / 2 words per row):
 *   KT_PAIRS_TILES: the table's own tiles.
 *   KT_PAIRS_LANES: blocks of 16 rows (block b = m / 16 at b * 16 * C32 / 2), word (q, i = m % 16) at
 *                   q * 16 + i: a vector holds pair q of 16 rows (the nt product of a bf16 pack). */
#define KT_PAIRS_TILES 0
#define KT_PAIRS_LANES 1
/* pack_q8 only: int8 rows as bf16 values (exact) in the KT_PACK_VNNI bf16 layout: the int8 mode's
 * forward operand for int4 weights, whose 32-blocks are one bf16 tile step each. */
#define KT_PACK_VNNI_BF16 2
/* int8 operands (pack_q8) are the same with 64-byte steps of 64 columns: C64 = C rounded up to
 * 64, block b at b * 16 * C64, step s = c / 64 at + s * 1024; TILES: i * 64 + c % 64; VNNI (quads
 * of columns): (c % 64 / 4) * 64 + i * 4 + c % 4 (AMX's tdpbssd B-operand layout). */

/* Scratch the scalar and avx2 kernels may use for one matrix: a 16-wide panel over
 * max(K_pad, N), a row, and a 128 x 16 tile of partial sums. */
static inline int64_t kt_gemm_scratch_floats(int64_t N, int64_t K_pad) {
    int64_t m = N > K_pad ? N : K_pad;
    return (16 * m + m + 16 + 128 * 16 + 15) & ~(int64_t)15;
}

typedef struct {
    const char *name;
    void (*nt)(const kt_gemm *g);
    void (*tn)(const kt_gemm *g);
    void (*nt_q8)(const kt_gemm *g);
    void (*tn_q8)(const kt_gemm *g);
    /* fp32 vector helpers for the LoRA branches (rank-r products, ~1-2% of a layer's FLOPs) */
    void (*dots)(const float *M, int64_t r, int64_t n, const float *v, float *t);  /* t[k] = <M[k], v>, M (r, n) */
    void (*axpy)(float alpha, const float *x, float *y, int64_t n);  /* y += alpha * x */
    /* Per-thread scratch floats this table's products need for an N x K_pad matrix. */
    int64_t (*scratch_floats)(int64_t N, int64_t K_pad);
    /* Optional (NULL: none): in the bf16 compute mode, the job prepares each expert group's
     * activation rows once per phase with this (dst as described at KT_PACK_*; rows hold
     * bf16-exact fp32 values of length C) and hands them to nt / tn as kt_gemm.a_bf16. */
    void (*pack_bf16)(const float *const *rows, int64_t M, int64_t C, int layout, uint16_t *dst);
    /* Optional, the int8 compute mode with int8 weights: the same for int8 rows (zero-padded to a
     * multiple of 64 already), handed over as kt_gemm.a_q8. With int4 weights, the forward's rows in
     * layout KT_PACK_VNNI_BF16 (dst: uint16 at the bf16 operand's place), handed over as a_bf16. */
    void (*pack_q8)(const int8_t *const *rows, int64_t M, int64_t C, int layout, int8_t *dst);
    /* Optional (tables without pack_bf16): the f32 / bf16 modes' float rows into the table's own
     * fp32 layout for nt / tn (kt_gemm.a_f32), at most M x round32(C) floats at dst, none past them. */
    void (*pack_f32)(const float *const *rows, int64_t M, int64_t C, float *dst);
    /* Optional: the bf16 mode's rows (bf16-exact fp32 values) as bf16 pairs for the vdpbf16ps products
     * on any format (kt_gemm.a_pairs), at most round16(M) x round32(C) / 2 words at dst, in layout
     * KT_PAIRS_LANES for nt on a bf16 pack, else KT_PAIRS_TILES; used when pairs_enabled() says so
     * (checked once per layer call). */
    void (*pack_pairs)(const float *const *rows, int64_t M, int64_t C, int layout, uint32_t *dst);
    int (*pairs_enabled)(void);
    /* Optional elementwise SwiGLU (NULL: the scalar loops in kt_moe.c), round_bf16 = the bf16 mode:
     *   swiglu:     h[i] = r(silu(g[i]) * u[i])
     *   swiglu_bwd: s = sigmoid(g), dg[i] = rg(w dhu[i] u s (1 + g (1 - s))), du[i] = rg(w dhu[i] g s);
     *               returns sum_i rh(g s u) dhu[i]
     * (r: rounding to bf16 when round_bf16; swiglu_bwd's `round` holds KT_ROUND_H for rh and
     * KT_ROUND_GRAD for rg: the bf16 mode sets both, the int8 mode with int4 weights only the latter) */
    void (*swiglu)(const float *g, const float *u, float *h, int64_t n, int round_bf16);
    float (*swiglu_bwd)(const float *g, const float *u, const float *dhu, float w, float *dg, float *du, int64_t n,
                        int round);
    /* Optional (NULL: the scalar loop in kt_moe.c) per-row int8 quantization of the int8 compute mode:
     * z = v (* scale, elementwise, when scale != NULL), s = max|z| / 127, q = lrint(z / s) as
     * lrintf(z * (1 / s)) does, zeros to n_pad; returns s, or NaN (and q = 0) for a non-finite row.
     * Must equal the scalar loop bit for bit. */
    float (*quantize_row)(const float *v, const float *scale, int64_t n, int64_t n_pad, int8_t *q);
    /* Task sizes of the layer's products (0: kt_moe.c's defaults): I rows per (expert, block) task
     * in F1 / B1 and H columns per task in F2 / B3. Multiples of 32; never thread-count dependent. */
    int64_t rows_per_task, cols_per_task;
} kt_kernels;

/* Rounded up to 16 floats here, once for every table: each thread's scratch starts at
 * tid * this, so every thread's (not only thread 0's) is 64-byte aligned for the kernels' aligned
 * vector stores (a table's own figure need not be a multiple of 16). */
static inline int64_t kt_scratch_floats(const kt_kernels *k, int64_t N, int64_t K_pad) {
    const int64_t n = k->scratch_floats ? k->scratch_floats(N, K_pad) : kt_gemm_scratch_floats(N, K_pad);
    return (n + 15) & ~(int64_t)15;
}

/* The scalar int8-activation products, shared by paths without their own. */
void kt_nt_q8_scalar(const kt_gemm *g);
void kt_tn_q8_scalar(const kt_gemm *g);
/* The avx2 table's int8-mode products (vpmaddwd), also used by AVX-512 CPUs without VNNI, and the
 * per-thread scratch floats they need. */
void kt_nt_q8_avx2(const kt_gemm *g);
void kt_tn_q8_avx2(const kt_gemm *g);
int64_t kt_q8_avx2_scratch_floats(int64_t N, int64_t K_pad);
float kt_quantize_row_avx2(const float *v, const float *scale, int64_t n, int64_t n_pad, int8_t *q);
void kt_dots_scalar(const float *M, int64_t r, int64_t n, const float *v, float *t);
void kt_axpy_scalar(float alpha, const float *x, float *y, int64_t n);

extern const kt_kernels kt_kernels_scalar;
#if defined(__x86_64__)
extern const kt_kernels kt_kernels_avx2;
extern const kt_kernels kt_kernels_avx_vnni; /* the avx2 table with AVX-VNNI int8 products */
/* Weak: present when their sources are in the build (the SIMDe twin needs libsimde-dev). */
extern const kt_kernels kt_kernels_avx512 __attribute__((weak));
extern const kt_kernels kt_kernels_avx512_simde __attribute__((weak));
extern const kt_kernels kt_kernels_amx __attribute__((weak));
/* zmm SwiGLU (kt_swiglu_avx512.c), for tables on CPUs with AVX-512F; see kt_kernels.swiglu. */
void kt_swiglu_avx512(const float *g, const float *u, float *h, int64_t n, int round_bf16);
float kt_swiglu_bwd_avx512(const float *g, const float *u, const float *dhu, float w, float *dg, float *du, int64_t n,
                           int round_bf16);
/* Loads the engine's AMX tile configuration (8 tiles of 16 rows x 64 bytes) on this thread. */
void kt_amx_tiles_on(void);
/* Asks the kernel for AMX tile state (Linux arch_prctl); 1 if this process may use AMX. */
int kt_amx_permitted(void);
#endif
const kt_kernels *kt_active_kernels(void);

#endif /* KT_INTERNAL_H */

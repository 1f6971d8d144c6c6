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

float kt_fp16_to_f32(uint16_t h);
uint16_t kt_f32_to_fp16(float f);

static inline float kt_silu(float g) { return g / (1.0f + expf(-g)); }

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
    float *scratch;             /* per-thread, 32-byte aligned, kt_gemm_scratch_floats(N, K_pad) floats */
} kt_gemm;

/* Scratch any kernel may use for one matrix: a 16-wide panel over max(K_pad, N), a row, and a
 * 128 x 16 tile of partial sums. */
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
} kt_kernels;

/* The scalar int8-activation products, shared by paths without their own. */
void kt_nt_q8_scalar(const kt_gemm *g);
void kt_tn_q8_scalar(const kt_gemm *g);
void kt_dots_scalar(const float *M, int64_t r, int64_t n, const float *v, float *t);
void kt_axpy_scalar(float alpha, const float *x, float *y, int64_t n);

extern const kt_kernels kt_kernels_scalar;
#if defined(__x86_64__)
extern const kt_kernels kt_kernels_avx2;
#endif
const kt_kernels *kt_active_kernels(void);

#endif /* KT_INTERNAL_H */

/* The portable scalar kernels: the reference every SIMD path is tested against. */
#include "kt_internal.h"

static void store(const kt_gemm *g, int64_t m, int64_t col, float acc) {
    if (g->alpha) acc *= g->alpha[m];
    float *o = g->out_rows[m] + col;
    *o = g->accumulate ? *o + acc : acc;
}

/* out[m][n - lo] (+)= alpha[m] * <a[m], W[n]> */
static void nt_scalar(const kt_gemm *g) {
    const int64_t K = g->L->K;
    float *wrow = g->scratch; /* K */
    for (int64_t n = g->lo; n < g->hi; n++) {
        kt_dequant_row_segment(g->L, g->w, n, 0, K, wrow);
        for (int64_t m = 0; m < g->M; m++) {
            const float *a = g->a_rows[m];
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc += a[k] * wrow[k];
            store(g, m, n - g->lo, acc);
        }
    }
}

/* out[m][c - lo] (+)= alpha[m] * sum_n a[m][n] * W[n][c]   (W[n][c] rounded to bf16 with round_w) */
static void tn_scalar(const kt_gemm *g) {
    const int64_t N = g->L->N, C = g->hi - g->lo;
    float *seg = g->scratch; /* C */
    if (!g->accumulate)
        for (int64_t m = 0; m < g->M; m++) memset(g->out_rows[m], 0, sizeof(float) * (size_t)C);
    for (int64_t n = 0; n < N; n++) {
        kt_dequant_row_segment(g->L, g->w, n, g->lo, g->hi, seg);
        if (g->round_w)
            for (int64_t c = 0; c < C; c++) seg[c] = kt_round_bf16(seg[c]);
        for (int64_t m = 0; m < g->M; m++) {
            const float *a = g->a_rows[m];
            const float coef = g->alpha ? g->alpha[m] * a[n] : a[n];
            float *o = g->out_rows[m];
            for (int64_t c = 0; c < C; c++) o[c] += coef * seg[c];
        }
    }
}

/* int8 activations: integer sums per row (int8 weights) or per 32-block (int4 weights, whose
 * fp16 scale varies along k), then the scales. Exact integer arithmetic: K <= 2^17 keeps the
 * int32 sums of products <= 127 * 127 from overflowing (checked in Python). */
void kt_nt_q8_scalar(const kt_gemm *g) {
    const kt_matrix_layout *L = g->L;
    const int64_t K_pad = L->K_pad;
    for (int64_t n = g->lo; n < g->hi; n++) {
        const uint8_t *row = g->w + (size_t)n * L->row_bytes;
        for (int64_t m = 0; m < g->M; m++) {
            const int8_t *q = g->a_rows[m];
            float acc;
            if (L->format == KT_FORMAT_INT8) {
                const int8_t *wq = (const int8_t *)row;
                int32_t s = 0;
                for (int64_t k = 0; k < K_pad; k++) s += (int32_t)q[k] * wq[k];
                acc = (float)s * ((const float *)(g->w + L->scales_offset))[n];
            } else {
                const uint16_t *d = (const uint16_t *)(g->w + L->scales_offset) + n * (K_pad / KT_INT4_BLOCK);
                acc = 0.0f;
                for (int64_t b = 0; b < K_pad / KT_INT4_BLOCK; b++) {
                    const uint8_t *qs = row + b * (KT_INT4_BLOCK / 2);
                    const int8_t *qa = q + b * KT_INT4_BLOCK;
                    int32_t s = 0;
                    for (int j = 0; j < 16; j++)
                        s += qa[j] * ((qs[j] & 0x0f) - 8) + qa[j + 16] * ((qs[j] >> 4) - 8);
                    acc += (float)s * kt_fp16_to_f32(d[b]);
                }
            }
            store(g, m, n - g->lo, acc * g->a_scale[m]);
        }
    }
}

/* int8 weights only: out[m][c] (+)= alpha[m] * a_scale[m] * sum_n q[m][n] * Wq[n][c] */
void kt_tn_q8_scalar(const kt_gemm *g) {
    const kt_matrix_layout *L = g->L;
    assert(L->format == KT_FORMAT_INT8);
    const int64_t N = L->N;
    for (int64_t m = 0; m < g->M; m++) {
        const int8_t *q = g->a_rows[m];
        for (int64_t c = g->lo; c < g->hi; c++) {
            int32_t s = 0;
            for (int64_t n = 0; n < N; n++) s += (int32_t)q[n] * ((const int8_t *)(g->w + (size_t)n * L->row_bytes))[c];
            store(g, m, c - g->lo, (float)s * g->a_scale[m]);
        }
    }
}

/* Eight partial sums, so the order is fixed (and the compiler may keep them in one vector). */
static float dot_scalar(const float *a, const float *b, int64_t n) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[i + l] * b[i + l];
    for (; i < n; i++) acc[i & 7] += a[i] * b[i];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

void kt_dots_scalar(const float *M, int64_t r, int64_t n, const float *v, float *t) {
    for (int64_t k = 0; k < r; k++) t[k] = dot_scalar(M + k * n, v, n);
}

void kt_axpy_scalar(float alpha, const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += alpha * x[i];
}

const kt_kernels kt_kernels_scalar = {"scalar", nt_scalar, tn_scalar, kt_nt_q8_scalar, kt_tn_q8_scalar,
                                      kt_dots_scalar, kt_axpy_scalar};

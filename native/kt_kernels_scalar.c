/* The portable scalar kernels: the reference every SIMD path is tested against. */
#include "kt_internal.h"

static void load_row(const kt_gemm *g, int64_t n, int64_t c0, int64_t c1, float *out) {
    kt_dequant_row_segment(g->L, g->w, n, c0, c1, out);
}

/* out[m][n - lo] (+)= alpha[m] * <a[m], W[n]> */
static void nt_scalar(const kt_gemm *g) {
    const int64_t K = g->L->K;
    float *wrow = g->scratch; /* K */
    for (int64_t n = g->lo; n < g->hi; n++) {
        load_row(g, n, 0, K, wrow);
        for (int64_t m = 0; m < g->M; m++) {
            const float *a = g->a_rows[m];
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc += a[k] * wrow[k];
            if (g->alpha) acc *= g->alpha[m];
            float *o = g->out_rows[m] + (n - g->lo);
            *o = g->accumulate ? *o + acc : acc;
        }
    }
}

/* out[m][c - lo] (+)= alpha[m] * sum_n a[m][n] * W[n][c] */
static void tn_scalar(const kt_gemm *g) {
    const int64_t N = g->L->N, C = g->hi - g->lo;
    float *seg = g->scratch; /* C */
    if (!g->accumulate)
        for (int64_t m = 0; m < g->M; m++) memset(g->out_rows[m], 0, sizeof(float) * (size_t)C);
    for (int64_t n = 0; n < N; n++) {
        load_row(g, n, g->lo, g->hi, seg);
        for (int64_t m = 0; m < g->M; m++) {
            const float coef = g->alpha ? g->alpha[m] * g->a_rows[m][n] : g->a_rows[m][n];
            float *o = g->out_rows[m];
            for (int64_t c = 0; c < C; c++) o[c] += coef * seg[c];
        }
    }
}

const kt_kernels kt_kernels_scalar = {"scalar", nt_scalar, tn_scalar};

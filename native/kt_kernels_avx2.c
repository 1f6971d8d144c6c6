/* AVX2 + FMA kernels (x86-64 only; compiled with a target pragma, chosen at run time).
 *
 * Both directions run one register-blocked micro-kernel: a 6 x 16 fp32 tile of outputs,
 *   acc[m][0..16) += a[m][k] * P[k][0..16)      (a[m][k] broadcast, P a packed panel row)
 * over the contraction index k. The panel P is the dequantized weights in k-major order:
 *   nt (forward, W[n][k] rows): P[k][j] = W[n0+j][k]  -- 16 rows transposed, 8x8 blocks in registers
 *   tn (backward, W^T):         P[n][j] = W[n][c0+j]  -- 16-column segments of consecutive rows
 * A panel is built once per 16 outputs and reused by every token of the expert, so the
 * dequantization cost is divided by the number of tokens. 12 accumulators + 2 panel vectors +
 * 1 broadcast fill the 16 ymm registers.
 */
#include "kt_internal.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#define MR 6
#define NR 16

/* 8 dequantized weights W[n][k..k+8), k a multiple of 8 inside K_pad. */
static inline __m256 load8(const kt_matrix_layout *L, const uint8_t *mat, int64_t n, int64_t k) {
    const uint8_t *row = mat + (size_t)n * L->row_bytes;
    switch (L->format) {
    case KT_FORMAT_BF16: {
        __m128i v = _mm_loadu_si128((const __m128i *)(row + 2 * k));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    }
    case KT_FORMAT_INT8: {
        __m128i v = _mm_loadl_epi64((const __m128i *)(row + k));
        const float d = ((const float *)(mat + L->scales_offset))[n];
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), _mm256_set1_ps(d));
    }
    default: { /* int4: byte j of a block = element j (low nibble) and j+16 (high nibble) */
        const int64_t b = k / KT_INT4_BLOCK, j = k % KT_INT4_BLOCK;
        const uint16_t dh = ((const uint16_t *)(mat + L->scales_offset))[n * (L->K_pad / KT_INT4_BLOCK) + b];
        __m128i v = _mm_loadl_epi64((const __m128i *)(row + b * (KT_INT4_BLOCK / 2) + (j & 15)));
        __m256i q = _mm256_cvtepu8_epi32(v);
        if (j >= 16) q = _mm256_srli_epi32(q, 4);
        q = _mm256_sub_epi32(_mm256_and_si256(q, _mm256_set1_epi32(0xf)), _mm256_set1_epi32(8));
        const float d = _cvtsh_ss(dh);
        return _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(d));
    }
    }
}

static inline void transpose8(__m256 r[8]) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xee);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xee);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xee);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xee);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/* P[k][j] = W[n0 + j][k] for k < Kr (Kr = K rounded up to 8), j < 16; rows past N are zero. */
static void panel_rows_transposed(const kt_matrix_layout *L, const uint8_t *mat, int64_t n0, int64_t Kr, float *P) {
    const int64_t rows = L->N - n0 < NR ? L->N - n0 : NR;
    for (int64_t k = 0; k < Kr; k += 8) {
        for (int half = 0; half < 2; half++) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) {
                const int64_t j = half * 8 + i;
                r[i] = j < rows ? load8(L, mat, n0 + j, k) : _mm256_setzero_ps();
            }
            transpose8(r);
            for (int i = 0; i < 8; i++) _mm256_store_ps(P + (k + i) * NR + half * 8, r[i]);
        }
    }
}

/* P[n][j] = W[n][c0 + j] for n < N, j < 16 (c0 a multiple of 16, inside K_pad). */
static void panel_columns(const kt_matrix_layout *L, const uint8_t *mat, int64_t c0, float *P) {
    for (int64_t n = 0; n < L->N; n++) {
        _mm256_store_ps(P + n * NR, load8(L, mat, n, c0));
        _mm256_store_ps(P + n * NR + 8, load8(L, mat, n, c0 + 8));
    }
}

/* c[MR][NR] (+)= sum_{k<Kc} a[m][k] * P[k][:]   (c zeroed first when !load).
 * Step k's two panel vectors come from the panel P, or, when P is NULL, straight from row k of the
 * packed matrix at columns [c0, c0+16) (dequantized in registers: the transposed product with few
 * tokens, where building a panel does not pay). Always inlined, so each caller gets its own loop. */
static inline __attribute__((always_inline)) void ukernel_any(int64_t Kc, const float *const a[MR], const float *P,
                                                              const kt_matrix_layout *L, const uint8_t *w,
                                                              int64_t c0, float c[MR][NR], int load) {
    __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
    if (load) {
        c00 = _mm256_loadu_ps(c[0]); c01 = _mm256_loadu_ps(c[0] + 8);
        c10 = _mm256_loadu_ps(c[1]); c11 = _mm256_loadu_ps(c[1] + 8);
        c20 = _mm256_loadu_ps(c[2]); c21 = _mm256_loadu_ps(c[2] + 8);
        c30 = _mm256_loadu_ps(c[3]); c31 = _mm256_loadu_ps(c[3] + 8);
        c40 = _mm256_loadu_ps(c[4]); c41 = _mm256_loadu_ps(c[4] + 8);
        c50 = _mm256_loadu_ps(c[5]); c51 = _mm256_loadu_ps(c[5] + 8);
    } else {
        c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
    }
    const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
    for (int64_t k = 0; k < Kc; k++) {
        const __m256 p0 = P ? _mm256_load_ps(P + k * NR) : load8(L, w, k, c0);
        const __m256 p1 = P ? _mm256_load_ps(P + k * NR + 8) : load8(L, w, k, c0 + 8);
        __m256 b;
        b = _mm256_broadcast_ss(a0 + k); c00 = _mm256_fmadd_ps(b, p0, c00); c01 = _mm256_fmadd_ps(b, p1, c01);
        b = _mm256_broadcast_ss(a1 + k); c10 = _mm256_fmadd_ps(b, p0, c10); c11 = _mm256_fmadd_ps(b, p1, c11);
        b = _mm256_broadcast_ss(a2 + k); c20 = _mm256_fmadd_ps(b, p0, c20); c21 = _mm256_fmadd_ps(b, p1, c21);
        b = _mm256_broadcast_ss(a3 + k); c30 = _mm256_fmadd_ps(b, p0, c30); c31 = _mm256_fmadd_ps(b, p1, c31);
        b = _mm256_broadcast_ss(a4 + k); c40 = _mm256_fmadd_ps(b, p0, c40); c41 = _mm256_fmadd_ps(b, p1, c41);
        b = _mm256_broadcast_ss(a5 + k); c50 = _mm256_fmadd_ps(b, p0, c50); c51 = _mm256_fmadd_ps(b, p1, c51);
    }
    _mm256_storeu_ps(c[0], c00); _mm256_storeu_ps(c[0] + 8, c01);
    _mm256_storeu_ps(c[1], c10); _mm256_storeu_ps(c[1] + 8, c11);
    _mm256_storeu_ps(c[2], c20); _mm256_storeu_ps(c[2] + 8, c21);
    _mm256_storeu_ps(c[3], c30); _mm256_storeu_ps(c[3] + 8, c31);
    _mm256_storeu_ps(c[4], c40); _mm256_storeu_ps(c[4] + 8, c41);
    _mm256_storeu_ps(c[5], c50); _mm256_storeu_ps(c[5] + 8, c51);
}

static void ukernel(int64_t Kc, const float *const a[MR], const float *P, float c[MR][NR], int load) {
    ukernel_any(Kc, a, P, NULL, NULL, 0, c, load);
}

static void ukernel_direct(int64_t N, const float *const a[MR], const kt_matrix_layout *L, const uint8_t *w,
                           int64_t c0, float c[MR][NR]) {
    ukernel_any(N, a, NULL, L, w, c0, c, 0);
}

/* Up to this many tokens (one tile) the transposed product dequantizes in registers instead of
 * building a panel: a panel read by a single tile does not repay its stores and reloads. */
#ifndef TN_DIRECT_MAX_M
#define TN_DIRECT_MAX_M 6
#endif

/* Cache blocking: a KC-deep slice of the panel (KC * 16 floats = 16 KB) stays in L1 while the
 * tiles of up to MC tokens walk over it; their partial sums wait in a small C buffer. */
#define KC 256
#define MC 96

/* out[m][col .. col+width) (+)= alpha[m] * c[i] for the tile rows i of tokens m = m0 + i. */
static void write_tile(const kt_gemm *g, int64_t m0, int64_t rows, float (*c)[NR], int64_t col, int64_t width) {
    for (int64_t i = 0; i < rows; i++) {
        const float *acc = c[i];
        float *o = g->out_rows[m0 + i] + col;
        const float s = g->alpha ? g->alpha[m0 + i] : 1.0f;
        if (width == NR) {
            __m256 v0 = _mm256_mul_ps(_mm256_loadu_ps(acc), _mm256_set1_ps(s));
            __m256 v1 = _mm256_mul_ps(_mm256_loadu_ps(acc + 8), _mm256_set1_ps(s));
            if (g->accumulate) {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(o));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(o + 8));
            }
            _mm256_storeu_ps(o, v0);
            _mm256_storeu_ps(o + 8, v1);
        } else {
            for (int64_t j = 0; j < width; j++) o[j] = g->accumulate ? o[j] + s * acc[j] : s * acc[j];
        }
    }
}

/* Runs the micro-kernel over all M rows for one panel (contraction length Kc) and writes columns
 * [col, col+width) of the outputs (col relative to the output rows). Tail rows read a zero row. */
static void panel_times_rows(const kt_gemm *g, const float *P, int64_t Kc, int64_t col, int64_t width,
                             const float *zeros, float (*cbuf)[NR]) {
    for (int64_t mc = 0; mc < g->M; mc += MC) {
        const int64_t mlen = g->M - mc < MC ? g->M - mc : MC;
        for (int64_t k0 = 0; k0 < Kc; k0 += KC) {
            const int64_t kl = Kc - k0 < KC ? Kc - k0 : KC;
            for (int64_t m0 = 0; m0 < mlen; m0 += MR) {
                const float *a[MR];
                for (int i = 0; i < MR; i++) a[i] = (m0 + i < mlen ? (const float *)g->a_rows[mc + m0 + i] : zeros) + k0;
                ukernel(kl, a, P + k0 * NR, cbuf + m0, k0 > 0);
            }
        }
        write_tile(g, mc, mlen, cbuf, col, width);
    }
}

/* Dot form for few tokens (no panel): a 3-token x 4-row tile of 8-lane partial sums, the weights
 * dequantized in registers as they stream from L1, one horizontal sum per output at the end. For
 * a handful of tokens per expert this beats building a transposed panel that few tokens reuse. */
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define DOT_MR 3
#define DOT_NR 4

static void nt_dot_avx2(const kt_gemm *g, const float *zeros) {
    const kt_matrix_layout *L = g->L;
    const int64_t K = L->K, K8 = K & ~(int64_t)7, tail = K - K8;
    const __m256i tail_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)tail), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int64_t n0 = g->lo; n0 < g->hi; n0 += DOT_NR) {
        int64_t rows[DOT_NR];
        for (int i = 0; i < DOT_NR; i++) rows[i] = n0 + i < g->hi ? n0 + i : g->hi - 1;
        for (int64_t m0 = 0; m0 < g->M; m0 += DOT_MR) {
            const float *a[DOT_MR];
            for (int i = 0; i < DOT_MR; i++) a[i] = m0 + i < g->M ? (const float *)g->a_rows[m0 + i] : zeros;
            __m256 c[DOT_MR][DOT_NR];
            for (int i = 0; i < DOT_MR; i++)
                for (int r = 0; r < DOT_NR; r++) c[i][r] = _mm256_setzero_ps();
            for (int64_t k = 0; k < K8; k += 8) {
                const __m256 w0 = load8(L, g->w, rows[0], k), w1 = load8(L, g->w, rows[1], k);
                const __m256 w2 = load8(L, g->w, rows[2], k), w3 = load8(L, g->w, rows[3], k);
                for (int i = 0; i < DOT_MR; i++) {
                    const __m256 x = _mm256_loadu_ps(a[i] + k);
                    c[i][0] = _mm256_fmadd_ps(x, w0, c[i][0]);
                    c[i][1] = _mm256_fmadd_ps(x, w1, c[i][1]);
                    c[i][2] = _mm256_fmadd_ps(x, w2, c[i][2]);
                    c[i][3] = _mm256_fmadd_ps(x, w3, c[i][3]);
                }
            }
            if (tail) { /* rows are zero-padded past K; activation rows are not: mask them */
                __m256 w[DOT_NR];
                for (int r = 0; r < DOT_NR; r++) w[r] = load8(L, g->w, rows[r], K8);
                for (int i = 0; i < DOT_MR; i++) {
                    const __m256 x = _mm256_maskload_ps(a[i] + K8, tail_mask);
                    for (int r = 0; r < DOT_NR; r++) c[i][r] = _mm256_fmadd_ps(x, w[r], c[i][r]);
                }
            }
            for (int i = 0; i < DOT_MR && m0 + i < g->M; i++) {
                const float s = g->alpha ? g->alpha[m0 + i] : 1.0f;
                float *o = g->out_rows[m0 + i] + (n0 - g->lo);
                for (int r = 0; r < DOT_NR && n0 + r < g->hi; r++) {
                    const float v = s * hsum8(c[i][r]);
                    o[r] = g->accumulate ? o[r] + v : v;
                }
            }
        }
    }
}

/* Up to this many tokens per expert the forward uses the dot form for bf16 and int8 weights
 * (measured on one Zen 3 core, K=2048: dot ~36 GFLOP/s flat vs panel 22 at M=6, 33 at M=12, 47 at
 * M=48); int4's in-register dequantization is too dear for the dot form. */
#ifndef NT_DOT_MAX_M
#define NT_DOT_MAX_M 16
#endif

/* Scratch: [panel: NR * max(K_pad, N)][zeros: max(K, N)][C buffer: (MC + MR) * NR] floats. */
static void nt_avx2(const kt_gemm *g) {
    const int64_t K = g->L->K, Kr = (K + 7) & ~(int64_t)7;
    float *P = g->scratch, *zeros = P + NR * Kr;
    float (*cbuf)[NR] = (float (*)[NR])(zeros + ((K + 15) & ~(int64_t)15));
    memset(zeros, 0, sizeof(float) * (size_t)K);
    if (g->M <= NT_DOT_MAX_M && g->L->format != KT_FORMAT_INT4) {
        nt_dot_avx2(g, zeros);
        return;
    }
    for (int64_t n0 = g->lo; n0 < g->hi; n0 += NR) {
        panel_rows_transposed(g->L, g->w, n0, Kr, P);
        const int64_t width = g->hi - n0 < NR ? g->hi - n0 : NR;
        panel_times_rows(g, P, K, n0 - g->lo, width, zeros, cbuf);
    }
}

static void tn_avx2(const kt_gemm *g) {
    const int64_t N = g->L->N;
    float *P = g->scratch, *zeros = P + NR * N;
    float (*cbuf)[NR] = (float (*)[NR])(zeros + ((N + 15) & ~(int64_t)15));
    memset(zeros, 0, sizeof(float) * (size_t)N);
    for (int64_t c0 = g->lo; c0 < g->hi; c0 += NR) {
        const int64_t width = g->hi - c0 < NR ? g->hi - c0 : NR;
        if (g->M <= TN_DIRECT_MAX_M) {
            for (int64_t m0 = 0; m0 < g->M; m0 += MR) {
                const int64_t mr = g->M - m0 < MR ? g->M - m0 : MR;
                const float *a[MR];
                for (int i = 0; i < MR; i++) a[i] = i < mr ? (const float *)g->a_rows[m0 + i] : zeros;
                ukernel_direct(N, a, g->L, g->w, c0, cbuf);
                write_tile(g, m0, mr, cbuf, c0 - g->lo, width);
            }
            continue;
        }
        panel_columns(g->L, g->w, c0, P);
        panel_times_rows(g, P, N, c0 - g->lo, width, zeros, cbuf);
    }
}

static inline float hsum(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* Four rows against v at a time: each load of v feeds four FMAs. */
static void dots_avx2(const float *M, int64_t r, int64_t n, const float *v, float *t) {
    int64_t k = 0;
    for (; k + 4 <= r; k += 4) {
        const float *m0 = M + k * n, *m1 = m0 + n, *m2 = m1 + n, *m3 = m2 + n;
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            const __m256 x = _mm256_loadu_ps(v + i);
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(m0 + i), x, s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(m1 + i), x, s1);
            s2 = _mm256_fmadd_ps(_mm256_loadu_ps(m2 + i), x, s2);
            s3 = _mm256_fmadd_ps(_mm256_loadu_ps(m3 + i), x, s3);
        }
        float a0 = hsum(s0), a1 = hsum(s1), a2 = hsum(s2), a3 = hsum(s3);
        for (; i < n; i++) {
            a0 += m0[i] * v[i];
            a1 += m1[i] * v[i];
            a2 += m2[i] * v[i];
            a3 += m3[i] * v[i];
        }
        t[k] = a0, t[k + 1] = a1, t[k + 2] = a2, t[k + 3] = a3;
    }
    for (; k < r; k++) {
        const float *m0 = M + k * n;
        __m256 s0 = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(m0 + i), _mm256_loadu_ps(v + i), s0);
        float a0 = hsum(s0);
        for (; i < n; i++) a0 += m0[i] * v[i];
        t[k] = a0;
    }
}

static void axpy_avx2(float alpha, const float *x, float *y, int64_t n) {
    const __m256 va = _mm256_set1_ps(alpha);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += alpha * x[i];
}

const kt_kernels kt_kernels_avx2 = {"avx2", nt_avx2, tn_avx2, kt_nt_q8_scalar, kt_tn_q8_scalar, dots_avx2, axpy_avx2};

#pragma GCC pop_options
#endif

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

#define KT_INLINE static inline __attribute__((always_inline))

/* 8 dequantized weights W[n][k..k+8), k a multiple of 8 inside K_pad, of format fmt (L->format).
 * The loops below take fmt as a compile-time constant (one copy of each loop per format, chosen
 * once per call by FMT_DISPATCH): with the format read per load, the switch's tests and jumps
 * cost the panel builds a third of their instructions (B3 at 12 tokens per expert: 20%). */
KT_INLINE __m256 load8_f(int fmt, const kt_matrix_layout *L, const uint8_t *mat, int64_t n, int64_t k) {
    const uint8_t *row = mat + (size_t)n * L->row_bytes;
    switch (fmt) {
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

/* Runs CALL(F) with F the constant equal to fmt (load8_f's cases: anything else is int4). */
#define FMT_DISPATCH(fmt, CALL)                                                                              \
    do {                                                                                                     \
        if ((fmt) == KT_FORMAT_BF16) CALL(KT_FORMAT_BF16);                                                   \
        else if ((fmt) == KT_FORMAT_INT8) CALL(KT_FORMAT_INT8);                                              \
        else CALL(KT_FORMAT_INT4);                                                                           \
    } while (0)

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
KT_INLINE void panel_rows_transposed_f(int fmt, const kt_matrix_layout *L, const uint8_t *mat, int64_t n0, int64_t Kr,
                                      float *P) {
    const int64_t rows = L->N - n0 < NR ? L->N - n0 : NR;
    for (int64_t k = 0; k < Kr; k += 8) {
        for (int half = 0; half < 2; half++) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) {
                const int64_t j = half * 8 + i;
                r[i] = j < rows ? load8_f(fmt, L, mat, n0 + j, k) : _mm256_setzero_ps();
            }
            transpose8(r);
            for (int i = 0; i < 8; i++) _mm256_store_ps(P + (k + i) * NR + half * 8, r[i]);
        }
    }
}

static void panel_rows_transposed(const kt_matrix_layout *L, const uint8_t *mat, int64_t n0, int64_t Kr, float *P) {
#define CALL(F) panel_rows_transposed_f(F, L, mat, n0, Kr, P)
    FMT_DISPATCH(L->format, CALL);
#undef CALL
}

/* 8 fp32 values rounded to bf16, nearest even, as kt_round_bf16 (finite values: the weights). */
static inline __m256 round_bf16_8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u)));
}

/* tn's weights: load8_f, rounded to bf16 with kt_gemm.round_w (rw; a constant where inlined, and
 * never set for bf16 weights, which it would leave as they are). */
KT_INLINE __m256 load8_tn(int fmt, const kt_matrix_layout *L, const uint8_t *mat, int64_t n, int64_t k, int rw) {
    const __m256 v = load8_f(fmt, L, mat, n, k);
    return fmt != KT_FORMAT_BF16 && rw ? round_bf16_8(v) : v;
}

/* P[n][j] = W[n][c0 + j] for n < N, j < 16 (c0 a multiple of 16, inside K_pad). */
KT_INLINE void panel_columns_f(int fmt, int rw, const kt_matrix_layout *L, const uint8_t *mat, int64_t c0, float *P) {
    for (int64_t n = 0; n < L->N; n++) {
        _mm256_store_ps(P + n * NR, load8_tn(fmt, L, mat, n, c0, rw));
        _mm256_store_ps(P + n * NR + 8, load8_tn(fmt, L, mat, n, c0 + 8, rw));
    }
}

static void panel_columns(const kt_matrix_layout *L, const uint8_t *mat, int64_t c0, int rw, float *P) {
#define CALL(F) (rw ? panel_columns_f(F, 1, L, mat, c0, P) : panel_columns_f(F, 0, L, mat, c0, P))
    FMT_DISPATCH(L->format, CALL);
#undef CALL
}

/* c[MR][NR] (+)= sum_{k<Kc} a[m][k] * P[k][:]   (c zeroed first when !load).
 * Step k's two panel vectors come from the panel P, or, when P is NULL, straight from row k of the
 * packed matrix at columns [c0, c0+16) (dequantized in registers, rounded to bf16 with rw: the
 * transposed product with few tokens, where building a panel does not pay). Always inlined, so each caller gets its own loop. */
KT_INLINE void ukernel_any(int64_t Kc, const float *const a[MR], const float *P, int fmt, const kt_matrix_layout *L,
                           const uint8_t *w, int64_t c0, int rw, float c[MR][NR], int load) {
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
        const __m256 p0 = P ? _mm256_load_ps(P + k * NR) : load8_tn(fmt, L, w, k, c0, rw);
        const __m256 p1 = P ? _mm256_load_ps(P + k * NR + 8) : load8_tn(fmt, L, w, k, c0 + 8, rw);
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
    ukernel_any(Kc, a, P, KT_FORMAT_BF16, NULL, NULL, 0, 0, c, load);
}

static void ukernel_direct(int64_t N, const float *const a[MR], const kt_matrix_layout *L, const uint8_t *w,
                           int64_t c0, int rw, float c[MR][NR]) {
#define CALL(F) (rw ? ukernel_any(N, a, NULL, F, L, w, c0, 1, c, 0) : ukernel_any(N, a, NULL, F, L, w, c0, 0, c, 0))
    FMT_DISPATCH(L->format, CALL);
#undef CALL
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

KT_INLINE void nt_dot_f(int fmt, const kt_gemm *g, const float *zeros) {
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
                const __m256 w0 = load8_f(fmt, L, g->w, rows[0], k), w1 = load8_f(fmt, L, g->w, rows[1], k);
                const __m256 w2 = load8_f(fmt, L, g->w, rows[2], k), w3 = load8_f(fmt, L, g->w, rows[3], k);
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
                for (int r = 0; r < DOT_NR; r++) w[r] = load8_f(fmt, L, g->w, rows[r], K8);
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

static void nt_dot_avx2(const kt_gemm *g, const float *zeros) {
#define CALL(F) nt_dot_f(F, g, zeros)
    FMT_DISPATCH(g->L->format, CALL);
#undef CALL
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
                ukernel_direct(N, a, g->L, g->w, c0, g->round_w, cbuf);
                write_tile(g, m0, mr, cbuf, c0 - g->lo, width);
            }
            continue;
        }
        panel_columns(g->L, g->w, c0, g->round_w, P);
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
        /* two accumulators per row (even / odd 8-lane chunks): 8 independent FMA chains cover the
         * FMA latency on two ports (one per row: llvm-mca 33-50% of the FMA bound, latency-bound) */
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
        __m256 u0 = _mm256_setzero_ps(), u1 = _mm256_setzero_ps(), u2 = _mm256_setzero_ps(), u3 = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) {
            const __m256 x = _mm256_loadu_ps(v + i), y = _mm256_loadu_ps(v + i + 8);
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(m0 + i), x, s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(m1 + i), x, s1);
            s2 = _mm256_fmadd_ps(_mm256_loadu_ps(m2 + i), x, s2);
            s3 = _mm256_fmadd_ps(_mm256_loadu_ps(m3 + i), x, s3);
            u0 = _mm256_fmadd_ps(_mm256_loadu_ps(m0 + i + 8), y, u0);
            u1 = _mm256_fmadd_ps(_mm256_loadu_ps(m1 + i + 8), y, u1);
            u2 = _mm256_fmadd_ps(_mm256_loadu_ps(m2 + i + 8), y, u2);
            u3 = _mm256_fmadd_ps(_mm256_loadu_ps(m3 + i + 8), y, u3);
        }
        for (; i + 8 <= n; i += 8) {
            const __m256 x = _mm256_loadu_ps(v + i);
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(m0 + i), x, s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(m1 + i), x, s1);
            s2 = _mm256_fmadd_ps(_mm256_loadu_ps(m2 + i), x, s2);
            s3 = _mm256_fmadd_ps(_mm256_loadu_ps(m3 + i), x, s3);
        }
        float a0 = hsum(_mm256_add_ps(s0, u0)), a1 = hsum(_mm256_add_ps(s1, u1)), a2 = hsum(_mm256_add_ps(s2, u2)),
              a3 = hsum(_mm256_add_ps(s3, u3));
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

/* ---- int8 activations: vpmaddwd on int16 pairs ------------------------------------------------ */

/* The int8 compute mode's products (kt_gemm.a_scale != NULL). vpmaddwd multiplies int16 lanes and
 * adds adjacent pairs into int32: 16 multiply-adds per ymm instruction, twice an fp32 FMA's 8. The
 * weights' panel holds int16 pairs -- two consecutive elements of the contraction per 32-bit lane --
 * for 16 outputs, built once per panel and reused by every token:
 *   nt (forward):  P[p][j] = W[n0+j][2p .. 2p+2)       (int8 quants; int4 as q - 8 in [-8, 7])
 *   tn (backward): P[p][j] = W[2p .. 2p+2)[c0+j]       (int8 quants, 2 rows interleaved)
 * and a token's pair (its int8 row widened to int16 once per block of Q_MC tokens) is broadcast to
 * the 8 lanes (a plain vpbroadcastd load). Both operands are signed, so no bias is needed (unlike
 * vpmaddubsw's u8 x s8, whose int16 pair sums saturate at 255 * 127 * 2 without a per-product sign
 * fix; scripts/kernel_mca.sh models both and docs/engine.md has the numbers). Exactness: a pair sum
 * is at most 2 * 127 * 127 = 32,258 and the int32 accumulation |sum a w| <= 127 * 127 * K < 2^31 for
 * K <= 131072 (checked in Python), so the integer sums are those of kt_nt_q8_scalar /
 * kt_tn_q8_scalar, and the fp32 epilogue repeats their operations in their order (int8:
 * ((s * d[n]) * a_scale) * alpha, then + out; int4: acc += s_b * d_b per 32-block, no FMA): the
 * results are bitwise the scalar path's.
 *
 * Register tiles: int8 6 tokens x 16 outputs (12 int32 accumulators, 2 panel vectors, a broadcast,
 * a product); int4 3 x 16 (6 block sums + 6 fp32 accumulators). The panel is K_pad * 32 bytes (64 KiB
 * at K = 2048), read from L2 once per tile. Also the avx512 table's int8-mode products on AVX-512
 * CPUs without VNNI. */
#define Q_MR8 6   /* int8 tile height */
#define Q_MR4 3   /* int4 tile height */
#define Q_NR 16   /* outputs per panel (two ymm of int32 lanes) */
#define Q_MC 48   /* tokens widened to int16 at a time (a multiple of both tile heights) */
#define Q_MAX_K 131072

/* Panel words, int4 scales and widened tokens for a contraction of length C (N x K_pad matrix). */
int64_t kt_q8_avx2_scratch_floats(int64_t N, int64_t K_pad) {
    const int64_t c = (N > K_pad ? N : K_pad) + 64;
    return Q_NR * c / 2 + Q_NR * c / KT_INT4_BLOCK + Q_MC * c / 2 + 64;
}

static int64_t scratch_floats_avx2(int64_t N, int64_t K_pad) {
    const int64_t a = kt_gemm_scratch_floats(N, K_pad), b = kt_q8_avx2_scratch_floats(N, K_pad);
    return a > b ? a : b;
}

/* Rows [m0, m0 + rows) of the int8 activations (length C, zero-padded to C2 = C rounded up to 32)
 * as int16 rows of C2 elements at A. */
static void widen_rows(const kt_gemm *g, int64_t m0, int64_t rows, int64_t C, int64_t C2, int16_t *A) {
    for (int64_t i = 0; i < rows; i++) {
        const int8_t *q = g->a_rows[m0 + i];
        int16_t *dst = A + i * C2;
        int64_t k = 0;
        for (; k + 16 <= C; k += 16)
            _mm256_store_si256((__m256i *)(dst + k), _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + k))));
        for (; k < C; k++) dst[k] = q[k];
        for (; k < C2; k++) dst[k] = 0;
    }
}

/* vbroadcastss, not vpbroadcastd: the same bits, and a pure load on every model (llvm-19's znver3
 * sends vpbroadcastd to a vector pipe as well, which the tile's 24 integer uops need). */
static inline __m256i bcast_pair(const int16_t *a, int64_t p) {
    return _mm256_castps_si256(_mm256_broadcast_ss((const float *)(a + 2 * p)));
}

/* acc[i][0..2) = sum_{s in [s0, s1)} STEP(a[i], s, P[s]) (int32 lanes), R <= 6 rows: the loop of every
 * integer tile (q_steps: vpmaddwd + vpaddd on int16 pairs; v_steps, below: AVX-VNNI vpdpbusd on
 * quads). Always inlined with a constant R, so each tile height gets its own loop. The accumulators
 * are named variables (as in ukernel_any): an array of them made GCC keep half on the stack. 12
 * accumulators, 2 panel vectors, a broadcast and a product fill the 16 ymm registers. */
#define KT_INT_STEPS(name, attrs, A_T, STEP)                                                                  \
    static inline __attribute__((always_inline)) attrs void name(int R, int64_t s0, int64_t s1,              \
                                                                 const A_T *const *a, const int32_t *P,       \
                                                                 __m256i acc[][2]) {                          \
        __m256i c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;                                  \
        c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_si256();      \
        _Pragma("GCC unroll 2") for (int64_t s = s0; s < s1; s++) {                                          \
            const __m256i w0 = _mm256_load_si256((const __m256i *)(P + s * Q_NR));                           \
            const __m256i w1 = _mm256_load_si256((const __m256i *)(P + s * Q_NR + 8));                       \
            STEP(0, c00, c01) STEP(1, c10, c11) STEP(2, c20, c21) STEP(3, c30, c31) STEP(4, c40, c41)        \
            STEP(5, c50, c51)                                                                                \
        }                                                                                                    \
        acc[0][0] = c00, acc[0][1] = c01;                                                                    \
        if (R > 1) acc[1][0] = c10, acc[1][1] = c11;                                                         \
        if (R > 2) acc[2][0] = c20, acc[2][1] = c21;                                                         \
        if (R > 3) acc[3][0] = c30, acc[3][1] = c31;                                                         \
        if (R > 4) acc[4][0] = c40, acc[4][1] = c41;                                                         \
        if (R > 5) acc[5][0] = c50, acc[5][1] = c51;                                                         \
    }
#define Q_ROW(i, c0, c1)                                                                         \
    if (R > i) {                                                                                 \
        const __m256i b = bcast_pair(a[i], s);                                                   \
        c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(b, w0));                                     \
        c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(b, w1));                                     \
    }
KT_INT_STEPS(q_steps, , int16_t, Q_ROW)
#undef Q_ROW

/* The fp32 epilogue of one output row: v = ((v * a_scale) * alpha) (+ out), columns [0, width). */
static inline void q_store_row(const kt_gemm *g, int64_t m, int64_t col, int64_t width, __m256 v0, __m256 v1) {
    float *o = g->out_rows[m] + col;
    v0 = _mm256_mul_ps(v0, _mm256_set1_ps(g->a_scale[m]));
    v1 = _mm256_mul_ps(v1, _mm256_set1_ps(g->a_scale[m]));
    if (g->alpha) {
        v0 = _mm256_mul_ps(v0, _mm256_set1_ps(g->alpha[m]));
        v1 = _mm256_mul_ps(v1, _mm256_set1_ps(g->alpha[m]));
    }
    if (width == Q_NR) {
        if (g->accumulate) {
            v0 = _mm256_add_ps(_mm256_loadu_ps(o), v0);
            v1 = _mm256_add_ps(_mm256_loadu_ps(o + 8), v1);
        }
        _mm256_storeu_ps(o, v0);
        _mm256_storeu_ps(o + 8, v1);
    } else {
        float tmp[Q_NR];
        _mm256_storeu_ps(tmp, v0);
        _mm256_storeu_ps(tmp + 8, v1);
        for (int64_t j = 0; j < width; j++) o[j] = g->accumulate ? o[j] + tmp[j] : tmp[j];
    }
}

/* 16 weights W[n][k .. k+16) as int16, k a multiple of 16 inside K_pad (int8, or int4 as q - 8). */
static inline __m256i load16_i16(int fmt, const kt_matrix_layout *L, const uint8_t *mat, int64_t n, int64_t k) {
    const uint8_t *row = mat + (size_t)n * L->row_bytes;
    if (fmt == KT_FORMAT_INT8) return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + k)));
    /* int4: byte j of a 32-block = element j (low nibble) and j + 16 (high nibble) */
    __m128i v = _mm_loadu_si128((const __m128i *)(row + (k / KT_INT4_BLOCK) * (KT_INT4_BLOCK / 2)));
    if (k % KT_INT4_BLOCK) v = _mm_srli_epi16(v, 4);
    v = _mm_sub_epi8(_mm_and_si128(v, _mm_set1_epi8(0x0f)), _mm_set1_epi8(8));
    return _mm256_cvtepi8_epi16(v);
}

/* nt panel of rows [n0, n0 + rows): P[p][j] for p < K_pad / 2 (rows past `rows` are zero). */
static void q_panel_rows(int fmt, const kt_matrix_layout *L, const uint8_t *mat, int64_t n0, int64_t rows,
                         int32_t *P) {
    for (int64_t k = 0; k < L->K_pad; k += 16) {
        for (int half = 0; half < 2; half++) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) {
                const int64_t j = half * 8 + i;
                r[i] = j < rows ? _mm256_castsi256_ps(load16_i16(fmt, L, mat, n0 + j, k)) : _mm256_setzero_ps();
            }
            transpose8(r); /* 32-bit words: r[i] = pair k/2 + i of the 8 rows */
            for (int i = 0; i < 8; i++) _mm256_store_ps((float *)P + (k / 2 + i) * Q_NR + half * 8, r[i]);
        }
    }
}

/* out[m][n - lo] (+)= alpha[m] * a_scale[m] * d[n] * sum_k q[m][k] Wq[n][k], int8 weights. */
static inline __attribute__((always_inline)) void q_nt_int8_tile(int R, const kt_gemm *g, int64_t m0,
                                                                 const int16_t *A, int64_t C2, const int32_t *P,
                                                                 __m256 d0, __m256 d1, int64_t col, int64_t width) {
    const int16_t *a[Q_MR8];
    __m256i acc[Q_MR8][2];
    for (int i = 0; i < R; i++) a[i] = A + i * C2;
    q_steps(R, 0, g->L->K_pad / 2, a, P, acc);
    for (int i = 0; i < R; i++)
        q_store_row(g, m0 + i, col, width, _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][0]), d0),
                    _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][1]), d1));
}

/* int4 weights: per 32-block b, s_b = sum q[m][k] (Wq[n][k] - 8) in int32, acc += s_b * d[n][b]. */
static inline __attribute__((always_inline)) void q_nt_int4_tile(int R, const kt_gemm *g, int64_t m0,
                                                                 const int16_t *A, int64_t C2, const int32_t *P,
                                                                 const float *D, int64_t col, int64_t width) {
    const int16_t *a[Q_MR4];
    __m256 f[Q_MR4][2];
    for (int i = 0; i < R; i++) {
        a[i] = A + i * C2;
        f[i][0] = f[i][1] = _mm256_setzero_ps();
    }
    const int64_t nb = g->L->K_pad / KT_INT4_BLOCK, bp = KT_INT4_BLOCK / 2;
    for (int64_t b = 0; b < nb; b++) {
        __m256i acc[Q_MR4][2];
        q_steps(R, b * bp, (b + 1) * bp, a, P, acc);
        const __m256 e0 = _mm256_load_ps(D + b * Q_NR), e1 = _mm256_load_ps(D + b * Q_NR + 8);
        for (int i = 0; i < R; i++) {
            f[i][0] = _mm256_add_ps(f[i][0], _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][0]), e0));
            f[i][1] = _mm256_add_ps(f[i][1], _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][1]), e1));
        }
    }
    for (int i = 0; i < R; i++) q_store_row(g, m0 + i, col, width, f[i][0], f[i][1]);
}

/* out[m][c - lo] (+)= alpha[m] * a_scale[m] * sum_n q[m][n] Wq[n][c] (int8 weights, their row scales
 * folded into q by the caller). */
static inline __attribute__((always_inline)) void q_tn_tile(int R, const kt_gemm *g, int64_t m0, const int16_t *A,
                                                            int64_t C2, const int32_t *P, int64_t col,
                                                            int64_t width) {
    const int16_t *a[Q_MR8];
    __m256i acc[Q_MR8][2];
    for (int i = 0; i < R; i++) a[i] = A + i * C2;
    q_steps(R, 0, C2 / 2, a, P, acc);
    for (int i = 0; i < R; i++)
        q_store_row(g, m0 + i, col, width, _mm256_cvtepi32_ps(acc[i][0]), _mm256_cvtepi32_ps(acc[i][1]));
}

#define KT_Q_TILES(R)                                                                                             \
    static void q_nt_int8_tile_##R(const kt_gemm *g, int64_t m0, const int16_t *A, int64_t C2, const int32_t *P, \
                                   __m256 d0, __m256 d1, int64_t col, int64_t w) {                               \
        q_nt_int8_tile(R, g, m0, A, C2, P, d0, d1, col, w);                                                       \
    }                                                                                                             \
    static void q_tn_tile_##R(const kt_gemm *g, int64_t m0, const int16_t *A, int64_t C2, const int32_t *P,      \
                              int64_t col, int64_t w) {                                                           \
        q_tn_tile(R, g, m0, A, C2, P, col, w);                                                                    \
    }
#define KT_Q4_TILES(R)                                                                                            \
    static void q_nt_int4_tile_##R(const kt_gemm *g, int64_t m0, const int16_t *A, int64_t C2, const int32_t *P, \
                                   const float *D, int64_t col, int64_t w) {                                     \
        q_nt_int4_tile(R, g, m0, A, C2, P, D, col, w);                                                            \
    }
KT_Q_TILES(1) KT_Q_TILES(2) KT_Q_TILES(3) KT_Q_TILES(4) KT_Q_TILES(5) KT_Q_TILES(6)
KT_Q4_TILES(1) KT_Q4_TILES(2) KT_Q4_TILES(3)
#undef KT_Q_TILES
#undef KT_Q4_TILES
_Static_assert(Q_MR8 == 6 && Q_MR4 == 3, "the tables below list one tile per height");
typedef void (*q_nt_int8_tile_fn)(const kt_gemm *, int64_t, const int16_t *, int64_t, const int32_t *, __m256,
                                  __m256, int64_t, int64_t);
typedef void (*q_nt_int4_tile_fn)(const kt_gemm *, int64_t, const int16_t *, int64_t, const int32_t *,
                                  const float *, int64_t, int64_t);
typedef void (*q_tn_tile_fn)(const kt_gemm *, int64_t, const int16_t *, int64_t, const int32_t *, int64_t,
                             int64_t);
static const q_nt_int8_tile_fn q_nt_int8_tiles[Q_MR8 + 1] = {NULL, q_nt_int8_tile_1, q_nt_int8_tile_2,
                                                             q_nt_int8_tile_3, q_nt_int8_tile_4,
                                                             q_nt_int8_tile_5, q_nt_int8_tile_6};
static const q_nt_int4_tile_fn q_nt_int4_tiles[Q_MR4 + 1] = {NULL, q_nt_int4_tile_1, q_nt_int4_tile_2,
                                                             q_nt_int4_tile_3};
static const q_tn_tile_fn q_tn_tiles[Q_MR8 + 1] = {NULL, q_tn_tile_1, q_tn_tile_2, q_tn_tile_3,
                                                   q_tn_tile_4, q_tn_tile_5, q_tn_tile_6};

/* Tile t of M rows split into ceil(M / mr) tiles of near-equal height. */
static inline void q_tile_of(int64_t M, int64_t mr, int64_t t, int64_t *m0, int64_t *rows) {
    const int64_t n = (M + mr - 1) / mr, base = M / n, extra = M % n;
    *m0 = t * base + (t < extra ? t : extra);
    *rows = base + (t < extra);
}

/* Scratch (kt_q8_avx2_scratch_floats): [panel][int4 scales][widened tokens], 32-byte aligned. */
void kt_nt_q8_avx2(const kt_gemm *g) {
    const kt_matrix_layout *L = g->L;
    const int64_t K_pad = L->K_pad, C2 = (K_pad + 31) & ~(int64_t)31, nb = K_pad / KT_INT4_BLOCK;
    const int int8 = L->format == KT_FORMAT_INT8;
    assert(K_pad <= Q_MAX_K && K_pad % KT_INT4_BLOCK == 0);
    int32_t *P = (int32_t *)g->scratch;
    float *D = (float *)(P + C2 / 2 * Q_NR);
    int16_t *A = (int16_t *)(D + (nb + 1) * Q_NR);
    const int64_t mr = int8 ? Q_MR8 : Q_MR4;
    for (int64_t mc = 0; mc < g->M; mc += Q_MC) {
        const int64_t mlen = g->M - mc < Q_MC ? g->M - mc : Q_MC, tiles = (mlen + mr - 1) / mr;
        widen_rows(g, mc, mlen, K_pad, C2, A);
        for (int64_t n0 = g->lo; n0 < g->hi; n0 += Q_NR) {
            const int64_t width = g->hi - n0 < Q_NR ? g->hi - n0 : Q_NR;
            float d[Q_NR] = {0};
            if (int8) {
                for (int64_t j = 0; j < width; j++) d[j] = ((const float *)(g->w + L->scales_offset))[n0 + j];
            } else {
                const uint16_t *s = (const uint16_t *)(g->w + L->scales_offset);
                for (int64_t b = 0; b < nb; b++)
                    for (int64_t j = 0; j < Q_NR; j++)
                        D[b * Q_NR + j] = j < width ? _cvtsh_ss(s[(n0 + j) * nb + b]) : 0.0f;
            }
            q_panel_rows(L->format, L, g->w, n0, width, P);
            const __m256 d0 = _mm256_loadu_ps(d), d1 = _mm256_loadu_ps(d + 8);
            for (int64_t t = 0; t < tiles; t++) {
                int64_t m0, rows;
                q_tile_of(mlen, mr, t, &m0, &rows);
                if (int8) q_nt_int8_tiles[rows](g, mc + m0, A + m0 * C2, C2, P, d0, d1, n0 - g->lo, width);
                else q_nt_int4_tiles[rows](g, mc + m0, A + m0 * C2, C2, P, D, n0 - g->lo, width);
            }
        }
    }
}

/* tn panel of columns [c0, c0 + 16) (c0 a multiple of 16, inside K_pad): P[p][j] = the int16 pair
 * (W[2p][c0 + j], W[2p + 1][c0 + j]) for p < C2 / 2 (rows past N zero). */
static void q_panel_columns(const kt_matrix_layout *L, const uint8_t *mat, int64_t c0, int64_t C2, int32_t *P) {
    const int64_t N = L->N;
    for (int64_t p = 0; p < C2 / 2; p++) {
        const int64_t n = 2 * p;
        /* rows 16 ahead: a strided walk the hardware prefetcher follows too late (perf: most of the
         * panel's time sat on these loads) */
        if (n + 17 < N) {
            _mm_prefetch((const char *)(mat + (size_t)(n + 16) * L->row_bytes + c0), _MM_HINT_T0);
            _mm_prefetch((const char *)(mat + (size_t)(n + 17) * L->row_bytes + c0), _MM_HINT_T0);
        }
        const __m128i r0 = n < N ? _mm_loadu_si128((const __m128i *)(mat + (size_t)n * L->row_bytes + c0))
                                 : _mm_setzero_si128();
        const __m128i r1 = n + 1 < N ? _mm_loadu_si128((const __m128i *)(mat + (size_t)(n + 1) * L->row_bytes + c0))
                                     : _mm_setzero_si128();
        _mm256_store_si256((__m256i *)(P + p * Q_NR), _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(r0, r1)));
        _mm256_store_si256((__m256i *)(P + p * Q_NR + 8), _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(r0, r1)));
    }
}

void kt_tn_q8_avx2(const kt_gemm *g) {
    const kt_matrix_layout *L = g->L;
    const int64_t N = L->N, C2 = (N + 31) & ~(int64_t)31;
    assert(L->format == KT_FORMAT_INT8 && N <= Q_MAX_K && g->lo % 16 == 0);
    int32_t *P = (int32_t *)g->scratch;
    int16_t *A = (int16_t *)(P + C2 / 2 * Q_NR);
    /* Panel outside, token blocks inside: the panel's strided rows are read once per call, the
     * tokens (sequential, cheap to widen) again per panel when there are more than Q_MC. */
    for (int64_t c0 = g->lo; c0 < g->hi; c0 += Q_NR) {
        const int64_t width = g->hi - c0 < Q_NR ? g->hi - c0 : Q_NR;
        q_panel_columns(L, g->w, c0, C2, P);
        for (int64_t mc = 0; mc < g->M; mc += Q_MC) {
            const int64_t mlen = g->M - mc < Q_MC ? g->M - mc : Q_MC, tiles = (mlen + Q_MR8 - 1) / Q_MR8;
            if (c0 == g->lo || g->M > Q_MC) widen_rows(g, mc, mlen, N, C2, A);
            for (int64_t t = 0; t < tiles; t++) {
                int64_t m0, rows;
                q_tile_of(mlen, Q_MR8, t, &m0, &rows);
                q_tn_tiles[rows](g, mc + m0, A + m0 * C2, C2, P, c0 - g->lo, width);
            }
        }
    }
}

/* ---- the int8 mode's activation quantization -------------------------------------------------- */

/* kt_kernels.quantize_row, 8 lanes at a time: the same operations as kt_moe.c's scalar loop (max is
 * exact in any order; z * inv and cvtps2dq's round-to-nearest-even under the default MXCSR are
 * lrintf's), so bitwise its result. Used by every table on AVX2 CPUs (not the scalar one). */
float kt_quantize_row_avx2(const float *v, const float *scale, int64_t n, int64_t n_pad, int8_t *q) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), big = _mm256_set1_ps(3.402823466e38f);
    __m256 vmax = _mm256_setzero_ps(), ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 z = _mm256_loadu_ps(v + i);
        if (scale) z = _mm256_mul_ps(z, _mm256_loadu_ps(scale + i));
        const __m256 a = _mm256_and_ps(z, absmask);
        ok = _mm256_and_ps(ok, _mm256_cmp_ps(a, big, _CMP_LE_OQ));
        vmax = _mm256_max_ps(vmax, a);
    }
    float lanes[8], amax = 0.0f;
    _mm256_storeu_ps(lanes, vmax);
    for (int l = 0; l < 8; l++) amax = lanes[l] > amax ? lanes[l] : amax;
    int finite = _mm256_movemask_ps(ok) == 0xff;
    kt_quant_absmax(v, scale, i, n, &amax, &finite);
    float sc, inv;
    if (!kt_quant_scale(amax, finite, n, n_pad, q, &sc, &inv)) return sc;
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i r[4];
        for (int k = 0; k < 4; k++) {
            __m256 z = _mm256_loadu_ps(v + i + 8 * k);
            if (scale) z = _mm256_mul_ps(z, _mm256_loadu_ps(scale + i + 8 * k));
            r[k] = _mm256_cvtps_epi32(_mm256_mul_ps(z, vinv)); /* |.| <= 127: the packs never saturate */
        }
        const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(b, order));
    }
    kt_quant_round(v, scale, i, n, inv, q);
    return sc;
}

/* ---- int8 activations on AVX-VNNI: vpdpbusd on ymm (the avx-vnni path) --------------------------- */

/* CPUs with AVX-VNNI (the VEX form of vpdpbusd: Alder Lake and later Intel cores, Zen 5) but without
 * AVX-512 get the avx2 table with these int8-mode products: four u8 x s8 multiply-adds per int32
 * lane, 32 per ymm instruction, 4x an fp32 FMA. The same scheme as the avx512 table's vpdpbusd
 * kernels (kt_kernels_avx512.c, "int8 activations"), on 16 outputs per panel:
 *   nt: P[q][j] = W[n0+j][4q .. 4q+4)       (int8 quants; int4 as q - 8)
 *   tn: P[q][j] = W[4q .. 4q+4)[c0+j]       (int8 quants, 4 rows interleaved bytewise)
 * the token's quad biased to a + 128 (xor 0x80) and 128 * sum w per output (per 32-block for int4)
 * subtracted; only the non-saturating vpdpbusd and wrapping vpsubd, so the int32 sums are exact for
 * K <= 131072 and, with the scalar order of the fp32 epilogue, the results are bitwise the scalar
 * path's. Tiles: int8 6 x 16 (12 accumulators, 2 panel vectors, a broadcast), int4 3 x 16. */
#define KT_VNNI_Y __attribute__((target("avxvnni,avx2,fma,f16c")))
#define V_MR8 6
#define V_MR4 3

static inline __attribute__((always_inline)) KT_VNNI_Y __m256i vbcast_quad(const int8_t *a, int64_t q) {
    int32_t v;
    memcpy(&v, a + 4 * q, 4);
    return _mm256_xor_si256(_mm256_set1_epi32(v), _mm256_set1_epi32((int)0x80808080u));
}

#define V_ROW(i, c0, c1)                                                                         \
    if (R > i) {                                                                                 \
        const __m256i b = vbcast_quad(a[i], s);                                                  \
        c0 = _mm256_dpbusd_avx_epi32(c0, b, w0);                                                 \
        c1 = _mm256_dpbusd_avx_epi32(c1, b, w1);                                                 \
    }
/* acc = the biased sums over quads [q0, q1): see KT_INT_STEPS */
KT_INT_STEPS(v_steps, KT_VNNI_Y, int8_t, V_ROW)
#undef V_ROW

/* 128 * (sum of each lane's four signed bytes), accumulated into s. */
static inline __attribute__((always_inline)) KT_VNNI_Y __m256i v_quad_sums(__m256i s, __m256i v) {
    return _mm256_dpbusd_avx_epi32(s, _mm256_set1_epi8(1), v);
}

/* nt panel of rows [n0, n0 + rows): P[q][j] for q < K_pad / 4 (rows past `rows` zero) and
 * corr[b][j] = 128 * sum of row j's quants over block b (the whole row for int8, a 32-block for int4). */
static KT_VNNI_Y void v_panel_rows(int fmt, const kt_matrix_layout *L, const uint8_t *mat, int64_t n0, int64_t rows,
                                   int32_t *P, int32_t *corr) {
    const int64_t K_pad = L->K_pad, blk_q = fmt == KT_FORMAT_INT8 ? K_pad / 4 : KT_INT4_BLOCK / 4;
    __m256i s[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int64_t k = 0; k < K_pad; k += 32) {
        for (int half = 0; half < 2; half++) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) {
                const int64_t j = half * 8 + i;
                __m256i v = _mm256_setzero_si256();
                if (j < rows) {
                    const uint8_t *row = mat + (size_t)(n0 + j) * L->row_bytes;
                    if (fmt == KT_FORMAT_INT8) {
                        v = _mm256_loadu_si256((const __m256i *)(row + k));
                    } else { /* one 32-block: low nibbles are elements 0..15, high ones 16..31 */
                        const __m128i b = _mm_loadu_si128((const __m128i *)(row + k / 2)), m = _mm_set1_epi8(0x0f);
                        const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
                        v = _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
                    }
                }
                r[i] = _mm256_castsi256_ps(v);
            }
            transpose8(r); /* 32-bit words: r[i] = quad k/4 + i of the 8 rows */
            for (int i = 0; i < 8; i++) {
                const __m256i v = _mm256_castps_si256(r[i]);
                const int64_t q = k / 4 + i;
                _mm256_store_si256((__m256i *)(P + q * Q_NR + half * 8), v);
                s[half] = v_quad_sums(s[half], v);
                if ((q + 1) % blk_q == 0) {
                    _mm256_store_si256((__m256i *)(corr + (q / blk_q) * Q_NR + half * 8), _mm256_slli_epi32(s[half], 7));
                    s[half] = _mm256_setzero_si256();
                }
            }
        }
    }
}

static inline __attribute__((always_inline)) KT_VNNI_Y void v_nt_int8_tile(int R, const kt_gemm *g, int64_t m0,
                                                                           const int32_t *P, const int32_t *corr,
                                                                           __m256 d0, __m256 d1, int64_t col,
                                                                           int64_t width) {
    const int8_t *a[V_MR8];
    __m256i acc[V_MR8][2];
    for (int i = 0; i < R; i++) a[i] = g->a_rows[m0 + i];
    v_steps(R, 0, g->L->K_pad / 4, a, P, acc);
    const __m256i k0 = _mm256_load_si256((const __m256i *)corr), k1 = _mm256_load_si256((const __m256i *)(corr + 8));
    for (int i = 0; i < R; i++)
        q_store_row(g, m0 + i, col, width, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i][0], k0)), d0),
                    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i][1], k1)), d1));
}

static inline __attribute__((always_inline)) KT_VNNI_Y void v_nt_int4_tile(int R, const kt_gemm *g, int64_t m0,
                                                                           const int32_t *P, const int32_t *corr,
                                                                           const float *D, int64_t col,
                                                                           int64_t width) {
    const int8_t *a[V_MR4];
    __m256 f[V_MR4][2];
    for (int i = 0; i < R; i++) {
        a[i] = g->a_rows[m0 + i];
        f[i][0] = f[i][1] = _mm256_setzero_ps();
    }
    const int64_t nb = g->L->K_pad / KT_INT4_BLOCK, bq = KT_INT4_BLOCK / 4;
    for (int64_t b = 0; b < nb; b++) {
        __m256i acc[V_MR4][2];
        v_steps(R, b * bq, (b + 1) * bq, a, P, acc);
        const __m256i k0 = _mm256_load_si256((const __m256i *)(corr + b * Q_NR));
        const __m256i k1 = _mm256_load_si256((const __m256i *)(corr + b * Q_NR + 8));
        const __m256 e0 = _mm256_load_ps(D + b * Q_NR), e1 = _mm256_load_ps(D + b * Q_NR + 8);
        for (int i = 0; i < R; i++) {
            f[i][0] = _mm256_add_ps(f[i][0], _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i][0], k0)), e0));
            f[i][1] = _mm256_add_ps(f[i][1], _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i][1], k1)), e1));
        }
    }
    for (int i = 0; i < R; i++) q_store_row(g, m0 + i, col, width, f[i][0], f[i][1]);
}

/* tn panel of columns [c0, c0 + 16): P[q][j] = bytes W[4q + i][c0 + j], i < 4, q < ceil(N / 4) (rows
 * past N zero), and corr[j] = 128 * sum_n W[n][c0 + j]. */
static KT_VNNI_Y void v_panel_columns(const kt_matrix_layout *L, const uint8_t *mat, int64_t c0, int32_t *P,
                                      int32_t *corr) {
    const int64_t N = L->N, nq = (N + 3) / 4;
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    for (int64_t q = 0; q < nq; q++) {
        __m128i r[4];
        for (int i = 0; i < 4; i++) {
            const int64_t n = 4 * q + i;
            if (n + 16 < N) _mm_prefetch((const char *)(mat + (size_t)(n + 16) * L->row_bytes + c0), _MM_HINT_T0);
            r[i] = n < N ? _mm_loadu_si128((const __m128i *)(mat + (size_t)n * L->row_bytes + c0)) : _mm_setzero_si128();
        }
        const __m128i t01l = _mm_unpacklo_epi8(r[0], r[1]), t01h = _mm_unpackhi_epi8(r[0], r[1]);
        const __m128i t23l = _mm_unpacklo_epi8(r[2], r[3]), t23h = _mm_unpackhi_epi8(r[2], r[3]);
        const __m256i v0 = _mm256_set_m128i(_mm_unpackhi_epi16(t01l, t23l), _mm_unpacklo_epi16(t01l, t23l));
        const __m256i v1 = _mm256_set_m128i(_mm_unpackhi_epi16(t01h, t23h), _mm_unpacklo_epi16(t01h, t23h));
        _mm256_store_si256((__m256i *)(P + q * Q_NR), v0);
        _mm256_store_si256((__m256i *)(P + q * Q_NR + 8), v1);
        s0 = v_quad_sums(s0, v0);
        s1 = v_quad_sums(s1, v1);
    }
    _mm256_store_si256((__m256i *)corr, _mm256_slli_epi32(s0, 7));
    _mm256_store_si256((__m256i *)(corr + 8), _mm256_slli_epi32(s1, 7));
}

static inline __attribute__((always_inline)) KT_VNNI_Y void v_tn_tile(int R, const kt_gemm *g, int64_t m0,
                                                                      const int32_t *P, const int32_t *corr,
                                                                      int64_t col, int64_t width) {
    const int8_t *a[V_MR8];
    __m256i acc[V_MR8][2];
    for (int i = 0; i < R; i++) a[i] = g->a_rows[m0 + i];
    v_steps(R, 0, (g->L->N + 3) / 4, a, P, acc);
    const __m256i k0 = _mm256_load_si256((const __m256i *)corr), k1 = _mm256_load_si256((const __m256i *)(corr + 8));
    for (int i = 0; i < R; i++)
        q_store_row(g, m0 + i, col, width, _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i][0], k0)),
                    _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i][1], k1)));
}

#define KT_V_TILES(R)                                                                                         \
    static KT_VNNI_Y void v_nt_int8_tile_##R(const kt_gemm *g, int64_t m0, const int32_t *P, const int32_t *k, \
                                             __m256 d0, __m256 d1, int64_t col, int64_t w) {                  \
        v_nt_int8_tile(R, g, m0, P, k, d0, d1, col, w);                                                       \
    }                                                                                                         \
    static KT_VNNI_Y void v_tn_tile_##R(const kt_gemm *g, int64_t m0, const int32_t *P, const int32_t *k,      \
                                        int64_t col, int64_t w) {                                             \
        v_tn_tile(R, g, m0, P, k, col, w);                                                                    \
    }
#define KT_V4_TILES(R)                                                                                        \
    static KT_VNNI_Y void v_nt_int4_tile_##R(const kt_gemm *g, int64_t m0, const int32_t *P, const int32_t *k, \
                                             const float *D, int64_t col, int64_t w) {                        \
        v_nt_int4_tile(R, g, m0, P, k, D, col, w);                                                            \
    }
KT_V_TILES(1) KT_V_TILES(2) KT_V_TILES(3) KT_V_TILES(4) KT_V_TILES(5) KT_V_TILES(6)
KT_V4_TILES(1) KT_V4_TILES(2) KT_V4_TILES(3)
#undef KT_V_TILES
#undef KT_V4_TILES
_Static_assert(V_MR8 == 6 && V_MR4 == 3, "the tables below list one tile per height");
typedef void (*v_nt_int8_tile_fn)(const kt_gemm *, int64_t, const int32_t *, const int32_t *, __m256, __m256,
                                  int64_t, int64_t);
typedef void (*v_nt_int4_tile_fn)(const kt_gemm *, int64_t, const int32_t *, const int32_t *, const float *,
                                  int64_t, int64_t);
typedef void (*v_tn_tile_fn)(const kt_gemm *, int64_t, const int32_t *, const int32_t *, int64_t, int64_t);
static const v_nt_int8_tile_fn v_nt_int8_tiles[V_MR8 + 1] = {NULL, v_nt_int8_tile_1, v_nt_int8_tile_2,
                                                             v_nt_int8_tile_3, v_nt_int8_tile_4,
                                                             v_nt_int8_tile_5, v_nt_int8_tile_6};
static const v_nt_int4_tile_fn v_nt_int4_tiles[V_MR4 + 1] = {NULL, v_nt_int4_tile_1, v_nt_int4_tile_2,
                                                             v_nt_int4_tile_3};
static const v_tn_tile_fn v_tn_tiles[V_MR8 + 1] = {NULL, v_tn_tile_1, v_tn_tile_2, v_tn_tile_3,
                                                   v_tn_tile_4, v_tn_tile_5, v_tn_tile_6};

/* Scratch: [panel: K_pad / 4 (tn: N / 4, rounded up to 8) x 16 words][corr, int4 scales: blocks x 16 each] */
static KT_VNNI_Y void nt_q8_avxvnni(const kt_gemm *g) {
    const kt_matrix_layout *L = g->L;
    const int64_t K_pad = L->K_pad, nq = K_pad / 4, nb = K_pad / KT_INT4_BLOCK;
    const int int8 = L->format == KT_FORMAT_INT8;
    assert(K_pad <= Q_MAX_K && K_pad % 32 == 0);
    int32_t *P = (int32_t *)g->scratch, *corr = P + nq * Q_NR;
    float *D = (float *)(corr + (nb + 1) * Q_NR);
    const int64_t mr = int8 ? V_MR8 : V_MR4, tiles = (g->M + mr - 1) / mr;
    const uint16_t *sc = (const uint16_t *)(g->w + L->scales_offset);
    for (int64_t n0 = g->lo; n0 < g->hi; n0 += Q_NR) {
        const int64_t width = g->hi - n0 < Q_NR ? g->hi - n0 : Q_NR;
        float d[Q_NR] = {0};
        if (int8) {
            for (int64_t j = 0; j < width; j++) d[j] = ((const float *)(g->w + L->scales_offset))[n0 + j];
        } else {
            for (int64_t b = 0; b < nb; b++)
                for (int64_t j = 0; j < Q_NR; j++) D[b * Q_NR + j] = j < width ? _cvtsh_ss(sc[(n0 + j) * nb + b]) : 0.0f;
        }
        v_panel_rows(L->format, L, g->w, n0, width, P, corr);
        const __m256 d0 = _mm256_loadu_ps(d), d1 = _mm256_loadu_ps(d + 8);
        for (int64_t t = 0; t < tiles; t++) {
            int64_t m0, rows;
            q_tile_of(g->M, mr, t, &m0, &rows);
            if (int8) v_nt_int8_tiles[rows](g, m0, P, corr, d0, d1, n0 - g->lo, width);
            else v_nt_int4_tiles[rows](g, m0, P, corr, D, n0 - g->lo, width);
        }
    }
}

static KT_VNNI_Y void tn_q8_avxvnni(const kt_gemm *g) {
    const kt_matrix_layout *L = g->L;
    assert(L->format == KT_FORMAT_INT8 && L->N <= Q_MAX_K && g->lo % 16 == 0);
    int32_t *P = (int32_t *)g->scratch, *corr = P + ((L->N + 3) / 4) * Q_NR;
    const int64_t tiles = (g->M + V_MR8 - 1) / V_MR8;
    for (int64_t c0 = g->lo; c0 < g->hi; c0 += Q_NR) {
        const int64_t width = g->hi - c0 < Q_NR ? g->hi - c0 : Q_NR;
        v_panel_columns(L, g->w, c0, P, corr);
        for (int64_t t = 0; t < tiles; t++) {
            int64_t m0, rows;
            q_tile_of(g->M, V_MR8, t, &m0, &rows);
            v_tn_tiles[rows](g, m0, P, corr, c0 - g->lo, width);
        }
    }
}

const kt_kernels kt_kernels_avx_vnni = {.name = "avx-vnni", .nt = nt_avx2, .tn = tn_avx2, .nt_q8 = nt_q8_avxvnni,
                                        .tn_q8 = tn_q8_avxvnni, .dots = dots_avx2, .axpy = axpy_avx2,
                                        .scratch_floats = scratch_floats_avx2,
                                        .quantize_row = kt_quantize_row_avx2};

const kt_kernels kt_kernels_avx2 = {.name = "avx2", .nt = nt_avx2, .tn = tn_avx2, .nt_q8 = kt_nt_q8_avx2,
                                    .tn_q8 = kt_tn_q8_avx2, .dots = dots_avx2, .axpy = axpy_avx2,
                                    .scratch_floats = scratch_floats_avx2, .quantize_row = kt_quantize_row_avx2};

#pragma GCC pop_options
#endif

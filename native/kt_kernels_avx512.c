/* AVX-512 kernels: zmm fp32 FMA (x86-64 only; compiled with a target pragma, chosen at run time).
 *
 * The avx2 design on 16-lane registers. Both directions run one register-blocked micro-kernel, a
 * 12 x 32 fp32 tile of outputs (24 zmm accumulators + 2 panel vectors + a broadcast):
 *   acc[m][0..32) += a[m][k] * P[k][0..32)      (a[m][k] broadcast, P a packed panel row)
 * over the contraction index k. The panel P is the dequantized weights in k-major order:
 *   nt (forward, W[n][k] rows): P[k][j] = W[n0+j][k]  -- 32 rows, transposed 16 x 16 in registers
 *   tn (backward, W^T):         P[n][j] = W[n][c0+j]  -- 32-column segments of consecutive rows
 * A panel is built once per 32 outputs and reused by every token of the expert. Few tokens take
 * other forms that skip the panel (nt: dot products; tn: dequantization in registers), see the
 * thresholds below.
 *
 * The same source is compiled twice: natively (this file) and, with KT_SIMDE defined, against
 * SIMDe's portable AVX-512 with only AVX2 enabled (kt_kernels_avx512_simde.c), a test path that
 * proves this code on CPUs without AVX-512. Every AVX-512 intrinsic goes through ZMM(op), which
 * names _mm512_op or simde_mm512_op; the few SIMDe 0.7.4 lacks are helpers below built from two
 * ymm halves.
 */
#include <stdlib.h>

#include "kt_internal.h"

#if defined(__x86_64__)
#pragma GCC push_options
#ifdef KT_SIMDE
#pragma GCC target("avx2,fma,f16c")
#include <simde/x86/avx512.h>
#define ZMM(op) simde_mm512_##op
#define YMM(op) simde_mm256_##op
typedef simde__m512 zf;
typedef simde__m512i zi;
typedef simde__m256i yi;
#define KT_TABLE kt_kernels_avx512_simde
#define KT_TABLE_NAME "avx512-simde"
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include <immintrin.h>
#define ZMM(op) _mm512_##op
#define YMM(op) _mm256_##op
typedef __m512 zf;
typedef __m512i zi;
typedef __m256i yi;
#define KT_TABLE kt_kernels_avx512
#define KT_TABLE_NAME "avx512"
#endif

/* ---- the intrinsics SIMDe 0.7.4 lacks ------------------------------------------------------- */

static inline zi join_i(yi lo, yi hi) { return ZMM(inserti64x4)(ZMM(castsi256_si512)(lo), hi, 1); }
static inline yi lo_i(zi v) { return ZMM(castsi512_si256)(v); }
static inline yi hi_i(zi v) { return ZMM(extracti64x4_epi64)(v, 1); }

/* 16 int8 / uint8 / uint16 at p widened to 16 int32. */
static inline zi load_i8x16(const void *p) {
#ifdef KT_SIMDE
    const simde__m128i v = simde_mm_loadu_si128(p);
    return join_i(YMM(cvtepi8_epi32)(v), YMM(cvtepi8_epi32)(simde_mm_unpackhi_epi64(v, v)));
#else
    return _mm512_cvtepi8_epi32(_mm_loadu_si128(p));
#endif
}

static inline zi load_u8x16(const void *p) {
#ifdef KT_SIMDE
    const simde__m128i v = simde_mm_loadu_si128(p);
    return join_i(YMM(cvtepu8_epi32)(v), YMM(cvtepu8_epi32)(simde_mm_unpackhi_epi64(v, v)));
#else
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(p));
#endif
}

static inline zi load_u16x16(const void *p) {
#ifdef KT_SIMDE
    const yi v = YMM(loadu_si256)(p);
    return join_i(YMM(cvtepu16_epi32)(YMM(castsi256_si128)(v)), YMM(cvtepu16_epi32)(YMM(extracti128_si256)(v, 1)));
#else
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(p));
#endif
}

static inline zf cvt_ps(zi v) {
#ifdef KT_SIMDE
    return ZMM(insertf32x8)(ZMM(castps256_ps512)(YMM(cvtepi32_ps)(lo_i(v))), YMM(cvtepi32_ps)(hi_i(v)), 1);
#else
    return _mm512_cvtepi32_ps(v);
#endif
}

/* Sum of the 16 lanes: halves, then the avx2 tree. */
static inline float hsum16(zf v) {
    const zi u = ZMM(castps_si512)(v);
    const __m256 s8 = _mm256_add_ps(_mm256_castsi256_ps((__m256i)lo_i(u)), _mm256_castsi256_ps((__m256i)hi_i(u)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define MR 12
#define NR 32

/* ---- dequantization ------------------------------------------------------------------------- */

static inline const uint8_t *row_of(const kt_matrix_layout *L, const uint8_t *mat, int64_t n) {
    return mat + (size_t)n * L->row_bytes;
}

static inline float int8_scale(const kt_matrix_layout *L, const uint8_t *mat, int64_t n) {
    return ((const float *)(mat + L->scales_offset))[n];
}

static inline float int4_scale(const kt_matrix_layout *L, const uint8_t *mat, int64_t n, int64_t b) {
    return _cvtsh_ss(((const uint16_t *)(mat + L->scales_offset))[n * (L->K_pad / KT_INT4_BLOCK) + b]);
}

/* int4: the 16 values (q - 8) d of 32-block b of row n, each an exact fp32 product (a 4-bit integer
 * times an fp16 value: the same bits as converting and scaling every weight). A weight is then one
 * vpermps of this table by its nibble (vpermps reads only the low 4 bits of each index, so the low
 * nibbles need no mask): one shuffle per 16 weights where a convert and an FMA were. */
static inline zf int4_table(const kt_matrix_layout *L, const uint8_t *mat, int64_t n, int64_t b) {
    return ZMM(mul_ps)(ZMM(setr_ps)(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7),
                       ZMM(set1_ps)(int4_scale(L, mat, n, b)));
}

/* 16 fp32 values rounded to bf16, nearest even, as kt_round_bf16 (finite values: the weights). */
static inline zf round_bf16_16(zf v) {
    /* u + 0x7fff, plus one where bf16's last bit (bit 16) is set, then truncated: four instructions
     * without a shift (a shift of a zmm runs on port 0 alone on Intel cores, with the FMAs) */
    const zi u = ZMM(castps_si512)(v);
    const __mmask16 odd = ZMM(test_epi32_mask)(u, ZMM(set1_epi32)(0x10000));
    zi r = ZMM(add_epi32)(u, ZMM(set1_epi32)(0x7fff));
    r = ZMM(mask_add_epi32)(r, odd, r, ZMM(set1_epi32)(1));
    return ZMM(castsi512_ps)(ZMM(and_si512)(r, ZMM(set1_epi32)((int)0xffff0000u)));
}

/* The weights of tn with kt_gemm.round_w (the bf16 mode's backward on int8 / int4): each dequantized
 * weight rounded to bf16. Two more values of the constant `fmt` below, so the switches still fold:
 * int8 rounds every 16 weights after the scale, int4 rounds its 16-value table once per block. */
#define FMT_INT8_RW 3
#define FMT_INT4_RW 4
#define FMT_COUNT 5
static inline int fmt_int4(int fmt) { return fmt == KT_FORMAT_INT4 || fmt == FMT_INT4_RW; }
static inline int tn_fmt(const kt_gemm *g) {
    const int f = g->L->format;
    return !g->round_w ? f : f == KT_FORMAT_INT8 ? FMT_INT8_RW : f == KT_FORMAT_INT4 ? FMT_INT4_RW : f;
}
static inline zf int4_table_fmt(int fmt, const kt_matrix_layout *L, const uint8_t *mat, int64_t n, int64_t b) {
    const zf t = int4_table(L, mat, n, b);
    return fmt == FMT_INT4_RW ? round_bf16_16(t) : t;
}

/* 16 dequantized weights W[n][k .. k+16), k a multiple of 16 inside K_pad. fmt is a constant in
 * every caller (always inlined), so the switch folds away. */
static inline __attribute__((always_inline)) zf load16(int fmt, const kt_matrix_layout *L, const uint8_t *mat,
                                                      int64_t n, int64_t k) {
    const uint8_t *row = row_of(L, mat, n);
    switch (fmt) {
    case KT_FORMAT_BF16: { /* each bf16 into the high half of a 32-bit lane: one word shuffle, zeros below */
        const zi idx = ZMM(set_epi16)(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2,
                                      0, 1, 0, 0, 0);
        return ZMM(castsi512_ps)(ZMM(maskz_permutexvar_epi16)(0xAAAAAAAAu, idx,
                                                              ZMM(castsi256_si512)(YMM(loadu_si256)((const void *)(row + 2 * k)))));
    }
    case KT_FORMAT_INT8:
        return ZMM(mul_ps)(cvt_ps(load_i8x16(row + k)), ZMM(set1_ps)(int8_scale(L, mat, n)));
    case FMT_INT8_RW:
        return round_bf16_16(ZMM(mul_ps)(cvt_ps(load_i8x16(row + k)), ZMM(set1_ps)(int8_scale(L, mat, n))));
    default: { /* int4: byte j of a block = element j (low nibble) and j+16 (high nibble) */
        const int64_t b = k / KT_INT4_BLOCK;
        const zi q = ZMM(srli_epi32)(load_u8x16(row + b * (KT_INT4_BLOCK / 2)), (k % KT_INT4_BLOCK) ? 4 : 0);
        return ZMM(permutexvar_ps)(q, int4_table_fmt(fmt, L, mat, n, b));
    }
    }
}

/* int4 W[n][k0 .. k0+16) and W[n][k0+16 .. k0+32), k0 a multiple of 32 (one 32-block): one load of
 * the block's 16 bytes, one table for both, and constant shifts (the low nibbles need none). */
static inline __attribute__((always_inline)) void load32_int4(int fmt, const kt_matrix_layout *L, const uint8_t *mat, int64_t n,
                                                              int64_t k0, zf *p0, zf *p1) {
    const int64_t b = k0 / KT_INT4_BLOCK;
    const zi bytes = load_u8x16(row_of(L, mat, n) + b * (KT_INT4_BLOCK / 2));
    const zf values = int4_table_fmt(fmt, L, mat, n, b);
    *p0 = ZMM(permutexvar_ps)(bytes, values);
    *p1 = ZMM(permutexvar_ps)(ZMM(srli_epi32)(bytes, 4), values);
}

/* Row n of the packed matrix at columns c0 and c1 (16 each), dequantized. int4: c0 a multiple of 32
 * and p1 always columns c0 + 16 .. c0 + 32 of the same block (c1 unused: a caller with c1 == c0,
 * the direct form's narrow stripe, ignores p1). */
static inline __attribute__((always_inline)) void direct_pair(int fmt, const kt_matrix_layout *L, const uint8_t *w,
                                                              int64_t n, int64_t c0, int64_t c1, zf *p0, zf *p1) {
    if (fmt_int4(fmt)) {
        load32_int4(fmt, L, w, n, c0, p0, p1);
    } else {
        *p0 = load16(fmt, L, w, n, c0);
        *p1 = load16(fmt, L, w, n, c1);
    }
}

/* tn's weights as bf16 pairs of rows: word j of *p0 = (W'[2q][c0 + j], W'[2q + 1][c0 + j]), j < 16, of
 * *p1 the same for columns c0 + 16 + j (zero for j >= width and for rows past N); fmt: bf16, or
 * FMT_INT8_RW / FMT_INT4_RW (tn_fmt: rounded to bf16, so the high halves are the pairs exactly). c0 is
 * a multiple of 32 (tn_avx512). The panels' builder (panel_columns_pairs) and the direct form's step. */
static inline __attribute__((always_inline)) void column_pairs(int fmt, const kt_matrix_layout *L, const uint8_t *mat,
                                                               int64_t c0, int64_t width, int64_t q, zf *p0, zf *p1) {
    const zi lo_idx = ZMM(set_epi16)(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5,
                                     36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const zi hi_idx = ZMM(add_epi16)(lo_idx, ZMM(set1_epi16)(16));
    const zi hi16 = ZMM(set1_epi32)((int)0xffff0000u);
    zi r[2], v[2][2];
    for (int t = 0; t < 2; t++) {
        const int64_t n = 2 * q + t;
        if (n >= L->N) {
            r[t] = v[t][0] = v[t][1] = ZMM(setzero_si512)();
            continue;
        }
        if (fmt == KT_FORMAT_BF16) {
            const uint8_t *src = row_of(L, mat, n) + 2 * c0;
            r[t] = join_i(YMM(loadu_si256)((const void *)src),
                          width > 16 ? YMM(loadu_si256)((const void *)(src + 32)) : YMM(setzero_si256)());
        } else {
            zf w0, w1 = ZMM(setzero_ps)();
            if (fmt_int4(fmt)) direct_pair(fmt, L, mat, n, c0, c0 + 16, &w0, &w1); /* one block, inside K_pad */
            else if (width > 16) direct_pair(fmt, L, mat, n, c0, c0 + 16, &w0, &w1);
            else w0 = load16(fmt, L, mat, n, c0);
            v[t][0] = ZMM(castps_si512)(w0);
            v[t][1] = width > 16 ? ZMM(castps_si512)(w1) : ZMM(setzero_si512)();
        }
    }
    if (fmt == KT_FORMAT_BF16) {
        /* word j of out = element j of row 2q (low half) and of row 2q+1 (high half) */
        *p0 = ZMM(castsi512_ps)(ZMM(permutex2var_epi16)(r[0], lo_idx, r[1]));
        *p1 = ZMM(castsi512_ps)(ZMM(permutex2var_epi16)(r[0], hi_idx, r[1]));
    } else { /* rounded values: row 2q's high half down, row 2q+1's kept */
        *p0 = ZMM(castsi512_ps)(ZMM(or_si512)(ZMM(srli_epi32)(v[0][0], 16), ZMM(and_si512)(v[1][0], hi16)));
        *p1 = ZMM(castsi512_ps)(ZMM(or_si512)(ZMM(srli_epi32)(v[0][1], 16), ZMM(and_si512)(v[1][1], hi16)));
    }
}

#include "kt_transpose16.h" /* transpose16(zf r[16]) */

/* P[k - kb][j] = W[n0 + j][k] for k in [kb, ke) (multiples of 32, ke <= K rounded up to 32), j < 32;
 * rows past N are zero.
 * Per 32-column step of 16 rows: bf16 splits one 64-byte load per row into its even (<< 16) and
 * odd (& 0xffff0000) elements, one instruction per 16 weights, and stores the transposed vectors
 * at k+2i and k+2i+1; int8 and int4 widen 16 weights per instruction in order. */
static inline __attribute__((always_inline)) void panel_rows_fmt(int fmt, const kt_matrix_layout *L, const uint8_t *mat,
                                                                 int64_t n0, int64_t kb, int64_t ke, float *P) {
    const int64_t rows = L->N - n0 < NR ? L->N - n0 : NR;
    const zi hi16 = ZMM(set1_epi32)((int)0xffff0000u);
    for (int64_t k = kb; k < ke; k += 32) {
        for (int half = 0; half < 2; half++) {
            zf r0[16], r1[16];
            for (int i = 0; i < 16; i++) {
                const int64_t j = half * 16 + i;
                if (j >= rows) {
                    r0[i] = r1[i] = ZMM(setzero_ps)();
                } else if (fmt == KT_FORMAT_BF16) {
                    const zi v = ZMM(loadu_si512)(row_of(L, mat, n0 + j) + 2 * k);
                    r0[i] = ZMM(castsi512_ps)(ZMM(slli_epi32)(v, 16));
                    r1[i] = ZMM(castsi512_ps)(ZMM(and_si512)(v, hi16));
                } else {
                    direct_pair(fmt, L, mat, n0 + j, k, k + 16, &r0[i], &r1[i]);
                }
            }
            transpose16(r0);
            transpose16(r1);
            float *dst = P + (k - kb) * NR + half * 16;
            if (fmt == KT_FORMAT_BF16) {
                for (int i = 0; i < 16; i++) {
                    ZMM(store_ps)(dst + (2 * i) * NR, r0[i]);
                    ZMM(store_ps)(dst + (2 * i + 1) * NR, r1[i]);
                }
            } else {
                for (int i = 0; i < 16; i++) {
                    ZMM(store_ps)(dst + i * NR, r0[i]);
                    ZMM(store_ps)(dst + (16 + i) * NR, r1[i]);
                }
            }
        }
    }
}

static void panel_rows_transposed(const kt_matrix_layout *L, const uint8_t *mat, int64_t n0, int64_t kb, int64_t ke,
                                  float *P) {
    switch (L->format) {
    case KT_FORMAT_BF16: panel_rows_fmt(KT_FORMAT_BF16, L, mat, n0, kb, ke, P); break;
    case KT_FORMAT_INT8: panel_rows_fmt(KT_FORMAT_INT8, L, mat, n0, kb, ke, P); break;
    default: panel_rows_fmt(KT_FORMAT_INT4, L, mat, n0, kb, ke, P); break;
    }
}

/* P[n - nb][j] = W[n][c0 + j] for n in [nb, ne), j < width (<= 32; c0 a multiple of 16, inside
 * K_pad); the second half is zero when width <= 16, so no load reaches past the row. */
static inline __attribute__((always_inline)) void panel_columns_fmt(int fmt, const kt_matrix_layout *L,
                                                                    const uint8_t *mat, int64_t c0, int64_t width,
                                                                    int64_t nb, int64_t ne, float *P) {
    if (width > 16 && (!fmt_int4(fmt) || c0 % KT_INT4_BLOCK == 0)) { /* int4: one 32-block, one table */
        for (int64_t n = nb; n < ne; n++) {
            zf p0, p1;
            direct_pair(fmt, L, mat, n, c0, c0 + 16, &p0, &p1);
            ZMM(store_ps)(P + (n - nb) * NR, p0);
            ZMM(store_ps)(P + (n - nb) * NR + 16, p1);
        }
        return;
    }
    for (int64_t n = nb; n < ne; n++) {
        ZMM(store_ps)(P + (n - nb) * NR, load16(fmt, L, mat, n, c0));
        ZMM(store_ps)(P + (n - nb) * NR + 16, width > 16 ? load16(fmt, L, mat, n, c0 + 16) : ZMM(setzero_ps)());
    }
}

/* fmt: tn_fmt(g) */
static void panel_columns(int fmt, const kt_matrix_layout *L, const uint8_t *mat, int64_t c0, int64_t width, int64_t nb,
                          int64_t ne, float *P) {
    switch (fmt) {
    case KT_FORMAT_BF16: panel_columns_fmt(KT_FORMAT_BF16, L, mat, c0, width, nb, ne, P); break;
    case KT_FORMAT_INT8: panel_columns_fmt(KT_FORMAT_INT8, L, mat, c0, width, nb, ne, P); break;
    case FMT_INT8_RW: panel_columns_fmt(FMT_INT8_RW, L, mat, c0, width, nb, ne, P); break;
    case FMT_INT4_RW: panel_columns_fmt(FMT_INT4_RW, L, mat, c0, width, nb, ne, P); break;
    default: panel_columns_fmt(KT_FORMAT_INT4, L, mat, c0, width, nb, ne, P); break;
    }
}

/* ---- the micro-kernel ----------------------------------------------------------------------- */

/* acc += p * broadcast(*ptr). Natively the broadcast is the FMA's memory operand ({1to16}): GCC
 * keeps a broadcast used by two FMAs in a register, and a separate vbroadcastss takes an FP-pipe
 * slot on Zen 4 (llvm-mca: 36 instead of 24 cycles per step of the 12 x 32 tile). */
#ifdef KT_SIMDE
#define FMA_BCAST(acc, p, ptr) ((acc) = ZMM(fmadd_ps)(ZMM(set1_ps)(*(ptr)), (p), (acc)))
#else
#define FMA_BCAST(acc, p, ptr) __asm__("vfmadd231ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(p), "m"(*(ptr)))
#endif

/* acc += p * broadcast(pair at ptr), two bf16 products per lane (vdpbf16ps; see the bf16 pairs section). */
#ifdef KT_SIMDE
static inline simde__m512bh as_bh(zi v) {
    simde__m512bh r;
    memcpy(&r, &v, sizeof r);
    return r;
}
#define DP_BCAST(acc, p, ptr)                                                                      \
    ((acc) = simde_mm512_dpbf16_ps((acc), as_bh(ZMM(set1_epi32)((int)*(const uint32_t *)(ptr))),  \
                                   as_bh(ZMM(castps_si512)(p))))
#else
#define DP_BCAST(acc, p, ptr) __asm__("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(p), "m"(*(const uint32_t *)(ptr)))
#endif

/* An empty use of three vectors: where a vector's last use was a vdpbf16ps asm, gcc 14 gave that
 * instruction's accumulator the dying vector's register and copied it there and back every step (4
 * copies per step of nt_lanes' tile, loop_check). */
#ifdef KT_SIMDE
#define KEEP3(a, b, c) ((void)(a), (void)(b), (void)(c))
#else
#define KEEP3(a, b, c) __asm__("" : : "v"(a), "v"(b), "v"(c))
#endif

#ifndef TN_DP_AHEAD
#define TN_DP_AHEAD 16
#endif
/* c[R][NR] (+)= sum_{k<Kc} a[m][k] * P[k][:]   (c zeroed first when !load), R <= MR rows.
 * Step k's two panel vectors come from the panel P (fmt < 0), or straight from row k of the packed
 * matrix of format fmt at columns c0 and c1 (dequantized in registers: the transposed product with few
 * tokens; with dp, step k is rows 2k and 2k + 1 as bf16 pairs, column_pairs). Always inlined with
 * constant R and fmt, so each instance gets its own loop. */
static inline __attribute__((always_inline)) void ukernel_any(int R, int packed, int dp, int64_t Kc, const float *const *a, const float *Ap,
                                                              const float *P, int fmt, const kt_matrix_layout *L,
                                                              const uint8_t *w, int64_t c0, int64_t c1, float (*c)[NR],
                                                              int load) {
    /* Named accumulators, not an array: the asm operands of FMA_BCAST would pin an array in memory. */
#define KT_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define KT_INIT(i)                                                                                  \
    zf c##i##a = ZMM(setzero_ps)(), c##i##b = ZMM(setzero_ps)();                                    \
    const float *a##i = (i) < R && !packed ? a[(i) < R ? (i) : 0] : NULL;                           \
    if ((i) < R && load) {                                                                          \
        c##i##a = ZMM(loadu_ps)(c[i]);                                                              \
        c##i##b = ZMM(loadu_ps)(c[i] + 16);                                                         \
    }
#define KT_STEP(i)                                                                                  \
    if ((i) < R && dp) {                                                                            \
        DP_BCAST(c##i##a, p0, Ap + k * R + (i));                                                    \
        DP_BCAST(c##i##b, p1, Ap + k * R + (i));                                                    \
    } else if ((i) < R) {                                                                           \
        FMA_BCAST(c##i##a, p0, packed ? Ap + k * R + (i) : a##i + k);                               \
        FMA_BCAST(c##i##b, p1, packed ? Ap + k * R + (i) : a##i + k);                               \
    }
#define KT_STORE(i)                                                                                 \
    if ((i) < R) {                                                                                  \
        ZMM(storeu_ps)(c[i], c##i##a);                                                              \
        ZMM(storeu_ps)(c[i] + 16, c##i##b);                                                         \
    }
    _Static_assert(MR == 12, "KT_ROWS lists MR rows");
    KT_ROWS(KT_INIT)
    if (fmt < 0) {
        for (int64_t k = 0; k < Kc; k++) {
            const zf p0 = ZMM(load_ps)(P + k * NR), p1 = ZMM(load_ps)(P + k * NR + 16);
            KT_ROWS(KT_STEP)
        }
    } else if (Kc > 0) {
        /* Dequantizing in the loop: row k + 1's weights are made while row k's FMAs run, so the
         * FMAs never wait on the dequantization's latency (llvm-mca, cycles per step of the 12-row
         * tile, znver4 / sapphirerapids: int4 31 / 45 -> 28 / 27 with the table lookup, int8
         * 29 / 32 -> 27 / 30, bf16 25 / 30 -> 24 / 28 with the vpermw conversion). int4: c0, c1 in one 32-block
         * (tn_avx512's c0 is a multiple of 32). */
        zf p0, p1;
        /* dp: step k is the pair of rows 2k, 2k + 1 (column_pairs; c1 > c0 where 32 columns are wanted) */
#define KT_NEXT(k, x0, x1) \
    (dp ? column_pairs(fmt, L, w, c0, c1 > c0 ? 32 : 16, (k), (x0), (x1)) : direct_pair(fmt, L, w, (k), c0, c1, (x0), (x1)))
        /* dp: the rows TN_DP_AHEAD steps on are asked into the cache (rows a page or more apart: the
         * hardware prefetchers do not follow them, and with few tokens each step waits on two misses).
         * Into L2, not L1: with 4 KiB rows (W_gu, H = 2048 bf16) the 32 lines in flight all fall in
         * one 8-way L1 set and evicted each other before use (Zen 4, bf16 pack, B3 at T = 128: T1 1.19-1.27x
         * faster than T0; at 48 tokens per expert the direct form lost to the panels with T0, 0.91x,
         * and won with T1, 1.05-1.11x; int8 / int4 packs even). */
        const int64_t cb = fmt == KT_FORMAT_BF16 ? 2 * c0 : fmt_int4(fmt) ? c0 / 2 : c0;
        KT_NEXT(0, &p0, &p1);
        int64_t k = 0;
        for (; k + 1 < Kc; k++) {
            zf n0, n1;
            if (dp && 2 * (k + TN_DP_AHEAD) + 1 < L->N) {
                _mm_prefetch((const char *)(row_of(L, w, 2 * (k + TN_DP_AHEAD)) + cb), _MM_HINT_T1);
                _mm_prefetch((const char *)(row_of(L, w, 2 * (k + TN_DP_AHEAD) + 1) + cb), _MM_HINT_T1);
            }
            KT_NEXT(k + 1, &n0, &n1);
            KT_ROWS(KT_STEP)
            p0 = n0;
            p1 = n1;
        }
        KT_ROWS(KT_STEP)
    }
    KT_ROWS(KT_STORE)
#undef KT_ROWS
#undef KT_INIT
#undef KT_STEP
#undef KT_STORE
#undef KT_NEXT
}

typedef void (*ukernel_fn)(int64_t Kc, const float *const *a, const float *P, float (*c)[NR], int load);
typedef void (*ukernel_packed_fn)(int64_t Kc, const float *Ap, const float *P, float (*c)[NR], int load);
typedef void (*ukernel_direct_fn)(int64_t N, const float *Ap, const kt_matrix_layout *L, const uint8_t *w,
                                  int64_t c0, int64_t c1, float (*c)[NR]);

/* The direct forms read the prepared operand (one tile: element (n, i) at Ap[n * R + i]), so a step's
 * broadcasts come from one pointer at constant offsets: with R separate row pointers the 12-row loop
 * ran out of general registers and spilled (llvm-mca, sapphirerapids, int4 rounded: 36 -> 28 cycles per step;
 * docs/engine.md). DP: the vdpbf16ps form (tn with a_pairs and few tokens: Ap the tile's pairs, N
 * the pair steps (N + 1) / 2, fmt bf16 / FMT_INT8_RW / FMT_INT4_RW). */
#define KT_UKERNEL_DIRECT(R, F, FMT, DP)                                                                        \
    static void ukernel_direct_##F##_##R(int64_t N, const float *Ap, const kt_matrix_layout *L,                 \
                                         const uint8_t *w, int64_t c0, int64_t c1, float (*c)[NR]) {            \
        ukernel_any(R, 1, DP, N, NULL, Ap, NULL, FMT, L, w, c0, c1, c, 0);                                   \
    }
#define KT_UKERNELS(R)                                                                                          \
    static void ukernel_##R(int64_t Kc, const float *const *a, const float *P, float (*c)[NR], int load) {      \
        ukernel_any(R, 0, 0, Kc, a, NULL, P, -1, NULL, NULL, 0, 0, c, load);                                    \
    }                                                                                                           \
    static void ukernel_packed_##R(int64_t Kc, const float *Ap, const float *P, float (*c)[NR], int load) {     \
        ukernel_any(R, 1, 0, Kc, NULL, Ap, P, -1, NULL, NULL, 0, 0, c, load);                                   \
    }                                                                                                           \
    KT_UKERNEL_DIRECT(R, bf16, KT_FORMAT_BF16, 0)                                                                  \
    KT_UKERNEL_DIRECT(R, int8, KT_FORMAT_INT8, 0)                                                                  \
    KT_UKERNEL_DIRECT(R, int4, KT_FORMAT_INT4, 0)                                                                  \
    KT_UKERNEL_DIRECT(R, int8rw, FMT_INT8_RW, 0)                                                                   \
    KT_UKERNEL_DIRECT(R, int4rw, FMT_INT4_RW, 0)                                                                   \
    KT_UKERNEL_DIRECT(R, dp_bf16, KT_FORMAT_BF16, 1)                                                               \
    KT_UKERNEL_DIRECT(R, dp_int8rw, FMT_INT8_RW, 1)                                                                \
    KT_UKERNEL_DIRECT(R, dp_int4rw, FMT_INT4_RW, 1)
KT_UKERNELS(1) KT_UKERNELS(2) KT_UKERNELS(3) KT_UKERNELS(4) KT_UKERNELS(5) KT_UKERNELS(6)
KT_UKERNELS(7) KT_UKERNELS(8) KT_UKERNELS(9) KT_UKERNELS(10) KT_UKERNELS(11) KT_UKERNELS(12)
#undef KT_UKERNELS
#undef KT_UKERNEL_DIRECT

_Static_assert(MR == 12, "the tables below list one kernel per tile height 1..MR");
static const ukernel_fn ukernels[MR + 1] = {NULL, ukernel_1, ukernel_2, ukernel_3, ukernel_4, ukernel_5,
                                            ukernel_6, ukernel_7, ukernel_8, ukernel_9, ukernel_10, ukernel_11,
                                            ukernel_12};
static const ukernel_packed_fn ukernels_packed[MR + 1] = {
    NULL, ukernel_packed_1, ukernel_packed_2, ukernel_packed_3, ukernel_packed_4, ukernel_packed_5, ukernel_packed_6,
    ukernel_packed_7, ukernel_packed_8, ukernel_packed_9, ukernel_packed_10, ukernel_packed_11, ukernel_packed_12};
#define KT_DIRECT_TABLE(F)                                                                                      \
    {NULL, ukernel_direct_##F##_1, ukernel_direct_##F##_2, ukernel_direct_##F##_3, ukernel_direct_##F##_4,      \
     ukernel_direct_##F##_5, ukernel_direct_##F##_6, ukernel_direct_##F##_7, ukernel_direct_##F##_8,            \
     ukernel_direct_##F##_9, ukernel_direct_##F##_10, ukernel_direct_##F##_11, ukernel_direct_##F##_12}
static const ukernel_direct_fn ukernels_direct[FMT_COUNT][MR + 1] = {
    [KT_FORMAT_BF16] = KT_DIRECT_TABLE(bf16), [KT_FORMAT_INT8] = KT_DIRECT_TABLE(int8),
    [KT_FORMAT_INT4] = KT_DIRECT_TABLE(int4), [FMT_INT8_RW] = KT_DIRECT_TABLE(int8rw),
    [FMT_INT4_RW] = KT_DIRECT_TABLE(int4rw)};
static const ukernel_direct_fn ukernels_direct_dp[FMT_COUNT][MR + 1] = {
    [KT_FORMAT_BF16] = KT_DIRECT_TABLE(dp_bf16), [FMT_INT8_RW] = KT_DIRECT_TABLE(dp_int8rw),
    [FMT_INT4_RW] = KT_DIRECT_TABLE(dp_int4rw)};
#undef KT_DIRECT_TABLE

/* Tile t of M rows split into ceil(M / MR) tiles of near-equal height (no tile of 1-3 rows when it
 * can be avoided: those would wait on the FMA latency). */
static inline void tile_of_height(int64_t M, int64_t height, int64_t t, int64_t *m0, int64_t *rows) {
    const int64_t n = (M + height - 1) / height, base = M / n, extra = M % n;
    *m0 = t * base + (t < extra ? t : extra);
    *rows = base + (t < extra);
}
static inline void tile_of(int64_t M, int64_t t, int64_t *m0, int64_t *rows) { tile_of_height(M, MR, t, m0, rows); }

/* Rows [first, last) of tiles [t0, t1) of tile_of(M). */
static inline void tiles_span(int64_t M, int64_t t0, int64_t t1, int64_t *first, int64_t *last) {
    int64_t rows;
    tile_of(M, t0, first, &rows);
    tile_of(M, t1 - 1, last, &rows);
    *last += rows;
}

/* ---- blocking and write-back ---------------------------------------------------------------- */

/* Cache blocking: a KC-deep slice of the panel (KC * 32 floats = 32 KB) stays in L1 while the
 * tiles of up to MC tokens walk over it; their partial sums wait in a small C buffer. */
#ifndef KC
#define KC 256
#endif
#define MC 96

/* out[m][col .. col+width) (+)= alpha[m] * (cs[j] * c[i][j]) for the tile rows i of tokens m = m0 + i
 * (cs: per-column scales, NULL for none). */
static void write_tile_scaled(const kt_gemm *g, int64_t m0, int64_t rows, float (*c)[NR], int64_t col, int64_t width,
                              const float *cs) {
    float ones[NR];
    if (!cs) {
        for (int j = 0; j < NR; j++) ones[j] = 1.0f;
        cs = ones;
    }
    for (int64_t i = 0; i < rows; i++) {
        const float *acc = c[i];
        float *o = g->out_rows[m0 + i] + col;
        const float s = g->alpha ? g->alpha[m0 + i] : 1.0f;
        if (width == NR) {
            zf v0 = ZMM(mul_ps)(ZMM(mul_ps)(ZMM(loadu_ps)(acc), ZMM(loadu_ps)(cs)), ZMM(set1_ps)(s));
            zf v1 = ZMM(mul_ps)(ZMM(mul_ps)(ZMM(loadu_ps)(acc + 16), ZMM(loadu_ps)(cs + 16)), ZMM(set1_ps)(s));
            if (g->accumulate) {
                v0 = ZMM(add_ps)(v0, ZMM(loadu_ps)(o));
                v1 = ZMM(add_ps)(v1, ZMM(loadu_ps)(o + 16));
            }
            ZMM(storeu_ps)(o, v0);
            ZMM(storeu_ps)(o + 16, v1);
        } else {
            for (int64_t j = 0; j < width; j++) o[j] = g->accumulate ? o[j] + (cs[j] * acc[j]) * s : (cs[j] * acc[j]) * s;
        }
    }
}

static void write_tile(const kt_gemm *g, int64_t m0, int64_t rows, float (*c)[NR], int64_t col, int64_t width) {
    write_tile_scaled(g, m0, rows, c, col, width, NULL);
}

/* Runs the micro-kernel over all M rows for one panel (contraction length Kc) and writes columns
 * [col, col+width) of the outputs (col relative to the output rows). */
static void panel_times_rows(const kt_gemm *g, const float *P, int64_t Kc, int64_t col, int64_t width,
                             float (*cbuf)[NR]) {
    for (int64_t mc = 0; mc < g->M; mc += MC) {
        const int64_t mlen = g->M - mc < MC ? g->M - mc : MC, tiles = (mlen + MR - 1) / MR;
        for (int64_t k0 = 0; k0 < Kc; k0 += KC) {
            const int64_t kl = Kc - k0 < KC ? Kc - k0 : KC;
            for (int64_t t = 0; t < tiles; t++) {
                int64_t m0, rows;
                tile_of(mlen, t, &m0, &rows);
                const float *a[MR];
                for (int i = 0; i < rows; i++) a[i] = (const float *)g->a_rows[mc + m0 + i] + k0;
                ukernels[rows](kl, a, P + k0 * NR, cbuf + m0, k0 > 0);
            }
        }
        write_tile(g, mc, mlen, cbuf, col, width);
    }
}

/* The same over the job's prepared operand (kt_gemm.a_f32, pack_f32_avx512 below): tile t of
 * tile_of(M) at a_f32 + m0 * Cr, its rows' elements k at k * rows + i, so a step's broadcasts read
 * one contiguous run instead of `rows` separate streams. Tiles go MC / MR at a time (the C buffer);
 * each output's sum runs over k in the same order as above, so the results are the same bits. */
static void panel_times_packed(const kt_gemm *g, const float *P, int64_t Kc, int64_t Cr, int64_t col, int64_t width,
                               float (*cbuf)[NR]) {
    const int64_t tiles = (g->M + MR - 1) / MR;
    for (int64_t t0 = 0; t0 < tiles; t0 += MC / MR) {
        const int64_t t1 = tiles - t0 < MC / MR ? tiles : t0 + MC / MR;
        int64_t first, last, rows;
        tiles_span(g->M, t0, t1, &first, &last);
        for (int64_t k0 = 0; k0 < Kc; k0 += KC) {
            const int64_t kl = Kc - k0 < KC ? Kc - k0 : KC;
            for (int64_t t = t0; t < t1; t++) {
                int64_t m0;
                tile_of(g->M, t, &m0, &rows);
                ukernels_packed[rows](kl, g->a_f32 + m0 * Cr + k0 * rows, P + k0 * NR, cbuf + (m0 - first), k0 > 0);
            }
        }
        write_tile(g, first, last - first, cbuf, col, width);
    }
}

/* The prepared operands' stores, after a 16 x 16 transpose: vector r[j]'s first R lanes (one column of
 * a tile of R rows) to d + (j0 + j) * R, j < 16, in a tile of n * R words. Full 16-lane stores, whose
 * extra lanes the next stores overwrite, except where 16 lanes would pass the tile's end (those copy
 * R lanes only, so nothing is written past the tile). */
static inline void store_tile_columns(float *d, int64_t j0, int64_t R, int64_t n, const zf r[16]) {
    for (int j = 0; j < 16; j++) {
        if ((j0 + j) * R + 16 <= n * R) {
            ZMM(storeu_ps)(d + (j0 + j) * R, r[j]);
        } else {
            float last[16];
            ZMM(storeu_ps)(last, r[j]);
            memcpy(d + (j0 + j) * R, last, sizeof(float) * (size_t)R);
        }
    }
}

/* ---- bf16 pairs: vdpbf16ps ------------------------------------------------------------------ */

/* The bf16 compute mode can also run on vdpbf16ps, which adds two bf16 products per fp32 lane:
 * acc[j] += a[2q] w[2q][j] + a[2q+1] w[2q+1][j] (each product is exact in fp32; the hardware adds the
 * odd one first and flushes denormals). Used where this core runs it faster than zmm FMAs
 * (kt_bf16_dot, measured at start-up: Zen 4 2.0x -- its zmm FMA is two 256-bit halves, its
 * vdpbf16ps one zmm per cycle -- while the Xeons without AMX measured 0.5x); same 12 x 32 tile,
 * half the steps, with panels of bf16 pairs -- one 32-bit word per pair of the contraction -- and
 * the job's operand in the same pairs (pack_pairs_avx512). Every pack format, each exact to the
 * bf16 mode's definition (docs/formats.md):
 *   nt: P[q][j] = (W[n0+j][2q], W[n0+j][2q+1]) as stored (bf16), or the integer quants (int8) / q - 8
 *       (int4), exact in bf16; the scales factor out of the sum: int8's row scale is applied to each
 *       output when it is written (write_tile's column scales), int4's 32-block scales per block of
 *       16 pair steps (ukernel_dp_fold: c += s_b * block sum, one FMA per accumulator, in registers).
 *   tn: P[q][j] = (W'[2q][c0+j], W'[2q+1][c0+j]), two rows' elements interleaved; bf16 as stored,
 *       int8 / int4 the dequantized weights rounded to bf16 (round_w: the backward's definition). */

typedef void (*ukernel_dp_fn)(int64_t Kp, const uint32_t *Ap, const uint32_t *P, float (*c)[NR], int load);
#define KT_UKERNEL_DP(R)                                                                                      \
    static void ukernel_dp_##R(int64_t Kp, const uint32_t *Ap, const uint32_t *P, float (*c)[NR], int load) { \
        ukernel_any(R, 1, 1, Kp, NULL, (const float *)Ap, (const float *)P, -1, NULL, NULL, 0, 0, c, load); \
    }
KT_UKERNEL_DP(1) KT_UKERNEL_DP(2) KT_UKERNEL_DP(3) KT_UKERNEL_DP(4) KT_UKERNEL_DP(5) KT_UKERNEL_DP(6)
KT_UKERNEL_DP(7) KT_UKERNEL_DP(8) KT_UKERNEL_DP(9) KT_UKERNEL_DP(10) KT_UKERNEL_DP(11) KT_UKERNEL_DP(12)
#undef KT_UKERNEL_DP
static const ukernel_dp_fn ukernels_dp[MR + 1] = {NULL, ukernel_dp_1, ukernel_dp_2, ukernel_dp_3, ukernel_dp_4,
                                                  ukernel_dp_5, ukernel_dp_6, ukernel_dp_7, ukernel_dp_8,
                                                  ukernel_dp_9, ukernel_dp_10, ukernel_dp_11, ukernel_dp_12};

/* Pair steps per int4 32-block */
#define PAIRS_PER_BLOCK (KT_INT4_BLOCK / 2)
_Static_assert(PAIRS_PER_BLOCK == 16, "an int4 block is one 16-word step of the pair panels");

/* The high 16 bits of 32 fp32 values v0 (elements 0..15), v1 (16..31) in order: 16 words, word i =
 * (element 2i, element 2i + 1), the bf16 pairs (exact where the values are bf16). */
static inline zi pairs_of(zf v0, zf v1) {
    const zi odd = ZMM(set_epi16)(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25, 23,
                                  21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    return ZMM(permutex2var_epi16)(ZMM(castps_si512)(v0), odd, ZMM(castps_si512)(v1));
}

/* int4 weights' 32-block fold in registers: up to 6 rows of a tile (its operand at Ap, stride words
 * per pair step) over Kp pair steps of the panel P, block scales S (one NR row per 16 steps). Per
 * block, 12 zmm block sums run from zero over its 16 steps and fold into 12 zmm totals (t +=
 * s_b * sum, one FMA each), which stay in registers for the whole slice (c loaded first when load,
 * stored once at the end). The 12-row tile cannot: its 24 block sums and 24 totals need 48
 * registers, so it stored and reloaded every total per block (24 loads, FMAs and stores per 384
 * vdpbf16ps: the int4 product ran at 77% of one Zen 4 core's peak against int8's 88%). Same FMAs in
 * the same order as that form (a total starts at 0 or the loaded c), so the same bits. */
static inline __attribute__((always_inline)) void ukernel_dp_fold_any(int R, int64_t Kp, const uint32_t *Ap,
                                                                      int64_t stride, const uint32_t *P,
                                                                      float (*c)[NR], int load, const float *S) {
#define KF_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define KF_INIT(i)                                                                                  \
    zf t##i##a = ZMM(setzero_ps)(), t##i##b = ZMM(setzero_ps)();                                    \
    if ((i) < R && load) {                                                                          \
        t##i##a = ZMM(loadu_ps)(c[i]);                                                              \
        t##i##b = ZMM(loadu_ps)(c[i] + 16);                                                         \
    }
#define KF_ZERO(i) zf s##i##a = ZMM(setzero_ps)(), s##i##b = ZMM(setzero_ps)();
#define KF_STEP(i)                                                                                  \
    if ((i) < R) {                                                                                  \
        DP_BCAST(s##i##a, p0, Ap + k * stride + (i));                                               \
        DP_BCAST(s##i##b, p1, Ap + k * stride + (i));                                               \
    }
#define KF_FOLD(i)                                                                                  \
    if ((i) < R) {                                                                                  \
        t##i##a = ZMM(fmadd_ps)(s##i##a, b0, t##i##a);                                              \
        t##i##b = ZMM(fmadd_ps)(s##i##b, b1, t##i##b);                                              \
    }
#define KF_STORE(i)                                                                                 \
    if ((i) < R) {                                                                                  \
        ZMM(storeu_ps)(c[i], t##i##a);                                                              \
        ZMM(storeu_ps)(c[i] + 16, t##i##b);                                                         \
    }
    KF_ROWS(KF_INIT)
    for (int64_t kb = 0; kb < Kp; kb += PAIRS_PER_BLOCK) {
        const int64_t ke = Kp - kb < PAIRS_PER_BLOCK ? Kp : kb + PAIRS_PER_BLOCK;
        KF_ROWS(KF_ZERO)
        for (int64_t k = kb; k < ke; k++) {
            const zf p0 = ZMM(load_ps)((const float *)P + k * NR), p1 = ZMM(load_ps)((const float *)P + k * NR + 16);
            KF_ROWS(KF_STEP)
        }
        const zf b0 = ZMM(loadu_ps)(S + kb / PAIRS_PER_BLOCK * NR), b1 = ZMM(loadu_ps)(S + kb / PAIRS_PER_BLOCK * NR + 16);
        KF_ROWS(KF_FOLD)
    }
    KF_ROWS(KF_STORE)
#undef KF_ROWS
#undef KF_INIT
#undef KF_ZERO
#undef KF_STEP
#undef KF_FOLD
#undef KF_STORE
}
#define FOLD_MR 6
typedef void (*ukernel_fold_fn)(int64_t Kp, const uint32_t *Ap, int64_t stride, const uint32_t *P, float (*c)[NR],
                                int load, const float *S);
#define KT_UKERNEL_FOLD(R)                                                                                    \
    static void ukernel_dp_fold_##R(int64_t Kp, const uint32_t *Ap, int64_t stride, const uint32_t *P,         \
                                    float (*c)[NR], int load, const float *S) {                               \
        ukernel_dp_fold_any(R, Kp, Ap, stride, P, c, load, S);                                                \
    }
KT_UKERNEL_FOLD(1) KT_UKERNEL_FOLD(2) KT_UKERNEL_FOLD(3) KT_UKERNEL_FOLD(4) KT_UKERNEL_FOLD(5) KT_UKERNEL_FOLD(6)
#undef KT_UKERNEL_FOLD
static const ukernel_fold_fn ukernels_dp_fold[FOLD_MR + 1] = {NULL, ukernel_dp_fold_1, ukernel_dp_fold_2,
                                                              ukernel_dp_fold_3, ukernel_dp_fold_4,
                                                              ukernel_dp_fold_5, ukernel_dp_fold_6};

/* Words q .. q + 16 of row n (q a multiple of 16): elements 2q .. 2q + 32 as bf16 pairs; int8 its
 * quants, int4 q - 8 (one 32-block), without the scales. */
static inline __attribute__((always_inline)) zi row_pairs16(int fmt, const kt_matrix_layout *L, const uint8_t *mat,
                                                            int64_t n, int64_t q) {
    const uint8_t *row = row_of(L, mat, n);
    if (fmt == KT_FORMAT_BF16) return ZMM(loadu_si512)(row + 4 * q);
    if (fmt == KT_FORMAT_INT8) return pairs_of(cvt_ps(load_i8x16(row + 2 * q)), cvt_ps(load_i8x16(row + 2 * q + 16)));
    const zf ints = ZMM(setr_ps)(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const zi bytes = load_u8x16(row + (q / PAIRS_PER_BLOCK) * (KT_INT4_BLOCK / 2));
    return pairs_of(ZMM(permutexvar_ps)(bytes, ints), ZMM(permutexvar_ps)(ZMM(srli_epi32)(bytes, 4), ints));
}

/* nt: P[q - qb][j] = word q of row n0 + j, q in [qb, qe) (multiples of 16, qe <= K_pad / 2), rows
 * past N zero; int4 also S[(q - qb) / 16][j] = the scale of row n0 + j's block q / 16 (0 past N). */
static inline __attribute__((always_inline)) void panel_rows_pairs_fmt(int fmt, const kt_matrix_layout *L,
                                                                       const uint8_t *mat, int64_t n0, int64_t qb,
                                                                       int64_t qe, uint32_t *P, float *S) {
    const int64_t rows = L->N - n0 < NR ? L->N - n0 : NR;
    for (int64_t q = qb; q < qe; q += 16)
        for (int half = 0; half < 2; half++) {
            zf r[16];
            for (int i = 0; i < 16; i++) {
                const int64_t j = half * 16 + i;
                r[i] = j < rows ? ZMM(castsi512_ps)(row_pairs16(fmt, L, mat, n0 + j, q)) : ZMM(setzero_ps)();
                if (fmt == KT_FORMAT_INT4)
                    S[(q - qb) / PAIRS_PER_BLOCK * NR + j] = j < rows ? int4_scale(L, mat, n0 + j, q / PAIRS_PER_BLOCK) : 0.0f;
            }
            transpose16(r);
            for (int i = 0; i < 16; i++) ZMM(store_ps)((float *)P + (q - qb + i) * NR + half * 16, r[i]);
        }
}

static void panel_rows_pairs(const kt_matrix_layout *L, const uint8_t *mat, int64_t n0, int64_t qb, int64_t qe,
                             uint32_t *P, float *S) {
    switch (L->format) {
    case KT_FORMAT_BF16: panel_rows_pairs_fmt(KT_FORMAT_BF16, L, mat, n0, qb, qe, P, S); break;
    case KT_FORMAT_INT8: panel_rows_pairs_fmt(KT_FORMAT_INT8, L, mat, n0, qb, qe, P, S); break;
    default: panel_rows_pairs_fmt(KT_FORMAT_INT4, L, mat, n0, qb, qe, P, S); break;
    }
}

/* tn: P[q - qb][j] = (W'[2q][c0 + j], W'[2q + 1][c0 + j]) for q in [qb, qe), j < 32 (column_pairs). */
static inline __attribute__((always_inline)) void panel_columns_pairs_fmt(int fmt, const kt_matrix_layout *L,
                                                                          const uint8_t *mat, int64_t c0, int64_t width,
                                                                          int64_t qb, int64_t qe, uint32_t *P) {
    for (int64_t q = qb; q < qe; q++) {
        zf p0, p1;
        column_pairs(fmt, L, mat, c0, width, q, &p0, &p1);
        ZMM(store_ps)((float *)P + (q - qb) * NR, p0);
        ZMM(store_ps)((float *)P + (q - qb) * NR + 16, p1);
    }
}

/* fmt: tn_fmt(g) */
static void panel_columns_pairs(int fmt, const kt_matrix_layout *L, const uint8_t *mat, int64_t c0, int64_t width,
                                int64_t qb, int64_t qe, uint32_t *P) {
    switch (fmt) {
    case KT_FORMAT_BF16: panel_columns_pairs_fmt(KT_FORMAT_BF16, L, mat, c0, width, qb, qe, P); break;
    case FMT_INT8_RW: panel_columns_pairs_fmt(FMT_INT8_RW, L, mat, c0, width, qb, qe, P); break;
    default: panel_columns_pairs_fmt(FMT_INT4_RW, L, mat, c0, width, qb, qe, P); break;
    }
}

/* The k-outer form over the prepared operand, for tasks several panels wide: per group of tiles (at
 * most MG tokens), per KC slice of the contraction, per 32 outputs of the task, that panel slice is
 * built (KC x 32 floats, in L1) and every tile of the group runs over it; the group's partial sums
 * for all the task's outputs wait in C blocks (MG x 32 floats each, L2). So the group's operand slice
 * (MG x KC floats) is read from L2 once per panel while panel_times_packed reads the whole operand
 * (M x K floats, 1.5 MB for 192 tokens at K = 2048: more than L2 holds next to everything else) once
 * per panel. The sums run in the same order (KC slices ascending, partial sums stored and reloaded
 * exactly), so the results are the same bits. */
/* Bytes of a row's quants from element k (a multiple of 32) on. */
static inline int64_t quant_bytes(int fmt, int64_t k) {
    return fmt == KT_FORMAT_BF16 ? 2 * k : fmt == KT_FORMAT_INT8 ? k : k / 2;
}

/* Part `part` of `parts` of the weight bytes the panel slice (outputs c0.., contraction [k0, k0+kl))
 * will read, asked into the cache while the current slice's tiles run. A slice reads 32 rows x kl
 * elements (nt) or kl rows x 32 elements (tn): short runs a row apart, which the hardware prefetchers
 * do not follow (the panels took ~15% of the k-outer form's time without this). */
static inline void prefetch_slice(const kt_gemm *g, int tn, int64_t c0, int64_t k0, int64_t kl, int64_t part,
                                  int64_t parts) {
    const kt_matrix_layout *L = g->L;
    const int fmt = L->format;
    if (tn) {
        int64_t n1 = k0 + (part + 1) * kl / parts;
        if (n1 > L->N) n1 = L->N; /* a pair slice's last row may be padding */
        for (int64_t n = k0 + part * kl / parts; n < n1; n++)
            _mm_prefetch((const char *)(row_of(L, g->w, n) + quant_bytes(fmt, c0)), _MM_HINT_T0);
    } else {
        const int64_t rows = L->N - c0 < NR ? L->N - c0 : NR, r1 = (part + 1) * rows / parts;
        const int64_t b0 = quant_bytes(fmt, k0), b1 = quant_bytes(fmt, k0 + kl);
        for (int64_t r = part * rows / parts; r < r1; r++)
            for (int64_t b = b0; b < b1; b += 64) _mm_prefetch((const char *)(row_of(L, g->w, c0 + r) + b), _MM_HINT_T0);
    }
}

#define MG 252 /* 21 tiles: one group for up to 252 tokens; operand slice + C blocks 504 KB (L2) */
#define KO_BLOCKS 8 /* C blocks of 32 outputs: tasks up to 256 wide (TASK_WIDTH) */
#define TASK_WIDTH 256
_Static_assert(KO_BLOCKS * NR >= TASK_WIDTH, "the k-outer form holds a whole task's C blocks");
/* With fewer tokens per expert the operand fits L2 anyway and nt keeps the panel-at-a-time form:
 * its panels read 32 whole weight rows as streams, the k-outer form 32 short runs per slice. */
#ifndef KO_NT_MIN_M
#define KO_NT_MIN_M 96
#endif
/* dp: the operand and panels are bf16 pairs (a_pairs, vdpbf16ps); Kc, Cr and the slices count pairs.
 * With int4 weights in nt, each slice's 32-block scales wait in S (KC / 16 x 32 floats) and every
 * tile folds its sums block by block; with int8 weights in nt the row scales apply as the outputs
 * are written. */
static void kouter_packed(const kt_gemm *g, int tn, int dp, int64_t Kc, int64_t Cr, float *P, float (*cblk)[NR]) {
    const int64_t tiles = (g->M + MR - 1) / MR, nblk = (g->hi - g->lo + NR - 1) / NR;
    const int fmt = g->L->format;
    const int fold4 = dp && !tn && fmt == KT_FORMAT_INT4, scale8 = dp && !tn && fmt == KT_FORMAT_INT8;
    float *S = (float *)(cblk + KO_BLOCKS * MG); /* fold4's block scales */
    const int64_t groups = (tiles + MG / MR - 1) / (MG / MR); /* near-equal: 17 tiles are 9 + 8, not 16 + 1 */
    assert(nblk <= KO_BLOCKS);
    for (int64_t gi = 0; gi < groups; gi++) {
        const int64_t t0 = gi * tiles / groups, t1 = (gi + 1) * tiles / groups;
        int64_t first, last, rows;
        tiles_span(g->M, t0, t1, &first, &last);
        for (int64_t k0 = 0; k0 < Kc; k0 += KC) {
            const int64_t kl = Kc - k0 < KC ? Kc - k0 : KC;
            for (int64_t b = 0; b < nblk; b++) {
                const int64_t c0 = g->lo + b * NR, width = g->hi - c0 < NR ? g->hi - c0 : NR;
                if (dp && tn) panel_columns_pairs(tn_fmt(g), g->L, g->w, c0, width, k0, k0 + kl, (uint32_t *)P);
                else if (dp) panel_rows_pairs(g->L, g->w, c0, k0, k0 + ((kl + 15) & ~(int64_t)15), (uint32_t *)P, S);
                else if (tn) panel_columns(tn_fmt(g), g->L, g->w, c0, width, k0, k0 + kl, P);
                else panel_rows_transposed(g->L, g->w, c0, k0, k0 + ((kl + 31) & ~(int64_t)31), P);
                /* the next slice: the next 32 outputs, else the first of the next KC slice */
                const int64_t nb = b + 1 < nblk ? b + 1 : 0, nk0 = b + 1 < nblk ? k0 : k0 + KC;
                const int64_t nkl = Kc - nk0 < KC ? Kc - nk0 : KC;
                for (int64_t t = t0; t < t1; t++) {
                    int64_t m0;
                    tile_of(g->M, t, &m0, &rows);
                    if (nk0 < Kc) prefetch_slice(g, tn, g->lo + nb * NR, nk0 << dp, nkl << dp, t - t0, t1 - t0);
                    if (fold4) /* the 32-blocks folded in registers, FOLD_MR rows of the tile at a time */
                        for (int64_t i0 = 0; i0 < rows; i0 += FOLD_MR)
                            ukernels_dp_fold[rows - i0 < FOLD_MR ? rows - i0 : FOLD_MR](
                                kl, g->a_pairs + m0 * Cr + k0 * rows + i0, rows, (const uint32_t *)P,
                                cblk + b * MG + (m0 - first) + i0, k0 > 0, S);
                    else if (dp)
                        ukernels_dp[rows](kl, g->a_pairs + m0 * Cr + k0 * rows, (const uint32_t *)P,
                                          cblk + b * MG + (m0 - first), k0 > 0);
                    else
                        ukernels_packed[rows](kl, g->a_f32 + m0 * Cr + k0 * rows, P, cblk + b * MG + (m0 - first),
                                              k0 > 0);
                }
            }
        }
        for (int64_t b = 0; b < nblk; b++) {
            const int64_t c0 = g->lo + b * NR, width = g->hi - c0 < NR ? g->hi - c0 : NR;
            float cs[NR];
            for (int64_t j = 0; scale8 && j < width; j++) cs[j] = int8_scale(g->L, g->w, c0 + j);
            write_tile_scaled(g, first, last - first, cblk + b * MG, c0 - g->lo, width, scale8 ? cs : NULL);
        }
    }
}

/* Rows (M x C fp32) -> the prepared operands: per tile of tile_of(M) (R <= MR rows, from m0), with
 * Cr = C rounded up to 32 columns, zero past C,
 *   fp32 (pack_f32_avx512, panel_times_packed / the k-outer form): element (k, i) at dst[m0 * Cr + k * R + i];
 *   pairs (pack_pairs_avx512, vdpbf16ps; the rows hold bf16-exact values): word (q, i) = (bf16 of
 *   rows[m0+i][2q], of rows[m0+i][2q+1]) at dst[m0 * Cr / 2 + q * R + i] (KT_PAIRS_TILES), or in
 *   blocks of 16 rows, m0 = 16 b and the stride 16 whatever R, rows past M zero (KT_PAIRS_LANES,
 *   nt_lanes).
 * 16 words at a time: R rows loaded (zero-padded past C), transposed in registers, and the first R
 * lanes of each column stored (store_tile_columns). */
static inline __attribute__((always_inline)) void pack_tiles(int pairs, int lanes, const float *const *rows, int64_t M,
                                                             int64_t C, float *dst) {
    const int64_t Cr = (C + 31) & ~(int64_t)31, n = pairs ? Cr / 2 : Cr, step = pairs ? 32 : 16;
    const int64_t tiles = lanes ? (M + 15) / 16 : (M + MR - 1) / MR;
    for (int64_t t = 0; t < tiles; t++) {
        int64_t m0, R;
        if (lanes) m0 = 16 * t, R = M - m0 < 16 ? M - m0 : 16;
        else tile_of(M, t, &m0, &R);
        float *d = dst + m0 * n;
        for (int64_t c = 0; c < Cr; c += step) {
            zf r[16];
            for (int i = 0; i < 16; i++) {
                if (i >= R || c >= C) {
                    r[i] = ZMM(setzero_ps)();
                    continue;
                }
                float tail[32];
                const float *src = rows[m0 + i] + c;
                if (c + step > C) {
                    memset(tail, 0, sizeof tail);
                    memcpy(tail, src, sizeof(float) * (size_t)(C - c));
                    src = tail;
                }
                /* pairs: the high 16 bits of each value (exact: the values are bf16) */
                r[i] = pairs ? ZMM(castsi512_ps)(pairs_of(ZMM(loadu_ps)(src), ZMM(loadu_ps)(src + 16))) : ZMM(loadu_ps)(src);
            }
            transpose16(r);
            store_tile_columns(d, pairs ? c / 2 : c, lanes ? 16 : R, n, r);
        }
    }
}

static void pack_f32_avx512(const float *const *rows, int64_t M, int64_t C, float *dst) {
    pack_tiles(0, 0, rows, M, C, dst);
}

static void pack_pairs_avx512(const float *const *rows, int64_t M, int64_t C, int layout, uint32_t *dst) {
    if (layout == KT_PAIRS_LANES) pack_tiles(1, 1, rows, M, C, (float *)dst);
    else pack_tiles(1, 0, rows, M, C, (float *)dst);
}

/* ---- nt: the forward direction -------------------------------------------------------------- */

/* Dot form for few tokens (no panel): a tile of tokens x 4 weight rows of 16-lane partial sums, the
 * weights dequantized in registers as they stream from L1, one horizontal sum per output at the end.
 * The token rows are first copied, zero-padded to Kr, into A (bf16: each 32-block split into its
 * even and odd elements, matching the weights' split, one instruction per 16 weights).
 *   bf16: 4 tokens, 32-column steps (8 weight vectors live; the split costs nothing on port 0).
 *   int8: up to 6 tokens (M split into near-equal tiles), 16-column steps: each of the 4 converted
 *         weight vectors (vcvtdq2ps, port 0 on Intel cores, like the FMAs) serves 6 tokens, not 4
 *         (llvm-mca, sapphirerapids: 80% -> 86% of the FMA bound). It sums the integer quants and
 *         applies the row scale once per output; every output's sum runs in the same order either
 *         way (k ascending, lane k % 16).
 * int4's unpacking costs more than the panel it would save, so int4 always builds panels. */
#define DOT_MR 4
#define DOT_NR 4
#define DOT8_MR 6

/* int8: c[i][r] = 16-lane partial sums of A's rows i < R times weight rows w[r], over Kr columns. */
static inline __attribute__((always_inline)) void dot_int8_tile(int R, const uint8_t *const *w, const float *a,
                                                                int64_t Kr, zf c[DOT8_MR][DOT_NR]) {
    for (int i = 0; i < R; i++)
        for (int r = 0; r < DOT_NR; r++) c[i][r] = ZMM(setzero_ps)();
    for (int64_t k = 0; k < Kr; k += 16) {
        zf wv[DOT_NR];
        for (int r = 0; r < DOT_NR; r++) wv[r] = cvt_ps(load_i8x16(w[r] + k));
        for (int i = 0; i < R; i++) {
            const zf x = ZMM(load_ps)(a + i * Kr + k);
            for (int r = 0; r < DOT_NR; r++) c[i][r] = ZMM(fmadd_ps)(x, wv[r], c[i][r]);
        }
    }
}

static void dot_int8(int R, const uint8_t *const *w, const float *a, int64_t Kr, zf c[DOT8_MR][DOT_NR]) {
    _Static_assert(DOT8_MR == 6, "one case per tile height");
    switch (R) {
    case 1: dot_int8_tile(1, w, a, Kr, c); break;
    case 2: dot_int8_tile(2, w, a, Kr, c); break;
    case 3: dot_int8_tile(3, w, a, Kr, c); break;
    case 4: dot_int8_tile(4, w, a, Kr, c); break;
    case 5: dot_int8_tile(5, w, a, Kr, c); break;
    default: dot_int8_tile(6, w, a, Kr, c); break;
    }
}

static inline __attribute__((always_inline)) void nt_dot_fmt(int fmt, const kt_gemm *g, float *A) {
    const kt_matrix_layout *L = g->L;
    const int64_t K = L->K, Kr = (K + 31) & ~(int64_t)31, Mr = (g->M + DOT_MR - 1) / DOT_MR * DOT_MR;
    const zi even = ZMM(setr_epi32)(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const zi odd = ZMM(add_epi32)(even, ZMM(set1_epi32)(1));
    for (int64_t m = 0; m < (fmt == KT_FORMAT_BF16 ? Mr : g->M); m++) {
        float *d = A + m * Kr;
        if (m >= g->M) {
            memset(d, 0, sizeof(float) * (size_t)Kr);
            continue;
        }
        const float *s = g->a_rows[m];
        if (fmt != KT_FORMAT_BF16) {
            memcpy(d, s, sizeof(float) * (size_t)K);
            memset(d + K, 0, sizeof(float) * (size_t)(Kr - K));
            continue;
        }
        for (int64_t k = 0; k < Kr; k += 32) {
            float tail[32];
            const float *src = s + k;
            if (k + 32 > K) { /* the last, partial block: zero-padded copy */
                memset(tail, 0, sizeof tail);
                memcpy(tail, s + k, sizeof(float) * (size_t)(K - k));
                src = tail;
            }
            const zf lo = ZMM(loadu_ps)(src), hi = ZMM(loadu_ps)(src + 16);
            ZMM(store_ps)(d + k, ZMM(permutex2var_ps)(lo, even, hi));
            ZMM(store_ps)(d + k + 16, ZMM(permutex2var_ps)(lo, odd, hi));
        }
    }
    const zi hi16 = ZMM(set1_epi32)((int)0xffff0000u);
    const int64_t tiles8 = (g->M + DOT8_MR - 1) / DOT8_MR;
    for (int64_t n0 = g->lo; n0 < g->hi; n0 += DOT_NR) {
        const uint8_t *w[DOT_NR];
        for (int r = 0; r < DOT_NR; r++) w[r] = row_of(L, g->w, n0 + r < g->hi ? n0 + r : g->hi - 1);
        for (int64_t t = 0; t < (fmt == KT_FORMAT_BF16 ? Mr / DOT_MR : tiles8); t++) {
            int64_t m0 = t * DOT_MR, rows = DOT_MR;
            zf c[DOT8_MR][DOT_NR];
            if (fmt == KT_FORMAT_INT8) {
                tile_of_height(g->M, DOT8_MR, t, &m0, &rows);
                dot_int8((int)rows, w, A + m0 * Kr, Kr, c);
            } else {
                const float *a = A + m0 * Kr;
                for (int i = 0; i < DOT_MR; i++)
                    for (int r = 0; r < DOT_NR; r++) c[i][r] = ZMM(setzero_ps)();
                for (int64_t k = 0; k < Kr; k += 32) {
                    zf w0[DOT_NR], w1[DOT_NR];
                    for (int r = 0; r < DOT_NR; r++) {
                        const zi v = ZMM(loadu_si512)(w[r] + 2 * k);
                        w0[r] = ZMM(castsi512_ps)(ZMM(slli_epi32)(v, 16));
                        w1[r] = ZMM(castsi512_ps)(ZMM(and_si512)(v, hi16));
                    }
                    for (int i = 0; i < DOT_MR; i++) {
                        const zf x0 = ZMM(load_ps)(a + i * Kr + k), x1 = ZMM(load_ps)(a + i * Kr + k + 16);
                        for (int r = 0; r < DOT_NR; r++) {
                            c[i][r] = ZMM(fmadd_ps)(x0, w0[r], c[i][r]);
                            c[i][r] = ZMM(fmadd_ps)(x1, w1[r], c[i][r]);
                        }
                    }
                }
            }
            for (int i = 0; i < rows && m0 + i < g->M; i++) {
                const float s = g->alpha ? g->alpha[m0 + i] : 1.0f;
                float *o = g->out_rows[m0 + i] + (n0 - g->lo);
                for (int r = 0; r < DOT_NR && n0 + r < g->hi; r++) {
                    float v = hsum16(c[i][r]);
                    if (fmt == KT_FORMAT_INT8) v *= int8_scale(L, g->w, n0 + r);
                    v *= s;
                    o[r] = g->accumulate ? o[r] + v : v;
                }
            }
        }
    }
}

/* Up to this many tokens per expert the forward uses the dot form for bf16 and int8 weights
 * (measured on one Emerald Rapids core, N=2816, K=2048, 32-row tasks: dot ~80 GFLOP/s flat for
 * M = 4..16; panels 32 at M=4, 58 at 8, 72 at 12, 88 at 16). Not with vdpbf16ps pairs (a_pairs):
 * those panels run every token count (nt_avx512, tn_avx512). */
#ifndef NT_DOT_MAX_M
#define NT_DOT_MAX_M 12
#endif

/* ---- nt, bf16 pack, vdpbf16ps: tokens in the lanes ----------------------------------------- */

/* The forward's panels rebuild, per KC slice and 32 outputs, what a bf16 pack already holds: a weight
 * row's pairs (W[n][2q], W[n][2q+1]) are consecutive 32-bit words of the stored row. With the roles
 * in the tile turned around -- the lanes over 16 tokens, each vdpbf16ps broadcasting one weight pair
 * straight from the pack ({1to16} memory operand) -- no panel is built at all. The tile is LANE_ROWS
 * weight rows x up to LANE_VECS vectors of 16 tokens (24 accumulators) over the whole contraction;
 * the tokens come q-major in blocks of 16 (pack_pairs' KT_PAIRS_LANES layout), so a step loads one
 * vector per block and broadcasts 8 weight words. On one Zen 4 core (scripts/gemm_harness.sh, V2-Lite
 * W_gu, 16 experts' weights from memory) the product ran at 88-91% of the vdpbf16ps peak at 48 and
 * 192 tokens, where building panels ran at 64-65% and 78-84%.
 * Each output's sum runs over q ascending from zero as in the panel form (the two products of a
 * lane are exact whichever operand is broadcast; the partial sums the panel form stores and reloads
 * between KC slices are exact): the same bits. A group's tokens are rounded up to 16, so an expert's
 * last block computes zero lanes (at 48 tokens per expert on average ~15% of the work). */
#define LANE_ROWS 8
#define LANE_VECS 3
#define LANE_GROUP (16 * LANE_VECS)

/* T[r][16 v + l] = sum_{q < Kp} pair q of block v's token l . word q of row w[r], r < NW, v < V (block
 * v's pairs at x[v], word (q, l) at x[v][16 q + l]). */
static inline __attribute__((always_inline)) void ukernel_lanes_any(int NW, int V, int64_t Kp,
                                                                    const uint32_t *const *x,
                                                                    const uint32_t *const *w, float *T) {
#define KL_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define KL_INIT(r)                                                                                  \
    zf c##r##a = ZMM(setzero_ps)(), c##r##b = ZMM(setzero_ps)(), c##r##c = ZMM(setzero_ps)();       \
    const uint32_t *w##r = w[(r) < NW ? (r) : 0];
#define KL_STEP(r)                                                                                  \
    if ((r) < NW) {                                                                                 \
        DP_BCAST(c##r##a, x0, w##r + q);                                                            \
        if (V > 1) DP_BCAST(c##r##b, x1, w##r + q);                                                 \
        if (V > 2) DP_BCAST(c##r##c, x2, w##r + q);                                                 \
    }
#define KL_STORE(r)                                                                                 \
    if ((r) < NW) {                                                                                 \
        ZMM(store_ps)(T + (r) * LANE_GROUP, c##r##a);                                               \
        if (V > 1) ZMM(store_ps)(T + (r) * LANE_GROUP + 16, c##r##b);                               \
        if (V > 2) ZMM(store_ps)(T + (r) * LANE_GROUP + 32, c##r##c);                               \
    }
    _Static_assert(LANE_ROWS == 8 && LANE_VECS == 3, "KL_ROWS lists 8 rows of 3 vectors");
    KL_ROWS(KL_INIT)
    const float *x0p = (const float *)x[0], *x1p = (const float *)x[V > 1 ? 1 : 0], *x2p = (const float *)x[V > 2 ? 2 : 0];
    for (int64_t q = 0; q < Kp; q++) {
        const zf x0 = ZMM(load_ps)(x0p + 16 * q), x1 = V > 1 ? ZMM(load_ps)(x1p + 16 * q) : x0,
                 x2 = V > 2 ? ZMM(load_ps)(x2p + 16 * q) : x0;
        KL_ROWS(KL_STEP)
        KEEP3(x0, x1, x2);
    }
    KL_ROWS(KL_STORE)
#undef KL_ROWS
#undef KL_INIT
#undef KL_STEP
#undef KL_STORE
}

typedef void (*ukernel_lanes_fn)(int64_t Kp, const uint32_t *const *x, const uint32_t *const *w, float *T);
#define KT_UKERNEL_LANES(NW, V)                                                                                 \
    static void ukernel_lanes_##NW##_##V(int64_t Kp, const uint32_t *const *x, const uint32_t *const *w,        \
                                         float *T) {                                                            \
        ukernel_lanes_any(NW, V, Kp, x, w, T);                                                                  \
    }
#define KT_UKERNEL_LANES_V(NW) KT_UKERNEL_LANES(NW, 1) KT_UKERNEL_LANES(NW, 2) KT_UKERNEL_LANES(NW, 3)
KT_UKERNEL_LANES_V(1) KT_UKERNEL_LANES_V(2) KT_UKERNEL_LANES_V(3) KT_UKERNEL_LANES_V(4)
KT_UKERNEL_LANES_V(5) KT_UKERNEL_LANES_V(6) KT_UKERNEL_LANES_V(7) KT_UKERNEL_LANES_V(8)
#undef KT_UKERNEL_LANES_V
#undef KT_UKERNEL_LANES
#define KL_ENTRY(NW) {NULL, ukernel_lanes_##NW##_1, ukernel_lanes_##NW##_2, ukernel_lanes_##NW##_3}
static const ukernel_lanes_fn ukernels_lanes[LANE_ROWS + 1][LANE_VECS + 1] = {
    {NULL}, KL_ENTRY(1), KL_ENTRY(2), KL_ENTRY(3), KL_ENTRY(4), KL_ENTRY(5), KL_ENTRY(6), KL_ENTRY(7), KL_ENTRY(8)};
#undef KL_ENTRY

/* Scratch floats of nt_lanes: the kernel's [NR][LANE_GROUP] sums and their [LANE_GROUP][NR] transpose. */
#define LANES_SCRATCH_FLOATS (2 * NR * LANE_GROUP)

/* g->a_pairs in KT_PAIRS_LANES (blocks of 16 tokens, Cq = round32(K) / 2 words per token). */
static void nt_lanes(const kt_gemm *g, float *scratch) {
    const kt_matrix_layout *L = g->L;
    const int64_t K = L->K, Cq = ((K + 31) & ~(int64_t)31) / 2, Kp = (K + 1) / 2;
    float *T = scratch;
    float (*cbuf)[NR] = (float (*)[NR])(T + NR * LANE_GROUP);
    /* the 16-token blocks in near-equal groups of at most LANE_VECS */
    const int64_t blocks = (g->M + 15) / 16, groups = (blocks + LANE_VECS - 1) / LANE_VECS;
    for (int64_t gi = 0; gi < groups; gi++) {
        const int64_t b0 = gi * blocks / groups, V = (gi + 1) * blocks / groups - b0;
        const int64_t m0 = 16 * b0, rows = g->M - m0 < 16 * V ? g->M - m0 : 16 * V;
        const uint32_t *x[LANE_VECS];
        for (int64_t v = 0; v < V; v++) x[v] = g->a_pairs + (b0 + v) * 16 * Cq;
        for (int64_t n0 = g->lo; n0 < g->hi; n0 += NR) {
            const int64_t width = g->hi - n0 < NR ? g->hi - n0 : NR;
            for (int64_t r0 = 0; r0 < width; r0 += LANE_ROWS) {
                const int64_t nw = width - r0 < LANE_ROWS ? width - r0 : LANE_ROWS;
                const uint32_t *w[LANE_ROWS];
                for (int64_t r = 0; r < nw; r++) w[r] = (const uint32_t *)row_of(L, g->w, n0 + r0 + r);
                ukernels_lanes[nw][V](Kp, x, w, T + r0 * LANE_GROUP);
            }
            /* [width][16 V] -> [16 V][NR], 16 x 16 at a time (columns past width zero, never written out) */
            for (int64_t j0 = 0; j0 < width; j0 += 16)
                for (int64_t i0 = 0; i0 < 16 * V; i0 += 16) {
                    zf r[16];
                    for (int j = 0; j < 16; j++)
                        r[j] = j0 + j < width ? ZMM(load_ps)(T + (j0 + j) * LANE_GROUP + i0) : ZMM(setzero_ps)();
                    transpose16(r);
                    for (int i = 0; i < 16; i++) ZMM(store_ps)(cbuf[i0 + i] + j0, r[i]);
                }
            write_tile(g, m0, rows, cbuf, n0 - g->lo, width);
        }
    }
}

/* Scratch: [panel: NR * max(Kr, N)][C buffer: (MC + MR) * NR] floats (the dot form keeps its
 * padded token rows, at most NT_DOT_MAX_M of them, in the panel's place). */
static int64_t scratch_floats_avx512(int64_t N, int64_t K_pad) {
    const int64_t m = (N > K_pad ? N : K_pad) + 32, own = NR * m + (MC + MR) * NR + 16;
    const int64_t kouter = NR * KC + KO_BLOCKS * MG * NR + KC / PAIRS_PER_BLOCK * NR; /* panel slice + C blocks + S */
    const int64_t q8 = kt_q8_avx2_scratch_floats(N, K_pad); /* the products without VNNI */
    _Static_assert(LANES_SCRATCH_FLOATS <= (MC + MR) * NR, "nt_lanes' buffers fit the C buffer's room");
    const int64_t fp = own > kouter ? own : kouter;
    return fp > q8 ? fp : q8;
}

static void nt_dot_bf16(const kt_gemm *g, float *A) { nt_dot_fmt(KT_FORMAT_BF16, g, A); }
static void nt_dot_int8(const kt_gemm *g, float *A) { nt_dot_fmt(KT_FORMAT_INT8, g, A); }

static void nt_avx512(const kt_gemm *g) {
    const int64_t K = g->L->K, Kr = (K + 31) & ~(int64_t)31;
    float *P = g->scratch;
    float (*cbuf)[NR] = (float (*)[NR])(P + NR * Kr);
    if (g->a_pairs && g->L->format == KT_FORMAT_BF16) { /* the operand in KT_PAIRS_LANES */
        nt_lanes(g, P);
        return;
    }
    if (g->a_pairs) { /* bf16 mode, vdpbf16ps: every token count (see tn_avx512) */
        kouter_packed(g, 0, 1, (K + 1) / 2, Kr / 2, P, (float (*)[NR])(P + NR * KC));
        return;
    }
    if (g->M <= NT_DOT_MAX_M && g->L->format == KT_FORMAT_BF16) {
        nt_dot_bf16(g, P);
        return;
    }
    if (g->M <= NT_DOT_MAX_M && g->L->format == KT_FORMAT_INT8) {
        nt_dot_int8(g, P);
        return;
    }
    if (g->a_f32 && g->hi - g->lo > NR && g->M >= KO_NT_MIN_M) {
        kouter_packed(g, 0, 0, K, Kr, P, (float (*)[NR])(P + NR * KC));
        return;
    }
    for (int64_t n0 = g->lo; n0 < g->hi; n0 += NR) {
        panel_rows_transposed(g->L, g->w, n0, 0, Kr, P);
        const int64_t width = g->hi - n0 < NR ? g->hi - n0 : NR;
        if (g->a_f32) panel_times_packed(g, P, K, Kr, n0 - g->lo, width, cbuf);
        else panel_times_rows(g, P, K, n0 - g->lo, width, cbuf);
    }
}

/* ---- tn: the backward direction ------------------------------------------------------------- */

/* Up to this many tokens (one tile) the transposed product dequantizes in registers instead of
 * building a panel: a panel read by a single tile does not repay its stores and reloads (same
 * core, 64-column tasks: direct 25-39 vs panel 20-30 GFLOP/s at M = 4..8, even at 12-16). FMA
 * kernels only: with vdpbf16ps pairs the panels win (below). */
#ifndef TN_DIRECT_MAX_M
#define TN_DIRECT_MAX_M MR
#endif
/* With vdpbf16ps pairs, up to this many tokens the transposed product makes the pairs of two weight
 * rows in registers (column_pairs) for each tile instead of building panels (same sums in the same
 * order: the same bits). Each tile makes them again, so the cut depends on what making them costs:
 * a bf16 pack's pairs are one shuffle of two loaded rows (up to 64 tokens: at 48 per expert B1 / B3
 * 1.05-1.16x faster than the panels, at 72 about even, at 96 B3 0.90x), int8 / int4 weights are
 * dequantized and rounded to bf16 first (at 48 tokens B1 0.79-0.88x, B3 0.68-0.81x: 24). Zen 4,
 * in-process per-phase A/B (scripts/ab_phases.py), session 16. */
#ifndef TN_DP_DIRECT_MAX_M
#define TN_DP_DIRECT_MAX_M 24
#endif
#ifndef TN_DP_DIRECT_MAX_M_BF16
#define TN_DP_DIRECT_MAX_M_BF16 64
#endif

static void tn_avx512(const kt_gemm *g) {
    const int64_t N = g->L->N;
    assert(g->lo % 32 == 0); /* tasks split the columns in multiples of 32 (the int4 direct form needs it) */
    float *P = g->scratch;
    float (*cbuf)[NR] = (float (*)[NR])(P + NR * ((N + 31) & ~(int64_t)31));
    /* vdpbf16ps for every token count: with 1-12 tokens per expert (T = 128, V2-Lite) its panels
     * repay themselves on Zen 4, where it runs 2x the FMA's rate (in-process per-phase A/B against
     * the dot / direct FMA forms, bf16 mode, 12 iterations: int8 pack nt 1.10-1.17x, tn 1.13-1.20x;
     * bf16 pack nt 0.98-1.02x, tn B3 1.28x). */
    if (g->a_pairs && g->M > 0 &&
        g->M <= (g->L->format == KT_FORMAT_BF16 ? TN_DP_DIRECT_MAX_M_BF16 : TN_DP_DIRECT_MAX_M)) {
        assert(g->L->format == KT_FORMAT_BF16 || g->round_w); /* the pairs hold bf16-exact weights */
        const int64_t Cr = ((N + 31) & ~(int64_t)31) / 2, tiles = (g->M + MR - 1) / MR;
        for (int64_t c0 = g->lo; c0 < g->hi; c0 += NR) {
            const int64_t width = g->hi - c0 < NR ? g->hi - c0 : NR;
            for (int64_t t = 0; t < tiles; t++) {
                int64_t m0, rows;
                tile_of(g->M, t, &m0, &rows);
                ukernels_direct_dp[tn_fmt(g)][rows]((N + 1) / 2, (const float *)(g->a_pairs + m0 * Cr), g->L, g->w,
                                                    c0, width > 16 ? c0 + 16 : c0, cbuf);
                write_tile(g, m0, rows, cbuf, c0 - g->lo, width);
            }
        }
        return;
    }
    if (g->a_pairs && g->M > 0) {
        assert(g->L->format == KT_FORMAT_BF16 || g->round_w); /* the pairs hold bf16-exact weights */
        kouter_packed(g, 1, 1, (N + 1) / 2, ((N + 31) & ~(int64_t)31) / 2, P, (float (*)[NR])(P + NR * KC));
        return;
    }
    if (g->a_f32 && g->M > TN_DIRECT_MAX_M && g->hi - g->lo > NR) {
        kouter_packed(g, 1, 0, N, (N + 31) & ~(int64_t)31, P, (float (*)[NR])(P + NR * KC));
        return;
    }
    const float *Ap = g->a_f32;
    if (g->M <= TN_DIRECT_MAX_M && g->M > 0 && !Ap) { /* one tile: prepared here, in the panel's room */
        pack_f32_avx512((const float *const *)g->a_rows, g->M, N, P);
        Ap = P;
    }
    for (int64_t c0 = g->lo; c0 < g->hi; c0 += NR) {
        const int64_t width = g->hi - c0 < NR ? g->hi - c0 : NR;
        if (g->M <= TN_DIRECT_MAX_M) {
            _Static_assert(TN_DIRECT_MAX_M <= MR, "the direct form takes one tile");
            if (g->M > 0) {
                ukernels_direct[tn_fmt(g)][g->M](N, Ap, g->L, g->w, c0, width > 16 ? c0 + 16 : c0, cbuf);
                write_tile(g, 0, g->M, cbuf, c0 - g->lo, width);
            }
            continue;
        }
        panel_columns(tn_fmt(g), g->L, g->w, c0, width, 0, N, P);
        if (g->a_f32) panel_times_packed(g, P, N, (N + 31) & ~(int64_t)31, c0 - g->lo, width, cbuf);
        else panel_times_rows(g, P, N, c0 - g->lo, width, cbuf);
    }
}

/* ---- int8 activations: vpdpbusd (AVX512-VNNI) ------------------------------------------------ */

/* The int8 compute mode's products (kt_gemm.a_scale != NULL) on vpdpbusd, which sums four u8 x s8
 * products into each int32 lane: acc[j] += sum_{i<4} u[4j+i] * s[4j+i]. The weights' panel holds
 * int8 quads -- 4 consecutive elements of the contraction per 32-bit lane -- for 32 outputs, built
 * once per panel in cache and reused by every token (as the fp32 panels above):
 *   nt (forward):  P[q][j] = W[n0+j][4q .. 4q+4)       (int8 quants; int4 as q - 8 in [-8, 7])
 *   tn (backward): P[q][j] = W[4q .. 4q+4)[c0+j]       (int8 quants, 4 rows interleaved bytewise)
 * and a token's quad of activations is broadcast to the 16 lanes.
 *
 * u8 x s8 with signed activations and weights, one of them biased by 128 (xor 0x80, in [1, 255]):
 *   int8 weights (nt and tn, since session 7): the panel holds w + 128 as the unsigned operand and
 *   the token's quad is the signed one, broadcast as it is loaded, so sum (w + 128) a = sum a w +
 *   128 sum a and the correction belongs to the token row (row_corr, once per tile row and panel).
 *   Before, the broadcast was biased (a + 128) and the panel kept the signed weights: a vpbroadcastd
 *   from a register and a vpxord per token and quad, two vector uops beside every two vpdpbusd,
 *   which held the tile near half the vpdpbusd rate (forward 1.10-1.23x faster without them, one
 *   core, V2-Lite layer; same bits).
 *   int4 weights (nt): still the biased broadcast against the signed q - 8 panel; the correction
 *   128 sum w per output column and 32-block is a property of the panel, computed when it is built:
 *   sum a w = acc - corr,  corr[j] = 128 * sum_q (sum of P[q][j]'s four bytes).
 * Exactness: only the non-saturating vpdpbusd (never vpdpbusds) and wrapping vpsubd are used, so acc
 * and corr are exact modulo 2^32; acc can pass 2^31 for K > 66,311 (255 * 127 * K), but the result
 * |sum a w| <= 127 * 127 * K < 2^31 for K <= 131072 (kt_sft checks that bound in Python), so the
 * wrapped difference is the exact sum (row_corr's sum likewise, modulo 2^32). The integer sums
 * equal the scalar path's, and the fp32 epilogue repeats its operations in its order (int8: ((s * d[n]) * a_scale) * alpha, then + out;
 * int4: acc += s_b * d_b per block, no FMA), so the results are bitwise those of kt_nt_q8_scalar /
 * kt_tn_q8_scalar.
 *
 * Register tiles: int8 12 tokens x 32 outputs (24 int32 accumulators, 2 panel vectors, a broadcast);
 * int4 6 x 32 (12 int32 block sums + 12 fp32 accumulators), folding each 32-block's sums into fp32
 * with the block's scale. The panel is at most K_pad * 32 bytes (64 KiB at K = 2048), read from L2
 * at ~5 bytes per vpdpbusd, so the whole contraction runs in registers without K blocking.
 *
 * The avx512 table needs only F/BW/VL/DQ: the entries check VNNI at run time and use the scalar
 * products without it (a CPU without AVX512-VNNI never executes vpdpbusd). The SIMDe twin emulates
 * vpdpbusd bit-exactly on any AVX2 CPU. */
#ifdef KT_SIMDE
#define KT_VNNI_TARGET
#define KT_HAVE_VNNI() 1
#else
#define KT_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define KT_HAVE_VNNI() ((kt_cpu_features() & KT_CPU_AVX512VNNI) != 0)
#endif

/* acc += u8 quads of u . s8 quads of s. As asm outside the emulated build: with the intrinsic, gcc
 * copied every accumulator of the int4 tile between registers each step (a loop-carried value in
 * two registers), 24 vector moves beside 12 vpdpbusd. */
#ifdef KT_SIMDE
#define DPBUSD(acc, u, s) ((acc) = ZMM(dpbusd_epi32)((acc), (u), (s)))
#else
#define DPBUSD(acc, u, s) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s))
#endif

#define QMR8 12  /* int8 tile height */
#define QMR4 6   /* int4 tile height */
#define QNR 32   /* outputs per panel (two zmm of int32 lanes) */
#define Q8_MAX_K 131072

/* Tile t of M rows split into ceil(M / mr) tiles of near-equal height. */
static inline void q_tile_of(int64_t M, int64_t mr, int64_t t, int64_t *m0, int64_t *rows) {
    const int64_t n = (M + mr - 1) / mr, base = M / n, extra = M % n;
    *m0 = t * base + (t < extra ? t : extra);
    *rows = base + (t < extra);
}

/* acc[i][0..2) (+)= sum_{q in [q0, q1)} P[q] . bcast(a[i], q) (int32 lanes; the int8 weights' biased
 * panel against the tokens' signed quads), R <= QMR8 rows; always
 * inlined with a constant R, so each tile height gets its own loop. The loop keeps the sums in named
 * registers and writes acc once at the end: on the array itself gcc stored the accumulators to the
 * stack every step (and copied them between registers), which held the int8 compute mode near a
 * third of the vpdpbusd rate (Zen 4, V2-Lite layer forward at T = 2048: 29% of the peak). */
static inline __attribute__((always_inline)) KT_VNNI_TARGET void q8_steps(int R, int64_t q0, int64_t q1,
                                                                          const int8_t *const *a,
                                                                          const int32_t *P, zi acc[][2]) {
#define KT_Q8_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define KT_Q8_INIT(i)                                                                               \
    zi s##i##a = ZMM(setzero_si512)(), s##i##b = ZMM(setzero_si512)();                              \
    const int8_t *a##i = (i) < R ? a[(i) < R ? (i) : 0] : NULL;                                     \
    if ((i) < R) {                                                                                  \
        s##i##a = acc[(i) < R ? (i) : 0][0];                                                        \
        s##i##b = acc[(i) < R ? (i) : 0][1];                                                        \
    }
#define KT_Q8_STEP(i)                                                                               \
    if ((i) < R) { /* the panel is the unsigned operand, the token's quad the signed one */         \
        int32_t v;                                                                                  \
        memcpy(&v, a##i + 4 * q, 4);                                                                \
        const zi b = ZMM(set1_epi32)(v);                                                            \
        s##i##a = ZMM(dpbusd_epi32)(s##i##a, p0, b);                                                \
        s##i##b = ZMM(dpbusd_epi32)(s##i##b, p1, b);                                                \
    }
#define KT_Q8_STORE(i)                                                                              \
    if ((i) < R) {                                                                                  \
        acc[(i) < R ? (i) : 0][0] = s##i##a;                                                        \
        acc[(i) < R ? (i) : 0][1] = s##i##b;                                                        \
    }
    _Static_assert(QMR8 == 12, "KT_Q8_ROWS lists QMR8 rows");
    KT_Q8_ROWS(KT_Q8_INIT)
    for (int64_t q = q0; q < q1; q++) {
        const zi p0 = ZMM(load_si512)(P + q * QNR), p1 = ZMM(load_si512)(P + q * QNR + 16);
        KT_Q8_ROWS(KT_Q8_STEP)
    }
    KT_Q8_ROWS(KT_Q8_STORE)
#undef KT_Q8_ROWS
#undef KT_Q8_INIT
#undef KT_Q8_STEP
#undef KT_Q8_STORE
}

/* 128 x the sum of a row's int8 values over [0, n) (n a multiple of 64; the rows are zero-padded):
 * the correction of the biased panels, sum (w + 128) a = sum w a + 128 sum a. */
static inline __attribute__((always_inline)) KT_VNNI_TARGET zi row_corr(const int8_t *a, int64_t n) {
    zi s = ZMM(setzero_si512)();
    for (int64_t k = 0; k < n; k += 64) s = ZMM(dpbusd_epi32)(s, ZMM(set1_epi8)(1), ZMM(loadu_si512)(a + k));
    const yi s8 = YMM(add_epi32)(lo_i(s), hi_i(s));
    uint32_t t[8], sum = 0; /* modulo 2^32, as the sums it corrects */
    memcpy(t, &s8, sizeof t);
    for (int i = 0; i < 8; i++) sum += t[i];
    return ZMM(set1_epi32)((int32_t)(sum * 128u));
}

/* The fp32 epilogue of one output row: v = ((v * a_scale) * alpha) (+ out), columns [0, width). */
static inline void q8_store_row(const kt_gemm *g, int64_t m, int64_t col, int64_t width, zf v0, zf v1) {
    float *o = g->out_rows[m] + col;
    v0 = ZMM(mul_ps)(v0, ZMM(set1_ps)(g->a_scale[m]));
    v1 = ZMM(mul_ps)(v1, ZMM(set1_ps)(g->a_scale[m]));
    if (g->alpha) {
        v0 = ZMM(mul_ps)(v0, ZMM(set1_ps)(g->alpha[m]));
        v1 = ZMM(mul_ps)(v1, ZMM(set1_ps)(g->alpha[m]));
    }
    if (width == QNR) {
        if (g->accumulate) {
            v0 = ZMM(add_ps)(ZMM(loadu_ps)(o), v0);
            v1 = ZMM(add_ps)(ZMM(loadu_ps)(o + 16), v1);
        }
        ZMM(storeu_ps)(o, v0);
        ZMM(storeu_ps)(o + 16, v1);
    } else {
        float tmp[QNR];
        ZMM(storeu_ps)(tmp, v0);
        ZMM(storeu_ps)(tmp + 16, v1);
        for (int64_t j = 0; j < width; j++) o[j] = g->accumulate ? o[j] + tmp[j] : tmp[j];
    }
}

/* 128 * (sum of each lane's four signed bytes), accumulated into s. */
static inline __attribute__((always_inline)) KT_VNNI_TARGET zi quad_sums(zi s, zi v) {
    return ZMM(dpbusd_epi32)(s, ZMM(set1_epi8)(1), v);
}

/* nt panel of rows [n0, n0 + rows): P[q][j] for q < K_pad / 4 (rounded up to 16 quads; rows past
 * `rows` and columns past K_pad are zero before any bias). int8: the quants + 128 as u8 (the tile's
 * correction is per token row, row_corr). int4: q - 8, signed, and corr[b][j] = 128 * the sum of
 * row j's over 32-block b (8 quads). */
static inline __attribute__((always_inline)) KT_VNNI_TARGET void q8_panel_rows(int fmt, const kt_matrix_layout *L,
                                                                               const uint8_t *mat, int64_t n0,
                                                                               int64_t rows, int32_t *P,
                                                                               int32_t *corr) {
    const int64_t K_pad = L->K_pad, blk_q = KT_INT4_BLOCK / 4;
    const zi lo4 = ZMM(set1_epi8)(0x0f), eight = ZMM(set1_epi8)(8);
    zi s[2] = {ZMM(setzero_si512)(), ZMM(setzero_si512)()};
    for (int64_t k = 0; k < K_pad; k += 64) {
        for (int half = 0; half < 2; half++) {
            zf r[16];
            for (int i = 0; i < 16; i++) {
                const int64_t j = half * 16 + i;
                zi v = ZMM(setzero_si512)();
                if (j < rows) {
                    const uint8_t *row = row_of(L, mat, n0 + j);
                    if (fmt == KT_FORMAT_INT8) {
                        v = ZMM(loadu_si512)(row + k);
                    } else { /* two 32-blocks (or the last one): low nibbles are elements 0..15 */
                        const int two = k + 64 <= K_pad;
                        const yi p = two ? YMM(loadu_si256)((const void *)(row + k / 2))
                                         : YMM(castsi128_si256)(_mm_loadu_si128((const void *)(row + k / 2)));
                        const zi w = join_i(YMM(permute2x128_si256)(p, p, 0x00), YMM(permute2x128_si256)(p, p, 0x11));
                        /* w = [blk0, blk0, blk1, blk1] (16 bytes each): low nibbles, then high ones */
                        const zi lo = ZMM(and_si512)(w, lo4), hi = ZMM(and_si512)(ZMM(srli_epi16)(w, 4), lo4);
                        v = ZMM(sub_epi8)(ZMM(mask_blend_epi64)(0xcc, lo, hi), eight);
                        if (!two) v = ZMM(inserti64x4)(v, YMM(setzero_si256)(), 1);
                    }
                }
                r[i] = ZMM(castsi512_ps)(v);
            }
            transpose16(r);
            for (int i = 0; i < 16; i++) {
                const zi v = ZMM(castps_si512)(r[i]);
                const int64_t q = k / 4 + i;
                if (fmt == KT_FORMAT_INT8) { /* w + 128 as u8 */
                    ZMM(store_si512)(P + q * QNR + half * 16, ZMM(xor_si512)(v, ZMM(set1_epi8)((char)0x80)));
                    continue;
                }
                ZMM(store_si512)(P + q * QNR + half * 16, v);
                if (q < K_pad / 4) {
                    s[half] = quad_sums(s[half], v);
                    if ((q + 1) % blk_q == 0) {
                        ZMM(store_si512)(corr + (q / blk_q) * QNR + half * 16, ZMM(slli_epi32)(s[half], 7));
                        s[half] = ZMM(setzero_si512)();
                    }
                }
            }
        }
    }
}

/* out[m][n - lo] (+)= alpha[m] * a_scale[m] * d[n] * sum_k q[m][k] Wq[n][k], int8 weights. */
static inline __attribute__((always_inline)) KT_VNNI_TARGET void nt_q8_int8_tile(int R, const kt_gemm *g,
                                                                                 int64_t m0, const int32_t *P,
                                                                                 zf d0, zf d1, int64_t col,
                                                                                 int64_t width) {
    const int8_t *a[QMR8];
    zi acc[QMR8][2];
    for (int i = 0; i < R; i++) {
        a[i] = g->a_rows[m0 + i];
        acc[i][0] = acc[i][1] = ZMM(setzero_si512)();
    }
    q8_steps(R, 0, g->L->K_pad / 4, a, P, acc);
    for (int i = 0; i < R; i++) {
        const zi c = row_corr(a[i], (g->L->K_pad + 63) & ~(int64_t)63);
        const zf v0 = ZMM(mul_ps)(cvt_ps(ZMM(sub_epi32)(acc[i][0], c)), d0);
        const zf v1 = ZMM(mul_ps)(cvt_ps(ZMM(sub_epi32)(acc[i][1], c)), d1);
        q8_store_row(g, m0 + i, col, width, v0, v1);
    }
}

/* int4 weights: per 32-block b, s_b = sum q[m][k] (Wq[n][k] - 8) in int32, acc += s_b * d[n][b]. */
static inline __attribute__((always_inline)) KT_VNNI_TARGET void nt_q8_int4_tile(int R, const kt_gemm *g,
                                                                                 int64_t m0, const int32_t *P,
                                                                                 const int32_t *corr,
                                                                                 const float *D, int64_t col,
                                                                                 int64_t width) {
    const int8_t *a[QMR4];
    for (int i = 0; i < R; i++) a[i] = g->a_rows[m0 + i];
    /* Named sums and accumulators, as in q8_steps (on arrays gcc copied all 24 between registers
     * every step). */
#define KT_Q4_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define KT_Q4_INIT(i)                                                                               \
    zf f##i##a = ZMM(setzero_ps)(), f##i##b = ZMM(setzero_ps)();                                    \
    const int8_t *a##i = (i) < R ? a[(i) < R ? (i) : 0] : NULL;
#define KT_Q4_ZERO(i) zi s##i##a = ZMM(setzero_si512)(), s##i##b = ZMM(setzero_si512)();
#define KT_Q4_STEP(i)                                                                               \
    if ((i) < R) {                                                                                  \
        int32_t v;                                                                                  \
        memcpy(&v, a##i + 4 * q, 4);                                                                \
        const zi bq = ZMM(xor_si512)(ZMM(set1_epi32)(v), ZMM(set1_epi32)((int)0x80808080u));        \
        DPBUSD(s##i##a, bq, p0);                                                                    \
        DPBUSD(s##i##b, bq, p1);                                                                    \
    }
#define KT_Q4_FOLD(i)                                                                               \
    if ((i) < R) {                                                                                  \
        f##i##a = ZMM(add_ps)(f##i##a, ZMM(mul_ps)(cvt_ps(ZMM(sub_epi32)(s##i##a, c0)), d0));      \
        f##i##b = ZMM(add_ps)(f##i##b, ZMM(mul_ps)(cvt_ps(ZMM(sub_epi32)(s##i##b, c1)), d1));      \
    }
#define KT_Q4_STORE(i)                                                                              \
    if ((i) < R) q8_store_row(g, m0 + (i), col, width, f##i##a, f##i##b);
    _Static_assert(QMR4 == 6, "KT_Q4_ROWS lists QMR4 rows");
    KT_Q4_ROWS(KT_Q4_INIT)
    const int64_t nb = g->L->K_pad / KT_INT4_BLOCK, bq = KT_INT4_BLOCK / 4;
    for (int64_t b = 0; b < nb; b++) { /* per 32-block b: s = its int32 sums, f += (s - corr) * d */
        KT_Q4_ROWS(KT_Q4_ZERO)
        for (int64_t q = b * bq; q < (b + 1) * bq; q++) {
            const zi p0 = ZMM(load_si512)(P + q * QNR), p1 = ZMM(load_si512)(P + q * QNR + 16);
            KT_Q4_ROWS(KT_Q4_STEP)
        }
        const zi c0 = ZMM(load_si512)(corr + b * QNR), c1 = ZMM(load_si512)(corr + b * QNR + 16);
        const zf d0 = ZMM(load_ps)(D + b * QNR), d1 = ZMM(load_ps)(D + b * QNR + 16);
        KT_Q4_ROWS(KT_Q4_FOLD)
    }
    KT_Q4_ROWS(KT_Q4_STORE)
#undef KT_Q4_ROWS
#undef KT_Q4_INIT
#undef KT_Q4_ZERO
#undef KT_Q4_STEP
#undef KT_Q4_FOLD
#undef KT_Q4_STORE
}

#define KT_Q8_TILES(R)                                                                                           \
    static KT_VNNI_TARGET void nt_q8_int8_tile_##R(const kt_gemm *g, int64_t m0, const int32_t *P, zf d0,       \
                                                   zf d1, int64_t col, int64_t w) {                              \
        nt_q8_int8_tile(R, g, m0, P, d0, d1, col, w);                                                            \
    }
#define KT_Q4_TILES(R)                                                                                           \
    static KT_VNNI_TARGET void nt_q8_int4_tile_##R(const kt_gemm *g, int64_t m0, const int32_t *P,              \
                                                   const int32_t *corr, const float *D, int64_t col,             \
                                                   int64_t w) {                                                  \
        nt_q8_int4_tile(R, g, m0, P, corr, D, col, w);                                                           \
    }
KT_Q8_TILES(1) KT_Q8_TILES(2) KT_Q8_TILES(3) KT_Q8_TILES(4) KT_Q8_TILES(5) KT_Q8_TILES(6)
KT_Q8_TILES(7) KT_Q8_TILES(8) KT_Q8_TILES(9) KT_Q8_TILES(10) KT_Q8_TILES(11) KT_Q8_TILES(12)
KT_Q4_TILES(1) KT_Q4_TILES(2) KT_Q4_TILES(3) KT_Q4_TILES(4) KT_Q4_TILES(5) KT_Q4_TILES(6)
#undef KT_Q8_TILES
#undef KT_Q4_TILES
_Static_assert(QMR8 == 12 && QMR4 == 6, "the tables below list one tile per height");
typedef void (*nt_q8_int8_tile_fn)(const kt_gemm *, int64_t, const int32_t *, zf, zf, int64_t, int64_t);
typedef void (*nt_q8_int4_tile_fn)(const kt_gemm *, int64_t, const int32_t *, const int32_t *, const float *,
                                   int64_t, int64_t);
static const nt_q8_int8_tile_fn nt_q8_int8_tiles[QMR8 + 1] = {
    NULL, nt_q8_int8_tile_1, nt_q8_int8_tile_2, nt_q8_int8_tile_3, nt_q8_int8_tile_4, nt_q8_int8_tile_5,
    nt_q8_int8_tile_6, nt_q8_int8_tile_7, nt_q8_int8_tile_8, nt_q8_int8_tile_9, nt_q8_int8_tile_10,
    nt_q8_int8_tile_11, nt_q8_int8_tile_12};
static const nt_q8_int4_tile_fn nt_q8_int4_tiles[QMR4 + 1] = {
    NULL, nt_q8_int4_tile_1, nt_q8_int4_tile_2, nt_q8_int4_tile_3, nt_q8_int4_tile_4, nt_q8_int4_tile_5,
    nt_q8_int4_tile_6};

/* Scratch of the integer panels (int32 words): nt K_pad/4 rounded to 16 quads (or tn N/4) x 32, the
 * corrections and int4's fp32 scales (K_pad / 32 x 32 each); well inside scratch_floats_avx512. */
static KT_VNNI_TARGET void nt_q8_vnni(const kt_gemm *g) {
    const kt_matrix_layout *L = g->L;
    const int64_t K_pad = L->K_pad, nq = ((K_pad + 63) & ~(int64_t)63) / 4, nb = K_pad / KT_INT4_BLOCK;
    const int int8 = L->format == KT_FORMAT_INT8;
    assert(K_pad <= Q8_MAX_K);
    int32_t *P = (int32_t *)g->scratch, *corr = P + nq * QNR;
    float *D = (float *)(corr + nb * QNR);
    const int64_t mr = int8 ? QMR8 : QMR4, tiles = (g->M + mr - 1) / mr;
    for (int64_t n0 = g->lo; n0 < g->hi; n0 += QNR) {
        const int64_t width = g->hi - n0 < QNR ? g->hi - n0 : QNR;
        zf d0 = ZMM(setzero_ps)(), d1 = ZMM(setzero_ps)();
        if (int8) {
            float d[QNR] = {0};
            for (int64_t j = 0; j < width; j++) d[j] = int8_scale(L, g->w, n0 + j);
            d0 = ZMM(loadu_ps)(d);
            d1 = ZMM(loadu_ps)(d + 16);
            q8_panel_rows(KT_FORMAT_INT8, L, g->w, n0, width, P, NULL);
        } else {
            for (int64_t b = 0; b < nb; b++)
                for (int64_t j = 0; j < QNR; j++) D[b * QNR + j] = j < width ? int4_scale(L, g->w, n0 + j, b) : 0.0f;
            q8_panel_rows(KT_FORMAT_INT4, L, g->w, n0, width, P, corr);
        }
        for (int64_t t = 0; t < tiles; t++) {
            int64_t m0, rows;
            q_tile_of(g->M, mr, t, &m0, &rows);
            if (int8) nt_q8_int8_tiles[rows](g, m0, P, d0, d1, n0 - g->lo, width);
            else nt_q8_int4_tiles[rows](g, m0, P, corr, D, n0 - g->lo, width);
        }
    }
}

/* tn panel of columns [c0, c0 + width), width <= 32: P[q][j] = bytes W[4q + i][c0 + j] + 128 (u8),
 * i < 4, for q < N / 4 rounded up (rows past N zero before the bias). ymm unpacks work inside 128-bit
 * lanes: lane 0 holds columns 0..15, lane 1 columns 16..31. */
static KT_VNNI_TARGET void q8_panel_columns(const kt_matrix_layout *L, const uint8_t *mat, int64_t c0,
                                            int64_t width, int32_t *P) {
    const int64_t N = L->N, nq = (N + 3) / 4;
    for (int64_t q = 0; q < nq; q++) {
        yi r[4];
        for (int i = 0; i < 4; i++) {
            const int64_t n = 4 * q + i;
            if (n >= N) r[i] = YMM(setzero_si256)();
            else if (width > 16) r[i] = YMM(loadu_si256)((const void *)(row_of(L, mat, n) + c0));
            else r[i] = YMM(castsi128_si256)(_mm_loadu_si128((const void *)(row_of(L, mat, n) + c0)));
        }
        const yi t01l = YMM(unpacklo_epi8)(r[0], r[1]), t01h = YMM(unpackhi_epi8)(r[0], r[1]);
        const yi t23l = YMM(unpacklo_epi8)(r[2], r[3]), t23h = YMM(unpackhi_epi8)(r[2], r[3]);
        const yi q0 = YMM(unpacklo_epi16)(t01l, t23l), q1 = YMM(unpackhi_epi16)(t01l, t23l);
        const yi q2 = YMM(unpacklo_epi16)(t01h, t23h), q3 = YMM(unpackhi_epi16)(t01h, t23h);
        const zi v0 = join_i(YMM(permute2x128_si256)(q0, q1, 0x20), YMM(permute2x128_si256)(q2, q3, 0x20));
        const zi v1 = join_i(YMM(permute2x128_si256)(q0, q1, 0x31), YMM(permute2x128_si256)(q2, q3, 0x31));
        ZMM(store_si512)(P + q * QNR, ZMM(xor_si512)(v0, ZMM(set1_epi8)((char)0x80)));
        ZMM(store_si512)(P + q * QNR + 16, ZMM(xor_si512)(v1, ZMM(set1_epi8)((char)0x80)));
    }
}

/* out[m][c - lo] (+)= alpha[m] * a_scale[m] * sum_n q[m][n] Wq[n][c] (int8 weights, their row scales
 * folded into q by the caller). */
static inline __attribute__((always_inline)) KT_VNNI_TARGET void tn_q8_tile(int R, const kt_gemm *g, int64_t m0,
                                                                            const int32_t *P, int64_t col,
                                                                            int64_t width) {
    const int8_t *a[QMR8];
    zi acc[QMR8][2];
    for (int i = 0; i < R; i++) {
        a[i] = g->a_rows[m0 + i];
        acc[i][0] = acc[i][1] = ZMM(setzero_si512)();
    }
    q8_steps(R, 0, (g->L->N + 3) / 4, a, P, acc);
    for (int i = 0; i < R; i++) {
        const zi c = row_corr(a[i], (g->L->N + 63) & ~(int64_t)63);
        q8_store_row(g, m0 + i, col, width, cvt_ps(ZMM(sub_epi32)(acc[i][0], c)), cvt_ps(ZMM(sub_epi32)(acc[i][1], c)));
    }
}

#define KT_TN_TILES(R)                                                                                           \
    static KT_VNNI_TARGET void tn_q8_tile_##R(const kt_gemm *g, int64_t m0, const int32_t *P, int64_t col,     \
                                              int64_t w) {                                                       \
        tn_q8_tile(R, g, m0, P, col, w);                                                                         \
    }
KT_TN_TILES(1) KT_TN_TILES(2) KT_TN_TILES(3) KT_TN_TILES(4) KT_TN_TILES(5) KT_TN_TILES(6)
KT_TN_TILES(7) KT_TN_TILES(8) KT_TN_TILES(9) KT_TN_TILES(10) KT_TN_TILES(11) KT_TN_TILES(12)
#undef KT_TN_TILES
typedef void (*tn_q8_tile_fn)(const kt_gemm *, int64_t, const int32_t *, int64_t, int64_t);
static const tn_q8_tile_fn tn_q8_tiles[QMR8 + 1] = {
    NULL, tn_q8_tile_1, tn_q8_tile_2, tn_q8_tile_3, tn_q8_tile_4, tn_q8_tile_5, tn_q8_tile_6,
    tn_q8_tile_7, tn_q8_tile_8, tn_q8_tile_9, tn_q8_tile_10, tn_q8_tile_11, tn_q8_tile_12};

static KT_VNNI_TARGET void tn_q8_vnni(const kt_gemm *g) {
    const kt_matrix_layout *L = g->L;
    assert(L->format == KT_FORMAT_INT8 && L->N <= Q8_MAX_K && g->lo % 16 == 0);
    int32_t *P = (int32_t *)g->scratch;
    const int64_t tiles = (g->M + QMR8 - 1) / QMR8;
    for (int64_t c0 = g->lo; c0 < g->hi; c0 += QNR) {
        const int64_t width = g->hi - c0 < QNR ? g->hi - c0 : QNR;
        q8_panel_columns(L, g->w, c0, width, P);
        for (int64_t t = 0; t < tiles; t++) {
            int64_t m0, rows;
            q_tile_of(g->M, QMR8, t, &m0, &rows);
            tn_q8_tiles[rows](g, m0, P, c0 - g->lo, width);
        }
    }
}

/* The table's entries: vpdpbusd where this CPU has it, else the avx2 table's vpmaddwd products. */
static void nt_q8_avx512(const kt_gemm *g) {
    if (KT_HAVE_VNNI()) nt_q8_vnni(g);
    else kt_nt_q8_avx2(g);
}

static void tn_q8_avx512(const kt_gemm *g) {
    if (KT_HAVE_VNNI()) tn_q8_vnni(g);
    else kt_tn_q8_avx2(g);
}

/* ---- LoRA helpers --------------------------------------------------------------------------- */

/* Four rows against v at a time: each load of v feeds four FMAs. */
static void dots_avx512(const float *M, int64_t r, int64_t n, const float *v, float *t) {
    int64_t k = 0;
    for (; k + 4 <= r; k += 4) {
        const float *m0 = M + k * n, *m1 = m0 + n, *m2 = m1 + n, *m3 = m2 + n;
        /* two accumulators per row (even / odd 16-lane chunks): 8 independent FMA chains, enough to
         * cover the FMA latency on two FMA ports (with one per row the loop waited on the chains:
         * llvm-mca sapphirerapids 66% of the FMA bound) */
        zf s0 = ZMM(setzero_ps)(), s1 = ZMM(setzero_ps)(), s2 = ZMM(setzero_ps)(), s3 = ZMM(setzero_ps)();
        zf u0 = ZMM(setzero_ps)(), u1 = ZMM(setzero_ps)(), u2 = ZMM(setzero_ps)(), u3 = ZMM(setzero_ps)();
        int64_t i = 0;
        for (; i + 32 <= n; i += 32) {
            const zf x = ZMM(loadu_ps)(v + i), y = ZMM(loadu_ps)(v + i + 16);
            s0 = ZMM(fmadd_ps)(ZMM(loadu_ps)(m0 + i), x, s0);
            s1 = ZMM(fmadd_ps)(ZMM(loadu_ps)(m1 + i), x, s1);
            s2 = ZMM(fmadd_ps)(ZMM(loadu_ps)(m2 + i), x, s2);
            s3 = ZMM(fmadd_ps)(ZMM(loadu_ps)(m3 + i), x, s3);
            u0 = ZMM(fmadd_ps)(ZMM(loadu_ps)(m0 + i + 16), y, u0);
            u1 = ZMM(fmadd_ps)(ZMM(loadu_ps)(m1 + i + 16), y, u1);
            u2 = ZMM(fmadd_ps)(ZMM(loadu_ps)(m2 + i + 16), y, u2);
            u3 = ZMM(fmadd_ps)(ZMM(loadu_ps)(m3 + i + 16), y, u3);
        }
        for (; i + 16 <= n; i += 16) {
            const zf x = ZMM(loadu_ps)(v + i);
            s0 = ZMM(fmadd_ps)(ZMM(loadu_ps)(m0 + i), x, s0);
            s1 = ZMM(fmadd_ps)(ZMM(loadu_ps)(m1 + i), x, s1);
            s2 = ZMM(fmadd_ps)(ZMM(loadu_ps)(m2 + i), x, s2);
            s3 = ZMM(fmadd_ps)(ZMM(loadu_ps)(m3 + i), x, s3);
        }
        float a0 = hsum16(ZMM(add_ps)(s0, u0)), a1 = hsum16(ZMM(add_ps)(s1, u1)), a2 = hsum16(ZMM(add_ps)(s2, u2)),
              a3 = hsum16(ZMM(add_ps)(s3, u3));
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
        zf s0 = ZMM(setzero_ps)();
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) s0 = ZMM(fmadd_ps)(ZMM(loadu_ps)(m0 + i), ZMM(loadu_ps)(v + i), s0);
        float a0 = hsum16(s0);
        for (; i < n; i++) a0 += m0[i] * v[i];
        t[k] = a0;
    }
}

static void axpy_avx512(float alpha, const float *x, float *y, int64_t n) {
    const zf va = ZMM(set1_ps)(alpha);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) ZMM(storeu_ps)(y + i, ZMM(fmadd_ps)(va, ZMM(loadu_ps)(x + i), ZMM(loadu_ps)(y + i)));
    for (; i < n; i++) y[i] += alpha * x[i];
}

/* vdpbf16ps for the bf16 mode (every format) where kt_bf16_dot() says so; the emulated twin only
 * when KT_SFT_BF16_DOT=dpbf16 (tests), since it has no rate to compare. */
static int pairs_enabled_avx512(void) {
#ifdef KT_SIMDE
    const char *force = getenv("KT_SFT_BF16_DOT");
    return force && strcmp(force, "dpbf16") == 0;
#else
    return kt_bf16_dot() == KT_BF16_DOT_DPBF16;
#endif
}

/* The zmm SwiGLU (kt_swiglu_avx512.c) is real AVX-512: the emulated twin keeps the scalar loops. */
#ifdef KT_SIMDE
#define KT_SWIGLU .swiglu = NULL, .swiglu_bwd = NULL
#else
#define KT_SWIGLU .swiglu = kt_swiglu_avx512, .swiglu_bwd = kt_swiglu_bwd_avx512
#endif
const kt_kernels KT_TABLE = {.name = KT_TABLE_NAME, .nt = nt_avx512, .tn = tn_avx512, .nt_q8 = nt_q8_avx512,
                             .tn_q8 = tn_q8_avx512, .dots = dots_avx512, .axpy = axpy_avx512,
                             .scratch_floats = scratch_floats_avx512, .pack_f32 = pack_f32_avx512,
                             .pack_pairs = pack_pairs_avx512, .pairs_enabled = pairs_enabled_avx512, KT_SWIGLU,
                             .rows_per_task = TASK_WIDTH, .cols_per_task = TASK_WIDTH,
                             .quantize_row = kt_quantize_row_avx2};

#pragma GCC pop_options
#endif

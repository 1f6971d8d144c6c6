/* AMX-BF16 kernels: the bf16 compute mode's products on tiles (x86-64, chosen at run time).
 *
 * A tile multiply C[16][16] += A[16][32] * B[16 pairs][16][2] takes 8,192 bf16 multiply-adds in
 * one instruction; on the Xeon this was written on it ran ~7x the zmm FMA peak. The job hands the
 * activations over once per phase as a prepared bf16 operand (pack_bf16, below), so the kernels
 * only move weights:
 *   nt (forward, out[m][n] = sum_k a[m][k] W[n][k]): A = weight rows, read straight from a bf16
 *      pack (int8/int4 rows are converted in scratch), B = the activations in VNNI pairs, C[n][m].
 *   tn (backward, out[m][c] = sum_n a[m][n] W[n][c]): A = the activation rows, B = the weights
 *      with consecutive rows n interleaved in pairs, built in scratch from column stripes of the
 *      rows (a task's 128 columns by 512 rows at a time when there are few tokens), C[m][c].
 * The forward keeps the weights exact: bf16 weights are bf16; int8 quants are exact in bf16 and
 * their per-row scale (an output row of nt) multiplies the result; int4's scale varies along the
 * contraction (by 32-blocks), so the forward multiplies the exact quants q - 8, one 32-column step
 * per block, and folds each block's sums into fp32 with the block's scale (nt_int4_blocks_amx).
 * The backward (tn) multiplies the dequantized int8 / int4 weights rounded to bf16, as every path
 * does in this mode (kt_gemm.round_w; docs/formats.md): there the scales vary along the contraction
 * and, for int4, with the output too, so exact weights would take two tile products (a bf16 hi + lo
 * split) where the rounded ones take one. Accumulation is fp32 in the tiles, in a fixed order per
 * output, so results do not depend on the thread count.
 * The int8 compute mode: int8 weights multiply on AMX-INT8 tiles (tdpbssd, below); int4 weights
 * run the forward as the bf16 mode's, on the int8 activations (exact in bf16), and the backward --
 * whose gradients that mode rounds to bf16 for int4 -- as the bf16 mode's tn.
 * The f32 compute mode uses the avx512 table's kernels (avx2's when that table is absent).
 */
#include "kt_internal.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16,amx-int8,avx2,fma,f16c")
#include <immintrin.h>

/* ---- tiles -------------------------------------------------------------------------------- */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) tile_config;

/* Tiles 0-3: C; 4-5: A; 6-7: B; all 16 rows x 64 bytes. Loaded at every kernel call: the calling
 * thread may also run other AMX code (oneDNN) with its own configuration in between. */
void kt_amx_tiles_on(void) {
    /* static data, not a local filled in place: gcc 12 does not see ldtilecfg read its operand and
     * dropped the stores of a local configuration (the tiles then fault with #UD) */
    static const tile_config cfg = {
        .palette = 1,
        .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
        .rows = {16, 16, 16, 16, 16, 16, 16, 16},
    };
    _tile_loadconfig(&cfg);
}

static const kt_kernels *fallback(void) { return &kt_kernels_avx512 ? &kt_kernels_avx512 : &kt_kernels_avx2; }

static int64_t round32(int64_t v) { return (v + 31) & ~(int64_t)31; }

/* int4 by table: a 32-block's 16 possible weights (q - 8) * d (fp32 products), rounded to bf16
 * once per block; vpermw then looks up 32 nibbles at a time. The pack's int4 layout: byte j of a
 * block's 16 holds element j (low nibble) and j + 16 (high nibble). */
static inline __m512 int4_values(const kt_matrix_layout *L, const uint8_t *mat, int64_t n, int64_t b) {
    if (n >= L->N) return _mm512_setzero_ps();
    const __m512 iota8 = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const uint16_t dh = ((const uint16_t *)(mat + L->scales_offset))[n * (L->K_pad / KT_INT4_BLOCK) + b];
    return _mm512_mul_ps(iota8, _mm512_set1_ps(_cvtsh_ss(dh)));
}

/* ---- the prepared activation operand -------------------------------------------------------- */

/* 16 values of a row from column c (fewer at the end of the row, zeros after). */
static inline __m512 load_row16(const float *row, int64_t c, int64_t C) {
    if (c + 16 <= C) return _mm512_loadu_ps(row + c);
    if (c >= C) return _mm512_setzero_ps();
    return _mm512_maskz_loadu_ps((__mmask16)((1u << (C - c)) - 1), row + c);
}

/* 32 bf16 of a row from column c, in order (the row holds bf16-exact values: conversion is exact). */
static inline __m512i row32_bf16(const float *row, int64_t c, int64_t C) {
    return (__m512i)_mm512_cvtne2ps_pbh(load_row16(row, c + 16, C), load_row16(row, c, C));
}

static void pack_bf16_amx(const float *const *rows, int64_t M, int64_t C, int layout, uint16_t *dst) {
    const int64_t C32 = round32(C), M16 = (M + 15) & ~(int64_t)15;
    if (M < M16) memset(dst + (M16 - 16) * C32, 0, sizeof(uint16_t) * (size_t)(16 * C32));
    if (layout == KT_PACK_TILES) {
        for (int64_t m = 0; m < M; m++) {
            uint16_t *blk = dst + (m / 16) * 16 * C32 + (m % 16) * 32;
            for (int64_t c = 0; c < C32; c += 32) _mm512_storeu_si512(blk + c * 16, row32_bf16(rows[m], c, C));
        }
        return;
    }
    /* VNNI: the 16 column pairs of one row's 32 columns go to 16 consecutive 64-byte lines */
    const __m512i lines = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(16));
    for (int64_t m = 0; m < M; m++) {
        uint32_t *blk = (uint32_t *)(dst + (m / 16) * 16 * C32) + (m % 16);
        for (int64_t c = 0; c < C32; c += 32) _mm512_i32scatter_epi32(blk + c * 8, lines, row32_bf16(rows[m], c, C), 4);
    }
}

/* ---- output ------------------------------------------------------------------------------- */

#define ZMM(op) _mm512_##op
typedef __m512 zf;
#include "kt_transpose16.h"
#undef ZMM

/* An nt tile c[n][m] (16 x 16, fp32 or int32 bits) turned into t[m][n], so the outputs are written
 * a token row at a time. */
static inline void tile_transposed(const float *c, int q8, zf t[16]) {
    for (int i = 0; i < 16; i++) {
        const zf v = _mm512_load_ps(c + i * 16);
        t[i] = q8 ? _mm512_cvtepi32_ps(_mm512_castps_si512(v)) : v;
    }
    transpose16(t);
}

/* out[m][col + j] (+)= alpha[m] * rs[i] * c[i][j] over a 16 x 16 tile (nt: i = weight row,
 * j = token; tn: i = token, j = column). rows x cols valid; rs NULL for 1. */
static void write_nt(const kt_gemm *g, const float *c, int64_t m0, int64_t mv, int64_t col, int64_t nv, const float *rs) {
    const __mmask16 k = (__mmask16)((1u << nv) - 1);
    zf t[16];
    tile_transposed(c, 0, t);
    const zf r = rs ? _mm512_maskz_loadu_ps(k, rs) : _mm512_set1_ps(1.0f);
    for (int64_t j = 0; j < mv; j++) {
        float *o = g->out_rows[m0 + j] + col;
        zf v = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(g->alpha ? g->alpha[m0 + j] : 1.0f), r), t[j]);
        if (g->accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(k, o), v);
        _mm512_mask_storeu_ps(o, k, v);
    }
}

static void write_tn(const kt_gemm *g, const float *c, int64_t m0, int64_t mv, int64_t col, int64_t cv) {
    const __mmask16 k = (__mmask16)((1u << cv) - 1);
    for (int64_t i = 0; i < mv; i++) {
        float *o = g->out_rows[m0 + i] + col;
        __m512 v = _mm512_mul_ps(_mm512_loadu_ps(c + i * 16), _mm512_set1_ps(g->alpha ? g->alpha[m0 + i] : 1.0f));
        if (g->accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, o));
        _mm512_mask_storeu_ps(o, k, v);
    }
}

/* ---- the 2 x 2 tile block ------------------------------------------------------------------- */

/* C tiles (a0 b0) (a0 b1) (a1 b0) (a1 b1) over `steps` contraction steps of 32: A tiles at
 * aX + s * as_step bytes with row stride as, B tiles at bX + s * bs_step with row stride bs.
 * na, nb in {1, 2}. Tile (ia, ib) goes to
 * c + ia * c_ld + ib * 256 (floats); it starts from zero, or from the same place in cin. */
static inline __attribute__((always_inline)) void block2x2(int q8, int na, int nb, int64_t steps, const uint8_t *a0,
                                                           const uint8_t *a1, int64_t as, int64_t as_step,
                                                           const uint8_t *b0, const uint8_t *b1, int64_t bs_step,
                                                           int64_t bs, const float *cin, float *c, int64_t c_ld) {
    if (cin) { /* continue partial sums (tile store and load are exact: same result as one pass) */
        _tile_loadd(0, cin, 64);
        if (nb > 1) _tile_loadd(1, cin + 256, 64);
        if (na > 1) _tile_loadd(2, cin + c_ld, 64);
        if (na > 1 && nb > 1) _tile_loadd(3, cin + c_ld + 256, 64);
    } else {
        _tile_zero(0);
        if (nb > 1) _tile_zero(1);
        if (na > 1) _tile_zero(2);
        if (na > 1 && nb > 1) _tile_zero(3);
    }
#define KT_DP(c, a, b) do { if (q8) _tile_dpbssd(c, a, b); else _tile_dpbf16ps(c, a, b); } while (0)
#define KT_DP4()                                                      \
    do {                                                              \
        KT_DP(0, 4, 6);                                               \
        if (nb > 1) KT_DP(1, 4, 7);                                   \
        if (na > 1) KT_DP(2, 5, 6);                                   \
        if (na > 1 && nb > 1) KT_DP(3, 5, 7);                         \
    } while (0)
    for (int64_t s = 0; s < steps; s++) {
        const int64_t ao = s * as_step, bo = s * bs_step;
        _tile_loadd(4, a0 + ao, as);
        if (na > 1) _tile_loadd(5, a1 + ao, as);
        _tile_loadd(6, b0 + bo, bs);
        if (nb > 1) _tile_loadd(7, b1 + bo, bs);
        KT_DP4();
    }
#undef KT_DP4
#undef KT_DP
    _tile_stored(0, c, 64);
    if (nb > 1) _tile_stored(1, c + 256, 64);
    if (na > 1) _tile_stored(2, c + c_ld, 64);
    if (na > 1 && nb > 1) _tile_stored(3, c + c_ld + 256, 64);
}

#define KT_BLOCK_DISPATCH_AS(q8, na, nb, ...)                                                  \
    do {                                                                                       \
        if ((na) == 2 && (nb) == 2) block2x2(q8, 2, 2, __VA_ARGS__);                           \
        else if ((na) == 2) block2x2(q8, 2, 1, __VA_ARGS__);                                   \
        else if ((nb) == 2) block2x2(q8, 1, 2, __VA_ARGS__);                                   \
        else block2x2(q8, 1, 1, __VA_ARGS__);                                                  \
    } while (0)
#define KT_BLOCK_DISPATCH(...) KT_BLOCK_DISPATCH_AS(0, __VA_ARGS__)

/* ---- nt: forward ---------------------------------------------------------------------------- */


/* Scratch: nt's A rows for 32 weight rows (32 x Kp uint16) or tn's B pairs for TN_CHUNK columns
 * (TN_CHUNK x N32; int4 2 TN_CHUNK x N32, the same bytes) or TNS_COLS x TNS_ROWS (uint16; counted here
 * as floats, room to spare), then
 * the C tiles: 4, or TNS_MB x TNS_COLS / 16 in the segmented tn; nt_int4_blocks_amx's sums and scales. */
#define TN_CHUNK 64
#define TNS_COLS 128
#define TNS_ROWS 512
#define TNS_MB 8
static int64_t scratch_floats_amx(int64_t N, int64_t K_pad) {
    int64_t need = 32 * K_pad;
    if (TN_CHUNK * round32(N) > need) need = TN_CHUNK * round32(N); /* = int4's 2 TN_CHUNK x N32 uint16 */
    if (TNS_COLS * TNS_ROWS > need) need = TNS_COLS * TNS_ROWS;
    const int64_t amx = need + TNS_MB * (TNS_COLS / 16) * 256 + 16;
    const int64_t fb = kt_scratch_floats(fallback(), N, K_pad);
    return ((amx > fb ? amx : fb) + 15) & ~(int64_t)15;
}

/* nt's A operand (the weight rows), where it is built in scratch (int8 / int4 weights; bf16 rows are
 * read from the pack in place), is laid out as 16-row tiles, each one contiguous 1 KiB read: byte
 * offset of row i's 64 bytes at contraction step s, tiles of a 16-row block `steps` apart. Rows of
 * K = 2048 lie 4 KiB apart, so the 16 lines of a row-strided tile fall in one L1 set: in a
 * microbenchmark on the AMX Xeon (session 10; one thread, 2 x 2 tile blocks streaming from L2) row
 * strides of 2-8 KiB ran at 54-73% of the tdpbf16ps peak, contiguous tiles at ~100%; in the layer's
 * forward, int8 rows as tiles instead of rows 1.04 / 1.10 / 1.12x at T = 128 / 512 / 2048. */
static inline size_t tile_at(int64_t i, int64_t s, int64_t steps) {
    return (size_t)(((i / 16) * steps + s) * 1024 + (i % 16) * 64);
}

/* Rows n0 .. n0+rows of bf16 or int8 W as bf16 A tiles of Kp columns (tile_at, Kp / 32 steps): bf16
 * weights as they are (rows are zero-padded to K_pad >= Kp), int8 the exact quants (scale applied at
 * the output); rows past N are zero. (int4 takes nt_int4_blocks_amx.) */
static void weight_tiles_bf16(const kt_matrix_layout *L, const uint8_t *w, int64_t n0, int64_t rows, int64_t Kp,
                              uint8_t *dst) {
    const int64_t steps = Kp / 32;
    for (int64_t i = 0; i < rows; i++) {
        const int64_t n = n0 + i;
        const uint8_t *row = n < L->N ? w + (size_t)n * L->row_bytes : NULL;
        for (int64_t st = 0; st < steps; st++) {
            __m512i v;
            if (!row) {
                v = _mm512_setzero_si512();
            } else if (L->format == KT_FORMAT_INT8) { /* 32 quants, exact in bf16 */
                const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + 32 * st))));
                const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + 32 * st + 16))));
                v = (__m512i)_mm512_cvtne2ps_pbh(q1, q0);
            } else {
                v = _mm512_loadu_si512(row + 64 * st);
            }
            _mm512_store_si512(dst + tile_at(i, st, steps), v);
        }
    }
}

static void nt_int4_blocks_amx(const kt_gemm *g, int q8);

static void nt_amx(const kt_gemm *g) {
    const kt_matrix_layout *L = g->L;
    if (!g->a_bf16) {
        fallback()->nt(g);
        return;
    }
    if (L->format == KT_FORMAT_INT4) {
        nt_int4_blocks_amx(g, 0);
        return;
    }
    kt_amx_tiles_on();
    const int64_t Kp = round32(L->K), steps = Kp / 32, Mb = (g->M + 15) / 16;
    uint8_t *A = (uint8_t *)g->scratch; /* 32 rows x Kp bf16, as tiles */
    float *c = (float *)(A + 64 * Kp);
    const float *dscale = L->format == KT_FORMAT_INT8 ? (const float *)(g->w + L->scales_offset) : NULL;
    const int64_t vnni_block = 16 * Kp; /* uint16 per 16 tokens */
    for (int64_t n0 = g->lo; n0 < g->hi; n0 += 32) {
        const int64_t nv = g->hi - n0 < 32 ? g->hi - n0 : 32, na = nv > 16 ? 2 : 1;
        /* bf16 rows straight from the pack (copying them into tiles measured 0.63 / 0.76 / 0.98x
         * the forward at T = 128 / 512 / 2048: the copy costs more than the set conflicts) */
        const int direct = L->format == KT_FORMAT_BF16 && n0 + 16 * na <= L->N;
        const uint8_t *a0 = direct ? g->w + (size_t)n0 * L->row_bytes : A;
        const int64_t as = direct ? (int64_t)L->row_bytes : 64, as_step = direct ? 64 : 1024;
        const uint8_t *a1 = a0 + (direct ? 16 * as : steps * 1024);
        if (!direct) weight_tiles_bf16(L, g->w, n0, 16 * na, Kp, A);
        for (int64_t mb = 0; mb < Mb; mb += 2) {
            const int64_t nb = Mb - mb > 1 ? 2 : 1;
            const uint8_t *b0 = (const uint8_t *)(g->a_bf16 + mb * vnni_block), *b1 = b0 + vnni_block * 2;
            KT_BLOCK_DISPATCH(na, nb, steps, a0, a1, as, as_step, b0, b1, 1024, 64, NULL, c, 512);
            for (int64_t ia = 0; ia < na; ia++)
                for (int64_t ib = 0; ib < nb; ib++) {
                    const int64_t m0 = (mb + ib) * 16, mv = g->M - m0 < 16 ? g->M - m0 : 16;
                    const int64_t r0 = n0 + ia * 16, rv = g->hi - r0 < 16 ? g->hi - r0 : 16;
                    if (rv > 0) write_nt(g, c + (ia * 2 + ib) * 256, m0, mv, r0 - g->lo, rv, dscale ? dscale + r0 : NULL);
                }
        }
    }
}

/* ---- tn: backward --------------------------------------------------------------------------- */

/* B operand for `tiles` x 16 columns from c0 over rows n0 .. n0 + rows (rows even): tile t holds,
 * for pair q of rows (n0 + 2q, n0 + 2q + 1), one 64-byte line of 16 (W[n][c], W[n+1][c]) pairs at
 * out + t * rows * 16 + q * 32, int8 / int4 weights rounded to bf16; rows past N are zero. Row by
 * row, so each row's stripe is read once, in order, with the rows a few pairs ahead prefetched
 * (the stripes of consecutive rows lie a row apart, far beyond what the hardware prefetchers
 * follow). bf16 weights are interleaved as they are, with no trip through fp32. */
#define TN_PREFETCH_PAIRS 4
static void weight_pairs_bf16(const kt_matrix_layout *L, const uint8_t *w, int64_t c0, int64_t tiles, int64_t n0,
                              int64_t rows, uint16_t *out) {
    /* bf16 as they are; int8 q * d rounded; int4 by a rounded table per block */
    static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i inter = _mm512_loadu_si512(order);
    const int64_t tile = rows * 16;
    const int bf16 = L->format == KT_FORMAT_BF16;
    const size_t stripe = (size_t)(bf16 ? 32 * tiles : L->format == KT_FORMAT_INT8 ? 16 * tiles : 8 * tiles);
    const size_t first = (size_t)(bf16 ? 2 * c0 : L->format == KT_FORMAT_INT8 ? c0 : c0 / 2);
    for (int64_t q = 0; q < rows / 2; q++) {
        const int64_t n = n0 + 2 * q;
        for (int64_t r = n + 2 * TN_PREFETCH_PAIRS; r < n + 2 * TN_PREFETCH_PAIRS + 2 && r < L->N; r++)
            for (size_t b = 0; b < stripe; b += 64) _mm_prefetch((const char *)(w + (size_t)r * L->row_bytes + first + b), _MM_HINT_T0);
        if (bf16) {
            const uint8_t *r0 = w + (size_t)n * L->row_bytes + first, *r1 = r0 + L->row_bytes;
            for (int64_t t = 0; t < tiles; t++) {
                const __m256i v0 = n < L->N ? _mm256_loadu_si256((const __m256i *)(r0 + 32 * t)) : _mm256_setzero_si256();
                const __m256i v1 = n + 1 < L->N ? _mm256_loadu_si256((const __m256i *)(r1 + 32 * t)) : _mm256_setzero_si256();
                _mm512_storeu_si512(out + t * tile + q * 32,
                                    _mm512_permutexvar_epi16(inter, _mm512_inserti64x4(_mm512_castsi256_si512(v0), v1, 1)));
            }
            continue;
        }
        if (L->format == KT_FORMAT_INT8) { /* q * d, the scalar path's fp32 product, rounded (nearest even) */
            const uint8_t *r0 = w + (size_t)n * L->row_bytes + first, *r1 = r0 + L->row_bytes;
            const float *d = (const float *)(w + L->scales_offset);
            const __m512 d0 = _mm512_set1_ps(n < L->N ? d[n] : 0.0f), d1 = _mm512_set1_ps(n + 1 < L->N ? d[n + 1] : 0.0f);
            for (int64_t t = 0; t < tiles; t++) {
                const __m512 v0 = n < L->N ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(r0 + 16 * t))))
                                           : _mm512_setzero_ps();
                const __m512 v1 = n + 1 < L->N ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(r1 + 16 * t))))
                                               : _mm512_setzero_ps();
                _mm512_storeu_si512(out + t * tile + q * 32,
                                    _mm512_permutexvar_epi16(inter, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(v1, d1),
                                                                                                 _mm512_mul_ps(v0, d0))));
            }
            continue;
        }
        { /* int4: rounded tables of both rows' block, n at 0-15, n + 1 at 16-31 */
            int64_t tb = -1;
            __m512i th = _mm512_setzero_si512(), both = th;
            for (int64_t t = 0; t < tiles; t++) {
                const int64_t c = c0 + 16 * t, b = c / KT_INT4_BLOCK;
                if (b != tb) {
                    tb = b;
                    th = (__m512i)_mm512_cvtne2ps_pbh(int4_values(L, w, n + 1, b), int4_values(L, w, n, b));
                    const uint8_t *r0 = w + (size_t)n * L->row_bytes + b * (KT_INT4_BLOCK / 2);
                    const __m512i q0 = n < L->N ? _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)r0)) : _mm512_setzero_si512();
                    const __m512i q1 = n + 1 < L->N ? _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(r0 + L->row_bytes)))
                                                    : _mm512_setzero_si512();
                    both = _mm512_or_si512(q0, _mm512_slli_epi32(q1, 16)); /* lane j: byte j of n | of n + 1 << 16 */
                }
                __m512i idx = c % KT_INT4_BLOCK ? _mm512_srli_epi32(both, 4) : both; /* high nibbles: columns 16-31 */
                idx = _mm512_add_epi32(_mm512_and_si512(idx, _mm512_set1_epi32(0x000F000F)), _mm512_set1_epi32(0x00100000));
                _mm512_storeu_si512(out + t * tile + q * 32, _mm512_permutexvar_epi16(idx, th));
            }
        }
    }
}

/* tn with few tokens (Mb <= TNS_MB blocks of 16): chunks of TNS_COLS columns, each built as B
 * operands of TNS_ROWS contraction rows at a time, so every weight row is read TNS_COLS columns
 * wide (the wider the stripe the nearer the sequential rate: measured on the AMX Xeon, 2 threads,
 * 128-byte stripes read at ~0.6x of it, 512-byte ones at ~1x) while the operand stays small in
 * L2. (Wider tasks, 256 columns, read wider stripes but balanced worse between two threads on a
 * shared machine: slower overall in A/B runs.) The C tiles of all token blocks wait in scratch between
 * segments: the fp32 sums continue exactly, so the result is the one-pass result bit for bit.
 * With many tokens the B operand of TN_CHUNK columns over all rows is built once and every token
 * block passes over it. */
static void tn_amx(const kt_gemm *g) {
    const kt_matrix_layout *L = g->L;
    /* (int8 / int4 weights only with round_w: exact ones would need a second product) */
    if (!g->a_bf16 || g->lo % 16 || (L->format != KT_FORMAT_BF16 && !g->round_w)) {
        fallback()->tn(g);
        return;
    }
    kt_amx_tiles_on();
    const int64_t N32 = round32(L->N), Mb = (g->M + 15) / 16;
    const int seg = Mb <= TNS_MB;
    /* int4: 128 columns, so each row's stripe is one whole 64-byte line, not half of one that the
     * next chunk reads again (session 11, in-process A/B with KT_SFT_PROFILE at T = 2048: the
     * backward's gate/up phase 1.11-1.20x by medians over three runs, the forward's phases, which do
     * not run this code, within 4%; bf16 and int8 stripes are 128 and 64 bytes already) */
    const int64_t chunk = seg ? TNS_COLS : L->format == KT_FORMAT_INT4 ? 2 * TN_CHUNK : TN_CHUNK;
    const int64_t seg_rows = seg ? TNS_ROWS : N32;
    const int64_t c_ld = seg ? (TNS_COLS / 16) * 256 : 512; /* floats between token blocks' C tiles */
    uint16_t *bw = (uint16_t *)g->scratch;
    float *cbuf = (float *)(((uintptr_t)(bw + chunk * seg_rows) + 63) & ~(uintptr_t)63);
    const int64_t ablock = 16 * N32 * 2; /* bytes per 16 activation rows (tiles of 1 KiB) */
    for (int64_t c0 = g->lo; c0 < g->hi; c0 += chunk) {
        const int64_t tiles = ((g->hi - c0 < chunk ? g->hi - c0 : chunk) + 15) / 16;
        for (int64_t n0 = 0; n0 < N32; n0 += seg_rows) {
            const int64_t rows = N32 - n0 < seg_rows ? N32 - n0 : seg_rows, steps = rows / 32, tile = rows * 16;
            const int last = n0 + rows >= N32;
            weight_pairs_bf16(L, g->w, c0, tiles, n0, rows, bw);
            for (int64_t mb = 0; mb < Mb; mb += 2) {
                const int64_t na = Mb - mb > 1 ? 2 : 1;
                const uint8_t *a0 = (const uint8_t *)(g->a_bf16 + mb * 16 * N32 + n0 * 16), *a1 = a0 + ablock;
                for (int64_t t = 0; t < tiles; t += 2) {
                    const int64_t nb = tiles - t > 1 ? 2 : 1;
                    const uint8_t *b0 = (const uint8_t *)(bw + t * tile), *b1 = b0 + tile * 2;
                    float *c = seg ? cbuf + mb * c_ld + t * 256 : cbuf;
                    const float *cin = n0 > 0 ? c : NULL;
                    KT_BLOCK_DISPATCH(na, nb, steps, a0, a1, 64, 1024, b0, b1, 1024, 64, cin, c, c_ld);
                    if (!last) continue;
                    for (int64_t ia = 0; ia < na; ia++)
                        for (int64_t ib = 0; ib < nb; ib++) {
                            const int64_t m0 = (mb + ia) * 16, mv = g->M - m0 < 16 ? g->M - m0 : 16;
                            const int64_t col = c0 + (t + ib) * 16, w = g->hi - col < 16 ? g->hi - col : 16;
                            write_tn(g, c + ia * c_ld + ib * 256, m0, mv, col - g->lo, w);
                        }
                }
            }
        }
    }
}

/* ---- the int8 compute mode: tdpbssd on int8 weights ------------------------------------------ */

/* 16 x 16 int32 tile [i][j] -> out[m][col + ...]: value = (((float)s * row_scale) * a_scale[m]) *
 * alpha[m], the scalar path's order, so the results are bitwise the scalar ones (the int32 sums
 * are exact: |sum| <= 127 * 127 * K < 2^31 for K <= 131072, checked in Python). nt: i = weight
 * row n (row_scale = d[n]), j = token; tn: i = token, j = column (row_scale = 1). */
static void write_q8(const kt_gemm *g, const int32_t *c, int nt, int64_t m0, int64_t mv, int64_t col, int64_t nv,
                     const float *d) {
    const __mmask16 k = (__mmask16)((1u << nv) - 1);
    zf t[16];
    /* nt with d NULL: c holds fp32 sums already scaled (int4's per-block fold), taken as they are */
    if (nt) tile_transposed((const float *)c, d != NULL, t);
    const zf dv = nt && d ? _mm512_maskz_loadu_ps(k, d) : _mm512_set1_ps(1.0f);
    for (int64_t m = 0; m < mv; m++) {
        float *o = g->out_rows[m0 + m] + col;
        /* per lane the scalar order: ((float)s * d) * a_scale, then * alpha, then + out */
        zf v = nt ? (d ? _mm512_mul_ps(t[m], dv) : t[m]) : _mm512_cvtepi32_ps(_mm512_loadu_si512(c + m * 16));
        v = _mm512_mul_ps(v, _mm512_set1_ps(g->a_scale[m0 + m]));
        if (g->alpha) v = _mm512_mul_ps(v, _mm512_set1_ps(g->alpha[m0 + m]));
        if (g->accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(k, o), v);
        _mm512_mask_storeu_ps(o, k, v);
    }
}

/* int8 rows as exact bf16 values in the KT_PACK_VNNI layout (the int4 forward's B operand). */
static void pack_q8_as_bf16_vnni(const int8_t *const *rows, int64_t M, int64_t C, uint16_t *dst) {
    const int64_t C32 = round32(C), M16 = (M + 15) & ~(int64_t)15;
    if (M < M16) memset(dst + (M16 - 16) * C32, 0, sizeof(uint16_t) * (size_t)(16 * C32));
    const __m512i lines = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(16));
    for (int64_t m = 0; m < M; m++) {
        uint32_t *blk = (uint32_t *)(dst + (m / 16) * 16 * C32) + (m % 16);
        for (int64_t c = 0; c < C32; c += 32) { /* rows are zero-padded to 64: 32 bytes are there */
            const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(rows[m] + c))));
            const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(rows[m] + c + 16))));
            _mm512_i32scatter_epi32(blk + c * 8, lines, (__m512i)_mm512_cvtne2ps_pbh(q1, q0), 4);
        }
    }
}

static void pack_q8_amx(const int8_t *const *rows, int64_t M, int64_t C, int layout, int8_t *dst) {
    if (layout == KT_PACK_VNNI_BF16) {
        pack_q8_as_bf16_vnni(rows, M, C, (uint16_t *)dst);
        return;
    }
    const int64_t C64 = (C + 63) & ~(int64_t)63, M16 = (M + 15) & ~(int64_t)15;
    if (M < M16) memset(dst + (M16 - 16) * C64, 0, (size_t)(16 * C64));
    if (layout == KT_PACK_TILES) {
        for (int64_t m = 0; m < M; m++)
            for (int64_t c = 0; c < C64; c += 64)
                memcpy(dst + (m / 16) * 16 * C64 + c * 16 + (m % 16) * 64, rows[m] + c, 64);
        return;
    }
    const __m512i lines = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(16));
    for (int64_t m = 0; m < M; m++) {
        int32_t *blk = (int32_t *)(dst + (m / 16) * 16 * C64) + (m % 16);
        for (int64_t c = 0; c < C64; c += 64)
            _mm512_i32scatter_epi32(blk + c * 4, lines, _mm512_loadu_si512(rows[m] + c), 4);
    }
}

/* Rows n0 .. n0+rows of int4 W as their exact quants q - 8 in bf16 A tiles (tile_at, one step per
 * 32-block; no scale; rows past N zero). */
static void int4_quants_bf16(const kt_matrix_layout *L, const uint8_t *w, int64_t n0, int64_t rows, int64_t Kp,
                             uint8_t *dst) {
    const __m512 iota8 = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(_mm512_setzero_ps(), iota8); /* lanes 0-15 */
    const int64_t steps = Kp / 32;
    for (int64_t i = 0; i < rows; i++) {
        const uint8_t *row = n0 + i < L->N ? w + (size_t)(n0 + i) * L->row_bytes : NULL;
        for (int64_t st = 0; st < steps; st++) {
            __m512i v = _mm512_setzero_si512();
            if (row) {
                const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(row + 16 * st)));
                const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(bytes, _mm256_set1_epi16(15))),
                                                       _mm256_srli_epi16(bytes, 4), 1);
                v = _mm512_permutexvar_epi16(idx, table);
            }
            _mm512_store_si512(dst + tile_at(i, st, steps), v);
        }
    }
}

/* int4 weights, forward, by 32-blocks: out[m][n] (+)= alpha[m] * (a_scale[m] *) sum_b d[n][b] * s_b,
 * s_b = sum over 32-block b of a[m][k] (Wq[n][k] - 8): one bf16 tile step per block (32 columns)
 * on the exact quants q - 8, then each block's C tiles folded into fp32 sums with the block's scale.
 * - int8 mode (q8): a = the int8 rows, converted to bf16 by the job (pack_q8, KT_PACK_VNNI_BF16).
 *   Both factors are small integers, exact in bf16, and |s_b| <= 32 * 127 * 8 < 2^24, so s_b is
 *   exact in fp32; the fold is the scalar path's (F += s_b * d, no FMA, blocks in order), so the
 *   results are bitwise kt_nt_q8_scalar's.
 * - bf16 mode: a = the bf16-rounded activations (pack_bf16, KT_PACK_VNNI). Each product of a bf16
 *   value and q - 8 is exact in fp32 (8 + 4 significant bits), the tile sums them in fp32 and the
 *   fold is an FMA: the weights stay exact (no hi + lo split), so one tile product per block where
 *   the split form took two over the whole row, and the result differs from it only by fp32
 *   rounding (the mode's own: activations rounded to bf16, weights as stored, fp32 sums). */
static void nt_int4_blocks_amx(const kt_gemm *g, int q8) {
    const kt_matrix_layout *L = g->L;
    kt_amx_tiles_on();
    const int64_t Kp = round32(L->K), nbk = Kp / 32, Mb = (g->M + 15) / 16, blocks = L->K_pad / KT_INT4_BLOCK;
    uint8_t *A = (uint8_t *)g->scratch; /* 32 rows x Kp bf16, as tiles */
    float *c = (float *)(A + 64 * Kp), *F = c + 4 * 256, *D = F + 4 * 256;
    const uint16_t *sc = (const uint16_t *)(g->w + L->scales_offset);
    const int64_t vnni_block = 16 * Kp; /* uint16 per 16 tokens */
    for (int64_t n0 = g->lo; n0 < g->hi; n0 += 32) {
        const int64_t nv = g->hi - n0 < 32 ? g->hi - n0 : 32, na = nv > 16 ? 2 : 1;
        int4_quants_bf16(L, g->w, n0, 16 * na, Kp, A);
        for (int64_t b = 0; b < nbk; b++) /* D[b][i]: the scale of row n0 + i in block b */
            for (int64_t i = 0; i < 32; i++)
                D[b * 32 + i] = n0 + i < L->N && i < 16 * na ? _cvtsh_ss(sc[(n0 + i) * blocks + b]) : 0.0f;
        const uint8_t *a0 = A, *a1 = A + nbk * 1024;
        for (int64_t mb = 0; mb < Mb; mb += 2) {
            const int64_t nb = Mb - mb > 1 ? 2 : 1;
            const uint8_t *b0 = (const uint8_t *)(g->a_bf16 + mb * vnni_block), *b1 = b0 + vnni_block * 2;
            memset(F, 0, sizeof(float) * 4 * 256);
            for (int64_t b = 0; b < nbk; b++) {
                KT_BLOCK_DISPATCH(na, nb, 1, a0 + b * 1024, a1 + b * 1024, 64, 1024, b0 + b * 1024, b1 + b * 1024, 1024,
                                  64, NULL, c, 512);
                for (int64_t ia = 0; ia < na; ia++)
                    for (int64_t ib = 0; ib < nb; ib++) {
                        const float *ct = c + (ia * 2 + ib) * 256, *d = D + b * 32 + ia * 16;
                        float *ft = F + (ia * 2 + ib) * 256;
                        if (q8)
                            for (int i = 0; i < 16; i++) /* tile row i = weight row n0 + ia * 16 + i */
                                _mm512_store_ps(ft + i * 16, _mm512_add_ps(_mm512_load_ps(ft + i * 16),
                                                                           _mm512_mul_ps(_mm512_load_ps(ct + i * 16),
                                                                                         _mm512_set1_ps(d[i]))));
                        else
                            for (int i = 0; i < 16; i++)
                                _mm512_store_ps(ft + i * 16, _mm512_fmadd_ps(_mm512_load_ps(ct + i * 16),
                                                                             _mm512_set1_ps(d[i]),
                                                                             _mm512_load_ps(ft + i * 16)));
                    }
            }
            for (int64_t ia = 0; ia < na; ia++)
                for (int64_t ib = 0; ib < nb; ib++) {
                    const int64_t m0 = (mb + ib) * 16, mv = g->M - m0 < 16 ? g->M - m0 : 16;
                    const int64_t r0 = n0 + ia * 16, rv = g->hi - r0 < 16 ? g->hi - r0 : 16;
                    if (rv <= 0) continue;
                    if (q8) write_q8(g, (const int32_t *)(F + (ia * 2 + ib) * 256), 1, m0, mv, r0 - g->lo, rv, NULL);
                    else write_nt(g, F + (ia * 2 + ib) * 256, m0, mv, r0 - g->lo, rv, NULL);
                }
        }
    }
}

static void nt_q8_amx(const kt_gemm *g) {
    const kt_matrix_layout *L = g->L;
    if (L->format == KT_FORMAT_INT4 && g->a_bf16) {
        nt_int4_blocks_amx(g, 1);
        return;
    }
    if (!g->a_q8 || L->format != KT_FORMAT_INT8) {
        fallback()->nt_q8(g);
        return;
    }
    kt_amx_tiles_on();
    const int64_t Kp = (L->K + 63) & ~(int64_t)63, steps = Kp / 64, Mb = (g->M + 15) / 16;
    int8_t *rows = (int8_t *)g->scratch; /* 32 x Kp, for the rows at the end of the matrix */
    int32_t *c = (int32_t *)(((uintptr_t)(rows + 32 * Kp) + 63) & ~(uintptr_t)63);
    const float *d = (const float *)(g->w + L->scales_offset);
    for (int64_t n0 = g->lo; n0 < g->hi; n0 += 32) {
        const int64_t nv = g->hi - n0 < 32 ? g->hi - n0 : 32, na = nv > 16 ? 2 : 1;
        const uint8_t *a0;
        int64_t as;
        if (n0 + 16 * na <= L->N) { /* int8 rows straight from the pack */
            a0 = g->w + (size_t)n0 * L->row_bytes;
            as = (int64_t)L->row_bytes;
        } else {
            for (int64_t i = 0; i < 16 * na; i++) {
                if (n0 + i < L->N) memcpy(rows + i * Kp, g->w + (size_t)(n0 + i) * L->row_bytes, (size_t)Kp);
                else memset(rows + i * Kp, 0, (size_t)Kp);
            }
            a0 = (const uint8_t *)rows;
            as = Kp;
        }
        for (int64_t mb = 0; mb < Mb; mb += 2) {
            const int64_t nb = Mb - mb > 1 ? 2 : 1;
            const uint8_t *b0 = (const uint8_t *)(g->a_q8 + mb * 16 * Kp), *b1 = b0 + 16 * Kp;
            KT_BLOCK_DISPATCH_AS(1, na, nb, steps, a0, a0 + 16 * as, as, 64, b0, b1, 1024, 64, NULL, (float *)c, 512);
            for (int64_t ia = 0; ia < na; ia++)
                for (int64_t ib = 0; ib < nb; ib++) {
                    const int64_t m0 = (mb + ib) * 16, mv = g->M - m0 < 16 ? g->M - m0 : 16;
                    const int64_t r0 = n0 + ia * 16, rv = g->hi - r0 < 16 ? g->hi - r0 : 16;
                    if (rv > 0) write_q8(g, c + (ia * 2 + ib) * 256, 1, m0, mv, r0 - g->lo, rv, d + r0);
                }
        }
    }
}

/* B operand for `tiles` x 16 columns from c0: quad q of rows (4q .. 4q+3) as one 64-byte line of
 * 16 columns x 4 bytes, tile t at out + t * N64 * 16; rows past N zero. Row by row with
 * prefetch, as weight_pairs_bf16. */
static void weight_quads_q8(const kt_matrix_layout *L, const uint8_t *w, int64_t c0, int64_t tiles, int64_t N64,
                            int8_t *out) {
    for (int64_t q = 0; q < N64 / 4; q++) {
        const int64_t n = 4 * q;
        for (int64_t r = n + 4 * TN_PREFETCH_PAIRS; r < n + 4 * TN_PREFETCH_PAIRS + 4 && r < L->N; r++)
            _mm_prefetch((const char *)(w + (size_t)r * L->row_bytes + c0), _MM_HINT_T0);
        for (int64_t t = 0; t < tiles; t++) {
            __m128i r[4];
            for (int i = 0; i < 4; i++)
                r[i] = n + i < L->N ? _mm_loadu_si128((const __m128i *)(w + (size_t)(n + i) * L->row_bytes + c0 + 16 * t))
                                    : _mm_setzero_si128();
            const __m128i t0 = _mm_unpacklo_epi8(r[0], r[1]), t1 = _mm_unpackhi_epi8(r[0], r[1]);
            const __m128i t2 = _mm_unpacklo_epi8(r[2], r[3]), t3 = _mm_unpackhi_epi8(r[2], r[3]);
            int8_t *line = out + t * N64 * 16 + q * 64;
            _mm_storeu_si128((__m128i *)line, _mm_unpacklo_epi16(t0, t2));
            _mm_storeu_si128((__m128i *)(line + 16), _mm_unpackhi_epi16(t0, t2));
            _mm_storeu_si128((__m128i *)(line + 32), _mm_unpacklo_epi16(t1, t3));
            _mm_storeu_si128((__m128i *)(line + 48), _mm_unpackhi_epi16(t1, t3));
        }
    }
}

static void tn_q8_amx(const kt_gemm *g) {
    const kt_matrix_layout *L = g->L;
    if (!g->a_q8 || L->format != KT_FORMAT_INT8 || g->lo % 16) {
        fallback()->tn_q8(g);
        return;
    }
    kt_amx_tiles_on();
    const int64_t N64 = (L->N + 63) & ~(int64_t)63, steps = N64 / 64, Mb = (g->M + 15) / 16, tile = N64 * 16;
    int8_t *bq = (int8_t *)g->scratch; /* TN_CHUNK / 16 tiles of quads */
    int32_t *c = (int32_t *)(((uintptr_t)(bq + (TN_CHUNK / 16) * tile) + 63) & ~(uintptr_t)63);
    for (int64_t c0 = g->lo; c0 < g->hi; c0 += TN_CHUNK) {
        const int64_t tiles = ((g->hi - c0 < TN_CHUNK ? g->hi - c0 : TN_CHUNK) + 15) / 16;
        weight_quads_q8(L, g->w, c0, tiles, N64, bq);
        for (int64_t mb = 0; mb < Mb; mb += 2) {
            const int64_t na = Mb - mb > 1 ? 2 : 1;
            const uint8_t *a0 = (const uint8_t *)(g->a_q8 + mb * 16 * N64), *a1 = a0 + 16 * N64;
            for (int64_t t = 0; t < tiles; t += 2) {
                const int64_t nb = tiles - t > 1 ? 2 : 1;
                const uint8_t *b0 = (const uint8_t *)(bq + t * tile), *b1 = b0 + tile;
                KT_BLOCK_DISPATCH_AS(1, na, nb, steps, a0, a1, 64, 1024, b0, b1, 1024, 64, NULL, (float *)c, 512);
                for (int64_t ia = 0; ia < na; ia++)
                    for (int64_t ib = 0; ib < nb; ib++) {
                        const int64_t m0 = (mb + ia) * 16, mv = g->M - m0 < 16 ? g->M - m0 : 16;
                        const int64_t col = c0 + (t + ib) * 16, w = g->hi - col < 16 ? g->hi - col : 16;
                        write_q8(g, c + (ia * 2 + ib) * 256, 0, m0, mv, col - g->lo, w, NULL);
                    }
            }
        }
    }
}
static void dots_amx(const float *M, int64_t r, int64_t n, const float *v, float *t) { fallback()->dots(M, r, n, v, t); }
static void axpy_amx(float alpha, const float *x, float *y, int64_t n) { fallback()->axpy(alpha, x, y, n); }

#ifndef AMX_ROWS_PER_TASK
#define AMX_ROWS_PER_TASK 256
#endif
#ifndef AMX_COLS_PER_TASK
#define AMX_COLS_PER_TASK 128
#endif

const kt_kernels kt_kernels_amx = {.name = "amx", .nt = nt_amx, .tn = tn_amx, .nt_q8 = nt_q8_amx, .tn_q8 = tn_q8_amx,
                                   .dots = dots_amx, .axpy = axpy_amx, .scratch_floats = scratch_floats_amx,
                                   .pack_bf16 = pack_bf16_amx, .pack_q8 = pack_q8_amx, .swiglu = kt_swiglu_avx512,
                                   .swiglu_bwd = kt_swiglu_bwd_avx512, .rows_per_task = AMX_ROWS_PER_TASK,
                                   .cols_per_task = AMX_COLS_PER_TASK, .quantize_row = kt_quantize_row_avx2};

#pragma GCC pop_options
#endif

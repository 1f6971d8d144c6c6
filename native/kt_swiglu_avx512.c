/* The SwiGLU activation and its gradient in zmm (AVX-512F), for the avx512 and amx tables.
 *
 * exp(x) = 2^n e^r, n = round(x log2 e), r = x - n ln 2 (two-part ln 2), |r| <= ln2/2, e^r by its
 * Taylor series to r^7 (truncation < 6e-9 relative, below fp32's half ulp), 2^n applied by
 * vscalefps, which gives inf / 0 past the range and keeps NaN. Results agree with the scalar
 * path's expf to about an ulp, so the two paths' h, dg, du differ in the last bit at most before
 * bf16 rounding. Rounding to bf16 (round_bf16) is the scalar rule (nearest even, NaN kept quiet)
 * in integer ops, so no BF16 instructions are needed.
 */
#include "kt_internal.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma")
#include <immintrin.h>

static inline __m512 exp16(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    /* |x| huge: n overflows the scale harmlessly (scalef saturates); NaN propagates through r */
    return _mm512_scalef_ps(p, n);
}

/* Round to bf16 (nearest even), back in fp32; NaN stays NaN (quiet). */
static inline __m512 round_bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u)));
}

static inline __m512 maybe_round(__m512 v, int round) { return round ? round_bf16(v) : v; }

static inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1); }

void kt_swiglu_avx512(const float *g, const float *u, float *h, int64_t n, int round) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail_mask(n - i);
        const __m512 gv = _mm512_maskz_loadu_ps(k, g + i), uv = _mm512_maskz_loadu_ps(k, u + i);
        const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        _mm512_mask_storeu_ps(h + i, k, maybe_round(_mm512_mul_ps(silu, uv), round));
    }
}

float kt_swiglu_bwd_avx512(const float *g, const float *u, const float *dhu, float w, float *dg, float *du, int64_t n,
                           int round) {
    const __m512 one = _mm512_set1_ps(1.0f), wv = _mm512_set1_ps(w);
    __m512 dot = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail_mask(n - i);
        const __m512 gv = _mm512_maskz_loadu_ps(k, g + i), uv = _mm512_maskz_loadu_ps(k, u + i);
        const __m512 dv = _mm512_maskz_loadu_ps(k, dhu + i);
        const __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        const __m512 gs = _mm512_mul_ps(gv, s);
        dot = _mm512_fmadd_ps(maybe_round(_mm512_mul_ps(gs, uv), round & KT_ROUND_H), dv, dot);
        const __m512 dh = _mm512_mul_ps(wv, dv);
        const __m512 dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one));
        _mm512_mask_storeu_ps(dg + i, k, maybe_round(_mm512_mul_ps(_mm512_mul_ps(dh, uv), dsilu), round & KT_ROUND_GRAD));
        _mm512_mask_storeu_ps(du + i, k, maybe_round(_mm512_mul_ps(dh, gs), round & KT_ROUND_GRAD));
    }
    return _mm512_reduce_add_ps(dot);
}

#pragma GCC pop_options
#endif

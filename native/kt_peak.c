/* The machine's own peak per instruction (`kt-sft doctor --peak`, the bench's "% of peak").
 *
 * Each probe runs a loop of independent accumulations (enough chains to cover the latency) on
 * every engine thread at once and counts multiply-adds as 2 operations:
 *   fma_ymm / fma_zmm  vfmadd231ps: 8 / 16 fp32 multiply-adds
 *   dpbf16_zmm         vdpbf16ps:   32 bf16 pair products into 16 fp32
 *   amx_bf16           tdpbf16ps:   16 x 16 x 32 bf16 multiply-adds into a 16 x 16 fp32 tile
 *   dpbusd_zmm         vpdpbusd:    64 u8 x s8 multiply-adds into 16 int32
 *   maddubs_ymm        vpmaddubsw + vpmaddwd + vpaddd: 32 u8 x s8 multiply-adds (AVX2's int8 dot)
 *   amx_int8           tdpbssd:     16 x 16 x 64 s8 multiply-adds into a 16 x 16 int32 tile
 *   maddwd_ymm         vpmaddwd + vpaddd: 16 int16 multiply-adds (the avx2 table's int8 mode)
 *   dpbusd_ymm         vpdpbusd (AVX-VNNI, VEX): 32 u8 x s8 multiply-adds into 8 int32
 * The loops never touch memory, so the result is the core's issue rate times the threads that
 * really ran in parallel (a busy machine reads low).
 */
#define _POSIX_C_SOURCE 200809L
#include <time.h>

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "kt_internal.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define CHAINS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define NCHAINS 12.0

/* One probe: NCHAINS independent accumulators of type T, each updated by OP per iteration;
 * OPS operations per update. The final sum escapes through an asm barrier. */
#define PROBE(name, isa, T, op, extract, ops)                                \
    __attribute__((target(isa))) static double name(int64_t iters) {        \
        CHAINS(PROBE_DECL_##T)                                              \
        for (int64_t it = 0; it < iters; it++) { CHAINS(op) }               \
        float s = 0;                                                        \
        CHAINS(extract)                                                     \
        __asm__ volatile("" : : "x"(s));                                    \
        return (double)iters * NCHAINS * (ops);                             \
    }
#define PROBE_DECL___m256(i) __m256 a##i = _mm256_set1_ps((float)(i) * 1e-3f);
#define PROBE_DECL___m512(i) __m512 a##i = _mm512_set1_ps((float)(i) * 1e-3f);
#define PROBE_DECL___m256i(i) __m256i a##i = _mm256_set1_epi32(i);
#define PROBE_DECL___m512i(i) __m512i a##i = _mm512_set1_epi32(i);

#define FMA_YMM(i) a##i = _mm256_fmadd_ps(a##i, _mm256_set1_ps(0.999f), _mm256_set1_ps(1e-4f));
#define FMA_ZMM(i) a##i = _mm512_fmadd_ps(a##i, _mm512_set1_ps(0.999f), _mm512_set1_ps(1e-4f));
#define DPBF16(i) a##i = _mm512_dpbf16_ps(a##i, (__m512bh)_mm512_set1_epi16(0x3f80), (__m512bh)_mm512_set1_epi16(0x3a00));
#define DPBUSD(i) a##i = _mm512_dpbusd_epi32(a##i, _mm512_set1_epi8(3), _mm512_set1_epi8(-2));
#define MADDUBS(i) a##i = _mm256_add_epi32(a##i, _mm256_madd_epi16(                                  \
        _mm256_maddubs_epi16(_mm256_set1_epi8(3), _mm256_set1_epi8((char)(-2 - (i) % 2))), _mm256_set1_epi16(1)));
#define MADDWD(i) a##i = _mm256_add_epi32(a##i, _mm256_madd_epi16(_mm256_set1_epi16(3), _mm256_set1_epi16((short)(-2 - (i) % 2))));
#define DPBUSD_Y(i) a##i = _mm256_dpbusd_avx_epi32(a##i, _mm256_set1_epi8(3), _mm256_set1_epi8(-2));
#define X_YMM(i) s += a##i[0];
#define X_ZMM(i) s += a##i[0];
#define X_ZMMI(i) s += (float)_mm512_cvtsi512_si32(a##i);
#define X_YMMI(i) s += (float)_mm256_cvtsi256_si32(a##i);

PROBE(probe_fma_ymm, "avx2,fma", __m256, FMA_YMM, X_YMM, 8 * 2)
PROBE(probe_fma_zmm, "avx512f,avx2,fma", __m512, FMA_ZMM, X_ZMM, 16 * 2)
PROBE(probe_dpbf16_zmm, "avx512f,avx512bf16,avx2,fma", __m512, DPBF16, X_ZMM, 32 * 2)
PROBE(probe_dpbusd_zmm, "avx512f,avx512bw,avx512vnni,avx2", __m512i, DPBUSD, X_ZMMI, 64 * 2)
PROBE(probe_maddubs_ymm, "avx2", __m256i, MADDUBS, X_YMMI, 32 * 2)
PROBE(probe_maddwd_ymm, "avx2", __m256i, MADDWD, X_YMMI, 16 * 2)
PROBE(probe_dpbusd_ymm, "avxvnni,avx2", __m256i, DPBUSD_Y, X_YMMI, 32 * 2)

__attribute__((target("amx-tile,amx-bf16,amx-int8"))) static double probe_amx(int64_t iters, int int8) {
    kt_amx_tiles_on();
    static const uint8_t src[1024] __attribute__((aligned(64))) = {0};
    _tile_loadd(4, src, 64);
    _tile_loadd(5, src, 64);
    _tile_loadd(6, src, 64);
    _tile_loadd(7, src, 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t it = 0; it < iters; it++) {
        if (int8) {
            _tile_dpbssd(0, 4, 6);
            _tile_dpbssd(1, 4, 7);
            _tile_dpbssd(2, 5, 6);
            _tile_dpbssd(3, 5, 7);
        } else {
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    float out[256] __attribute__((aligned(64)));
    _tile_stored(0, out, 64);
    _tile_release();
    __asm__ volatile("" : : "r"(out[0]));
    return (double)iters * 4 * 16 * 16 * (int8 ? 64 : 32) * 2;
}

static int probe_supported(int kind) {
    const unsigned f = kt_cpu_features();
    switch (kind) {
    case KT_PEAK_FMA_YMM: return (f & (KT_CPU_AVX2 | KT_CPU_FMA)) == (KT_CPU_AVX2 | KT_CPU_FMA);
    case KT_PEAK_FMA_ZMM: return (f & KT_CPU_AVX512F) != 0;
    case KT_PEAK_DPBF16_ZMM: return (f & KT_CPU_AVX512BF16) != 0;
    case KT_PEAK_AMX_BF16: return (f & KT_CPU_AMXBF16) && kt_amx_permitted();
    case KT_PEAK_DPBUSD_ZMM: return (f & (KT_CPU_AVX512VNNI | KT_CPU_AVX512BW)) == (KT_CPU_AVX512VNNI | KT_CPU_AVX512BW);
    case KT_PEAK_MADDUBS_YMM: return (f & KT_CPU_AVX2) != 0;
    case KT_PEAK_AMX_INT8: return (f & KT_CPU_AMXINT8) && kt_amx_permitted();
    case KT_PEAK_MADDWD_YMM: return (f & KT_CPU_AVX2) != 0;
    case KT_PEAK_DPBUSD_YMM: return (f & (KT_CPU_AVX2 | KT_CPU_AVXVNNI)) == (KT_CPU_AVX2 | KT_CPU_AVXVNNI);
    default: return 0;
    }
}

static double run_probe(int kind, int64_t iters) {
    switch (kind) {
    case KT_PEAK_FMA_YMM: return probe_fma_ymm(iters);
    case KT_PEAK_FMA_ZMM: return probe_fma_zmm(iters);
    case KT_PEAK_DPBF16_ZMM: return probe_dpbf16_zmm(iters);
    case KT_PEAK_AMX_BF16: return probe_amx(iters / 16, 0);
    case KT_PEAK_DPBUSD_ZMM: return probe_dpbusd_zmm(iters);
    case KT_PEAK_MADDUBS_YMM: return probe_maddubs_ymm(iters);
    case KT_PEAK_MADDWD_YMM: return probe_maddwd_ymm(iters);
    case KT_PEAK_DPBUSD_YMM: return probe_dpbusd_ymm(iters);
    default: return probe_amx(iters / 16, 1);
    }
}
#else
static int probe_supported(int kind) { (void)kind; return 0; }
static double run_probe(int kind, int64_t iters) { (void)kind; (void)iters; return 0.0; }
#endif

static double seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- the bf16 products' instruction (KT_BF16_DOT_*) --------------------------------------- */

/* vdpbf16ps pays where it does more multiply-adds per cycle than the zmm FMAs: measured 2.0x on
 * an EPYC Zen 4 (session 13), ~0.5x on Sapphire / Emerald Rapids (docs/engine.md). The margin keeps a machine
 * near parity, or a noisy probe, on the FMA kernels, so the choice (which changes the summation
 * order, hence the low bits) does not flip between runs. */
#define KT_DPBF16_MIN_RATIO 1.3

double kt_bf16_dot_ratio(void) {
    static _Atomic int state; /* 0: not measured, 1: measured */
    static _Atomic double ratio;
    if (atomic_load_explicit(&state, memory_order_acquire)) return atomic_load_explicit(&ratio, memory_order_relaxed);
    double r = -1.0;
    if (probe_supported(KT_PEAK_DPBF16_ZMM) && probe_supported(KT_PEAK_FMA_ZMM)) {
        double best_dp = 0.0, best_fma = 0.0;
        for (int rep = 0; rep < 5; rep++) { /* interleaved, so a busy moment hits both */
            double t0 = seconds(), ops = run_probe(KT_PEAK_DPBF16_ZMM, 1 << 15), dt = seconds() - t0;
            if (dt > 0 && ops / dt > best_dp) best_dp = ops / dt;
            t0 = seconds(), ops = run_probe(KT_PEAK_FMA_ZMM, 1 << 15), dt = seconds() - t0;
            if (dt > 0 && ops / dt > best_fma) best_fma = ops / dt;
        }
        r = best_fma > 0 ? best_dp / best_fma : -1.0;
    }
    atomic_store_explicit(&ratio, r, memory_order_relaxed);
    atomic_store_explicit(&state, 1, memory_order_release);
    return r;
}

int kt_bf16_dot(void) {
    if (!(kt_cpu_features() & KT_CPU_AVX512BF16)) return KT_BF16_DOT_FMA;
    const char *force = getenv("KT_SFT_BF16_DOT");
    if (force && strcmp(force, "dpbf16") == 0) return KT_BF16_DOT_DPBF16;
    if (force && strcmp(force, "fma") == 0) return KT_BF16_DOT_FMA;
    return kt_bf16_dot_ratio() >= KT_DPBF16_MIN_RATIO ? KT_BF16_DOT_DPBF16 : KT_BF16_DOT_FMA;
}

#define KT_MAX_PROBE_THREADS 256

typedef struct {
    int kind;
    int64_t iters;
    double ops[KT_MAX_PROBE_THREADS];
} probe_job;

static void probe_task(void *vj, int64_t task, int tid) {
    (void)tid;
    probe_job *j = vj;
    j->ops[task] = run_probe(j->kind, j->iters);
}

double kt_peak_gops(int kind, double min_seconds) {
    if (!probe_supported(kind)) return -1.0;
    int threads = kt_get_num_threads();
    if (threads > KT_MAX_PROBE_THREADS) threads = KT_MAX_PROBE_THREADS;
    probe_job j = {kind, 1 << 16, {0}};
    for (;;) {
        const double t0 = seconds();
        kt_parallel_for(threads, probe_task, &j);
        const double dt = seconds() - t0;
        if (dt >= min_seconds || j.iters > ((int64_t)1 << 40)) {
            double ops = 0.0;
            for (int t = 0; t < threads; t++) ops += j.ops[t];
            return ops / dt * 1e-9;
        }
        j.iters *= dt > 1e-3 ? (int64_t)(min_seconds / dt) + 1 : 16;
    }
}

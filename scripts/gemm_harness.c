/* One core, the avx512 path's products in isolation: how far the whole product (panels built from
 * weights that stream from memory, as in the engine) falls below its own micro-kernel.
 *
 * Built and run by scripts/gemm_harness.sh (it includes native/kt_kernels_avx512.c to reach its
 * static functions). Per pack format and direction, on DeepSeek-V2-Lite's W_gu (N = 2816 rows,
 * K = 2048) and M tokens of one expert, for one kind of kernel:
 *   fma  the bf16 / f32 modes' zmm FMA tiles on the prepared fp32 operand (the k-outer form, M >= 96)
 *   dp   the bf16 mode's vdpbf16ps tiles on bf16 pairs (needs AVX512-BF16; the kernels Zen 4 runs;
 *        the bf16 pack's nt product is nt_lanes, which builds no panel; M from 1)
 *   q8   the int8 mode's vpdpbusd tiles on int8 rows (needs AVX512-VNNI; int4 packs: forward only)
 * and two timings:
 *   kernel   the tile alone, its panel and operand in cache (16 tiles over one panel, as the
 *            product runs them: a KC slice for fma / dp; for q8 the job's M / 12 int8 12 x 32
 *            tiles over the whole contraction, on both its rows)
 *   product  nt_avx512 / tn_avx512 / the vpdpbusd products over `experts` copies of the matrix, in
 *            256-wide tasks, so the weights come from memory as in a layer call
 * Rounds alternate the two; medians, and each as % of one core's peak of the kind's instruction
 * (kt_peak_gops, measured first). Noise on a shared host moves both, so read the ratio of the two
 * within a round. Session 14 (Zen 4): dp products 80-90% of their kernel (panel builds ~5-9%, the
 * weights' arrival ~4-6%), q8 products ~84%. */
#define _GNU_SOURCE
#include "kt_kernels_avx512.c"

#include <stdio.h>
#include <sys/mman.h>
#include <time.h>

#include "kt_sft.h"

static double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Finite weights of a realistic size: bf16 values of magnitude 2^-7 .. 2^-6, int8 quants with scale
 * 1e-3, int4 nibbles with fp16 scale 2^-7 (no denormal products: those take microcode assists). */
static void fill_weights(const kt_matrix_layout *L, uint8_t *w, int experts) {
    uint32_t s = 12345;
    for (size_t i = 0; i < L->bytes * (size_t)experts; i++) {
        s = s * 1664525u + 1013904223u;
        w[i] = (uint8_t)(s >> 24);
    }
    for (int e = 0; e < experts; e++) {
        uint8_t *m = w + (size_t)e * L->bytes;
        if (L->format == KT_FORMAT_BF16) {
            uint16_t *v = (uint16_t *)m;
            for (int64_t i = 0; i < L->N * L->K; i++) v[i] = (uint16_t)(0x3c00 | (v[i] & 0x807f));
        } else if (L->format == KT_FORMAT_INT8) {
            for (int64_t n = 0; n < L->N; n++) ((float *)(m + L->scales_offset))[n] = 1e-3f;
        } else {
            uint16_t *d = (uint16_t *)(m + L->scales_offset);
            for (int64_t i = 0; i < L->N * (L->K_pad / KT_INT4_BLOCK); i++) d[i] = 0x2000; /* fp16 2^-7 */
        }
    }
}

enum { KIND_FMA, KIND_DP, KIND_Q8 };

/* The kernel's data: 16 operand tiles and one panel, in cache. */
typedef struct {
    int kind;
    const float *A;     /* fma: 16 tiles of MR x KC floats */
    const uint32_t *Ap; /* dp: 16 tiles of MR x KC pairs */
    const void *P;      /* the panel: fma KC x NR floats, dp KC x NR pairs, q8 K / 4 x 32 quads */
    const kt_gemm *g;   /* q8: the job whose full 12-row tiles run (its out_rows take the results) */
    float (*c)[NR];
} kernel_data;

static KT_VNNI_TARGET void build_q8_panel(const kt_matrix_layout *L, const uint8_t *w, int32_t *P) {
    q8_panel_rows(KT_FORMAT_INT8, L, w, 0, QNR, P, NULL);
}

static KT_VNNI_TARGET void run_q8_tiles(const kernel_data *d) {
    const zf ones = ZMM(set1_ps)(1.0f);
    for (int64_t t = 0; t < d->g->M / QMR8; t++) nt_q8_int8_tiles[QMR8](d->g, t * QMR8, d->P, ones, ones, 0, QNR);
}

/* G ops/s of the micro-kernel alone for `seconds` (a multiply-add is 2). */
static double run_kernel(const kernel_data *d, double seconds) {
    const int tiles = 16;
    double ops = 0.0;
    const double t0 = seconds_now();
    while (seconds_now() - t0 < seconds) {
        for (int rep = 0; rep < 64; rep++) {
            if (d->kind == KIND_Q8) {
                run_q8_tiles(d);
                continue;
            }
            for (int t = 0; t < tiles; t++) {
                if (d->kind == KIND_FMA) ukernels_packed[MR](KC, d->A + (size_t)t * MR * KC, d->P, d->c + t * MR, 1);
                else ukernels_dp[MR](KC, d->Ap + (size_t)t * MR * KC, d->P, d->c + t * MR, 1);
            }
        }
        /* a dp step is a pair of the contraction; q8 runs the job's full tiles over the whole K = 2048 */
        if (d->kind == KIND_Q8) ops += 64.0 * (double)(d->g->M / QMR8) * 2.0 * QMR8 * QNR * 2048;
        else ops += 64.0 * tiles * 2.0 * MR * NR * (d->kind == KIND_FMA ? KC : 2 * KC);
    }
    return ops / (seconds_now() - t0) * 1e-9;
}

/* GFLOP/s of whole products over all experts' matrices for `seconds`. */
static double run_product(int tn, const kt_matrix_layout *L, const uint8_t *w, int experts, kt_gemm g,
                          double seconds) {
    const int64_t outputs = tn ? L->K : L->N, C = tn ? L->N : L->K;
    double flops = 0.0;
    const double t0 = seconds_now();
    while (seconds_now() - t0 < seconds) {
        for (int e = 0; e < experts; e++)
            for (int64_t lo = 0; lo < outputs; lo += TASK_WIDTH) {
                g.w = w + (size_t)e * L->bytes;
                g.lo = lo;
                g.hi = lo + TASK_WIDTH < outputs ? lo + TASK_WIDTH : outputs;
                if (g.a_scale) (tn ? tn_q8_avx512 : nt_q8_avx512)(&g);
                else if (tn) tn_avx512(&g);
                else nt_avx512(&g);
                flops += 2.0 * (double)g.M * (double)C * (double)(g.hi - g.lo);
            }
    }
    return flops / (seconds_now() - t0) * 1e-9;
}

int main(int argc, char **argv) {
    const int64_t M = argc > 1 ? atoll(argv[1]) : 192;
    const int experts = argc > 2 ? atoi(argv[2]) : 16, rounds = argc > 3 ? atoi(argv[3]) : 5;
    const char *kind_name = argc > 4 ? argv[4] : "fma";
    const int kind = !strcmp(kind_name, "fma") ? KIND_FMA : !strcmp(kind_name, "dp") ? KIND_DP
                     : !strcmp(kind_name, "q8") ? KIND_Q8 : -1;
    const double seconds = 0.5;
    if (M < (kind == KIND_DP ? 1 : KO_NT_MIN_M) || M > MG || experts < 1 || rounds < 1 || rounds > 64 || kind < 0) {
        fprintf(stderr, "usage: gemm_harness [M in %d..%d] [experts >= 1] [rounds 1..64] [fma|dp|q8]\n",
                KO_NT_MIN_M, MG);
        return 2;
    }
    /* what the avx512 kernel table needs (kt_core.c: CPUID and the OS's ZMM state), and the kind's instruction */
    const int need = KT_CPU_AVX2 | KT_CPU_FMA | KT_CPU_F16C | KT_CPU_AVX512F | KT_CPU_AVX512BW | KT_CPU_AVX512VL |
                     KT_CPU_AVX512DQ;
    if ((kt_cpu_features() & need) != need) {
        fprintf(stderr, "gemm_harness: this CPU lacks AVX-512 F/BW/VL/DQ (or AVX2/FMA/F16C)\n");
        return 2;
    }
    if ((kind == KIND_DP && !(kt_cpu_features() & KT_CPU_AVX512BF16)) ||
        (kind == KIND_Q8 && !(kt_cpu_features() & KT_CPU_AVX512VNNI))) {
        fprintf(stderr, "gemm_harness: this CPU lacks %s for the %s kernels\n",
                kind == KIND_DP ? "AVX512-BF16" : "AVX512-VNNI", kind_name);
        return 2;
    }
    kt_set_num_threads(1);
    static const int peak_of[3] = {KT_PEAK_FMA_ZMM, KT_PEAK_DPBF16_ZMM, KT_PEAK_DPBUSD_ZMM};
    static const char *peak_name[3] = {"zmm FMA", "vdpbf16ps", "vpdpbusd"};
    const double peak = kt_peak_gops(peak_of[kind], 0.5);
    printf("one core, %s peak %.1f G ops/s; %s kernels; M = %lld tokens, %d experts, KC = %d, %d rounds\n",
           peak_name[kind], peak, kind_name, (long long)M, experts, KC, rounds);
    printf("%-5s %-3s %16s %16s %9s\n", "fmt", "dir", "kernel G ops/s", "product G ops/s", "product/kernel");

    /* the fma / dp kernels' data: 16 operand tiles and one panel slice, in cache */
    float *A = aligned_alloc(64, sizeof(float) * 16 * MR * KC), *P = aligned_alloc(64, sizeof(float) * KC * NR);
    float (*c)[NR] = aligned_alloc(64, sizeof(float) * 16 * MR * NR);
    for (int i = 0; i < 16 * MR * KC; i++) A[i] = (float)(i % 13 - 6) * 0.0625f;
    for (int i = 0; i < KC * NR; i++) P[i] = (float)(i % 7 - 3) * 0.0078125f;
    if (kind == KIND_DP) /* bf16 pairs of small normal values: 0x3c00 | low bits, both halves */
        for (int i = 0; i < 16 * MR * KC; i++) ((uint32_t *)A)[i] = ((uint32_t *)P)[i % (KC * NR)] = 0x3c003c00u | (uint32_t)(i % 7);
    memset(c, 0, sizeof(float) * 16 * MR * NR);

    static const int formats[3] = {KT_FORMAT_BF16, KT_FORMAT_INT8, KT_FORMAT_INT4};
    static const char *names[3] = {"bf16", "int8", "int4"};
    for (int f = 0; f < 3; f++) {
        if (kind == KIND_Q8 && formats[f] == KT_FORMAT_BF16) continue; /* the int8 mode runs int8 / int4 packs */
        kt_matrix_layout L;
        if (kt_matrix_layout_of(formats[f], 2816, 2048, &L)) return 1;
        const size_t bytes = L.bytes * (size_t)experts, huge = (size_t)2 << 20;
        uint8_t *w = aligned_alloc(huge, (bytes + huge - 1) / huge * huge);
        madvise(w, bytes, MADV_HUGEPAGE); /* as the engine asks for its packs */
        fill_weights(&L, w, experts);
        for (int tn = 0; tn < 2; tn++) {
            if (kind == KIND_Q8 && tn && formats[f] != KT_FORMAT_INT8) continue; /* no vpdpbusd tn for int4 */
            const int64_t C = tn ? L.N : L.K, Cr = (C + 63) & ~(int64_t)63;
            float *rows = aligned_alloc(64, sizeof(float) * (size_t)(M * Cr));
            int8_t *qrows = aligned_alloc(64, (size_t)(M * Cr));
            const void **arows = malloc(sizeof(void *) * (size_t)M);
            float *out = aligned_alloc(64, sizeof(float) * (size_t)(M * TASK_WIDTH)), **orows = malloc(sizeof(void *) * (size_t)M);
            float *scales = malloc(sizeof(float) * (size_t)M);
            for (int64_t i = 0; i < M * Cr; i++) rows[i] = (float)(i % 13 - 6) * 0.0625f, qrows[i] = (int8_t)(i % 13 - 6);
            for (int64_t m = 0; m < M; m++) {
                arows[m] = kind == KIND_Q8 ? (const void *)(qrows + m * Cr) : (const void *)(rows + m * Cr);
                orows[m] = out + m * TASK_WIDTH, scales[m] = 0.01f;
            }
            float *Af = aligned_alloc(64, sizeof(float) * (size_t)((M + MR) * Cr));
            if (kind == KIND_DP) pack_pairs_avx512((const float *const *)arows, M, C, !tn && formats[f] == KT_FORMAT_BF16 ? KT_PAIRS_LANES : KT_PAIRS_TILES, (uint32_t *)Af);
            else if (kind == KIND_FMA) pack_f32_avx512((const float *const *)arows, M, C, Af);
            float *scratch = aligned_alloc(64, sizeof(float) * (size_t)scratch_floats_avx512(L.N, L.K_pad));
            kt_gemm g = {.L = &L, .M = M, .a_rows = (const void *const *)arows, .out_rows = orows, .scratch = scratch};
            if (kind == KIND_FMA) g.a_f32 = Af;
            if (kind == KIND_DP) g.a_pairs = (const uint32_t *)Af, g.round_w = formats[f] != KT_FORMAT_BF16;
            if (kind == KIND_Q8) g.a_scale = scales;
            kernel_data kd = {.kind = kind, .A = A, .Ap = (const uint32_t *)A, .P = P, .g = &g, .c = c};
            int32_t *Pq = NULL;
            if (kind == KIND_Q8) { /* the int8 tile over one panel of the first expert, in cache */
                Pq = aligned_alloc(64, sizeof(int32_t) * (size_t)(L.K_pad / 4 + 16) * QNR);
                build_q8_panel(&L, w, Pq);
                kd.P = Pq;
            }
            double k[64], p[64], ratio[64];
            for (int r = 0; r < rounds; r++) {
                k[r] = run_kernel(&kd, seconds);
                p[r] = run_product(tn, &L, w, experts, g, seconds);
                ratio[r] = p[r] / k[r];
            }
            const double km = median(k, rounds), pm = median(p, rounds), rm = median(ratio, rounds);
            printf("%-5s %-3s %8.1f (%3.0f%%) %8.1f (%3.0f%%) %8.2f\n", names[f], tn ? "tn" : "nt", km,
                   100 * km / peak, pm, 100 * pm / peak, rm);
            free(rows), free(qrows), free(arows), free(out), free(orows), free(scales), free(Af), free(scratch), free(Pq);
        }
        free(w);
    }
    free(A), free(P), free(c);
    return 0;
}

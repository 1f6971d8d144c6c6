/* One core, the avx512 path's products in isolation: how far the whole product (panels built from
 * weights that stream from memory, as in the engine) falls below its own micro-kernel.
 *
 * Built and run by scripts/gemm_harness.sh (it includes native/kt_kernels_avx512.c to reach its
 * static functions). Per pack format and direction, on DeepSeek-V2-Lite's W_gu (N = 2816 rows,
 * K = 2048) and M tokens of one expert (prepared operand, the k-outer form of the engine at M >= 96):
 *   kernel   the 12 x 32 micro-kernel alone, its panel slice and operand tiles in cache
 *            (16 tiles over one KC x 32 panel slice, as the k-outer form runs them)
 *   product  nt_avx512 (forward, 256-row tasks) or tn_avx512 (backward, 256-column tasks) over
 *            `experts` copies of the matrix, so the weights come from memory as in a layer call
 * Rounds alternate the two; medians, and each as % of one core's zmm FMA peak (kt_peak_gops, measured
 * first). Noise on a shared host moves both, so read the ratio of the two within a round. */
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

/* GFLOP/s of the micro-kernel alone for `seconds`. */
static double run_kernel(const float *A, const float *P, float (*c)[NR], double seconds) {
    const int tiles = 16;
    double flops = 0.0;
    const double t0 = seconds_now();
    while (seconds_now() - t0 < seconds) {
        for (int rep = 0; rep < 64; rep++)
            for (int t = 0; t < tiles; t++) ukernels_packed[MR](KC, A + (size_t)t * MR * KC, P, c + t * MR, 1);
        flops += 64.0 * tiles * 2.0 * MR * NR * KC;
    }
    return flops / (seconds_now() - t0) * 1e-9;
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
                if (tn) tn_avx512(&g);
                else nt_avx512(&g);
                flops += 2.0 * (double)g.M * (double)C * (double)(g.hi - g.lo);
            }
    }
    return flops / (seconds_now() - t0) * 1e-9;
}

int main(int argc, char **argv) {
    const int64_t M = argc > 1 ? atoll(argv[1]) : 192;
    const int experts = argc > 2 ? atoi(argv[2]) : 16, rounds = argc > 3 ? atoi(argv[3]) : 5;
    const double seconds = 0.5;
    if (M < KO_NT_MIN_M || M > MG || experts < 1 || rounds < 1 || rounds > 64) {
        fprintf(stderr, "usage: gemm_harness [M in %d..%d] [experts >= 1] [rounds 1..64]\n", KO_NT_MIN_M, MG);
        return 2;
    }
    /* what the avx512 kernel table needs (kt_core.c: CPUID and the OS's ZMM state) */
    const int need = KT_CPU_AVX2 | KT_CPU_FMA | KT_CPU_F16C | KT_CPU_AVX512F | KT_CPU_AVX512BW | KT_CPU_AVX512VL |
                     KT_CPU_AVX512DQ;
    if ((kt_cpu_features() & need) != need) {
        fprintf(stderr, "gemm_harness: this CPU lacks AVX-512 F/BW/VL/DQ (or AVX2/FMA/F16C)\n");
        return 2;
    }
    kt_set_num_threads(1);
    const double peak = kt_peak_gops(KT_PEAK_FMA_ZMM, 0.5);
    printf("one core, zmm FMA peak %.1f GFLOP/s; M = %lld tokens, %d experts, KC = %d, %d rounds\n", peak,
           (long long)M, experts, KC, rounds);
    printf("%-5s %-3s %16s %16s %9s\n", "fmt", "dir", "kernel GFLOP/s", "product GFLOP/s", "product/kernel");

    /* the kernel's data: 16 operand tiles and one panel slice, in cache */
    float *A = aligned_alloc(64, sizeof(float) * 16 * MR * KC), *P = aligned_alloc(64, sizeof(float) * KC * NR);
    float (*c)[NR] = aligned_alloc(64, sizeof(float) * 16 * MR * NR);
    for (int i = 0; i < 16 * MR * KC; i++) A[i] = (float)(i % 13 - 6) * 0.0625f;
    for (int i = 0; i < KC * NR; i++) P[i] = (float)(i % 7 - 3) * 0.0078125f;
    memset(c, 0, sizeof(float) * 16 * MR * NR);

    static const int formats[3] = {KT_FORMAT_BF16, KT_FORMAT_INT8, KT_FORMAT_INT4};
    static const char *names[3] = {"bf16", "int8", "int4"};
    for (int f = 0; f < 3; f++) {
        kt_matrix_layout L;
        if (kt_matrix_layout_of(formats[f], 2816, 2048, &L)) return 1;
        const size_t bytes = L.bytes * (size_t)experts, huge = (size_t)2 << 20;
        uint8_t *w = aligned_alloc(huge, (bytes + huge - 1) / huge * huge);
        madvise(w, bytes, MADV_HUGEPAGE); /* as the engine asks for its packs */
        fill_weights(&L, w, experts);
        for (int tn = 0; tn < 2; tn++) {
            const int64_t C = tn ? L.N : L.K, Cr = (C + 31) & ~(int64_t)31;
            float *rows = aligned_alloc(64, sizeof(float) * (size_t)(M * Cr));
            const float **arows = malloc(sizeof(void *) * (size_t)M);
            float *out = aligned_alloc(64, sizeof(float) * (size_t)(M * TASK_WIDTH)), **orows = malloc(sizeof(void *) * (size_t)M);
            for (int64_t i = 0; i < M * Cr; i++) rows[i] = (float)(i % 13 - 6) * 0.0625f;
            for (int64_t m = 0; m < M; m++) arows[m] = rows + m * Cr, orows[m] = out + m * TASK_WIDTH;
            float *Af = aligned_alloc(64, sizeof(float) * (size_t)((M + MR) * Cr));
            pack_f32_avx512(arows, M, C, Af);
            float *scratch = aligned_alloc(64, sizeof(float) * (size_t)scratch_floats_avx512(L.N, L.K_pad));
            const kt_gemm g = {.L = &L, .M = M, .a_rows = (const void *const *)arows, .out_rows = orows,
                               .scratch = scratch, .a_f32 = Af};
            double k[64], p[64], ratio[64];
            for (int r = 0; r < rounds; r++) {
                k[r] = run_kernel(A, P, c, seconds);
                p[r] = run_product(tn, &L, w, experts, g, seconds);
                ratio[r] = p[r] / k[r];
            }
            const double km = median(k, rounds), pm = median(p, rounds), rm = median(ratio, rounds);
            printf("%-5s %-3s %8.1f (%3.0f%%) %8.1f (%3.0f%%) %8.2f\n", names[f], tn ? "tn" : "nt", km,
                   100 * km / peak, pm, 100 * pm / peak, rm);
            free(rows), free(arows), free(out), free(orows), free(Af), free(scratch);
        }
        free(w);
    }
    free(A), free(P), free(c);
    return 0;
}

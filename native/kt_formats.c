/* Packed expert formats: geometry, scalar reference quantizers and dequantizers. */
#include <stdlib.h>

#include "kt_internal.h"

static int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

int kt_matrix_layout_of(int format, int64_t N, int64_t K, kt_matrix_layout *L) {
    if (N < 1 || K < 1) KT_FAIL(KT_EINVAL, "matrix shape must be positive, got N=%lld K=%lld", (long long)N, (long long)K);
    L->format = format;
    L->N = N;
    L->K = K;
    size_t scales;
    switch (format) {
    case KT_FORMAT_BF16:
        L->K_pad = round_up(K, KT_BF16_BLOCK);
        L->row_bytes = (size_t)L->K_pad * 2;
        scales = 0;
        break;
    case KT_FORMAT_INT8:
        L->K_pad = round_up(K, KT_INT8_BLOCK);
        L->row_bytes = (size_t)L->K_pad;
        scales = (size_t)N * 4;
        break;
    case KT_FORMAT_INT4:
        L->K_pad = round_up(K, KT_INT4_BLOCK);
        L->row_bytes = (size_t)L->K_pad / 2;
        scales = (size_t)N * (size_t)(L->K_pad / KT_INT4_BLOCK) * 2;
        break;
    default: KT_FAIL(KT_EINVAL, "unknown format %d", format);
    }
    L->scales_offset = (size_t)round_up((int64_t)(L->row_bytes * (size_t)N), 64);
    L->bytes = (size_t)round_up((int64_t)(L->scales_offset + scales), 64);
    return KT_OK;
}

size_t kt_matrix_bytes(int format, int64_t N, int64_t K) {
    kt_matrix_layout L;
    return kt_matrix_layout_of(format, N, K, &L) == KT_OK ? L.bytes : 0;
}

int64_t kt_padded_k(int format, int64_t K) {
    kt_matrix_layout L;
    return kt_matrix_layout_of(format, 1, K, &L) == KT_OK ? L.K_pad : -1;
}

/* ---- one row ------------------------------------------------------------------------------ */

static void quantize_row(const kt_matrix_layout *L, const float *w, uint8_t *mat, int64_t n) {
    uint8_t *row = mat + (size_t)n * L->row_bytes;
    const int64_t K = L->K, K_pad = L->K_pad;
    switch (L->format) {
    case KT_FORMAT_BF16: {
        uint16_t *q = (uint16_t *)row;
        for (int64_t k = 0; k < K_pad; k++) q[k] = k < K ? kt_f32_to_bf16(w[k]) : 0;
        break;
    }
    case KT_FORMAT_INT8: {
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(w[k]));
        float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        int8_t *q = (int8_t *)row;
        for (int64_t k = 0; k < K_pad; k++) q[k] = k < K ? (int8_t)lrintf(w[k] * id) : 0;
        ((float *)(mat + L->scales_offset))[n] = d;
        break;
    }
    case KT_FORMAT_INT4: {
        const int64_t nb = K_pad / KT_INT4_BLOCK;
        uint16_t *scales = (uint16_t *)(mat + L->scales_offset) + (size_t)n * (size_t)nb;
        for (int64_t b = 0; b < nb; b++) {
            float v[KT_INT4_BLOCK], m = 0.0f;
            for (int j = 0; j < KT_INT4_BLOCK; j++) {
                int64_t k = b * KT_INT4_BLOCK + j;
                v[j] = k < K ? w[k] : 0.0f;
                if (fabsf(v[j]) > fabsf(m)) m = v[j];
            }
            /* store the scale rounded to fp16 and quantize against the rounded value */
            uint16_t dh = kt_f32_to_fp16(m / -8.0f);
            float d = kt_fp16_to_f32(dh), id = d != 0.0f ? 1.0f / d : 0.0f;
            scales[b] = dh;
            uint8_t *qs = row + b * (KT_INT4_BLOCK / 2);
            for (int j = 0; j < KT_INT4_BLOCK / 2; j++) {
                long lo = lrintf(v[j] * id) + 8, hi = lrintf(v[j + 16] * id) + 8;
                lo = lo < 0 ? 0 : lo > 15 ? 15 : lo;
                hi = hi < 0 ? 0 : hi > 15 ? 15 : hi;
                qs[j] = (uint8_t)(lo | (hi << 4));
            }
        }
        break;
    }
    }
}

void kt_dequant_row_segment(const kt_matrix_layout *L, const uint8_t *mat, int64_t n, int64_t k0,
                            int64_t k1, float *out) {
    const uint8_t *row = mat + (size_t)n * L->row_bytes;
    switch (L->format) {
    case KT_FORMAT_BF16: {
        const uint16_t *q = (const uint16_t *)row;
        for (int64_t k = k0; k < k1; k++) out[k - k0] = kt_bf16_to_f32(q[k]);
        break;
    }
    case KT_FORMAT_INT8: {
        const int8_t *q = (const int8_t *)row;
        const float d = ((const float *)(mat + L->scales_offset))[n];
        for (int64_t k = k0; k < k1; k++) out[k - k0] = d * (float)q[k];
        break;
    }
    case KT_FORMAT_INT4: {
        const int64_t nb = L->K_pad / KT_INT4_BLOCK;
        const uint16_t *scales = (const uint16_t *)(mat + L->scales_offset) + (size_t)n * (size_t)nb;
        for (int64_t k = k0; k < k1; k++) {
            int64_t b = k / KT_INT4_BLOCK, j = k % KT_INT4_BLOCK;
            uint8_t byte = row[b * (KT_INT4_BLOCK / 2) + (j & 15)];
            int q = j < 16 ? (byte & 0x0f) : (byte >> 4);
            out[k - k0] = kt_fp16_to_f32(scales[b]) * (float)(q - 8);
        }
        break;
    }
    }
}

/* ---- whole matrices ----------------------------------------------------------------------- */

int kt_quantize_matrix(int format, const float *w, int64_t N, int64_t K, void *dst) {
    kt_matrix_layout L;
    int rc = kt_matrix_layout_of(format, N, K, &L);
    if (rc) return rc;
    memset(dst, 0, L.bytes);
    for (int64_t n = 0; n < N; n++) quantize_row(&L, w + n * K, (uint8_t *)dst, n);
    return KT_OK;
}

int kt_dequantize_matrix(int format, const void *src, int64_t N, int64_t K, float *w) {
    kt_matrix_layout L;
    int rc = kt_matrix_layout_of(format, N, K, &L);
    if (rc) return rc;
    for (int64_t n = 0; n < N; n++) kt_dequant_row_segment(&L, (const uint8_t *)src, n, 0, K, w + n * K);
    return KT_OK;
}

typedef struct {
    kt_matrix_layout L;
    const void *src;
    int src_dtype;
    int64_t rows_per_task, total_rows;
    uint8_t *dst;
    float *rowbuf; /* one K-row per thread */
} quantize_job;

static void quantize_task(void *vctx, int64_t task, int tid) {
    quantize_job *j = vctx;
    const int64_t N = j->L.N, K = j->L.K;
    float *buf = j->rowbuf + (size_t)tid * (size_t)K;
    int64_t r1 = (task + 1) * j->rows_per_task;
    if (r1 > j->total_rows) r1 = j->total_rows;
    for (int64_t r = task * j->rows_per_task; r < r1; r++) {
        int64_t e = r / N, n = r % N;
        const float *w;
        if (j->src_dtype == KT_DTYPE_F32) {
            w = (const float *)j->src + r * K;
        } else {
            const uint16_t *s = (const uint16_t *)j->src + r * K;
            for (int64_t k = 0; k < K; k++) buf[k] = kt_bf16_to_f32(s[k]);
            w = buf;
        }
        quantize_row(&j->L, w, j->dst + (size_t)e * j->L.bytes, n);
    }
}

int kt_quantize_experts(int format, const void *src, int src_dtype, int64_t E, int64_t N, int64_t K,
                        void *dst) {
    quantize_job j;
    int rc = kt_matrix_layout_of(format, N, K, &j.L);
    if (rc) return rc;
    if (src_dtype != KT_DTYPE_F32 && src_dtype != KT_DTYPE_BF16) KT_FAIL(KT_EINVAL, "unknown dtype %d", src_dtype);
    memset(dst, 0, (size_t)E * j.L.bytes);
    j.src = src;
    j.src_dtype = src_dtype;
    j.dst = dst;
    j.total_rows = E * N;
    j.rows_per_task = 64;
    j.rowbuf = malloc(sizeof(float) * (size_t)K * (size_t)kt_get_num_threads());
    if (!j.rowbuf) KT_FAIL(KT_ENOMEM, "out of memory for %lld floats", (long long)K);
    kt_parallel_for((j.total_rows + j.rows_per_task - 1) / j.rows_per_task, quantize_task, &j);
    free(j.rowbuf);
    return KT_OK;
}

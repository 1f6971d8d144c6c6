/* libFuzzer harness for the C API: kt_moe_forward / kt_moe_backward / kt_quantize_experts /
 * kt_dequantize_matrix on every kernel path this CPU offers (scripts/fuzz.sh builds and runs it).
 *
 * Contract fuzzed (docs/reliability.md): the C side validates every *value* it is given -- shapes,
 * expert ids, compute mode, format, dtypes, LoRA rank, missing buffers -- and returns KT_EINVAL for
 * bad ones; buffer *lengths* stay the caller's precondition (C cannot know them). So this harness
 * draws arbitrary values, including invalid ones, but allocates every buffer with exactly the length
 * the documented shapes give (malloc, so ASan flags any byte read or written past it). Weights are
 * raw fuzz bytes used as packed matrices: any bit pattern (NaN scales, extreme quants) is a legal
 * input that must not crash. Checks beyond the sanitizers:
 *   - an expert id outside [0, E) must be rejected (rc == KT_EINVAL), never indexed;
 *   - a valid call returns KT_OK (or KT_EINVAL only for documented combinations);
 *   - the outputs of a valid call are written everywhere (no uninitialized element: y is pre-filled
 *     with a sentinel NaN payload, and a finite-input f32 call must overwrite all of it).
 *
 * Input layout: a 16-byte header of choices, then bytes consumed in order for ids, routing weights,
 * activations and weights (cycled if the input is short).
 */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kt_sft.h"

typedef struct {
    const uint8_t *p;
    size_t n, i;
} stream;

static uint8_t next_u8(stream *s) { return s->n ? s->p[s->i++ % s->n] : 0; }

/* dst[0..n) from the stream, cycling (weights are the bulk of an input) */
static void fill_bytes(stream *s, uint8_t *dst, size_t n) {
    if (!s->n) {
        memset(dst, 0, n);
        return;
    }
    for (size_t done = 0; done < n;) {
        size_t at = s->i % s->n, len = s->n - at < n - done ? s->n - at : n - done;
        memcpy(dst + done, s->p + at, len);
        done += len;
        s->i += len;
    }
}

static float next_f32(stream *s, int allow_special) {
    uint8_t b = next_u8(s);
    if (allow_special && b == 0xff) return NAN;
    if (allow_special && b == 0xfe) return INFINITY;
    return ((int)b - 128) / 32.0f;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) abort();
    return p;
}

static int g_paths[5], g_n_paths;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    const char *only = getenv("KT_FUZZ_PATHS"); /* e.g. "0 1 3": only these KT_ISA_* */
    for (int isa = 0; isa <= KT_ISA_AMX; isa++) {
        if (!kt_isa_supported(isa)) continue;
        if (only) {
            char key[4];
            snprintf(key, sizeof key, "%d", isa);
            if (!strstr(only, key)) continue;
        }
        g_paths[g_n_paths++] = isa;
    }
    if (g_n_paths == 0) g_paths[g_n_paths++] = KT_ISA_SCALAR;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 16) return 0;
    stream s = {data + 16, size - 16, 0};
    const uint8_t *h = data;
    const int isa = g_paths[h[0] % g_n_paths];
    const int format = h[1] % 4;                 /* 3: invalid */
    const int act_mode = h[2] % 4;               /* 3: invalid */
    const int64_t E = (int64_t)(h[3] % 7) - (h[3] == 255);        /* 0..6, -1 */
    const int64_t H = h[4] == 255 ? -1 : (int64_t)(h[4] % 72) + 1; /* crosses the 16/32/64 tails */
    const int64_t I = h[5] == 255 ? 0 : (int64_t)(h[5] % 40) + 1;
    const int64_t T = (int64_t)(h[6] % 20) - (h[6] == 255);
    const int64_t k = (int64_t)(h[7] % 5) + (h[7] == 255) * 4;   /* may exceed E */
    const int x_dtype = h[8] % 3;                /* 2: invalid */
    const int64_t r = h[9] % 4;                  /* LoRA rank, 0: none */
    const int bad_ids = (h[10] & 3) == 0;        /* a quarter of inputs carry an out-of-range id */
    const int threads = 1 + ((h[11] & 15) == 0); /* rarely 2: a worker handoff costs more than a call */
    const int null_buffer = h[12] == 255;        /* one missing buffer */
    const int special = (h[13] & 1) != 0;        /* NaN/Inf in activations and routing weights */
    /* the avx512 paths' bf16 products: vdpbf16ps kernels (where the path has them) or the FMA ones */
    setenv("KT_SFT_BF16_DOT", (h[13] & 2) ? "dpbf16" : "fma", 1);

    kt_select_isa(isa);
    kt_set_num_threads(threads);

    const int shapes_ok = E >= 1 && H >= 1 && I >= 1 && T >= 0 && k >= 1 && k <= E;
    const int64_t Es = E > 0 ? E : 1, Hs = H > 0 ? H : 1, Is = I > 0 ? I : 1, Ts = T > 0 ? T : 0,
                  ks = k > 0 ? k : 1, P = Ts * ks;
    const int fmt_ok = format <= KT_FORMAT_INT4;
    const size_t gu_bytes = fmt_ok ? kt_matrix_bytes(format, 2 * Is, Hs) : 64, dn_bytes = fmt_ok ? kt_matrix_bytes(format, Hs, Is) : 64;

    uint8_t *gate_up = xmalloc((size_t)Es * gu_bytes), *down = xmalloc((size_t)Es * dn_bytes);
    fill_bytes(&s, gate_up, (size_t)Es * gu_bytes);
    fill_bytes(&s, down, (size_t)Es * dn_bytes);
    int64_t *idx = xmalloc(sizeof(int64_t) * (size_t)P);
    float *w = xmalloc(sizeof(float) * (size_t)P);
    int any_bad_id = 0;
    for (int64_t p = 0; p < P; p++) {
        uint8_t b = next_u8(&s);
        idx[p] = (int64_t)(b % Es);
        if (bad_ids && b % 7 == 0) idx[p] = (b & 8) ? -1 - (int64_t)(b >> 4) : Es + (b >> 4);
        any_bad_id |= idx[p] < 0 || idx[p] >= Es;
        w[p] = next_f32(&s, special);
    }
    const size_t xe = x_dtype == KT_DTYPE_BF16 ? 2 : 4;
    uint8_t *x = xmalloc(xe * (size_t)(Ts * Hs)), *dy = xmalloc(xe * (size_t)(Ts * Hs));
    for (int64_t i = 0; i < Ts * Hs; i++) {
        float v = next_f32(&s, special), g = next_f32(&s, special);
        if (xe == 4) {
            memcpy(x + 4 * i, &v, 4);
            memcpy(dy + 4 * i, &g, 4);
        } else {
            uint32_t u, ug;
            memcpy(&u, &v, 4);
            memcpy(&ug, &g, 4);
            uint16_t b = (uint16_t)(u >> 16), bg = (uint16_t)(ug >> 16);
            memcpy(x + 2 * i, &b, 2);
            memcpy(dy + 2 * i, &bg, 2);
        }
    }
    float *y = xmalloc(sizeof(float) * (size_t)(Ts * Hs)), *gu = xmalloc(sizeof(float) * (size_t)(P * 2 * Is));
    float *dx = xmalloc(sizeof(float) * (size_t)(Ts * Hs)), *dw = xmalloc(sizeof(float) * (size_t)P);
    for (int64_t i = 0; i < Ts * Hs; i++) y[i] = -12345.0f;
    float *lora[8] = {0};
    const int64_t lora_n[4] = {2 * Is, Hs, Hs, Is}; /* gu_a, gu_b, d_a, d_b: (E, r, n) */
    for (int m = 0; m < 4 && r > 0; m++) {
        lora[m] = xmalloc(sizeof(float) * (size_t)(Es * r * lora_n[m]));
        lora[4 + m] = xmalloc(sizeof(float) * (size_t)(Es * r * lora_n[m]));
        for (int64_t i = 0; i < Es * r * lora_n[m]; i++) lora[m][i] = next_f32(&s, 0) / 8.0f;
    }

    kt_moe_args a;
    memset(&a, 0, sizeof a);
    a.format = format;
    a.act_mode = act_mode;
    a.E = E, a.H = H, a.I = I, a.T = T, a.k = k;
    a.gate_up = gate_up;
    a.down = null_buffer ? NULL : down;
    a.topk_idx = idx;
    a.topk_w = w;
    a.x = x;
    a.x_dtype = x_dtype;
    a.y = y;
    a.gu = gu;
    a.lora_r = r;
    a.lora_scale = 0.5f;
    a.lora_gu_a = lora[0], a.lora_gu_b = lora[1], a.lora_d_a = lora[2], a.lora_d_b = lora[3];

    const int valid = shapes_ok && fmt_ok && act_mode <= KT_ACT_INT8 && x_dtype <= KT_DTYPE_BF16 && !null_buffer &&
                      !(act_mode == KT_ACT_INT8 && format == KT_FORMAT_BF16);
    int rc = kt_moe_forward(&a);
    if (any_bad_id && shapes_ok && T > 0 && rc != KT_EINVAL) {
        fprintf(stderr, "expert id out of range accepted: rc=%d\n", rc);
        abort();
    }
    if (valid && !any_bad_id && rc != KT_OK) {
        fprintf(stderr, "valid forward refused: rc=%d %s\n", rc, kt_last_error());
        abort();
    }
    if (rc == KT_OK && valid && !any_bad_id) {
        for (int64_t i = 0; i < Ts * Hs; i++)
            if (y[i] == -12345.0f) {
                fprintf(stderr, "y[%lld] not written\n", (long long)i);
                abort();
            }
        a.dy = dy;
        a.dy_dtype = x_dtype;
        a.dx = dx;
        a.dw = dw;
        a.grad_gu_a = lora[4], a.grad_gu_b = lora[5], a.grad_d_a = lora[6], a.grad_d_b = lora[7];
        rc = kt_moe_backward(&a);
        if (rc != KT_OK) {
            fprintf(stderr, "valid backward refused: rc=%d %s\n", rc, kt_last_error());
            abort();
        }
    }

    /* quantize/dequantize round trip of fuzz floats as one (N, K) matrix per expert */
    if (fmt_ok && shapes_ok) {
        float *src = xmalloc(sizeof(float) * (size_t)(Es * Is * Hs)), *back = xmalloc(sizeof(float) * (size_t)(Is * Hs));
        for (int64_t i = 0; i < Es * Is * Hs; i++) src[i] = next_f32(&s, 0); /* finite: the documented precondition */
        uint8_t *packed = xmalloc((size_t)Es * kt_matrix_bytes(format, Is, Hs));
        if (kt_quantize_experts(format, src, KT_DTYPE_F32, Es, Is, Hs, packed) != KT_OK) abort();
        if (kt_dequantize_matrix(format, packed, Is, Hs, back) != KT_OK) abort();
        free(src), free(back), free(packed);
    }

    free(gate_up), free(down), free(idx), free(w), free(x), free(dy), free(y), free(gu), free(dx), free(dw);
    for (int m = 0; m < 8; m++) free(lora[m]);
    return 0;
}

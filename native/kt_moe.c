/* The routed-expert layer: grouping tokens by expert, the forward and backward phases, threading.
 *
 * Forward (P = T*k routing pairs, p = t*k + j, e = topk_idx[p]):
 *   F0  xa[t]          = x[t] in the compute precision                         tasks: token blocks
 *   F1  gu[p]          = W_gu[e] xa[t]  (gate rows 0..I, up rows I..2I)       tasks: (expert, I block)
 *       h[p]           = silu(g) * u
 *   F2  y[t]          += w[p] * W_d[e] h[p]                                    tasks: H blocks
 * Backward (frozen weights; gu saved by the forward, h recomputed from it):
 *   B0  za[t]          = dy[t] in the compute precision
 *   B1  dhu[p]         = W_d[e]^T za[t]                                        tasks: (expert, I block)
 *   B2  dw[p]          = <h[p], dhu[p]>           (= <expert output, dy>)      tasks: pair blocks
 *       dgu[p]         = [dh * u * silu'(g), dh * silu(g)],  dh = w[p] * dhu[p]
 *   B3  dx[t]          = sum_j W_gu[e]^T dgu[p]                                tasks: H blocks
 *
 * In the int8 compute mode the products read int8 activation rows with one scale each: x per token
 * (F0), h per pair (F1q), and in the backward -- int8 weights only -- the incoming gradients with the
 * weights' per-row scales folded in, per pair (B0q: dy * d_down, B2q: dgu * d_gate_up), so the
 * integer sums need no scale inside them. With int4 weights, whose per-block scales vary along the
 * backward's sums, the backward's gradients (dy, dgu) are rounded to bf16 as in the bf16 mode and
 * take the bf16 mode's products (prepared by B0p / B2p where the table has pack_bf16).
 *
 * LoRA (lora_r > 0; B maps a product's input to rank r, A maps rank r to its output, s the scale):
 *   F0L tg[p] = B_gu[e] xa[t]                     F1  gu[p] += s A_gu[e]^T tg[p]   (before h)
 *   F1L td[p] = B_d[e] h[p]                       F2  y[t]  += w[p] s A_d[e]^T td[p]
 *   B1L ud[p] = A_d[e] za[t],  dhu[p] += s B_d[e]^T ud[p],  td[p] again (h recomputed)
 *   B2L vg[p] = A_gu[e] dgu[p], tg[p] again       B3  dx[t] += s B_gu[e]^T vg[p]
 *   BG  dA_d[e] = s sum_p w td (x) za, dB_d[e] = s sum_p w ud (x) h,
 *       dA_gu[e] = s sum_p tg (x) dgu,  dB_gu[e] = s sum_p vg (x) xa           tasks: (expert, matrix)
 * The rank-r vectors are ~r/(2I) of the work; B1L adds into dhu before B2 reads it, so dw and dgu
 * include the LoRA path with no change to B2. LoRA math is fp32 on the compute-precision activations.
 *
 * Prepared operands (kernel tables with pack_bf16 / pack_q8, e.g. amx): in the bf16 compute mode, and
 * in the int8 mode with int8 weights, a phase after F0, F1(q), B0(q) and B2 (F0p, F1p, B0p, B2p; tasks:
 * experts) copies each expert group's activation rows (x, h, dy, dgu as bf16; or their int8 quantized
 * rows) once into the tile layout the table's products read (KT_PACK_*), so the products touch only
 * weights and that copy. The int8 mode's forward with int4 weights prepares its int8 rows as bf16
 * (KT_PACK_VNNI_BF16: exact, one bf16 tile step per 32-block). Tables with pack_f32 (avx512) get
 * the f32 / bf16 modes' float rows the same way, in their own fp32 layout (kt_gemm.a_f32).
 *
 * F2 and B3 own a block of output columns and walk the experts in order inside the task, so no two
 * threads write the same element and the summation order does not depend on the thread count:
 * results are bitwise repeatable.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "kt_internal.h"

#define ROWS_PER_TASK 32   /* I rows per (expert, block) task in F1 / B1, unless the table says */
#define COLS_PER_TASK 64   /* H columns per task in F2 / B3, unless the table says */
#define PAIRS_PER_TASK 64
#define TOKENS_PER_TASK 16

static pthread_mutex_t g_engine_lock = PTHREAD_MUTEX_INITIALIZER;

/* fork() while another thread is inside a layer call: the child would inherit g_engine_lock held by
 * a thread it does not have (and a workspace in use). The prepare handler waits for that call to
 * end. Registered on the first call, after the pool's handler (kt_core.c), so this lock is taken
 * before the pool's call_lock, the same order as in a layer call. */
static void engine_before_fork(void) { pthread_mutex_lock(&g_engine_lock); }
static void engine_after_fork(void) { pthread_mutex_unlock(&g_engine_lock); }
static void engine_register_atfork(void) { pthread_atfork(engine_before_fork, engine_after_fork, engine_after_fork); }
static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;

/* KT_SFT_PROFILE=1 prints each phase's wall time to stderr (the evidence for where time goes). */
static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

static void run_phase(const char *name, int64_t n_tasks, kt_task_fn fn, void *ctx) {
    static int profile = -1;
    if (profile < 0) profile = getenv("KT_SFT_PROFILE") && atoi(getenv("KT_SFT_PROFILE")) > 0;
    double t0 = profile ? now_ms() : 0.0;
    kt_parallel_for(n_tasks, fn, ctx);
    if (profile) fprintf(stderr, "[kt_sft] %s: %lld tasks, %.2f ms\n", name, (long long)n_tasks, now_ms() - t0);
}

typedef struct {
    const kt_moe_args *a;
    const kt_kernels *kern;
    kt_matrix_layout Lgu, Ld;
    int64_t P, I_blocks;
    int64_t rows_pt, cols_pt;  /* ROWS_PER_TASK / COLS_PER_TASK or the table's own (multiples of 32) */
    int32_t *offs;    /* E + 1 */
    int32_t *pairs;   /* P pair ids grouped by expert, ascending inside a group */
    int32_t *active;  /* experts that received at least one pair (E slots, then E fill cursors) */
    int64_t n_active;
    float *act;       /* (T, H): xa in the forward, za in the backward */
    float *gu;        /* (P, 2I) */
    float *h;         /* (P, I) */
    float *dgu;       /* (P, 2I) */
    int q_fwd, q_bwd; /* int8 activations in the forward / backward products */
    int grad_mode;    /* the backward's gradients (dy, dgu): act_mode, or bf16 for int8 mode + int4 */
    int64_t xq_ld, hq_ld, zq_ld;  /* row strides (bytes) of the quantized buffers, multiples of 64 */
    int8_t *xq, *hq, *zq;         /* (T, xq_ld) x; (P, hq_ld) h; (P, zq_ld) folded gradients */
    float *xs, *hs, *zs;          /* their row scales */
    int64_t r;                    /* LoRA rank, 0: none */
    float *tg, *td, *ud, *vg;     /* (P, r) each, see the top of the file */
    float *xa;                    /* (T, H) backward with LoRA: x in the compute precision */
    int prep;                     /* prepared bf16 operands (see the top of the file) */
    int prep8;                    /* prepared int8 operands (int8 mode, int8 weights) */
    int prep8_bf16;               /* forward, int8 mode, int4 weights: the int8 rows prepared as bf16 */
    int prep_f32;                 /* float operands prepared by the table's pack_f32 (twice the room) */
    int prep_pairs;               /* bf16-pair operands prepared by the table's pack_pairs */
    int64_t op_rows;              /* rows of one prepared operand */
    uint16_t *opb;                /* the current phase's operand, expert groups back to back */
    int64_t *blk16;               /* E + 1: 16-row blocks before each expert's group in opb */
    float *hb;                    /* (P, I) backward with LoRA: h, recomputed once by B1L for BG */
    /* per thread: M activation pointers, M output pointers, M multipliers, M scales, scratch */
    const void **arows;
    float **orows;
    float *alpha;
    float *ascale;
    float *scratch;
    size_t scratch_floats;
} moe_job;

/* z = v (* scale elementwise, when scale != NULL), q = round(z / s), s = absmax / 127, zero padding
 * to n_pad. A non-finite row gets s = NaN (its products become NaN, as the float path would give) and
 * q = 0. The reference for the tables' quantize_row (kt_kernels_avx2.c), which must match it bitwise. */
static float quantize_act_row(const float *v, const float *scale, int64_t n, int64_t n_pad, int8_t *q) {
    float amax = 0.0f, sc, inv;
    int finite = 1;
    kt_quant_absmax(v, scale, 0, n, &amax, &finite);
    if (kt_quant_scale(amax, finite, n, n_pad, q, &sc, &inv)) kt_quant_round(v, scale, 0, n, inv, q);
    return sc;
}

/* The table's vectorized quantize_row when it has one, else the loop above. */
static float quantize_row(const moe_job *j, const float *v, const float *scale, int64_t n, int64_t n_pad, int8_t *q) {
    return (j->kern->quantize_row ? j->kern->quantize_row : quantize_act_row)(v, scale, n, n_pad, q);
}

static int64_t round64(int64_t v) { return (v + 63) & ~(int64_t)63; }

static float to_compute(float v, int mode) { return mode == KT_ACT_BF16 ? kt_round_bf16(v) : v; }

static const uint8_t *expert_mat(const void *base, const kt_matrix_layout *L, int64_t e) {
    return (const uint8_t *)base + (size_t)e * L->bytes;
}

/* ---- setup -------------------------------------------------------------------------------- */

static int job_init(moe_job *j, const kt_moe_args *a, int backward) {
    memset(j, 0, sizeof *j);
    j->a = a;
    j->kern = kt_active_kernels();
    if (!j->kern) KT_FAIL(KT_EUNSUPPORTED, "no kernel path available");
    if (a->act_mode != KT_ACT_F32 && a->act_mode != KT_ACT_BF16 && a->act_mode != KT_ACT_INT8)
        KT_FAIL(KT_EINVAL, "unknown compute mode %d", a->act_mode);
    if (a->act_mode == KT_ACT_INT8 && a->format == KT_FORMAT_BF16)
        KT_FAIL(KT_EINVAL, "compute mode int8 needs int8 or int4 weights, not bf16");
    j->q_fwd = a->act_mode == KT_ACT_INT8;
    j->q_bwd = j->q_fwd && backward && a->format == KT_FORMAT_INT8;
    /* int8 mode, int4 weights: the per-block scales vary along the backward's sums, so its gradients
     * cannot be folded and quantized per pair; they are rounded to bf16 as in the bf16 mode */
    j->grad_mode = a->act_mode == KT_ACT_INT8 && a->format == KT_FORMAT_INT4 ? KT_ACT_BF16 : a->act_mode;
    int rc = kt_matrix_layout_of(a->format, 2 * a->I, a->H, &j->Lgu);
    if (rc) return rc;
    rc = kt_matrix_layout_of(a->format, a->H, a->I, &j->Ld);
    if (rc) return rc;

    const int64_t E = a->E, H = a->H, I = a->I, T = a->T, P = T * a->k;
    const int nt = kt_get_num_threads();
    j->P = P;
    j->rows_pt = j->kern->rows_per_task ? j->kern->rows_per_task : ROWS_PER_TASK;
    j->cols_pt = j->kern->cols_per_task ? j->kern->cols_per_task : COLS_PER_TASK;
    j->I_blocks = (I + j->rows_pt - 1) / j->rows_pt;
    const int64_t s_gu = kt_scratch_floats(j->kern, j->Lgu.N, j->Lgu.K_pad), s_d = kt_scratch_floats(j->kern, j->Ld.N, j->Ld.K_pad);
    j->scratch_floats = (size_t)(s_gu > s_d ? s_gu : s_d);

    j->xq_ld = j->q_fwd ? round64(H) : 0;
    j->hq_ld = j->q_fwd ? round64(I) : 0;
    j->zq_ld = j->q_bwd ? round64(H > 2 * I ? H : 2 * I) : 0;
    j->r = a->lora_r;
    if (j->r < 0) KT_FAIL(KT_EINVAL, "LoRA rank %lld < 0", (long long)j->r);
    if (j->r > 0 && (!a->lora_gu_a || !a->lora_gu_b || !a->lora_d_a || !a->lora_d_b))
        KT_FAIL(KT_EINVAL, "LoRA rank %lld without its four matrices", (long long)j->r);
    if (j->r > 0 && backward && (!a->x || !a->grad_gu_a || !a->grad_gu_b || !a->grad_d_a || !a->grad_d_b))
        KT_FAIL(KT_EINVAL, "LoRA backward needs x and the four gradient buffers");
    const int op_mode = backward ? j->grad_mode : a->act_mode; /* the prepared operands' activations */
    j->prep = op_mode == KT_ACT_BF16 && j->kern->pack_bf16 != NULL;
    j->prep8 = a->act_mode == KT_ACT_INT8 && a->format == KT_FORMAT_INT8 && j->kern->pack_q8 != NULL;
    j->prep8_bf16 = !backward && a->act_mode == KT_ACT_INT8 && a->format == KT_FORMAT_INT4 && j->kern->pack_q8 != NULL;
    j->prep_pairs = op_mode == KT_ACT_BF16 && j->kern->pack_pairs != NULL && j->kern->pairs_enabled();
    j->prep_f32 = !j->prep && !j->prep_pairs && op_mode != KT_ACT_INT8 && j->kern->pack_f32 != NULL;
    /* bytes per operand row: bf16 over round32(C), or int8 over round64(C) */
    const int64_t c64 = ((H > 2 * I ? H : 2 * I) + 63) & ~(int64_t)63;
    /* > 0 exactly when some operand is prepared (the forward's F0p / F1p phases test it) */
    const int64_t op_rows = j->prep || j->prep8 || j->prep8_bf16 || j->prep_f32 || j->prep_pairs ? ((P + 15) / 16 + E) * 16 : 0;
    size_t off = 0, sizes[21];
#define CARVE(idx, n) (sizes[idx] = off, off += (((size_t)(n)) + 63) & ~(size_t)63)
    CARVE(0, sizeof(int32_t) * (size_t)(3 * E + 1 + P));
    CARVE(1, sizeof(float) * (size_t)(T * H));
    CARVE(2, sizeof(float) * (size_t)(P * I));
    CARVE(3, backward ? sizeof(float) * (size_t)(P * 2 * I) : 0);
    CARVE(4, a->gu ? 0 : sizeof(float) * (size_t)(P * 2 * I));
    CARVE(5, sizeof(void *) * (size_t)(P * nt));
    CARVE(6, sizeof(void *) * (size_t)(P * nt));
    CARVE(7, sizeof(float) * (size_t)(P * nt));
    CARVE(8, sizeof(float) * j->scratch_floats * (size_t)nt);
    CARVE(9, sizeof(float) * (size_t)(P * nt));
    CARVE(10, (size_t)(T * j->xq_ld));
    CARVE(11, sizeof(float) * (size_t)T);
    CARVE(12, (size_t)(P * j->hq_ld));
    CARVE(13, sizeof(float) * (size_t)P);
    CARVE(14, (size_t)(P * j->zq_ld));
    CARVE(15, sizeof(float) * (size_t)P);
    CARVE(16, sizeof(float) * (size_t)(4 * P * j->r));
    CARVE(17, j->r > 0 && backward ? sizeof(float) * (size_t)(T * H) : 0);
    CARVE(18, j->r > 0 && backward ? sizeof(float) * (size_t)(P * I) : 0);
    CARVE(19, sizeof(uint16_t) * (size_t)(op_rows * c64) * (j->prep_f32 ? 2 : 1));
    CARVE(20, op_rows ? sizeof(int64_t) * (size_t)(E + 1) : 0);
#undef CARVE
    uint8_t *ws = kt_workspace(off);
    if (!ws) KT_FAIL(KT_ENOMEM, "cannot allocate %zu bytes of workspace", off);
    j->offs = (int32_t *)(ws + sizes[0]);
    j->pairs = j->offs + E + 1;
    j->active = j->pairs + P;
    j->act = (float *)(ws + sizes[1]);
    j->h = (float *)(ws + sizes[2]);
    j->dgu = backward ? (float *)(ws + sizes[3]) : NULL;
    j->gu = a->gu ? a->gu : (float *)(ws + sizes[4]);
    j->arows = (const void **)(ws + sizes[5]);
    j->orows = (float **)(ws + sizes[6]);
    j->alpha = (float *)(ws + sizes[7]);
    j->scratch = (float *)(ws + sizes[8]);
    j->ascale = (float *)(ws + sizes[9]);
    j->xq = (int8_t *)(ws + sizes[10]);
    j->xs = (float *)(ws + sizes[11]);
    j->hq = (int8_t *)(ws + sizes[12]);
    j->hs = (float *)(ws + sizes[13]);
    j->zq = (int8_t *)(ws + sizes[14]);
    j->zs = (float *)(ws + sizes[15]);
    j->tg = (float *)(ws + sizes[16]);
    j->td = j->tg + P * j->r;
    j->ud = j->td + P * j->r;
    j->vg = j->ud + P * j->r;
    j->xa = j->r > 0 && backward ? (float *)(ws + sizes[17]) : NULL;
    j->hb = j->r > 0 && backward ? (float *)(ws + sizes[18]) : NULL;
    j->opb = op_rows ? (uint16_t *)(ws + sizes[19]) : NULL;
    j->op_rows = op_rows;
    j->blk16 = op_rows ? (int64_t *)(ws + sizes[20]) : NULL;

    /* counting sort of the pairs by expert (stable: ascending p inside each group) */
    memset(j->offs, 0, sizeof(int32_t) * (size_t)(E + 1));
    for (int64_t p = 0; p < P; p++) {
        const int64_t e = a->topk_idx[p];
        if (e < 0 || e >= E) KT_FAIL(KT_EINVAL, "expert id %lld (pair %lld) outside [0, %lld)", (long long)e, (long long)p, (long long)E);
        j->offs[e + 1]++;
    }
    for (int64_t e = 0; e < E; e++) {
        if (j->offs[e + 1] > 0) j->active[j->n_active++] = (int32_t)e;
        j->offs[e + 1] += j->offs[e];
    }
    int32_t *fill = j->active + E; /* E cursors */
    memcpy(fill, j->offs, sizeof(int32_t) * (size_t)E);
    for (int64_t p = 0; p < P; p++) j->pairs[fill[a->topk_idx[p]]++] = (int32_t)p;
    if (op_rows) {
        j->blk16[0] = 0;
        for (int64_t e = 0; e < E; e++) j->blk16[e + 1] = j->blk16[e] + (j->offs[e + 1] - j->offs[e] + 15) / 16;
    }
    return KT_OK;
}

static void convert_rows(const void *src, int dtype, int mode, int64_t t0, int64_t t1, int64_t H, float *dst) {
    for (int64_t t = t0; t < t1; t++) {
        float *d = dst + t * H;
        if (dtype == KT_DTYPE_F32) {
            const float *s = (const float *)src + t * H;
            for (int64_t c = 0; c < H; c++) d[c] = to_compute(s[c], mode);
        } else {
            const uint16_t *s = (const uint16_t *)src + t * H;
            for (int64_t c = 0; c < H; c++) d[c] = kt_bf16_to_f32(s[c]); /* exact in every mode */
        }
    }
}

/* The product of the M pairs of expert e's group against one packed matrix. Activation rows are
 * act_f32 + id*ld (float) or act_q8 + id*qld with scales qs[id] (int8), where id is the pair or
 * its token (by_token). */
typedef struct {
    const float *act_f32;
    int64_t ld;
    const int8_t *act_q8;
    const float *qs;
    int64_t qld;
    int by_token;
    int64_t C;        /* row length: with a prepared operand (job->prep), its columns are round32(C) */
} act_rows;

/* Expert e's prepared fp32 operand (prep_f32) of rows C long. */
static float *prepared_f32_of(const moe_job *j, int64_t e, int64_t C) {
    return (float *)j->opb + j->blk16[e] * 16 * ((C + 31) & ~(int64_t)31);
}

/* Expert e's prepared bf16-pair operand (prep_pairs): round32(C) / 2 words per row, the room of the
 * bf16 operands. */
static uint32_t *prepared_pairs_of(const moe_job *j, int64_t e, int64_t C) {
    return (uint32_t *)j->opb + j->blk16[e] * 16 * (((C + 31) & ~(int64_t)31) / 2);
}

static void run_gemm(moe_job *j, int tid, int64_t e, const kt_matrix_layout *L, const void *base, act_rows src,
                     float *out, int64_t out_ld, int out_by_token, int64_t out_off, int with_alpha, int tn,
                     int64_t lo, int64_t hi, int accumulate) {
    const kt_moe_args *a = j->a;
    const int32_t *grp = j->pairs + j->offs[e];
    const int64_t M = j->offs[e + 1] - j->offs[e];
    const void **arows = j->arows + (size_t)tid * (size_t)j->P;
    float **orows = j->orows + (size_t)tid * (size_t)j->P;
    float *alpha = j->alpha + (size_t)tid * (size_t)j->P;
    float *ascale = j->ascale + (size_t)tid * (size_t)j->P;
    for (int64_t m = 0; m < M; m++) {
        const int64_t p = grp[m], t = p / a->k, id = src.by_token ? t : p;
        if (src.act_q8) {
            arows[m] = src.act_q8 + id * src.qld;
            ascale[m] = src.qs[id];
        } else {
            arows[m] = src.act_f32 + id * src.ld;
        }
        orows[m] = out + (out_by_token ? t : p) * out_ld + out_off;
        alpha[m] = a->topk_w[p];
    }
    const uint16_t *prepared = (j->prep && !src.act_q8) || (j->prep8_bf16 && src.act_q8)
                                   ? j->opb + j->blk16[e] * 16 * ((src.C + 31) & ~(int64_t)31)
                                   : NULL;
    const int8_t *prepared8 = j->prep8 && src.act_q8 ? (const int8_t *)j->opb + j->blk16[e] * 16 * ((src.C + 63) & ~(int64_t)63) : NULL;
    const float *prepared_f32 = j->prep_f32 && !src.act_q8 ? prepared_f32_of(j, e, src.C) : NULL;
    const uint32_t *prepared_pairs = j->prep_pairs && !src.act_q8 ? prepared_pairs_of(j, e, src.C) : NULL;
    kt_gemm g = {L, expert_mat(base, L, e), M, arows, src.act_q8 ? ascale : NULL, orows,
                 with_alpha ? alpha : NULL, lo, hi, accumulate, j->scratch + (size_t)tid * j->scratch_floats, prepared,
                 prepared8, prepared_f32, prepared_pairs,
                 tn && !src.act_q8 && j->grad_mode == KT_ACT_BF16 && L->format != KT_FORMAT_BF16};
    if (tn) (src.act_q8 ? j->kern->tn_q8 : j->kern->tn)(&g);
    else (src.act_q8 ? j->kern->nt_q8 : j->kern->nt)(&g);
}

static void block_range(int64_t task, int64_t per, int64_t total, int64_t *lo, int64_t *hi) {
    *lo = task * per;
    *hi = *lo + per < total ? *lo + per : total;
}

/* ---- LoRA helpers ------------------------------------------------------------------------- */

/* Expert e's (r, n) matrix of a LoRA tensor laid out (E, r, n). */
static const float *lora_of(const float *base, int64_t e, int64_t r, int64_t n) { return base + (size_t)(e * r * n); }

/* t[k] = <M[k], v>, k < r, M (r, n) */
static void rank_in(const moe_job *j, const float *M, int64_t n, const float *v, float *t) {
    j->kern->dots(M, j->r, n, v, t);
}

/* out[0 .. hi-lo) += c * sum_k t[k] M[k][lo .. hi), M (r, n) */
static void rank_out(const moe_job *j, const float *M, int64_t n, const float *t, float c, float *out,
                     int64_t lo, int64_t hi) {
    for (int64_t k = 0; k < j->r; k++) j->kern->axpy(c * t[k], M + k * n + lo, out, hi - lo);
}

/* For each pair p of expert e in order: out[t][lo .. hi) += s (* w[p]) sum_k vecs[p][k] M[k][lo .. hi),
 * M (r, H), out (T, H): the LoRA term of F2 (y) and B3 (dx) inside their column-block tasks. */
static void rank_out_by_token(const moe_job *j, int64_t e, const float *M, const float *vecs, int weighted,
                              float *out, int64_t lo, int64_t hi) {
    const kt_moe_args *a = j->a;
    for (int32_t pos = j->offs[e]; pos < j->offs[e + 1]; pos++) {
        const int64_t p = j->pairs[pos];
        const float c = weighted ? a->topk_w[p] * a->lora_scale : a->lora_scale;
        rank_out(j, M, a->H, vecs + p * j->r, c, out + (p / a->k) * a->H + lo, lo, hi);
    }
}

/* Pair-block tasks over the pairs sorted by expert, so consecutive pairs share LoRA matrices. */
#define FOR_SORTED_PAIRS(j, task, pos, p, e, t)                                               \
    int64_t pos##0_, pos##1_;                                                                 \
    block_range(task, PAIRS_PER_TASK, (j)->P, &pos##0_, &pos##1_);                            \
    for (int64_t pos = pos##0_, p, e, t; pos < pos##1_ &&                                     \
         (p = (j)->pairs[pos], e = (j)->a->topk_idx[p], t = p / (j)->a->k, 1); pos++)

/* h[i] = silu(g[i]) * u[i] in the compute precision, i < n */
static void swiglu(const moe_job *j, const float *g, const float *u, float *h, int64_t n) {
    const int mode = j->a->act_mode;
    if (j->kern->swiglu) {
        j->kern->swiglu(g, u, h, n, mode == KT_ACT_BF16);
        return;
    }
    for (int64_t i = 0; i < n; i++) h[i] = to_compute(kt_silu(g[i]) * u[i], mode);
}

static void h_row(const moe_job *j, int64_t p, float *h) {
    const int64_t I = j->a->I;
    const float *gp = j->gu + p * 2 * I;
    swiglu(j, gp, gp + I, h, I);
}

/* ---- prepared operands ------------------------------------------------------------------- */

/* Task = active expert: its group's rows of an operand (by token or by pair) into opb: float rows
 * (src, row stride C) through pack_bf16 in the bf16 mode, int8 rows (q, row stride qld) through
 * pack_q8 in the int8 mode. */
static void prep_group(moe_job *j, int64_t task, int tid, const float *src, const int8_t *q, int64_t qld, int64_t C,
                       int by_token, int layout) {
    const int64_t e = j->active[task], M = j->offs[e + 1] - j->offs[e];
    const void **rows = j->arows + (size_t)tid * (size_t)j->P;
    for (int64_t m = 0; m < M; m++) {
        const int64_t p = j->pairs[j->offs[e] + m], id = by_token ? p / j->a->k : p;
        rows[m] = j->prep8 || j->prep8_bf16 ? (const void *)(q + id * qld) : (const void *)(src + id * C);
    }
    const int64_t C32 = (C + 31) & ~(int64_t)31;
    uint16_t *dst = j->opb + j->blk16[e] * 16 * C32;
    if (j->prep_f32)
        j->kern->pack_f32((const float *const *)rows, M, C, prepared_f32_of(j, e, C));
    else if (j->prep_pairs)
        j->kern->pack_pairs((const float *const *)rows, M, C,
                            layout == KT_PACK_VNNI && j->a->format == KT_FORMAT_BF16 ? KT_PAIRS_LANES : KT_PAIRS_TILES,
                            prepared_pairs_of(j, e, C));
    else if (j->prep8_bf16)
        j->kern->pack_q8((const int8_t *const *)rows, M, C, KT_PACK_VNNI_BF16, (int8_t *)dst);
    else if (j->prep8)
        j->kern->pack_q8((const int8_t *const *)rows, M, C, layout,
                         (int8_t *)j->opb + j->blk16[e] * 16 * ((C + 63) & ~(int64_t)63));
    else
        j->kern->pack_bf16((const float *const *)rows, M, C, layout, dst);
}

static void f0p_task(void *vj, int64_t task, int tid) {
    moe_job *j = vj;
    prep_group(j, task, tid, j->act, j->xq, j->xq_ld, j->a->H, 1, KT_PACK_VNNI);
}
static void f1p_task(void *vj, int64_t task, int tid) {
    moe_job *j = vj;
    prep_group(j, task, tid, j->h, j->hq, j->hq_ld, j->a->I, 0, KT_PACK_VNNI);
}
static void b0p_task(void *vj, int64_t task, int tid) {
    moe_job *j = vj; /* bf16: dy by token; int8: the folded dy by pair */
    prep_group(j, task, tid, j->act, j->zq, j->zq_ld, j->a->H, !j->prep8, KT_PACK_TILES);
}
static void b2p_task(void *vj, int64_t task, int tid) {
    moe_job *j = vj;
    prep_group(j, task, tid, j->dgu, j->zq, j->zq_ld, 2 * j->a->I, 0, KT_PACK_TILES);
}

/* ---- forward ------------------------------------------------------------------------------ */

static void f0_task(void *vj, int64_t task, int tid) {
    (void)tid;
    moe_job *j = vj;
    const kt_moe_args *a = j->a;
    int64_t t0, t1;
    block_range(task, TOKENS_PER_TASK, a->T, &t0, &t1);
    convert_rows(a->x, a->x_dtype, a->act_mode, t0, t1, a->H, j->act);
    if (j->q_fwd)
        for (int64_t t = t0; t < t1; t++) j->xs[t] = quantize_row(j, j->act + t * a->H, NULL, a->H, j->xq_ld, j->xq + t * j->xq_ld);
}

static void f1_task(void *vj, int64_t task, int tid) {
    moe_job *j = vj;
    const kt_moe_args *a = j->a;
    const int64_t I = a->I, e = j->active[task / j->I_blocks];
    int64_t i0, i1;
    block_range(task % j->I_blocks, j->rows_pt, I, &i0, &i1);
    act_rows x = {j->act, a->H, j->q_fwd ? j->xq : NULL, j->xs, j->xq_ld, 1, a->H};
    run_gemm(j, tid, e, &j->Lgu, a->gate_up, x, j->gu, 2 * I, 0, i0, 0, 0, i0, i1, 0);             /* gate */
    run_gemm(j, tid, e, &j->Lgu, a->gate_up, x, j->gu, 2 * I, 0, I + i0, 0, 0, I + i0, I + i1, 0); /* up */
    const int32_t *grp = j->pairs + j->offs[e];
    for (int64_t m = 0; m < j->offs[e + 1] - j->offs[e]; m++) {
        if (j->r > 0) {
            const float *A = lora_of(a->lora_gu_a, e, j->r, 2 * I), *tg = j->tg + grp[m] * j->r;
            float *row = j->gu + (size_t)grp[m] * 2 * I;
            rank_out(j, A, 2 * I, tg, a->lora_scale, row + i0, i0, i1);
            rank_out(j, A, 2 * I, tg, a->lora_scale, row + I + i0, I + i0, I + i1);
        }
        const float *gp = j->gu + (size_t)grp[m] * 2 * I;
        swiglu(j, gp + i0, gp + I + i0, j->h + (size_t)grp[m] * I + i0, i1 - i0);
    }
}

static void f0l_task(void *vj, int64_t task, int tid) {
    (void)tid;
    moe_job *j = vj;
    const kt_moe_args *a = j->a;
    FOR_SORTED_PAIRS(j, task, pos, p, e, t)
        rank_in(j, lora_of(a->lora_gu_b, e, j->r, a->H), a->H, j->act + t * a->H, j->tg + p * j->r);
}

static void f1l_task(void *vj, int64_t task, int tid) {
    (void)tid;
    moe_job *j = vj;
    const kt_moe_args *a = j->a;
    FOR_SORTED_PAIRS(j, task, pos, p, e, t) {
        (void)t;
        rank_in(j, lora_of(a->lora_d_b, e, j->r, a->I), a->I, j->h + p * a->I, j->td + p * j->r);
    }
}

static void f1q_task(void *vj, int64_t task, int tid) {
    (void)tid;
    moe_job *j = vj;
    const int64_t I = j->a->I;
    int64_t p0, p1;
    block_range(task, PAIRS_PER_TASK, j->P, &p0, &p1);
    for (int64_t p = p0; p < p1; p++) j->hs[p] = quantize_row(j, j->h + p * I, NULL, I, j->hq_ld, j->hq + p * j->hq_ld);
}

static void f2_task(void *vj, int64_t task, int tid) {
    moe_job *j = vj;
    const kt_moe_args *a = j->a;
    const int64_t H = a->H;
    int64_t n0, n1;
    block_range(task, j->cols_pt, H, &n0, &n1);
    for (int64_t t = 0; t < a->T; t++) memset(a->y + t * H + n0, 0, sizeof(float) * (size_t)(n1 - n0));
    act_rows h = {j->h, a->I, j->q_fwd ? j->hq : NULL, j->hs, j->hq_ld, 0, a->I};
    for (int64_t ai = 0; ai < j->n_active; ai++) {
        const int64_t e = j->active[ai];
        run_gemm(j, tid, e, &j->Ld, a->down, h, a->y, H, 1, n0, 1, 0, n0, n1, 1);
        if (j->r > 0) rank_out_by_token(j, e, lora_of(a->lora_d_a, e, j->r, H), j->td, 1, a->y, n0, n1);
    }
}

/* Everything C can check itself (shapes, ids, modes, dtypes, missing buffers); buffer lengths
 * remain the caller's contract (kt_sft/engine/functional.py allocates them). */
static int check_args(const kt_moe_args *a, int backward) {
    pthread_once(&g_atfork_once, engine_register_atfork);
    if (a->E < 1 || a->H < 1 || a->I < 1 || a->T < 0 || a->k < 1 || a->k > a->E)
        KT_FAIL(KT_EINVAL, "bad shape E=%lld H=%lld I=%lld T=%lld k=%lld", (long long)a->E, (long long)a->H,
                (long long)a->I, (long long)a->T, (long long)a->k);
    if (a->E > INT32_MAX || a->T > INT32_MAX / a->k || a->H > INT32_MAX || a->I > INT32_MAX / 2)
        KT_FAIL(KT_EINVAL, "shape beyond the int32 limits: E=%lld H=%lld I=%lld T*k=%lld*%lld", (long long)a->E,
                (long long)a->H, (long long)a->I, (long long)a->T, (long long)a->k);
    if (a->T == 0) return KT_OK;
    if (backward && !a->gu) KT_FAIL(KT_EINVAL, "backward needs the gate/up activations saved by the forward");
    if (!a->gate_up || !a->down || !a->topk_idx || !a->topk_w)
        KT_FAIL(KT_EINVAL, "missing weights or routing (NULL pointer)");
    const void *in = backward ? a->dy : a->x;
    const int dtype = backward ? a->dy_dtype : a->x_dtype;
    if (!in || (backward ? (!a->dx || !a->dw) : !a->y))
        KT_FAIL(KT_EINVAL, "missing %s buffers (NULL pointer)", backward ? "backward" : "forward");
    if (dtype != KT_DTYPE_F32 && dtype != KT_DTYPE_BF16) KT_FAIL(KT_EINVAL, "unknown activation dtype %d", dtype);
    if (backward && a->lora_r > 0 && a->x_dtype != KT_DTYPE_F32 && a->x_dtype != KT_DTYPE_BF16)
        KT_FAIL(KT_EINVAL, "unknown activation dtype %d", a->x_dtype);
    return KT_OK;
}

int kt_moe_forward(const kt_moe_args *a) {
    int rc = check_args(a, 0);
    if (rc || a->T == 0) return rc;
    pthread_mutex_lock(&g_engine_lock);
    moe_job j;
    rc = job_init(&j, a, 0);
    if (rc == KT_OK) {
        const int64_t pair_tasks = (j.P + PAIRS_PER_TASK - 1) / PAIRS_PER_TASK;
        run_phase("F0", (a->T + TOKENS_PER_TASK - 1) / TOKENS_PER_TASK, f0_task, &j);
        if (j.r > 0) run_phase("F0L", pair_tasks, f0l_task, &j);
        if (j.op_rows) run_phase("F0p", j.n_active, f0p_task, &j);
        run_phase("F1", j.n_active * j.I_blocks, f1_task, &j);
        if (j.r > 0) run_phase("F1L", pair_tasks, f1l_task, &j);
        if (j.q_fwd) run_phase("F1q", pair_tasks, f1q_task, &j);
        if (j.op_rows) run_phase("F1p", j.n_active, f1p_task, &j);
        run_phase("F2", (a->H + j.cols_pt - 1) / j.cols_pt, f2_task, &j);
    }
    pthread_mutex_unlock(&g_engine_lock);
    return rc;
}

/* ---- backward ----------------------------------------------------------------------------- */

static void b0_task(void *vj, int64_t task, int tid) {
    (void)tid;
    moe_job *j = vj;
    int64_t t0, t1;
    block_range(task, TOKENS_PER_TASK, j->a->T, &t0, &t1);
    convert_rows(j->a->dy, j->a->dy_dtype, j->grad_mode, t0, t1, j->a->H, j->act);
    if (j->xa) convert_rows(j->a->x, j->a->x_dtype, j->a->act_mode, t0, t1, j->a->H, j->xa);
}

/* z[p] = v[p] * d_e (the weights' per-row scales of the matrix the next product reads), quantized. */
static void fold_and_quantize(moe_job *j, int64_t p, const float *v, const kt_matrix_layout *L, const void *base) {
    const int64_t e = j->a->topk_idx[p], N = L->N;
    const float *d = (const float *)(expert_mat(base, L, e) + L->scales_offset);
    j->zs[p] = quantize_row(j, v, d, N, j->zq_ld, j->zq + p * j->zq_ld);
}

static void b0q_task(void *vj, int64_t task, int tid) {
    (void)tid;
    moe_job *j = vj;
    int64_t p0, p1;
    block_range(task, PAIRS_PER_TASK, j->P, &p0, &p1);
    for (int64_t p = p0; p < p1; p++) fold_and_quantize(j, p, j->act + (p / j->a->k) * j->a->H, &j->Ld, j->a->down);
}

static void b1_task(void *vj, int64_t task, int tid) {
    moe_job *j = vj;
    const kt_moe_args *a = j->a;
    const int64_t I = a->I, e = j->active[task / j->I_blocks];
    int64_t i0, i1;
    block_range(task % j->I_blocks, j->rows_pt, I, &i0, &i1);
    act_rows dy = {j->act, a->H, j->q_bwd ? j->zq : NULL, j->zs, j->zq_ld, !j->q_bwd, a->H};
    run_gemm(j, tid, e, &j->Ld, a->down, dy, j->h, I, 0, i0, 0, 1, i0, i1, 0);
}

static void b2_task(void *vj, int64_t task, int tid) {
    (void)tid;
    moe_job *j = vj;
    const kt_moe_args *a = j->a;
    const int64_t I = a->I;
    const int hmode = a->act_mode == KT_ACT_BF16 ? KT_ACT_BF16 : KT_ACT_F32;
    const int gmode = j->grad_mode == KT_ACT_BF16 ? KT_ACT_BF16 : KT_ACT_F32;
    const int round = (hmode == KT_ACT_BF16 ? KT_ROUND_H : 0) | (gmode == KT_ACT_BF16 ? KT_ROUND_GRAD : 0);
    int64_t p0, p1;
    block_range(task, PAIRS_PER_TASK, j->P, &p0, &p1);
    for (int64_t p = p0; p < p1; p++) {
        const float *gp = j->gu + p * 2 * I, *up = gp + I, *dhu = j->h + p * I;
        float *dg = j->dgu + p * 2 * I, *du = dg + I;
        const float w = a->topk_w[p];
        float dot = 0.0f;
        if (j->kern->swiglu_bwd) {
            dot = j->kern->swiglu_bwd(gp, up, dhu, w, dg, du, I, round);
        } else {
            for (int64_t i = 0; i < I; i++) {
                const float g = gp[i], u = up[i], s = 1.0f / (1.0f + expf(-g));
                dot += to_compute(g * s * u, hmode) * dhu[i];
                const float dh = w * dhu[i];
                dg[i] = to_compute(dh * u * s * (1.0f + g * (1.0f - s)), gmode);
                du[i] = to_compute(dh * g * s, gmode);
            }
        }
        a->dw[p] = dot;
        if (j->q_bwd) fold_and_quantize(j, p, dg, &j->Lgu, a->gate_up);
    }
}

static void b1l_task(void *vj, int64_t task, int tid) {
    moe_job *j = vj;
    const kt_moe_args *a = j->a;
    const int64_t H = a->H, I = a->I, r = j->r;
    FOR_SORTED_PAIRS(j, task, pos, p, e, t) {
        const float *Bd = lora_of(a->lora_d_b, e, r, I);
        float *h = j->hb + p * I;
        rank_in(j, lora_of(a->lora_d_a, e, r, H), H, j->act + t * H, j->ud + p * r);
        rank_out(j, Bd, I, j->ud + p * r, a->lora_scale, j->h + p * I, 0, I);
        h_row(j, p, h);
        rank_in(j, Bd, I, h, j->td + p * r);
    }
}

static void b2l_task(void *vj, int64_t task, int tid) {
    (void)tid;
    moe_job *j = vj;
    const kt_moe_args *a = j->a;
    const int64_t H = a->H, I = a->I, r = j->r;
    FOR_SORTED_PAIRS(j, task, pos, p, e, t) {
        rank_in(j, lora_of(a->lora_gu_a, e, r, 2 * I), 2 * I, j->dgu + p * 2 * I, j->vg + p * r);
        rank_in(j, lora_of(a->lora_gu_b, e, r, H), H, j->xa + t * H, j->tg + p * r);
    }
}

/* Task (expert, matrix): one LoRA gradient of one expert, summed over its pairs in order. The
 * columns go in chunks whose r rows of G stay in L1 while every pair adds its rank-1 updates. */
#define BG_CHUNK 256
static void bg_task(void *vj, int64_t task, int tid) {
    moe_job *j = vj;
    const kt_moe_args *a = j->a;
    const int64_t H = a->H, I = a->I, r = j->r, e = j->active[task / 4], which = task % 4;
    const int64_t n = which == 1 ? I : which == 2 ? 2 * I : H;
    float *G = (which == 0 ? a->grad_d_a : which == 1 ? a->grad_d_b : which == 2 ? a->grad_gu_a : a->grad_gu_b)
               + (size_t)(e * r * n);
    (void)tid;
    memset(G, 0, sizeof(float) * (size_t)(r * n));
    for (int64_t c0 = 0; c0 < n; c0 += BG_CHUNK) {
        const int64_t len = n - c0 < BG_CHUNK ? n - c0 : BG_CHUNK;
        for (int32_t pos = j->offs[e]; pos < j->offs[e + 1]; pos++) {
            const int64_t p = j->pairs[pos], t = p / a->k;
            const float ws = a->topk_w[p] * a->lora_scale;
            const float *c, *v;
            float scale = a->lora_scale;
            switch (which) {
            case 0: c = j->td + p * r; v = j->act + t * H; scale = ws; break;    /* dA_d  */
            case 1: c = j->ud + p * r; v = j->hb + p * I; scale = ws; break;     /* dB_d  */
            case 2: c = j->tg + p * r; v = j->dgu + p * 2 * I; break;            /* dA_gu */
            default: c = j->vg + p * r; v = j->xa + t * H; break;                /* dB_gu */
            }
            for (int64_t k = 0; k < r; k++) j->kern->axpy(scale * c[k], v + c0, G + k * n + c0, len);
        }
    }
}

/* Zero the LoRA gradients of experts that received no pairs (the others are written by BG). */
static void zero_idle_lora_grads(const moe_job *j) {
    const kt_moe_args *a = j->a;
    const int64_t H = a->H, I = a->I, r = j->r;
    for (int64_t e = 0; e < a->E; e++) {
        if (j->offs[e + 1] > j->offs[e]) continue;
        memset(a->grad_d_a + e * r * H, 0, sizeof(float) * (size_t)(r * H));
        memset(a->grad_d_b + e * r * I, 0, sizeof(float) * (size_t)(r * I));
        memset(a->grad_gu_a + e * r * 2 * I, 0, sizeof(float) * (size_t)(r * 2 * I));
        memset(a->grad_gu_b + e * r * H, 0, sizeof(float) * (size_t)(r * H));
    }
}

static void b3_task(void *vj, int64_t task, int tid) {
    moe_job *j = vj;
    const kt_moe_args *a = j->a;
    const int64_t H = a->H;
    int64_t c0, c1;
    block_range(task, j->cols_pt, H, &c0, &c1);
    for (int64_t t = 0; t < a->T; t++) memset(a->dx + t * H + c0, 0, sizeof(float) * (size_t)(c1 - c0));
    act_rows dgu = {j->dgu, 2 * a->I, j->q_bwd ? j->zq : NULL, j->zs, j->zq_ld, 0, 2 * a->I};
    for (int64_t ai = 0; ai < j->n_active; ai++) {
        const int64_t e = j->active[ai];
        run_gemm(j, tid, e, &j->Lgu, a->gate_up, dgu, a->dx, H, 1, c0, 0, 1, c0, c1, 1);
        if (j->r > 0) rank_out_by_token(j, e, lora_of(a->lora_gu_b, e, j->r, H), j->vg, 0, a->dx, c0, c1);
    }
}

int kt_moe_backward(const kt_moe_args *a) {
    int rc = check_args(a, 1);
    if (rc || a->T == 0) return rc;
    pthread_mutex_lock(&g_engine_lock);
    moe_job j;
    rc = job_init(&j, a, 1);
    if (rc == KT_OK) {
        const int64_t pair_tasks = (j.P + PAIRS_PER_TASK - 1) / PAIRS_PER_TASK;
        run_phase("B0", (a->T + TOKENS_PER_TASK - 1) / TOKENS_PER_TASK, b0_task, &j);
        if (j.q_bwd) run_phase("B0q", pair_tasks, b0q_task, &j);
        if (j.prep || (j.prep8 && j.q_bwd) || j.prep_f32 || j.prep_pairs) run_phase("B0p", j.n_active, b0p_task, &j);
        run_phase("B1", j.n_active * j.I_blocks, b1_task, &j);
        if (j.r > 0) run_phase("B1L", pair_tasks, b1l_task, &j);
        run_phase("B2", pair_tasks, b2_task, &j);
        if (j.r > 0) run_phase("B2L", pair_tasks, b2l_task, &j);
        if (j.prep || (j.prep8 && j.q_bwd) || j.prep_f32 || j.prep_pairs) run_phase("B2p", j.n_active, b2p_task, &j);
        run_phase("B3", (a->H + j.cols_pt - 1) / j.cols_pt, b3_task, &j);
        if (j.r > 0) {
            run_phase("BG", 4 * j.n_active, bg_task, &j);
            zero_idle_lora_grads(&j);
        }
    }
    pthread_mutex_unlock(&g_engine_lock);
    return rc;
}

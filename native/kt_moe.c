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

#define ROWS_PER_TASK 32   /* I rows per (expert, block) task in F1 / B1 */
#define COLS_PER_TASK 64   /* H columns per task in F2 / B3 */
#define PAIRS_PER_TASK 64
#define TOKENS_PER_TASK 16

static pthread_mutex_t g_engine_lock = PTHREAD_MUTEX_INITIALIZER;

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
    int32_t *offs;    /* E + 1 */
    int32_t *pairs;   /* P pair ids grouped by expert, ascending inside a group */
    int32_t *active;  /* experts that received at least one pair (E slots, then E fill cursors) */
    int64_t n_active;
    float *act;       /* (T, H): xa in the forward, za in the backward */
    float *gu;        /* (P, 2I) */
    float *h;         /* (P, I) */
    float *dgu;       /* (P, 2I) */
    /* per thread: M activation pointers, M output pointers, M multipliers, scratch floats */
    const float **arows;
    float **orows;
    float *alpha;
    float *scratch;
    size_t scratch_floats;
} moe_job;

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
    if (a->act_mode != KT_ACT_F32 && a->act_mode != KT_ACT_BF16)
        KT_FAIL(KT_EUNSUPPORTED, "compute mode %d is not implemented by kernel path '%s'", a->act_mode, j->kern->name);
    int rc = kt_matrix_layout_of(a->format, 2 * a->I, a->H, &j->Lgu);
    if (rc) return rc;
    rc = kt_matrix_layout_of(a->format, a->H, a->I, &j->Ld);
    if (rc) return rc;

    const int64_t E = a->E, H = a->H, I = a->I, T = a->T, P = T * a->k;
    const int nt = kt_get_num_threads();
    j->P = P;
    j->I_blocks = (I + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    const int64_t s_gu = kt_gemm_scratch_floats(j->Lgu.N, j->Lgu.K_pad), s_d = kt_gemm_scratch_floats(j->Ld.N, j->Ld.K_pad);
    j->scratch_floats = (size_t)(s_gu > s_d ? s_gu : s_d);

    size_t off = 0, sizes[10];
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
    j->arows = (const float **)(ws + sizes[5]);
    j->orows = (float **)(ws + sizes[6]);
    j->alpha = (float *)(ws + sizes[7]);
    j->scratch = (float *)(ws + sizes[8]);

    /* counting sort of the pairs by expert (stable: ascending p inside each group) */
    memset(j->offs, 0, sizeof(int32_t) * (size_t)(E + 1));
    for (int64_t p = 0; p < P; p++) j->offs[a->topk_idx[p] + 1]++;
    for (int64_t e = 0; e < E; e++) {
        if (j->offs[e + 1] > 0) j->active[j->n_active++] = (int32_t)e;
        j->offs[e + 1] += j->offs[e];
    }
    int32_t *fill = j->active + E; /* E cursors */
    memcpy(fill, j->offs, sizeof(int32_t) * (size_t)E);
    for (int64_t p = 0; p < P; p++) j->pairs[fill[a->topk_idx[p]]++] = (int32_t)p;
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
            for (int64_t c = 0; c < H; c++) d[c] = kt_bf16_to_f32(s[c]); /* exact in bf16 and f32 modes */
        }
    }
}

/* ---- forward ------------------------------------------------------------------------------ */

static void f0_task(void *vj, int64_t task, int tid) {
    (void)tid;
    moe_job *j = vj;
    int64_t t0 = task * TOKENS_PER_TASK, t1 = t0 + TOKENS_PER_TASK;
    if (t1 > j->a->T) t1 = j->a->T;
    convert_rows(j->a->x, j->a->x_dtype, j->a->act_mode, t0, t1, j->a->H, j->act);
}

static void f1_task(void *vj, int64_t task, int tid) {
    moe_job *j = vj;
    const kt_moe_args *a = j->a;
    const int64_t H = a->H, I = a->I, e = j->active[task / j->I_blocks];
    const int64_t i0 = (task % j->I_blocks) * ROWS_PER_TASK, i1 = i0 + ROWS_PER_TASK < I ? i0 + ROWS_PER_TASK : I;
    const int32_t *grp = j->pairs + j->offs[e];
    const int64_t M = j->offs[e + 1] - j->offs[e];
    const float **arows = j->arows + (size_t)tid * (size_t)j->P;
    float **orows = j->orows + (size_t)tid * (size_t)j->P;
    for (int64_t m = 0; m < M; m++) arows[m] = j->act + (grp[m] / a->k) * H;

    kt_gemm g = {&j->Lgu, expert_mat(a->gate_up, &j->Lgu, e), a->act_mode, M, arows, orows, NULL,
                 i0, i1, 0, j->scratch + (size_t)tid * j->scratch_floats};
    for (int64_t m = 0; m < M; m++) orows[m] = j->gu + (size_t)grp[m] * 2 * I + i0;
    j->kern->nt(&g); /* gate rows */
    g.lo = I + i0;
    g.hi = I + i1;
    for (int64_t m = 0; m < M; m++) orows[m] += I;
    j->kern->nt(&g); /* up rows */

    for (int64_t m = 0; m < M; m++) {
        const float *gp = j->gu + (size_t)grp[m] * 2 * I, *up = gp + I;
        float *hp = j->h + (size_t)grp[m] * I;
        for (int64_t i = i0; i < i1; i++) hp[i] = to_compute(kt_silu(gp[i]) * up[i], a->act_mode);
    }
}

static void f2_task(void *vj, int64_t task, int tid) {
    moe_job *j = vj;
    const kt_moe_args *a = j->a;
    const int64_t H = a->H, I = a->I, n0 = task * COLS_PER_TASK, n1 = n0 + COLS_PER_TASK < H ? n0 + COLS_PER_TASK : H;
    for (int64_t t = 0; t < a->T; t++) memset(a->y + t * H + n0, 0, sizeof(float) * (size_t)(n1 - n0));
    const float **arows = j->arows + (size_t)tid * (size_t)j->P;
    float **orows = j->orows + (size_t)tid * (size_t)j->P;
    float *alpha = j->alpha + (size_t)tid * (size_t)j->P;
    for (int64_t ai = 0; ai < j->n_active; ai++) {
        const int64_t e = j->active[ai];
        const int32_t *grp = j->pairs + j->offs[e];
        const int64_t M = j->offs[e + 1] - j->offs[e];
        for (int64_t m = 0; m < M; m++) {
            arows[m] = j->h + (size_t)grp[m] * I;
            orows[m] = a->y + (grp[m] / a->k) * H + n0;
            alpha[m] = a->topk_w[grp[m]];
        }
        kt_gemm g = {&j->Ld, expert_mat(a->down, &j->Ld, e), a->act_mode, M, arows, orows, alpha,
                     n0, n1, 1, j->scratch + (size_t)tid * j->scratch_floats};
        j->kern->nt(&g);
    }
}

static int check_args(const kt_moe_args *a) {
    if (a->E < 1 || a->H < 1 || a->I < 1 || a->T < 0 || a->k < 1 || a->k > a->E)
        KT_FAIL(KT_EINVAL, "bad shape E=%lld H=%lld I=%lld T=%lld k=%lld", (long long)a->E, (long long)a->H,
                (long long)a->I, (long long)a->T, (long long)a->k);
    return KT_OK;
}

int kt_moe_forward(const kt_moe_args *a) {
    int rc = check_args(a);
    if (rc || a->T == 0) return rc;
    pthread_mutex_lock(&g_engine_lock);
    moe_job j;
    rc = job_init(&j, a, 0);
    if (rc == KT_OK) {
        run_phase("F0", (a->T + TOKENS_PER_TASK - 1) / TOKENS_PER_TASK, f0_task, &j);
        run_phase("F1", j.n_active * j.I_blocks, f1_task, &j);
        run_phase("F2", (a->H + COLS_PER_TASK - 1) / COLS_PER_TASK, f2_task, &j);
    }
    pthread_mutex_unlock(&g_engine_lock);
    return rc;
}

/* ---- backward ----------------------------------------------------------------------------- */

static void b0_task(void *vj, int64_t task, int tid) {
    (void)tid;
    moe_job *j = vj;
    int64_t t0 = task * TOKENS_PER_TASK, t1 = t0 + TOKENS_PER_TASK;
    if (t1 > j->a->T) t1 = j->a->T;
    convert_rows(j->a->dy, j->a->dy_dtype, j->a->act_mode, t0, t1, j->a->H, j->act);
}

static void b1_task(void *vj, int64_t task, int tid) {
    moe_job *j = vj;
    const kt_moe_args *a = j->a;
    const int64_t H = a->H, I = a->I, e = j->active[task / j->I_blocks];
    const int64_t i0 = (task % j->I_blocks) * ROWS_PER_TASK, i1 = i0 + ROWS_PER_TASK < I ? i0 + ROWS_PER_TASK : I;
    const int32_t *grp = j->pairs + j->offs[e];
    const int64_t M = j->offs[e + 1] - j->offs[e];
    const float **arows = j->arows + (size_t)tid * (size_t)j->P;
    float **orows = j->orows + (size_t)tid * (size_t)j->P;
    for (int64_t m = 0; m < M; m++) {
        arows[m] = j->act + (grp[m] / a->k) * H;
        orows[m] = j->h + (size_t)grp[m] * I + i0;
    }
    kt_gemm g = {&j->Ld, expert_mat(a->down, &j->Ld, e), a->act_mode, M, arows, orows, NULL,
                 i0, i1, 0, j->scratch + (size_t)tid * j->scratch_floats};
    j->kern->tn(&g);
}

static void b2_task(void *vj, int64_t task, int tid) {
    (void)tid;
    moe_job *j = vj;
    const kt_moe_args *a = j->a;
    const int64_t I = a->I, mode = a->act_mode;
    int64_t p0 = task * PAIRS_PER_TASK, p1 = p0 + PAIRS_PER_TASK < j->P ? p0 + PAIRS_PER_TASK : j->P;
    for (int64_t p = p0; p < p1; p++) {
        const float *gp = j->gu + p * 2 * I, *up = gp + I, *dhu = j->h + p * I;
        float *dg = j->dgu + p * 2 * I, *du = dg + I;
        const float w = a->topk_w[p];
        float dot = 0.0f;
        for (int64_t i = 0; i < I; i++) {
            const float g = gp[i], u = up[i], s = 1.0f / (1.0f + expf(-g));
            dot += to_compute(g * s * u, (int)mode) * dhu[i];
            const float dh = w * dhu[i];
            dg[i] = to_compute(dh * u * s * (1.0f + g * (1.0f - s)), (int)mode);
            du[i] = to_compute(dh * g * s, (int)mode);
        }
        a->dw[p] = dot;
    }
}

static void b3_task(void *vj, int64_t task, int tid) {
    moe_job *j = vj;
    const kt_moe_args *a = j->a;
    const int64_t H = a->H, I = a->I, c0 = task * COLS_PER_TASK, c1 = c0 + COLS_PER_TASK < H ? c0 + COLS_PER_TASK : H;
    for (int64_t t = 0; t < a->T; t++) memset(a->dx + t * H + c0, 0, sizeof(float) * (size_t)(c1 - c0));
    const float **arows = j->arows + (size_t)tid * (size_t)j->P;
    float **orows = j->orows + (size_t)tid * (size_t)j->P;
    for (int64_t ai = 0; ai < j->n_active; ai++) {
        const int64_t e = j->active[ai];
        const int32_t *grp = j->pairs + j->offs[e];
        const int64_t M = j->offs[e + 1] - j->offs[e];
        for (int64_t m = 0; m < M; m++) {
            arows[m] = j->dgu + (size_t)grp[m] * 2 * I;
            orows[m] = a->dx + (grp[m] / a->k) * H + c0;
        }
        kt_gemm g = {&j->Lgu, expert_mat(a->gate_up, &j->Lgu, e), a->act_mode, M, arows, orows, NULL,
                     c0, c1, 1, j->scratch + (size_t)tid * j->scratch_floats};
        j->kern->tn(&g);
    }
}

int kt_moe_backward(const kt_moe_args *a) {
    int rc = check_args(a);
    if (rc || a->T == 0) return rc;
    if (!a->gu) KT_FAIL(KT_EINVAL, "backward needs the gate/up activations saved by the forward");
    pthread_mutex_lock(&g_engine_lock);
    moe_job j;
    rc = job_init(&j, a, 1);
    if (rc == KT_OK) {
        run_phase("B0", (a->T + TOKENS_PER_TASK - 1) / TOKENS_PER_TASK, b0_task, &j);
        run_phase("B1", j.n_active * j.I_blocks, b1_task, &j);
        run_phase("B2", (j.P + PAIRS_PER_TASK - 1) / PAIRS_PER_TASK, b2_task, &j);
        run_phase("B3", (a->H + COLS_PER_TASK - 1) / COLS_PER_TASK, b3_task, &j);
    }
    pthread_mutex_unlock(&g_engine_lock);
    return rc;
}

/* Engine plumbing: errors, CPU detection and kernel choice, the thread pool, the workspace. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "kt_internal.h"

/* ---- errors ------------------------------------------------------------------------------- */

static _Thread_local char g_error[512];

void kt_set_error(const char *file, int line, const char *fmt, ...) {
    int n = snprintf(g_error, sizeof g_error, "%s:%d: ", file, line);
    if (n < 0 || n >= (int)sizeof g_error) n = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_error + n, sizeof g_error - (size_t)n, fmt, ap);
    va_end(ap);
}

const char *kt_last_error(void) { return g_error; }
int kt_abi_version(void) { return KT_ABI_VERSION; }

/* ---- fp16 --------------------------------------------------------------------------------- */

float kt_fp16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalize */
            exp = 127 - 15 + 1;
            while (!(man & 0x400u)) { man <<= 1; exp--; }
            u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even; values beyond fp16 range become +-inf (callers keep scales in range). */
uint16_t kt_f32_to_fp16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    int32_t exp = (int32_t)((u >> 23) & 0xffu) - 127 + 15;
    uint32_t man = u & 0x7fffffu;
    if (((u >> 23) & 0xffu) == 0xffu) return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) { /* subnormal or zero */
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1u))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t h = sign | ((uint32_t)exp << 10) | (man >> 13), rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++; /* may carry into the exponent: fine */
    return (uint16_t)h;
}

/* ---- CPU features ------------------------------------------------------------------------- */

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
static unsigned detect_features(void) {
    unsigned a, b, c, d, f = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int osxsave = (c >> 27) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1, avx = (c >> 28) & 1;
    if (!osxsave || !avx) return 0;
    uint64_t xcr0 = xgetbv0();
    int ymm_ok = (xcr0 & 0x6) == 0x6, zmm_ok = (xcr0 & 0xe6) == 0xe6, amx_ok = (xcr0 & 0x60000) == 0x60000;
    if (!ymm_ok) return 0;
    if (fma) f |= KT_CPU_FMA;
    if (f16c) f |= KT_CPU_F16C;
    if (__get_cpuid_max(0, 0) < 7) return f;
    __cpuid_count(7, 0, a, b, c, d);
    if ((b >> 5) & 1) f |= KT_CPU_AVX2;
    if (zmm_ok) {
        if ((b >> 16) & 1) f |= KT_CPU_AVX512F;
        if ((b >> 30) & 1) f |= KT_CPU_AVX512BW;
        if ((b >> 31) & 1) f |= KT_CPU_AVX512VL;
        if ((b >> 17) & 1) f |= KT_CPU_AVX512DQ;
        if ((c >> 11) & 1) f |= KT_CPU_AVX512VNNI;
    }
    if (amx_ok && ((d >> 24) & 1)) f |= KT_CPU_AMX;
    if (amx_ok && ((d >> 24) & 1) && ((d >> 22) & 1)) f |= KT_CPU_AMXBF16;
    if (amx_ok && ((d >> 24) & 1) && ((d >> 25) & 1)) f |= KT_CPU_AMXINT8;
    unsigned a1, b1, c1, d1;
    __cpuid_count(7, 1, a1, b1, c1, d1);
    if (zmm_ok && ((a1 >> 5) & 1)) f |= KT_CPU_AVX512BF16;
    if ((a1 >> 4) & 1) f |= KT_CPU_AVXVNNI;
    return f;
}
#else
static unsigned detect_features(void) { return 0; }
#endif

/* The cached answers below are computed on first use by whichever thread gets there; they are the
 * same from every thread, so the lazy store may race with itself harmlessly, but it is done with
 * relaxed atomics so the C memory model (and ThreadSanitizer) agree. */
unsigned kt_cpu_features(void) {
    static unsigned cached = ~0u;
    unsigned v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (v == ~0u) {
        v = detect_features();
        __atomic_store_n(&cached, v, __ATOMIC_RELAXED);
    }
    return v;
}

#define KT_NEEDS_AVX2 (KT_CPU_AVX2 | KT_CPU_FMA | KT_CPU_F16C)
#define KT_NEEDS_AVX512 (KT_NEEDS_AVX2 | KT_CPU_AVX512F | KT_CPU_AVX512BW | KT_CPU_AVX512VL | KT_CPU_AVX512DQ)
static const unsigned isa_needs[] = {
    [KT_ISA_SCALAR] = 0,
    [KT_ISA_AVX2] = KT_NEEDS_AVX2,
    [KT_ISA_AVX512] = KT_NEEDS_AVX512,
    [KT_ISA_AVX512_SIMDE] = KT_NEEDS_AVX2, /* emulated: the zmm code runs as AVX2 */
    [KT_ISA_AMX] = KT_NEEDS_AVX512 | KT_CPU_AVX512BF16 | KT_CPU_AMX | KT_CPU_AMXBF16,
    [KT_ISA_AVX_VNNI] = KT_NEEDS_AVX2 | KT_CPU_AVXVNNI,
};

static const kt_kernels *kernels_of(int isa) {
    switch (isa) {
    case KT_ISA_SCALAR: return &kt_kernels_scalar;
#if defined(__x86_64__)
    case KT_ISA_AVX2: return &kt_kernels_avx2;
    case KT_ISA_AVX512: return &kt_kernels_avx512; /* weak: NULL when not built */
    case KT_ISA_AVX512_SIMDE: return &kt_kernels_avx512_simde;
    case KT_ISA_AMX: return &kt_kernels_amx;
    case KT_ISA_AVX_VNNI: return &kt_kernels_avx_vnni;
#endif
    default: return NULL; /* not compiled for this architecture */
    }
}

#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#define KT_ARCH_GET_XCOMP_PERM 0x1022
#define KT_ARCH_REQ_XCOMP_PERM 0x1023
#define KT_XFEATURE_XTILEDATA 18
/* Linux hands out AMX tile state only to processes that ask for it (5.16+); without it the
 * first tile instruction faults. Asked once; the answer holds for every thread. */
int kt_amx_permitted(void) {
    static int cached = -1;
    int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (v < 0) {
        unsigned long bits = 0;
        v = syscall(SYS_arch_prctl, KT_ARCH_REQ_XCOMP_PERM, KT_XFEATURE_XTILEDATA) == 0 &&
            syscall(SYS_arch_prctl, KT_ARCH_GET_XCOMP_PERM, &bits) == 0 && ((bits >> KT_XFEATURE_XTILEDATA) & 1);
        __atomic_store_n(&cached, v, __ATOMIC_RELAXED);
    }
    return v;
}
#elif defined(__x86_64__)
int kt_amx_permitted(void) { return 0; }
#endif

int kt_isa_supported(int isa) {
    if (isa < 0 || isa > KT_ISA_AVX_VNNI) return 0;
    if (kernels_of(isa) == NULL || (kt_cpu_features() & isa_needs[isa]) != isa_needs[isa]) return 0;
#if defined(__x86_64__)
    if (isa == KT_ISA_AMX && !kt_amx_permitted()) return 0;
#endif
    return 1;
}

/* The selected path. Another Python thread may select while a layer call runs: the call read the
 * path once when it started (job_init) and keeps it; the next call takes the new one. Relaxed atomics:
 * found by ThreadSanitizer (scripts/sanitize.sh --thread) as a plain int written and read concurrently. */
static int g_isa = -1;

int kt_select_isa(int isa) {
    if (!kt_isa_supported(isa)) KT_FAIL(KT_EUNSUPPORTED, "kernel path %d is not available on this CPU/build", isa);
    __atomic_store_n(&g_isa, isa, __ATOMIC_RELAXED);
    return KT_OK;
}

int kt_current_isa(void) {
    int isa = __atomic_load_n(&g_isa, __ATOMIC_RELAXED);
    if (isa < 0) {
        static const int order[] = {KT_ISA_AMX, KT_ISA_AVX512, KT_ISA_AVX_VNNI, KT_ISA_AVX2, KT_ISA_SCALAR};
        for (size_t i = 0; i < sizeof order / sizeof order[0]; i++)
            if (kt_isa_supported(order[i])) { isa = order[i]; break; }
        /* the default, unless a selection came in meanwhile */
        int unset = -1;
        if (!__atomic_compare_exchange_n(&g_isa, &unset, isa, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) isa = unset;
    }
    return isa;
}

const kt_kernels *kt_active_kernels(void) { return kernels_of(kt_current_isa()); }

/* ---- thread pool -------------------------------------------------------------------------- */
/* Persistent workers sleep on a condition variable; the calling thread works too. Tasks are
 * handed out through one atomic counter, so uneven tasks balance themselves. */

#define KT_MAX_THREADS 256

static struct {
    pthread_mutex_t call_lock;   /* one parallel_for at a time */
    pthread_mutex_t lock;
    pthread_cond_t wake, done;
    int n_threads, n_workers;    /* n_workers = threads started (n_threads - 1 wanted) */
    pthread_t workers[KT_MAX_THREADS];
    uint64_t generation;
    int active_workers;          /* workers that take part in the current job */
    int finished;
    kt_task_fn fn;
    void *ctx;
    int64_t n_tasks;
    atomic_llong next;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
          PTHREAD_COND_INITIALIZER, 0, 0, {0}, 0, 0, 0, NULL, NULL, 0, 0};

static void run_tasks(int tid) {
    for (;;) {
        long long i = atomic_fetch_add_explicit(&pool.next, 1, memory_order_relaxed);
        if (i >= pool.n_tasks) break;
        pool.fn(pool.ctx, (int64_t)i, tid);
    }
}

static void *worker_main(void *arg) {
    int tid = (int)(intptr_t)arg; /* 1.. */
    uint64_t seen = 0;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        while (pool.generation == seen) pthread_cond_wait(&pool.wake, &pool.lock);
        seen = pool.generation;
        if (tid > pool.active_workers) continue;
        pthread_mutex_unlock(&pool.lock);
        run_tasks(tid);
        pthread_mutex_lock(&pool.lock);
        if (++pool.finished == pool.active_workers) pthread_cond_signal(&pool.done);
    }
    return NULL;
}

static int default_threads(void) {
    const char *env = getenv("KT_SFT_NUM_THREADS");
    if (env && atoi(env) > 0) return atoi(env);
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

/* Callers size per-thread buffers from kt_get_num_threads() and then call kt_parallel_for; another
 * thread may change the count in between (kt_set_num_threads from Python during a layer call). So a
 * parallel_for never uses more threads than its calling thread last read here (tid < that count). */
static _Thread_local int tl_threads_seen;

int kt_set_num_threads(int n) {
    if (n < 1 || n > KT_MAX_THREADS) KT_FAIL(KT_EINVAL, "thread count must be in [1, %d], got %d", KT_MAX_THREADS, n);
    __atomic_store_n(&pool.n_threads, n, __ATOMIC_RELAXED);
    return KT_OK;
}

static int current_threads(void) {
    int n = __atomic_load_n(&pool.n_threads, __ATOMIC_RELAXED);
    if (n == 0) {
        int expected = 0, d = default_threads();
        n = __atomic_compare_exchange_n(&pool.n_threads, &expected, d, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED) ? d : expected;
    }
    return n;
}

int kt_get_num_threads(void) { return tl_threads_seen = current_threads(); }

/* fork(): the prepare handler waits for a parallel_for running in another thread to end (call_lock),
 * so the child never inherits a half-done job. In the child only the forking thread exists: forget
 * the workers and the last job (a stale generation or task counter would let the first worker the
 * child starts run the parent's old tasks and count itself finished for the new job). Registered at
 * load time, before the engine's own handler (kt_moe.c): prepare handlers run in reverse order, so
 * the engine lock is taken before call_lock, the same order as kt_moe_forward. */
static void pool_before_fork(void) { pthread_mutex_lock(&pool.call_lock); }
static void pool_after_fork_parent(void) { pthread_mutex_unlock(&pool.call_lock); }
static void pool_after_fork_child(void) {
    pthread_mutex_init(&pool.call_lock, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.n_workers = 0;
    pool.generation = 0;
    pool.active_workers = 0;
    pool.finished = 0;
    pool.n_tasks = 0;
    atomic_store(&pool.next, 0);
}

__attribute__((constructor)) static void pool_register_atfork(void) {
    pthread_atfork(pool_before_fork, pool_after_fork_parent, pool_after_fork_child);
}

void kt_parallel_for(int64_t n_tasks, kt_task_fn fn, void *ctx) {
    if (n_tasks <= 0) return;
    pthread_mutex_lock(&pool.call_lock);
    const int cap = tl_threads_seen;
    int want = current_threads() - 1;
    if (cap > 0 && want > cap - 1) want = cap - 1;
    if (want > n_tasks - 1) want = (int)(n_tasks - 1);
    while (pool.n_workers < want) {
        if (pthread_create(&pool.workers[pool.n_workers], NULL, worker_main,
                           (void *)(intptr_t)(pool.n_workers + 1)) != 0) break;
        pthread_detach(pool.workers[pool.n_workers]);
        pool.n_workers++;
    }
    if (want > pool.n_workers) want = pool.n_workers;

    pthread_mutex_lock(&pool.lock);
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n_tasks = n_tasks;
    atomic_store(&pool.next, 0);
    pool.active_workers = want;
    pool.finished = 0;
    pool.generation++;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);

    run_tasks(0);

    pthread_mutex_lock(&pool.lock);
    while (pool.finished < pool.active_workers) pthread_cond_wait(&pool.done, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.call_lock);
}

/* ---- workspace ---------------------------------------------------------------------------- */

static void *g_ws;
static size_t g_ws_bytes;

void *kt_workspace(size_t bytes) {
    if (bytes <= g_ws_bytes) return g_ws;
    free(g_ws);
    size_t n = (bytes + 63) & ~(size_t)63;
    g_ws = aligned_alloc(64, n);
    g_ws_bytes = g_ws ? n : 0;
    return g_ws;
}

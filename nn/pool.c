/* nn/pool.c: the CPU backend's worker threads (see pool.h). A run hands
 * out task indices from one atomic counter; the workers wait for the next
 * run on a condition variable and the caller for the last worker on another. */
#include "pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

/* Sleeping workers wake in tens of microseconds; products smaller than this
 * many multiply-adds run whole on the caller. */
#define POOL_MIN_GEMM_MACS (1 << 18)

struct nn_pool {
    int threads;
    int started; /* workers running; -1: they could not start, run serially */
    pthread_t *tid;
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    unsigned gen;      /* counts the runs */
    unsigned gen_born; /* gen when the workers were started */
    int stop;
    void (*fn)(void *arg, int i);
    void *arg;
    int n;
    atomic_int next;
    int active; /* workers not yet done with the current run */
};

/* Set on a thread while it runs tasks: a task that runs the pool again
 * runs its tasks itself. */
static _Thread_local int in_task;

static void drain(nn_pool *p, void (*fn)(void *, int), void *arg, int n)
{
    in_task = 1;
    for (;;) {
        int i = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
        if (i >= n) break;
        fn(arg, i);
    }
    in_task = 0;
}

static void *worker(void *vp)
{
    nn_pool *p = vp;
    pthread_mutex_lock(&p->mu);
    /* not p->gen: a run may have begun before this thread got the lock */
    unsigned seen = p->gen_born;
    for (;;) {
        while (!p->stop && p->gen == seen)
            pthread_cond_wait(&p->go, &p->mu);
        if (p->stop) break;
        seen = p->gen;
        void (*fn)(void *, int) = p->fn;
        void *arg = p->arg;
        int n = p->n;
        pthread_mutex_unlock(&p->mu);
        drain(p, fn, arg, n);
        pthread_mutex_lock(&p->mu);
        if (--p->active == 0) pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

nn_pool *nn_pool_create(int threads)
{
    nn_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->threads = threads < 1 ? 1 : threads > 256 ? 256 : threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->go, NULL);
    pthread_cond_init(&p->done, NULL);
    return p;
}

static void stop_workers(nn_pool *p)
{
    if (p->started <= 0) return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->started; i++)
        pthread_join(p->tid[i], NULL);
    p->started = 0;
    p->stop = 0;
}

void nn_pool_free(nn_pool *p)
{
    if (!p) return;
    stop_workers(p);
    free(p->tid);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->go);
    pthread_cond_destroy(&p->done);
    free(p);
}

int nn_pool_threads(const nn_pool *p)
{
    return p && p->started >= 0 ? p->threads : 1;
}

/* The workers, started by the pool's first run so that they take the
 * scheduling of the thread that uses the model. 0, or -1 when not even one
 * could start (the pool then runs everything on the caller). */
static int start_workers(nn_pool *p)
{
    if (p->started) return p->started > 0 ? 0 : -1;
    p->tid = calloc((size_t)p->threads - 1, sizeof *p->tid);
    p->gen_born = p->gen;
    int n = 0;
    while (p->tid && n < p->threads - 1 && pthread_create(&p->tid[n], NULL, worker, p) == 0)
        n++;
    if (n == 0) {
        p->started = -1;
        return -1;
    }
    p->started = n;
    p->threads = n + 1;
    return 0;
}

void nn_pool_run(nn_pool *p, int n, void (*fn)(void *arg, int i), void *arg)
{
    if (n <= 0) return;
    if (!p || p->threads <= 1 || n == 1 || in_task || start_workers(p) != 0) {
        int nested = in_task;
        in_task = 1;
        for (int i = 0; i < n; i++)
            fn(arg, i);
        in_task = nested;
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->arg = arg;
    p->n = n;
    atomic_store_explicit(&p->next, 0, memory_order_relaxed);
    p->active = p->started;
    p->gen++;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    drain(p, fn, arg, n);
    pthread_mutex_lock(&p->mu);
    while (p->active > 0)
        pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

int nn_pool_ranges(size_t n, size_t min, int parts)
{
    if (min < 1) min = 1;
    size_t most = (n + min - 1) / min;
    if (most < 1) most = 1;
    return parts < 1 ? 1 : (size_t)parts < most ? parts : (int)most;
}

void nn_pool_range(size_t n, int nranges, int i, size_t *lo, size_t *hi)
{
    *lo = n * (size_t)i / (size_t)nranges;
    *hi = n * (size_t)(i + 1) / (size_t)nranges;
}

void nn_pool_range_pairs(size_t n, int count, int nranges, int i,
                         void (*fn)(const void *arg, int i, int img, int c0, int c1),
                         const void *arg)
{
    size_t lo, hi, c = (size_t)count;
    nn_pool_range(n * c, nranges, i, &lo, &hi);
    for (size_t img = lo / c; lo < hi; img++) {
        size_t end = (img + 1) * c < hi ? (img + 1) * c : hi;
        fn(arg, i, (int)img, (int)(lo - img * c), (int)(end - img * c));
        lo = end;
    }
}

/* ---- matrix products ----------------------------------------------------- */

struct gemm_task {
    enum CBLAS_TRANSPOSE ta, tb;
    int M, N, K, by_rows, parts;
    float alpha, beta;
    const float *A, *B;
    float *C;
    int lda, ldb, ldc;
};

/* Blocks of 16 rows or columns: whole register tiles of OpenBLAS's kernels. */
static void block(int n, int parts, int i, int *lo, int *hi)
{
    int units = (n + 15) / 16;
    *lo = 16 * (int)((long)units * i / parts);
    *hi = 16 * (int)((long)units * (i + 1) / parts);
    if (*lo > n) *lo = n;
    if (*hi > n) *hi = n;
}

static void gemm_part(void *arg, int i)
{
    const struct gemm_task *t = arg;
    int lo, hi;
    if (t->by_rows) {
        block(t->M, t->parts, i, &lo, &hi);
        if (hi <= lo) return;
        const float *A = t->ta == CblasNoTrans ? t->A + (size_t)lo * t->lda : t->A + lo;
        cblas_sgemm(CblasRowMajor, t->ta, t->tb, hi - lo, t->N, t->K, t->alpha, A, t->lda, t->B,
                    t->ldb, t->beta, t->C + (size_t)lo * t->ldc, t->ldc);
    } else {
        block(t->N, t->parts, i, &lo, &hi);
        if (hi <= lo) return;
        const float *B = t->tb == CblasNoTrans ? t->B + lo : t->B + (size_t)lo * t->ldb;
        cblas_sgemm(CblasRowMajor, t->ta, t->tb, t->M, hi - lo, t->K, t->alpha, t->A, t->lda, B,
                    t->ldb, t->beta, t->C + lo, t->ldc);
    }
}

void nn_pool_sgemm(nn_pool *p, enum CBLAS_TRANSPOSE ta, enum CBLAS_TRANSPOSE tb, int M, int N,
                   int K, float alpha, const float *A, int lda, const float *B, int ldb, float beta,
                   float *C, int ldc)
{
    int T = nn_pool_threads(p);
    double macs = (double)M * N * K;
    if (T <= 1 || in_task || macs < POOL_MIN_GEMM_MACS || (M < 32 && N < 32)) {
        cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    struct gemm_task t = {ta, tb, M, N, K, N < M, 0, alpha, beta, A, B, C, lda, ldb, ldc};
    int units = ((t.by_rows ? M : N) + 15) / 16;
    t.parts = units < T ? units : T;
    nn_pool_run(p, t.parts, gemm_part, &t);
}

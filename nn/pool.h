/* nn/pool.h: the CPU backend's worker threads. One pool per model (the CPU
 * backend's context), so a model's arithmetic runs on its own threads and
 * the caller's: the transforms, element-wise layers and batch-norm that
 * OpenBLAS leaves to one thread, and the matrix products, cut into blocks
 * that each run on single-threaded OpenBLAS. Idle workers sleep on a
 * condition variable rather than spin, so the receiving threads of the node
 * (and each other) get the cores back at once.
 *
 * The workers start on first use, from the thread that uses the model, and
 * so inherit its scheduling (the node's inference thread runs SCHED_IDLE).
 * A pool is used by one thread at a time, like the model that owns it. */
#ifndef NN_POOL_H
#define NN_POOL_H

#include <cblas.h>
#include <stddef.h>

typedef struct nn_pool nn_pool;

/* A pool of `threads` threads in all, the caller included (1: no workers).
 * Returns NULL when out of memory. */
nn_pool *nn_pool_create(int threads);
void nn_pool_free(nn_pool *p);         /* NULL is a no-op */
int nn_pool_threads(const nn_pool *p); /* 1 for NULL */

/* Runs fn(arg, i) once for every i in [0, n), spread over the pool's threads
 * and the caller, and returns when all have returned. The tasks must write
 * to disjoint memory. On a NULL or one-thread pool, from inside a task, or
 * when the workers cannot start, the tasks run in order on the caller. */
void nn_pool_run(nn_pool *p, int n, void (*fn)(void *arg, int i), void *arg);

/* Splits [0, n) into at most `parts` contiguous ranges of at least `min`
 * items; range i is [*lo, *hi). Returns how many ranges there are. */
int nn_pool_ranges(size_t n, size_t min, int parts);
void nn_pool_range(size_t n, int nranges, int i, size_t *lo, size_t *hi);
/* Range i of nranges over the n x count pairs (image, channel), image-major:
 * one call fn(arg, i, img, c0, c1) per image it touches, with the channels
 * [c0, c1) of that image. */
void nn_pool_range_pairs(size_t n, int count, int nranges, int i,
                         void (*fn)(const void *arg, int i, int img, int c0, int c1),
                         const void *arg);

/* cblas_sgemm (row-major) with C cut into blocks of rows or columns, one per
 * thread; small products run whole on the caller. The blocks depend only on
 * the number of threads, so a run repeats bit for bit on the same count;
 * across counts the sums may round differently (OpenBLAS picks its kernels
 * by size), by about one float ulp. */
void nn_pool_sgemm(nn_pool *p, enum CBLAS_TRANSPOSE ta, enum CBLAS_TRANSPOSE tb, int M, int N,
                   int K, float alpha, const float *A, int lda, const float *B, int ldb, float beta,
                   float *C, int ldc);

#endif

/* nn/bench_main.c: nn-bench, the C side of bench/nn.sh.
 *
 *   nn-bench sgemm N                  OpenBLAS sgemm N^3, GFLOP/s
 *   nn-bench fwd ARCH BATCH SECONDS   eval forward of the CNN (features and
 *                                     classifier) at 3x128x128, slices/s
 *   nn-bench train ARCH SLICES STEPS [DEVICE]
 *                                     LRCN training steps on one series, s/step
 *   nn-bench lrcn-fwd ARCH SLICES REPS DEVICE
 *                                     LRCN inference (nn_lrcn_predict, host in and
 *                                     out) of one series, median ms (bench/gpu.sh)
 *
 * DEVICE: cpu (default), cuda or auto; on a GPU in production precision
 * (TF32 convolutions where cuDNN picks them, as PyTorch's defaults).
 * Threads: OPENBLAS_NUM_THREADS (bench/nn.sh sets it to the core count), which
 * OpenBLAS's sgemm uses and a model's worker pool takes as its default.
 * Prints one line "key=value ..." per run. */
#include "nn.h"

#include <cblas.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double cpu(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static float *random_buf(size_t n, uint64_t seed)
{
    float *p = malloc(n * sizeof(float));
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < n; i++)
        p[i] = nn_rng_uniform(&seed);
    return p;
}

static int bench_sgemm(int n)
{
    float *a = random_buf((size_t)n * n, 1), *b = random_buf((size_t)n * n, 2);
    float *c = random_buf((size_t)n * n, 3);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
    int iters = 0;
    double t0 = now(), t;
    do {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c,
                    n);
        iters++;
    } while ((t = now() - t0) < 2.0);
    printf("sgemm n=%d gflops=%.1f\n", n, 2.0 * n * n * (double)n * iters / t * 1e-9);
    free(a), free(b), free(c);
    return 0;
}

static nn_model *make(const char *arch, const char *device)
{
    nn_config c;
    nn_config_default(&c);
    c.arch = arch;
    char err[256];
    nn_model *m = nn_model_create(&c, err, sizeof(err));
    if (m && nn_model_set_device(m, device, 0, err, sizeof(err)) != 0) {
        nn_model_free(m);
        m = NULL;
    }
    if (!m) fprintf(stderr, "nn-bench: %s\n", err);
    return m;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int bench_lrcn_fwd(const char *arch, int slices, int reps, const char *device)
{
    nn_model *m = make(arch, device);
    if (!m || reps < 1) return 1;
    float *x = random_buf((size_t)slices * 3 * 128 * 128, 6),
          *p = malloc(sizeof(float) * slices * 6);
    double *ms = malloc(sizeof(double) * reps);
    int rc = 0;
    for (int i = 0; i < 3 && rc == 0; i++) /* warm-up: workspaces, cuDNN algorithm search */
        rc = nn_lrcn_predict(m, x, &slices, 1, p);
    for (int i = 0; i < reps && rc == 0; i++) {
        double t0 = now();
        rc = nn_lrcn_predict(m, x, &slices, 1, p);
        ms[i] = 1e3 * (now() - t0);
    }
    if (rc == 0) {
        qsort(ms, reps, sizeof(double), cmp_double);
        printf("lrcn_fwd arch=%s slices=%d device=%s median_ms=%.2f min_ms=%.2f reps=%d\n", arch,
               slices, nn_model_device(m), ms[reps / 2], ms[0], reps);
    } else {
        fprintf(stderr, "nn-bench: lrcn-fwd failed (%d)\n", rc);
    }
    free(x), free(p), free(ms);
    nn_model_free(m);
    return rc != 0;
}

static int bench_fwd(const char *arch, int batch, double seconds)
{
    nn_model *m = make(arch, "cpu");
    if (!m) return 1;
    float *x = random_buf((size_t)batch * 3 * 128 * 128, 4), *y = malloc(sizeof(float) * batch * 6);
    nn_cnn_predict(m, x, batch, y); /* warm-up: workspaces */
    int iters = 0;
    double t0 = now(), c0 = cpu(), t;
    do {
        nn_cnn_predict(m, x, batch, y);
        iters++;
    } while ((t = now() - t0) < seconds);
    /* CPU seconds per slice (all threads) tell work from waiting on a busy machine */
    printf("fwd arch=%s batch=%d slices_per_s=%.2f cpu_ms_per_slice=%.1f\n", arch, batch,
           batch * iters / t, 1e3 * (cpu() - c0) / (batch * iters));
    free(x), free(y);
    nn_model_free(m);
    return 0;
}

static int bench_train(const char *arch, int slices, int steps, const char *device)
{
    nn_model *m = make(arch, device);
    if (!m) return 1;
    float *x = random_buf((size_t)slices * 3 * 128 * 128, 5), *y = calloc(slices * 6, 4);
    float *logits = malloc(sizeof(float) * slices * 6), *dl = malloc(sizeof(float) * slices * 6);
    for (int i = 0; i < slices; i += 7)
        y[i * 6] = 1.0f;
    nn_adam a;
    nn_adam_default(&a);
    nn_model_set_training(m, 1);
    double best = 1e30, loss = 0.0, fwd = 0.0, bwd = 0.0, cbest = 1e30;
    int rc = 0;
    for (int s = 0; s <= steps && rc == 0; s++) { /* step 0 is the warm-up */
        double t0 = now(), c0 = cpu();
        nn_model_zero_grad(m);
        rc = nn_lrcn_forward(m, x, &slices, 1, logits);
        double t1 = now();
        loss = nn_bce_logits(dl, logits, y, NULL, NULL, slices, 6);
        if (rc == 0) rc = nn_lrcn_backward(m, dl);
        double t2 = now();
        nn_model_adam_step(m, &a);
        /* a GPU queues Adam: the step ends when the weights are there */
        nn_tensor_info ti;
        nn_model_tensor(m, 0, &ti);
        double t = now() - t0, c = cpu() - c0;
        if (s > 0 && t < best) best = t, fwd = t1 - t0, bwd = t2 - t1;
        if (s > 0 && c < cbest) cbest = c;
    }
    if (rc != 0) fprintf(stderr, "nn-bench: train failed (%d)\n", rc);
    printf("train arch=%s slices=%d device=%s s_per_step=%.4f slices_per_s=%.1f loss=%.4f "
           "fwd_s=%.4f bwd_s=%.4f cpu_s_per_step=%.3f\n",
           arch, slices, nn_model_device(m), best, slices / best, loss, fwd, bwd, cbest);
    free(x), free(y), free(logits), free(dl);
    nn_model_free(m);
    return rc != 0;
}

/* A number argument, the whole of it and in range, else usage's exit 2
 * (atoi would read "abc" as 0 and "3x" as 3). */
static long arg_long(const char *s, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < lo || v > hi) {
        fprintf(stderr, "nn-bench: \"%s\" is not an integer in %ld..%ld\n", s, lo, hi);
        exit(2);
    }
    return v;
}

static double arg_seconds(const char *s)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || errno || !(v > 0 && v <= 86400)) {
        fprintf(stderr, "nn-bench: \"%s\" is not a number of seconds (0..86400]\n", s);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    char blas_err[256]; /* the node's kernels, so that the figures are the node's */
    if (nn_blas_rerun(argv, blas_err, sizeof blas_err) != 0)
        fprintf(stderr, "nn-bench: %s\n", blas_err);
    if (argc == 3 && strcmp(argv[1], "sgemm") == 0)
        return bench_sgemm((int)arg_long(argv[2], 1, 16384));
    if (argc == 5 && strcmp(argv[1], "fwd") == 0)
        return bench_fwd(argv[2], (int)arg_long(argv[3], 1, 4096), arg_seconds(argv[4]));
    if ((argc == 5 || argc == 6) && strcmp(argv[1], "train") == 0)
        return bench_train(argv[2], (int)arg_long(argv[3], 1, 4096),
                           (int)arg_long(argv[4], 1, 1000000), argc == 6 ? argv[5] : "cpu");
    if (argc == 6 && strcmp(argv[1], "lrcn-fwd") == 0)
        return bench_lrcn_fwd(argv[2], (int)arg_long(argv[3], 1, 100000),
                              (int)arg_long(argv[4], 1, 1000000), argv[5]);
    fprintf(stderr, "usage: nn-bench sgemm N | fwd ARCH BATCH SECONDS | train ARCH SLICES STEPS "
                    "[DEVICE] | lrcn-fwd ARCH SLICES REPS DEVICE\n");
    return 2;
}

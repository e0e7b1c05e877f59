/* nn/bench_main.c: nn-bench, the C side of bench/nn.sh.
 *
 *   nn-bench sgemm N                  OpenBLAS sgemm N^3, GFLOP/s
 *   nn-bench fwd ARCH BATCH SECONDS   eval forward of the CNN (features and
 *                                     classifier) at 3x128x128, slices/s
 *   nn-bench train ARCH SLICES STEPS  LRCN training steps on one series, s/step
 *
 * Threads: OPENBLAS_NUM_THREADS (bench/nn.sh sets it to the core count).
 * Prints one line "key=value ..." per run. */
#include "nn.h"

#include <cblas.h>
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

static nn_model *make(const char *arch)
{
    nn_config c;
    nn_config_default(&c);
    c.arch = arch;
    char err[256];
    nn_model *m = nn_model_create(&c, err, sizeof(err));
    if (!m) fprintf(stderr, "nn-bench: %s\n", err);
    return m;
}

static int bench_fwd(const char *arch, int batch, double seconds)
{
    nn_model *m = make(arch);
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

static int bench_train(const char *arch, int slices, int steps)
{
    nn_model *m = make(arch);
    if (!m) return 1;
    float *x = random_buf((size_t)slices * 3 * 128 * 128, 5), *y = calloc(slices * 6, 4);
    float *logits = malloc(sizeof(float) * slices * 6), *dl = malloc(sizeof(float) * slices * 6);
    for (int i = 0; i < slices; i += 7)
        y[i * 6] = 1.0f;
    nn_adam a;
    nn_adam_default(&a);
    nn_model_set_training(m, 1);
    double best = 1e30, loss = 0.0, fwd = 0.0, bwd = 0.0, cbest = 1e30;
    for (int s = 0; s <= steps; s++) { /* step 0 is the warm-up */
        double t0 = now(), c0 = cpu();
        nn_model_zero_grad(m);
        nn_lrcn_forward(m, x, &slices, 1, logits);
        double t1 = now();
        loss = nn_bce_logits(dl, logits, y, NULL, NULL, slices, 6);
        nn_lrcn_backward(m, dl);
        double t2 = now();
        nn_model_adam_step(m, &a);
        double t = now() - t0, c = cpu() - c0;
        if (s > 0 && t < best) best = t, fwd = t1 - t0, bwd = t2 - t1;
        if (s > 0 && c < cbest) cbest = c;
    }
    printf("train arch=%s slices=%d s_per_step=%.3f loss=%.4f fwd_s=%.3f bwd_s=%.3f "
           "cpu_s_per_step=%.3f\n",
           arch, slices, best, loss, fwd, bwd, cbest);
    free(x), free(y), free(logits), free(dl);
    nn_model_free(m);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "sgemm") == 0) return bench_sgemm(atoi(argv[2]));
    if (argc == 5 && strcmp(argv[1], "fwd") == 0)
        return bench_fwd(argv[2], atoi(argv[3]), atof(argv[4]));
    if (argc == 5 && strcmp(argv[1], "train") == 0)
        return bench_train(argv[2], atoi(argv[3]), atoi(argv[4]));
    fprintf(stderr, "usage: nn-bench sgemm N | fwd ARCH BATCH SECONDS | train ARCH SLICES STEPS\n");
    return 2;
}

/* tests/nn/cuda_check.h: what the CUDA tests share. They are plain C
 * programs (no criterion, so that -Dnn_only=true builds them on a GPU server
 * without Debian's -dev packages): each comparison prints one line, a
 * failure is counted, and main() returns 1 if any failed, or 77 (meson's
 * SKIP) when no GPU is present. The measure is ggml's test-backend-ops one,
 * the normalised mean squared error sum((a-b)^2) / sum(b^2). */
#ifndef NN_CUDA_CHECK_H
#define NN_CUDA_CHECK_H

#include "backend.h"
#include "nn.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NMSE_TOL 1e-6 /* fp32, TF32 off (issue 11) */
#define SKIP 77

typedef struct check_ctx {
    int failures, checks;
    const nn_backend *be;
    void *dev;
} check_ctx;

/* sum((a-b)^2) / max(sum(b^2), floor); floor > 0 keeps all-zero references
 * (and references that are rounding noise) from dividing by nothing. */
static inline double nmse_floor(const float *a, const float *b, size_t n, double floor)
{
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return num / (den > floor ? den : floor);
}

static inline void check_nmse(check_ctx *t, const char *what, const float *got, const float *ref,
                              size_t n, double floor)
{
    double e = nmse_floor(got, ref, n, floor > 0 ? floor : 1e-30);
    t->checks++;
    if (!(e <= NMSE_TOL)) {
        t->failures++;
        printf("FAIL %-40s nmse=%.3g (n=%zu)\n", what, e, n);
    } else {
        printf("ok   %-40s nmse=%.3g\n", what, e);
    }
}

static inline void check_true(check_ctx *t, const char *what, int ok)
{
    t->checks++;
    if (!ok) t->failures++;
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
}

static inline float *host_random(size_t n, unsigned long long seed)
{
    float *p = malloc((n + 1) * sizeof(float));
    uint64_t s = seed * 0x9e3779b97f4a7c15ULL + 1;
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < n; i++)
        p[i] = 2.0f * nn_rng_uniform(&s) - 1.0f;
    return p;
}

#endif

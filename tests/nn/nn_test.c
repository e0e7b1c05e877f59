/* tests/nn/nn_test.c: see nn_test.h. */
#include "nn_test.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

nn_st_file *ref_open(const char *name)
{
    char path[512], err[256] = "";
    snprintf(path, sizeof(path), "%s/%s", NN_REF_DIR, name);
    nn_st_file *f = nn_st_open(path, err, sizeof(err));
    cr_assert(f, "cannot open reference %s: %s", path, err);
    return f;
}

float *ref_f32(const nn_st_file *f, const char *name, size_t *n)
{
    const nn_st_tensor *t = nn_st_find(f, name);
    cr_assert(t, "reference tensor %s missing", name);
    cr_assert(t->dtype == NN_ST_F32, "reference tensor %s is not F32", name);
    float *p = malloc(t->nbytes + sizeof(float));
    cr_assert(p);
    memcpy(p, t->data, t->nbytes);
    if (n) *n = t->nbytes / sizeof(float);
    return p;
}

int *ref_i32(const nn_st_file *f, const char *name, size_t *n)
{
    const nn_st_tensor *t = nn_st_find(f, name);
    cr_assert(t && t->dtype == NN_ST_I32, "reference tensor %s missing or not I32", name);
    int *p = malloc(t->nbytes + sizeof(int));
    cr_assert(p);
    memcpy(p, t->data, t->nbytes);
    if (n) *n = t->nbytes / sizeof(int);
    return p;
}

double rel_err(const float *a, const float *b, size_t n)
{
    double diff = 0.0, scale = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= diff)) diff = d; /* NaN propagates */
        if (fabs(b[i]) > scale) scale = fabs(b[i]);
    }
    return diff / (scale + 1e-6);
}

void expect_close(const char *what, const float *a, const float *b, size_t n, double tol)
{
    double e = rel_err(a, b, n);
    cr_expect(e <= tol, "%s: relative error %.3g > %.3g", what, e, tol);
}

void fill_random(float *x, size_t n, unsigned long long seed)
{
    uint64_t s = seed;
    for (size_t i = 0; i < n; i++)
        x[i] = 2.0f * nn_rng_uniform(&s) - 1.0f;
}

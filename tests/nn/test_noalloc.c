/* tests/nn/test_noalloc.c: a steady training or inference loop does not
 * allocate. Linked with --wrap=malloc,calloc,realloc so that every allocation
 * made by nn/ (a static library) is counted here; OpenBLAS's own buffers are
 * outside nn/ and not counted. */
#include "nn_test.h"

#include <criterion/criterion.h>
#include <stdlib.h>

void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t m);
void *__real_realloc(void *p, size_t n);

static long allocations; /* test-only counter, the wrappers have no other place */

void *__wrap_malloc(size_t n)
{
    allocations++;
    return __real_malloc(n);
}

void *__wrap_calloc(size_t n, size_t m)
{
    allocations++;
    return __real_calloc(n, m);
}

void *__wrap_realloc(void *p, size_t n)
{
    allocations++;
    return __real_realloc(p, n);
}

static void step(nn_model *m, const float *x, const int *len, int S, const float *y, float *logits,
                 float *dl, const nn_adam *a)
{
    nn_model_zero_grad(m);
    cr_assert_eq(nn_lrcn_forward(m, x, len, S, logits), 0);
    nn_bce_logits(dl, logits, y, NULL, NULL, 9, 6);
    cr_assert_eq(nn_lrcn_backward(m, dl), 0);
    nn_model_adam_step(m, a);
}

Test(noalloc, training_and_inference_reuse_workspaces)
{
    nn_config c;
    nn_config_default(&c);
    c.arch = "b4,M,c6,M,b8,G|d5";
    c.in_h = c.in_w = 16;
    char err[128];
    nn_model *m = nn_model_create(&c, err, sizeof(err));
    cr_assert(m, "%s", err);
    int len[2] = {5, 4}, shorter[3] = {2, 3, 1};
    float *x = calloc(9 * 3 * 16 * 16, sizeof(float)), y[54] = {0}, logits[54], dl[54];
    fill_random(x, 9 * 3 * 16 * 16, 1);
    nn_adam a;
    nn_adam_default(&a);
    nn_model_set_training(m, 1);
    step(m, x, len, 2, y, logits, dl, &a); /* the first step sizes the workspaces */
    nn_lrcn_predict(m, x, len, 2, logits);
    nn_cnn_forward(m, x, 9, logits);
    long before = allocations;
    for (int i = 0; i < 3; i++)
        step(m, x, len, 2, y, logits, dl, &a);
    step(m, x, shorter, 3, y, logits, dl, &a); /* fewer slices: no new workspace */
    nn_lrcn_predict(m, x, len, 2, logits);
    nn_cnn_forward(m, x, 9, logits);
    nn_cnn_backward(m, dl);
    cr_expect_eq(allocations - before, 0, "%ld allocations in steady state", allocations - before);
    cr_expect_gt(before, 0, "the wrapper saw no allocation at all");
    free(x);
    nn_model_free(m);
}

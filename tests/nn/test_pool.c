/* tests/nn/test_pool.c: the CPU backend's worker pool (nn/pool.c). Every
 * task runs once, a task may use the pool again, and what the kernels
 * compute on several threads is what they compute on one: bit for bit where
 * the work is cut into disjoint pieces (element-wise layers, batch-norm,
 * Winograd's transforms and its 16 products), to float rounding where a
 * matrix product is cut into blocks (OpenBLAS picks its kernels by size). A
 * model trained twice on the same number of threads repeats bit for bit. */
#include "backend.h"
#include "nn_test.h"
#include "pool.h"

#include <cblas.h>
#include <criterion/criterion.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

static float *buf(size_t n, unsigned long long seed)
{
    float *p = calloc(n ? n : 1, sizeof(float));
    cr_assert_not_null(p);
    if (seed) fill_random(p, n, seed);
    return p;
}

/* The products cut into blocks: within a few float ulps. */
#define POOL_TOL 1e-6

static void expect_same(const char *what, const float *a, const float *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof(float)) != 0)
            cr_assert_fail("%s: element %zu differs: %.9g on one thread, %.9g on several", what, i,
                           (double)b[i], (double)a[i]);
}

struct count_job {
    atomic_int *seen;
    nn_pool *p;
    int inner;
};

static void count_task(void *arg, int i)
{
    struct count_job *j = arg;
    atomic_fetch_add(&j->seen[i], 1);
}

Test(pool, every_task_runs_exactly_once)
{
    static const int threads[] = {1, 2, 3, 8}, counts[] = {0, 1, 2, 7, 100, 5000};
    for (size_t t = 0; t < sizeof threads / sizeof *threads; t++) {
        nn_pool *p = nn_pool_create(threads[t]);
        cr_assert_not_null(p);
        for (int rep = 0; rep < 50; rep++)
            for (size_t c = 0; c < sizeof counts / sizeof *counts; c++) {
                int n = counts[c];
                atomic_int *seen = calloc((size_t)n + 1, sizeof *seen);
                struct count_job j = {seen, p, 0};
                nn_pool_run(p, n, count_task, &j);
                for (int i = 0; i < n; i++)
                    cr_assert_eq(atomic_load(&seen[i]), 1, "threads=%d n=%d task %d ran %d times",
                                 threads[t], n, i, atomic_load(&seen[i]));
                free(seen);
            }
        cr_expect_eq(nn_pool_threads(p), threads[t]);
        nn_pool_free(p);
    }
    cr_expect_eq(nn_pool_threads(NULL), 1);
}

static void outer_task(void *arg, int i)
{
    struct count_job *j = arg;
    struct count_job in = {j->seen + (size_t)i * j->inner, j->p, 0};
    nn_pool_run(j->p, j->inner, count_task, &in); /* runs on this thread */
}

Test(pool, a_task_that_runs_the_pool_runs_its_tasks_itself, .timeout = 20)
{
    nn_pool *p = nn_pool_create(3);
    atomic_int seen[6 * 9] = {0};
    struct count_job j = {seen, p, 9};
    nn_pool_run(p, 6, outer_task, &j);
    for (int i = 0; i < 6 * 9; i++)
        cr_assert_eq(atomic_load(&seen[i]), 1);
    nn_pool_free(p);
}

Test(pool, the_ranges_cover_everything_once)
{
    cr_expect_eq(nn_pool_ranges(10, 4, 8), 3);
    cr_expect_eq(nn_pool_ranges(0, 4, 8), 1);
    cr_expect_eq(nn_pool_ranges(1000, 1, 8), 8);
    size_t next = 0;
    for (int i = 0; i < 7; i++) {
        size_t lo, hi;
        nn_pool_range(1001, 7, i, &lo, &hi);
        cr_assert_eq(lo, next);
        cr_assert_geq(hi, lo);
        next = hi;
    }
    cr_expect_eq(next, 1001);
}

Test(pool, matrix_products_in_blocks_equal_one_call)
{
    openblas_set_num_threads(1);
    static const int shapes[][3] = {{37, 1000, 50}, {300, 17, 64},   {64, 64, 300},
                                    {5, 3, 2},      {32, 27, 16384}, {256, 2304, 128}};
    nn_pool *p = nn_pool_create(3);
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        for (int t = 0; t < 4; t++) {
            enum CBLAS_TRANSPOSE ta = t & 1 ? CblasTrans : CblasNoTrans;
            enum CBLAS_TRANSPOSE tb = t & 2 ? CblasTrans : CblasNoTrans;
            int lda = ta == CblasNoTrans ? K : M, ldb = tb == CblasNoTrans ? N : K;
            float *A = buf((size_t)M * K, 1), *B = buf((size_t)K * N, 2);
            for (int beta = 0; beta < 2; beta++) {
                float *C1 = buf((size_t)M * N, 3), *C3 = buf((size_t)M * N, 3);
                cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, 0.5f, A, lda, B, ldb, (float)beta, C1,
                            N);
                nn_pool_sgemm(p, ta, tb, M, N, K, 0.5f, A, lda, B, ldb, (float)beta, C3, N);
                char what[96];
                snprintf(what, sizeof what, "sgemm %dx%dx%d trans %d beta %d", M, N, K, t, beta);
                expect_close(what, C3, C1, (size_t)M * N, POOL_TOL);
                free(C1), free(C3);
            }
            free(A), free(B);
        }
    }
    nn_pool_free(p);
}

/* Runs one convolution forward and backward through the CPU table on one
 * thread and on three, and compares every output. */
static void conv_same(nn_pool *p, int B, int c, int h, int w, int oc, int k, int s, int pad)
{
    const nn_backend *be = nn_backend_cpu();
    nn_conv_shape cs;
    nn_conv_shape_init(&cs, c, h, w, oc, k, s, pad);
    size_t nx = (size_t)B * c * h * w, no = (size_t)B * oc * cs.oh * cs.ow,
           nw = (size_t)oc * c * k * k, ncol = be->conv2d_col_size(&cs, B);
    float *x = buf(nx, 1), *wt = buf(nw, 2), *b = buf(oc, 3), *g = buf(no, 4), *col = buf(ncol, 0);
    float *o1 = buf(no, 0), *o3 = buf(no, 0);
    float *dx1 = buf(nx, 5), *dw1 = buf(nw, 6), *db1 = buf(oc, 7);
    float *dx3 = buf(nx, 5), *dw3 = buf(nw, 6), *db3 = buf(oc, 7);
    be->conv2d_forward(NULL, o1, col, x, wt, b, B, &cs);
    be->conv2d_forward(p, o3, col, x, wt, b, B, &cs);
    be->conv2d_backward(NULL, dx1, dw1, db1, col, g, x, wt, B, &cs);
    be->conv2d_backward(p, dx3, dw3, db3, col, g, x, wt, B, &cs);
    char what[64];
    snprintf(what, sizeof what, "conv %dx%d c%d->%d k%d s%d out", h, w, c, oc, k, s);
    /* Winograd's forward and input gradient are bit for bit; im2col's
     * products and the weight gradient are cut into blocks */
    int wg = nn_winograd_applies(&cs), wgb = nn_winograd_backward_applies(&cs);
    if (wg)
        expect_same(what, o3, o1, no);
    else
        expect_close(what, o3, o1, no, POOL_TOL);
    if (wgb)
        expect_same("conv dx", dx3, dx1, nx);
    else
        expect_close("conv dx", dx3, dx1, nx, POOL_TOL);
    expect_close("conv dw", dw3, dw1, nw, POOL_TOL);
    expect_same("conv db", db3, db1, oc);
    free(x), free(wt), free(b), free(g), free(col), free(o1), free(o3);
    free(dx1), free(dw1), free(db1), free(dx3), free(dw3), free(db3);
}

Test(pool, the_cpu_layers_on_three_threads_equal_one)
{
    openblas_set_num_threads(1);
    nn_pool *p = nn_pool_create(3);
    conv_same(p, 3, 16, 9, 7, 24, 3, 1, 1);   /* Winograd, odd sizes */
    conv_same(p, 5, 32, 16, 16, 64, 3, 1, 1); /* Winograd, several images per group */
    conv_same(p, 4, 3, 40, 40, 32, 3, 1, 1);  /* the first layer: im2col */
    conv_same(p, 2, 3, 9, 7, 8, 3, 2, 1);     /* strided */
    conv_same(p, 3, 4, 5, 5, 6, 1, 1, 0);     /* 1x1 */

    const nn_backend *be = nn_backend_cpu();
    int B = 4, C = 24, H = 18, W = 14, S = H * W;
    size_t n = (size_t)B * C * S, np = (size_t)B * C * (H / 2) * (W / 2);
    float *x = buf(n, 11), *g = buf(n, 12), *gam = buf(C, 13), *bet = buf(C, 14);
    for (int training = 0; training < 2; training++) {
        float *o1 = buf(n, 0), *o3 = buf(n, 0), *st1 = buf(2 * C, 0), *st3 = buf(2 * C, 0);
        float *rm1 = buf(C, 15), *rv1 = buf(C, 0), *rm3 = buf(C, 15), *rv3 = buf(C, 0);
        for (int c = 0; c < C; c++)
            rv1[c] = rv3[c] = 1.0f + 0.1f * c;
        be->batchnorm_forward(NULL, o1, st1, st1 + C, rm1, rv1, x, gam, bet, B, C, S, training,
                              0.1f, 1e-5f);
        be->batchnorm_forward(p, o3, st3, st3 + C, rm3, rv3, x, gam, bet, B, C, S, training, 0.1f,
                              1e-5f);
        expect_same("batchnorm out", o3, o1, n);
        expect_same("batchnorm stats", st3, st1, 2 * (size_t)C);
        expect_same("batchnorm running mean", rm3, rm1, C);
        expect_same("batchnorm running var", rv3, rv1, C);
        float *dx1 = buf(n, 16), *dx3 = buf(n, 16), *dg1 = buf(C, 0), *dg3 = buf(C, 0);
        float *db1 = buf(C, 0), *db3 = buf(C, 0);
        be->batchnorm_backward(NULL, dx1, dg1, db1, g, x, st1, st1 + C, gam, B, C, S, training,
                               1e-5f);
        be->batchnorm_backward(p, dx3, dg3, db3, g, x, st3, st3 + C, gam, B, C, S, training, 1e-5f);
        expect_same("batchnorm dx", dx3, dx1, n);
        expect_same("batchnorm dgamma", dg3, dg1, C);
        expect_same("batchnorm dbeta", db3, db1, C);
        free(o1), free(o3), free(st1), free(st3), free(rm1), free(rv1), free(rm3), free(rv3);
        free(dx1), free(dx3), free(dg1), free(dg3), free(db1), free(db3);
    }

    float *r1 = buf(n, 0), *r3 = buf(n, 0), *d1 = buf(n, 17), *d3 = buf(n, 17);
    be->relu_forward(NULL, r1, x, n);
    be->relu_forward(p, r3, x, n);
    expect_same("relu", r3, r1, n);
    be->relu_backward(NULL, d1, g, r1, n);
    be->relu_backward(p, d3, g, r3, n);
    expect_same("relu dx", d3, d1, n);
    be->dropout_backward(NULL, d1, g, x, n);
    be->dropout_backward(p, d3, g, x, n);
    expect_same("dropout dx", d3, d1, n);
    be->add(NULL, d1, x, n);
    be->add(p, d3, x, n);
    expect_same("add", d3, d1, n);
    nn_adam_hyper h = {.lr = 1e-3f,
                       .beta1 = 0.9f,
                       .beta2 = 0.999f,
                       .eps = 1e-8f,
                       .weight_decay = 0.01f,
                       .step = 0.01f,
                       .bc2 = 0.03f};
    float *am1 = buf(n, 18), *am3 = buf(n, 18), *av1 = buf(n, 0), *av3 = buf(n, 0);
    be->adam_update(NULL, d1, g, am1, av1, n, &h);
    be->adam_update(p, d3, g, am3, av3, n, &h);
    expect_same("adam parameters", d3, d1, n);
    expect_same("adam first moment", am3, am1, n);
    expect_same("adam second moment", av3, av1, n);
    free(am1), free(am3), free(av1), free(av3);
    be->zero(p, d3, n * sizeof(float) - 3); /* not a whole number of floats */
    memset(d1, 0, n * sizeof(float) - 3);
    cr_expect_eq(memcmp(d1, d3, n * sizeof(float)), 0, "zero");

    float *m1 = buf(np, 0), *m3 = buf(np, 0);
    int32_t *i1 = calloc(np, sizeof *i1), *i3 = calloc(np, sizeof *i3);
    be->maxpool_forward(NULL, m1, i1, x, B, C, H, W, 2, 2);
    be->maxpool_forward(p, m3, i3, x, B, C, H, W, 2, 2);
    expect_same("maxpool", m3, m1, np);
    cr_expect_eq(memcmp(i1, i3, np * sizeof *i1), 0, "maxpool argmax");
    be->maxpool_backward(NULL, d1, m1, i1, B, C, H, W, 2, 2);
    be->maxpool_backward(p, d3, m3, i3, B, C, H, W, 2, 2);
    expect_same("maxpool dx", d3, d1, n);

    float *a1 = buf((size_t)B * C, 0), *a3 = buf((size_t)B * C, 0);
    be->gap_forward(NULL, a1, x, B, C, S);
    be->gap_forward(p, a3, x, B, C, S);
    expect_same("global average pool", a3, a1, (size_t)B * C);
    be->gap_backward(NULL, d1, a1, B, C, S);
    be->gap_backward(p, d3, a3, B, C, S);
    expect_same("global average pool dx", d3, d1, n);

    free(x), free(g), free(gam), free(bet), free(r1), free(r3), free(d1), free(d3);
    free(m1), free(m3), free(i1), free(i3), free(a1), free(a3);
    nn_pool_free(p);
}

/* A model made after nn_set_threads(n), with the others' weights. */
static nn_model *model_on(int threads)
{
    nn_set_threads(threads);
    nn_config c;
    nn_config_default(&c);
    c.in_h = c.in_w = 48;
    char err[256];
    nn_model *m = nn_model_create(&c, err, sizeof err);
    cr_assert_not_null(m, "%s", err);
    return m;
}

/* Three training steps of m1 and m3 on the same data; the logits of the last. */
static void train_both(nn_model *m1, nn_model *m3, float *lg1, float *lg3)
{
    int S = 2, len[2] = {5, 4}, N = 9;
    size_t per = 3 * 48 * 48;
    float *x = buf(N * per, 21), *y = buf(N * 6, 0), dl[9 * 6];
    for (int i = 0; i < N * 6; i += 4)
        y[i] = 1;
    nn_adam a;
    nn_adam_default(&a);
    nn_model *ms[2] = {m1, m3};
    float *lg[2] = {lg1, lg3};
    for (int step = 0; step < 3; step++)
        for (int k = 0; k < 2; k++) {
            nn_model_set_training(ms[k], 1);
            nn_model_zero_grad(ms[k]);
            cr_assert_eq(nn_lrcn_forward(ms[k], x, len, S, lg[k]), 0);
            nn_bce_logits(dl, lg[k], y, NULL, NULL, N, 6);
            cr_assert_eq(nn_lrcn_backward(ms[k], dl), 0);
            nn_model_adam_step(ms[k], &a);
        }
    free(x), free(y);
}

static void compare_models(nn_model *m1, nn_model *m3)
{
    cr_assert_eq(nn_model_tensor_count(m1), nn_model_tensor_count(m3));
    for (int t = 0; t < nn_model_tensor_count(m1); t++) {
        nn_tensor_info a1, a3;
        cr_assert_eq(nn_model_tensor(m1, t, &a1), 0);
        cr_assert_eq(nn_model_tensor(m3, t, &a3), 0);
        expect_same(a1.name, a3.data, a1.data, a1.numel);
    }
}

/* One forward and backward pass: the logits and every gradient agree to
 * float rounding, measured against the largest gradient of the model (the
 * conv biases before batch-norm have a gradient of zero in exact arithmetic,
 * rounding noise here, so they are held to the model's scale, not their own;
 * after Adam steps that noise would be normalised to full-size updates). */
Test(pool, a_model_learns_alike_on_one_thread_and_on_three)
{
    nn_model *m1 = model_on(1), *m3 = model_on(3);
    int len[2] = {5, 4}, N = 9;
    float *x = buf((size_t)N * 3 * 48 * 48, 21), *y = buf(N * 6, 0), lg1[9 * 6], lg3[9 * 6];
    float dl[9 * 6];
    for (int i = 0; i < N * 6; i += 4)
        y[i] = 1;
    nn_model *ms[2] = {m1, m3};
    float *lg[2] = {lg1, lg3};
    for (int k = 0; k < 2; k++) {
        nn_model_set_training(ms[k], 1);
        nn_model_zero_grad(ms[k]);
        cr_assert_eq(nn_lrcn_forward(ms[k], x, len, 2, lg[k]), 0);
        nn_bce_logits(dl, lg[k], y, NULL, NULL, N, 6);
        cr_assert_eq(nn_lrcn_backward(ms[k], dl), 0);
    }
    expect_close("logits", lg3, lg1, 9 * 6, NN_TOL_OUT);
    double scale = 0;
    for (int t = 0; t < nn_model_tensor_count(m1); t++) {
        nn_tensor_info a;
        nn_model_tensor(m1, t, &a);
        for (size_t i = 0; a.grad && i < a.numel; i++)
            if (fabs(a.grad[i]) > scale) scale = fabs(a.grad[i]);
    }
    cr_assert_gt(scale, 0);
    for (int t = 0; t < nn_model_tensor_count(m1); t++) {
        nn_tensor_info a1, a3;
        nn_model_tensor(m1, t, &a1);
        nn_model_tensor(m3, t, &a3);
        for (size_t i = 0; a1.grad && i < a1.numel; i++)
            cr_assert_leq(fabs(a3.grad[i] - a1.grad[i]), NN_TOL_OUT * scale,
                          "%s grad[%zu]: %g on one thread, %g on three (largest gradient %g)",
                          a1.name, i, (double)a1.grad[i], (double)a3.grad[i], scale);
    }
    free(x), free(y);
    nn_model_free(m1);
    nn_model_free(m3);
}

Test(pool, a_model_trains_bit_for_bit_again_on_the_same_threads)
{
    nn_model *a = model_on(2), *b = model_on(2);
    float lga[9 * 6], lgb[9 * 6];
    train_both(a, b, lga, lgb);
    expect_same("logits", lgb, lga, 9 * 6);
    compare_models(a, b);
    nn_model_free(a);
    nn_model_free(b);
}

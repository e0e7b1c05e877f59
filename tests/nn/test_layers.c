/* tests/nn/test_layers.c: every layer's forward output and gradients against
 * PyTorch (ref/layers.safetensors, written by gen_reference.py). */
#include "nn_test.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static nn_st_file *refs;

static void setup(void)
{
    refs = ref_open("layers.safetensors");
}

static void teardown(void)
{
    nn_st_close(refs);
}

TestSuite(layers, .init = setup, .fini = teardown);

static float *get(const char *prefix, const char *name, size_t *n)
{
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", prefix, name);
    return ref_f32(refs, key, n);
}

static float *zeros(size_t n)
{
    float *p = calloc(n + 1, sizeof(float));
    cr_assert(p);
    return p;
}

static void check_conv(const char *name, int k, int stride, int pad)
{
    size_t nx, nw, nb, no;
    float *x = get(name, "x", &nx), *w = get(name, "w", &nw), *b = get(name, "b", &nb);
    float *ref = get(name, "out", &no), *dout = get(name, "dout", NULL);
    float *rdx = get(name, "dx", NULL), *rdw = get(name, "dw", NULL), *rdb = get(name, "db", NULL);
    nn_conv_shape s;
    nn_conv_shape_init(&s, 3, 9, 8, 4, k, stride, pad);
    cr_assert_eq((size_t)2 * 4 * s.oh * s.ow, no, "%s: output size", name);
    float *col = zeros(nn_conv2d_col_size(&s, 2)), *out = zeros(no);
    float *dx = zeros(nx), *dw = zeros(nw), *db = zeros(nb);
    nn_conv2d_forward(NULL, out, col, x, w, b, 2, &s);
    expect_close(name, out, ref, no, NN_TOL_OUT);
    nn_conv2d_backward(NULL, dx, dw, db, col, dout, x, w, 2, &s);
    expect_close("conv dx", dx, rdx, nx, NN_TOL_GRAD);
    expect_close("conv dw", dw, rdw, nw, NN_TOL_GRAD);
    expect_close("conv db", db, rdb, nb, NN_TOL_GRAD);
    free(x), free(w), free(b), free(ref), free(dout), free(rdx), free(rdw), free(rdb);
    free(col), free(out), free(dx), free(dw), free(db);
}

Test(layers, conv2d)
{
    check_conv("conv_3x3", 3, 1, 1);
    check_conv("conv_s2", 3, 2, 1);
    check_conv("conv_1x1", 1, 1, 0);
    check_conv("conv_k5", 5, 2, 0);
}

Test(layers, maxpool)
{
    size_t nx, no;
    float *x = get("maxpool", "x", &nx), *ref = get("maxpool", "out", &no);
    float *dout = get("maxpool", "dout", NULL), *rdx = get("maxpool", "dx", NULL);
    float *out = zeros(no), *dx = zeros(nx);
    int32_t *idx = calloc(no, sizeof(int32_t));
    cr_assert_eq(no, (size_t)2 * 3 * 3 * 3);
    nn_maxpool_forward(out, idx, x, 2, 3, 6, 7, 2, 2);
    expect_close("maxpool out", out, ref, no, NN_TOL_OUT);
    nn_maxpool_backward(dx, dout, idx, 2, 3, 6, 7, 2, 2);
    expect_close("maxpool dx", dx, rdx, nx, NN_TOL_GRAD);
    free(x), free(ref), free(dout), free(rdx), free(out), free(dx), free(idx);
}

/* A NaN (an overflow upstream) passes ReLU and wins max-pool, as in PyTorch:
 * zeroed, it would come out as a finite, confident "not flagged". */
Test(layers, nan_passes_relu_and_maxpool)
{
    float x[6] = {1.0f, NAN, -1.0f, 0.0f, -INFINITY, INFINITY}, out[6];
    float dout[6] = {1, 2, 3, 4, 5, 6}, dx[6] = {0};
    nn_relu_forward(out, x, 6);
    cr_expect(out[0] == 1.0f && isnan(out[1]) && out[2] == 0.0f && out[3] == 0.0f &&
                  out[4] == 0.0f && out[5] == INFINITY,
              "relu: %g %g %g %g %g %g", out[0], out[1], out[2], out[3], out[4], out[5]);
    nn_relu_backward(dx, dout, out, 6);
    float want[6] = {1, 2, 0, 0, 0, 6}; /* PyTorch's: out <= 0 ? 0 : dout */
    cr_expect(memcmp(dx, want, sizeof want) == 0, "relu dx: %g %g %g %g %g %g", dx[0], dx[1], dx[2],
              dx[3], dx[4], dx[5]);
    nn_relu_forward(x, x, 6); /* in place, as the stacks run it */
    cr_expect(isnan(x[1]) && x[2] == 0.0f);

    /* one 4x4 plane: the 2x2/2 path and the general one (3x3, stride 1) */
    float p[16] = {1,         2,         5, 6,   3,         NAN,       7,   8,
                   -INFINITY, -INFINITY, 9, NAN, -INFINITY, -INFINITY, NAN, 10};
    float o[4];
    int32_t idx[4];
    nn_maxpool_forward(o, idx, p, 1, 1, 4, 4, 2, 2);
    cr_expect(isnan(o[0]) && idx[0] == 5, "2x2 window with a NaN: %g at %d", o[0], idx[0]);
    cr_expect(o[1] == 8.0f && idx[1] == 7, "2x2 window without: %g at %d", o[1], idx[1]);
    cr_expect(o[2] == -INFINITY && idx[2] == 8, "2x2 window of -inf: %g at %d", o[2], idx[2]);
    cr_expect(isnan(o[3]) && idx[3] == 14, "2x2 window of two NaN: the last, %d", idx[3]);
    nn_maxpool_forward(o, idx, p, 1, 1, 4, 4, 3, 1);
    for (int i = 0; i < 4; i++)
        cr_expect(isnan(o[i]), "3x3 window %d: %g", i, o[i]);
    cr_expect(idx[0] == 5 && idx[1] == 11 && idx[2] == 14 && idx[3] == 14, "%d %d %d %d", idx[0],
              idx[1], idx[2], idx[3]);
}

Test(layers, relu_sigmoid_gap)
{
    size_t n, no;
    float *x = get("relu", "x", &n), *ref = get("relu", "out", NULL);
    float *dout = get("relu", "dout", NULL), *rdx = get("relu", "dx", NULL);
    float *out = zeros(n), *dx = zeros(n);
    nn_relu_forward(out, x, n);
    expect_close("relu out", out, ref, n, NN_TOL_OUT);
    nn_relu_backward(dx, dout, out, n);
    expect_close("relu dx", dx, rdx, n, NN_TOL_GRAD);
    free(x), free(ref), free(dout), free(rdx), free(out), free(dx);

    x = get("sigmoid", "x", &n), ref = get("sigmoid", "out", NULL);
    dout = get("sigmoid", "dout", NULL), rdx = get("sigmoid", "dx", NULL);
    out = zeros(n), dx = zeros(n);
    nn_sigmoid_forward(out, x, n);
    expect_close("sigmoid out", out, ref, n, NN_TOL_OUT);
    nn_sigmoid_backward(dx, dout, out, n);
    expect_close("sigmoid dx", dx, rdx, n, NN_TOL_GRAD);
    free(x), free(ref), free(dout), free(rdx), free(out), free(dx);

    x = get("gap", "x", &n), ref = get("gap", "out", &no);
    dout = get("gap", "dout", NULL), rdx = get("gap", "dx", NULL);
    out = zeros(no), dx = zeros(n);
    nn_gap_forward(out, x, 2, 3, 16);
    expect_close("gap out", out, ref, no, NN_TOL_OUT);
    nn_gap_backward(dx, dout, 2, 3, 16);
    expect_close("gap dx", dx, rdx, n, NN_TOL_GRAD);
    free(x), free(ref), free(dout), free(rdx), free(out), free(dx);
}

static void check_bn(const char *name, int B, int C, int S, int training)
{
    size_t n;
    float *x = get(name, "x", &n), *g = get(name, "g", NULL), *b = get(name, "b", NULL);
    float *rm = get(name, "rm0", NULL), *rv = get(name, "rv0", NULL);
    float *rm1 = get(name, "rm1", NULL), *rv1 = get(name, "rv1", NULL);
    float *ref = get(name, "out", NULL), *dout = get(name, "dout", NULL);
    float *rdx = get(name, "dx", NULL), *rdg = get(name, "dg", NULL), *rdb = get(name, "db", NULL);
    float *out = zeros(n), *dx = zeros(n), *dg = zeros(C), *db = zeros(C);
    float *mean = zeros(C), *rstd = zeros(C);
    nn_batchnorm_forward(NULL, out, mean, rstd, rm, rv, x, g, b, B, C, S, training, 0.1f, 1e-5f);
    expect_close(name, out, ref, n, NN_TOL_OUT);
    expect_close("running mean", rm, rm1, C, NN_TOL_OUT);
    expect_close("running var", rv, rv1, C, NN_TOL_OUT);
    nn_batchnorm_backward(NULL, dx, dg, db, dout, x, mean, rstd, g, B, C, S, training);
    expect_close("bn dx", dx, rdx, n, NN_TOL_GRAD);
    expect_close("bn dgamma", dg, rdg, C, NN_TOL_GRAD);
    expect_close("bn dbeta", db, rdb, C, NN_TOL_GRAD);
    free(x), free(g), free(b), free(rm), free(rv), free(rm1), free(rv1), free(ref), free(dout);
    free(rdx), free(rdg), free(rdb), free(out), free(dx), free(dg), free(db), free(mean),
        free(rstd);
}

Test(layers, batchnorm)
{
    check_bn("bn2d_train", 4, 3, 25, 1);
    check_bn("bn2d_eval", 4, 3, 25, 0);
    check_bn("bn1d_train", 7, 5, 1, 1);
    check_bn("bn1d_eval", 7, 5, 1, 0);
}

Test(layers, linear)
{
    size_t nx, nw, no;
    float *x = get("linear", "x", &nx), *w = get("linear", "w", &nw), *b = get("linear", "b", NULL);
    float *ref = get("linear", "out", &no), *dout = get("linear", "dout", NULL);
    float *rdx = get("linear", "dx", NULL), *rdw = get("linear", "dw", NULL);
    float *rdb = get("linear", "db", NULL);
    float *out = zeros(no), *dx = zeros(nx), *dw = zeros(nw), *db = zeros(3);
    nn_linear_forward(out, x, w, b, 5, 8, 3);
    expect_close("linear out", out, ref, no, NN_TOL_OUT);
    nn_linear_backward(dx, dw, db, dout, x, w, 5, 8, 3);
    expect_close("linear dx", dx, rdx, nx, NN_TOL_GRAD);
    expect_close("linear dw", dw, rdw, nw, NN_TOL_GRAD);
    expect_close("linear db", db, rdb, 3, NN_TOL_GRAD);
    free(x), free(w), free(b), free(ref), free(dout), free(rdx), free(rdw), free(rdb);
    free(out), free(dx), free(dw), free(db);
}

Test(layers, bce_with_logits)
{
    size_t n;
    float *x = ref_f32(refs, "bce.x", &n), *y = ref_f32(refs, "bce.y", NULL);
    float *w = ref_f32(refs, "bce.w", NULL), *pw = ref_f32(refs, "bce.pw", NULL);
    float *loss = ref_f32(refs, "bce.loss", NULL), *rdx = ref_f32(refs, "bce.dx", NULL);
    float *dx = zeros(n);
    float l = nn_bce_logits(dx, x, y, w, pw, 5, 6);
    expect_close("bce loss", &l, loss, 1, NN_TOL_OUT);
    expect_close("bce dlogits", dx, rdx, n, NN_TOL_GRAD);
    free(x), free(y), free(w), free(pw), free(loss), free(rdx), free(dx);
}

Test(layers, bilstm_packed_lengths)
{
    const int F = 5, H = 4;
    size_t nl, nx, no;
    int *len = ref_i32(refs, "lstm.lengths", &nl);
    float *x = ref_f32(refs, "lstm.x", &nx), *ref = ref_f32(refs, "lstm.out", &no);
    float *dout = ref_f32(refs, "lstm.dout", NULL), *rdx = ref_f32(refs, "lstm.dx", NULL);
    int N = (int)(nx / F);
    static const char *const names[4] = {"weight_ih_l0", "weight_hh_l0", "bias_ih_l0",
                                         "bias_hh_l0"};
    float *w[2][4], *dw[2][4], *rdw[2][4];
    size_t sz[4];
    for (int d = 0; d < 2; d++)
        for (int k = 0; k < 4; k++) {
            char key[64];
            snprintf(key, sizeof(key), "lstm.%s%s", names[k], d ? "_reverse" : "");
            w[d][k] = ref_f32(refs, key, &sz[k]);
            snprintf(key, sizeof(key), "lstm.d%s%s", names[k], d ? "_reverse" : "");
            rdw[d][k] = ref_f32(refs, key, NULL);
            dw[d][k] = zeros(sz[k]);
        }
    nn_lstm_params p;
    nn_lstm_grads g;
    for (int d = 0; d < 2; d++) {
        p.wih[d] = w[d][0], p.whh[d] = w[d][1], p.bih[d] = w[d][2], p.bhh[d] = w[d][3];
        g.wih[d] = dw[d][0], g.whh[d] = dw[d][1], g.bih[d] = dw[d][2], g.bhh[d] = dw[d][3];
    }
    float *out = zeros(no), *dx = zeros(nx);
    float *cache = zeros(nn_lstm_cache_size(N, H)), *work = zeros(nn_lstm_work_size(N, H));
    nn_lstm_forward(out, cache, x, &p, len, (int)nl, F, H);
    expect_close("lstm out", out, ref, no, NN_TOL_OUT);
    nn_lstm_backward(dx, &g, work, dout, cache, x, &p, len, (int)nl, F, H);
    expect_close("lstm dx", dx, rdx, nx, NN_TOL_GRAD);
    for (int d = 0; d < 2; d++)
        for (int k = 0; k < 4; k++) {
            char what[64];
            snprintf(what, sizeof(what), "lstm d%s dir %d", names[k], d);
            expect_close(what, dw[d][k], rdw[d][k], sz[k], NN_TOL_GRAD);
            free(w[d][k]), free(dw[d][k]), free(rdw[d][k]);
        }
    free(len), free(x), free(ref), free(dout), free(rdx), free(out), free(dx), free(cache);
    free(work);
}

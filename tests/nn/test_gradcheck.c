/* tests/nn/test_gradcheck.c: finite-difference checks of every layer's
 * backward pass (central differences on loss = sum(out * r), r random). */
#include "nn_test.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define EPS 1e-2f
#define TOL 2e-2
#define SAMPLES 48

typedef struct fd {
    void (*forward)(struct fd *c, float *out); /* out from the current inputs */
    float *out, *r;
    size_t nout;
    /* layer-specific state */
    nn_conv_shape conv;
    float *x, *w, *b, *aux, *aux2, *cache;
    int32_t *idx;
    int B, C, S, H, F, train;
    int *len, nseq;
    uint64_t seed;
} fd;

static double loss_of(fd *c)
{
    c->forward(c, c->out);
    double l = 0.0;
    for (size_t i = 0; i < c->nout; i++)
        l += (double)c->out[i] * c->r[i];
    return l;
}

/* Compares analytic [n] with central differences on param at SAMPLES spots. */
static void check(const char *what, fd *c, float *param, size_t n, const float *analytic)
{
    double scale = 1e-3, worst = 0.0;
    for (size_t i = 0; i < n; i++)
        scale = fmax(scale, fabs(analytic[i]));
    uint64_t s = 99;
    for (int k = 0; k < SAMPLES && k < (int)n; k++) {
        size_t i = n <= SAMPLES ? (size_t)k : nn_rng_next(&s) % n;
        float v = param[i];
        param[i] = v + EPS;
        double lp = loss_of(c);
        param[i] = v - EPS;
        double lm = loss_of(c);
        param[i] = v;
        double num = (lp - lm) / (2.0 * EPS);
        worst = fmax(worst, fabs(num - analytic[i]) / scale);
    }
    cr_expect(worst <= TOL, "%s: finite differences disagree, relative error %.3g", what, worst);
}

static float *buf(size_t n, unsigned long long seed)
{
    float *p = calloc(n + 1, sizeof(float));
    cr_assert(p);
    if (seed) fill_random(p, n, seed);
    return p;
}

/* Moves values away from 0 so that no difference step crosses a ReLU kink. */
static void away_from_zero(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = x[i] >= 0.0f ? x[i] + 0.1f : x[i] - 0.1f;
}

static void conv_fwd(fd *c, float *out)
{
    nn_conv2d_forward(NULL, out, c->aux, c->x, c->w, c->b, c->B, &c->conv);
}

static void conv_case(int k, int stride, int pad, int B)
{
    fd c = {.forward = conv_fwd, .B = B};
    nn_conv_shape_init(&c.conv, 3, 7, 6, 5, k, stride, pad);
    size_t nx = (size_t)B * 3 * 7 * 6, nw = (size_t)5 * 3 * k * k;
    c.nout = (size_t)B * 5 * c.conv.oh * c.conv.ow;
    c.x = buf(nx, 1), c.w = buf(nw, 2), c.b = buf(5, 3), c.r = buf(c.nout, 4);
    c.out = buf(c.nout, 0), c.aux = buf(nn_conv2d_col_size(&c.conv, B), 0);
    float *dx = buf(nx, 0), *dw = buf(nw, 0), *db = buf(5, 0);
    nn_conv2d_backward(NULL, dx, dw, db, c.aux, c.r, c.x, c.w, B, &c.conv);
    check("conv dx", &c, c.x, nx, dx);
    check("conv dw", &c, c.w, nw, dw);
    check("conv db", &c, c.b, 5, db);
    free(c.x), free(c.w), free(c.b), free(c.r), free(c.out), free(c.aux);
    free(dx), free(dw), free(db);
}

Test(gradcheck, conv2d)
{
    conv_case(3, 1, 1, 2);
    conv_case(3, 2, 1, 1);
    conv_case(1, 1, 0, 3);
    conv_case(5, 2, 2, 2);
    conv_case(3, 1, 0, 40); /* grouped GEMM path: several images per GEMM */
}

static void pool_fwd(fd *c, float *out)
{
    nn_maxpool_forward(out, c->idx, c->x, c->B, c->C, 6, 6, 2, 2);
}

Test(gradcheck, maxpool)
{
    fd c = {.forward = pool_fwd, .B = 2, .C = 3};
    size_t nx = 2 * 3 * 36;
    c.nout = 2 * 3 * 9;
    c.x = buf(nx, 0);
    for (size_t i = 0; i < nx; i++)
        c.x[i] = (float)((i * 37) % nx) * 0.1f; /* distinct, spaced */
    c.r = buf(c.nout, 4), c.out = buf(c.nout, 0), c.idx = calloc(c.nout, sizeof(int32_t));
    float *dx = buf(nx, 0);
    pool_fwd(&c, c.out);
    nn_maxpool_backward(dx, c.r, c.idx, 2, 3, 6, 6, 2, 2);
    check("maxpool dx", &c, c.x, nx, dx);
    free(c.x), free(c.r), free(c.out), free(c.idx), free(dx);
}

static void relu_fwd(fd *c, float *out)
{
    nn_relu_forward(out, c->x, c->nout);
}
static void sigmoid_fwd(fd *c, float *out)
{
    nn_sigmoid_forward(out, c->x, c->nout);
}
static void gap_fwd(fd *c, float *out)
{
    nn_gap_forward(out, c->x, c->B, c->C, c->S);
}
static void dropout_fwd(fd *c, float *out)
{
    uint64_t s = c->seed; /* the same mask every call */
    nn_dropout_forward(out, c->aux, c->x, c->nout, 0.4f, &s);
}

Test(gradcheck, elementwise)
{
    fd c = {.nout = 60, .B = 3, .C = 4, .S = 5, .seed = 7};
    c.x = buf(60, 1), c.r = buf(60, 2), c.out = buf(60, 0), c.aux = buf(60, 0);
    away_from_zero(c.x, 60);
    float *dx = buf(60, 0);
    c.forward = relu_fwd;
    relu_fwd(&c, c.out);
    nn_relu_backward(dx, c.r, c.out, 60);
    check("relu dx", &c, c.x, 60, dx);

    memset(dx, 0, sizeof(float) * 60);
    c.forward = sigmoid_fwd;
    sigmoid_fwd(&c, c.out);
    nn_sigmoid_backward(dx, c.r, c.out, 60);
    check("sigmoid dx", &c, c.x, 60, dx);

    memset(dx, 0, sizeof(float) * 60);
    c.forward = dropout_fwd;
    dropout_fwd(&c, c.out);
    nn_dropout_backward(dx, c.r, c.aux, 60);
    check("dropout dx", &c, c.x, 60, dx);

    memset(dx, 0, sizeof(float) * 60);
    c.forward = gap_fwd;
    c.nout = 12;
    nn_gap_backward(dx, c.r, 3, 4, 5);
    check("gap dx", &c, c.x, 60, dx);
    free(c.x), free(c.r), free(c.out), free(c.aux), free(dx);
}

static void bn_fwd(fd *c, float *out)
{
    /* running statistics are scratch copies: FD must not drift them */
    float rm[8], rv[8];
    memcpy(rm, c->aux2, sizeof(float) * c->C);
    memcpy(rv, c->aux2 + 8, sizeof(float) * c->C);
    nn_batchnorm_forward(NULL, out, c->aux, c->aux + 8, rm, rv, c->x, c->w, c->b, c->B, c->C, c->S,
                         c->train, 0.1f, 1e-5f);
}

static void bn_case(int B, int C, int S, int train)
{
    fd c = {.forward = bn_fwd, .B = B, .C = C, .S = S, .train = train};
    size_t n = (size_t)B * C * S;
    c.nout = n;
    c.x = buf(n, 1), c.w = buf(C, 2), c.b = buf(C, 3), c.r = buf(n, 4), c.out = buf(n, 0);
    c.aux = buf(16, 0), c.aux2 = buf(16, 0);
    for (int i = 0; i < C; i++)
        c.aux2[8 + i] = 0.5f + 0.1f * i;
    float *dx = buf(n, 0), *dg = buf(C, 0), *db = buf(C, 0);
    bn_fwd(&c, c.out);
    nn_batchnorm_backward(NULL, dx, dg, db, c.r, c.x, c.aux, c.aux + 8, c.w, B, C, S, train);
    check("bn dx", &c, c.x, n, dx);
    check("bn dgamma", &c, c.w, C, dg);
    check("bn dbeta", &c, c.b, C, db);
    free(c.x), free(c.w), free(c.b), free(c.r), free(c.out), free(c.aux), free(c.aux2);
    free(dx), free(dg), free(db);
}

Test(gradcheck, batchnorm)
{
    bn_case(3, 4, 6, 1);
    bn_case(3, 4, 6, 0);
    bn_case(9, 5, 1, 1);
    bn_case(9, 5, 1, 0);
}

static void linear_fwd(fd *c, float *out)
{
    nn_linear_forward(out, c->x, c->w, c->b, c->B, c->C, c->S);
}

Test(gradcheck, linear)
{
    fd c = {.forward = linear_fwd, .B = 4, .C = 7, .S = 3, .nout = 12};
    c.x = buf(28, 1), c.w = buf(21, 2), c.b = buf(3, 3), c.r = buf(12, 4), c.out = buf(12, 0);
    float *dx = buf(28, 0), *dw = buf(21, 0), *db = buf(3, 0);
    nn_linear_backward(dx, dw, db, c.r, c.x, c.w, 4, 7, 3);
    check("linear dx", &c, c.x, 28, dx);
    check("linear dw", &c, c.w, 21, dw);
    check("linear db", &c, c.b, 3, db);
    free(c.x), free(c.w), free(c.b), free(c.r), free(c.out), free(dx), free(dw), free(db);
}

static void bce_fwd(fd *c, float *out)
{
    out[0] = nn_bce_logits(NULL, c->x, c->aux, c->w, c->b, 5, 6);
}

Test(gradcheck, bce_with_logits)
{
    fd c = {.forward = bce_fwd, .nout = 1};
    float one = 1.0f, lw[6] = {2, 1, 1, 1, 1, 1}, pw[6] = {3, 2, 1, 1, 4, 2};
    c.x = buf(30, 1), c.aux = buf(30, 2), c.out = buf(1, 0), c.r = &one, c.w = lw, c.b = pw;
    for (int i = 0; i < 30; i++)
        c.aux[i] = c.aux[i] > 0.2f;
    float *dx = buf(30, 0);
    nn_bce_logits(dx, c.x, c.aux, lw, pw, 5, 6);
    check("bce dlogits", &c, c.x, 30, dx);
    free(c.x), free(c.aux), free(c.out), free(dx);
}

static nn_lstm_params lstm_p(fd *c)
{
    size_t G = 4 * (size_t)c->H, F = (size_t)c->F, H = (size_t)c->H;
    nn_lstm_params p;
    for (int d = 0; d < 2; d++) {
        float *base = c->w + d * (G * F + G * H + 2 * G);
        p.wih[d] = base, p.whh[d] = base + G * F, p.bih[d] = base + G * F + G * H;
        p.bhh[d] = p.bih[d] + G;
    }
    return p;
}

static void lstm_fwd(fd *c, float *out)
{
    nn_lstm_params p = lstm_p(c);
    nn_lstm_forward(out, c->cache, c->x, &p, c->len, c->nseq, c->F, c->H);
}

Test(gradcheck, bilstm_with_masking)
{
    int len[3] = {4, 1, 3};
    fd c = {.forward = lstm_fwd, .F = 3, .H = 2, .len = len, .nseq = 3};
    int N = 8;
    size_t G = 8, per_dir = G * 3 + G * 2 + 2 * G, nw = 2 * per_dir;
    c.nout = (size_t)N * 4;
    c.x = buf((size_t)N * 3, 1), c.w = buf(nw, 2), c.r = buf(c.nout, 3), c.out = buf(c.nout, 0);
    c.cache = buf(nn_lstm_cache_size(N, 2), 0);
    float *work = buf(nn_lstm_work_size(N, 2), 0), *dx = buf((size_t)N * 3, 0), *dw = buf(nw, 0);
    lstm_fwd(&c, c.out);
    nn_lstm_params p = lstm_p(&c);
    nn_lstm_grads g;
    for (int d = 0; d < 2; d++) {
        float *base = dw + d * per_dir;
        g.wih[d] = base, g.whh[d] = base + G * 3, g.bih[d] = base + G * 3 + G * 2;
        g.bhh[d] = g.bih[d] + G;
    }
    nn_lstm_backward(dx, &g, work, c.r, c.cache, c.x, &p, len, 3, 3, 2);
    check("lstm dx", &c, c.x, (size_t)N * 3, dx);
    check("lstm dweights", &c, c.w, nw, dw);
    free(c.x), free(c.w), free(c.r), free(c.out), free(c.cache), free(work), free(dx), free(dw);
}

/* Winograd against im2col on shapes that exercise edge tiles and grouping. */
static void winograd_case(int B, int c, int h, int w, int oc)
{
    nn_conv_shape s;
    nn_conv_shape_init(&s, c, h, w, oc, 3, 1, 1);
    cr_assert(nn_winograd_applies(&s));
    size_t nx = (size_t)B * c * h * w, no = (size_t)B * oc * h * w;
    float *x = buf(nx, 1), *wt = buf((size_t)oc * c * 9, 2), *b = buf(oc, 3);
    float *ws = buf(nn_conv2d_col_size(&s, B), 0), *a = buf(no, 0), *ref = buf(no, 0);
    nn_winograd_forward(NULL, a, ws, x, wt, b, B, &s);
    nn_conv2d_forward_im2col(NULL, ref, ws, x, wt, b, B, &s);
    expect_close("winograd vs im2col", a, ref, no, 1e-5);
    free(x), free(wt), free(b), free(ws), free(a), free(ref);
}

Test(gradcheck, winograd_matches_im2col)
{
    winograd_case(1, 16, 8, 8, 4);
    winograd_case(3, 17, 7, 9, 5);  /* odd sizes: partial tiles */
    winograd_case(40, 16, 4, 4, 8); /* several images per GEMM */
    winograd_case(2, 32, 1, 1, 3);
}

/* The Winograd input gradient against the definition, written as plain loops,
 * for one image and for a batch that is grouped into wide GEMMs. */
Test(gradcheck, winograd_backward_data)
{
    for (int B = 1; B <= 33; B += 32) {
        nn_conv_shape s;
        nn_conv_shape_init(&s, 5, 7, 9, 16, 3, 1, 1);
        cr_assert(nn_winograd_backward_applies(&s));
        size_t nx = (size_t)B * 5 * 63, no = (size_t)B * 16 * 63, nw = 16 * 5 * 9;
        float *x = buf(nx, 1), *w = buf(nw, 2), *dout = buf(no, 3);
        float *ws = buf(nn_conv2d_col_size(&s, B), 0), *a = buf(nx, 4), *ref = buf(nx, 0);
        memcpy(ref, a, sizeof(float) * nx); /* both accumulate onto the same start */
        nn_winograd_backward_data(NULL, a, ws, dout, w, B, &s);
        for (int b = 0; b < B; b++)
            for (int o = 0; o < 16; o++)
                for (int ci = 0; ci < 5; ci++)
                    for (int y = 0; y < 7; y++)
                        for (int xx = 0; xx < 9; xx++)
                            for (int ky = 0; ky < 3; ky++)
                                for (int kx = 0; kx < 3; kx++) {
                                    int iy = y - 1 + ky, ix = xx - 1 + kx;
                                    if (iy < 0 || iy >= 7 || ix < 0 || ix >= 9) continue;
                                    ref[((size_t)b * 5 + ci) * 63 + iy * 9 + ix] +=
                                        w[((o * 5 + ci) * 3 + ky) * 3 + kx] *
                                        dout[((size_t)b * 16 + o) * 63 + y * 9 + xx];
                                }
        expect_close("winograd input gradient", a, ref, nx, 1e-5);
        free(x), free(w), free(dout), free(ws), free(a), free(ref);
    }
}

/* tests/nn/test_cuda_ops.c: every op of the CUDA backend against the CPU
 * reference kernels of nn/layers.h on the same random data (ggml's
 * test-backend-ops): forward outputs, and backward gradients that ACCUMULATE
 * into non-zero buffers (so a kernel that overwrites instead of adding
 * fails), with the NULL (frozen) gradient cases too. fp32, TF32 off.
 * Exits 77 (skipped) when no GPU is present. */
#include "cuda_check.h"

/* ---- device buffers ------------------------------------------------------ */

static float *dev_up(check_ctx *t, const float *h, size_t n)
{
    float *d = t->be->alloc(t->dev, (n + 1) * sizeof(float));
    if (!d) {
        fprintf(stderr, "device out of memory\n");
        exit(1);
    }
    t->be->upload(t->dev, d, h, n * sizeof(float));
    return d;
}

/* A host copy of device buffer d (caller frees). */
static float *dev_down(check_ctx *t, const float *d, size_t n)
{
    float *h = malloc((n + 1) * sizeof(float));
    t->be->download(t->dev, h, d, n * sizeof(float));
    return h;
}

static void cmp(check_ctx *t, const char *what, const float *dev, const float *ref, size_t n)
{
    float *h = dev_down(t, dev, n);
    check_nmse(t, what, h, ref, n, 0.0);
    free(h);
}

static void dfree(check_ctx *t, void *p)
{
    t->be->dealloc(t->dev, p);
}

/* ---- conv2d -------------------------------------------------------------- */

static void conv_case(check_ctx *t, int B, int c, int h, int w, int oc, int k, int s, int p)
{
    nn_conv_shape cs;
    nn_conv_shape_init(&cs, c, h, w, oc, k, s, p);
    char name[96];
    snprintf(name, sizeof(name), "conv B%d %dx%dx%d->%d k%d s%d p%d", B, c, h, w, oc, k, s, p);
    size_t nx = (size_t)B * c * h * w, no = (size_t)B * oc * cs.oh * cs.ow,
           nw = (size_t)oc * c * k * k;
    float *x = host_random(nx, 1), *wt = host_random(nw, 2), *b = host_random(oc, 3);
    float *g = host_random(no, 4);
    float *col = malloc(sizeof(float) * (nn_conv2d_col_size(&cs, B) + 1));
    float *ref = malloc(sizeof(float) * (no + 1));
    float *dx = host_random(nx, 5), *dw = host_random(nw, 6), *db = host_random(oc, 7);
    float *ddx = dev_up(t, dx, nx), *ddw = dev_up(t, dw, nw), *ddb = dev_up(t, db, oc);
    float *dxd = dev_up(t, x, nx), *dwt = dev_up(t, wt, nw), *dbd = dev_up(t, b, oc);
    float *dg = dev_up(t, g, no), *dout = t->be->alloc(t->dev, no * sizeof(float));
    char what[160];

    nn_conv2d_forward_im2col(NULL, ref, col, x, wt, b, B, &cs);
    for (int rep = 0; rep < 2; rep++) { /* the second call runs the cached plan */
        t->be->conv2d_forward(t->dev, dout, NULL, dxd, dwt, dbd, B, &cs);
        snprintf(what, sizeof(what), "%s fwd%s", name, rep ? " again" : "");
        cmp(t, what, dout, ref, no);
    }
    nn_conv2d_forward_im2col(NULL, ref, col, x, wt, NULL, B, &cs);
    t->be->conv2d_forward(t->dev, dout, NULL, dxd, dwt, NULL, B, &cs);
    snprintf(what, sizeof(what), "%s fwd no bias", name);
    cmp(t, what, dout, ref, no);

    nn_conv2d_backward(NULL, dx, dw, db, col, g, x, wt, B, &cs);
    t->be->conv2d_backward(t->dev, ddx, ddw, ddb, NULL, dg, dxd, dwt, B, &cs);
    snprintf(what, sizeof(what), "%s dx", name);
    cmp(t, what, ddx, dx, nx);
    snprintf(what, sizeof(what), "%s dw", name);
    cmp(t, what, ddw, dw, nw);
    snprintf(what, sizeof(what), "%s db", name);
    cmp(t, what, ddb, db, oc);
    /* frozen weights: only the input gradient; first layer: only the weights */
    nn_conv2d_backward(NULL, dx, NULL, NULL, col, g, x, wt, B, &cs);
    t->be->conv2d_backward(t->dev, ddx, NULL, NULL, NULL, dg, dxd, dwt, B, &cs);
    nn_conv2d_backward(NULL, NULL, dw, db, col, g, x, wt, B, &cs);
    t->be->conv2d_backward(t->dev, NULL, ddw, ddb, NULL, dg, dxd, dwt, B, &cs);
    snprintf(what, sizeof(what), "%s dx (frozen w)", name);
    cmp(t, what, ddx, dx, nx);
    snprintf(what, sizeof(what), "%s dw (no dx)", name);
    cmp(t, what, ddw, dw, nw);
    snprintf(what, sizeof(what), "%s db (no dx)", name);
    cmp(t, what, ddb, db, oc);

    free(x), free(wt), free(b), free(g), free(col), free(ref), free(dx), free(dw), free(db);
    dfree(t, ddx), dfree(t, ddw), dfree(t, ddb), dfree(t, dxd), dfree(t, dwt), dfree(t, dbd);
    dfree(t, dg), dfree(t, dout);
}

/* ---- max-pool ------------------------------------------------------------ */

static void pool_case(check_ctx *t, int B, int C, int H, int W, int k, int s)
{
    int OH = (H - k) / s + 1, OW = (W - k) / s + 1;
    size_t nin = (size_t)B * C * H * W, nout = (size_t)B * C * OH * OW;
    float *x = host_random(nin, 11), *g = host_random(nout, 12), *dx = host_random(nin, 13);
    float *out = malloc(sizeof(float) * nout);
    int32_t *idx = malloc(sizeof(int32_t) * nout), *gidx = malloc(sizeof(int32_t) * nout);
    float *dxd = dev_up(t, x, nin), *dg = dev_up(t, g, nout), *ddx = dev_up(t, dx, nin);
    float *dout = t->be->alloc(t->dev, nout * sizeof(float));
    int32_t *didx = t->be->alloc(t->dev, nout * sizeof(int32_t));
    char what[96];
    nn_maxpool_forward(out, idx, x, B, C, H, W, k, s);
    t->be->maxpool_forward(t->dev, dout, didx, dxd, B, C, H, W, k, s);
    snprintf(what, sizeof(what), "maxpool B%d C%d %dx%d k%d s%d fwd", B, C, H, W, k, s);
    cmp(t, what, dout, out, nout);
    t->be->download(t->dev, gidx, didx, nout * sizeof(int32_t));
    snprintf(what, sizeof(what), "maxpool %dx%d k%d s%d argmax identical", H, W, k, s);
    check_true(t, what, memcmp(gidx, idx, nout * sizeof(int32_t)) == 0);
    nn_maxpool_backward(dx, g, idx, B, C, H, W, k, s);
    t->be->maxpool_backward(t->dev, ddx, dg, didx, B, C, H, W, k, s);
    snprintf(what, sizeof(what), "maxpool %dx%d k%d s%d dx", H, W, k, s);
    cmp(t, what, ddx, dx, nin);
    free(x), free(g), free(dx), free(out), free(idx), free(gidx);
    dfree(t, dxd), dfree(t, dg), dfree(t, ddx), dfree(t, dout), dfree(t, didx);
}

/* A NaN (an overflow upstream) passes ReLU and wins max-pool on the device as
 * on the CPU: same NaN positions, same argmax, same gradients. */
static void nan_case(check_ctx *t)
{
    int B = 1, C = 2, H = 6, W = 6;
    size_t n = (size_t)B * C * H * W;
    float *x = host_random(n, 31);
    for (size_t i = 0; i < n; i += 7)
        x[i] = NAN;
    float *dx = malloc(sizeof(float) * n), *out = malloc(sizeof(float) * n);
    float *dxd = dev_up(t, x, n), *dout = t->be->alloc(t->dev, n * sizeof(float));
    nn_relu_forward(out, x, n);
    t->be->relu_forward(t->dev, dout, dxd, n);
    float *h = dev_down(t, dout, n);
    check_true(t, "relu keeps NaN", memcmp(h, out, n * sizeof(float)) == 0);
    float *g = host_random(n, 32), *dg = dev_up(t, g, n), *ddx = dev_up(t, g, n);
    memcpy(dx, g, n * sizeof(float));
    nn_relu_backward(dx, g, out, n);
    t->be->relu_backward(t->dev, ddx, dg, dout, n);
    free(h);
    h = dev_down(t, ddx, n);
    check_true(t, "relu dx through NaN", memcmp(h, dx, n * sizeof(float)) == 0);
    free(h);
    int ks[2][2] = {{2, 2}, {3, 1}};
    for (int c = 0; c < 2; c++) {
        int k = ks[c][0], s = ks[c][1], OH = (H - k) / s + 1, OW = (W - k) / s + 1;
        size_t no = (size_t)B * C * OH * OW;
        int32_t *idx = malloc(no * sizeof(int32_t)), *gidx = malloc(no * sizeof(int32_t));
        int32_t *didx = t->be->alloc(t->dev, no * sizeof(int32_t));
        nn_maxpool_forward(out, idx, x, B, C, H, W, k, s);
        t->be->maxpool_forward(t->dev, dout, didx, dxd, B, C, H, W, k, s);
        h = dev_down(t, dout, no);
        t->be->download(t->dev, gidx, didx, no * sizeof(int32_t));
        int nans = 0, same = 1;
        for (size_t i = 0; i < no; i++) {
            nans += isnan(out[i]);
            same = same && isnan(out[i]) == isnan(h[i]) && (isnan(h[i]) || h[i] == out[i]) &&
                   gidx[i] == idx[i];
        }
        char what[64];
        snprintf(what, sizeof what, "maxpool k%d s%d keeps NaN (%d), same argmax", k, s, nans);
        check_true(t, what, nans > 0 && same);
        free(h), free(idx), free(gidx);
        dfree(t, didx);
    }
    free(x), free(dx), free(out), free(g);
    dfree(t, dxd), dfree(t, dout), dfree(t, dg), dfree(t, ddx);
}

/* ---- ReLU, GAP, dropout -------------------------------------------------- */

static void elementwise(check_ctx *t)
{
    size_t n = 100003;
    float *x = host_random(n, 21), *g = host_random(n, 22), *dx = host_random(n, 23);
    float *out = malloc(sizeof(float) * n);
    float *dxd = dev_up(t, x, n), *dg = dev_up(t, g, n), *ddx = dev_up(t, dx, n);
    float *dout = t->be->alloc(t->dev, n * sizeof(float));
    nn_relu_forward(out, x, n);
    t->be->relu_forward(t->dev, dout, dxd, n);
    cmp(t, "relu fwd", dout, out, n);
    nn_relu_backward(dx, g, out, n);
    t->be->relu_backward(t->dev, ddx, dg, dout, n);
    cmp(t, "relu dx", ddx, dx, n);
    t->be->relu_forward(t->dev, dxd, dxd, n); /* in place, as the stacks run it */
    cmp(t, "relu fwd in place", dxd, out, n);

    int B = 3, C = 7, S = 37;
    size_t np = (size_t)B * C, ni = np * S;
    t->be->upload(t->dev, dxd, x, ni * sizeof(float));
    t->be->upload(t->dev, ddx, dx, ni * sizeof(float));
    nn_gap_forward(out, x, B, C, S);
    t->be->gap_forward(t->dev, dout, dxd, B, C, S);
    cmp(t, "gap fwd", dout, out, np);
    nn_gap_backward(dx, g, B, C, S);
    t->be->gap_backward(t->dev, ddx, dg, B, C, S);
    cmp(t, "gap dx", ddx, dx, ni);

    float ps[3] = {0.5f, 0.0f, 0.1f};
    for (int i = 0; i < 3; i++) {
        uint64_t r_cpu = 12345 + i, r_gpu = r_cpu;
        float *mask = malloc(sizeof(float) * n), *dmask = t->be->alloc(t->dev, n * sizeof(float));
        t->be->upload(t->dev, dxd, x, n * sizeof(float));
        t->be->upload(t->dev, ddx, dx, n * sizeof(float));
        nn_dropout_forward(out, mask, x, n, ps[i], &r_cpu);
        t->be->dropout_forward(t->dev, dout, dmask, dxd, n, ps[i], &r_gpu);
        char what[64];
        snprintf(what, sizeof(what), "dropout p=%.1f fwd", (double)ps[i]);
        cmp(t, what, dout, out, n);
        float *hm = dev_down(t, dmask, n);
        snprintf(what, sizeof(what), "dropout p=%.1f masks identical", (double)ps[i]);
        check_true(t, what, memcmp(hm, mask, n * sizeof(float)) == 0);
        snprintf(what, sizeof(what), "dropout p=%.1f rng state advanced alike", (double)ps[i]);
        check_true(t, what, r_cpu == r_gpu);
        nn_dropout_backward(dx, g, mask, n);
        t->be->dropout_backward(t->dev, ddx, dg, dmask, n);
        snprintf(what, sizeof(what), "dropout p=%.1f dx", (double)ps[i]);
        cmp(t, what, ddx, dx, n);
        free(mask), free(hm);
        dfree(t, dmask);
    }
    float *dst = host_random(n, 24), *dd = dev_up(t, dst, n);
    for (size_t i = 0; i < n; i++)
        dst[i] += x[i];
    t->be->upload(t->dev, dxd, x, n * sizeof(float));
    t->be->add(t->dev, dd, dxd, n);
    cmp(t, "add", dd, dst, n);
    t->be->copy(t->dev, dd, dxd, n * sizeof(float));
    cmp(t, "copy", dd, x, n);
    free(x), free(g), free(dx), free(out), free(dst);
    dfree(t, dxd), dfree(t, dg), dfree(t, ddx), dfree(t, dout), dfree(t, dd);
}

/* ---- batch-norm ---------------------------------------------------------- */

static void bn_case(check_ctx *t, int B, int C, int S, int training)
{
    size_t n = (size_t)B * C * S;
    float *x = host_random(n, 31), *g = host_random(n, 32), *dx = host_random(n, 33);
    float *gamma = host_random(C, 34), *beta = host_random(C, 35), *rm = host_random(C, 36);
    float *rv = host_random(C, 37), *dgam = host_random(C, 38), *dbet = host_random(C, 39);
    for (int c = 0; c < C; c++)
        rv[c] = 0.5f + rv[c] * rv[c]; /* a variance */
    for (size_t i = 0; i < n; i++)
        x[i] = 3.0f * x[i] + 0.5f; /* a mean and spread that are not 0 and 1 */
    float *out = malloc(sizeof(float) * n), *stat = malloc(sizeof(float) * 2 * C);
    float *dxd = dev_up(t, x, n), *dg = dev_up(t, g, n), *ddx = dev_up(t, dx, n);
    float *dgamma = dev_up(t, gamma, C), *dbeta = dev_up(t, beta, C), *drm = dev_up(t, rm, C);
    float *drv = dev_up(t, rv, C), *ddgam = dev_up(t, dgam, C), *ddbet = dev_up(t, dbet, C);
    float *dout = t->be->alloc(t->dev, n * sizeof(float));
    float *dstat = t->be->alloc(t->dev, 2 * C * sizeof(float));
    char name[64], what[128];
    snprintf(name, sizeof(name), "batchnorm %s B%d C%d S%d", training ? "train" : "eval", B, C, S);
    nn_batchnorm_forward(NULL, out, stat, stat + C, rm, rv, x, gamma, beta, B, C, S, training, 0.1f,
                         1e-5f);
    t->be->batchnorm_forward(t->dev, dout, dstat, dstat + C, drm, drv, dxd, dgamma, dbeta, B, C, S,
                             training, 0.1f, 1e-5f);
    snprintf(what, sizeof(what), "%s fwd", name);
    cmp(t, what, dout, out, n);
    snprintf(what, sizeof(what), "%s mean", name);
    cmp(t, what, dstat, stat, C);
    snprintf(what, sizeof(what), "%s rstd", name);
    cmp(t, what, dstat + C, stat + C, C);
    snprintf(what, sizeof(what), "%s running mean", name);
    cmp(t, what, drm, rm, C);
    snprintf(what, sizeof(what), "%s running var", name);
    cmp(t, what, drv, rv, C);
    nn_batchnorm_backward(NULL, dx, dgam, dbet, g, x, stat, stat + C, gamma, B, C, S, training);
    t->be->batchnorm_backward(t->dev, ddx, ddgam, ddbet, dg, dxd, dstat, dstat + C, dgamma, B, C, S,
                              training, 1e-5f);
    snprintf(what, sizeof(what), "%s dx", name);
    cmp(t, what, ddx, dx, n);
    snprintf(what, sizeof(what), "%s dgamma", name);
    cmp(t, what, ddgam, dgam, C);
    snprintf(what, sizeof(what), "%s dbeta", name);
    cmp(t, what, ddbet, dbet, C);
    /* frozen affine (only dx), and no dx with one parameter gradient */
    nn_batchnorm_backward(NULL, dx, NULL, NULL, g, x, stat, stat + C, gamma, B, C, S, training);
    t->be->batchnorm_backward(t->dev, ddx, NULL, NULL, dg, dxd, dstat, dstat + C, dgamma, B, C, S,
                              training, 1e-5f);
    snprintf(what, sizeof(what), "%s dx (frozen)", name);
    cmp(t, what, ddx, dx, n);
    nn_batchnorm_backward(NULL, NULL, dgam, NULL, g, x, stat, stat + C, gamma, B, C, S, training);
    t->be->batchnorm_backward(t->dev, NULL, ddgam, NULL, dg, dxd, dstat, dstat + C, dgamma, B, C, S,
                              training, 1e-5f);
    snprintf(what, sizeof(what), "%s dgamma (no dx, no dbeta)", name);
    cmp(t, what, ddgam, dgam, C);
    snprintf(what, sizeof(what), "%s dbeta untouched", name);
    cmp(t, what, ddbet, dbet, C);
    free(x), free(g), free(dx), free(gamma), free(beta), free(rm), free(rv), free(dgam);
    free(dbet), free(out), free(stat);
    dfree(t, dxd), dfree(t, dg), dfree(t, ddx), dfree(t, dgamma), dfree(t, dbeta), dfree(t, drm);
    dfree(t, drv), dfree(t, ddgam), dfree(t, ddbet), dfree(t, dout), dfree(t, dstat);
}

/* ---- linear -------------------------------------------------------------- */

static void linear_case(check_ctx *t, int N, int IC, int OC)
{
    size_t nx = (size_t)N * IC, nw = (size_t)OC * IC, no = (size_t)N * OC;
    float *x = host_random(nx, 41), *w = host_random(nw, 42), *b = host_random(OC, 43);
    float *g = host_random(no, 44), *dx = host_random(nx, 45), *dw = host_random(nw, 46);
    float *db = host_random(OC, 47), *out = malloc(sizeof(float) * no);
    float *dxd = dev_up(t, x, nx), *dwd = dev_up(t, w, nw), *dbd = dev_up(t, b, OC);
    float *dg = dev_up(t, g, no), *ddx = dev_up(t, dx, nx), *ddw = dev_up(t, dw, nw);
    float *ddb = dev_up(t, db, OC), *dout = t->be->alloc(t->dev, no * sizeof(float));
    char name[64], what[128];
    snprintf(name, sizeof(name), "linear %dx%d->%d", N, IC, OC);
    nn_linear_forward(out, x, w, b, N, IC, OC);
    t->be->linear_forward(t->dev, dout, dxd, dwd, dbd, N, IC, OC);
    snprintf(what, sizeof(what), "%s fwd", name);
    cmp(t, what, dout, out, no);
    nn_linear_forward(out, x, w, NULL, N, IC, OC);
    t->be->linear_forward(t->dev, dout, dxd, dwd, NULL, N, IC, OC);
    snprintf(what, sizeof(what), "%s fwd no bias", name);
    cmp(t, what, dout, out, no);
    nn_linear_backward(dx, dw, db, g, x, w, N, IC, OC);
    t->be->linear_backward(t->dev, ddx, ddw, ddb, dg, dxd, dwd, N, IC, OC);
    snprintf(what, sizeof(what), "%s dx", name);
    cmp(t, what, ddx, dx, nx);
    snprintf(what, sizeof(what), "%s dw", name);
    cmp(t, what, ddw, dw, nw);
    snprintf(what, sizeof(what), "%s db", name);
    cmp(t, what, ddb, db, OC);
    nn_linear_backward(dx, NULL, NULL, g, x, w, N, IC, OC);
    t->be->linear_backward(t->dev, ddx, NULL, NULL, dg, dxd, dwd, N, IC, OC);
    snprintf(what, sizeof(what), "%s dx (frozen)", name);
    cmp(t, what, ddx, dx, nx);
    free(x), free(w), free(b), free(g), free(dx), free(dw), free(db), free(out);
    dfree(t, dxd), dfree(t, dwd), dfree(t, dbd), dfree(t, dg), dfree(t, ddx), dfree(t, ddw);
    dfree(t, ddb), dfree(t, dout);
}

/* ---- BCE with logits, Adam ----------------------------------------------- */

static void bce_case(check_ctx *t, int N, int L, int weighted)
{
    size_t n = (size_t)N * L;
    float *x = host_random(n, 51), *y = host_random(n, 52), *d = malloc(sizeof(float) * n);
    float *lw = host_random(L, 53), *pw = host_random(L, 54);
    for (size_t i = 0; i < n; i++) {
        x[i] *= 8.0f; /* both signs, and large enough for softplus' two branches */
        y[i] = y[i] > 0.3f ? 1.0f : (y[i] < -0.6f ? 0.25f : 0.0f);
    }
    for (int l = 0; l < L; l++)
        lw[l] += 1.5f, pw[l] = 2.0f + pw[l];
    float *dx = dev_up(t, x, n), *dy = dev_up(t, y, n), *dlw = dev_up(t, lw, L);
    float *dpw = dev_up(t, pw, L), *dd = t->be->alloc(t->dev, n * sizeof(float));
    float ref = nn_bce_logits(d, x, y, weighted ? lw : NULL, weighted ? pw : NULL, N, L);
    float got =
        t->be->bce_logits(t->dev, dd, dx, dy, weighted ? dlw : NULL, weighted ? dpw : NULL, N, L);
    char what[96];
    snprintf(what, sizeof(what), "bce N%d L%d%s loss", N, L, weighted ? " weighted" : "");
    check_nmse(t, what, &got, &ref, 1, 0.0);
    snprintf(what, sizeof(what), "bce N%d L%d%s dlogits", N, L, weighted ? " weighted" : "");
    cmp(t, what, dd, d, n);
    got = t->be->bce_logits(t->dev, NULL, dx, dy, NULL, NULL, N, L);
    ref = nn_bce_logits(NULL, x, y, NULL, NULL, N, L);
    snprintf(what, sizeof(what), "bce N%d L%d loss without dlogits", N, L);
    check_nmse(t, what, &got, &ref, 1, 0.0);
    free(x), free(y), free(d), free(lw), free(pw);
    dfree(t, dx), dfree(t, dy), dfree(t, dlw), dfree(t, dpw), dfree(t, dd);
}

static void adam_case(check_ctx *t, float wd, int decoupled)
{
    size_t n = 4099;
    float *p = host_random(n, 61), *m = calloc(n, sizeof(float)), *v = calloc(n, sizeof(float));
    float *dp = dev_up(t, p, n), *dm = dev_up(t, m, n), *dv = dev_up(t, v, n);
    for (int step = 1; step <= 5; step++) {
        float *g = host_random(n, 62 + step), *dg = dev_up(t, g, n);
        nn_adam_hyper h = {.lr = 1e-2f,
                           .beta1 = 0.9f,
                           .beta2 = 0.999f,
                           .eps = 1e-8f,
                           .weight_decay = wd,
                           .decoupled = decoupled};
        h.step = h.lr / (1.0f - powf(h.beta1, (float)step));
        h.bc2 = sqrtf(1.0f - powf(h.beta2, (float)step));
        nn_adam_update(p, g, m, v, n, &h);
        t->be->adam_update(t->dev, dp, dg, dm, dv, n, &h);
        free(g);
        dfree(t, dg);
    }
    char what[64];
    snprintf(what, sizeof(what), "adam wd=%g%s params", (double)wd, decoupled ? " (AdamW)" : "");
    cmp(t, what, dp, p, n);
    snprintf(what, sizeof(what), "adam wd=%g%s moments", (double)wd, decoupled ? " (AdamW)" : "");
    cmp(t, what, dv, v, n);
    free(p), free(m), free(v);
    dfree(t, dp), dfree(t, dm), dfree(t, dv);
}

/* ---- bidirectional LSTM over packed series ------------------------------ */

static void lstm_case(check_ctx *t, const int *len, int S, int F, int H, int frozen)
{
    int N = 0;
    for (int s = 0; s < S; s++)
        N += len[s];
    size_t G = 4 * (size_t)H;
    float *x = host_random((size_t)N * F, 71), *dout = host_random((size_t)N * 2 * H, 72);
    float *dx = host_random((size_t)N * F, 73), *out = malloc(sizeof(float) * N * 2 * H);
    float *cache = malloc(sizeof(float) * nn_lstm_cache_size(N, H));
    float *work = malloc(sizeof(float) * nn_lstm_work_size(N, H));
    nn_lstm_params hp, dp;
    nn_lstm_grads hg, dg;
    float *hw[2][4], *hgr[2][4], *dw[2][4], *dgr[2][4];
    size_t sz[4] = {G * F, G * H, G, G};
    for (int d = 0; d < 2; d++)
        for (int k = 0; k < 4; k++) {
            hw[d][k] = host_random(sz[k], 80 + d * 4 + k);
            for (size_t i = 0; i < sz[k]; i++)
                hw[d][k][i] *= 0.3f; /* PyTorch's U(-1/sqrt(H), 1/sqrt(H)) scale */
            hgr[d][k] = host_random(sz[k], 90 + d * 4 + k);
            dw[d][k] = dev_up(t, hw[d][k], sz[k]);
            dgr[d][k] = dev_up(t, hgr[d][k], sz[k]);
        }
    for (int d = 0; d < 2; d++) {
        hp.wih[d] = hw[d][0], hp.whh[d] = hw[d][1], hp.bih[d] = hw[d][2], hp.bhh[d] = hw[d][3];
        dp.wih[d] = dw[d][0], dp.whh[d] = dw[d][1], dp.bih[d] = dw[d][2], dp.bhh[d] = dw[d][3];
        hg.wih[d] = frozen ? NULL : hgr[d][0], hg.whh[d] = frozen ? NULL : hgr[d][1];
        hg.bih[d] = frozen ? NULL : hgr[d][2], hg.bhh[d] = frozen ? NULL : hgr[d][3];
        dg.wih[d] = frozen ? NULL : dgr[d][0], dg.whh[d] = frozen ? NULL : dgr[d][1];
        dg.bih[d] = frozen ? NULL : dgr[d][2], dg.bhh[d] = frozen ? NULL : dgr[d][3];
    }
    float *dxd = dev_up(t, x, (size_t)N * F), *ddout = dev_up(t, dout, (size_t)N * 2 * H);
    float *ddx = dev_up(t, dx, (size_t)N * F);
    float *dout_d = t->be->alloc(t->dev, sizeof(float) * N * 2 * H);
    char name[96], what[160];
    int o = snprintf(name, sizeof(name), "lstm F%d H%d len", F, H);
    for (int s = 0; s < S && o < 60; s++)
        o += snprintf(name + o, sizeof(name) - o, "%s%d", s ? "," : " ", len[s]);
    if (frozen) snprintf(name + o, sizeof(name) - o, " frozen");

    nn_lstm_forward(out, cache, x, &hp, len, S, F, H);
    t->be->lstm_forward(t->dev, dout_d, NULL, dxd, &dp, len, S, F, H);
    snprintf(what, sizeof(what), "%s fwd", name);
    cmp(t, what, dout_d, out, (size_t)N * 2 * H);
    nn_lstm_backward(dx, &hg, work, dout, cache, x, &hp, len, S, F, H);
    t->be->lstm_backward(t->dev, ddx, &dg, NULL, ddout, NULL, dxd, &dp, len, S, F, H);
    snprintf(what, sizeof(what), "%s dx", name);
    cmp(t, what, ddx, dx, (size_t)N * F);
    static const char *const tn[4] = {"dW_ih", "dW_hh", "db_ih", "db_hh"};
    for (int d = 0; d < 2; d++)
        for (int k = 0; k < 4; k++) {
            snprintf(what, sizeof(what), "%s %s%s", name, tn[k], d ? "_reverse" : "");
            cmp(t, what, dgr[d][k], hgr[d][k], sz[k]); /* unchanged when frozen */
        }
    /* no input gradient wanted (stage 2 on precomputed features) */
    if (!frozen) {
        nn_lstm_forward(out, cache, x, &hp, len, S, F, H);
        t->be->lstm_forward(t->dev, dout_d, NULL, dxd, &dp, len, S, F, H);
        nn_lstm_backward(NULL, &hg, work, dout, cache, x, &hp, len, S, F, H);
        t->be->lstm_backward(t->dev, NULL, &dg, NULL, ddout, NULL, dxd, &dp, len, S, F, H);
        snprintf(what, sizeof(what), "%s dW_ih (no dx)", name);
        cmp(t, what, dgr[0][0], hgr[0][0], sz[0]);
        snprintf(what, sizeof(what), "%s dW_hh_reverse (no dx)", name);
        cmp(t, what, dgr[1][1], hgr[1][1], sz[1]);
    }
    for (int d = 0; d < 2; d++)
        for (int k = 0; k < 4; k++) {
            free(hw[d][k]), free(hgr[d][k]);
            dfree(t, dw[d][k]), dfree(t, dgr[d][k]);
        }
    free(x), free(dout), free(dx), free(out), free(cache), free(work);
    dfree(t, dxd), dfree(t, ddout), dfree(t, ddx), dfree(t, dout_d);
}

int main(void)
{
    if (nn_cuda_device_count() < 1 || !nn_backend_cuda()) {
        printf("SKIP: no GPU present (or nn/cuda/ not built); nothing was compared\n");
        return SKIP;
    }
    check_ctx t = {.be = nn_backend_cuda()};
    char err[256] = "";
    if (t.be->init(&t.dev, NN_BACKEND_FP32, err, sizeof(err)) != 0) {
        printf("FAIL cuda init: %s\n", err);
        return 1;
    }
    conv_case(&t, 3, 16, 9, 7, 8, 3, 1, 1);
    conv_case(&t, 2, 3, 9, 7, 8, 3, 2, 1);
    conv_case(&t, 2, 4, 5, 5, 6, 1, 1, 0);
    conv_case(&t, 2, 5, 11, 9, 7, 5, 2, 2);
    conv_case(&t, 4, 3, 32, 32, 16, 3, 1, 1);   /* VGG's first layer, small */
    conv_case(&t, 5, 64, 16, 16, 128, 3, 1, 1); /* VGG block 2-3 */
    conv_case(&t, 3, 512, 4, 4, 512, 3, 1, 1);  /* VGG's last block at 128x128 input */
    conv_case(&t, 1, 3, 128, 128, 64, 3, 1, 1);
    pool_case(&t, 2, 3, 8, 8, 2, 2);
    pool_case(&t, 2, 3, 9, 7, 2, 2);
    pool_case(&t, 1, 2, 7, 7, 3, 2); /* overlapping windows */
    pool_case(&t, 2, 4, 6, 6, 3, 3);
    elementwise(&t);
    nan_case(&t);
    bn_case(&t, 4, 3, 25, 1);
    bn_case(&t, 4, 3, 25, 0);
    bn_case(&t, 7, 5, 1, 1); /* the head's 1-D batch-norm */
    bn_case(&t, 7, 5, 1, 0);
    bn_case(&t, 2, 32, 64, 1);
    linear_case(&t, 5, 7, 3);
    linear_case(&t, 40, 200, 100);
    linear_case(&t, 9, 8192, 1000); /* VGG19's first dense layer at 128x128 */
    bce_case(&t, 37, 6, 0);
    bce_case(&t, 37, 6, 1);
    bce_case(&t, 1, 1, 1);
    adam_case(&t, 0.0f, 0);
    adam_case(&t, 0.01f, 0);
    adam_case(&t, 0.01f, 1);
    int l1[4] = {3, 1, 5, 2}, l2[1] = {1}, l3[2] = {40, 17}, l4[3] = {2, 7, 7};
    lstm_case(&t, l1, 4, 17, 8, 0);
    lstm_case(&t, l1, 4, 17, 8, 1);
    lstm_case(&t, l2, 1, 5, 3, 0);
    lstm_case(&t, l4, 3, 64, 100, 0);
    lstm_case(&t, l3, 2, 512, 100, 0);
    if (t.be->status(t.dev, err, sizeof(err)) != 0) {
        printf("FAIL backend status: %s\n", err);
        t.failures++;
    }
    t.be->release(t.dev);
    printf("%d of %d checks failed\n", t.failures, t.checks);
    return t.failures ? 1 : 0;
}

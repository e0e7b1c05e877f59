/* nn/conv.c: 2-D convolution on the CPU through im2col + OpenBLAS sgemm,
 * handing 3x3 stride-1 layers to Winograd (winograd.c) where it applies.
 *
 * A batch is cut into groups of images whose columns fit one GEMM of a useful
 * width: late VGG layers have only 8x8 or 4x4 outputs per image, and a GEMM
 * with N = 16 runs far below peak, so those layers put several images side
 * by side in the column buffer and scatter the result back to NCHW. */
#include "layers.h"
#include "pool.h"

#include <cblas.h>
#include <string.h>

/* Output columns per GEMM that keep OpenBLAS near its peak. */
#define NN_CONV_MIN_COLS 1024

void nn_conv_shape_init(nn_conv_shape *s, int c, int h, int w, int oc, int k, int stride, int pad)
{
    s->c = c;
    s->h = h;
    s->w = w;
    s->oc = oc;
    s->kh = k;
    s->kw = k;
    s->stride = stride;
    s->pad = pad;
    s->oh = (h + 2 * pad - k) / stride + 1;
    s->ow = (w + 2 * pad - k) / stride + 1;
}

static int is_pointwise(const nn_conv_shape *s)
{
    return s->kh == 1 && s->kw == 1 && s->stride == 1 && s->pad == 0;
}

/* Images per GEMM group. */
static int group_size(const nn_conv_shape *s, int B)
{
    int ohw = s->oh * s->ow;
    int g = (NN_CONV_MIN_COLS + ohw - 1) / ohw;
    if (g > B) g = B;
    if (g < 1) g = 1;
    return g;
}

size_t nn_conv2d_col_size(const nn_conv_shape *s, int B)
{
    size_t ohw = (size_t)s->oh * s->ow;
    size_t g = (size_t)group_size(s, B);
    size_t col = (size_t)s->c * s->kh * s->kw * ohw * g;
    /* grouped outputs need a staging area [oc, g*ohw] after the columns */
    if (g > 1) col += (size_t)s->oc * ohw * g;
    if (nn_winograd_applies(s)) {
        size_t wg = nn_winograd_ws_size(s, B);
        if (wg > col) col = wg;
    }
    if (nn_winograd_backward_applies(s)) {
        size_t wg = nn_winograd_backward_ws_size(s, B);
        if (wg > col) col = wg;
    }
    return col;
}

/* col [c*kh*kw, ld] (the first oh*ow columns) <- patches of channels
 * [c0, c1) of one image [c,h,w]. */
static void im2col(float *col, size_t ld, const float *in, const nn_conv_shape *s, int c0, int c1)
{
    for (int ci = c0; ci < c1; ci++) {
        const float *plane = in + (size_t)ci * s->h * s->w;
        for (int ki = 0; ki < s->kh; ki++) {
            for (int kj = 0; kj < s->kw; kj++) {
                float *row = col + ((size_t)(ci * s->kh + ki) * s->kw + kj) * ld;
                for (int oy = 0; oy < s->oh; oy++) {
                    int iy = oy * s->stride - s->pad + ki;
                    float *dst = row + (size_t)oy * s->ow;
                    if (iy < 0 || iy >= s->h) {
                        memset(dst, 0, sizeof(float) * s->ow);
                        continue;
                    }
                    const float *src = plane + (size_t)iy * s->w;
                    if (s->stride == 1) {
                        /* ix = ox - pad + kj must lie in [0, w) */
                        int lo = s->pad - kj, hi = s->w + s->pad - kj;
                        if (lo < 0) lo = 0;
                        if (hi > s->ow) hi = s->ow;
                        if (hi < lo) hi = lo;
                        for (int ox = 0; ox < lo; ox++)
                            dst[ox] = 0.0f;
                        if (hi > lo)
                            memcpy(dst + lo, src + lo - s->pad + kj, sizeof(float) * (hi - lo));
                        for (int ox = hi; ox < s->ow; ox++)
                            dst[ox] = 0.0f;
                    } else {
                        for (int ox = 0; ox < s->ow; ox++) {
                            int ix = ox * s->stride - s->pad + kj;
                            dst[ox] = (ix >= 0 && ix < s->w) ? src[ix] : 0.0f;
                        }
                    }
                }
            }
        }
    }
}

/* din [c,h,w] += columns col [c*kh*kw, ld] folded back onto the image. */
static void col2im(float *din, const float *col, size_t ld, const nn_conv_shape *s)
{
    for (int ci = 0; ci < s->c; ci++) {
        float *plane = din + (size_t)ci * s->h * s->w;
        for (int ki = 0; ki < s->kh; ki++) {
            for (int kj = 0; kj < s->kw; kj++) {
                const float *row = col + ((size_t)(ci * s->kh + ki) * s->kw + kj) * ld;
                for (int oy = 0; oy < s->oh; oy++) {
                    int iy = oy * s->stride - s->pad + ki;
                    if (iy < 0 || iy >= s->h) continue;
                    const float *src = row + (size_t)oy * s->ow;
                    float *dst = plane + (size_t)iy * s->w;
                    if (s->stride == 1) {
                        int lo = s->pad - kj, hi = s->w + s->pad - kj;
                        if (lo < 0) lo = 0;
                        if (hi > s->ow) hi = s->ow;
                        float *d = dst - s->pad + kj;
                        for (int ox = lo; ox < hi; ox++)
                            d[ox] += src[ox];
                        continue;
                    }
                    for (int ox = 0; ox < s->ow; ox++) {
                        int ix = ox * s->stride - s->pad + kj;
                        if (ix >= 0 && ix < s->w) dst[ix] += src[ox];
                    }
                }
            }
        }
    }
}

/* Work spread over the pool in pieces of (image, channel) pairs of a group
 * of n images: im2col into col at stride ld, col2im back, or the bias. */
struct conv_job {
    const nn_conv_shape *s;
    const float *in, *b, *col;
    float *out, *dst;
    size_t ld, in_sz, out_sz;
    int n, pieces;
};

static void im2col_channels(const void *arg, int i, int img, int c0, int c1)
{
    (void)i;
    const struct conv_job *j = arg;
    im2col(j->dst + (size_t)img * j->s->oh * j->s->ow, j->ld, j->in + img * j->in_sz, j->s, c0, c1);
}

static void im2col_piece(void *arg, int i)
{
    const struct conv_job *j = arg;
    nn_pool_range_pairs((size_t)j->n, j->s->c, j->pieces, i, im2col_channels, j);
}

/* col [c*kh*kw, ld] <- the patches of the n images of in, side by side. */
static void im2col_group(nn_pool *p, float *col, size_t ld, const float *in, int n,
                         const nn_conv_shape *s)
{
    struct conv_job j = {.s = s, .in = in, .dst = col, .ld = ld, .n = n};
    j.in_sz = (size_t)s->c * s->h * s->w;
    j.pieces = nn_pool_ranges((size_t)n * s->c, 1, 2 * nn_pool_threads(p));
    nn_pool_run(p, j.pieces, im2col_piece, &j);
}

static void col2im_image(void *arg, int i)
{
    const struct conv_job *j = arg;
    int ohw = j->s->oh * j->s->ow;
    col2im(j->out + i * j->in_sz, j->col + (size_t)i * ohw, j->ld, j->s);
}

static void bias_piece(void *arg, int i)
{
    const struct conv_job *j = arg;
    size_t lo, hi, ohw = (size_t)j->s->oh * j->s->ow;
    nn_pool_range((size_t)j->n * j->s->oc, j->pieces, i, &lo, &hi);
    for (size_t q = lo; q < hi; q++) {
        float *p = j->out + q * ohw, bo = j->b[q % (size_t)j->s->oc];
        for (size_t k = 0; k < ohw; k++)
            p[k] += bo;
    }
}

/* db [oc] += the sums of dout over images and positions, channels in pieces. */
static void db_piece(void *arg, int i)
{
    const struct conv_job *j = arg;
    size_t lo, hi;
    int ohw = j->s->oh * j->s->ow;
    nn_pool_range((size_t)j->s->oc, j->pieces, i, &lo, &hi);
    for (size_t o = lo; o < hi; o++)
        for (int bi = 0; bi < j->n; bi++) {
            const float *p = j->col + bi * j->out_sz + o * ohw;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int k = 0; k < ohw; k++)
                acc += p[k];
            j->dst[o] += acc;
        }
}

void nn_conv2d_forward(nn_pool *p, float *out, float *col, const float *in, const float *w,
                       const float *b, int B, const nn_conv_shape *s)
{
    if (nn_winograd_applies(s))
        nn_winograd_forward(p, out, col, in, w, b, B, s);
    else
        nn_conv2d_forward_im2col(p, out, col, in, w, b, B, s);
}

void nn_conv2d_forward_im2col(nn_pool *p, float *out, float *col, const float *in, const float *w,
                              const float *b, int B, const nn_conv_shape *s)
{
    int ohw = s->oh * s->ow;
    int ckk = s->c * s->kh * s->kw;
    size_t in_sz = (size_t)s->c * s->h * s->w, out_sz = (size_t)s->oc * ohw;
    int g = group_size(s, B);
    for (int b0 = 0; b0 < B; b0 += g) {
        int n = B - b0 < g ? B - b0 : g;
        if (n == 1) {
            const float *src = in + b0 * in_sz;
            if (!is_pointwise(s)) {
                im2col_group(p, col, ohw, src, 1, s);
                src = col;
            }
            nn_pool_sgemm(p, CblasNoTrans, CblasNoTrans, s->oc, ohw, ckk, 1.0f, w, ckk, src, ohw,
                          0.0f, out + b0 * out_sz, ohw);
            continue;
        }
        size_t ld = (size_t)ohw * n;
        if (is_pointwise(s)) {
            for (int i = 0; i < n; i++)
                for (int ci = 0; ci < s->c; ci++)
                    memcpy(col + ci * ld + (size_t)i * ohw,
                           in + (b0 + i) * in_sz + (size_t)ci * ohw, sizeof(float) * ohw);
        } else {
            /* im2col writes rows of width ohw at stride ld */
            im2col_group(p, col, ld, in + b0 * in_sz, n, s);
        }
        float *stage = col + (size_t)ckk * ld;
        nn_pool_sgemm(p, CblasNoTrans, CblasNoTrans, s->oc, (int)ld, ckk, 1.0f, w, ckk, col,
                      (int)ld, 0.0f, stage, (int)ld);
        for (int i = 0; i < n; i++)
            for (int o = 0; o < s->oc; o++)
                memcpy(out + (b0 + i) * out_sz + (size_t)o * ohw, stage + o * ld + (size_t)i * ohw,
                       sizeof(float) * ohw);
    }
    if (b) {
        struct conv_job j = {.s = s, .b = b, .out = out, .n = B};
        j.pieces = nn_pool_ranges((size_t)B * s->oc, 8, 2 * nn_pool_threads(p));
        nn_pool_run(p, j.pieces, bias_piece, &j);
    }
}

void nn_conv2d_backward(nn_pool *p, float *din, float *dw, float *db, float *col, const float *dout,
                        const float *in, const float *w, int B, const nn_conv_shape *s)
{
    int ohw = s->oh * s->ow;
    int ckk = s->c * s->kh * s->kw;
    size_t in_sz = (size_t)s->c * s->h * s->w, out_sz = (size_t)s->oc * ohw;
    int g = group_size(s, B);
    /* 3x3 stride 1: the input gradient goes through Winograd after the loop */
    int wg = din && nn_winograd_backward_applies(s);
    float *din_gemm = wg ? NULL : din;
    if (db) {
        struct conv_job j = {.s = s, .col = dout, .dst = db, .out_sz = out_sz, .n = B};
        j.pieces = nn_pool_ranges((size_t)s->oc, 4, 2 * nn_pool_threads(p));
        nn_pool_run(p, j.pieces, db_piece, &j);
    }
    for (int b0 = 0; b0 < B; b0 += g) {
        int n = B - b0 < g ? B - b0 : g;
        size_t ld = (size_t)ohw * n;
        const float *gr = dout + b0 * out_sz; /* [oc, ld] */
        if (n > 1) {
            float *stage = col + (size_t)ckk * ld;
            for (int i = 0; i < n; i++)
                for (int o = 0; o < s->oc; o++)
                    memcpy(stage + o * ld + (size_t)i * ohw,
                           dout + (b0 + i) * out_sz + (size_t)o * ohw, sizeof(float) * ohw);
            gr = stage;
        }
        int direct = n == 1 && is_pointwise(s);
        if (dw) {
            const float *src = in + b0 * in_sz;
            if (!direct) {
                im2col_group(p, col, ld, src, n, s);
                src = col;
            }
            nn_pool_sgemm(p, CblasNoTrans, CblasTrans, s->oc, ckk, (int)ld, 1.0f, gr, (int)ld, src,
                          (int)ld, 1.0f, dw, ckk);
        }
        if (din_gemm) {
            if (direct) {
                nn_pool_sgemm(p, CblasTrans, CblasNoTrans, ckk, ohw, s->oc, 1.0f, w, ckk, gr, ohw,
                              1.0f, din_gemm + b0 * in_sz, ohw);
                continue;
            }
            nn_pool_sgemm(p, CblasTrans, CblasNoTrans, ckk, (int)ld, s->oc, 1.0f, w, ckk, gr,
                          (int)ld, 0.0f, col, (int)ld);
            struct conv_job j = {
                .s = s, .col = col, .out = din_gemm + b0 * in_sz, .ld = ld, .in_sz = in_sz};
            nn_pool_run(p, n, col2im_image, &j);
        }
    }
    if (wg) nn_winograd_backward_data(p, din, col, dout, w, B, s);
}

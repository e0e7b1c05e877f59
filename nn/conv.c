/* nn/conv.c: 2-D convolution on the CPU through im2col + OpenBLAS sgemm,
 * handing 3x3 stride-1 layers to Winograd (winograd.c) where it applies.
 *
 * A batch is cut into groups of images whose columns fit one GEMM of a useful
 * width: late VGG layers have only 8x8 or 4x4 outputs per image, and a GEMM
 * with N = 16 runs far below peak, so those layers put several images side
 * by side in the column buffer and scatter the result back to NCHW. */
#include "layers.h"

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

/* col [c*kh*kw, ld] (the first oh*ow columns) <- patches of one image [c,h,w]. */
static void im2col(float *col, size_t ld, const float *in, const nn_conv_shape *s)
{
    for (int ci = 0; ci < s->c; ci++) {
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

void nn_conv2d_forward(float *out, float *col, const float *in, const float *w, const float *b,
                       int B, const nn_conv_shape *s)
{
    if (nn_winograd_applies(s))
        nn_winograd_forward(out, col, in, w, b, B, s);
    else
        nn_conv2d_forward_im2col(out, col, in, w, b, B, s);
}

void nn_conv2d_forward_im2col(float *out, float *col, const float *in, const float *w,
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
                im2col(col, ohw, src, s);
                src = col;
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, s->oc, ohw, ckk, 1.0f, w, ckk,
                        src, ohw, 0.0f, out + b0 * out_sz, ohw);
            continue;
        }
        size_t ld = (size_t)ohw * n;
        for (int i = 0; i < n; i++) {
            const float *src = in + (b0 + i) * in_sz;
            if (is_pointwise(s)) {
                for (int ci = 0; ci < s->c; ci++)
                    memcpy(col + ci * ld + (size_t)i * ohw, src + (size_t)ci * ohw,
                           sizeof(float) * ohw);
            } else {
                /* im2col writes rows of width ohw at stride ld */
                float *dst = col + (size_t)i * ohw;
                im2col(dst, ld, src, s);
            }
        }
        float *stage = col + (size_t)ckk * ld;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, s->oc, (int)ld, ckk, 1.0f, w, ckk,
                    col, (int)ld, 0.0f, stage, (int)ld);
        for (int i = 0; i < n; i++)
            for (int o = 0; o < s->oc; o++)
                memcpy(out + (b0 + i) * out_sz + (size_t)o * ohw, stage + o * ld + (size_t)i * ohw,
                       sizeof(float) * ohw);
    }
    if (b) {
        for (int bi = 0; bi < B; bi++)
            for (int o = 0; o < s->oc; o++) {
                float *p = out + bi * out_sz + (size_t)o * ohw, bo = b[o];
                for (int i = 0; i < ohw; i++)
                    p[i] += bo;
            }
    }
}

void nn_conv2d_backward(float *din, float *dw, float *db, float *col, const float *dout,
                        const float *in, const float *w, int B, const nn_conv_shape *s)
{
    int ohw = s->oh * s->ow;
    int ckk = s->c * s->kh * s->kw;
    size_t in_sz = (size_t)s->c * s->h * s->w, out_sz = (size_t)s->oc * ohw;
    int g = group_size(s, B);
    /* 3x3 stride 1: the input gradient goes through Winograd after the loop */
    int wg = din && nn_winograd_backward_applies(s);
    float *din_gemm = wg ? NULL : din;
    if (db)
        for (int bi = 0; bi < B; bi++)
            for (int o = 0; o < s->oc; o++) {
                const float *p = dout + bi * out_sz + (size_t)o * ohw;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int i = 0; i < ohw; i++)
                    acc += p[i];
                db[o] += acc;
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
                for (int i = 0; i < n; i++)
                    im2col(col + (size_t)i * ohw, ld, src + i * in_sz, s);
                src = col;
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s->oc, ckk, (int)ld, 1.0f, gr,
                        (int)ld, src, (int)ld, 1.0f, dw, ckk);
        }
        if (din_gemm) {
            if (direct) {
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, ckk, ohw, s->oc, 1.0f, w, ckk,
                            gr, ohw, 1.0f, din_gemm + b0 * in_sz, ohw);
                continue;
            }
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, ckk, (int)ld, s->oc, 1.0f, w, ckk,
                        gr, (int)ld, 0.0f, col, (int)ld);
            for (int i = 0; i < n; i++)
                col2im(din_gemm + (b0 + i) * in_sz, col + (size_t)i * ohw, ld, s);
        }
    }
    if (wg) nn_winograd_backward_data(din, col, dout, w, B, s);
}

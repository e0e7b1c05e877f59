/* nn/winograd.c: 3x3 stride-1 convolution by Winograd F(2x2, 3x3).
 *
 * Each 2x2 output tile comes from a 4x4 input tile: V = B^T d B per input
 * channel, U = G g G^T per filter, then for each of the 16 points of the
 * transformed tile one GEMM M = U V over the channels, and Y = A^T M A.
 * That is 16 multiplies per tile and channel pair instead of 36, so the GEMMs
 * do 2.25 times less arithmetic than im2col's; the transforms are cheap
 * linear passes. Images are grouped so that the GEMMs stay wide on the small
 * late layers, as in conv.c. */
#include "layers.h"
#include "pool.h"

#include <cblas.h>
#include <string.h>

/* Tiles (columns of the 16 GEMMs) per group that keep OpenBLAS near peak. */
#define WG_MIN_TILES 512
/* The transforms run in at most this many pieces at once, each with its own
 * scratch in the workspace (nothing here allocates). */
#define WG_PIECES 16

int nn_winograd_applies(const nn_conv_shape *s)
{
    /* the first layer (3 channels) is a poor GEMM either way; im2col is simpler there */
    return s->kh == 3 && s->kw == 3 && s->stride == 1 && s->pad == 1 && s->c >= 16;
}

static int tiles(const nn_conv_shape *s)
{
    return ((s->oh + 1) / 2) * ((s->ow + 1) / 2);
}

static int wg_group(const nn_conv_shape *s, int B)
{
    int t = tiles(s), g = (WG_MIN_TILES + t - 1) / t;
    return g > B ? (B > 0 ? B : 1) : g;
}

/* Scratch after U, V and M: four padded input rows and their B^T rows for
 * the input transform; two output rows for the output transform. */
static size_t scratch_size(const nn_conv_shape *s)
{
    size_t tw = (size_t)(s->ow + 1) / 2;
    return 8 * (2 * tw + 2) + 8 * tw;
}

size_t nn_winograd_ws_size(const nn_conv_shape *s, int B)
{
    size_t nt = (size_t)tiles(s) * wg_group(s, B);
    return 16 * ((size_t)s->oc * s->c + (size_t)s->c * nt + (size_t)s->oc * nt) +
           WG_PIECES * scratch_size(s);
}

/* U [16][oc][c] = G g G^T for every filter g [3][3] of w [oc][c][3][3].
 * flip: w is [c][oc][3][3] and each filter is rotated by 180 degrees, which
 * turns the weights of a convolution into those of its backward-data pass. */
static void transform_weights(float *U, const float *w, int oc, int c, int flip, size_t k0,
                              size_t k1)
{
    size_t plane = (size_t)oc * c;
    for (size_t k = k0; k < k1; k++) {
        float f[9];
        const float *g = w + 9 * k;
        if (flip) {
            size_t o = k / c, ci = k % c; /* U's filter k is w[ci][o], rotated */
            const float *src = w + 9 * (ci * oc + o);
            for (int j = 0; j < 9; j++)
                f[j] = src[8 - j];
            g = f;
        }
        float t[4][3]; /* G g */
        for (int j = 0; j < 3; j++) {
            t[0][j] = g[j];
            t[1][j] = 0.5f * (g[j] + g[3 + j] + g[6 + j]);
            t[2][j] = 0.5f * (g[j] - g[3 + j] + g[6 + j]);
            t[3][j] = g[6 + j];
        }
        for (int i = 0; i < 4; i++) {
            float u[4] = {t[i][0], 0.5f * (t[i][0] + t[i][1] + t[i][2]),
                          0.5f * (t[i][0] - t[i][1] + t[i][2]), t[i][2]};
            for (int j = 0; j < 4; j++)
                U[(size_t)(4 * i + j) * plane + k] = u[j];
        }
    }
}

/* V [16][c][ld] at column col0 <- B^T d B for every tile of channels
 * [c0, c1) of one image [c, h, w].
 * Works a row of tiles at a time: B^T over the four input rows for all
 * columns at once, then B over each tile's four columns, so that every inner
 * loop runs along a row and vectorises. */
static void transform_input(float *V, size_t ld, size_t col0, const float *in,
                            const nn_conv_shape *s, int c0, int c1, float *scratch)
{
    int th = (s->oh + 1) / 2, tw = (s->ow + 1) / 2, W = s->w;
    int pw = 2 * tw + 2; /* padded row: column x of the image at x + 1 */
    size_t plane = (size_t)s->c * ld;
    float *d[4], *t[4];
    for (int k = 0; k < 4; k++) {
        d[k] = scratch + k * pw;
        t[k] = scratch + (4 + k) * pw;
    }
    for (int ci = c0; ci < c1; ci++) {
        const float *src = in + (size_t)ci * s->h * W;
        for (int ty = 0; ty < th; ty++) {
            for (int k = 0; k < 4; k++) {
                int y = 2 * ty - 1 + k;
                memset(d[k], 0, sizeof(float) * pw);
                if (y >= 0 && y < s->h) memcpy(d[k] + 1, src + (size_t)y * W, sizeof(float) * W);
            }
            for (int x = 0; x < pw; x++) {
                t[0][x] = d[0][x] - d[2][x];
                t[1][x] = d[1][x] + d[2][x];
                t[2][x] = d[2][x] - d[1][x];
                t[3][x] = d[1][x] - d[3][x];
            }
            float *v0 = V + (size_t)ci * ld + col0 + (size_t)ty * tw;
            for (int k = 0; k < 4; k++) {
                const float *tk = t[k];
                float *a = v0 + (size_t)(4 * k) * plane, *b = a + plane, *c = b + plane,
                      *e = c + plane;
                for (int tx = 0; tx < tw; tx++) {
                    const float *p = tk + 2 * tx;
                    a[tx] = p[0] - p[2];
                    b[tx] = p[1] + p[2];
                    c[tx] = p[2] - p[1];
                    e[tx] = p[1] - p[3];
                }
            }
        }
    }
}

/* out [oc, oh, ow] of one image, channels [o0, o1) <- A^T m A (+ bias) from
 * M [16][oc][ld] at col0, a row of tiles at a time. */
static void transform_output(float *out, const float *M, size_t ld, size_t col0, const float *b,
                             const nn_conv_shape *s, int o0, int o1, float *scratch, int accumulate)
{
    int th = (s->oh + 1) / 2, tw = (s->ow + 1) / 2;
    size_t plane = (size_t)s->oc * ld;
    float *y0 = scratch, *y1 = scratch + 2 * tw + 2; /* two output rows of 2*tw */
    float *a[4], *c[4];
    for (int q = 0; q < 4; q++) {
        a[q] = y1 + 2 * tw + 2 + (size_t)q * tw;
        c[q] = a[q] + 4 * (size_t)tw;
    }
    for (int o = o0; o < o1; o++) {
        float *dst = out + (size_t)o * s->oh * s->ow, bias = b ? b[o] : 0.0f;
        for (int ty = 0; ty < th; ty++) {
            const float *m = M + (size_t)o * ld + col0 + (size_t)ty * tw;
            /* A^T m: row 0 (a) and row 1 (c) of the 2x4 product, column by column */
            for (int q = 0; q < 4; q++) {
                const float *r0 = m + q * plane, *r1 = r0 + 4 * plane, *r2 = r1 + 4 * plane,
                            *r3 = r2 + 4 * plane;
                float *aq = a[q], *cq = c[q];
                for (int tx = 0; tx < tw; tx++) {
                    aq[tx] = r0[tx] + r1[tx] + r2[tx];
                    cq[tx] = r1[tx] - r2[tx] - r3[tx];
                }
            }
            /* times A */
            for (int tx = 0; tx < tw; tx++) {
                y0[2 * tx] = a[0][tx] + a[1][tx] + a[2][tx] + bias;
                y0[2 * tx + 1] = a[1][tx] - a[2][tx] - a[3][tx] + bias;
                y1[2 * tx] = c[0][tx] + c[1][tx] + c[2][tx] + bias;
                y1[2 * tx + 1] = c[1][tx] - c[2][tx] - c[3][tx] + bias;
            }
            int oy = 2 * ty;
            for (int r = 0; r < 2 && oy + r < s->oh; r++) {
                float *d = dst + (size_t)(oy + r) * s->ow;
                const float *y = r ? y1 : y0;
                if (accumulate)
                    for (int x = 0; x < s->ow; x++)
                        d[x] += y[x];
                else
                    memcpy(d, y, sizeof(float) * s->ow);
            }
        }
    }
}

/* One group of images on the pool: the input transform in pieces of
 * (image, channel) pairs, the 16 GEMMs one per task (each on one thread),
 * the output transform in pieces of (image, output channel) pairs. */
struct wg_job {
    const nn_conv_shape *s;
    const float *w, *in, *b;
    float *out, *U, *V, *M, *scratch;
    size_t ld, in_sz, out_sz, sstride;
    int t, b0, n, pieces, accumulate, flip;
};

static void input_channels(const void *arg, int i, int img, int c0, int c1)
{
    const struct wg_job *j = arg;
    transform_input(j->V, j->ld, (size_t)img * j->t, j->in + (j->b0 + img) * j->in_sz, j->s, c0, c1,
                    j->scratch + (size_t)i * j->sstride);
}

static void input_piece(void *arg, int i)
{
    const struct wg_job *j = arg;
    nn_pool_range_pairs((size_t)j->n, j->s->c, j->pieces, i, input_channels, j);
}

static void gemm_point(void *arg, int k)
{
    const struct wg_job *j = arg;
    const nn_conv_shape *s = j->s;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, s->oc, (int)j->ld, s->c, 1.0f,
                j->U + (size_t)k * s->oc * s->c, s->c, j->V + (size_t)k * s->c * j->ld, (int)j->ld,
                0.0f, j->M + (size_t)k * s->oc * j->ld, (int)j->ld);
}

static void output_channels(const void *arg, int i, int img, int o0, int o1)
{
    const struct wg_job *j = arg;
    transform_output(j->out + (j->b0 + img) * j->out_sz, j->M, j->ld, (size_t)img * j->t, j->b,
                     j->s, o0, o1, j->scratch + (size_t)i * j->sstride, j->accumulate);
}

static void output_piece(void *arg, int i)
{
    const struct wg_job *j = arg;
    nn_pool_range_pairs((size_t)j->n, j->s->oc, j->pieces, i, output_channels, j);
}

static void weights_piece(void *arg, int i)
{
    const struct wg_job *j = arg;
    size_t lo, hi;
    nn_pool_range((size_t)j->s->oc * j->s->c, j->pieces, i, &lo, &hi);
    transform_weights(j->U, j->w, j->s->oc, j->s->c, j->flip, lo, hi);
}

/* U <- the transformed weights, then out (+)= the convolution of in. */
static void run(nn_pool *p, float *out, float *ws, const float *in, const float *w, int flip,
                const float *b, int B, const nn_conv_shape *s, int accumulate)
{
    int t = tiles(s), g = wg_group(s, B);
    int T = nn_pool_threads(p), pieces = 2 * T < WG_PIECES ? 2 * T : WG_PIECES;
    struct wg_job j = {.s = s,
                       .w = w,
                       .in = in,
                       .b = b,
                       .out = out,
                       .t = t,
                       .accumulate = accumulate,
                       .flip = flip};
    j.in_sz = (size_t)s->c * s->h * s->w;
    j.out_sz = (size_t)s->oc * s->oh * s->ow;
    j.U = ws;
    j.V = j.U + 16 * (size_t)s->oc * s->c;
    j.M = j.V + 16 * (size_t)s->c * t * g;
    j.scratch = j.M + 16 * (size_t)s->oc * t * g;
    j.sstride = scratch_size(s);
    j.pieces = nn_pool_ranges((size_t)s->oc * s->c, 256, pieces);
    nn_pool_run(p, j.pieces, weights_piece, &j);
    for (int b0 = 0; b0 < B; b0 += g) {
        j.b0 = b0;
        j.n = B - b0 < g ? B - b0 : g;
        j.ld = (size_t)t * j.n;
        j.pieces = nn_pool_ranges((size_t)j.n * s->c, 1, pieces);
        nn_pool_run(p, j.pieces, input_piece, &j);
        nn_pool_run(p, 16, gemm_point, &j);
        j.pieces = nn_pool_ranges((size_t)j.n * s->oc, 1, pieces);
        nn_pool_run(p, j.pieces, output_piece, &j);
    }
}

void nn_winograd_forward(nn_pool *p, float *out, float *ws, const float *in, const float *w,
                         const float *b, int B, const nn_conv_shape *s)
{
    run(p, out, ws, in, w, 0, b, B, s, 0);
}

/* Geometry of the backward-data pass of s, itself a 3x3 stride-1 convolution. */
static nn_conv_shape transposed(const nn_conv_shape *s)
{
    nn_conv_shape t;
    nn_conv_shape_init(&t, s->oc, s->oh, s->ow, s->c, 3, 1, 1);
    return t;
}

int nn_winograd_backward_applies(const nn_conv_shape *s)
{
    nn_conv_shape t = transposed(s);
    return s->kh == 3 && s->kw == 3 && s->stride == 1 && s->pad == 1 && nn_winograd_applies(&t);
}

size_t nn_winograd_backward_ws_size(const nn_conv_shape *s, int B)
{
    nn_conv_shape t = transposed(s);
    return nn_winograd_ws_size(&t, B);
}

void nn_winograd_backward_data(nn_pool *p, float *din, float *ws, const float *dout, const float *w,
                               int B, const nn_conv_shape *s)
{
    nn_conv_shape t = transposed(s);
    run(p, din, ws, dout, w, 1, NULL, B, &t, 1);
}

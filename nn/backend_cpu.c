/* nn/backend_cpu.c: the CPU backend table (OpenBLAS): host memory and thin
 * wrappers around the reference kernels of layers.h. The context is the
 * model's worker pool (pool.h): the element-wise layers run on it in
 * contiguous pieces, the convolutions and batch-norm take it along. */
#include "backend.h"
#include "nn.h"
#include "pool.h"

#include <stdlib.h>
#include <string.h>

static int cpu_init(void **ctx, int flags, char *err, size_t errlen)
{
    (void)flags, (void)err, (void)errlen;
    *ctx = NULL;
    return 0;
}

static void cpu_release(void *ctx)
{
    (void)ctx;
}

static int cpu_status(void *ctx, char *err, size_t errlen)
{
    (void)ctx, (void)err, (void)errlen;
    return 0;
}

static void *cpu_alloc(void *ctx, size_t bytes)
{
    (void)ctx;
    return malloc(bytes ? bytes : 1);
}

static void cpu_dealloc(void *ctx, void *p)
{
    (void)ctx;
    free(p);
}

static void cpu_memcpy(void *ctx, void *dst, const void *src, size_t bytes)
{
    (void)ctx;
    if (dst != src) memcpy(dst, src, bytes);
}

/* Element-wise work in pieces: a job of n items (floats, bytes or planes),
 * fn called on each piece's range [lo, hi). Below this many floats a piece is
 * not worth a wake-up. */
#define CPU_MIN_PIECE 32768

struct ew_job {
    float *dst, *m, *v;
    unsigned char *raw;
    const nn_adam_hyper *h;
    const float *a, *b;
    int32_t *idx;
    const int32_t *cidx;
    size_t n;
    int pieces, H, W, k, stride, S;
    void (*fn)(const struct ew_job *j, size_t lo, size_t hi);
};

static void ew_piece(void *arg, int i)
{
    const struct ew_job *j = arg;
    size_t lo, hi;
    nn_pool_range(j->n, j->pieces, i, &lo, &hi);
    if (hi > lo) j->fn(j, lo, hi);
}

/* Runs j->fn over [0, n) in pieces of at least min items (planes, or floats). */
static void ew_run(void *ctx, struct ew_job *j, size_t min)
{
    j->pieces = nn_pool_ranges(j->n, min, nn_pool_threads(ctx));
    nn_pool_run(ctx, j->pieces, ew_piece, j);
}

/* Planes of H x W (or S) floats per item, for the pooling layers. */
static size_t planes_min(size_t plane)
{
    return plane >= CPU_MIN_PIECE ? 1 : CPU_MIN_PIECE / (plane ? plane : 1);
}

static void zero_range(const struct ew_job *j, size_t lo, size_t hi)
{
    memset(j->raw + lo, 0, hi - lo);
}

/* Zeroing the gradient buffers (tens of MB per layer in training) is memory
 * bound, and still gains from a second core. */
static void cpu_zero(void *ctx, void *dst, size_t bytes)
{
    ew_run(ctx, &(struct ew_job){.raw = dst, .n = bytes, .fn = zero_range},
           CPU_MIN_PIECE * sizeof(float));
}

static void add_range(const struct ew_job *j, size_t lo, size_t hi)
{
    float *restrict d = j->dst;
    const float *restrict a = j->a;
    for (size_t i = lo; i < hi; i++)
        d[i] += a[i];
}

static void cpu_add(void *ctx, float *dst, const float *src, size_t n)
{
    ew_run(ctx, &(struct ew_job){.dst = dst, .a = src, .n = n, .fn = add_range}, CPU_MIN_PIECE);
}

static void conv_fwd(void *ctx, float *out, float *col, const float *in, const float *w,
                     const float *b, int B, const nn_conv_shape *s)
{
    nn_conv2d_forward(ctx, out, col, in, w, b, B, s);
}

static void conv_bwd(void *ctx, float *din, float *dw, float *db, float *col, const float *dout,
                     const float *in, const float *w, int B, const nn_conv_shape *s)
{
    nn_conv2d_backward(ctx, din, dw, db, col, dout, in, w, B, s);
}

/* Max-pool by planes: the argmax offsets are inside each plane. */
static size_t pool_out(const struct ew_job *j)
{
    return (size_t)((j->H - j->k) / j->stride + 1) * ((j->W - j->k) / j->stride + 1);
}

static void pool_fwd_range(const struct ew_job *j, size_t lo, size_t hi)
{
    size_t ip = (size_t)j->H * j->W, op = pool_out(j);
    nn_maxpool_forward(j->dst + lo * op, j->idx ? j->idx + lo * op : NULL, j->a + lo * ip, 1,
                       (int)(hi - lo), j->H, j->W, j->k, j->stride);
}

static void pool_fwd(void *ctx, float *out, int32_t *idx, const float *in, int B, int C, int H,
                     int W, int k, int stride)
{
    struct ew_job j = {.dst = out,
                       .idx = idx,
                       .a = in,
                       .n = (size_t)B * C,
                       .H = H,
                       .W = W,
                       .k = k,
                       .stride = stride,
                       .fn = pool_fwd_range};
    ew_run(ctx, &j, planes_min((size_t)H * W));
}

static void pool_bwd_range(const struct ew_job *j, size_t lo, size_t hi)
{
    size_t ip = (size_t)j->H * j->W, op = pool_out(j);
    nn_maxpool_backward(j->dst + lo * ip, j->a + lo * op, j->cidx + lo * op, 1, (int)(hi - lo),
                        j->H, j->W, j->k, j->stride);
}

static void pool_bwd(void *ctx, float *din, const float *dout, const int32_t *idx, int B, int C,
                     int H, int W, int k, int stride)
{
    struct ew_job j = {.dst = din,
                       .a = dout,
                       .cidx = idx,
                       .n = (size_t)B * C,
                       .H = H,
                       .W = W,
                       .k = k,
                       .stride = stride,
                       .fn = pool_bwd_range};
    ew_run(ctx, &j, planes_min((size_t)H * W));
}

static void relu_fwd_range(const struct ew_job *j, size_t lo, size_t hi)
{
    nn_relu_forward(j->dst + lo, j->a + lo, hi - lo);
}

static void relu_fwd(void *ctx, float *out, const float *in, size_t n)
{
    ew_run(ctx, &(struct ew_job){.dst = out, .a = in, .n = n, .fn = relu_fwd_range}, CPU_MIN_PIECE);
}

static void relu_bwd_range(const struct ew_job *j, size_t lo, size_t hi)
{
    nn_relu_backward(j->dst + lo, j->a + lo, j->b + lo, hi - lo);
}

static void relu_bwd(void *ctx, float *din, const float *dout, const float *out, size_t n)
{
    ew_run(ctx, &(struct ew_job){.dst = din, .a = dout, .b = out, .n = n, .fn = relu_bwd_range},
           CPU_MIN_PIECE);
}

static void bn_fwd(void *ctx, float *out, float *mean, float *rstd, float *rm, float *rv,
                   const float *in, const float *gamma, const float *beta, int B, int C, int S,
                   int training, float momentum, float eps)
{
    nn_batchnorm_forward(ctx, out, mean, rstd, rm, rv, in, gamma, beta, B, C, S, training, momentum,
                         eps);
}

static void bn_bwd(void *ctx, float *din, float *dgamma, float *dbeta, const float *dout,
                   const float *in, const float *mean, const float *rstd, const float *gamma, int B,
                   int C, int S, int training, float eps)
{
    (void)eps;
    nn_batchnorm_backward(ctx, din, dgamma, dbeta, dout, in, mean, rstd, gamma, B, C, S, training);
}

static void lin_fwd(void *ctx, float *out, const float *in, const float *w, const float *b, int N,
                    int IC, int OC)
{
    (void)ctx;
    nn_linear_forward(out, in, w, b, N, IC, OC);
}

static void lin_bwd(void *ctx, float *din, float *dw, float *db, const float *dout, const float *in,
                    const float *w, int N, int IC, int OC)
{
    (void)ctx;
    nn_linear_backward(din, dw, db, dout, in, w, N, IC, OC);
}

static void drop_fwd(void *ctx, float *out, float *mask, const float *in, size_t n, float p,
                     uint64_t *rng)
{
    (void)ctx;
    nn_dropout_forward(out, mask, in, n, p, rng);
}

static void drop_bwd_range(const struct ew_job *j, size_t lo, size_t hi)
{
    nn_dropout_backward(j->dst + lo, j->a + lo, j->b + lo, hi - lo);
}

static void drop_bwd(void *ctx, float *din, const float *dout, const float *mask, size_t n)
{
    ew_run(ctx, &(struct ew_job){.dst = din, .a = dout, .b = mask, .n = n, .fn = drop_bwd_range},
           CPU_MIN_PIECE);
}

static void gap_fwd_range(const struct ew_job *j, size_t lo, size_t hi)
{
    nn_gap_forward(j->dst + lo, j->a + lo * j->S, 1, (int)(hi - lo), j->S);
}

static void gap_fwd(void *ctx, float *out, const float *in, int B, int C, int S)
{
    struct ew_job j = {.dst = out, .a = in, .n = (size_t)B * C, .S = S, .fn = gap_fwd_range};
    ew_run(ctx, &j, planes_min((size_t)S));
}

static void gap_bwd_range(const struct ew_job *j, size_t lo, size_t hi)
{
    nn_gap_backward(j->dst + lo * j->S, j->a + lo, 1, (int)(hi - lo), j->S);
}

static void gap_bwd(void *ctx, float *din, const float *dout, int B, int C, int S)
{
    struct ew_job j = {.dst = din, .a = dout, .n = (size_t)B * C, .S = S, .fn = gap_bwd_range};
    ew_run(ctx, &j, planes_min((size_t)S));
}

static float bce(void *ctx, float *dlogits, const float *logits, const float *targets,
                 const float *label_w, const float *pos_w, int N, int L)
{
    (void)ctx;
    return nn_bce_logits(dlogits, logits, targets, label_w, pos_w, N, L);
}

static void lstm_fwd(void *ctx, float *out, float *cache, const float *x, const nn_lstm_params *p,
                     const int *len, int S, int F, int H)
{
    (void)ctx;
    nn_lstm_forward(out, cache, x, p, len, S, F, H);
}

static void lstm_bwd(void *ctx, float *dx, const nn_lstm_grads *g, float *work, const float *dout,
                     const float *cache, const float *x, const nn_lstm_params *p, const int *len,
                     int S, int F, int H)
{
    (void)ctx;
    nn_lstm_backward(dx, g, work, dout, cache, x, p, len, S, F, H);
}

static void adam_range(const struct ew_job *j, size_t lo, size_t hi)
{
    nn_adam_update(j->dst + lo, j->a + lo, j->m + lo, j->v + lo, hi - lo, j->h);
}

static void adam(void *ctx, float *p, const float *g, float *m, float *v, size_t n,
                 const nn_adam_hyper *h)
{
    struct ew_job j = {.dst = p, .a = g, .m = m, .v = v, .h = h, .n = n, .fn = adam_range};
    ew_run(ctx, &j, CPU_MIN_PIECE);
}

static const nn_backend cpu = {
    .name = "cpu",
    .init = cpu_init,
    .release = cpu_release,
    .status = cpu_status,
    .fold_bn = 1,
    .alloc = cpu_alloc,
    .dealloc = cpu_dealloc,
    .upload = cpu_memcpy,
    .download = cpu_memcpy,
    .copy = cpu_memcpy,
    .zero = cpu_zero,
    .add = cpu_add,
    .conv2d_col_size = nn_conv2d_col_size,
    .conv2d_forward = conv_fwd,
    .conv2d_backward = conv_bwd,
    .maxpool_forward = pool_fwd,
    .maxpool_backward = pool_bwd,
    .relu_forward = relu_fwd,
    .relu_backward = relu_bwd,
    .batchnorm_forward = bn_fwd,
    .batchnorm_backward = bn_bwd,
    .linear_forward = lin_fwd,
    .linear_backward = lin_bwd,
    .dropout_forward = drop_fwd,
    .dropout_backward = drop_bwd,
    .gap_forward = gap_fwd,
    .gap_backward = gap_bwd,
    .bce_logits = bce,
    .lstm_cache_size = nn_lstm_cache_size,
    .lstm_work_size = nn_lstm_work_size,
    .lstm_forward = lstm_fwd,
    .lstm_backward = lstm_bwd,
    .adam_update = adam,
};

const nn_backend *nn_backend_cpu(void)
{
    return &cpu;
}

int nn_backend_count(void)
{
    return nn_backend_cuda() ? 2 : 1;
}

const nn_backend *nn_backend_at(int i)
{
    if (i == 0) return &cpu;
    return i == 1 ? nn_backend_cuda() : NULL;
}

/* nn/cuda/backend_cuda.c: the CUDA backend table (issue 11): device memory,
 * convolution, batch-norm and the bidirectional LSTM through cuDNN, linear
 * layers through cuBLAS, the rest as the small kernels of kernels.cu. One
 * stream per context; every op is queued on it and the model synchronises
 * when results come back to the host (download, status).
 *
 * Precision: with NN_BACKEND_FP32 (tests) convolutions and the LSTM run with
 * CUDNN_FMA_MATH and only algorithms reporting it are accepted; otherwise
 * (production) cuDNN may use TF32 tensor cores as PyTorch does by default
 * (torch.backends.cudnn.allow_tf32). cuBLAS always runs plain fp32
 * (CUBLAS_DEFAULT_MATH), again PyTorch's default for matrix products. */
#include "backend.h"
#include "err.h"
#include "kernels.h"
#include "nn.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cudnn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* cuDNN 9 marks its legacy convolution, algorithm-search and batch-norm
 * calls deprecated in favour of the graph API; they remain supported in
 * cuDNN 9 and are the calls this backend is written and tested against. */
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

#define CONV_PLANS 128             /* shapes (with batch size) whose algorithms are kept */
#define FIND_ALGOS 8               /* candidates asked of cudnnFind* */
#define WS_LIMIT ((size_t)4 << 30) /* the largest cuDNN workspace an algorithm may want */
#define SPLITMIX_GAMMA 0x9e3779b97f4a7c15ULL

typedef struct conv_plan {
    nn_conv_shape s;
    int B;
    cudnnTensorDescriptor_t x, y, b;
    cudnnFilterDescriptor_t w;
    cudnnConvolutionDescriptor_t conv;
    int have_fwd, have_data, have_filter;
    cudnnConvolutionFwdAlgo_t fwd;
    cudnnConvolutionBwdDataAlgo_t data;
    cudnnConvolutionBwdFilterAlgo_t filter;
    cudnnMathType_t fwd_math, data_math, filter_math;
    size_t fwd_ws, data_ws, filter_ws;
} conv_plan;

/* The LSTM: one descriptor for the current (F, H), cuDNN's weight space
 * (filled from the model's PyTorch-layout tensors before each forward), and
 * the state one forward leaves for its backward. */
typedef struct rnn_state {
    int F, H;
    cudnnRNNDescriptor_t desc;
    cudnnDropoutDescriptor_t drop;
    cudnnRNNDataDescriptor_t xd, yd;
    cudnnTensorDescriptor_t hd;
    size_t wsize;
    float *w, *dw;
    size_t moff[2][8], boff[2][8]; /* floats into w of each gate's matrix and bias */
    void *reserve;
    size_t reserve_size, reserve_cap, work_size;
    float *xpad, *ypad, *dxpad, *dypad;
    size_t pad_cap;
    int32_t *rowmap, *seqlen_d;
    size_t map_cap;
    int32_t *rowmap_h;
    int *seqlen_h;
    size_t host_cap;
    int S, T;
} rnn_state;

typedef struct cuda_ctx {
    int fp32;
    int err;
    char msg[256];
    cudaStream_t stream;
    cudnnHandle_t dnn;
    cublasHandle_t blas;
    void *ws;
    size_t ws_size;
    conv_plan plans[CONV_PLANS];
    int nplans, next_plan;
    cudnnTensorDescriptor_t bnx, bnp;
    float *scratch;
    size_t scratch_cap;
    double *loss;
    rnn_state rnn;
} cuda_ctx;

/* ---- errors: the first one sticks, later ops become no-ops --------------- */

static int fail(cuda_ctx *c, const char *what, const char *why)
{
    if (!c->err) {
        c->err = NN_EIO;
        snprintf(c->msg, sizeof(c->msg), "cuda: %.150s: %.90s", what, why);
    }
    return -1;
}

static int ck_cuda(cuda_ctx *c, cudaError_t e, const char *what)
{
    return e == cudaSuccess ? 0 : fail(c, what, cudaGetErrorString(e));
}

static int ck_dnn(cuda_ctx *c, cudnnStatus_t e, const char *what)
{
    return e == CUDNN_STATUS_SUCCESS ? 0 : fail(c, what, cudnnGetErrorString(e));
}

static int ck_blas(cuda_ctx *c, cublasStatus_t e, const char *what)
{
    return e == CUBLAS_STATUS_SUCCESS ? 0 : fail(c, what, cublasGetStatusString(e));
}

#define CU(x) ck_cuda(c, (x), #x)
#define DNN(x) ck_dnn(c, (x), #x)
#define BLAS(x) ck_blas(c, (x), #x)

static const float one = 1.0f, zero = 0.0f;

/* Grows a device buffer to bytes; contents are not kept. */
static int grow(cuda_ctx *c, void **p, size_t *cap, size_t bytes)
{
    if (bytes <= *cap && *p) return 0;
    if (*p) cudaFree(*p);
    *p = NULL;
    *cap = 0;
    if (CU(cudaMalloc(p, bytes ? bytes : 1))) return -1;
    *cap = bytes;
    return 0;
}

static int ensure_ws(cuda_ctx *c, size_t bytes)
{
    return grow(c, &c->ws, &c->ws_size, bytes);
}

static float *scratch(cuda_ctx *c, size_t n)
{
    size_t cap = c->scratch_cap * sizeof(float);
    if (grow(c, (void **)&c->scratch, &cap, n * sizeof(float))) return NULL;
    c->scratch_cap = cap / sizeof(float);
    return c->scratch;
}

/* ---- context ------------------------------------------------------------- */

static int cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* no driver or no device: not an error of anyone's */
        return 0;
    }
    return n;
}

static void cu_release(void *ctx)
{
    cuda_ctx *c = ctx;
    if (!c) return;
    if (c->stream) cudaStreamSynchronize(c->stream);
    for (int i = 0; i < c->nplans; i++) {
        conv_plan *p = &c->plans[i];
        cudnnDestroyTensorDescriptor(p->x);
        cudnnDestroyTensorDescriptor(p->y);
        cudnnDestroyTensorDescriptor(p->b);
        cudnnDestroyFilterDescriptor(p->w);
        cudnnDestroyConvolutionDescriptor(p->conv);
    }
    rnn_state *r = &c->rnn;
    if (r->desc) cudnnDestroyRNNDescriptor(r->desc);
    if (r->drop) cudnnDestroyDropoutDescriptor(r->drop);
    if (r->xd) cudnnDestroyRNNDataDescriptor(r->xd);
    if (r->yd) cudnnDestroyRNNDataDescriptor(r->yd);
    if (r->hd) cudnnDestroyTensorDescriptor(r->hd);
    void *dev[] = {r->w,     r->dw,     r->reserve,  r->xpad, r->ypad,    r->dxpad,
                   r->dypad, r->rowmap, r->seqlen_d, c->ws,   c->scratch, c->loss};
    for (size_t i = 0; i < sizeof(dev) / sizeof(dev[0]); i++)
        if (dev[i]) cudaFree(dev[i]);
    free(r->rowmap_h);
    free(r->seqlen_h);
    if (c->bnx) cudnnDestroyTensorDescriptor(c->bnx);
    if (c->bnp) cudnnDestroyTensorDescriptor(c->bnp);
    if (c->blas) cublasDestroy(c->blas);
    if (c->dnn) cudnnDestroy(c->dnn);
    if (c->stream) cudaStreamDestroy(c->stream);
    free(c);
}

static int cu_init(void **out, int flags, char *err, size_t errlen)
{
    *out = NULL;
    if (cuda_device_count() < 1) {
        nn_errf(err, errlen, "cuda: no GPU present (cudaGetDeviceCount found none)");
        return NN_EINVAL;
    }
    cuda_ctx *c = calloc(1, sizeof(*c));
    if (!c) {
        nn_errf(err, errlen, "out of memory");
        return NN_ENOMEM;
    }
    c->fp32 = (flags & NN_BACKEND_FP32) != 0;
    rnn_state *r = &c->rnn;
    if (!CU(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking)) &&
        !DNN(cudnnCreate(&c->dnn)) && !DNN(cudnnSetStream(c->dnn, c->stream)) &&
        !BLAS(cublasCreate(&c->blas)) && !BLAS(cublasSetStream(c->blas, c->stream)) &&
        !BLAS(cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH)) &&
        !DNN(cudnnCreateTensorDescriptor(&c->bnx)) && !DNN(cudnnCreateTensorDescriptor(&c->bnp)) &&
        !CU(cudaMalloc((void **)&c->loss, sizeof(double))) &&
        !DNN(cudnnCreateRNNDescriptor(&r->desc)) && !DNN(cudnnCreateDropoutDescriptor(&r->drop)) &&
        !DNN(cudnnSetDropoutDescriptor(r->drop, c->dnn, 0.0f, NULL, 0, 0)) &&
        !DNN(cudnnCreateRNNDataDescriptor(&r->xd)) && !DNN(cudnnCreateRNNDataDescriptor(&r->yd)))
        DNN(cudnnCreateTensorDescriptor(&r->hd));
    if (c->err) {
        nn_errf(err, errlen, "%s", c->msg);
        cu_release(c);
        return NN_EIO;
    }
    *out = c;
    return 0;
}

static int cu_status(void *ctx, char *err, size_t errlen)
{
    cuda_ctx *c = ctx;
    if (!c->err) {
        cudaError_t e = cudaStreamSynchronize(c->stream);
        if (e == cudaSuccess) e = cudaGetLastError();
        ck_cuda(c, e, "a queued kernel");
    }
    if (c->err && err) snprintf(err, errlen, "%s", c->msg);
    return c->err;
}

/* ---- memory -------------------------------------------------------------- */

static void *cu_alloc(void *ctx, size_t bytes)
{
    (void)ctx;
    void *p = NULL;
    if (cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess) {
        cudaGetLastError(); /* out of memory is reported as NULL, not as a sticky error */
        return NULL;
    }
    return p;
}

static void cu_dealloc(void *ctx, void *p)
{
    (void)ctx;
    if (p) cudaFree(p);
}

static void cu_upload(void *ctx, void *dst, const void *src, size_t bytes)
{
    cuda_ctx *c = ctx;
    if (c->err || !bytes) return;
    if (!CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream)))
        CU(cudaStreamSynchronize(c->stream));
}

static void cu_download(void *ctx, void *dst, const void *src, size_t bytes)
{
    cuda_ctx *c = ctx;
    if (c->err || !bytes) return;
    if (!CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream)))
        CU(cudaStreamSynchronize(c->stream));
}

static void cu_copy(void *ctx, void *dst, const void *src, size_t bytes)
{
    cuda_ctx *c = ctx;
    if (c->err || !bytes || dst == src) return;
    CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c->stream));
}

static void cu_zero(void *ctx, void *dst, size_t bytes)
{
    cuda_ctx *c = ctx;
    if (c->err || !bytes) return;
    CU(cudaMemsetAsync(dst, 0, bytes, c->stream));
}

static void cu_add(void *ctx, float *dst, const float *src, size_t n)
{
    cuda_ctx *c = ctx;
    if (!c->err) nnk_add(c->stream, dst, src, n);
}

/* ---- convolution (cuDNN) ------------------------------------------------- */

static size_t cu_col_size(const nn_conv_shape *s, int B)
{
    (void)s, (void)B;
    return 1;
}

/* The descriptors of shape s at batch B, made once and kept (the oldest
 * plan is reused when CONV_PLANS are in use). */
static conv_plan *plan_for(cuda_ctx *c, const nn_conv_shape *s, int B)
{
    for (int i = 0; i < c->nplans; i++)
        if (c->plans[i].B == B && memcmp(&c->plans[i].s, s, sizeof(*s)) == 0) return &c->plans[i];
    conv_plan *p;
    if (c->nplans < CONV_PLANS) {
        p = &c->plans[c->nplans];
        memset(p, 0, sizeof(*p));
        if (DNN(cudnnCreateTensorDescriptor(&p->x)) || DNN(cudnnCreateTensorDescriptor(&p->y)) ||
            DNN(cudnnCreateTensorDescriptor(&p->b)) || DNN(cudnnCreateFilterDescriptor(&p->w)) ||
            DNN(cudnnCreateConvolutionDescriptor(&p->conv)))
            return NULL;
        c->nplans++;
    } else {
        p = &c->plans[c->next_plan];
        c->next_plan = (c->next_plan + 1) % CONV_PLANS;
    }
    p->s = *s;
    p->B = -1; /* not usable until fully set */
    p->have_fwd = p->have_data = p->have_filter = 0;
    int n, ch, h, w;
    if (DNN(cudnnSetTensor4dDescriptor(p->x, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, B, s->c, s->h,
                                       s->w)) ||
        DNN(cudnnSetTensor4dDescriptor(p->y, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, B, s->oc, s->oh,
                                       s->ow)) ||
        DNN(cudnnSetTensor4dDescriptor(p->b, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, 1, s->oc, 1,
                                       1)) ||
        DNN(cudnnSetFilter4dDescriptor(p->w, CUDNN_DATA_FLOAT, CUDNN_TENSOR_NCHW, s->oc, s->c,
                                       s->kh, s->kw)) ||
        DNN(cudnnSetConvolution2dDescriptor(p->conv, s->pad, s->pad, s->stride, s->stride, 1, 1,
                                            CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT)) ||
        DNN(cudnnSetConvolutionMathType(p->conv, c->fp32 ? CUDNN_FMA_MATH : CUDNN_DEFAULT_MATH)) ||
        DNN(cudnnGetConvolution2dForwardOutputDim(p->conv, p->x, p->w, &n, &ch, &h, &w)))
        return NULL;
    if (n != B || ch != s->oc || h != s->oh || w != s->ow) {
        fail(c, "conv", "cuDNN's output shape differs from nn_conv_shape's");
        return NULL;
    }
    p->B = B;
    return p;
}

/* The fastest algorithm cudnnFind* measured that succeeded, fits WS_LIMIT
 * and, in fp32 mode, used plain FMA arithmetic. */
#define PICK(perf, got, dst_algo, dst_math, dst_ws, what)                                          \
    do {                                                                                           \
        int k_ = 0;                                                                                \
        while (k_ < (got) &&                                                                       \
               ((perf)[k_].status != CUDNN_STATUS_SUCCESS || (perf)[k_].memory > WS_LIMIT ||       \
                (c->fp32 && (perf)[k_].mathType != CUDNN_FMA_MATH)))                               \
            k_++;                                                                                  \
        if (k_ == (got)) return fail(c, what, "no usable algorithm");                              \
        (dst_algo) = (perf)[k_].algo;                                                              \
        (dst_math) = (perf)[k_].mathType;                                                          \
        (dst_ws) = (perf)[k_].memory;                                                              \
    } while (0)

static int find_fwd(cuda_ctx *c, conv_plan *p)
{
    cudnnConvolutionFwdAlgoPerf_t perf[FIND_ALGOS];
    int got = 0;
    if (DNN(cudnnFindConvolutionForwardAlgorithm(c->dnn, p->x, p->w, p->conv, p->y, FIND_ALGOS,
                                                 &got, perf)))
        return -1;
    PICK(perf, got, p->fwd, p->fwd_math, p->fwd_ws, "conv forward");
    p->have_fwd = 1;
    return 0;
}

static int find_data(cuda_ctx *c, conv_plan *p)
{
    cudnnConvolutionBwdDataAlgoPerf_t perf[FIND_ALGOS];
    int got = 0;
    if (DNN(cudnnFindConvolutionBackwardDataAlgorithm(c->dnn, p->w, p->y, p->conv, p->x, FIND_ALGOS,
                                                      &got, perf)))
        return -1;
    PICK(perf, got, p->data, p->data_math, p->data_ws, "conv backward data");
    p->have_data = 1;
    return 0;
}

static int find_filter(cuda_ctx *c, conv_plan *p)
{
    cudnnConvolutionBwdFilterAlgoPerf_t perf[FIND_ALGOS];
    int got = 0;
    if (DNN(cudnnFindConvolutionBackwardFilterAlgorithm(c->dnn, p->x, p->y, p->conv, p->w,
                                                        FIND_ALGOS, &got, perf)))
        return -1;
    PICK(perf, got, p->filter, p->filter_math, p->filter_ws, "conv backward filter");
    p->have_filter = 1;
    return 0;
}

static void cu_conv_fwd(void *ctx, float *out, float *col, const float *in, const float *w,
                        const float *b, int B, const nn_conv_shape *s)
{
    cuda_ctx *c = ctx;
    (void)col;
    if (c->err) return;
    conv_plan *p = plan_for(c, s, B);
    if (!p || (!p->have_fwd && find_fwd(c, p)) || ensure_ws(c, p->fwd_ws) ||
        DNN(cudnnSetConvolutionMathType(p->conv, p->fwd_math)) ||
        DNN(cudnnConvolutionForward(c->dnn, &one, p->x, in, p->w, w, p->conv, p->fwd, c->ws,
                                    p->fwd_ws, &zero, p->y, out)))
        return;
    if (b) DNN(cudnnAddTensor(c->dnn, &one, p->b, b, &one, p->y, out));
}

static void cu_conv_bwd(void *ctx, float *din, float *dw, float *db, float *col, const float *dout,
                        const float *in, const float *w, int B, const nn_conv_shape *s)
{
    cuda_ctx *c = ctx;
    (void)col;
    if (c->err) return;
    conv_plan *p = plan_for(c, s, B);
    if (!p) return;
    /* beta = 1: every gradient accumulates, as the CPU kernels do */
    if (db && DNN(cudnnConvolutionBackwardBias(c->dnn, &one, p->y, dout, &one, p->b, db))) return;
    if (dw && ((!p->have_filter && find_filter(c, p)) || ensure_ws(c, p->filter_ws) ||
               DNN(cudnnSetConvolutionMathType(p->conv, p->filter_math)) ||
               DNN(cudnnConvolutionBackwardFilter(c->dnn, &one, p->x, in, p->y, dout, p->conv,
                                                  p->filter, c->ws, p->filter_ws, &one, p->w, dw))))
        return;
    if (din && ((!p->have_data && find_data(c, p)) || ensure_ws(c, p->data_ws) ||
                DNN(cudnnSetConvolutionMathType(p->conv, p->data_math))))
        return;
    if (din)
        DNN(cudnnConvolutionBackwardData(c->dnn, &one, p->w, w, p->y, dout, p->conv, p->data, c->ws,
                                         p->data_ws, &one, p->x, din));
}

/* ---- pooling, activations, dropout (kernels.cu) ------------------------ */

static void cu_pool_fwd(void *ctx, float *out, int32_t *idx, const float *in, int B, int C, int H,
                        int W, int k, int stride)
{
    cuda_ctx *c = ctx;
    if (!c->err) nnk_maxpool_forward(c->stream, out, idx, in, B * C, H, W, k, stride);
}

static void cu_pool_bwd(void *ctx, float *din, const float *dout, const int32_t *idx, int B, int C,
                        int H, int W, int k, int stride)
{
    cuda_ctx *c = ctx;
    if (!c->err) nnk_maxpool_backward(c->stream, din, dout, idx, B * C, H, W, k, stride);
}

static void cu_relu_fwd(void *ctx, float *out, const float *in, size_t n)
{
    cuda_ctx *c = ctx;
    if (!c->err) nnk_relu_forward(c->stream, out, in, n);
}

static void cu_relu_bwd(void *ctx, float *din, const float *dout, const float *out, size_t n)
{
    cuda_ctx *c = ctx;
    if (!c->err) nnk_relu_backward(c->stream, din, dout, out, n);
}

static void cu_drop_fwd(void *ctx, float *out, float *mask, const float *in, size_t n, float p,
                        uint64_t *rng)
{
    cuda_ctx *c = ctx;
    if (c->err) return;
    nnk_dropout_forward(c->stream, out, mask, in, n, p, 1.0f / (1.0f - p), *rng);
    /* the CPU kernel draws one number per element, and only when p > 0 */
    if (p > 0.0f) *rng += (uint64_t)n * SPLITMIX_GAMMA;
}

static void cu_drop_bwd(void *ctx, float *din, const float *dout, const float *mask, size_t n)
{
    cuda_ctx *c = ctx;
    if (!c->err) nnk_dropout_backward(c->stream, din, dout, mask, n);
}

static void cu_gap_fwd(void *ctx, float *out, const float *in, int B, int C, int S)
{
    cuda_ctx *c = ctx;
    if (!c->err) nnk_gap_forward(c->stream, out, in, B * C, S);
}

static void cu_gap_bwd(void *ctx, float *din, const float *dout, int B, int C, int S)
{
    cuda_ctx *c = ctx;
    if (!c->err) nnk_gap_backward(c->stream, din, dout, B * C, S);
}

/* ---- batch-norm (cuDNN, spatial: statistics over B and S) -------------- */

static int bn_desc(cuda_ctx *c, int B, int C, int S)
{
    return DNN(cudnnSetTensor4dDescriptor(c->bnx, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, B, C, S,
                                          1)) ||
           DNN(cudnnDeriveBNTensorDescriptor(c->bnp, c->bnx, CUDNN_BATCHNORM_SPATIAL));
}

static void cu_bn_fwd(void *ctx, float *out, float *mean, float *rstd, float *rm, float *rv,
                      const float *in, const float *gamma, const float *beta, int B, int C, int S,
                      int training, float momentum, float eps)
{
    cuda_ctx *c = ctx;
    if (c->err || bn_desc(c, B, C, S)) return;
    if (training) {
        /* cuDNN keeps the running variance unbiased and saves 1/sqrt(var + eps),
         * as the CPU kernel and PyTorch do */
        DNN(cudnnBatchNormalizationForwardTraining(c->dnn, CUDNN_BATCHNORM_SPATIAL, &one, &zero,
                                                   c->bnx, in, c->bnx, out, c->bnp, gamma, beta,
                                                   momentum, rm, rv, eps, mean, rstd));
        return;
    }
    if (!DNN(cudnnBatchNormalizationForwardInference(c->dnn, CUDNN_BATCHNORM_SPATIAL, &one, &zero,
                                                     c->bnx, in, c->bnx, out, c->bnp, gamma, beta,
                                                     rm, rv, eps)))
        nnk_bn_eval_stats(c->stream, mean, rstd, rm, rv, C, eps);
}

static void cu_bn_bwd(void *ctx, float *din, float *dgamma, float *dbeta, const float *dout,
                      const float *in, const float *mean, const float *rstd, const float *gamma,
                      int B, int C, int S, int training, float eps)
{
    cuda_ctx *c = ctx;
    if (c->err) return;
    size_t n = (size_t)B * C * S;
    if (!training) {
        /* running statistics are constants: the gradient is a per-channel scale */
        if (din) nnk_bn_eval_backward_data(c->stream, din, dout, gamma, rstd, B, C, S);
        nnk_bn_param_grads(c->stream, dgamma, dbeta, dout, in, mean, rstd, B, C, S);
        return;
    }
    if (!din && !dgamma && !dbeta) return;
    if (bn_desc(c, B, C, S)) return;
    /* cuDNN writes all three; what the caller does not want goes to scratch */
    int both = dgamma && dbeta;
    float *s = scratch(c, (din ? 0 : n) + (both ? 0 : 2 * (size_t)C));
    if (!s) return;
    float *dx = din ? din : s;
    float *pg = both ? dgamma : s + (din ? 0 : n), *pb = both ? dbeta : pg + C;
    float beta_data = din ? 1.0f : 0.0f, beta_param = both ? 1.0f : 0.0f;
    if (DNN(cudnnBatchNormalizationBackward(c->dnn, CUDNN_BATCHNORM_SPATIAL, &one, &beta_data, &one,
                                            &beta_param, c->bnx, in, c->bnx, dout, c->bnx, dx,
                                            c->bnp, gamma, pg, pb, eps, mean, rstd)))
        return;
    if (!both && dgamma) nnk_add(c->stream, dgamma, pg, (size_t)C);
    if (!both && dbeta) nnk_add(c->stream, dbeta, pb, (size_t)C);
}

/* ---- linear (cuBLAS, column-major views of row-major buffers) ---------- */

static void cu_lin_fwd(void *ctx, float *out, const float *in, const float *w, const float *b,
                       int N, int IC, int OC)
{
    cuda_ctx *c = ctx;
    if (c->err) return;
    if (b) nnk_bias_rows(c->stream, out, b, N, OC);
    /* out^T [OC, N] = w [OC, IC] (col-major [IC, OC], transposed) * in^T [IC, N] */
    BLAS(cublasSgemm(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, IC, &one, w, IC, in, IC,
                     b ? &one : &zero, out, OC));
}

static void cu_lin_bwd(void *ctx, float *din, float *dw, float *db, const float *dout,
                       const float *in, const float *w, int N, int IC, int OC)
{
    cuda_ctx *c = ctx;
    if (c->err) return;
    /* din^T [IC, N] += w^T [IC, OC] * dout^T [OC, N] */
    if (din && BLAS(cublasSgemm(c->blas, CUBLAS_OP_N, CUBLAS_OP_N, IC, N, OC, &one, w, IC, dout, OC,
                                &one, din, IC)))
        return;
    /* dw^T [IC, OC] += in^T [IC, N] * dout [N, OC] */
    if (dw && BLAS(cublasSgemm(c->blas, CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, N, &one, in, IC, dout, OC,
                               &one, dw, IC)))
        return;
    if (db) nnk_col_sums(c->stream, db, dout, N, OC);
}

/* ---- loss and optimiser (kernels.cu) ------------------------------------ */

static float cu_bce(void *ctx, float *dlogits, const float *logits, const float *targets,
                    const float *label_w, const float *pos_w, int N, int L)
{
    cuda_ctx *c = ctx;
    double loss = 0.0;
    if (c->err) return 0.0f;
    nnk_bce_logits(c->stream, c->loss, dlogits, logits, targets, label_w, pos_w, N, L);
    cu_download(c, &loss, c->loss, sizeof(loss));
    return (float)loss;
}

static void cu_adam(void *ctx, float *p, const float *g, float *m, float *v, size_t n,
                    const nn_adam_hyper *h)
{
    cuda_ctx *c = ctx;
    if (!c->err)
        nnk_adam(c->stream, p, g, m, v, n, h->lr, h->beta1, h->beta2, h->eps, h->weight_decay,
                 h->decoupled, h->step, h->bc2);
}

/* ---- bidirectional LSTM (cuDNN RNN API v8) ------------------------------- */

static size_t cu_lstm_size(int N, int H)
{
    (void)N, (void)H;
    return 1;
}

/* The RNN descriptor for (F, H) and where cuDNN keeps each gate's matrix and
 * bias in its weight space. cuDNN's linLayerID 0-3 are the input matrices of
 * gates i, f, g, o (PyTorch's order), 4-7 the recurrent ones; each matrix is
 * row-major [H, in], as PyTorch's cuDNN path relies on. */
static int rnn_configure(cuda_ctx *c, int F, int H)
{
    rnn_state *r = &c->rnn;
    if (r->F == F && r->H == H) return 0;
    r->F = r->H = 0;
    if (r->w) cudaFree(r->w);
    if (r->dw) cudaFree(r->dw);
    r->w = r->dw = NULL;
    if (DNN(cudnnSetRNNDescriptor_v8(r->desc, CUDNN_RNN_ALGO_STANDARD, CUDNN_LSTM,
                                     CUDNN_RNN_DOUBLE_BIAS, CUDNN_BIDIRECTIONAL, CUDNN_LINEAR_INPUT,
                                     CUDNN_DATA_FLOAT, CUDNN_DATA_FLOAT,
                                     c->fp32 ? CUDNN_FMA_MATH : CUDNN_DEFAULT_MATH, F, H, H, 1,
                                     r->drop, CUDNN_RNN_PADDED_IO_ENABLED)) ||
        DNN(cudnnGetRNNWeightSpaceSize(c->dnn, r->desc, &r->wsize)) ||
        CU(cudaMalloc((void **)&r->w, r->wsize)) || CU(cudaMalloc((void **)&r->dw, r->wsize)))
        return -1;
    cudnnTensorDescriptor_t md = NULL, bd = NULL;
    int rc = DNN(cudnnCreateTensorDescriptor(&md)) || DNN(cudnnCreateTensorDescriptor(&bd));
    for (int d = 0; d < 2 && !rc; d++)
        for (int lin = 0; lin < 8 && !rc; lin++) {
            void *ma = NULL, *ba = NULL;
            rc = DNN(
                cudnnGetRNNWeightParams(c->dnn, r->desc, d, r->wsize, r->w, lin, md, &ma, bd, &ba));
            cudnnDataType_t dt;
            int nd, dims[8], strides[8];
            size_t mn = 1, bn = 1;
            if (!rc) rc = DNN(cudnnGetTensorNdDescriptor(md, 8, &dt, &nd, dims, strides));
            for (int i = 0; !rc && i < nd; i++)
                mn *= (size_t)dims[i];
            if (!rc) rc = DNN(cudnnGetTensorNdDescriptor(bd, 8, &dt, &nd, dims, strides));
            for (int i = 0; !rc && i < nd; i++)
                bn *= (size_t)dims[i];
            if (!rc && (!ma || !ba || mn != (size_t)H * (lin < 4 ? F : H) || bn != (size_t)H))
                rc = fail(c, "lstm", "cuDNN's weight layout is not [H, in] per gate");
            if (!rc) {
                r->moff[d][lin] = (size_t)((char *)ma - (char *)r->w) / sizeof(float);
                r->boff[d][lin] = (size_t)((char *)ba - (char *)r->w) / sizeof(float);
            }
        }
    if (md) cudnnDestroyTensorDescriptor(md);
    if (bd) cudnnDestroyTensorDescriptor(bd);
    if (rc) return -1;
    r->F = F;
    r->H = H;
    return 0;
}

/* Row maps and descriptors for S packed series of lengths len (host). */
static int rnn_layout(cuda_ctx *c, const int *len, int S)
{
    rnn_state *r = &c->rnn;
    int T = 0;
    for (int s = 0; s < S; s++)
        if (len[s] > T) T = len[s];
    size_t st = (size_t)S * T;
    if (st + S > r->host_cap) {
        free(r->rowmap_h);
        free(r->seqlen_h);
        r->rowmap_h = malloc(sizeof(int32_t) * (st + S));
        r->seqlen_h = malloc(sizeof(int) * (st + S));
        r->host_cap = r->rowmap_h && r->seqlen_h ? st + S : 0;
        if (!r->host_cap) return fail(c, "lstm", "out of host memory");
    }
    int off = 0;
    for (int s = 0; s < S; s++) {
        for (int t = 0; t < T; t++)
            r->rowmap_h[(size_t)s * T + t] = t < len[s] ? off + t : -1;
        r->seqlen_h[s] = len[s];
        off += len[s];
    }
    /* rowmap [S*T] then the device copy of the lengths [S] */
    size_t mapb = sizeof(int32_t) * (st + S), cap = r->map_cap;
    if (grow(c, (void **)&r->rowmap, &cap, mapb)) return -1;
    r->map_cap = cap;
    r->seqlen_d = r->rowmap + st;
    int32_t *lens = r->rowmap_h + st;
    for (int s = 0; s < S; s++)
        lens[s] = len[s];
    if (CU(cudaMemcpyAsync(r->rowmap, r->rowmap_h, mapb, cudaMemcpyHostToDevice, c->stream)))
        return -1;
    int wide = r->F > 2 * r->H ? r->F : 2 * r->H;
    size_t padb = sizeof(float) * st * wide;
    if (padb > r->pad_cap) {
        size_t c1 = 0, c2 = 0, c3 = 0, c4 = 0;
        r->pad_cap = 0;
        if (r->xpad) cudaFree(r->xpad);
        if (r->ypad) cudaFree(r->ypad);
        if (r->dxpad) cudaFree(r->dxpad);
        if (r->dypad) cudaFree(r->dypad);
        r->xpad = r->ypad = r->dxpad = r->dypad = NULL;
        if (grow(c, (void **)&r->xpad, &c1, padb) || grow(c, (void **)&r->ypad, &c2, padb) ||
            grow(c, (void **)&r->dxpad, &c3, padb) || grow(c, (void **)&r->dypad, &c4, padb))
            return -1;
        r->pad_cap = padb;
    }
    float fill = 0.0f;
    int dims[3] = {2, S, r->H}, strides[3] = {S * r->H, r->H, 1};
    if (DNN(cudnnSetRNNDataDescriptor(r->xd, CUDNN_DATA_FLOAT,
                                      CUDNN_RNN_DATA_LAYOUT_BATCH_MAJOR_UNPACKED, T, S, r->F,
                                      r->seqlen_h, &fill)) ||
        DNN(cudnnSetRNNDataDescriptor(r->yd, CUDNN_DATA_FLOAT,
                                      CUDNN_RNN_DATA_LAYOUT_BATCH_MAJOR_UNPACKED, T, S, 2 * r->H,
                                      r->seqlen_h, &fill)) ||
        DNN(cudnnSetTensorNdDescriptor(r->hd, CUDNN_DATA_FLOAT, 3, dims, strides)) ||
        DNN(cudnnGetRNNTempSpaceSizes(c->dnn, r->desc, CUDNN_FWD_MODE_TRAINING, r->xd,
                                      &r->work_size, &r->reserve_size)) ||
        ensure_ws(c, r->work_size) || grow(c, &r->reserve, &r->reserve_cap, r->reserve_size))
        return -1;
    r->S = S;
    r->T = T;
    return 0;
}

static void cu_lstm_fwd(void *ctx, float *out, float *cache, const float *x,
                        const nn_lstm_params *p, const int *len, int S, int F, int H)
{
    cuda_ctx *c = ctx;
    rnn_state *r = &c->rnn;
    (void)cache;
    if (c->err || rnn_configure(c, F, H) || rnn_layout(c, len, S)) return;
    /* the model's tensors into cuDNN's weight space (device to device) */
    for (int d = 0; d < 2; d++)
        for (int lin = 0; lin < 8; lin++) {
            int in = lin < 4 ? F : H, gate = lin % 4;
            const float *mat = (lin < 4 ? p->wih[d] : p->whh[d]) + (size_t)gate * H * in;
            const float *bias = (lin < 4 ? p->bih[d] : p->bhh[d]) + (size_t)gate * H;
            if (CU(cudaMemcpyAsync(r->w + r->moff[d][lin], mat, sizeof(float) * H * in,
                                   cudaMemcpyDeviceToDevice, c->stream)) ||
                CU(cudaMemcpyAsync(r->w + r->boff[d][lin], bias, sizeof(float) * H,
                                   cudaMemcpyDeviceToDevice, c->stream)))
                return;
        }
    int st = S * r->T;
    nnk_rows_gather(c->stream, r->xpad, x, r->rowmap, st, F);
    if (DNN(cudnnRNNForward(c->dnn, r->desc, CUDNN_FWD_MODE_TRAINING, r->seqlen_d, r->xd, r->xpad,
                            r->yd, r->ypad, r->hd, NULL, NULL, r->hd, NULL, NULL, r->wsize, r->w,
                            r->work_size, c->ws, r->reserve_size, r->reserve)))
        return;
    nnk_rows_scatter(c->stream, out, r->ypad, r->rowmap, st, 2 * H, 0);
}

static void cu_lstm_bwd(void *ctx, float *dx, const nn_lstm_grads *g, float *work,
                        const float *dout, const float *cache, const float *x,
                        const nn_lstm_params *p, const int *len, int S, int F, int H)
{
    cuda_ctx *c = ctx;
    rnn_state *r = &c->rnn;
    (void)work, (void)cache, (void)x, (void)p, (void)len;
    if (c->err) return;
    if (r->F != F || r->H != H || r->S != S) {
        fail(c, "lstm backward", "not the shape of the last forward");
        return;
    }
    int st = S * r->T;
    nnk_rows_gather(c->stream, r->dypad, dout, r->rowmap, st, 2 * H);
    /* backward data first: it prepares the reserve space backward weights reads */
    if (DNN(cudnnRNNBackwardData_v8(c->dnn, r->desc, r->seqlen_d, r->yd, r->ypad, r->dypad, r->xd,
                                    r->dxpad, r->hd, NULL, NULL, NULL, r->hd, NULL, NULL, NULL,
                                    r->wsize, r->w, r->work_size, c->ws, r->reserve_size,
                                    r->reserve)))
        return;
    if (dx) nnk_rows_scatter(c->stream, dx, r->dxpad, r->rowmap, st, F, 1);
    int any = 0;
    for (int d = 0; d < 2; d++)
        any |= g->wih[d] || g->whh[d] || g->bih[d] || g->bhh[d];
    if (!any) return;
    if (CU(cudaMemsetAsync(r->dw, 0, r->wsize, c->stream)) ||
        DNN(cudnnRNNBackwardWeights_v8(c->dnn, r->desc, CUDNN_WGRAD_MODE_ADD, r->seqlen_d, r->xd,
                                       r->xpad, r->hd, NULL, r->yd, r->ypad, r->wsize, r->dw,
                                       r->work_size, c->ws, r->reserve_size, r->reserve)))
        return;
    for (int d = 0; d < 2; d++)
        for (int lin = 0; lin < 8; lin++) {
            int in = lin < 4 ? F : H, gate = lin % 4;
            float *gm = lin < 4 ? g->wih[d] : g->whh[d], *gb = lin < 4 ? g->bih[d] : g->bhh[d];
            if (gm)
                nnk_add(c->stream, gm + (size_t)gate * H * in, r->dw + r->moff[d][lin],
                        (size_t)H * in);
            if (gb) nnk_add(c->stream, gb + (size_t)gate * H, r->dw + r->boff[d][lin], (size_t)H);
        }
}

static const nn_backend cuda = {
    .name = "cuda",
    .init = cu_init,
    .release = cu_release,
    .status = cu_status,
    .fold_bn = 0,
    .alloc = cu_alloc,
    .dealloc = cu_dealloc,
    .upload = cu_upload,
    .download = cu_download,
    .copy = cu_copy,
    .zero = cu_zero,
    .add = cu_add,
    .conv2d_col_size = cu_col_size,
    .conv2d_forward = cu_conv_fwd,
    .conv2d_backward = cu_conv_bwd,
    .maxpool_forward = cu_pool_fwd,
    .maxpool_backward = cu_pool_bwd,
    .relu_forward = cu_relu_fwd,
    .relu_backward = cu_relu_bwd,
    .batchnorm_forward = cu_bn_fwd,
    .batchnorm_backward = cu_bn_bwd,
    .linear_forward = cu_lin_fwd,
    .linear_backward = cu_lin_bwd,
    .dropout_forward = cu_drop_fwd,
    .dropout_backward = cu_drop_bwd,
    .gap_forward = cu_gap_fwd,
    .gap_backward = cu_gap_bwd,
    .bce_logits = cu_bce,
    .lstm_cache_size = cu_lstm_size,
    .lstm_work_size = cu_lstm_size,
    .lstm_forward = cu_lstm_fwd,
    .lstm_backward = cu_lstm_bwd,
    .adam_update = cu_adam,
};

/* The module's one exported symbol (built with -fvisibility=hidden); the
 * library finds it with dlsym (nn/backend_cuda_load.c). */
__attribute__((visibility("default"))) const nn_cuda_module nn_cuda_module_entry = {
    .abi = NN_CUDA_MODULE_ABI,
    .backend = &cuda,
    .device_count = cuda_device_count,
};

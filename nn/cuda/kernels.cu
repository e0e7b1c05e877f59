// nn/cuda/kernels.cu: the element-wise and small kernels of the CUDA backend
// (everything cuDNN and cuBLAS do not do: max-pool with argmax, ReLU,
// dropout with the CPU's random stream, global average pool, eval-mode
// batch-norm pieces, BCE with logits, Adam, and the row maps between packed
// series and cuDNN's padded RNN layout). Each kernel is a grid-stride loop
// over its output and mirrors one CPU kernel of nn/layers.h line by line;
// tests/nn/test_cuda_ops.c holds them to those.
#include "kernels.h"

namespace {

constexpr int kThreads = 256;

unsigned blocks(size_t n)
{
    size_t b = (n + kThreads - 1) / kThreads;
    if (b < 1) b = 1;
    return b > 65535 ? 65535u : (unsigned)b;
}

#define GRID_LOOP(i, n)                                                                            \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                        \
         i += (size_t)blockDim.x * gridDim.x)

__global__ void k_add(float *dst, const float *src, size_t n)
{
    GRID_LOOP(i, n) dst[i] += src[i];
}

__global__ void k_bias_rows(float *out, const float *b, size_t n, int OC)
{
    GRID_LOOP(i, n) out[i] = b[i % (size_t)OC];
}

__global__ void k_col_sums(float *db, const float *dout, int N, int OC)
{
    GRID_LOOP(o, (size_t)OC)
    {
        float s = 0.0f;
        for (int r = 0; r < N; r++)
            s += dout[(size_t)r * OC + o];
        db[o] += s;
    }
}

// NaN passes, forward and backward, as on the CPU (nn_relu_forward).
__global__ void k_relu_forward(float *out, const float *in, size_t n)
{
    GRID_LOOP(i, n) out[i] = in[i] <= 0.0f ? 0.0f : in[i];
}

__global__ void k_relu_backward(float *din, const float *dout, const float *out, size_t n)
{
    GRID_LOOP(i, n) din[i] += dout[i] * (float)!(out[i] <= 0.0f);
}

// out/idx [P, OH, OW]; idx is the offset of the first maximum inside its
// input plane (raster order, as the CPU kernel picks it). A NaN wins every
// comparison (the last NaN of the window, as on the CPU and in PyTorch).
__global__ void k_maxpool_forward(float *out, int32_t *idx, const float *in, int P, int H, int W,
                                  int k, int stride, int OH, int OW)
{
    size_t per = (size_t)OH * OW;
    GRID_LOOP(i, (size_t)P * per)
    {
        size_t p = i / per;
        int o = (int)(i % per);
        int oy = o / OW, ox = o % OW;
        const float *src = in + p * H * W;
        int32_t bi = (oy * stride) * W + ox * stride;
        float best = src[bi];
        for (int ky = 0; ky < k; ky++)
            for (int kx = 0; kx < k; kx++) {
                int32_t off = (oy * stride + ky) * W + ox * stride + kx;
                if (src[off] > best || isnan(src[off])) {
                    best = src[off];
                    bi = off;
                }
            }
        out[i] = best;
        if (idx) idx[i] = bi;
    }
}

// Windows may overlap (stride < k), so two outputs can route to one input.
__global__ void k_maxpool_backward(float *din, const float *dout, const int32_t *idx, int P,
                                   int H, int W, int OH, int OW)
{
    size_t per = (size_t)OH * OW;
    GRID_LOOP(i, (size_t)P * per)
    {
        size_t p = i / per;
        atomicAdd(din + p * H * W + idx[i], dout[i]);
    }
}

__global__ void k_gap_forward(float *out, const float *in, int P, int S)
{
    GRID_LOOP(p, (size_t)P)
    {
        const float *x = in + p * S;
        float acc = 0.0f;
        for (int s = 0; s < S; s++)
            acc += x[s];
        out[p] = acc / (float)S;
    }
}

__global__ void k_gap_backward(float *din, const float *dout, int P, int S)
{
    GRID_LOOP(i, (size_t)P * S) din[i] += dout[i / S] / (float)S;
}

// nn_rng_next is splitmix64: draw i (0-based) after state s uses s + (i+1)*gamma.
__device__ float rng_uniform_at(uint64_t s, size_t i)
{
    uint64_t z = s + (uint64_t)(i + 1) * 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z = z ^ (z >> 31);
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}

__global__ void k_dropout_forward(float *out, float *mask, const float *in, size_t n, float p,
                                  float keep, uint64_t state)
{
    GRID_LOOP(i, n)
    {
        float m = p > 0.0f ? (rng_uniform_at(state, i) < p ? 0.0f : keep) : 1.0f;
        mask[i] = m;
        out[i] = in[i] * m;
    }
}

__global__ void k_dropout_backward(float *din, const float *dout, const float *mask, size_t n)
{
    GRID_LOOP(i, n) din[i] += dout[i] * mask[i];
}

__global__ void k_bn_eval_stats(float *mean, float *rstd, const float *rm, const float *rv, int C,
                                float eps)
{
    GRID_LOOP(c, (size_t)C)
    {
        mean[c] = rm[c];
        rstd[c] = 1.0f / sqrtf(rv[c] + eps);
    }
}

__global__ void k_bn_eval_backward_data(float *din, const float *dout, const float *gamma,
                                        const float *rstd, size_t n, int C, int S)
{
    GRID_LOOP(i, n)
    {
        int c = (int)((i / S) % C);
        din[i] += gamma[c] * rstd[c] * dout[i];
    }
}

// One block per channel; sums in double, as the CPU sums across planes.
__global__ void k_bn_param_grads(float *dgamma, float *dbeta, const float *dout, const float *in,
                                 const float *mean, const float *rstd, int B, int C, int S)
{
    __shared__ double sg[kThreads], sgx[kThreads];
    int c = blockIdx.x;
    double g = 0.0, gx = 0.0;
    float m = mean[c];
    size_t n = (size_t)B * S;
    for (size_t j = threadIdx.x; j < n; j += blockDim.x) {
        size_t b = j / S, s = j % S;
        size_t at = (b * C + c) * S + s;
        g += dout[at];
        gx += (double)dout[at] * (double)(in[at] - m);
    }
    sg[threadIdx.x] = g;
    sgx[threadIdx.x] = gx;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w /= 2) {
        if ((int)threadIdx.x < w) {
            sg[threadIdx.x] += sg[threadIdx.x + w];
            sgx[threadIdx.x] += sgx[threadIdx.x + w];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        if (dgamma) dgamma[c] += (float)(sgx[0] * rstd[c]);
        if (dbeta) dbeta[c] += (float)sg[0];
    }
}

__device__ double softplus(double x)
{
    return x > 0 ? x + log1p(exp(-x)) : log1p(exp(x));
}

// One block: the loss is a mean over N*L, a few thousand values at most.
__global__ void k_bce_logits(double *loss, float *dlogits, const float *logits,
                             const float *targets, const float *label_w, const float *pos_w, int N,
                             int L)
{
    __shared__ double part[kThreads];
    size_t n = (size_t)N * L;
    double inv = 1.0 / ((double)N * L), total = 0.0;
    for (size_t k = threadIdx.x; k < n; k += blockDim.x) {
        int l = (int)(k % L);
        double x = logits[k], y = targets[k];
        double w = label_w ? label_w[l] : 1.0, pw = pos_w ? pos_w[l] : 1.0;
        total += w * (pw * y * softplus(-x) + (1.0 - y) * softplus(x));
        if (dlogits) {
            double sig = 1.0 / (1.0 + exp(-x));
            dlogits[k] = (float)(w * (-pw * y * (1.0 - sig) + (1.0 - y) * sig) * inv);
        }
    }
    part[threadIdx.x] = total;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w /= 2) {
        if ((int)threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) *loss = part[0] * inv;
}

__global__ void k_adam(float *p, const float *g, float *m, float *v, size_t n, float lr,
                       float beta1, float beta2, float eps, float wd, int decoupled, float step,
                       float bc2)
{
    GRID_LOOP(k, n)
    {
        float gk = g[k];
        if (wd != 0.0f) {
            if (decoupled)
                p[k] *= 1.0f - lr * wd;
            else
                gk += wd * p[k];
        }
        m[k] = beta1 * m[k] + (1.0f - beta1) * gk;
        v[k] = beta2 * v[k] + (1.0f - beta2) * gk * gk;
        p[k] -= step * m[k] / (sqrtf(v[k]) / bc2 + eps);
    }
}

__global__ void k_rows_gather(float *pad, const float *packed, const int32_t *rowmap, size_t n,
                              int F)
{
    GRID_LOOP(i, n)
    {
        int32_t row = rowmap[i / F];
        pad[i] = row >= 0 ? packed[(size_t)row * F + i % F] : 0.0f;
    }
}

__global__ void k_rows_scatter(float *packed, const float *pad, const int32_t *rowmap, size_t n,
                               int F, int accumulate)
{
    GRID_LOOP(i, n)
    {
        int32_t row = rowmap[i / F];
        if (row < 0) continue;
        float *dst = packed + (size_t)row * F + i % F;
        *dst = accumulate ? *dst + pad[i] : pad[i];
    }
}

} // namespace

extern "C" {

void nnk_add(cudaStream_t st, float *dst, const float *src, size_t n)
{
    if (n) k_add<<<blocks(n), kThreads, 0, st>>>(dst, src, n);
}

void nnk_bias_rows(cudaStream_t st, float *out, const float *b, int N, int OC)
{
    size_t n = (size_t)N * OC;
    if (n) k_bias_rows<<<blocks(n), kThreads, 0, st>>>(out, b, n, OC);
}

void nnk_col_sums(cudaStream_t st, float *db, const float *dout, int N, int OC)
{
    if (OC > 0) k_col_sums<<<blocks(OC), kThreads, 0, st>>>(db, dout, N, OC);
}

void nnk_relu_forward(cudaStream_t st, float *out, const float *in, size_t n)
{
    if (n) k_relu_forward<<<blocks(n), kThreads, 0, st>>>(out, in, n);
}

void nnk_relu_backward(cudaStream_t st, float *din, const float *dout, const float *out, size_t n)
{
    if (n) k_relu_backward<<<blocks(n), kThreads, 0, st>>>(din, dout, out, n);
}

void nnk_maxpool_forward(cudaStream_t st, float *out, int32_t *idx, const float *in, int P, int H,
                         int W, int k, int stride)
{
    int OH = (H - k) / stride + 1, OW = (W - k) / stride + 1;
    size_t n = (size_t)P * OH * OW;
    if (n) k_maxpool_forward<<<blocks(n), kThreads, 0, st>>>(out, idx, in, P, H, W, k, stride, OH, OW);
}

void nnk_maxpool_backward(cudaStream_t st, float *din, const float *dout, const int32_t *idx,
                          int P, int H, int W, int k, int stride)
{
    int OH = (H - k) / stride + 1, OW = (W - k) / stride + 1;
    size_t n = (size_t)P * OH * OW;
    if (n) k_maxpool_backward<<<blocks(n), kThreads, 0, st>>>(din, dout, idx, P, H, W, OH, OW);
}

void nnk_gap_forward(cudaStream_t st, float *out, const float *in, int P, int S)
{
    if (P > 0) k_gap_forward<<<blocks(P), kThreads, 0, st>>>(out, in, P, S);
}

void nnk_gap_backward(cudaStream_t st, float *din, const float *dout, int P, int S)
{
    size_t n = (size_t)P * S;
    if (n) k_gap_backward<<<blocks(n), kThreads, 0, st>>>(din, dout, P, S);
}

void nnk_dropout_forward(cudaStream_t st, float *out, float *mask, const float *in, size_t n,
                         float p, float keep, uint64_t state)
{
    if (n) k_dropout_forward<<<blocks(n), kThreads, 0, st>>>(out, mask, in, n, p, keep, state);
}

void nnk_dropout_backward(cudaStream_t st, float *din, const float *dout, const float *mask,
                          size_t n)
{
    if (n) k_dropout_backward<<<blocks(n), kThreads, 0, st>>>(din, dout, mask, n);
}

void nnk_bn_eval_stats(cudaStream_t st, float *mean, float *rstd, const float *rm, const float *rv,
                       int C, float eps)
{
    if (C > 0) k_bn_eval_stats<<<blocks(C), kThreads, 0, st>>>(mean, rstd, rm, rv, C, eps);
}

void nnk_bn_eval_backward_data(cudaStream_t st, float *din, const float *dout, const float *gamma,
                               const float *rstd, int B, int C, int S)
{
    size_t n = (size_t)B * C * S;
    if (n) k_bn_eval_backward_data<<<blocks(n), kThreads, 0, st>>>(din, dout, gamma, rstd, n, C, S);
}

void nnk_bn_param_grads(cudaStream_t st, float *dgamma, float *dbeta, const float *dout,
                        const float *in, const float *mean, const float *rstd, int B, int C, int S)
{
    if (C > 0 && (dgamma || dbeta))
        k_bn_param_grads<<<C, kThreads, 0, st>>>(dgamma, dbeta, dout, in, mean, rstd, B, C, S);
}

void nnk_bce_logits(cudaStream_t st, double *loss, float *dlogits, const float *logits,
                    const float *targets, const float *label_w, const float *pos_w, int N, int L)
{
    k_bce_logits<<<1, kThreads, 0, st>>>(loss, dlogits, logits, targets, label_w, pos_w, N, L);
}

void nnk_adam(cudaStream_t st, float *p, const float *g, float *m, float *v, size_t n, float lr,
              float beta1, float beta2, float eps, float wd, int decoupled, float step, float bc2)
{
    if (n)
        k_adam<<<blocks(n), kThreads, 0, st>>>(p, g, m, v, n, lr, beta1, beta2, eps, wd, decoupled,
                                               step, bc2);
}

void nnk_rows_gather(cudaStream_t st, float *pad, const float *packed, const int32_t *rowmap,
                     int ST, int F)
{
    size_t n = (size_t)ST * F;
    if (n) k_rows_gather<<<blocks(n), kThreads, 0, st>>>(pad, packed, rowmap, n, F);
}

void nnk_rows_scatter(cudaStream_t st, float *packed, const float *pad, const int32_t *rowmap,
                      int ST, int F, int accumulate)
{
    size_t n = (size_t)ST * F;
    if (n) k_rows_scatter<<<blocks(n), kThreads, 0, st>>>(packed, pad, rowmap, n, F, accumulate);
}

} // extern "C"

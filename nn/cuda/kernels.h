/* nn/cuda/kernels.h: the small CUDA kernels of the GPU backend (kernels.cu),
 * callable from C. Each launches on `stream` and returns at once; pointers
 * are device memory unless a comment says otherwise. Shapes and semantics are
 * those of the CPU reference kernels in nn/layers.h, which tests compare
 * them with (tests/nn/test_cuda_ops.c). */
#ifndef NN_CUDA_KERNELS_H
#define NN_CUDA_KERNELS_H

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* dst += src */
void nnk_add(cudaStream_t st, float *dst, const float *src, size_t n);
/* out [N, OC] = b broadcast over the rows */
void nnk_bias_rows(cudaStream_t st, float *out, const float *b, int N, int OC);
/* db [OC] += column sums of dout [N, OC] */
void nnk_col_sums(cudaStream_t st, float *db, const float *dout, int N, int OC);
void nnk_relu_forward(cudaStream_t st, float *out, const float *in, size_t n);
void nnk_relu_backward(cudaStream_t st, float *din, const float *dout, const float *out, size_t n);
void nnk_maxpool_forward(cudaStream_t st, float *out, int32_t *idx, const float *in, int P, int H,
                         int W, int k, int stride);
void nnk_maxpool_backward(cudaStream_t st, float *din, const float *dout, const int32_t *idx, int P,
                          int H, int W, int k, int stride);
void nnk_gap_forward(cudaStream_t st, float *out, const float *in, int P, int S);
void nnk_gap_backward(cudaStream_t st, float *din, const float *dout, int P, int S);
/* mask[i] from splitmix64 draw i after `state` (host value), as nn_rng_uniform. */
void nnk_dropout_forward(cudaStream_t st, float *out, float *mask, const float *in, size_t n,
                         float p, float keep, uint64_t state);
void nnk_dropout_backward(cudaStream_t st, float *din, const float *dout, const float *mask,
                          size_t n);
/* Eval-mode batch-norm pieces: mean = rm, rstd = 1/sqrt(rv + eps); din +=
 * gamma*rstd*dout; dgamma += sum dout*(x-mean)*rstd, dbeta += sum dout per
 * channel (either may be NULL). */
void nnk_bn_eval_stats(cudaStream_t st, float *mean, float *rstd, const float *rm, const float *rv,
                       int C, float eps);
void nnk_bn_eval_backward_data(cudaStream_t st, float *din, const float *dout, const float *gamma,
                               const float *rstd, int B, int C, int S);
void nnk_bn_param_grads(cudaStream_t st, float *dgamma, float *dbeta, const float *dout,
                        const float *in, const float *mean, const float *rstd, int B, int C, int S);
/* loss (one double on the device) and dlogits (may be NULL), as nn_bce_logits. */
void nnk_bce_logits(cudaStream_t st, double *loss, float *dlogits, const float *logits,
                    const float *targets, const float *label_w, const float *pos_w, int N, int L);
void nnk_adam(cudaStream_t st, float *p, const float *g, float *m, float *v, size_t n, float lr,
              float beta1, float beta2, float eps, float wd, int decoupled, float step, float bc2);
/* Packed rows <-> cuDNN's batch-major padded layout [S, T, F]: rowmap[s*T+t]
 * is the packed row of step t of series s, or -1 for padding. gather writes
 * zeros at padding; scatter writes (or adds, when accumulate) valid rows. */
void nnk_rows_gather(cudaStream_t st, float *pad, const float *packed, const int32_t *rowmap,
                     int ST, int F);
void nnk_rows_scatter(cudaStream_t st, float *packed, const float *pad, const int32_t *rowmap,
                      int ST, int F, int accumulate);

#ifdef __cplusplus
}
#endif

#endif

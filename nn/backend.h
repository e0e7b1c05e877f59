/* nn/backend.h: the seam between the model code and the kernels that do the
 * arithmetic (ggml-style: one table of function pointers per backend, one
 * folder per backend). stack.c, lrcn.c and adam.c run every layer through
 * the table of the model's backend, on buffers that live in that backend's
 * memory, so one model file and one copy of the model logic run on either.
 *
 * Every op takes the backend's context first (NULL for the CPU) and works on
 * pointers the backend's alloc returned; shapes and accumulation rules are
 * those of the CPU reference kernels in layers.h, which the CPU table points
 * at. Ops return nothing: a backend that can fail (CUDA) records its first
 * error, and the model checks `status` at the end of each public call.
 * Host memory crosses only through upload and download. */
#ifndef NN_BACKEND_H
#define NN_BACKEND_H

#include "layers.h"

/* init flags */
#define NN_BACKEND_FP32 1 /* no TF32 or other reduced-precision shortcuts (tests) */

typedef struct nn_backend {
    const char *name;
    /* A context for this process's use of the backend; *ctx stays NULL for the
     * CPU. Returns 0 or a negative NN_E* code with a reason in err (no device). */
    int (*init)(void **ctx, int flags, char *err, size_t errlen);
    void (*release)(void *ctx);
    /* 0, or the first error since init (sticky) with its reason. */
    int (*status)(void *ctx, char *err, size_t errlen);
    /* Eval-mode batch-norm folds into the conv weights on the host (stack.c). */
    int fold_bn;

    /* ---- memory (bytes) ---- */
    void *(*alloc)(void *ctx, size_t bytes); /* NULL when out of memory */
    void (*dealloc)(void *ctx, void *p);     /* NULL is a no-op */
    void (*upload)(void *ctx, void *dst, const void *src_host, size_t bytes);
    void (*download)(void *ctx, void *dst_host, const void *src, size_t bytes);
    void (*copy)(void *ctx, void *dst, const void *src, size_t bytes);
    void (*zero)(void *ctx, void *dst, size_t bytes);
    void (*add)(void *ctx, float *dst, const float *src, size_t n); /* dst += src */

    /* ---- layers (see layers.h for shapes) ---- */
    /* Floats of col scratch the conv ops need (the CUDA backend keeps its own
     * cuDNN workspace and asks for none). */
    size_t (*conv2d_col_size)(const nn_conv_shape *s, int B);
    void (*conv2d_forward)(void *ctx, float *out, float *col, const float *in, const float *w,
                           const float *b, int B, const nn_conv_shape *s);
    void (*conv2d_backward)(void *ctx, float *din, float *dw, float *db, float *col,
                            const float *dout, const float *in, const float *w, int B,
                            const nn_conv_shape *s);
    void (*maxpool_forward)(void *ctx, float *out, int32_t *idx, const float *in, int B, int C,
                            int H, int W, int k, int stride);
    void (*maxpool_backward)(void *ctx, float *din, const float *dout, const int32_t *idx, int B,
                             int C, int H, int W, int k, int stride);
    void (*relu_forward)(void *ctx, float *out, const float *in, size_t n);
    void (*relu_backward)(void *ctx, float *din, const float *dout, const float *out, size_t n);
    /* gamma and beta must not be NULL here. */
    void (*batchnorm_forward)(void *ctx, float *out, float *mean, float *rstd, float *running_mean,
                              float *running_var, const float *in, const float *gamma,
                              const float *beta, int B, int C, int S, int training, float momentum,
                              float eps);
    void (*batchnorm_backward)(void *ctx, float *din, float *dgamma, float *dbeta,
                               const float *dout, const float *in, const float *mean,
                               const float *rstd, const float *gamma, int B, int C, int S,
                               int training, float eps);
    void (*linear_forward)(void *ctx, float *out, const float *in, const float *w, const float *b,
                           int N, int IC, int OC);
    void (*linear_backward)(void *ctx, float *din, float *dw, float *db, const float *dout,
                            const float *in, const float *w, int N, int IC, int OC);
    /* *rng is host state, advanced exactly as the CPU kernel advances it, so
     * every backend draws the same masks. */
    void (*dropout_forward)(void *ctx, float *out, float *mask, const float *in, size_t n, float p,
                            uint64_t *rng);
    void (*dropout_backward)(void *ctx, float *din, const float *dout, const float *mask, size_t n);
    void (*gap_forward)(void *ctx, float *out, const float *in, int B, int C, int S);
    void (*gap_backward)(void *ctx, float *din, const float *dout, int B, int C, int S);
    /* All pointers in backend memory (label_w, pos_w may be NULL); the loss
     * comes back to the host. */
    float (*bce_logits)(void *ctx, float *dlogits, const float *logits, const float *targets,
                        const float *label_w, const float *pos_w, int N, int L);
    /* len is a HOST array of S lengths. cache and work: lstm_cache_size /
     * lstm_work_size floats (the CUDA backend keeps cuDNN's reserve space in
     * its context instead: one LSTM forward's state until its backward). */
    size_t (*lstm_cache_size)(int N, int H);
    size_t (*lstm_work_size)(int N, int H);
    void (*lstm_forward)(void *ctx, float *out, float *cache, const float *x,
                         const nn_lstm_params *p, const int *len, int S, int F, int H);
    void (*lstm_backward)(void *ctx, float *dx, const nn_lstm_grads *g, float *work,
                          const float *dout, const float *cache, const float *x,
                          const nn_lstm_params *p, const int *len, int S, int F, int H);
    void (*adam_update)(void *ctx, float *p, const float *g, float *m, float *v, size_t n,
                        const nn_adam_hyper *h);
} nn_backend;

/* The CPU backend (static storage, never freed). */
const nn_backend *nn_backend_cpu(void);
/* The CUDA backend when built (nn/cuda/) and its module loads, else NULL.
 * nn/cuda/ is a module of its own (libichtriage-nn-cuda.so), opened with
 * dlopen on first use: the CUDA runtime, cuBLAS and cuDNN (hundreds of MB
 * mapped, most of a second to load) stay out of every process that does not
 * run on a GPU, which is every process on a machine without one. */
const nn_backend *nn_backend_cuda(void);

/* What the module exports (its one visible symbol, nn_cuda_module_entry). */
#define NN_CUDA_MODULE_ABI 1
typedef struct nn_cuda_module {
    int abi; /* NN_CUDA_MODULE_ABI */
    const nn_backend *backend;
    int (*device_count)(void);
} nn_cuda_module;
/* Every backend built into this library, CPU first: tests run the same ops
 * on each and compare them with the CPU reference kernels. */
int nn_backend_count(void);
const nn_backend *nn_backend_at(int i);

#endif

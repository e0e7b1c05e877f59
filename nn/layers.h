/* nn/layers.h: the CPU reference kernels, one forward/backward pair per layer.
 *
 * Every function works on flat float buffers in PyTorch's layouts (NCHW for
 * images, [N, features] for vectors); the shapes are written above each pair.
 * Backward functions ACCUMULATE (+=) into every gradient they write, so the
 * caller zeroes gradient buffers first; a NULL gradient pointer means "not
 * wanted" (a frozen weight, or the first layer's input). Nothing here
 * allocates; scratch space ("col", "cache") is passed in by the caller. */
#ifndef NN_LAYERS_H
#define NN_LAYERS_H

#include <stddef.h>
#include <stdint.h>

/* The worker threads the convolutions spread over (pool.h); NULL runs them
 * on the caller alone. */
typedef struct nn_pool nn_pool;

/* ---- conv2d ------------------------------------------------------------ */
/* Geometry of one convolution: in [B, c, h, w] -> out [B, oc, oh, ow] with a
 * weight [oc, c, kh, kw] and bias [oc]. nn_conv_shape_init fills oh, ow. */
typedef struct nn_conv_shape {
    int c, h, w;
    int oc, kh, kw, stride, pad;
    int oh, ow;
} nn_conv_shape;

void nn_conv_shape_init(nn_conv_shape *s, int c, int h, int w, int oc, int k, int stride, int pad);
/* Floats of scratch the conv kernels need for a batch of B images. */
size_t nn_conv2d_col_size(const nn_conv_shape *s, int B);
/* out [B,oc,oh,ow] = conv(in [B,c,h,w], w) + b; b may be NULL; col is scratch of
 * nn_conv2d_col_size() floats. Picks Winograd where it applies, else im2col. */
void nn_conv2d_forward(nn_pool *p, float *out, float *col, const float *in, const float *w,
                       const float *b, int B, const nn_conv_shape *s);
/* The two algorithms behind it, for tests and benchmarks. */
void nn_conv2d_forward_im2col(nn_pool *p, float *out, float *col, const float *in, const float *w,
                              const float *b, int B, const nn_conv_shape *s);
/* Winograd F(2x2, 3x3): 3x3 kernels, stride 1, padding 1, at least 16 input
 * channels. ws: nn_winograd_ws_size() floats. */
int nn_winograd_applies(const nn_conv_shape *s);
size_t nn_winograd_ws_size(const nn_conv_shape *s, int B);
void nn_winograd_forward(nn_pool *p, float *out, float *ws, const float *in, const float *w,
                         const float *b, int B, const nn_conv_shape *s);
/* din [B,c,h,w] += the input gradient of the convolution s from dout, by
 * Winograd (a 3x3 convolution of dout with the rotated, transposed weights);
 * applies when s is 3x3, stride 1, padding 1 and has at least 16 outputs. */
int nn_winograd_backward_applies(const nn_conv_shape *s);
size_t nn_winograd_backward_ws_size(const nn_conv_shape *s, int B);
void nn_winograd_backward_data(nn_pool *p, float *din, float *ws, const float *dout, const float *w,
                               int B, const nn_conv_shape *s);
/* din [B,c,h,w] (may be NULL), dw [oc,c,kh,kw] and db [oc] (may be NULL). */
void nn_conv2d_backward(nn_pool *p, float *din, float *dw, float *db, float *col, const float *dout,
                        const float *in, const float *w, int B, const nn_conv_shape *s);

/* ---- max-pool (k x k window, stride) --------------------------------- */
/* in [B,C,H,W] -> out [B,C,OH,OW], OH = (H - k) / stride + 1; idx [B,C,OH,OW]
 * keeps the argmax offset inside each input plane for the backward pass. */
void nn_maxpool_forward(float *out, int32_t *idx, const float *in, int B, int C, int H, int W,
                        int k, int stride);
void nn_maxpool_backward(float *din, const float *dout, const int32_t *idx, int B, int C, int H,
                         int W, int k, int stride);

/* ---- ReLU (out may equal in) ----------------------------------------- */
void nn_relu_forward(float *out, const float *in, size_t n);
/* out is the forward output: the gradient passes where out > 0. */
void nn_relu_backward(float *din, const float *dout, const float *out, size_t n);

/* ---- batch-norm over [B, C, S] (S = H*W for 2-D, S = 1 for 1-D) ------- */
/* training: normalise with the batch statistics, save mean and rstd [C] for
 * backward and update running_mean/running_var (momentum as PyTorch: new =
 * (1-m)*old + m*batch, unbiased variance). Not training: use the running
 * statistics (mean and rstd are still written, for backward). */
void nn_batchnorm_forward(nn_pool *p, float *out, float *mean, float *rstd, float *running_mean,
                          float *running_var, const float *in, const float *gamma,
                          const float *beta, int B, int C, int S, int training, float momentum,
                          float eps);
/* training must be what the forward pass used. */
void nn_batchnorm_backward(nn_pool *p, float *din, float *dgamma, float *dbeta, const float *dout,
                           const float *in, const float *mean, const float *rstd,
                           const float *gamma, int B, int C, int S, int training);

/* ---- linear ----------------------------------------------------------- */
/* out [N,OC] = in [N,IC] * w[OC,IC]^T + b[OC]; b may be NULL. */
void nn_linear_forward(float *out, const float *in, const float *w, const float *b, int N, int IC,
                       int OC);
void nn_linear_backward(float *din, float *dw, float *db, const float *dout, const float *in,
                        const float *w, int N, int IC, int OC);

/* ---- dropout ---------------------------------------------------------- */
/* mask [n] receives 0 or 1/(1-p) drawn from *rng (see nn_rng_*); out = in*mask.
 * p == 0 writes an all-ones mask. out may equal in. */
void nn_dropout_forward(float *out, float *mask, const float *in, size_t n, float p, uint64_t *rng);
void nn_dropout_backward(float *din, const float *dout, const float *mask, size_t n);

/* ---- global average pool: [B, C, S] -> [B, C] ------------------------- */
void nn_gap_forward(float *out, const float *in, int B, int C, int S);
void nn_gap_backward(float *din, const float *dout, int B, int C, int S);

/* ---- sigmoid ---------------------------------------------------------- */
void nn_sigmoid_forward(float *out, const float *in, size_t n);
void nn_sigmoid_backward(float *din, const float *dout, const float *out, size_t n);

/* ---- binary cross-entropy with logits --------------------------------- */
/* logits, targets [N, L]; label_w [L] and pos_w [L] may be NULL (all ones).
 * loss = mean over N*L of label_w[l] * (pos_w[l] * y * softplus(-x)
 *        + (1 - y) * softplus(x)), exactly torch.nn.BCEWithLogitsLoss(weight,
 * pos_weight). Returns the loss; dlogits (may be NULL) is SET (not
 * accumulated) to d loss / d logits. */
float nn_bce_logits(float *dlogits, const float *logits, const float *targets, const float *label_w,
                    const float *pos_w, int N, int L);

/* ---- bidirectional LSTM over packed variable-length sequences ---------
 * A batch of S sequences is packed: sequence s occupies rows
 * off[s] .. off[s] + len[s] - 1 of every [N, .] buffer (N = sum of len, off
 * is the running sum). Each sequence is run over exactly its own steps, so
 * padding never enters the state: this is the masking. Gates in PyTorch's
 * order i, f, g, o; per direction d (0 forward, 1 reverse):
 *   wih[d] [4H, F], whh[d] [4H, H], bih[d] [4H], bhh[d] [4H].
 * out [N, 2H]: forward hidden state in columns 0..H-1, reverse in H..2H-1.
 * cache: nn_lstm_cache_size(N, H) floats, written by forward, read by backward. */
typedef struct nn_lstm_params {
    const float *wih[2], *whh[2], *bih[2], *bhh[2];
} nn_lstm_params;
typedef struct nn_lstm_grads {
    float *wih[2], *whh[2], *bih[2], *bhh[2]; /* all NULL: frozen */
} nn_lstm_grads;

size_t nn_lstm_cache_size(int N, int H);
/* Scratch for backward: nn_lstm_work_size(N, H) floats. */
size_t nn_lstm_work_size(int N, int H);
void nn_lstm_forward(float *out, float *cache, const float *x, const nn_lstm_params *p,
                     const int *len, int S, int F, int H);
/* dx [N, F] may be NULL. */
void nn_lstm_backward(float *dx, const nn_lstm_grads *g, float *work, const float *dout,
                      const float *cache, const float *x, const nn_lstm_params *p, const int *len,
                      int S, int F, int H);

/* ---- Adam / AdamW update of n parameters (torch.optim semantics) ------ */
typedef struct nn_adam_hyper {
    float lr, beta1, beta2, eps, weight_decay;
    int decoupled;
    float step; /* lr / (1 - beta1^t) */
    float bc2;  /* sqrt(1 - beta2^t) */
} nn_adam_hyper;
void nn_adam_update(float *p, const float *g, float *m, float *v, size_t n, const nn_adam_hyper *h);

/* ---- random numbers (splitmix64 state owned by the caller) ------------ */
uint64_t nn_rng_next(uint64_t *state);
/* Uniform in [0, 1). */
float nn_rng_uniform(uint64_t *state);
/* Standard normal. */
float nn_rng_normal(uint64_t *state);

#endif

/* nn/model_internal.h: the nn_model structure shared by the files of nn/
 * (model.c, arch.c, model_io.c, adam.c, stack.c, lrcn.c). Not installed. */
#ifndef NN_MODEL_INTERNAL_H
#define NN_MODEL_INTERNAL_H

#include "backend.h"
#include "nn.h"

#define NN_NAME_MAX 64
#define NN_MAX_TENSORS 256
#define NN_MAX_LAYERS 96
#define NN_MAX_META 64

typedef enum nn_layer_kind {
    NN_L_CONV,
    NN_L_BN,
    NN_L_RELU,
    NN_L_MAXPOOL,
    NN_L_GAP,     /* AdaptiveAvgPool2d(1); the Flatten after it is a no-op */
    NN_L_FLATTEN, /* no-op on NCHW buffers */
    NN_L_LINEAR,
    NN_L_DROPOUT,
} nn_layer_kind;

/* One layer of a stack; per-sample input [c, h, w] and output [oc, oh, ow]
 * (vectors have h = w = 1). */
typedef struct nn_layer {
    nn_layer_kind kind;
    int c, h, w, oc, oh, ow;
    nn_conv_shape conv;
    int k, stride; /* max-pool */
    float p;       /* dropout */
    int wt, bt;    /* tensor indices: weight and bias (gamma and beta for BN), -1 none */
    int rm, rv;    /* BN running statistics */
    int inplace;   /* output written over the input buffer (ReLU, dropout, flatten) */
    size_t act;    /* per-sample offset of the output in the stack's cache */
    size_t aux;    /* per-sample offset of the dropout mask (cache) or pool argmax (idx) */
    size_t stat;   /* offset of BN mean and rstd [2, C] in the model's stat buffer */
} nn_layer;

/* A sequential list of layers (PyTorch nn.Sequential). The cache holds, for
 * cap samples, every output that is not in-place, plus dropout masks. */
typedef struct nn_stack {
    nn_layer layers[NN_MAX_LAYERS];
    int n;
    size_t in_size;   /* floats per sample in */
    size_t act_total; /* floats per sample in the cache */
    size_t idx_total; /* ints per sample of pool argmax */
    size_t max_act;   /* largest per-sample output */
    float *cache;
    int32_t *idx;
    int cap;
    float *pp[2]; /* ping-pong activations (no cache) and gradients (backward) */
    int pp_cap;
    int cached_n; /* batch of the last caching forward, 0 none */
    int cached_end;
    const float *cached_in;
    int cached_training;
} nn_stack;

typedef struct nn_tensor {
    char name[NN_NAME_MAX];
    int ndim;
    int64_t shape[4];
    size_t numel;
    size_t off;    /* into params (or buffers for running statistics) */
    int is_buffer; /* running statistics: not trained, no gradient */
    int frozen;
} nn_tensor;

struct nn_model {
    nn_config cfg;
    char *arch; /* cfg.arch points here */
    const nn_backend *be;
    void *bctx;              /* be's context (the worker pool on the CPU) */
    struct nn_pool *workers; /* the CPU backend's threads (pool.h), the model's own */
    int be_fp32;             /* NN_DEVICE_FP32 was asked for */
    nn_tensor tensors[NN_MAX_TENSORS];
    int ntensors;
    /* The host copy: what files, tests and tools read and write. */
    float *params, *grads, *adam_m, *adam_v;
    size_t nparams;
    float *buffers;
    size_t nbuffers;
    /* The same in the backend's memory: the host pointers themselves on the
     * CPU, device copies on a GPU (uploaded by nn_model_set_device, read back
     * tensor by tensor by nn_model_tensor and whole by nn_model_save). */
    float *bparams, *bgrads, *badam_m, *badam_v, *bbuffers;
    float *stat; /* BN batch mean and rstd of the last forward (backend memory) */
    size_t nstat;
    long adam_t;
    int training;
    uint64_t rng;

    nn_stack cnn;     /* features then classifier */
    int feat_end;     /* layers [0, feat_end) of cnn are the features */
    int feat_size;    /* floats per slice out of the features */
    nn_stack head;    /* dense.0 .. dense.7 then out */
    int lstm_t[2][4]; /* tensor indices: wih, whh, bih, bhh per direction */

    float *fold; /* conv weights with an eval batch-norm folded in: max over conv layers */
    /* CNN scratch, for col_cap samples */
    int col_cap;
    float *col;
    int32_t *pool_idx; /* max-pool argmax when no cache is kept */
    /* host inputs staged into backend memory (not used on the CPU) */
    float *xin, *din;
    size_t xin_cap, din_cap;
    /* LRCN workspaces */
    int lcap;
    float *feat, *dfeat, *lstm_out, *dlstm_out, *lstm_cache, *lstm_work;
    int *len; /* copy of the last LRCN forward's lengths */
    int nseries, len_cap;
    int lrcn_n;
    const float *lrcn_feat; /* the features the last LRCN forward read */
    int lrcn_cnn_grad;      /* its backward continues into the CNN */

    char *meta_k[NN_MAX_META], *meta_v[NN_MAX_META];
    int nmeta;
};

/* Slices per CNN call at inference: bounds the workspaces for 1000-slice
 * series (lrcn.c), and so the largest layer a model may have (model.c). */
#define NN_INFER_BATCH 32

/* model.c: nn_model_create without the metadata a new model starts with
 * (windows, labels, thresholds, preprocessing, provenance): only the keys
 * of its architecture (format, arch, input, lstm_hidden, dense,
 * dense_dropout). nn_model_load adds the file's own, and no others. */
nn_model *nn_model_build(const nn_config *c, char *err, size_t errlen);

/* arch.c: layers, tensor table (sizes only) and stack layouts from m->cfg;
 * then, once the buffers exist, the initial weights from m->cfg.seed. */
int nn_arch_build(nn_model *m, char *err, size_t errlen);
void nn_arch_init_weights(nn_model *m);

/* stack.c */
int nn_stack_reserve(nn_model *m, nn_stack *st, int n, int cache);
/* Runs layers [0, end) on in [n, in_size]. cache: keep what backward needs
 * (stack cache), else ping-pong buffers. training: batch statistics and
 * dropout (only with cache). Returns the output buffer (borrowed). */
const float *nn_stack_forward(nn_model *m, nn_stack *st, const float *in, int n, int end, int cache,
                              int training);
/* Backward through the layers of the last caching forward; dx may be NULL. */
void nn_stack_backward(nn_model *m, nn_stack *st, const float *dout, float *dx);
/* The same, adding dextra (backend memory, n x the input of layer at) to the
 * gradient that reaches the input of layer at (at > 0). */
void nn_stack_backward_at(nn_model *m, nn_stack *st, const float *dout, float *dx, int at,
                          const float *dextra);
/* lrcn.c */
void nn_lrcn_free_workspace(nn_model *m);
/* Backend-memory views of tensor t (the host ones on the CPU). */
float *nn_tensor_grad(nn_model *m, int t); /* NULL when frozen or t < 0 */
float *nn_tensor_data(nn_model *m, int t); /* NULL when t < 0 */
/* model.c: frees every workspace in backend memory (stacks, CNN scratch,
 * LRCN buffers, staging); they grow again on the next call. */
void nn_model_free_workspaces(nn_model *m);
/* Copies the backend's parameters and running statistics to the host copy. */
void nn_model_sync_host(nn_model *m);
/* 0, or NN_EIO after a backend failure (reason in the backend's status). */
int nn_model_be_check(nn_model *m);

#endif

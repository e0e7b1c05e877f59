/* nn/nn.h: the public interface of the neural-network library.
 *
 * One object, nn_model, holds an LRCN: a CNN (the "features" part, then a
 * stage-1 "classifier" head with one logit per label) that turns each slice
 * [3, H, W] into a feature vector, a bidirectional LSTM across the slices of
 * each series, two shared dense blocks per step and one logit per label per
 * slice. Tensor names, layouts and the matching PyTorch module are in
 * docs/model-format.md, which is normative.
 *
 * Batches of series are PACKED: slices of all series back to back, series s
 * holding lengths[s] slices (1..NN_MAX_SERIES_LEN); nothing is padded, and
 * each series runs through the LSTM over exactly its own slices.
 *
 * Errors: functions return 0 or a negative NN_E* code; those that take
 * err/errlen write a one-line reason there. A model is not thread-safe; use
 * one per thread. Workspaces grow to the largest batch seen and are reused,
 * so a steady training or inference loop does not allocate.
 *
 * Typical use:
 *   inference  m = nn_model_load(path, ...); nn_lrcn_predict(m, x, len, S, prob);
 *   stage 1    nn_model_set_training(m, 1); loop { nn_model_zero_grad(m);
 *              nn_cnn_forward(m, x, n, logits); loss = nn_bce_logits(dl, ...);
 *              nn_cnn_backward(m, dl); nn_model_adam_step(m, &adam); }
 *   stage 2    nn_model_freeze(m, "cnn.", 1); same loop with nn_lrcn_forward /
 *              nn_lrcn_backward (or nn_cnn_features once per series and
 *              nn_lrcn_forward_features, since a frozen CNN never changes). */
#ifndef NN_NN_H
#define NN_NN_H

#include <stddef.h>
#include <stdint.h>

#include "layers.h"

#define NN_MAX_SERIES_LEN 1000
#define NN_MAX_LABELS 16
/* RSNA 2019's weighted log loss: "any" counts twice. For nn_bce_logits'
 * label_w with the default label order. */
#define NN_RSNA_LABEL_WEIGHTS                                                                      \
    {                                                                                              \
        2.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f                                                         \
    }

enum {
    NN_OK = 0,
    NN_EINVAL = -1, /* bad argument or shape */
    NN_ENOMEM = -2,
    NN_EIO = -3,
    NN_EFORMAT = -4, /* weights or data that do not fit the model (train/ uses it) */
};

typedef struct nn_model nn_model;

typedef struct nn_config {
    const char *arch;     /* "small" (default), "vgg19", or a spec string, see model-format.md */
    int in_c, in_h, in_w; /* input slice: 3 x 128 x 128 */
    int labels; /* 6: any, epidural, intraparenchymal, intraventricular, subarachnoid, subdural */
    int lstm_hidden;     /* per direction, 100 */
    int dense;           /* width of the two per-step dense blocks, 100 */
    float dense_dropout; /* dropout after each dense block, 0.5 */
    uint64_t seed;       /* initial weights and dropout masks */
} nn_config;

void nn_config_default(nn_config *c);

/* A freshly initialised model (PyTorch's default initialisation, from seed).
 * Caller owns the result: nn_model_free(). NULL with err on failure. */
nn_model *nn_model_create(const nn_config *c, char *err, size_t errlen);
/* Reads a safetensors model (into memory), builds the architecture its metadata
 * names and copies every tensor; a tensor missing, extra, of the wrong dtype
 * or shape is refused by name, as is a file without 'arch' or 'input'. The
 * model's metadata is the file's: nothing of nn_model_create's (windows,
 * labels, thresholds, provenance) stands in for a key it lacks. Caller owns
 * the result. */
nn_model *nn_model_load(const char *path, char *err, size_t errlen);
/* Writes every tensor and the metadata; returns 0 or NN_EIO. */
int nn_model_save(const nn_model *m, const char *path, char *err, size_t errlen);
/* The optimizer's state (Adam's moments, PyTorch's names "<param>.exp_avg"
 * and ".exp_avg_sq", and its step count) in a file of its own, so that a run
 * resumed from a checkpoint goes on exactly as an uninterrupted one. Loading
 * refuses a file of another model by name; on failure the state is fresh
 * (zero moments, step 0). Return 0 or an error code with err. */
int nn_model_save_optimizer(nn_model *m, const char *path, char *err, size_t errlen);
int nn_model_load_optimizer(nn_model *m, const char *path, char *err, size_t errlen);
/* Fresh moments and step 0, as for a new run. */
void nn_model_reset_optimizer(nn_model *m);
/* Adam steps taken so far (the step count of the bias corrections). */
long nn_model_optimizer_steps(const nn_model *m);
void nn_model_free(nn_model *m);

/* The architecture the model was built with (borrowed). */
const nn_config *nn_model_config(const nn_model *m);
int nn_model_feature_size(const nn_model *m); /* CNN feature vector per slice */

/* Metadata (string keys and values, stored in the file's __metadata__).
 * get: borrowed, valid until the key is set again or the model freed; NULL if
 * absent. set copies both strings; NULL value removes the key. */
const char *nn_model_meta_get(const nn_model *m, const char *key);
int nn_model_meta_set(nn_model *m, const char *key, const char *value);

/* Re-seeds the dropout random stream (weights are seeded by nn_config.seed). */
void nn_model_seed(nn_model *m, uint64_t seed);
/* Training mode: batch-norm uses batch statistics and updates its running
 * ones, dropout drops. A batch-norm layer whose weights are frozen always
 * behaves as in eval mode. Models start in eval mode. */
void nn_model_set_training(nn_model *m, int training);
/* Freezes (or unfreezes) every tensor whose name starts with prefix, for
 * example "cnn." or "cnn.features.0."; returns how many matched. Frozen
 * tensors get no gradient and Adam leaves them alone. */
int nn_model_freeze(nn_model *m, const char *prefix, int frozen);

/* Tensors by index or name, for tests and tools. data and grad are borrowed
 * (grad is NULL for running statistics). */
typedef struct nn_tensor_info {
    const char *name;
    int ndim;
    int64_t shape[4];
    size_t numel;
    float *data;
    float *grad;
    int frozen;
} nn_tensor_info;
int nn_model_tensor_count(const nn_model *m);
int nn_model_tensor(const nn_model *m, int i, nn_tensor_info *out);
int nn_model_tensor_find(const nn_model *m, const char *name, nn_tensor_info *out);
size_t nn_model_param_count(const nn_model *m); /* trainable + frozen floats */
/* The model's whole state as one vector, for weight averaging (`ichtriage
 * train --ema`): every parameter, then every running statistic,
 * nn_model_state_size floats. get copies it out; set replaces the model's
 * with src (on a GPU, both cross to or from the device). */
size_t nn_model_state_size(const nn_model *m);
void nn_model_state_get(const nn_model *m, float *dst);
void nn_model_state_set(nn_model *m, const float *src);

/* ---- inference (eval mode always, no cache kept) ------------------------ */
/* x [n, in_c, in_h, in_w] -> feat [n, nn_model_feature_size()]. */
int nn_cnn_features(nn_model *m, const float *x, int n, float *feat);
/* Stage-1 logits [n, labels] of the CNN with its classifier head. */
int nn_cnn_predict(nn_model *m, const float *x, int n, float *logits);
/* Packed series (see above) -> prob [sum(lengths), labels], sigmoid applied. */
int nn_lrcn_predict(nn_model *m, const float *x, const int *lengths, int nseries, float *prob);

/* ---- training ------------------------------------------------------------
 * Each forward keeps what its backward needs; backward ACCUMULATES parameter
 * gradients (call nn_model_zero_grad first) from d loss / d logits, which
 * must have the shape of the logits just produced. Mode: nn_model_set_training. */
int nn_cnn_forward(nn_model *m, const float *x, int n, float *logits); /* [n, labels] */
int nn_cnn_backward(nn_model *m, const float *dlogits);
/* Localisation in training: the CNN's last feature map, the input of the
 * global pool (G or GM) that ends its features. Its shape; and after a
 * training nn_cnn_forward, the map itself [n, c, h, w] (host memory).
 * nn_cnn_backward_map is nn_cnn_backward with a gradient for that map as
 * well (dmap [n, c, h, w]: a second loss on it, its gradient added to what
 * flows back through the pool). Each returns 0, or NN_EINVAL when the
 * features end in no global pool or no training forward came before. */
int nn_cnn_map_shape(const nn_model *m, int *c, int *h, int *w);
int nn_cnn_map(nn_model *m, float *map);
int nn_cnn_backward_map(nn_model *m, const float *dlogits, const float *dmap);
/* logits [sum(lengths), labels]. With the CNN trainable this keeps every CNN
 * activation of every slice (about 9 MB per 128x128 slice of `small`, plus
 * gradient buffers); with the CNN frozen (stage 2) the CNN runs in chunks
 * and only the LSTM and head keep state. */
int nn_lrcn_forward(nn_model *m, const float *x, const int *lengths, int nseries, float *logits);
/* Same from precomputed CNN features [sum(lengths), feature_size]; its
 * backward stops at the features. */
int nn_lrcn_forward_features(nn_model *m, const float *feat, const int *lengths, int nseries,
                             float *logits);
int nn_lrcn_backward(nn_model *m, const float *dlogits);
void nn_model_zero_grad(nn_model *m);

typedef struct nn_adam {
    float lr;           /* 1e-4 */
    float beta1, beta2; /* 0.9, 0.999 */
    float eps;          /* 1e-8 */
    float weight_decay; /* 0 */
    int decoupled;      /* 1: AdamW (decay the weights), 0: Adam (decay added to the gradient) */
} nn_adam;
void nn_adam_default(nn_adam *a);
/* One Adam step over every unfrozen parameter; the step count lives in m. */
void nn_model_adam_step(nn_model *m, const nn_adam *a);

/* ---- devices -------------------------------------------------------------
 * A model computes on the CPU (OpenBLAS) until nn_model_set_device moves it.
 * device: "cpu", "cuda" (the first GPU, when the library was built with
 * nn/cuda/) or "auto" (cuda when a GPU is present, else cpu). Moving uploads
 * the weights, running statistics, gradients and Adam moments; the public
 * calls above keep taking and returning HOST buffers. While on a GPU the
 * device copy is the model: nn_model_tensor and nn_model_save read it back,
 * and host writes through nn_model_tensor's pointers reach it only by calling
 * nn_model_set_device again. Returns 0, or a negative code with err (the
 * model then stays on the CPU). */
#define NN_DEVICE_FP32 1 /* plain fp32 on the GPU: TF32 off everywhere (tests) */
int nn_model_set_device(nn_model *m, const char *device, int flags, char *err, size_t errlen);
const char *nn_model_device(const nn_model *m); /* "cpu" or "cuda" */
/* GPUs the CUDA backend can use: 0 when none is present or nn/cuda/ is not
 * built in. */
int nn_cuda_device_count(void);
int nn_cuda_built(void); /* 1 when nn/cuda/'s module was built with the library */

/* Sets the threads each model created from now on computes with on the
 * CPU (its own worker pool, nn/pool.h, the caller included). By default
 * OpenBLAS's count: OPENBLAS_NUM_THREADS, else every core. OpenBLAS itself
 * then runs on one thread: nn/ splits the matrix products. */
void nn_set_threads(int n);

/* OpenBLAS's kernels (nn/blas.c). OpenBLAS picks them when it loads, from
 * the CPU's model number; a CPU it does not know gets the slowest,
 * Prescott's, even where AVX2 or AVX-512 would run 2-3x faster. */
const char *nn_blas_core(void); /* the kernels in use, e.g. "Haswell" */
/* What OpenBLAS had chosen by itself where nn_blas_rerun() replaced it
 * ("Prescott"), else NULL. */
const char *nn_blas_fallback(void);
#define NN_CPU_AVX2_FMA 1u
#define NN_CPU_AVX512 2u        /* F, CD, BW, DQ and VL */
unsigned nn_cpu_features(void); /* NN_CPU_* of this CPU */
/* The kernels to ask for instead of chosen, given the CPU's NN_CPU_*
 * features: "SkylakeX" or "Haswell" where chosen is OpenBLAS's fallback
 * (Prescott) and the CPU can run them; NULL where chosen stands. */
const char *nn_blas_better_core(const char *chosen, unsigned features);
/* First thing in main(), before any thread or open file: where OpenBLAS fell
 * back to Prescott on a CPU that can run better kernels, and
 * OPENBLAS_CORETYPE is not set, sets it (and ICHTRIAGE_OPENBLAS_CHOSE to
 * what OpenBLAS chose) and runs the program again with the same arguments
 * (execv of its own path, from /proc/self/exe: same process, same pid).
 * Returns 0 when there was nothing to do; -1 with err when the exec failed
 * (the program goes on with the slow kernels). */
int nn_blas_rerun(char **argv, char *err, size_t errlen);

#endif

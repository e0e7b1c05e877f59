/* tests/nn/test_cuda_model.c: whole models on both backends. Two copies of
 * one model (same seed, so the same weights and dropout masks), one moved to
 * the GPU in fp32 mode: inference outputs, training logits, EVERY parameter
 * gradient, the weights and running statistics after Adam steps, stage 1
 * (the CNN alone, also with a loss on its last feature map), stage 2 (frozen CNN, precomputed
 * features), saving from the GPU, moving back to the CPU, and the state vector of
 * weight averaging. A small LRCN with batch-norm, and
 * VGG19's LRCN at 32x32 (all 16 convolutions, the flatten and the 1000-wide
 * dense layers). Exits 77 (skipped) when no GPU is present. */
#include "cuda_check.h"

#include <unistd.h>

#define LABELS 6

typedef struct pair {
    nn_model *cpu, *gpu;
    const char *name;
    size_t in_size;
    const char *const *noise; /* NULL-terminated */
} pair;

/* Biases right before a train-mode batch-norm: their gradient is zero in
 * exact arithmetic, so both sides hold rounding noise of either sign, and
 * Adam (which normalises the gradient) would move them by +-lr at random.
 * They stay frozen in these tests; the rest is compared. */
static void freeze_noise(pair *p)
{
    for (int i = 0; p->noise && p->noise[i]; i++) {
        nn_model_freeze(p->cpu, p->noise[i], 1);
        nn_model_freeze(p->gpu, p->noise[i], 1);
    }
}

static void unfreeze_all(pair *p)
{
    nn_model_freeze(p->cpu, "", 0);
    nn_model_freeze(p->gpu, "", 0);
    freeze_noise(p);
}

static nn_model *make(const char *arch, int hw, int hidden, char *err, size_t errlen)
{
    nn_config c;
    nn_config_default(&c);
    c.arch = arch;
    c.in_h = c.in_w = hw;
    c.lstm_hidden = hidden;
    c.dense = 10;
    c.seed = 7;
    return nn_model_create(&c, err, errlen);
}

static int make_pair(check_ctx *t, pair *p, const char *name, const char *arch, int hw, int hidden,
                     const char *const *noise)
{
    char err[256] = "";
    p->name = name;
    p->noise = noise;
    p->cpu = make(arch, hw, hidden, err, sizeof(err));
    p->gpu = make(arch, hw, hidden, err, sizeof(err));
    if (!p->cpu || !p->gpu) {
        printf("FAIL %s: create: %s\n", name, err);
        t->failures++;
        return -1;
    }
    if (nn_model_set_device(p->gpu, "cuda", NN_DEVICE_FP32, err, sizeof(err)) != 0) {
        printf("FAIL %s: set_device cuda: %s\n", name, err);
        t->failures++;
        return -1;
    }
    check_true(t, "model reports device cuda", strcmp(nn_model_device(p->gpu), "cuda") == 0);
    p->in_size = 3 * (size_t)hw * hw;
    freeze_noise(p);
    return 0;
}

/* Every gradient (or, with data, every tensor) of the GPU model against the
 * CPU one. A tensor's floor is 1e-4 of the model's largest squared entry per
 * element: gradients that are zero in exact arithmetic (a conv bias right
 * before a train-mode batch-norm) hold rounding noise on both sides. */
static void compare_tensors(check_ctx *t, pair *p, const char *stage, int data)
{
    double top = 0.0;
    for (int i = 0; i < nn_model_tensor_count(p->cpu); i++) {
        nn_tensor_info a;
        nn_model_tensor(p->cpu, i, &a);
        const float *v = data ? a.data : a.grad;
        if (!v || (!data && a.frozen)) continue;
        for (size_t k = 0; k < a.numel; k++)
            top = fmax(top, fabs(v[k]));
    }
    int compared = 0;
    for (int i = 0; i < nn_model_tensor_count(p->cpu); i++) {
        nn_tensor_info a, b;
        nn_model_tensor(p->cpu, i, &a);
        nn_model_tensor(p->gpu, i, &b);
        const float *va = data ? a.data : a.grad, *vb = data ? b.data : b.grad;
        if (!va || (!data && a.frozen)) continue;
        char what[160];
        snprintf(what, sizeof(what), "%s %s %s %s", p->name, stage, data ? "data" : "grad", a.name);
        check_nmse(t, what, vb, va, a.numel, 1e-4 * top * top * (double)a.numel);
        compared++;
    }
    char what[128];
    snprintf(what, sizeof(what), "%s %s: compared %d tensors", p->name, stage, compared);
    check_true(t, what, compared > 0);
}

static void lrcn_train_steps(check_ctx *t, pair *p, const int *len, int S, int steps)
{
    int N = 0;
    for (int s = 0; s < S; s++)
        N += len[s];
    float *x = host_random((size_t)N * p->in_size, 5), *y = host_random((size_t)N * LABELS, 6);
    for (int i = 0; i < N * LABELS; i++)
        y[i] = y[i] > 0.2f;
    float *la = malloc(sizeof(float) * N * LABELS), *lb = malloc(sizeof(float) * N * LABELS);
    float *da = malloc(sizeof(float) * N * LABELS), *db = malloc(sizeof(float) * N * LABELS);
    nn_adam adam;
    nn_adam_default(&adam);
    adam.lr = 1e-3f;
    nn_model_seed(p->cpu, 99);
    nn_model_seed(p->gpu, 99);
    nn_model_set_training(p->cpu, 1);
    nn_model_set_training(p->gpu, 1);
    for (int step = 0; step < steps; step++) {
        char what[128];
        nn_model_zero_grad(p->cpu);
        nn_model_zero_grad(p->gpu);
        int ra = nn_lrcn_forward(p->cpu, x, len, S, la),
            rb = nn_lrcn_forward(p->gpu, x, len, S, lb);
        snprintf(what, sizeof(what), "%s lrcn forward step %d returns 0 on both", p->name, step);
        check_true(t, what, ra == 0 && rb == 0);
        snprintf(what, sizeof(what), "%s lrcn train logits step %d", p->name, step);
        check_nmse(t, what, lb, la, (size_t)N * LABELS, 0.0);
        /* each side its own loss gradient: the difference stays in the models */
        nn_bce_logits(da, la, y, NULL, NULL, N, LABELS);
        nn_bce_logits(db, lb, y, NULL, NULL, N, LABELS);
        ra = nn_lrcn_backward(p->cpu, da);
        rb = nn_lrcn_backward(p->gpu, db);
        snprintf(what, sizeof(what), "%s lrcn backward step %d returns 0 on both", p->name, step);
        check_true(t, what, ra == 0 && rb == 0);
        snprintf(what, sizeof(what), "lrcn step %d", step);
        compare_tensors(t, p, what, 0);
        nn_model_adam_step(p->cpu, &adam);
        nn_model_adam_step(p->gpu, &adam);
        snprintf(what, sizeof(what), "after adam %d", step);
        compare_tensors(t, p, what, 1);
    }
    nn_model_set_training(p->cpu, 0);
    nn_model_set_training(p->gpu, 0);
    free(x), free(y), free(la), free(lb), free(da), free(db);
}

static void inference(check_ctx *t, pair *p, const int *len, int S)
{
    int N = 0;
    for (int s = 0; s < S; s++)
        N += len[s];
    int F = nn_model_feature_size(p->cpu);
    float *x = host_random((size_t)N * p->in_size, 3);
    size_t nf = (size_t)N * F, nl = (size_t)N * LABELS;
    float *a = malloc(sizeof(float) * (nf > nl ? nf : nl)),
          *b = malloc(sizeof(float) * (nf > nl ? nf : nl));
    char what[128];
    nn_lrcn_predict(p->cpu, x, len, S, a);
    check_true(t, "lrcn predict on the GPU returns 0", nn_lrcn_predict(p->gpu, x, len, S, b) == 0);
    snprintf(what, sizeof(what), "%s lrcn predict (eval)", p->name);
    check_nmse(t, what, b, a, nl, 0.0);
    nn_cnn_predict(p->cpu, x, N, a);
    nn_cnn_predict(p->gpu, x, N, b);
    snprintf(what, sizeof(what), "%s cnn predict (eval)", p->name);
    check_nmse(t, what, b, a, nl, 0.0);
    nn_cnn_features(p->cpu, x, N, a);
    nn_cnn_features(p->gpu, x, N, b);
    snprintf(what, sizeof(what), "%s cnn features (eval)", p->name);
    check_nmse(t, what, b, a, nf, 0.0);
    free(x), free(a), free(b);
}

/* Stage 1 on both: the CNN alone learns, in training mode, from zero gradients. */
static void stage1_begin(pair *p)
{
    nn_model_freeze(p->cpu, "lstm.", 1), nn_model_freeze(p->gpu, "lstm.", 1);
    nn_model_freeze(p->cpu, "dense.", 1), nn_model_freeze(p->gpu, "dense.", 1);
    nn_model_freeze(p->cpu, "out.", 1), nn_model_freeze(p->gpu, "out.", 1);
    nn_model_set_training(p->cpu, 1);
    nn_model_set_training(p->gpu, 1);
    nn_model_zero_grad(p->cpu);
    nn_model_zero_grad(p->gpu);
}

static void stage1(check_ctx *t, pair *p, int n)
{
    float *x = host_random((size_t)n * p->in_size, 8), *y = host_random((size_t)n * LABELS, 9);
    for (int i = 0; i < n * LABELS; i++)
        y[i] = y[i] > 0.0f;
    float *la = malloc(sizeof(float) * n * LABELS), *lb = malloc(sizeof(float) * n * LABELS);
    float *dl = malloc(sizeof(float) * n * LABELS);
    stage1_begin(p);
    nn_cnn_forward(p->cpu, x, n, la);
    nn_cnn_forward(p->gpu, x, n, lb);
    char what[128];
    snprintf(what, sizeof(what), "%s stage-1 cnn logits", p->name);
    check_nmse(t, what, lb, la, (size_t)n * LABELS, 0.0);
    nn_bce_logits(dl, la, y, NULL, NULL, n, LABELS);
    nn_cnn_backward(p->cpu, dl);
    nn_bce_logits(dl, lb, y, NULL, NULL, n, LABELS);
    nn_cnn_backward(p->gpu, dl);
    compare_tensors(t, p, "stage 1", 0);
    unfreeze_all(p);
    nn_model_set_training(p->cpu, 0);
    nn_model_set_training(p->gpu, 0);
    free(x), free(y), free(la), free(lb), free(dl);
}

/* Stage 1 with a second loss on the last feature map (train --loc-loss):
 * the map read back from the GPU, and its gradient added on the GPU. */
static void stage1_map(check_ctx *t, pair *p, int n)
{
    int c, h, w;
    if (nn_cnn_map_shape(p->cpu, &c, &h, &w) != 0) {
        check_true(t, "stage-1 map: the model has one", 0);
        return;
    }
    size_t nm = (size_t)n * c * h * w;
    float *x = host_random((size_t)n * p->in_size, 10), *dl = host_random((size_t)n * LABELS, 11);
    float *dm = host_random(nm, 12), *ma = malloc(sizeof(float) * nm);
    float *mb = malloc(sizeof(float) * nm), *lg = malloc(sizeof(float) * n * LABELS);
    stage1_begin(p);
    nn_cnn_forward(p->cpu, x, n, lg);
    nn_cnn_forward(p->gpu, x, n, lg);
    check_true(t, "stage-1 map read on both",
               nn_cnn_map(p->cpu, ma) == 0 && nn_cnn_map(p->gpu, mb) == 0);
    char what[128];
    snprintf(what, sizeof(what), "%s stage-1 last feature map", p->name);
    check_nmse(t, what, mb, ma, nm, 0.0);
    check_true(t, "stage-1 backward with the map's gradient on both",
               nn_cnn_backward_map(p->cpu, dl, dm) == 0 &&
                   nn_cnn_backward_map(p->gpu, dl, dm) == 0);
    compare_tensors(t, p, "stage 1 with a map loss", 0);
    unfreeze_all(p);
    nn_model_set_training(p->cpu, 0);
    nn_model_set_training(p->gpu, 0);
    free(x), free(dl), free(dm), free(ma), free(mb), free(lg);
}

/* Stage 2: CNN frozen, so the LRCN runs the CNN in eval chunks and only the
 * LSTM and head learn; and the same from precomputed features. */
static void stage2(check_ctx *t, pair *p, const int *len, int S)
{
    nn_model_freeze(p->cpu, "cnn.", 1);
    nn_model_freeze(p->gpu, "cnn.", 1);
    lrcn_train_steps(t, p, len, S, 2);
    int N = 0;
    for (int s = 0; s < S; s++)
        N += len[s];
    int F = nn_model_feature_size(p->cpu);
    float *feat = host_random((size_t)N * F, 12), *la = malloc(sizeof(float) * N * LABELS);
    float *lb = malloc(sizeof(float) * N * LABELS), *dl = malloc(sizeof(float) * N * LABELS);
    nn_model_set_training(p->cpu, 1);
    nn_model_set_training(p->gpu, 1);
    nn_model_seed(p->cpu, 3);
    nn_model_seed(p->gpu, 3);
    nn_model_zero_grad(p->cpu);
    nn_model_zero_grad(p->gpu);
    nn_lrcn_forward_features(p->cpu, feat, len, S, la);
    nn_lrcn_forward_features(p->gpu, feat, len, S, lb);
    char what[128];
    snprintf(what, sizeof(what), "%s stage-2 logits from features", p->name);
    check_nmse(t, what, lb, la, (size_t)N * LABELS, 0.0);
    for (int i = 0; i < N * LABELS; i++)
        dl[i] = 0.01f * (float)((i * 7) % 13 - 6);
    nn_lrcn_backward(p->cpu, dl);
    nn_lrcn_backward(p->gpu, dl);
    compare_tensors(t, p, "stage 2 features", 0);
    unfreeze_all(p);
    nn_model_set_training(p->cpu, 0);
    nn_model_set_training(p->gpu, 0);
    free(feat), free(la), free(lb), free(dl);
}

static int same_tensors(nn_model *a, nn_model *b)
{
    int same = 1;
    for (int i = 0; i < nn_model_tensor_count(a); i++) {
        nn_tensor_info x, y;
        nn_model_tensor(a, i, &x);
        nn_model_tensor(b, i, &y);
        same &= memcmp(x.data, y.data, sizeof(float) * x.numel) == 0;
    }
    return same;
}

/* Saving from the GPU writes the device's weights; moving back to the CPU
 * keeps them. */
static void save_and_move(check_ctx *t, pair *p)
{
    char path[] = "/tmp/nn-cuda-test-XXXXXX", err[256] = "";
    int fd = mkstemp(path);
    if (fd >= 0) close(fd);
    check_true(t, "save from the GPU", nn_model_save(p->gpu, path, err, sizeof(err)) == 0);
    nn_model *back = nn_model_load(path, err, sizeof(err));
    check_true(t, "load what the GPU saved", back != NULL);
    unlink(path);
    if (!back) return;
    check_true(t, "saved file holds the device's tensors bit for bit", same_tensors(back, p->gpu));
    check_true(t, "move back to the CPU",
               nn_model_set_device(p->gpu, "cpu", 0, err, sizeof(err)) == 0 &&
                   strcmp(nn_model_device(p->gpu), "cpu") == 0);
    check_true(t, "weights survive the move back", same_tensors(back, p->gpu));
    check_true(t, "auto picks cuda when a GPU is present",
               nn_model_set_device(p->gpu, "auto", NN_DEVICE_FP32, err, sizeof(err)) == 0 &&
                   strcmp(nn_model_device(p->gpu), "cuda") == 0);
    nn_model_free(back);
}

/* The state vector (train --ema): what is set reaches the device, and the
 * GPU then computes what the CPU does with the same state. */
static void state_vector(check_ctx *t, pair *p, const int *len, int S)
{
    size_t n = nn_model_state_size(p->cpu);
    check_true(t, "state vectors of the same size", nn_model_state_size(p->gpu) == n);
    float *v = malloc(n * sizeof *v), *w = malloc(n * sizeof *w);
    nn_model_state_get(p->cpu, v);
    for (size_t i = 0; i < n; i++)
        v[i] *= 0.9f; /* running variances stay positive */
    nn_model_state_set(p->cpu, v);
    nn_model_state_set(p->gpu, v);
    nn_model_state_get(p->gpu, w);
    check_true(t, "the device holds the state set, bit for bit", memcmp(v, w, n * sizeof *v) == 0);
    inference(t, p, len, S);
    free(v), free(w);
}

static void free_pair(pair *p)
{
    nn_model_free(p->cpu);
    nn_model_free(p->gpu);
}

int main(void)
{
    if (nn_cuda_device_count() < 1 || !nn_backend_cuda()) {
        printf("SKIP: no GPU present (or nn/cuda/ not built); nothing was compared\n");
        return SKIP;
    }
    check_ctx t = {0};
    static const char *const small_noise[] = {"cnn.features.0.bias", "cnn.features.7.bias",
                                              "dense.0.bias", "dense.4.bias", NULL};
    static const char *const vgg_noise[] = {"dense.0.bias", "dense.4.bias", NULL};
    pair small = {0}, vgg = {0};
    int len[3] = {3, 1, 5}, len2[2] = {4, 4};
    /* batch-norm in the CNN (train and folded-eval paths), GAP, a classifier with dropout */
    if (make_pair(&t, &small, "small", "b8,M,c16,M,b16,G|d12,D0.5", 16, 8, small_noise) == 0) {
        inference(&t, &small, len, 3);
        lrcn_train_steps(&t, &small, len, 3, 3);
        inference(&t, &small, len2, 2); /* after training: running statistics moved */
        stage1(&t, &small, 6);
        stage1_map(&t, &small, 6);
        stage2(&t, &small, len, 3);
        save_and_move(&t, &small);
        state_vector(&t, &small, len, 3);
        lrcn_train_steps(&t, &small, len2, 2, 1); /* and back on the GPU again */
    }
    free_pair(&small);
    int vlen[2] = {3, 2};
    if (make_pair(&t, &vgg, "vgg19@32", "vgg19", 32, 16, vgg_noise) == 0) {
        inference(&t, &vgg, vlen, 2);
        lrcn_train_steps(&t, &vgg, vlen, 2, 1);
    }
    free_pair(&vgg);
    printf("%d of %d checks failed\n", t.failures, t.checks);
    return t.failures ? 1 : 0;
}

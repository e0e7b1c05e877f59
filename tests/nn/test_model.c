/* tests/nn/test_model.c: whole models against PyTorch (a tiny LRCN and a tiny
 * stage-1 CNN: logits, loss, every gradient, losses over Adam steps; the
 * `small` preset made and saved by PyTorch, loaded and run here), and the
 * model-level behaviour: masking across series, freezing, seeding, saving. */
#include "nn_test.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const float label_w[6] = NN_RSNA_LABEL_WEIGHTS, pos_w[6] = {3, 2, 2, 2, 2, 2};

static nn_model *load(const char *name)
{
    char path[512], err[256] = "";
    snprintf(path, sizeof(path), "%s/%s", NN_REF_DIR, name);
    nn_model *m = nn_model_load(path, err, sizeof(err));
    cr_assert(m, "load %s: %s", name, err);
    return m;
}

/* Every grad.* tensor of ref against ours. A bias right before a train-mode
 * batch-norm has a gradient that is zero in exact arithmetic (the norm takes
 * the mean out), so both sides hold rounding noise: the scale of a tensor's
 * error is at least 1% of the largest gradient in the model. */
static void check_grads(nn_model *m, const nn_st_file *ref)
{
    int checked = 0, expected = 0;
    double top = 0.0;
    for (int i = 0; i < nn_st_count(ref); i++) {
        const nn_st_tensor *t = nn_st_at(ref, i);
        if (strncmp(t->name, "grad.", 5) != 0) continue;
        expected++;
        size_t n;
        float *g = ref_f32(ref, t->name, &n);
        for (size_t k = 0; k < n; k++)
            top = fmax(top, fabs(g[k]));
        free(g);
    }
    for (int i = 0; i < nn_model_tensor_count(m); i++) {
        nn_tensor_info t;
        nn_model_tensor(m, i, &t);
        char key[128];
        snprintf(key, sizeof(key), "grad.%s", t.name);
        if (!nn_st_find(ref, key)) continue;
        size_t n;
        float *g = ref_f32(ref, key, &n);
        cr_assert_eq(n, t.numel, "%s: gradient size", t.name);
        double diff = 0.0, scale = 0.01 * top;
        for (size_t k = 0; k < n; k++) {
            diff = fmax(diff, fabs((double)t.grad[k] - g[k]));
            scale = fmax(scale, fabs(g[k]));
        }
        cr_expect(diff <= NN_TOL_GRAD * scale, "%s: error %.3g > %.3g", key, diff,
                  NN_TOL_GRAD * scale);
        free(g);
        checked++;
    }
    cr_expect(checked == expected && checked >= 10, "compared %d of %d gradients", checked,
              expected);
}

/* Runs the same 4 steps as gen_reference.py; step 0 is also compared in full. */
static void train_like_torch(const char *model_file, const char *ref_file, int stage1,
                             const nn_adam *adam)
{
    nn_model *m = load(model_file);
    nn_st_file *ref = ref_open(ref_file);
    size_t nx, nl, ny;
    float *x = ref_f32(ref, "x", &nx), *y = ref_f32(ref, "y", &ny);
    float *rlog = ref_f32(ref, "logits", NULL), *losses = ref_f32(ref, "losses", NULL);
    int *len = ref_i32(ref, "lengths", &nl);
    int N = (int)(ny / 6);
    float *logits = calloc(ny, sizeof(float)), *dl = calloc(ny, sizeof(float));
    if (stage1) cr_assert_gt(nn_model_freeze(m, "lstm.", 1) + nn_model_freeze(m, "dense.", 1), 0);
    if (stage1) nn_model_freeze(m, "out.", 1);
    nn_model_set_training(m, 1);
    for (int step = 0; step < 4; step++) {
        nn_model_zero_grad(m);
        int rc =
            stage1 ? nn_cnn_forward(m, x, N, logits) : nn_lrcn_forward(m, x, len, (int)nl, logits);
        cr_assert_eq(rc, 0);
        float loss = nn_bce_logits(dl, logits, y, label_w, pos_w, N, 6);
        cr_assert_eq(stage1 ? nn_cnn_backward(m, dl) : nn_lrcn_backward(m, dl), 0);
        if (step == 0) {
            expect_close("logits", logits, rlog, ny, NN_TOL_OUT);
            check_grads(m, ref);
        }
        char what[32];
        snprintf(what, sizeof(what), "loss at step %d", step);
        expect_close(what, &loss, &losses[step], 1, NN_TOL_GRAD);
        nn_model_adam_step(m, adam);
    }
    free(x), free(y), free(rlog), free(losses), free(len), free(logits), free(dl);
    nn_st_close(ref);
    nn_model_free(m);
}

Test(model, tiny_lrcn_matches_torch)
{
    nn_adam a;
    nn_adam_default(&a);
    a.lr = 1e-2f;
    train_like_torch("tiny_lrcn.safetensors", "tiny_lrcn_ref.safetensors", 0, &a);
}

/* GM (AdaptiveMaxPool2d(1)) as the feature: one window over the whole map */
Test(model, tiny_global_max_pool_lrcn_matches_torch)
{
    nn_adam a;
    nn_adam_default(&a);
    a.lr = 1e-2f;
    train_like_torch("tiny_gmp.safetensors", "tiny_gmp_ref.safetensors", 0, &a);
}

Test(model, tiny_cnn_stage1_adamw_matches_torch)
{
    nn_adam a;
    nn_adam_default(&a);
    a.lr = 1e-2f;
    a.weight_decay = 0.1f;
    a.decoupled = 1;
    train_like_torch("tiny_cnn.safetensors", "tiny_cnn_ref.safetensors", 1, &a);
}

Test(model, small_preset_made_by_torch_predicts_the_same)
{
    nn_model *m = load("small_torch.safetensors");
    cr_expect_str_eq(nn_model_meta_get(m, "arch"), "small");
    cr_expect_str_eq(nn_model_meta_get(m, "provenance"), "gen_reference.py");
    cr_expect_eq(nn_model_feature_size(m), 256);
    nn_st_file *ref = ref_open("small_torch_ref.safetensors");
    size_t np, nl;
    float *x = ref_f32(ref, "x", NULL), *rp = ref_f32(ref, "prob", &np);
    int *len = ref_i32(ref, "lengths", &nl);
    float *prob = calloc(np, sizeof(float));
    cr_assert_eq(nn_lrcn_predict(m, x, len, (int)nl, prob), 0);
    expect_close("probabilities", prob, rp, np, NN_TOL_OUT);
    free(x), free(rp), free(len), free(prob);
    nn_st_close(ref);
    nn_model_free(m);
}

static nn_model *tiny(uint64_t seed, float dropout)
{
    nn_config c;
    nn_config_default(&c);
    c.arch = "b4,M,c6,G|";
    c.in_h = c.in_w = 8;
    c.lstm_hidden = 5;
    c.dense = 6;
    c.dense_dropout = dropout;
    c.seed = seed;
    char err[128];
    nn_model *m = nn_model_create(&c, err, sizeof(err));
    cr_assert(m, "%s", err);
    return m;
}

Test(model, series_in_a_batch_do_not_see_each_other)
{
    nn_model *m = tiny(5, 0.5f);
    int len[3] = {4, 1, 7}, one;
    size_t per = 3 * 8 * 8;
    float *x = calloc(12 * per, sizeof(float));
    fill_random(x, 12 * per, 11);
    float all[12 * 6], alone[12 * 6];
    cr_assert_eq(nn_lrcn_predict(m, x, len, 3, all), 0);
    for (int s = 0, off = 0; s < 3; off += len[s++]) {
        one = len[s];
        cr_assert_eq(nn_lrcn_predict(m, x + off * per, &one, 1, alone + off * 6), 0);
    }
    expect_close("batched vs one series at a time", all, alone, 12 * 6, 1e-6);
    int bad[2] = {3, 0}, big = NN_MAX_SERIES_LEN + 1;
    cr_expect_eq(nn_lrcn_predict(m, x, bad, 2, all), NN_EINVAL);
    cr_expect_eq(nn_lrcn_predict(m, x, &big, 1, all), NN_EINVAL);
    free(x);
    nn_model_free(m);
}

Test(model, a_thousand_slices)
{
    nn_model *m = tiny(6, 0.5f);
    int len = NN_MAX_SERIES_LEN;
    size_t per = 3 * 8 * 8;
    float *x = calloc(len * per, sizeof(float)), *p = calloc(len * 6, sizeof(float));
    fill_random(x, len * per, 12);
    cr_assert_eq(nn_lrcn_predict(m, x, &len, 1, p), 0);
    for (int i = 0; i < len * 6; i++)
        cr_assert(p[i] > 0.0f && p[i] < 1.0f, "prob[%d]=%g", i, p[i]);
    free(x), free(p);
    nn_model_free(m);
}

/* Finite weights whose first convolution overflows (+Inf - Inf = NaN): the
 * NaN must pass every ReLU and max-pool to the probabilities, where triage
 * fails the series (docs/model-format.md). Zeroed, it came out as a finite
 * and confident p. */
Test(model, an_overflow_in_the_first_layer_reaches_the_output)
{
    nn_model *m = tiny(6, 0.5f);
    nn_tensor_info t;
    cr_assert_eq(nn_model_tensor_find(m, "cnn.features.0.weight", &t), 0);
    for (size_t i = 0; i < t.numel; i++)
        t.data[i] = i % 2 ? -3e38f : 3e38f;
    int len = 3;
    size_t per = 3 * 8 * 8;
    float *x = calloc(len * per, sizeof(float)), p[3 * 6];
    fill_random(x, len * per, 12);
    cr_assert_eq(nn_lrcn_predict(m, x, &len, 1, p), 0);
    for (int i = 0; i < len * 6; i++)
        cr_expect(isnan(p[i]), "prob[%d]=%g", i, p[i]);
    free(x);
    nn_model_free(m);
}

Test(model, seeds_make_runs_repeat)
{
    nn_model *a = tiny(9, 0.5f), *b = tiny(9, 0.5f), *c = tiny(10, 0.5f);
    cr_assert_eq(nn_model_param_count(a), nn_model_param_count(c));
    nn_tensor_info ta, tb, tc;
    nn_model_tensor_find(a, "lstm.weight_ih_l0", &ta);
    nn_model_tensor_find(b, "lstm.weight_ih_l0", &tb);
    nn_model_tensor_find(c, "lstm.weight_ih_l0", &tc);
    cr_expect(memcmp(ta.data, tb.data, ta.numel * 4) == 0, "same seed, other weights");
    cr_expect(memcmp(ta.data, tc.data, ta.numel * 4) != 0, "other seed, same weights");
    int len = 5;
    float x[5 * 3 * 64], la[30], lb[30], lc[30];
    fill_random(x, sizeof(x) / 4, 3);
    nn_model_set_training(a, 1), nn_model_set_training(b, 1);
    nn_model_seed(a, 42), nn_model_seed(b, 42);
    nn_lrcn_forward(a, x, &len, 1, la);
    nn_lrcn_forward(b, x, &len, 1, lb);
    cr_expect(memcmp(la, lb, sizeof(la)) == 0, "same dropout seed, other logits");
    nn_model_seed(b, 43);
    nn_lrcn_forward(b, x, &len, 1, lc);
    cr_expect(memcmp(la, lc, sizeof(la)) != 0, "dropout did not change with the seed");
    nn_model_free(a), nn_model_free(b), nn_model_free(c);
}

Test(model, frozen_cnn_is_left_alone)
{
    nn_model *m = tiny(3, 0.0f);
    /* conv w, b; bn w, b, running mean, var; conv w, b; head w, b */
    cr_assert_eq(nn_model_freeze(m, "cnn.", 1), 10);
    nn_tensor_info conv, lstm;
    nn_model_tensor_find(m, "cnn.features.0.weight", &conv);
    nn_model_tensor_find(m, "lstm.weight_hh_l0", &lstm);
    float *c0 = malloc(conv.numel * 4), *l0 = malloc(lstm.numel * 4);
    memcpy(c0, conv.data, conv.numel * 4);
    memcpy(l0, lstm.data, lstm.numel * 4);
    int len[2] = {3, 2};
    float x[5 * 3 * 64], y[30] = {0}, logits[30], dl[30];
    fill_random(x, sizeof(x) / 4, 8);
    y[0] = y[7] = 1.0f;
    nn_adam a;
    nn_adam_default(&a);
    nn_model_set_training(m, 1);
    nn_model_zero_grad(m);
    nn_lrcn_forward(m, x, len, 2, logits);
    nn_bce_logits(dl, logits, y, NULL, NULL, 5, 6);
    nn_lrcn_backward(m, dl);
    nn_model_adam_step(m, &a);
    cr_expect(memcmp(c0, conv.data, conv.numel * 4) == 0, "a frozen conv weight moved");
    cr_expect(memcmp(l0, lstm.data, lstm.numel * 4) != 0, "the LSTM did not learn");
    /* from precomputed features: the same logits */
    float feat[5 * 6], logits2[30];
    cr_assert_eq(nn_model_feature_size(m), 6);
    nn_model_set_training(m, 0);
    nn_lrcn_forward(m, x, len, 2, logits);
    nn_cnn_features(m, x, 5, feat);
    nn_lrcn_forward_features(m, feat, len, 2, logits2);
    expect_close("features path", logits2, logits, 30, 1e-6);
    free(c0), free(l0);
    nn_model_free(m);
}

/* Saves m to a new temporary file; path is the mkstemp template, and gets
 * the file's name. */
static void save_temp(const nn_model *m, char *path)
{
    char err[256] = "";
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    close(fd);
    cr_assert_eq(nn_model_save(m, path, err, sizeof(err)), 0, "%s", err);
}

Test(model, save_and_load_round_trip)
{
    nn_model *m = tiny(4, 0.5f);
    cr_assert_eq(nn_model_meta_set(m, "thresholds", "0.3,0.2,0.2,0.2,0.2,0.2"), 0);
    cr_assert_eq(nn_model_meta_set(m, "provenance", "test"), 0);
    char path[] = "/tmp/nn_test_model_XXXXXX", err[256] = "";
    save_temp(m, path);
    nn_model *r = nn_model_load(path, err, sizeof(err));
    cr_assert(r, "%s", err);
    cr_expect_str_eq(nn_model_meta_get(r, "thresholds"), "0.3,0.2,0.2,0.2,0.2,0.2");
    cr_expect_str_eq(nn_model_meta_get(r, "arch"), "b4,M,c6,G|");
    cr_assert_eq(nn_model_tensor_count(r), nn_model_tensor_count(m));
    for (int i = 0; i < nn_model_tensor_count(m); i++) {
        nn_tensor_info a, b;
        nn_model_tensor(m, i, &a);
        nn_model_tensor(r, i, &b);
        cr_expect_str_eq(a.name, b.name);
        cr_expect(memcmp(a.data, b.data, a.numel * 4) == 0, "%s differs", a.name);
    }
    nn_model_free(r);
    nn_model_free(m);
    unlink(path);
}

/* A weight or statistic that is NaN or Inf (a diverged run, an fp16
 * overflow in an export), or a negative variance, would make every output
 * NaN, read downstream as "not flagged": the file is refused, naming the
 * tensor and what it holds. */
static void expect_refused(const char *name, float bad, const char *what)
{
    nn_model *m = tiny(4, 0.5f);
    nn_tensor_info t = {0};
    if (strcmp(name, "running_var") == 0) { /* the first batch-norm statistic */
        for (int i = 0; i < nn_model_tensor_count(m) && !strstr(t.name ? t.name : "", name); i++)
            nn_model_tensor(m, i, &t);
    } else {
        cr_assert_eq(nn_model_tensor_find(m, name, &t), 0, "no %s", name);
    }
    cr_assert(t.name && strstr(t.name, name), "no %s", name);
    char want[128];
    snprintf(want, sizeof want, "tensor %s holds a %s at index %zu", t.name, what, t.numel - 1);
    t.data[t.numel - 1] = bad;
    char path[] = "/tmp/nn_test_model_XXXXXX", err[256] = "";
    save_temp(m, path);
    cr_expect_null(nn_model_load(path, err, sizeof(err)), "%s with %g was loaded", name, bad);
    cr_expect(strstr(err, want) != NULL, "%s", err);
    nn_model_free(m);
    unlink(path);
}

Test(model, non_finite_weights_are_refused)
{
    expect_refused("out.bias", NAN, "non-finite value");
    expect_refused("out.bias", -INFINITY, "non-finite value");
    expect_refused("running_var", INFINITY, "non-finite value");
}

Test(model, negative_variances_are_refused)
{
    expect_refused("running_var", -1.0f, "negative variance");
    expect_refused("running_var", -1e-7f,
                   "negative variance"); /* within eps: no NaN, still wrong */
    expect_refused("dense.1.running_var", -0.5f, "negative variance");
}

/* Saves the tiny model with metadata key set to value (NULL: as it is),
 * then inserts extra (JSON members, or NULL) at the start of
 * __metadata__; returns the error of loading it ("" when it loaded). */
static const char *load_edited(const char *key, const char *value, const char *extra)
{
    static char err[512];
    nn_model *m = tiny(4, 0.5f);
    if (key) cr_assert_eq(nn_model_meta_set(m, key, value), 0);
    char path[] = "/tmp/nn_test_model_XXXXXX";
    save_temp(m, path);
    nn_model_free(m);
    if (extra) {
        FILE *f = fopen(path, "rb");
        cr_assert(f);
        fseek(f, 0, SEEK_END);
        size_t n = (size_t)ftell(f), add = strlen(extra);
        fseek(f, 0, SEEK_SET);
        char *b = malloc(n + add);
        cr_assert(b && fread(b, 1, n, f) == n);
        fclose(f);
        uint64_t hl = 0;
        for (int i = 7; i >= 0; i--)
            hl = (hl << 8) | (unsigned char)b[i];
        const char *at = strstr(b + 8, "\"__metadata__\":{");
        cr_assert(at && at < b + 8 + hl);
        size_t cut = (size_t)(at - b) + strlen("\"__metadata__\":{");
        memmove(b + cut + add, b + cut, n - cut);
        memcpy(b + cut, extra, add);
        hl += add;
        for (int i = 0; i < 8; i++)
            b[i] = (char)(hl >> (8 * i));
        f = fopen(path, "wb");
        cr_assert(f && fwrite(b, 1, n + add, f) == n + add);
        fclose(f);
        free(b);
    }
    err[0] = 0;
    nn_model *r = nn_model_load(path, err, sizeof(err));
    nn_model_free(r);
    unlink(path);
    cr_assert((r == NULL) == (err[0] != 0), "%s", err);
    return err;
}

Test(model, metadata_is_read_strictly)
{
    cr_expect_str_eq(load_edited(NULL, NULL, NULL), "");
    /* the architecture comes from the first "arch", the copied metadata from
     * the last: the model would not be what its metadata says */
    const char *e = load_edited(NULL, NULL, "\"arch\":\"c8,G|\",");
    cr_expect(strstr(e, "metadata arch appears twice"), "%s", e);
    e = load_edited("input", "3x8x8junk", NULL);
    cr_expect(strstr(e, "is not CxHxW"), "%s", e);
    e = load_edited("dense_dropout", "0.5abc", NULL);
    cr_expect(strstr(e, "dense_dropout='0.5abc' is not a number"), "%s", e);
    /* text from the file cannot end a log value or start a log line */
    e = load_edited("input", "3x8\"\nts=x event=forged\\", NULL);
    cr_expect(strstr(e, "input='3x8__ts=x event=forged_' is not CxHxW"), "%s", e);
}

/* A loaded model holds the file's metadata and nothing made up: a file
 * without thresholds must not come back with nn_model_create's 0.5 (which
 * the node would then flag at), nor one without provenance as "untrained".
 * Its input size is not guessed either. */
Test(model, a_loaded_model_has_only_the_files_metadata)
{
    static const char *const gone[] = {"thresholds", "labels", "windows", "provenance",
                                       "preprocessing"};
    nn_model *m = tiny(4, 0.5f);
    for (size_t i = 0; i < sizeof gone / sizeof *gone; i++)
        cr_assert_eq(nn_model_meta_set(m, gone[i], NULL), 0);
    cr_assert_eq(nn_model_meta_set(m, "kept", "yes"), 0);
    char path[] = "/tmp/nn_test_model_XXXXXX", err[256] = "";
    save_temp(m, path);
    nn_model *r = nn_model_load(path, err, sizeof(err));
    cr_assert(r, "%s", err);
    for (size_t i = 0; i < sizeof gone / sizeof *gone; i++)
        cr_expect_null(nn_model_meta_get(r, gone[i]), "%s='%s' made up", gone[i],
                       nn_model_meta_get(r, gone[i]));
    cr_expect_str_eq(nn_model_meta_get(r, "kept"), "yes");
    cr_expect_str_eq(nn_model_meta_get(r, "input"), "3x8x8");
    nn_model_free(r);
    cr_assert_eq(nn_model_meta_set(m, "input", NULL), 0);
    cr_assert_eq(nn_model_save(m, path, err, sizeof(err)), 0, "%s", err);
    r = nn_model_load(path, err, sizeof(err));
    cr_expect_null(r, "loaded without an input size: %s", nn_model_meta_get(r, "input"));
    cr_expect(strstr(err, "metadata has no 'input'"), "%s", err);
    nn_model_free(r);
    nn_model_free(m);
    unlink(path);
}

/* The state vector (weight averaging): every parameter and running
 * statistic, in the tensors' order, out and back in. */
Test(model, state_vector_holds_every_weight_and_statistic)
{
    nn_model *m = tiny(4, 0.5f);
    size_t n = nn_model_state_size(m), sum = 0, stats = 0;
    for (int i = 0; i < nn_model_tensor_count(m); i++) {
        nn_tensor_info t;
        nn_model_tensor(m, i, &t);
        sum += t.numel;
        if (!t.grad) stats += t.numel;
    }
    cr_assert_eq(n, sum);
    cr_assert(stats > 0, "the tiny model has batch-norm statistics");
    cr_assert_eq(n - stats, nn_model_param_count(m));
    float *v = malloc(n * sizeof *v), *w = malloc(n * sizeof *w);
    nn_model_state_get(m, v);
    for (size_t i = 0; i < n; i++)
        w[i] = (float)i * 0.5f - 3.0f;
    nn_model_state_set(m, w);
    /* each tensor now holds its own stretch of w: parameters first, then
     * the statistics, each in the tensors' order */
    size_t p = 0, b = nn_model_param_count(m);
    for (int i = 0; i < nn_model_tensor_count(m); i++) {
        nn_tensor_info t;
        nn_model_tensor(m, i, &t);
        size_t *at = t.grad ? &p : &b;
        cr_expect(memcmp(t.data, w + *at, t.numel * 4) == 0, "%s is not its part", t.name);
        *at += t.numel;
    }
    nn_model_state_set(m, v);
    nn_model_state_get(m, w);
    cr_expect(memcmp(v, w, n * sizeof *v) == 0, "not restored");
    free(v), free(w);
    nn_model_free(m);
}

Test(model, presets_and_bad_arch)
{
    nn_config c;
    nn_config_default(&c);
    char err[256] = "";
    nn_model *m = nn_model_create(&c, err, sizeof(err));
    cr_assert(m, "%s", err);
    cr_expect_eq(nn_model_feature_size(m), 256);
    nn_model_free(m);
    c.arch = "c8,M,X3|";
    cr_expect_null(nn_model_create(&c, err, sizeof(err)));
    cr_expect(strstr(err, "X3") != NULL, "message does not name the token: %s", err);
    c.arch = "c8,M|";
    cr_expect_null(nn_model_create(&c, err, sizeof(err)));
    cr_expect(strstr(err, "must end with") != NULL, "%s", err);
    c.arch = "b8,M,b16,GM|"; /* 128x128 in: a 64x64 map, 16 features */
    m = nn_model_create(&c, err, sizeof(err));
    cr_assert(m, "%s", err);
    cr_expect_eq(nn_model_feature_size(m), 16);
    nn_model_free(m);
    c.in_w = 96; /* a 64x48 map has no one square window */
    c.arch = "b8,M,GM|";
    cr_expect_null(nn_model_create(&c, err, sizeof(err)));
    cr_expect(strstr(err, "square") != NULL, "%s", err);
    nn_model_free(NULL);
}

Test(model, sizes_from_a_file_are_bounded)
{
    nn_config c;
    nn_config_default(&c);
    char err[256] = "";
    c.in_h = 100000;
    cr_expect_null(nn_model_create(&c, err, sizeof(err)));
    nn_config_default(&c);
    c.arch = "c60000,c60000,G|";
    cr_expect_null(nn_model_create(&c, err, sizeof(err)));
    cr_expect(strstr(err, "parameters") != NULL, "%s", err);
    /* 128 x 4096 x 4096 = 2^31 features: past INT_MAX */
    nn_config_default(&c);
    c.arch = "c128,F|";
    c.in_h = c.in_w = 4096;
    cr_expect_null(nn_model_create(&c, err, sizeof(err)));
    cr_expect(strstr(err, "F flattens 2147483648 features") != NULL, "%s", err);
    /* A layer's output per slice: 64 channels at 512x512 (VGG19's first
     * ones at the largest input train makes) is the most; weights far under
     * their cap do not make a layer of 65536 channels at 128x128 fit (2^30
     * values per slice, 128 GiB for a batch), refused at load, not at the
     * first series */
    nn_config_default(&c);
    c.arch = "c64,G|";
    c.in_h = c.in_w = 512;
    nn_model *m = nn_model_create(&c, err, sizeof(err));
    cr_expect(m, "%s", err);
    nn_model_free(m);
    c.arch = "c65,G|";
    cr_expect_null(nn_model_create(&c, err, sizeof(err)));
    cr_expect(strstr(err, "a layer of 17039360 values per 512x512 slice, more than the 16777216"),
              "%s", err);
    nn_config_default(&c);
    c.arch = "c65536,G|";
    cr_expect_null(nn_model_create(&c, err, sizeof(err)));
    cr_expect(strstr(err, "a layer of 1073741824 values per 128x128 slice") &&
                  strstr(err, "131072 MiB for a batch of 32 slices"),
              "%s", err);
}

Test(model, backward_needs_a_training_forward)
{
    nn_model *m = tiny(2, 0.0f);
    int len = 2;
    float x[2 * 3 * 64] = {0}, p[12], dl[12] = {0};
    cr_assert_eq(nn_lrcn_predict(m, x, &len, 1, p), 0);
    cr_expect_eq(nn_lrcn_backward(m, dl), NN_EINVAL);
    cr_expect_eq(nn_cnn_backward(m, dl), NN_EINVAL);
    nn_model_free(m);
}

/* Two steps, a checkpoint (weights and optimizer state), a third step: from
 * the checkpoint, the same third step lands on the same weights, bit for bit;
 * without the optimizer state it does not. Another model's state is refused
 * by name and leaves fresh moments. */
static void one_step(nn_model *m, const float *x, const float *y)
{
    int len[2] = {3, 2};
    float logits[30], dl[30];
    nn_adam a;
    nn_adam_default(&a);
    a.lr = 1e-2f;
    nn_model_set_training(m, 1);
    nn_model_seed(m, 7);
    nn_model_zero_grad(m);
    nn_lrcn_forward(m, x, len, 2, logits);
    nn_bce_logits(dl, logits, y, NULL, NULL, 5, 6);
    nn_lrcn_backward(m, dl);
    nn_model_adam_step(m, &a);
}

static int same_weights(nn_model *a, nn_model *b)
{
    for (int i = 0; i < nn_model_tensor_count(a); i++) {
        nn_tensor_info ta, tb;
        nn_model_tensor(a, i, &ta);
        nn_model_tensor(b, i, &tb);
        if (memcmp(ta.data, tb.data, ta.numel * 4) != 0) return 0;
    }
    return 1;
}

Test(model, optimizer_state_resumes_bit_for_bit)
{
    float x[5 * 3 * 64], y[30] = {0};
    fill_random(x, sizeof(x) / 4, 11);
    y[0] = y[13] = 1.0f;
    nn_model *m = tiny(5, 0.0f);
    one_step(m, x, y);
    one_step(m, x, y);
    char wp[] = "/tmp/nn_test_ckpt_XXXXXX", op[] = "/tmp/nn_test_optim_XXXXXX", err[256] = "";
    close(mkstemp(wp));
    close(mkstemp(op));
    cr_assert_eq(nn_model_save(m, wp, err, sizeof err), 0, "%s", err);
    cr_assert_eq(nn_model_save_optimizer(m, op, err, sizeof err), 0, "%s", err);
    cr_assert_eq(nn_model_optimizer_steps(m), 2);
    one_step(m, x, y);

    nn_model *r = nn_model_load(wp, err, sizeof err);
    cr_assert(r, "%s", err);
    cr_assert_eq(nn_model_load_optimizer(r, op, err, sizeof err), 0, "%s", err);
    cr_assert_eq(nn_model_optimizer_steps(r), 2);
    one_step(r, x, y);
    cr_expect(same_weights(m, r), "resumed with the optimizer state: other weights");

    nn_model *f = nn_model_load(wp, err, sizeof err);
    cr_assert(f, "%s", err);
    one_step(f, x, y);
    cr_expect(!same_weights(m, f), "fresh moments gave the same weights: the test proves nothing");

    /* Another architecture's state: refused, fresh moments. */
    nn_config c;
    nn_config_default(&c);
    c.arch = "b4,M,c8,G|";
    c.in_h = c.in_w = 8;
    c.lstm_hidden = 5;
    c.dense = 6;
    nn_model *o = nn_model_create(&c, err, sizeof err);
    cr_assert(o, "%s", err);
    cr_expect_neq(nn_model_load_optimizer(o, op, err, sizeof err), 0);
    cr_expect(strstr(err, "cnn."), "%s", err);
    cr_expect_eq(nn_model_optimizer_steps(o), 0);
    cr_expect_neq(nn_model_load_optimizer(o, wp, err, sizeof err), 0,
                  "a model file taken as state");
    nn_model_free(o), nn_model_free(f), nn_model_free(r), nn_model_free(m);
    unlink(wp), unlink(op);
}

/* Localisation training reads the map before the global pool and adds a
 * gradient for it: the map is the one the logits are pooled from, and its
 * gradient reaches the weights as finite differences of sum(map * r) say,
 * added to the logits' own. */
static double map_loss(nn_model *m, const float *x, int n, const float *r, float *lg, float *map,
                       size_t nm)
{
    cr_assert_eq(nn_cnn_forward(m, x, n, lg), 0);
    cr_assert_eq(nn_cnn_map(m, map), 0);
    double l = 0;
    for (size_t i = 0; i < nm; i++)
        l += (double)map[i] * r[i];
    return l;
}

Test(model, the_last_feature_map_and_its_gradient)
{
    nn_model *m = tiny(21, 0.0f);
    int c, h, w, n = 3;
    cr_assert_eq(nn_cnn_map_shape(m, &c, &h, &w), 0);
    cr_assert(c == 6 && h == 4 && w == 4, "map %dx%dx%d", c, h, w);
    size_t per = 3 * 8 * 8, nm = (size_t)n * c * h * w;
    float *x = calloc(n * per, sizeof(float)), *map = calloc(nm, sizeof(float));
    float *r = calloc(nm, sizeof(float)), *zero = calloc(nm, sizeof(float));
    float lg[3 * 6], dl[3 * 6], zl[3 * 6] = {0};
    fill_random(x, n * per, 31);
    fill_random(r, nm, 32);
    fill_random(dl, 3 * 6, 33);
    cr_expect_eq(nn_cnn_map(m, map), NN_EINVAL, "a map before any training forward");
    nn_model_set_training(m, 1);
    map_loss(m, x, n, r, lg, map, nm);

    /* the logits are the classifier on the map's mean */
    nn_tensor_info W, B;
    cr_assert_eq(nn_model_tensor_find(m, "cnn.classifier.0.weight", &W), 0);
    cr_assert_eq(nn_model_tensor_find(m, "cnn.classifier.0.bias", &B), 0);
    for (int k = 0; k < n; k++)
        for (int l = 0; l < 6; l++) {
            double z = B.data[l];
            for (int ch = 0; ch < c; ch++) {
                double mean = 0;
                for (int p = 0; p < h * w; p++)
                    mean += map[((size_t)k * c + ch) * h * w + p];
                z += W.data[l * c + ch] * mean / (h * w);
            }
            cr_expect(fabs(z - lg[k * 6 + l]) < 1e-4, "logit %d,%d: %g from the map, %g", k, l, z,
                      lg[k * 6 + l]);
        }

    /* the map's gradient alone, against central differences */
    nn_tensor_info conv;
    cr_assert_eq(nn_model_tensor_find(m, "cnn.features.0.weight", &conv), 0);
    nn_model_zero_grad(m);
    map_loss(m, x, n, r, lg, map, nm);
    cr_assert_eq(nn_cnn_backward_map(m, zl, r), 0);
    float *g_map = malloc(conv.numel * sizeof(float));
    memcpy(g_map, conv.grad, conv.numel * sizeof(float));
    double worst = 0, scale = 1e-3;
    for (size_t i = 0; i < conv.numel; i++)
        scale = fmax(scale, fabs(g_map[i]));
    for (size_t i = 0; i < conv.numel; i += 7) {
        float v = conv.data[i];
        conv.data[i] = v + 1e-2f;
        double lp = map_loss(m, x, n, r, lg, map, nm);
        conv.data[i] = v - 1e-2f;
        double lm = map_loss(m, x, n, r, lg, map, nm);
        conv.data[i] = v;
        worst = fmax(worst, fabs((lp - lm) / 2e-2 - g_map[i]) / scale);
    }
    cr_expect(worst < 2e-2, "the map's gradient: relative error %.3g", worst);

    /* with the logits' gradient too: the sum of the two */
    nn_model_zero_grad(m);
    map_loss(m, x, n, r, lg, map, nm);
    cr_assert_eq(nn_cnn_backward(m, dl), 0);
    float *g_logits = malloc(conv.numel * sizeof(float));
    memcpy(g_logits, conv.grad, conv.numel * sizeof(float));
    nn_model_zero_grad(m);
    map_loss(m, x, n, r, lg, map, nm);
    cr_assert_eq(nn_cnn_backward_map(m, dl, r), 0);
    for (size_t i = 0; i < conv.numel; i++)
        cr_expect(fabs(conv.grad[i] - g_logits[i] - g_map[i]) < 1e-4 * scale + 1e-6,
                  "weight %zu: %g, not %g + %g", i, conv.grad[i], g_logits[i], g_map[i]);
    /* a zero map gradient is nn_cnn_backward */
    nn_model_zero_grad(m);
    map_loss(m, x, n, r, lg, map, nm);
    cr_assert_eq(nn_cnn_backward_map(m, dl, zero), 0);
    for (size_t i = 0; i < conv.numel; i++)
        cr_expect(fabs(conv.grad[i] - g_logits[i]) < 1e-6, "weight %zu", i);
    free(x), free(map), free(r), free(zero), free(g_map), free(g_logits);
    nn_model_free(m);

    /* a global max pool has a map too; features that end in a flatten do not */
    nn_config cf;
    nn_config_default(&cf);
    char err[256] = "";
    cf.in_h = cf.in_w = 8;
    cf.arch = "b4,M,c6,GM|";
    m = nn_model_create(&cf, err, sizeof(err));
    cr_assert(m, "%s", err);
    cr_expect(nn_cnn_map_shape(m, &c, &h, &w) == 0 && c == 6 && h == 4 && w == 4);
    nn_model_free(m);
    cf.arch = "b4,M,F|d8";
    m = nn_model_create(&cf, err, sizeof(err));
    cr_assert(m, "%s", err);
    cr_expect_eq(nn_cnn_map_shape(m, &c, &h, &w), NN_EINVAL);
    nn_model_free(m);
}

/* triage/pipeline.c: model loading and one series through the model. */
#include "pipeline.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "log.h"

const char *const triage_label_names[TRIAGE_LABELS] = {
    "any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"};

#ifndef ICHTRIAGE_DATADIR
#define ICHTRIAGE_DATADIR "/usr/share/ichtriage"
#endif

/* True for a binary run from the build folder it was made in (the README's
 * first command): it may use the source tree's model. An installed one uses
 * the installed model, never the checkout it was built from. */
static bool run_from_build_folder(void)
{
    char exe[PATH_MAX], root[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len <= 0 || !realpath(ICHTRIAGE_BUILD_ROOT, root)) return false;
    exe[len] = 0;
    size_t rl = strlen(root);
    return strncmp(exe, root, rl) == 0 && exe[rl] == '/';
}

void triage_model_active_id(const char *store_dir, char *id, size_t n)
{
    char log[1100], line[256];
    snprintf(log, sizeof log, "%s/models/active.log", store_dir);
    snprintf(id, n, "%s", "");
    FILE *f = fopen(log, "r");
    while (f && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (line[0]) snprintf(id, n, "%.127s", line);
    }
    if (f) fclose(f);
}

int triage_model_resolve(const char *configured, const char *store_dir, char *out, size_t n)
{
    if (configured && configured[0]) {
        snprintf(out, n, "%s", configured);
        return access(out, R_OK) == 0 ? 0 : -1;
    }
    char active[1100];
    snprintf(active, sizeof active, "%s/models/active.safetensors", store_dir);
    /* Should the file of the model promoted last be gone, the
     * demonstration default must not take its place unnoticed: the
     * hospital's own model, or no model and a banner. */
    char id[128];
    triage_model_active_id(store_dir, id, sizeof id);
    if (id[0] && access(active, R_OK) != 0) {
        snprintf(out, n, "%s/models/%s.safetensors", store_dir, id);
        if (!strchr(id, '/') && access(out, R_OK) == 0) return 0;
        snprintf(out, n,
                 "%s/models/active.log names model %s, but neither active.safetensors nor "
                 "%s.safetensors can be read there (ichtriage model promote ID)",
                 store_dir, id, id);
        return -1;
    }
    const char *candidates[3];
    int nc = 0;
    candidates[nc++] = active;
    if (run_from_build_folder())
        candidates[nc++] = ICHTRIAGE_SOURCE_ROOT "/models/default.safetensors";
    candidates[nc++] = ICHTRIAGE_DATADIR "/models/default.safetensors";
    size_t len = (size_t)snprintf(out, n, "none of");
    for (int i = 0; i < nc; i++) {
        if (access(candidates[i], R_OK) == 0) {
            snprintf(out, n, "%s", candidates[i]);
            return 0;
        }
        if (len < n)
            len += (size_t)snprintf(out + len, n - len, "%s %s", i ? "," : "", candidates[i]);
    }
    return -1;
}

/* Parses n comma-separated floats. */
static int parse_floats(const char *s, float *out, int n)
{
    for (int i = 0; i < n; i++) {
        char *end;
        out[i] = strtof(s, &end);
        if (end == s) return -1;
        s = end;
        if (i + 1 < n) {
            if (*s != ',') return -1;
            s++;
        }
    }
    return *s ? -1 : 0;
}

/* The model's metadata reaches log lines (version="...", error="..."): no
 * quote, backslash or control character may end the value or forge a line. */
static void text_safe(char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < ' ' || *s == '"' || *s == '\\' || *s == 0x7f) *s = '_';
}

int triage_model_load(struct triage_model *m, const char *path, char *err, size_t errlen)
{
    memset(m, 0, sizeof *m);
    char e[512];
    m->nn = nn_model_load(path, e, sizeof e);
    if (!m->nn) {
        snprintf(err, errlen, "model %s: %s", path, e);
        return -1;
    }
    snprintf(m->path, sizeof m->path, "%s", path);
    const nn_config *c = nn_model_config(m->nn);
    m->in_c = c->in_c;
    m->in_h = c->in_h;
    m->in_w = c->in_w;
    const char *v = nn_model_meta_get(m->nn, "version");
    const char *base = strrchr(path, '/');
    snprintf(m->version, sizeof m->version, "%s", v && v[0] ? v : base ? base + 1 : path);
    text_safe(m->version);

    /* Windows, labels and thresholds are the model's own: a file without
     * them is refused, never run with someone else's. */
    const char *windows = nn_model_meta_get(m->nn, "windows");
    if (!windows) {
        snprintf(err, errlen, "model %s: no 'windows' in its metadata", path);
        goto fail;
    }
    if (triage_windows_parse(windows, &m->windows, e, sizeof e) != 0) {
        snprintf(err, errlen, "model %s: %s", path, e);
        goto fail;
    }
    if (triage_context_parse(nn_model_meta_get(m->nn, "context"), &m->context, e, sizeof e) != 0) {
        snprintf(err, errlen, "model %s: %s", path, e);
        goto fail;
    }
    if (m->windows.n * (2 * m->context + 1) != m->in_c) {
        snprintf(err, errlen, "model %s: %d windows of %d slices for %d input channels", path,
                 m->windows.n, 2 * m->context + 1, m->in_c);
        goto fail;
    }
    if (triage_crop_parse(nn_model_meta_get(m->nn, "preprocessing"), &m->crop_head, e, sizeof e) !=
        0) {
        snprintf(err, errlen, "model %s: %s", path, e);
        goto fail;
    }
    /* Our labels by name in the model's output order. */
    const char *labels = nn_model_meta_get(m->nn, "labels");
    if (!labels) {
        snprintf(err, errlen, "model %s: no 'labels' in its metadata", path);
        goto fail;
    }
    char names[NN_MAX_LABELS][48];
    int count = 0;
    for (const char *p = labels; *p && count < NN_MAX_LABELS;) {
        size_t len = strcspn(p, ",");
        snprintf(names[count++], sizeof names[0], "%.*s", (int)len, p);
        p += len;
        if (*p == ',') p++;
    }
    if (count != c->labels) {
        snprintf(err, errlen, "model %s: metadata names %d labels, the model has %d outputs", path,
                 count, c->labels);
        goto fail;
    }
    for (int l = 0; l < TRIAGE_LABELS; l++) {
        m->label_index[l] = -1;
        for (int k = 0; k < count; k++)
            if (strcmp(names[k], triage_label_names[l]) == 0) m->label_index[l] = k;
        if (m->label_index[l] < 0) {
            snprintf(err, errlen, "model %s: label '%s' missing from its metadata", path,
                     triage_label_names[l]);
            goto fail;
        }
    }
    float th[NN_MAX_LABELS];
    const char *ths = nn_model_meta_get(m->nn, "thresholds");
    if (!ths) {
        snprintf(err, errlen, "model %s: no 'thresholds' in its metadata", path);
        goto fail;
    }
    if (parse_floats(ths, th, count) != 0) {
        snprintf(err, errlen, "model %s: 'thresholds' is not %d numbers", path, count);
        goto fail;
    }
    for (int l = 0; l < TRIAGE_LABELS; l++) {
        m->thresholds[l] = th[m->label_index[l]];
        if (!(m->thresholds[l] > 0 && m->thresholds[l] < 1)) {
            snprintf(err, errlen, "model %s: threshold of '%s' is not in (0, 1)", path,
                     triage_label_names[l]);
            goto fail;
        }
    }
    return 0;
fail:
    if (errlen) text_safe(err);
    nn_model_free(m->nn);
    memset(m, 0, sizeof *m);
    return -1;
}

int triage_nn_device(nn_model *m, const char *device, char *err, size_t errlen)
{
    const char *want = device && device[0] ? device : "auto";
    char e[256] = "";
    if (nn_model_set_device(m, want, 0, e, sizeof e) != 0) {
        snprintf(err, errlen, "nn.device=%s: %s", want, e);
        return -1;
    }
    const char *got = nn_model_device(m);
    /* On the CPU, OpenBLAS's kernels too, and what it chose by itself where
     * nn_blas_rerun() asked for better ones. */
    char blas[128] = "";
    if (strcmp(got, "cpu") == 0) {
        const char *chose = nn_blas_fallback();
        char c[32];
        snprintf(blas, sizeof blas, " blas=%s", nn_blas_core());
        if (chose)
            snprintf(blas + strlen(blas), sizeof blas - strlen(blas), " blas_chosen_by_openblas=%s",
                     util_log_safe(c, sizeof c, chose));
    }
    if (strcmp(want, "auto") == 0 && strcmp(got, "cpu") == 0)
        util_log(UTIL_LOG_INFO, "nn_device", "device=cpu requested=auto reason=\"%s\"%s",
                 nn_cuda_built() ? "no GPU present" : "built without nn/cuda", blas);
    else
        util_log(UTIL_LOG_INFO, "nn_device", "device=%s requested=%s%s", got, want, blas);
    return 0;
}

void triage_model_free(struct triage_model *m)
{
    if (!m) return;
    nn_model_free(m->nn);
    memset(m, 0, sizeof *m);
}

void triage_result_free(struct triage_result *r)
{
    if (!r) return;
    free(r->probs);
    memset(r, 0, sizeof *r);
}

int triage_preprocess_volume(const struct triage_volume *v, const char *const *paths,
                             const struct triage_decoder *dec, const struct triage_windows *w,
                             bool crop_head, int out_h, int out_w, float *x,
                             struct triage_region *used, char *err, size_t errlen)
{
    /* With the crop, the stream is the sampled slices, then every slice. */
    int nsamples = crop_head ? (v->n < TRIAGE_HEAD_SAMPLES ? v->n : TRIAGE_HEAD_SAMPLES) : 0;
    struct triage_volume stream = *v;
    struct triage_slice *both = NULL; /* stream.slices when it is not v's */
    int big = v->rows > v->columns ? v->rows : v->columns;
    float *scratch = malloc(sizeof(float) * triage_preprocess_scratch(big, out_w, w->n));
    int *count = crop_head ? malloc(sizeof(int) * (size_t)(v->rows + v->columns)) : NULL;
    struct triage_slices *slices = NULL;
    int rc = -1;
    if (!scratch || (crop_head && !count)) {
        snprintf(err, errlen, "out of memory");
        goto done;
    }
    if (nsamples > 0) {
        both = malloc(sizeof *both * (size_t)(nsamples + v->n));
        if (!both) {
            snprintf(err, errlen, "out of memory");
            goto done;
        }
        for (int k = 0; k < nsamples; k++)
            both[k] = v->slices[(int)((2 * (int64_t)k + 1) * v->n / (2 * nsamples))];
        memcpy(both + nsamples, v->slices, sizeof *v->slices * (size_t)v->n);
        stream.slices = both;
        stream.n = nsamples + v->n;
    }
    if (triage_slices_open(&slices, dec, &stream, nsamples, paths, err, errlen) != 0) goto done;
    struct triage_head_box box;
    triage_head_box_init(&box);
    const float *hu;
    for (int k = 0; k < nsamples; k++) {
        if (triage_slices_next(slices, &hu, err, errlen) != 0) goto done;
        triage_head_box_add(&box, hu, v->rows, v->columns, count);
    }
    struct triage_region region = {0, 0, v->columns, v->rows};
    if (crop_head) triage_head_region(&box, v->rows, v->columns, &region);
    if (used) *used = region;
    size_t per = (size_t)w->n * out_h * out_w;
    for (int i = 0; i < v->n; i++) {
        if (triage_slices_next(slices, &hu, err, errlen) != 0) goto done;
        if (triage_preprocess_slice(hu, v->rows, v->columns, &region, w, out_h, out_w,
                                    x + per * (size_t)i, scratch) != 0) {
            snprintf(err, errlen, "%s: cannot preprocess a %dx%d image", paths[v->slices[i].file],
                     v->rows, v->columns);
            goto done;
        }
    }
    rc = 0;
done:
    triage_slices_close(slices);
    free(both);
    free(scratch);
    free(count);
    return rc;
}

/* x: the series' slices preprocessed (its windows) -> out: probabilities
 * [n, labels]. A model with context sees each slice with its neighbours:
 * their inputs are stacked and run through the CNN a chunk at a time (so the
 * stacked copy of the series is never whole), then the BiLSTM runs over the
 * features. */
static int run_model(struct triage_model *m, const float *x, int n, float *out)
{
    if (m->context == 0) return nn_lrcn_predict(m->nn, x, &n, 1, out);
    enum { CHUNK = 16 };
    const nn_config *c = nn_model_config(m->nn);
    size_t per = (size_t)m->windows.n * m->in_h * m->in_w;
    int F = nn_model_feature_size(m->nn);
    float *in = malloc(sizeof(float) * (size_t)m->in_c * m->in_h * m->in_w * CHUNK);
    float *feat = malloc(sizeof(float) * (size_t)F * (size_t)n);
    int rc = in && feat ? 0 : NN_ENOMEM;
    for (int a = 0; rc == 0 && a < n; a += CHUNK) {
        int b = n - a < CHUNK ? n - a : CHUNK;
        triage_context_stack(x, n, per, m->context, a, b, in);
        rc = nn_cnn_features(m->nn, in, b, feat + (size_t)a * F);
    }
    if (rc == 0) rc = nn_lrcn_forward_features(m->nn, feat, &n, 1, out);
    for (size_t i = 0; rc == 0 && i < (size_t)n * (size_t)c->labels; i++)
        out[i] = 1.0f / (1.0f + expf(-out[i]));
    free(in);
    free(feat);
    return rc;
}

int triage_predict_volume(struct triage_model *m, const struct triage_volume *v,
                          const char *const *paths, const struct triage_decoder *dec,
                          struct triage_result *r, char *err, size_t errlen)
{
    memset(r, 0, sizeof *r);
    const nn_config *c = nn_model_config(m->nn);
    size_t per = (size_t)m->windows.n * m->in_h * m->in_w;
    float *x = malloc(sizeof(float) * per * (size_t)v->n);
    float *out = malloc(sizeof(float) * (size_t)v->n * (size_t)c->labels);
    r->probs = malloc(sizeof(float) * (size_t)v->n * TRIAGE_LABELS);
    int rc = -1;
    if (!x || !out || !r->probs) {
        snprintf(err, errlen, "out of memory for %d slices", v->n);
        goto done;
    }
    double t0 = util_clock_ms();
    if (triage_preprocess_volume(v, paths, dec, &m->windows, m->crop_head, m->in_h, m->in_w, x,
                                 &r->crop, err, errlen) != 0)
        goto done;
    double t1 = util_clock_ms();
    /* Every file is read: what follows is the model alone. */
    util_log(UTIL_LOG_DEBUG, "series_pixels_read", "slices=%d ms=%.0f", v->n, t1 - t0);
    if (run_model(m, x, v->n, out) != 0) {
        snprintf(err, errlen, "model failed on a series of %d slices", v->n);
        goto done;
    }
    double t2 = util_clock_ms();
    /* NaN compares false against everything: folded into the maxima below
     * it would read as p=0, "not flagged". An unknown result must fail. */
    for (size_t i = 0; i < (size_t)v->n * (size_t)c->labels; i++)
        if (!isfinite(out[i])) {
            snprintf(err, errlen, "model produced non-finite output (slice %zu, label %zu)",
                     i / (size_t)c->labels, i % (size_t)c->labels);
            goto done;
        }
    r->n = v->n;
    for (int l = 0; l < TRIAGE_LABELS; l++)
        r->study[l] = 0;
    for (int i = 0; i < v->n; i++) {
        for (int l = 0; l < TRIAGE_LABELS; l++) {
            float p = out[(size_t)i * c->labels + m->label_index[l]];
            r->probs[(size_t)i * TRIAGE_LABELS + l] = p;
            if (p > r->study[l]) r->study[l] = p;
        }
        if (r->probs[(size_t)i * TRIAGE_LABELS] > r->probs[(size_t)r->key_slice * TRIAGE_LABELS])
            r->key_slice = i;
    }
    r->flagged = r->study[0] >= m->thresholds[0];
    r->ms_pixels = t1 - t0;
    r->ms_model = t2 - t1;
    rc = 0;
done:
    free(x);
    free(out);
    if (rc != 0) triage_result_free(r);
    return rc;
}

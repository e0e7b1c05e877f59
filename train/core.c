/* train/core.c: augmentation, batched prediction over a dataset, folding
 * calibration temperatures into a model, and the evaluation tables. */
#include "trainer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "progress.h"

#define BATCH 32

void train_augment_default(struct train_augment *a)
{
    a->shift_frac = 0.08f;
    a->rot_deg = 10.0f;
    a->gain = 0.10f;
    a->offset = 0.04f;
    a->flip = 1;
    a->channel_period = 0;
    a->sharp = 0;
}

void train_augment_draw(const struct train_augment *a, int c, int h, int w, uint64_t *rng,
                        struct train_affine *t)
{
    float ang = (2 * nn_rng_uniform(rng) - 1) * a->rot_deg * (float)M_PI / 180.0f;
    t->dx = (2 * nn_rng_uniform(rng) - 1) * a->shift_frac * (float)w;
    t->dy = (2 * nn_rng_uniform(rng) - 1) * a->shift_frac * (float)h;
    t->flip = a->flip && nn_rng_uniform(rng) < 0.5f;
    int nj = a->channel_period > 0 && a->channel_period < c ? a->channel_period : c;
    for (int k = 0; k < nj && k < 8; k++) {
        t->gain[k] = 1 + (2 * nn_rng_uniform(rng) - 1) * a->gain;
        t->off[k] = (2 * nn_rng_uniform(rng) - 1) * a->offset;
    }
    t->cs = cosf(ang), t->sn = sinf(ang);
    if (a->sharp > 0 && nn_rng_uniform(rng) < a->sharp) {
        t->cs = 1, t->sn = 0;
        t->dx = roundf(t->dx), t->dy = roundf(t->dy);
    }
}

void train_augment_none(struct train_affine *t)
{
    memset(t, 0, sizeof *t);
    t->cs = 1;
    for (int k = 0; k < 8; k++)
        t->gain[k] = 1;
}

/* Output pixel (x, y) -> its source position: the inverse of rotate + shift
 * (+ flip) about the centre. */
static void source_of(const struct train_affine *t, int h, int w, int x, int y, float *sx,
                      float *sy)
{
    float cx = (float)(w - 1) / 2, cy = (float)(h - 1) / 2;
    float ox = (float)(t->flip ? w - 1 - x : x) - cx - t->dx, oy = (float)y - cy - t->dy;
    *sx = t->cs * ox + t->sn * oy + cx;
    *sy = -t->sn * ox + t->cs * oy + cy;
}

void train_augment_apply(const struct train_augment *a, const struct train_affine *t,
                         const uint8_t *in, int c, int h, int w, float *out)
{
    for (int y = 0; y < h; y++) {
        for (int x = 0; x < w; x++) {
            float sx, sy;
            source_of(t, h, w, x, y, &sx, &sy);
            int x0 = (int)floorf(sx), y0 = (int)floorf(sy);
            float fx = sx - (float)x0, fy = sy - (float)y0;
            for (int k = 0; k < c; k++) {
                const uint8_t *p = in + (size_t)k * h * w;
                float v = 0;
                for (int j = 0; j < 2; j++)
                    for (int i = 0; i < 2; i++) {
                        int xx = x0 + i, yy = y0 + j;
                        if (xx < 0 || yy < 0 || xx >= w || yy >= h) continue;
                        float wt = (i ? fx : 1 - fx) * (j ? fy : 1 - fy);
                        v += wt * (float)p[(size_t)yy * w + xx];
                    }
                v = v / 255.0f;
                int g = a->channel_period > 0 ? k % a->channel_period : k;
                if (g < 8 && v > 0) v = v * t->gain[g] + t->off[g];
                out[(size_t)k * h * w + (size_t)y * w + x] = v < 0 ? 0 : v > 1 ? 1 : v;
            }
        }
    }
}

void train_augment_slice(const struct train_augment *a, const uint8_t *in, int c, int h, int w,
                         float *out, uint64_t *rng)
{
    struct train_affine t;
    train_augment_draw(a, c, h, w, rng, &t);
    train_augment_apply(a, &t, in, c, h, w, out);
}

void train_augment_cells(const struct train_affine *t, const uint8_t *mask, int h, int w,
                         uint8_t *cells, int gh, int gw)
{
    int mh = h / TRAIN_MASK_SCALE, mw = w / TRAIN_MASK_SCALE;
    memset(cells, 0, (size_t)gh * gw);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            float sx, sy;
            source_of(t, h, w, x, y, &sx, &sy);
            /* the mask cell the source position falls in (nearest: a mask is not blended) */
            int mx = (int)floorf((sx + 0.5f) / TRAIN_MASK_SCALE);
            int my = (int)floorf((sy + 0.5f) / TRAIN_MASK_SCALE);
            if (mx < 0 || my < 0 || mx >= mw || my >= mh) continue;
            uint8_t b = mask[(size_t)my * mw + mx];
            if (b) cells[(size_t)(y * gh / h) * gw + (size_t)(x * gw / w)] |= b;
        }
}

int train_features(nn_model *m, const struct train_dataset *d, int split, float *feat)
{
    size_t per = train_dataset_input_size(d);
    int F = nn_model_feature_size(m);
    float *x = malloc(BATCH * per * sizeof(float));
    if (!x) return NN_ENOMEM;
    size_t total = 0, done = 0;
    for (int s = 0; s < d->nseries; s++)
        if (split < 0 || d->series[s].split == split) total += (size_t)d->series[s].n;
    /* The whole RSNA test set at 128: about an hour on 2 cores. */
    struct util_progress pg;
    util_progress_begin(&pg, "train_features_progress", "computing features",
                        split < 0                    ? "split=all"
                        : split == TRAIN_SPLIT_TRAIN ? "split=train"
                        : split == TRAIN_SPLIT_VAL   ? "split=val"
                                                     : "split=test",
                        "slices", total, 0, d->progress_every_s);
    int rc = 0;
    for (int s = 0; rc == 0 && s < d->nseries; s++) {
        const struct train_series *se = &d->series[s];
        if (split >= 0 && se->split != split) continue;
        for (int a = 0; rc == 0 && a < se->n; a += BATCH) {
            int n = se->n - a < BATCH ? se->n - a : BATCH;
            for (int k = 0; k < n; k++)
                train_dataset_input_float(d, se->first + (size_t)(a + k), x + (size_t)k * per);
            rc = nn_cnn_features(m, x, n, feat + (se->first + (size_t)a) * F);
            util_progress_step(&pg, done += (size_t)n);
        }
    }
    util_progress_end(&pg);
    free(x);
    return rc;
}

int train_negative_slices(const struct train_dataset *d, size_t *out)
{
    int n = 0;
    for (int s = 0; s < d->nseries; s++) {
        const struct train_series *se = &d->series[s];
        if (se->split != TRAIN_SPLIT_TRAIN || se->study[0] != 0) continue;
        int pos = 0;
        for (int k = 0; k < se->n && !pos; k++)
            pos = d->labels[(se->first + (size_t)k) * TRAIN_LABELS] != 0;
        if (pos) continue;
        for (int k = 0; k < se->n; k++) {
            if (out) out[n] = se->first + (size_t)k;
            n++;
        }
    }
    return n;
}

int train_small_bleed_slices(const struct train_dataset *d, int max_slices, size_t *out)
{
    int n = 0;
    for (int s = 0; s < d->nseries; s++) {
        const struct train_series *se = &d->series[s];
        if (se->split != TRAIN_SPLIT_TRAIN || !se->slice_labels) continue;
        int pos = 0;
        for (int k = 0; k < se->n; k++)
            pos += d->labels[(se->first + (size_t)k) * TRAIN_LABELS] == 1;
        if (pos < 1 || pos > max_slices) continue;
        for (int k = 0; k < se->n; k++)
            if (d->labels[(se->first + (size_t)k) * TRAIN_LABELS] == 1) {
                if (out) out[n] = se->first + (size_t)k;
                n++;
            }
    }
    return n;
}

struct scored {
    size_t i;
    float z;
};

static int by_logit_desc(const void *a, const void *b)
{
    const struct scored *x = a, *y = b;
    if (x->z != y->z) return x->z < y->z ? 1 : -1;
    return x->i < y->i ? -1 : x->i > y->i;
}

int train_cnn_logits(nn_model *m, const struct train_dataset *d, const size_t *idx, size_t n,
                     float *logits)
{
    size_t per = train_dataset_input_size(d);
    float *x = malloc(BATCH * per * sizeof(float));
    if (!x) return NN_ENOMEM;
    int rc = 0;
    for (size_t a = 0; rc == 0 && a < n; a += BATCH) {
        int b = n - a < BATCH ? (int)(n - a) : BATCH;
        for (int k = 0; k < b; k++)
            train_dataset_input_float(d, idx[a + (size_t)k], x + (size_t)k * per);
        rc = nn_cnn_forward(m, x, b, logits + a * TRAIN_LABELS);
    }
    free(x);
    return rc;
}

int train_hard_negatives(nn_model *m, const struct train_dataset *d, int ncand, int nhard,
                         uint64_t *rng, size_t *out, float *out_logit)
{
    int nneg = train_negative_slices(d, NULL);
    if (ncand > nneg) ncand = nneg;
    if (nhard > ncand) nhard = ncand;
    if (nhard <= 0) return 0;
    size_t *neg = malloc((size_t)nneg * sizeof *neg);
    struct scored *sc = malloc((size_t)ncand * sizeof *sc);
    float *lg = malloc((size_t)ncand * TRAIN_LABELS * sizeof(float));
    int rc = !neg || !sc || !lg ? NN_ENOMEM : 0;
    if (rc == 0) {
        train_negative_slices(d, neg);
        /* ncand of them at random: the first ncand places of a partial shuffle. */
        for (int k = 0; k < ncand; k++) {
            size_t j = (size_t)k + nn_rng_next(rng) % (size_t)(nneg - k), t = neg[k];
            neg[k] = neg[j], neg[j] = t;
        }
        rc = train_cnn_logits(m, d, neg, (size_t)ncand, lg);
    }
    if (rc == 0) {
        for (int k = 0; k < ncand; k++)
            sc[k] = (struct scored){neg[k], lg[(size_t)k * TRAIN_LABELS]};
        qsort(sc, (size_t)ncand, sizeof *sc, by_logit_desc);
        for (int k = 0; k < nhard; k++) {
            out[k] = sc[k].i;
            if (out_logit) out_logit[k] = sc[k].z;
        }
    }
    free(neg), free(sc), free(lg);
    return rc == 0 ? nhard : rc;
}

static int by_index(const void *a, const void *b)
{
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return x < y ? -1 : x > y;
}

size_t train_val_sample(const struct train_dataset *d, size_t want, uint64_t seed, size_t *out)
{
    size_t n = 0;
    for (int s = 0; s < d->nseries; s++) {
        const struct train_series *se = &d->series[s];
        if (se->split != TRAIN_SPLIT_VAL || !se->slice_labels) continue;
        for (int k = 0; k < se->n; k++)
            out[n++] = se->first + (size_t)k;
    }
    if (want == 0 || want >= n) return n;
    /* want of them at random: the first places of a partial shuffle, then
     * back in dataset order (the slices of a series lie together in memory). */
    uint64_t rng = seed * 6700417ULL + 0x5eed;
    for (size_t k = 0; k < want; k++) {
        size_t j = k + nn_rng_next(&rng) % (n - k), t = out[k];
        out[k] = out[j], out[j] = t;
    }
    qsort(out, want, sizeof *out, by_index);
    return want;
}

/* The first of n logits that is not finite, or -1. */
static long first_nonfinite(const float *lg, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(lg[i])) return (long)i;
    return -1;
}

/* The message for a logit of label l of dataset slice i that is not finite:
 * a NaN ranks nowhere (the AUC's walk had stood still on one) and comes of
 * weights that training made non-finite, after the epoch's loss was
 * taken. */
static void say_nonfinite(const struct train_dataset *d, const char *model, size_t i, int l,
                          char *err, size_t errlen)
{
    int s = 0;
    while (s + 1 < d->nseries && d->series[s + 1].first <= i)
        s++;
    const struct train_series *se = &d->series[s];
    snprintf(err, errlen,
             "the %s's output for \"%s\" is not a number (NaN or infinite) at slice %zu of %d of "
             "series %s: its weights are not finite (training diverged; a lower learning rate "
             "may help)",
             model, train_label_names[l], i - se->first + 1, se->n, se->series_uid);
}

int train_evaluate_slices(nn_model *m, const struct train_dataset *d, const size_t *idx, size_t n,
                          struct train_binary out[TRAIN_LABELS], double *weighted_logloss,
                          char *err, size_t errlen)
{
    float *lg = malloc((n ? n : 1) * TRAIN_LABELS * sizeof(float));
    float *p = malloc((n ? n : 1) * sizeof(float));
    unsigned char *y = malloc(n ? n : 1);
    int rc = !lg || !p || !y ? NN_ENOMEM : 0;
    if (rc == 0) {
        nn_model_set_training(m, 0);
        rc = train_cnn_logits(m, d, idx, n, lg);
    }
    long bad = rc == 0 ? first_nonfinite(lg, n * TRAIN_LABELS) : -1;
    if (bad >= 0) {
        say_nonfinite(d, "CNN", idx[bad / TRAIN_LABELS], (int)(bad % TRAIN_LABELS), err, errlen);
        rc = NN_EFORMAT;
    } else if (rc != 0) {
        snprintf(err, errlen, "%s", rc == NN_ENOMEM ? "out of memory" : "the CNN failed");
    }
    double wl = 0, ws = 0;
    for (int l = 0; rc == 0 && l < TRAIN_LABELS; l++) {
        size_t nk = 0; /* slices whose label l is known */
        for (size_t k = 0; k < n; k++) {
            uint8_t v = d->labels[idx[k] * TRAIN_LABELS + l];
            if (v == TRAIN_LABEL_UNKNOWN) continue;
            p[nk] = 1.0f / (1.0f + expf(-lg[k * TRAIN_LABELS + l]));
            y[nk++] = v == 1;
        }
        train_binary_eval(p, y, nk, 0.5f, &out[l]);
        if (nk) wl += train_rsna_weights[l] * out[l].logloss, ws += train_rsna_weights[l];
    }
    *weighted_logloss = ws > 0 ? wl / ws : NAN;
    free(lg), free(p), free(y);
    return rc;
}

/* The stage-1 head applied to features: the classifier's Linear layers with
 * ReLU between them (dropout is the identity in eval mode). logits: n rows
 * of the model's outputs. */
static int head_forward(nn_model *m, const float *feat, int n, float *logits)
{
    nn_tensor_info wt[16], bs[16];
    int nl = 0;
    for (int j = 0; j < 64 && nl < 16; j++) {
        char name[64];
        snprintf(name, sizeof name, "cnn.classifier.%d.weight", j);
        if (nn_model_tensor_find(m, name, &wt[nl]) != 0) continue;
        snprintf(name, sizeof name, "cnn.classifier.%d.bias", j);
        if (nn_model_tensor_find(m, name, &bs[nl]) != 0) return NN_EFORMAT;
        nl++;
    }
    if (nl == 0 || wt[nl - 1].shape[0] != nn_model_config(m)->labels) return NN_EFORMAT;
    int F = nn_model_feature_size(m);
    size_t maxw = (size_t)F;
    for (int l = 0; l < nl; l++)
        if ((size_t)wt[l].shape[0] > maxw) maxw = (size_t)wt[l].shape[0];
    float *a = malloc(maxw * sizeof(float)), *b = malloc(maxw * sizeof(float));
    if (!a || !b) {
        free(a), free(b);
        return NN_ENOMEM;
    }
    for (int i = 0; i < n; i++) {
        memcpy(a, feat + (size_t)i * F, (size_t)F * sizeof(float));
        int in = F;
        for (int l = 0; l < nl; l++) {
            int out = (int)wt[l].shape[0];
            for (int o = 0; o < out; o++) {
                double s = bs[l].data[o];
                const float *w = wt[l].data + (size_t)o * in;
                for (int k = 0; k < in; k++)
                    s += (double)w[k] * a[k];
                b[o] = (float)(l + 1 < nl && s < 0 ? 0 : s);
            }
            memcpy(a, b, (size_t)out * sizeof(float));
            in = out;
        }
        memcpy(logits + (size_t)i * in, a, (size_t)in * sizeof(float));
    }
    free(a), free(b);
    return 0;
}

/* out [n, TRAIN_LABELS] from a model's raw outputs raw [n, nout]: our label
 * l is output label_index[l] (NULL: output l). */
static void our_labels(const float *raw, int n, int nout, const int *label_index, float *out)
{
    for (int i = 0; i < n; i++)
        for (int l = 0; l < TRAIN_LABELS; l++)
            out[(size_t)i * TRAIN_LABELS + l] =
                raw[(size_t)i * nout + (label_index ? label_index[l] : l)];
}

int train_predict_features(nn_model *m, const struct train_dataset *d, int split,
                           const float *features, const int *label_index, float *cnn_logits,
                           float *lrcn_logits)
{
    int F = nn_model_feature_size(m), nout = nn_model_config(m)->labels;
    for (int l = 0; l < TRAIN_LABELS; l++)
        if ((label_index ? label_index[l] : l) >= nout) return NN_EFORMAT;
    int longest = 1;
    for (int s = 0; s < d->nseries; s++)
        if (d->series[s].n > longest) longest = d->series[s].n;
    nn_model_set_training(m, 0);
    float *feat = NULL;
    /* one series' outputs in the model's order, before they are put in ours */
    float *raw = malloc((size_t)longest * (size_t)nout * sizeof(float));
    if (!raw) return NN_ENOMEM;
    int rc = 0;
    if (!features) {
        feat = malloc(d->nslices * (size_t)F * sizeof(float));
        if (!feat) {
            free(raw);
            return NN_ENOMEM;
        }
        rc = train_features(m, d, split, feat);
        features = feat;
    }
    for (int s = 0; rc == 0 && s < d->nseries; s++) {
        const struct train_series *se = &d->series[s];
        if (split >= 0 && se->split != split) continue;
        const float *f = features + se->first * F;
        if (cnn_logits && (rc = head_forward(m, f, se->n, raw)) == 0)
            our_labels(raw, se->n, nout, label_index, cnn_logits + se->first * TRAIN_LABELS);
        if (rc == 0 && lrcn_logits && (rc = nn_lrcn_forward_features(m, f, &se->n, 1, raw)) == 0)
            our_labels(raw, se->n, nout, label_index, lrcn_logits + se->first * TRAIN_LABELS);
    }
    free(feat), free(raw);
    return rc;
}

int train_predict(nn_model *m, const struct train_dataset *d, int split, float *cnn_logits,
                  float *lrcn_logits)
{
    return train_predict_features(m, d, split, NULL, NULL, cnn_logits, lrcn_logits);
}

/* The last linear layer of the LRCN ("out") or of the stage-1 head: one row
 * of w and one value of b per output. */
static int output_layer(nn_model *m, int cnn_head, nn_tensor_info *w, nn_tensor_info *b)
{
    char name[64];
    if (!cnn_head)
        return nn_model_tensor_find(m, "out.weight", w) == 0 &&
                       nn_model_tensor_find(m, "out.bias", b) == 0
                   ? 0
                   : NN_EFORMAT;
    int last = -1;
    for (int j = 0; j < 64; j++) {
        snprintf(name, sizeof name, "cnn.classifier.%d.weight", j);
        if (nn_model_tensor_find(m, name, w) == 0) last = j;
    }
    if (last < 0) return NN_EFORMAT;
    snprintf(name, sizeof name, "cnn.classifier.%d.weight", last);
    nn_model_tensor_find(m, name, w);
    snprintf(name, sizeof name, "cnn.classifier.%d.bias", last);
    return nn_model_tensor_find(m, name, b) == 0 ? 0 : NN_EFORMAT;
}

int train_fold_temperature(nn_model *m, int cnn_head, const int *label_index, const float *t)
{
    nn_tensor_info w, b;
    int rc = output_layer(m, cnn_head, &w, &b);
    if (rc != 0) return rc;
    size_t in = (size_t)w.shape[1];
    for (int l = 0; l < TRAIN_LABELS; l++) {
        int o = label_index ? label_index[l] : l;
        if (o >= w.shape[0]) return NN_EINVAL;
        for (size_t k = 0; k < in; k++)
            w.data[(size_t)o * in + k] /= t[l];
        b.data[o] /= t[l];
    }
    return 0;
}

int train_outputs_reorder(nn_model *m, const int *label_index)
{
    for (int head = 0; head < 2; head++) {
        nn_tensor_info w, b;
        int rc = output_layer(m, head, &w, &b);
        if (rc != 0) return rc;
        if (w.shape[0] != TRAIN_LABELS) return NN_EINVAL;
        size_t in = (size_t)w.shape[1];
        float *old = malloc(TRAIN_LABELS * (in + 1) * sizeof(float));
        if (!old) return NN_ENOMEM;
        memcpy(old, w.data, TRAIN_LABELS * in * sizeof(float));
        memcpy(old + TRAIN_LABELS * in, b.data, TRAIN_LABELS * sizeof(float));
        for (int l = 0; l < TRAIN_LABELS; l++) {
            memcpy(w.data + (size_t)l * in, old + (size_t)label_index[l] * in, in * sizeof(float));
            b.data[l] = old[TRAIN_LABELS * in + (size_t)label_index[l]];
        }
        free(old);
    }
    return 0;
}

static float sigm(float x)
{
    return 1.0f / (1.0f + expf(-x));
}

/* Study level of label l from the logits lg [nslices, TRAIN_LABELS] of the
 * series study_of numbers (train_dataset_studies, ns studies): per study,
 * the maximum logit over the slices of all its series, as the node's
 * worklist takes the maximum over a study's series, and its label, 1 when
 * any of its series has it; a subtype none has and some do not know is
 * unknown and left out. Into z and y, for the studies with a known label,
 * in study order; mx and lab are ns places of room. Returns how many. */
static size_t study_maxima(const struct train_dataset *d, const int *study_of, int ns,
                           const float *lg, int l, float *mx, uint8_t *lab, float *z,
                           unsigned char *y)
{
    for (int k = 0; k < ns; k++)
        mx[k] = -INFINITY, lab[k] = 0;
    for (int s = 0; s < d->nseries; s++) {
        int k = study_of[s];
        if (k < 0) continue;
        const struct train_series *se = &d->series[s];
        for (int i = 0; i < se->n; i++) {
            float v = lg[(se->first + (size_t)i) * TRAIN_LABELS + l];
            if (v > mx[k]) mx[k] = v;
        }
        if (se->study[l] == 1)
            lab[k] = 1;
        else if (l > 0 && se->study[l] == TRAIN_LABEL_UNKNOWN && lab[k] != 1)
            lab[k] = TRAIN_LABEL_UNKNOWN;
    }
    size_t n = 0;
    for (int k = 0; k < ns; k++)
        if (lab[k] != TRAIN_LABEL_UNKNOWN) z[n] = mx[k], y[n++] = lab[k];
    return n;
}

static int evaluate(nn_model *m, const int *label_index, const struct train_dataset *d, int split,
                    const float *features, const float thresholds[2][TRAIN_LABELS],
                    struct train_eval *e, float *study_any, unsigned char *study_y, char *err,
                    size_t errlen);

/* 0 when the logits lg [model] of every slice of split (-1: all) are
 * finite; else -1 with a message naming the first that is not. */
static int outputs_finite(const struct train_dataset *d, int split, float *const lg[2], char *err,
                          size_t errlen)
{
    for (int s = 0; s < d->nseries; s++) {
        const struct train_series *se = &d->series[s];
        if (split >= 0 && se->split != split) continue;
        for (int mo = 0; mo < 2; mo++) {
            const float *v = lg[mo] + se->first * TRAIN_LABELS;
            long bad = first_nonfinite(v, (size_t)se->n * TRAIN_LABELS);
            if (bad < 0) continue;
            say_nonfinite(d, mo == TRAIN_MODEL_LRCN ? "LRCN" : "CNN",
                          se->first + (size_t)bad / TRAIN_LABELS, (int)(bad % TRAIN_LABELS), err,
                          errlen);
            return -1;
        }
    }
    return 0;
}

int train_evaluate(nn_model *m, const int *label_index, const struct train_dataset *d, int split,
                   const float thresholds[2][TRAIN_LABELS], struct train_eval *e, char *err,
                   size_t errlen)
{
    return evaluate(m, label_index, d, split, NULL, thresholds, e, NULL, NULL, err, errlen);
}

int train_evaluate_scores(nn_model *m, const int *label_index, const struct train_dataset *d,
                          int split, const float thresholds[2][TRAIN_LABELS], struct train_eval *e,
                          float *study_any, unsigned char *study_y, char *err, size_t errlen)
{
    return evaluate(m, label_index, d, split, NULL, thresholds, e, study_any, study_y, err, errlen);
}

int train_evaluate_features(nn_model *m, const int *label_index, const struct train_dataset *d,
                            int split, const float *features,
                            const float thresholds[2][TRAIN_LABELS], struct train_eval *e,
                            char *err, size_t errlen)
{
    return evaluate(m, label_index, d, split, features, thresholds, e, NULL, NULL, err, errlen);
}

static int evaluate(nn_model *m, const int *label_index, const struct train_dataset *d, int split,
                    const float *features, const float thresholds[2][TRAIN_LABELS],
                    struct train_eval *e, float *study_any, unsigned char *study_y, char *err,
                    size_t errlen)
{
    memset(e, 0, sizeof *e);
    memcpy(e->thresholds, thresholds, sizeof e->thresholds);
    size_t N = d->nslices, S = (size_t)d->nseries + 1;
    float *lg[2] = {malloc(N * TRAIN_LABELS * sizeof(float)),
                    malloc(N * TRAIN_LABELS * sizeof(float))};
    float *p = malloc((N + S) * sizeof(float)), *mx = malloc(S * sizeof(float));
    unsigned char *y = malloc(N + S);
    uint8_t *lab = malloc(S);
    int *study_of = malloc(S * sizeof(int));
    int rc = -1;
    if (!lg[0] || !lg[1] || !p || !mx || !y || !lab || !study_of ||
        (e->nstudies = train_dataset_studies(d, split, study_of)) < 0) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    int r = train_predict_features(m, d, split, features, label_index, lg[0], lg[1]);
    if (r != 0) {
        snprintf(err, errlen, "prediction failed (nn error %d)", r);
        goto out;
    }
    if (outputs_finite(d, split, lg, err, errlen) != 0) goto out;
    train_dataset_count(d, split, &e->nseries, &e->nslices, NULL, NULL);
    if (e->nseries == 0) {
        snprintf(err, errlen, "no series to evaluate");
        goto out;
    }
    for (int mo = 0; mo < 2; mo++) {
        double wsum[2] = {0, 0}, wl[2] = {0, 0};
        for (int l = 0; l < TRAIN_LABELS; l++) {
            /* slice level: slices with known labels */
            size_t n = 0;
            for (int s = 0; s < d->nseries; s++) {
                const struct train_series *se = &d->series[s];
                if ((split >= 0 && se->split != split) || !se->slice_labels) continue;
                for (int k = 0; k < se->n; k++) {
                    size_t i = se->first + (size_t)k;
                    uint8_t v = d->labels[i * TRAIN_LABELS + l];
                    if (v == TRAIN_LABEL_UNKNOWN) continue; /* not scored */
                    p[n] = sigm(lg[mo][i * TRAIN_LABELS + l]);
                    y[n++] = v == 1;
                }
            }
            struct train_binary *b = &e->m[TRAIN_LEVEL_SLICE][mo][l];
            train_binary_eval(p, y, n, thresholds[mo][l], b);
            if (n) {
                wl[0] += train_rsna_weights[l] * b->logloss;
                wsum[0] += train_rsna_weights[l];
            }
            if (l == 0)
                e->roc_n[0][mo] =
                    train_roc(p, y, n, e->roc_fpr[0][mo], e->roc_tpr[0][mo], TRAIN_ROC_POINTS);
            /* study level: max over the slices of the study's series */
            n = study_maxima(d, study_of, e->nstudies, lg[mo], l, mx, lab, p, y);
            for (size_t k = 0; k < n; k++)
                p[k] = sigm(p[k]);
            if (l == 0 && mo == TRAIN_MODEL_LRCN) {
                if (study_any) memcpy(study_any, p, n * sizeof *p);
                if (study_y) memcpy(study_y, y, n);
            }
            b = &e->m[TRAIN_LEVEL_STUDY][mo][l];
            train_binary_eval(p, y, n, thresholds[mo][l], b);
            train_binary_ci(p, y, n, b); /* studies are independent; slices are not */
            if (n) {
                wl[1] += train_rsna_weights[l] * b->logloss;
                wsum[1] += train_rsna_weights[l];
            }
            if (l == 0)
                e->roc_n[1][mo] =
                    train_roc(p, y, n, e->roc_fpr[1][mo], e->roc_tpr[1][mo], TRAIN_ROC_POINTS);
        }
        for (int lv = 0; lv < 2; lv++)
            e->weighted_logloss[lv][mo] = wsum[lv] > 0 ? wl[lv] / wsum[lv] : NAN;
    }
    rc = 0;
out:
    free(lg[0]), free(lg[1]), free(p), free(mx), free(y), free(lab), free(study_of);
    return rc;
}

/* ---- calibration and thresholds -------------------------------------------------- */

/* A temperature the fit pushed to an end of its range ([0.05, 20],
 * train_fit_temperature) would have gone further: at 20 the logits say
 * little of the label on these studies and the calibrated probabilities
 * crowd near 0.5; at 0.05 they are sharpened twentyfold. Said in the log
 * (the shipped model's CNN subarachnoid temperature is 20.0000), not
 * refused. */
static void temperature_at_bound(int mo, int l, float t, size_t n, size_t npos)
{
    if (t < 20 * 0.999f && t > 0.05f * 1.001f) return;
    util_log(UTIL_LOG_WARN, "train_temperature_at_bound",
             "model=%s label=%s temperature=%.4f bound=%s studies=%zu positive=%zu",
             mo == TRAIN_MODEL_LRCN ? "lrcn" : "cnn", train_label_names[l], t,
             t > 1 ? "20" : "0.05", n, npos);
}

int train_calibrate(nn_model *m, const int *label_index, const struct train_dataset *d,
                    const float *features, double sens, float thr[2][TRAIN_LABELS],
                    struct train_reliability *rel, unsigned *fitted, char *t_desc, size_t tn,
                    char *err, size_t errlen)
{
    size_t N = d->nslices, S = (size_t)d->nseries + 1;
    float *lg[2] = {malloc(N * TRAIN_LABELS * sizeof(float)),
                    malloc(N * TRAIN_LABELS * sizeof(float))};
    float *z = malloc(S * sizeof(float)), *pr = malloc(S * sizeof(float));
    float *mx = malloc(S * sizeof(float));
    unsigned char *y = malloc(S);
    uint8_t *lab = malloc(S);
    int *study_of = malloc(S * sizeof(int)), ns;
    int rc = -1;
    if (!lg[0] || !lg[1] || !z || !pr || !mx || !y || !lab || !study_of ||
        (ns = train_dataset_studies(d, TRAIN_SPLIT_VAL, study_of)) < 0) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    int r = train_predict_features(m, d, TRAIN_SPLIT_VAL, features, label_index, lg[0], lg[1]);
    if (r != 0) {
        snprintf(err, errlen, "prediction failed (nn error %d)", r);
        goto out;
    }
    if (outputs_finite(d, TRAIN_SPLIT_VAL, lg, err, errlen) != 0) goto out;
    int off = 0;
    memset(rel, 0, sizeof *rel);
    if (fitted) *fitted = 0;
    for (int mo = 0; mo < 2; mo++) {
        float T[TRAIN_LABELS];
        for (int l = 0; l < TRAIN_LABELS; l++) {
            /* Temperature on the study-level maxima: the quantity the node
             * flags on is the study's maximum over its series. */
            size_t n = study_maxima(d, study_of, ns, lg[mo], l, mx, lab, z, y);
            size_t npos = 0;
            for (size_t i = 0; i < n; i++)
                npos += y[i];
            int fit = npos > 0 && npos < n;
            if (fit && fitted && mo == TRAIN_MODEL_LRCN) *fitted |= 1u << l;
            if (mo == TRAIN_MODEL_LRCN) rel->studies[l] = n, rel->positives[l] = npos;
            T[l] = fit ? train_fit_temperature(z, y, n) : 1.0f;
            if (fit) temperature_at_bound(mo, l, T[l], n, npos);
            if (mo == TRAIN_MODEL_LRCN && l == 0) {
                rel->valid = 1;
                for (int c = 0; c < 2; c++)
                    for (size_t i = 0; i < n; i++) {
                        double p = 1 / (1 + exp(-z[i] / (c ? T[0] : 1.0f)));
                        int bin = (int)(p * 10);
                        if (bin > 9) bin = 9;
                        rel->pred[c][bin] += p, rel->obs[c][bin] += y[i], rel->count[c][bin]++;
                    }
                for (int c = 0; c < 2; c++)
                    for (int b = 0; b < 10; b++)
                        if (rel->count[c][b])
                            rel->pred[c][b] /= rel->count[c][b], rel->obs[c][b] /= rel->count[c][b];
            }
            for (size_t i = 0; i < n; i++)
                pr[i] = 1.0f / (1.0f + expf(-z[i] / T[l]));
            /* A hair below the chosen probability: folding the temperature
             * into the weights changes the last float bits of the logits.
             * Without a positive study there is nothing to aim at: 0.5. */
            thr[mo][l] = npos ? train_threshold_for_sensitivity(pr, y, n, sens) * 0.9999f : 0.5f;
        }
        if (mo == TRAIN_MODEL_LRCN) memcpy(rel->temperature, T, sizeof T);
        if (train_fold_temperature(m, mo == TRAIN_MODEL_CNN, label_index, T) != 0) {
            snprintf(err, errlen, "the model's last layers are not as expected");
            goto out;
        }
        off +=
            snprintf(t_desc + off, tn - (size_t)off, "%s%s=", mo ? ";" : "", mo ? "lrcn" : "cnn");
        for (int l = 0; l < TRAIN_LABELS && (size_t)off < tn; l++)
            off += snprintf(t_desc + off, tn - (size_t)off, "%s%.4f", l ? "," : "", T[l]);
    }
    rc = 0;
out:
    free(lg[0]), free(lg[1]), free(z), free(pr), free(mx), free(y), free(lab), free(study_of);
    return rc;
}

/* ---- comma-separated float lists (thresholds in metadata) ------------------------ */

void train_floats_parse(const char *s, float *out, int n, float dflt)
{
    for (int i = 0; i < n; i++) {
        char *end;
        float v = s ? strtof(s, &end) : dflt;
        if (!s || end == s) {
            out[i] = dflt;
            continue;
        }
        out[i] = v;
        s = *end == ',' ? end + 1 : end;
    }
}

void train_floats_format(char *out, size_t n, const float *v, int k)
{
    int off = 0;
    if (n) *out = 0;
    for (int i = 0; i < k && (size_t)off < n; i++)
        off += snprintf(out + off, n - (size_t)off, "%s%.6g", i ? "," : "", v[i]);
}

double train_ema_update(float *shadow, const float *x, size_t n, double decay, long step)
{
    double warm = (1.0 + (double)step) / (10.0 + (double)step);
    double d = warm < decay ? warm : decay;
    float a = (float)d, b = (float)(1.0 - d);
    for (size_t i = 0; i < n; i++)
        shadow[i] = a * shadow[i] + b * x[i];
    return d;
}

/* ---- stage 2 on studies labelled as a whole (trainer.h) ---- */

static bool study_only(const struct train_dataset *d, int s)
{
    return !d->series[s].slice_labels;
}

struct group_ctx {
    const struct train_dataset *d;
    const int *rank; /* a series' place in the epoch */
};

/* Study-labelled series by study, then by their place in the epoch. */
static int by_study(const void *a, const void *b, void *arg)
{
    const struct group_ctx *g = arg;
    int x = *(const int *)a, y = *(const int *)b;
    int c = strcmp(g->d->series[x].study_uid, g->d->series[y].study_uid);
    return c ? c : g->rank[x] - g->rank[y];
}

int train_stage2_group(const struct train_dataset *d, int *ser, int n)
{
    int m = 0;
    for (int i = 0; i < n; i++)
        m += study_only(d, ser[i]);
    if (m == 0) return 0;
    int *rank = malloc((size_t)d->nseries * sizeof *rank);
    int *sorted = malloc((size_t)m * sizeof *sorted);
    int *at = malloc((size_t)d->nseries * sizeof *at); /* a series' place in sorted */
    int *out = malloc((size_t)n * sizeof *out);
    bool *placed = calloc((size_t)d->nseries, sizeof *placed);
    if (!rank || !sorted || !at || !out || !placed) {
        free(rank), free(sorted), free(at), free(out), free(placed);
        return -1;
    }
    m = 0;
    for (int i = 0; i < n; i++) {
        rank[ser[i]] = i;
        if (study_only(d, ser[i])) sorted[m++] = ser[i];
    }
    struct group_ctx g = {d, rank};
    qsort_r(sorted, (size_t)m, sizeof *sorted, by_study, &g);
    for (int k = 0; k < m; k++)
        at[sorted[k]] = k;
    int o = 0;
    for (int i = 0; i < n; i++) {
        int s = ser[i];
        if (placed[s]) continue;
        out[o++] = s, placed[s] = true;
        if (!study_only(d, s)) continue;
        /* the rest of its study: after it in sorted, as it came first */
        for (int k = at[s] + 1;
             k < m && !strcmp(d->series[sorted[k]].study_uid, d->series[s].study_uid); k++)
            if (!placed[sorted[k]]) out[o++] = sorted[k], placed[sorted[k]] = true;
    }
    memcpy(ser, out, (size_t)n * sizeof *ser);
    free(rank), free(sorted), free(at), free(out), free(placed);
    return 0;
}

int train_stage2_group_size(const struct train_dataset *d, const int *ser, int n, int i)
{
    if (!study_only(d, ser[i])) return 1;
    int k = i + 1;
    while (k < n && study_only(d, ser[k]) &&
           !strcmp(d->series[ser[k]].study_uid, d->series[ser[i]].study_uid))
        k++;
    return k - i;
}

/* d/dz of w * (pw * y * softplus(-z) + (1 - y) * softplus(z)) over n. */
static float bce_grad(float z, float y, float w, float pw, double n)
{
    float sg = 1.0f / (1.0f + expf(-z));
    return (float)(w * (pw * y * (sg - 1) + (1 - y) * sg) / n);
}

void train_stage2_mil(const struct train_dataset *d, const int *src, const int *len,
                      const size_t *from, int b, size_t tot, const float *pos_w, const float *lg,
                      float *dl)
{
    const double norm = (double)tot * TRAIN_LABELS;
    for (int k = 0; k < b;) {
        if (!study_only(d, src[k])) {
            k++;
            continue;
        }
        int e = k + 1; /* the bag: src[k .. e) */
        while (e < b && study_only(d, src[e]) &&
               !strcmp(d->series[src[e]].study_uid, d->series[src[k]].study_uid))
            e++;
        const uint8_t *y = d->series[src[k]].study;
        for (int l = 0; l < TRAIN_LABELS; l++) {
            size_t best = from[k];
            for (int j = k; j < e; j++) {
                size_t arg = from[j];
                for (int i = 0; i < len[j]; i++) {
                    size_t r = from[j] + (size_t)i;
                    dl[r * TRAIN_LABELS + l] = 0;
                    if (lg[r * TRAIN_LABELS + l] > lg[arg * TRAIN_LABELS + l]) arg = r;
                }
                if (lg[arg * TRAIN_LABELS + l] > lg[best * TRAIN_LABELS + l]) best = arg;
                if (y[l] == 0) /* every slice negative: each series' highest */
                    dl[arg * TRAIN_LABELS + l] =
                        bce_grad(lg[arg * TRAIN_LABELS + l], 0, train_rsna_weights[l], 1, norm);
            }
            if (y[l] == 1) /* somewhere in the study: its highest slice */
                dl[best * TRAIN_LABELS + l] =
                    bce_grad(lg[best * TRAIN_LABELS + l], 1, train_rsna_weights[l], pos_w[l], norm);
        }
        k = e;
    }
}

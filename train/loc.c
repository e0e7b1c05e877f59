/* train/loc.c: the localisation head of stage 1 (`train --loc-loss W`).
 * Labels of whole slices say that a slice shows blood, not where; a bleed
 * of a few pixels is a small share of what the CNN pools. Where the data
 * has blood masks (phantom folders made with --masks), this head gives
 * every cell of the CNN's last feature map one logit per label (a 1 x 1
 * convolution over its channels) and a BCE against the cells' mask bits,
 * added to the slice loss with weight W, so that the features learn where
 * the blood is. Training only: the model file has no such head, the node
 * never runs it. Its weights and Adam moments are checkpointed with the
 * run (WORKDIR/last-loc.bin), so that a resumed run is the same run. */
#include "loc.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "trainer.h"

#define LOC_MAGIC "ICHTLOC1\n"
#define LOC_PRIOR (-4.0f) /* the bias starts at a cell being blood with p ~ 0.02 */

int train_loc_init(struct train_loc *l, nn_model *m, int batch, char *err, size_t errlen)
{
    memset(l, 0, sizeof *l);
    if (nn_cnn_map_shape(m, &l->c, &l->gh, &l->gw) != 0) {
        snprintf(err, errlen,
                 "--loc-loss needs features that end in a global pool (G or GM), so that "
                 "there is a map to localise on");
        return -1;
    }
    size_t g = (size_t)l->gh * l->gw, nw = (size_t)TRAIN_LABELS * l->c;
    l->cap = batch;
    l->p = calloc(4 * (nw + TRAIN_LABELS), sizeof(float));
    l->map = malloc((size_t)batch * l->c * g * sizeof(float));
    l->dmap = malloc((size_t)batch * l->c * g * sizeof(float));
    l->cells = malloc((size_t)batch * g);
    l->known = malloc((size_t)batch * sizeof *l->known);
    l->z = malloc(3 * g * TRAIN_LABELS * sizeof(float));
    if (!l->p || !l->map || !l->dmap || !l->cells || !l->known || !l->z) {
        train_loc_free(l);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    l->nparam = nw + TRAIN_LABELS;
    l->w = l->p, l->b = l->p + nw;
    l->grad = l->p + l->nparam;
    l->am = l->grad + l->nparam;
    l->av = l->am + l->nparam;
    for (int k = 0; k < TRAIN_LABELS; k++)
        l->b[k] = LOC_PRIOR;
    return 0;
}

void train_loc_free(struct train_loc *l)
{
    free(l->p), free(l->map), free(l->dmap), free(l->cells), free(l->known), free(l->z);
    memset(l, 0, sizeof *l);
}

/* Whether a cell's mask bits hold label y's blood (0, "any": blood of any
 * subtype; y >= 1: subtype y - 1's bit). */
static int cell_has(uint8_t bits, int y)
{
    return y == 0 ? bits != 0 : bits >> (y - 1) & 1;
}

size_t train_loc_cell_weights(const struct train_dataset *d, int gh, int gw, float *pw)
{
    double pos[TRAIN_LABELS] = {0}, all = 0;
    size_t counted = 0, g = (size_t)gh * gw;
    uint8_t *cells = malloc(g ? g : 1);
    struct train_affine t;
    train_augment_none(&t);
    for (int s = 0; s < d->nseries && cells; s++) {
        const struct train_series *se = &d->series[s];
        if (se->split != TRAIN_SPLIT_TRAIN) continue;
        for (int k = 0; k < se->n; k++) {
            const uint8_t *mask = train_dataset_mask(d, se->first + (size_t)k);
            if (!mask) continue;
            train_augment_cells(&t, mask, d->h, d->w, cells, gh, gw);
            counted++;
            all += (double)g;
            for (size_t p = 0; p < g; p++)
                for (int y = 0; y < TRAIN_LABELS; y++)
                    pos[y] += cell_has(cells[p], y);
        }
    }
    free(cells);
    for (int y = 0; y < TRAIN_LABELS; y++) {
        double w = pos[y] > 0 ? (all - pos[y]) / pos[y] : 1;
        pw[y] = w < 1 ? 1 : w > TRAIN_LOC_MAX_POS_W ? TRAIN_LOC_MAX_POS_W : (float)w;
    }
    return counted;
}

double train_loc_loss(struct train_loc *l, int n, const float *label_w, float weight)
{
    int g = l->gh * l->gw, C = l->c, L = TRAIN_LABELS;
    size_t per = (size_t)C * g;
    float *z = l->z, *t = l->z + (size_t)g * L, *dz = t + (size_t)g * L;
    memset(l->grad, 0, l->nparam * sizeof(float));
    memset(l->dmap, 0, (size_t)n * per * sizeof(float));
    /* nn_bce_logits takes the mean over one slice's cells and labels; over
     * the batch it is the mean over all n slices, as the slice loss is, so
     * slices without a mask add nothing and count in the mean */
    double loss = 0;
    float scale = weight / (float)n;
    for (int k = 0; k < n; k++) {
        if (!l->known[k]) continue;
        const float *map = l->map + (size_t)k * per;
        const uint8_t *cells = l->cells + (size_t)k * g;
        float *dmap = l->dmap + (size_t)k * per;
        /* z [cells, labels] = w . map + b */
        for (int p = 0; p < g; p++)
            for (int y = 0; y < L; y++) {
                z[p * L + y] = l->b[y];
                t[p * L + y] = (float)cell_has(cells[p], y);
            }
        for (int y = 0; y < L; y++)
            for (int c = 0; c < C; c++) {
                float wc = l->w[y * C + c];
                const float *mc = map + (size_t)c * g;
                for (int p = 0; p < g; p++)
                    z[p * L + y] += wc * mc[p];
            }
        loss += nn_bce_logits(dz, z, t, label_w, l->pos_w, g, L);
        for (int y = 0; y < L; y++) {
            float *gw = l->grad + y * C;
            for (int p = 0; p < g; p++)
                l->grad[L * C + y] += dz[p * L + y] * scale;
            for (int c = 0; c < C; c++) {
                const float *mc = map + (size_t)c * g;
                float *dc = dmap + (size_t)c * g, wc = l->w[y * C + c] * scale, acc = 0;
                for (int p = 0; p < g; p++) {
                    acc += dz[p * L + y] * mc[p];
                    dc[p] += dz[p * L + y] * wc;
                }
                gw[c] += acc * scale;
            }
        }
    }
    return loss * scale;
}

void train_loc_step(struct train_loc *l, float lr)
{
    l->t++;
    nn_adam_hyper h = {.lr = lr,
                       .beta1 = 0.9f,
                       .beta2 = 0.999f,
                       .eps = 1e-8f,
                       .step = lr / (1.0f - powf(0.9f, (float)l->t)),
                       .bc2 = sqrtf(1.0f - powf(0.999f, (float)l->t))};
    nn_adam_update(l->p, l->grad, l->am, l->av, l->nparam, &h);
}

struct loc_head {
    char magic[12];
    int32_t c, gh, gw, labels;
    int64_t t, model_steps;
};

int train_loc_save(const struct train_loc *l, const char *path, long model_steps)
{
    char tmp[1300];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return -1;
    struct loc_head h = {.c = l->c,
                         .gh = l->gh,
                         .gw = l->gw,
                         .labels = TRAIN_LABELS,
                         .t = l->t,
                         .model_steps = model_steps};
    memcpy(h.magic, LOC_MAGIC, sizeof LOC_MAGIC);
    /* the weights, then both moments: what a resumed run needs */
    bool ok = fwrite(&h, sizeof h, 1, f) == 1 &&
              fwrite(l->w, sizeof(float), l->nparam, f) == l->nparam &&
              fwrite(l->am, sizeof(float), 2 * l->nparam, f) == 2 * l->nparam && fflush(f) == 0 &&
              fsync(fileno(f)) == 0;
    if (fclose(f) != 0) ok = false;
    if (!ok || rename(tmp, path) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

int train_loc_load(struct train_loc *l, const char *path, long model_steps, char *err,
                   size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    struct loc_head h;
    int rc = -1;
    if (fread(&h, sizeof h, 1, f) != 1 || memcmp(h.magic, LOC_MAGIC, sizeof LOC_MAGIC) != 0 ||
        h.c != l->c || h.gh != l->gh || h.gw != l->gw || h.labels != TRAIN_LABELS) {
        snprintf(err, errlen, "%s: not the head of this model", path);
    } else if (h.model_steps != model_steps) {
        snprintf(err, errlen, "%s is of step %lld, the checkpoint of step %ld", path,
                 (long long)h.model_steps, model_steps);
    } else if (fread(l->w, sizeof(float), l->nparam, f) != l->nparam ||
               fread(l->am, sizeof(float), 2 * l->nparam, f) != 2 * l->nparam) {
        snprintf(err, errlen, "%s: short file", path);
    } else {
        l->t = h.t;
        rc = 0;
    }
    fclose(f);
    return rc;
}

/* The localisation head of stage 1 (`ichtriage train --loc-loss W`,
 * train/loc.c): per cell of the CNN's last feature map, one logit per label
 * from its channels, and a BCE against the cells' blood masks. Training
 * only; the model file has no such head. */
#ifndef TRAIN_LOC_H
#define TRAIN_LOC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dataset.h"
#include "nn.h"

struct train_loc {
    int c, gh, gw; /* the map: channels, grid */
    int cap;       /* slices per batch */
    float *p;      /* weights [labels, c], bias [labels]; then their gradient, Adam's moments */
    float *w, *b, *grad, *am, *av;
    size_t nparam;
    long t;                    /* Adam steps */
    float *map;                /* [cap, c, gh, gw]: nn_cnn_map's output, filled by the caller */
    float *dmap;               /* [cap, c, gh, gw]: the loss's gradient for it */
    uint8_t *cells;            /* [cap, gh, gw]: each slice's targets (train_augment_cells) */
    bool *known;               /* [cap]: the slice has a mask; without one it adds nothing */
    float *z;                  /* scratch: one slice's logits, targets and their gradient */
    float pos_w[TRAIN_LABELS]; /* cells' positive-class weights, set by the caller */
};

/* For model m (its map's shape) and batches of up to batch slices. Returns
 * 0, or -1 with a message (no map: the features must end in a global pool). */
int train_loc_init(struct train_loc *l, nn_model *m, int batch, char *err, size_t errlen);
void train_loc_free(struct train_loc *l);
/* The loss over the first n slices of the batch (map, cells, known and
 * pos_w filled), weighted by label_w and, for cells with blood, pos_w, as a
 * mean over n x labels x cells times weight; dmap and the head's gradient
 * get its gradient. */
double train_loc_loss(struct train_loc *l, int n, const float *label_w, float weight);
/* --loc-cell-weights: the cells' own positive-class weights. Over the
 * training split's slices that have a mask, taken as they are (no
 * augmentation) onto the gh x gw grid: negative cells / positive cells per
 * label, clamped to [1, TRAIN_LOC_MAX_POS_W] (1 for a label no cell has).
 * Blood fills a far smaller share of cells than of slices (on the default
 * model's phantoms about 2 % of the cells for "any", against 18 % of the
 * slices), so the slices' weights leave a bleed of one cell almost
 * unweighted. Returns the slices counted. */
#define TRAIN_LOC_MAX_POS_W 100.0f
size_t train_loc_cell_weights(const struct train_dataset *d, int gh, int gw, float *pw);
/* One Adam step of the head (beta 0.9, 0.999) with learning rate lr. */
void train_loc_step(struct train_loc *l, float lr);
/* The head's weights and moments, with the model's optimizer step count so
 * that a resume takes only the head that belongs to its checkpoint
 * (temporary file, fsync, rename). load returns 0, or -1 with a message. */
int train_loc_save(const struct train_loc *l, const char *path, long model_steps);
int train_loc_load(struct train_loc *l, const char *path, long model_steps, char *err,
                   size_t errlen);

#endif

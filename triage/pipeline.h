/* The model as the node runs it: loading a model file with what its
 * metadata says (windows, input size, labels, thresholds), and running one
 * series volume through preprocessing, the CNN per slice and the BiLSTM
 * across slices. Used by `ichtriage serve` (inference thread) and
 * `ichtriage predict`. Decision support, not a diagnosis. */
#ifndef TRIAGE_PIPELINE_H
#define TRIAGE_PIPELINE_H

#include <stdbool.h>
#include <stddef.h>

#include "decode.h"
#include "nn.h"
#include "preprocess.h"
#include "volume.h"

#define TRIAGE_LABELS 6

/* The label order of every result. */
extern const char *const triage_label_names[TRIAGE_LABELS];

struct triage_model {
    nn_model *nn;
    char path[1024];
    char version[160]; /* metadata "version", else the file name */
    struct triage_windows windows;
    int in_c, in_h, in_w;
    bool crop_head;                 /* "crop=head" in its "preprocessing" */
    int context;                    /* "context": neighbouring slices each side as channels */
    int label_index[TRIAGE_LABELS]; /* model output index of each of our labels */
    float thresholds[TRIAGE_LABELS];
};

/* Picks the model file: configured if non-empty, else
 * <store_dir>/models/active.safetensors if it exists, else the shipped
 * default (models/ in the source tree, or the installed data dir). A
 * registry that names an active model (models/active.log) never falls back
 * to the default: without active.safetensors its registered copy
 * (models/ID.safetensors) is taken, and without that none. Writes the path
 * to out; returns 0, or -1 when none exists (out says what was tried). */
int triage_model_resolve(const char *configured, const char *store_dir, char *out, size_t n);
/* The id of the model the registry promoted last: the last line of
 * <store_dir>/models/active.log (train/registry.c writes it), "" when none. */
void triage_model_active_id(const char *store_dir, char *id, size_t n);

/* Loads path. Refuses a file whose metadata lacks the six labels, windows or
 * thresholds (nothing stands in for them), has bad windows, context or
 * thresholds, or whose input channels are not its windows times the
 * 2 x context + 1 slices it sees. Returns 0, or -1
 * with a message; m owns nothing then. */
int triage_model_load(struct triage_model *m, const char *path, char *err, size_t errlen);
void triage_model_free(struct triage_model *m);
/* Moves a model to nn.device (auto, cpu or cuda; NULL or "" is auto) and logs
 * one line saying where it runs (and why the CPU, when auto found no GPU).
 * Returns 0, or -1 with a message (the model then stays on the CPU). */
int triage_nn_device(nn_model *m, const char *device, char *err, size_t errlen);

struct triage_result {
    int n;                      /* slices, in the volume's order */
    float *probs;               /* n * TRIAGE_LABELS, owned */
    float study[TRIAGE_LABELS]; /* per label, the highest over the slices */
    int key_slice;              /* where "any" peaks */
    bool flagged;               /* study "any" at or above the model's threshold */
    double ms_pixels, ms_model; /* time spent decoding + preprocessing, and in the model */
    struct triage_region crop;  /* the part of each slice the model saw (the whole slice
                                   without "crop=head") */
};

/* The one path from a series' files to a model's input, for serving and
 * training alike: decodes every slice of v (paths as given to
 * triage_volume_build) with dec (NULL: inline) and preprocesses it with
 * windows w to out_h x out_w into x (v->n * w->n * out_h * out_w floats, in
 * the volume's order). With crop_head, the series' head crop comes first,
 * from TRIAGE_HEAD_SAMPLES of its slices (decoded once more, in the same
 * stream). used (may be NULL) gets the region of the slices the input was
 * made from. Returns 0, or -1 with a message naming the file. */
int triage_preprocess_volume(const struct triage_volume *v, const char *const *paths,
                             const struct triage_decoder *dec, const struct triage_windows *w,
                             bool crop_head, int out_h, int out_w, float *x,
                             struct triage_region *used, char *err, size_t errlen);

/* Decodes every slice of v (paths as given to triage_volume_build) with
 * dec (NULL: inline), preprocesses it and runs the model. Returns 0, or -1
 * with a message (an undecodable slice names its file, a failed decoder
 * child says how it ended). The caller frees r with triage_result_free(). */
int triage_predict_volume(struct triage_model *m, const struct triage_volume *v,
                          const char *const *paths, const struct triage_decoder *dec,
                          struct triage_result *r, char *err, size_t errlen);
void triage_result_free(struct triage_result *r);

#endif

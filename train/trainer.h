/* The two-stage training of an LRCN on a train_dataset, its evaluation and
 * its report: the engine behind `ichtriage train` and `ichtriage eval`.
 *   stage 1: the CNN per slice on the 6 labels (augmented slices, weighted
 *            BCE with RSNA label weights and a positive-class weight);
 *   stage 2: convolutions frozen, BiLSTM + dense on whole series (slice BCE
 *            where slice labels are known, max-over-slices where only the
 *            study label is).
 * Decision support, not a diagnosis. */
#ifndef TRAIN_TRAINER_H
#define TRAIN_TRAINER_H

#include <stdint.h>
#include <stdio.h>

#include "dataset.h"
#include "metrics.h"
#include "nn.h"

/* Random geometric and intensity changes of one uint8 slice c x h x w into
 * float out (values /255): shift up to shift_frac of the size, rotation up
 * to rot_deg, horizontal flip with p 0.5, per-channel gain 1 +- gain and
 * offset +- offset. Outside the image is 0 (air in every window). */
struct train_augment {
    float shift_frac, rot_deg, gain, offset;
    int flip;
    /* channels k and k + channel_period share their gain and offset (the
     * same window of neighbouring slices, "context"); 0: each its own */
    int channel_period;
    /* the share of slices moved by whole pixels only (no rotation, the shift
     * rounded): their pixels are copied, not resampled, so they keep the
     * sharpness (of one-pixel findings and of the noise) that inference
     * sees; resampling at a fraction of a pixel blurs. 0: none, and no
     * random number drawn for it */
    float sharp;
};
void train_augment_default(struct train_augment *a);
void train_augment_slice(const struct train_augment *a, const uint8_t *in, int c, int h, int w,
                         float *out, uint64_t *rng);
/* The same in two steps, so that a slice's mask can follow its pixels: the
 * random changes drawn (in the order train_augment_slice draws them), then
 * applied. train_augment_none is no change at all. */
struct train_affine {
    float cs, sn, dx, dy; /* rotation, then shift (pixels) */
    int flip;
    float gain[8], off[8];
};
void train_augment_draw(const struct train_augment *a, int c, int h, int w, uint64_t *rng,
                        struct train_affine *t);
void train_augment_none(struct train_affine *t);
void train_augment_apply(const struct train_augment *a, const struct train_affine *t,
                         const uint8_t *in, int c, int h, int w, float *out);
/* The localisation targets of one slice: its mask (train_dataset_mask, in
 * cells of TRAIN_MASK_SCALE pixels of the h x w input) moved as t moves the
 * pixels, then gathered on the gh x gw grid of the CNN's last feature map:
 * cells[gy * gw + gx] gets the bits of every input pixel that grid cell
 * covers. */
void train_augment_cells(const struct train_affine *t, const uint8_t *mask, int h, int w,
                         uint8_t *cells, int gh, int gw);

/* A model's outputs need not be in our label order (train_label_names):
 * its "labels" metadata names them in its own, as a model made in PyTorch
 * may, and triage_model_load maps them by name into a label_index (our
 * label l is output label_index[l]). Every function here that reads a
 * model's outputs, or changes its last layers, takes that label_index; NULL
 * is outputs 0..5 in our order, as the trainer makes its models. */

/* Logits of every slice of the series of split (-1: all): the stage-1 head
 * (CNN alone) and the LRCN, each [nslices of the dataset, TRAIN_LABELS] in
 * our label order, rows of other splits left untouched. Either output may
 * be NULL. Runs in eval mode. Returns 0 or a negative NN_E* code. */
int train_predict(nn_model *m, const struct train_dataset *d, int split, float *cnn_logits,
                  float *lrcn_logits);

/* The same for a model with label_index, from CNN features already
 * computed for those series (features [nslices, feature_size], as
 * train_features writes them; NULL: computed here). A frozen CNN's features
 * do not change, so stage 2 computes them once. */
int train_predict_features(nn_model *m, const struct train_dataset *d, int split,
                           const float *features, const int *label_index, float *cnn_logits,
                           float *lrcn_logits);

/* CNN features of the series of split into feat [nslices, feature_size]. */
int train_features(nn_model *m, const struct train_dataset *d, int split, float *feat);

/* The training slices of negative series (no slice and not the study
 * labelled "any"; slices of positive series are left out, since a slice
 * next to a bleed may show some of it) into out (NULL: only counted).
 * Returns how many. */
int train_negative_slices(const struct train_dataset *d, size_t *out);

/* The training slices of small bleeds: the slices labelled "any" of
 * slice-labelled training series in which 1 to max_slices slices are, into
 * out (NULL: only counted). Returns how many. A bleed visible on a few slices
 * is a few of the epoch's thousands of draws, and the one a model misses. */
int train_small_bleed_slices(const struct train_dataset *d, int max_slices, size_t *out);

/* Stage 2 with labels of whole studies (reviews): a study's label is the
 * highest slice over all its series, as the node flags a study on the
 * highest of its series. Trained per series, a positive study pushed the
 * highest slice of every series up, also of a series (a bone-kernel
 * reconstruction, a scout-like thick one) where the reviewer saw nothing.
 *
 * train_stage2_group reorders an epoch's shuffled series (indices into
 * d->series, n of them) so that the series of a study labelled at study
 * level only follow the first of them in that order (in their own
 * shuffled order); series with slice labels keep their places, so a
 * dataset of them only (RSNA, phantoms) is trained as before. Returns 0,
 * or -1 when out of memory (ser as it was).
 *
 * train_stage2_group_size is how many series from ser[i] on are one such
 * study (1 for a series with slice labels).
 *
 * train_stage2_mil sets, in dl, the multiple-instance gradient of the
 * batch's series labelled at study level only (src: their dataset
 * indices, len and from: their slices' count and first row in lg and dl,
 * b series, tot rows; consecutive series of one study are one bag): per
 * label, a positive study's gradient goes to its highest slice over all
 * its series, a negative study's to the highest slice of each series
 * (every slice of it is negative), an unknown label has none. Rows of
 * series with slice labels are left alone. The loss is the weighted BCE
 * of those slices (train_rsna_weights, pos_w), divided by tot x 6. */
int train_stage2_group(const struct train_dataset *d, int *ser, int n);
int train_stage2_group_size(const struct train_dataset *d, const int *ser, int n, int i);
void train_stage2_mil(const struct train_dataset *d, const int *src, const int *len,
                      const size_t *from, int b, size_t tot, const float *pos_w, const float *lg,
                      float *dl);

/* Weight averaging (--ema): shadow <- d shadow + (1 - d) x over n floats,
 * with d = min(decay, (1 + step) / (10 + step)) so that the first steps'
 * weights, far from trained, fade fast. step: optimizer steps taken, this one
 * included. Returns d. */
double train_ema_update(float *shadow, const float *x, size_t n, double decay, long step);

/* Hard negatives for stage 1: ncand of those slices drawn at random with
 * rng, scored by m as it is (call it in eval mode) without augmentation; the
 * nhard with the highest logit of "any" go into out, highest first, and
 * their logits into out_logit (may be NULL). Returns how many were written
 * (fewer when there are fewer negative slices) or a negative NN_E* code. */
int train_hard_negatives(nn_model *m, const struct train_dataset *d, int ncand, int nhard,
                         uint64_t *rng, size_t *out, float *out_logit);

/* The stage-1 head's logits (the CNN alone, as the model is: call it in eval
 * mode) of the slices idx[0..n) of d, n x TRAIN_LABELS, in batches.
 * Returns 0 or a negative NN_E* code. */
int train_cnn_logits(nn_model *m, const struct train_dataset *d, const size_t *idx, size_t n,
                     float *logits);

/* Divides the last linear layer of the LRCN ("out") or of the stage-1 head
 * by per-label temperatures t (in our label order; the row of each is the
 * model's output label_index[l]; other outputs are left): calibrated logits
 * without a change of format. */
int train_fold_temperature(nn_model *m, int cnn_head, const int *label_index, const float *t);

/* Puts the outputs of a model of TRAIN_LABELS outputs in our label order:
 * the rows of both heads' last layers, so that output l becomes the one
 * label_index[l] was. Its metadata ("labels", "thresholds") is the caller's.
 * Returns 0 or a negative NN_E* code (NN_EINVAL: another number of outputs). */
int train_outputs_reorder(nn_model *m, const int *label_index);

/* ---- evaluation ------------------------------------------------------------ */
enum { TRAIN_LEVEL_SLICE = 0, TRAIN_LEVEL_STUDY = 1 };
enum { TRAIN_MODEL_CNN = 0, TRAIN_MODEL_LRCN = 1 };
#define TRAIN_ROC_POINTS 101

struct train_eval {
    int nseries, nstudies; /* series of one study (same StudyInstanceUID) are one */
    size_t nslices;
    /* [level][model][label]; slice level only over slices with known labels;
     * study level over studies, each the maximum over the slices of all its
     * series (what the node's worklist shows), labelled as any of them is. */
    struct train_binary m[2][2][TRAIN_LABELS];
    double weighted_logloss[2][2];     /* RSNA weights 2,1,1,1,1,1 */
    float thresholds[2][TRAIN_LABELS]; /* [model][label], applied at both levels */
    /* ROC of "any" [level][model]. */
    int roc_n[2][2];
    float roc_fpr[2][2][TRAIN_ROC_POINTS], roc_tpr[2][2][TRAIN_ROC_POINTS];
    /* `eval --compare`: the LRCN's study-level "any" against another model
     * on the same studies (auc_a this model, auc_b the other); valid 0 when
     * there was none. */
    struct train_compare {
        int valid;
        char model[512];
        struct train_auc_diff auc;
        double sensitivity, specificity; /* the other model's, at its own threshold */
    } cmp;
};

/* Evaluates m (outputs as label_index says) on the series of split (-1:
 * all) of d with per-model thresholds [2][TRAIN_LABELS] in our label order.
 * Returns 0 or -1 with a message; an output that is not finite (NaN or
 * infinite: the weights are not) is such an error, not a score. */
int train_evaluate(nn_model *m, const int *label_index, const struct train_dataset *d, int split,
                   const float thresholds[2][TRAIN_LABELS], struct train_eval *out, char *err,
                   size_t errlen);

/* train_evaluate, and the LRCN's study-level probability of "any" and its
 * label per study of the split, in the order train_dataset_studies numbers
 * them, into study_any and study_y (each may be NULL; room for e->nstudies,
 * at most d->nseries). */
int train_evaluate_scores(nn_model *m, const int *label_index, const struct train_dataset *d,
                          int split, const float thresholds[2][TRAIN_LABELS], struct train_eval *e,
                          float *study_any, unsigned char *study_y, char *err, size_t errlen);

int train_evaluate_features(nn_model *m, const int *label_index, const struct train_dataset *d,
                            int split, const float *features,
                            const float thresholds[2][TRAIN_LABELS], struct train_eval *out,
                            char *err, size_t errlen);

/* Stage 1's validation sample: the slices of validation series with slice
 * labels (out holds d->nslices), or want of them drawn with seed (the same
 * for the same seed, in dataset order) when there are more. 0: all.
 * Returns how many. */
size_t train_val_sample(const struct train_dataset *d, size_t want, uint64_t seed, size_t *out);

/* The CNN alone on the slices idx[0..n) (slice level, threshold 0.5): each
 * label's figures and the RSNA weighted log loss, as train_evaluate gives
 * them for the same slices. Returns 0 or a negative NN_E* code with a
 * message in err: NN_EFORMAT when an output is not finite (weights that
 * training made NaN), which train_evaluate refuses alike. */
int train_evaluate_slices(nn_model *m, const struct train_dataset *d, const size_t *idx, size_t n,
                          struct train_binary out[TRAIN_LABELS], double *weighted_logloss,
                          char *err, size_t errlen);

/* Per-epoch history for the report. */
struct train_epoch {
    int stage, epoch;
    double train_loss, val_loss, val_auc, seconds;
};

/* Reliability diagram data: per bin (10 of [0,1]) mean predicted and
 * observed rate of study-level "any" on validation, before and after
 * calibration. */
struct train_reliability {
    int valid;
    double pred[2][10], obs[2][10];
    int count[2][10];
    float temperature[TRAIN_LABELS];
    size_t studies[TRAIN_LABELS], positives[TRAIN_LABELS]; /* per label, what it was fitted on */
};

/* Calibration on the validation studies of d (their CNN features, as
 * train_features writes them, or NULL: computed here): per label and for the CNN
 * head and the LRCN, a temperature fitted to the study-level maxima (over
 * the slices of all series of a study, as train_evaluate's study level; folded
 * into m's last layers, at the outputs label_index names) and the highest
 * threshold whose study-level sensitivity is at least sens, into thr
 * [model][label] in our label order. rel gets the
 * reliability diagram of "any" (LRCN) before and after, and each label's
 * count of studies (its label known) and positive ones. fitted (may be
 * NULL) gets a bit per label whose temperature was fitted, which needs
 * positive and negative studies; the others keep temperature 1. A label
 * without a positive study gets threshold 0.5 (no sensitivity to aim at);
 * one with positives and no negative study gets its threshold from its
 * positives as the others do. t_desc gets the
 * temperatures as text. Returns 0, or -1 with a message in err (an output
 * that is not finite, as for train_evaluate). */
int train_calibrate(nn_model *m, const int *label_index, const struct train_dataset *d,
                    const float *features, double sens, float thr[2][TRAIN_LABELS],
                    struct train_reliability *rel, unsigned *fitted, char *t_desc, size_t tn,
                    char *err, size_t errlen);

/* The self-contained HTML report (inline SVG) and the metrics JSON.
 * history may be NULL (eval); val_auc names what its val_auc is (train's
 * --val-metric: "mean AUC" or "AUC of any"; NULL: "AUC"). Returns 0 or -1
 * with a message. */
int train_report_write(const char *html_path, const char *json_path, const char *title,
                       const char *model_path, const char *data_desc, const struct train_eval *e,
                       const struct train_epoch *history, int nhistory, const char *val_auc,
                       const struct train_reliability *rel, char *err, size_t errlen);
/* v formatted with fmt into out, or "n/a" where it is undefined (NAN), as
 * the tables, reports and metadata print a figure that a class too few
 * leaves undefined. Returns out. */
const char *train_num(char out[32], const char *fmt, double v);
/* One line per model and level, the paper's Table 1, to f. */
void train_eval_print(FILE *f, const struct train_eval *e);
/* A short summary "study_auc_any=.. sens=.. spec=.." for the metadata
 * ("n/a" for a figure that is undefined). */
void train_eval_summary(const struct train_eval *e, char *out, size_t n);

/* Comma-separated floats (the thresholds in a model's metadata): parse n
 * of them (dflt for each missing one, all when s is NULL), or format k. */
void train_floats_parse(const char *s, float *out, int n, float dflt);
void train_floats_format(char *out, size_t n, const float *v, int k);

/* For eval and calibrate: loads model_path (onto device: auto, cpu, cuda)
 * and the labelled folders into d, made for the model's windows and input,
 * with a preprocessed-slice cache (NULL: the default). desc gets the
 * folders, comma-separated. Returns 0, or -1 with a message; tm and d then
 * own nothing. */
struct triage_model;
int train_open_model_data(struct triage_model *tm, struct train_dataset *d, const char *model_path,
                          const char *device, char *const *folders, int nfolders, const char *cache,
                          char *desc, size_t descn, char *err, size_t errlen);
/* 1 when d's slices are what tm takes: its input size, windows, crop and
 * context. */
int train_model_fits(const struct triage_model *tm, const struct train_dataset *d);
/* d as tm's input: d itself, or *view (d's slices, each with tm's context
 * of neighbours; it shares d's memory and is not freed) when only the
 * context differs; NULL when tm takes other slices. */
const struct train_dataset *train_dataset_for_model(const struct triage_model *tm,
                                                    const struct train_dataset *d,
                                                    struct train_dataset *view);
/* tm's thresholds per label, in our label order: [0] the CNN alone's
 * ("cnn_thresholds", 0.5 where absent), [1] the LRCN's. */
void train_model_thresholds(const struct triage_model *tm, float thr[2][TRAIN_LABELS]);
/* The reverse: thr (our label order) into m's "cnn_thresholds" and
 * "thresholds", each in the model's output order (label_index as above);
 * an output that is none of our labels keeps its value. Returns 0 or -1. */
int train_model_thresholds_set(nn_model *m, const int *label_index,
                               const float thr[2][TRAIN_LABELS]);

/* Subcommands. */
int train_train_main(int argc, char **argv);
int train_eval_main(int argc, char **argv);
int train_model_main(int argc, char **argv);
int train_calibrate_main(int argc, char **argv);

#endif

/* Binary-classification metrics for evaluation and early stopping: AUC
 * (ties counted half), confusion counts at a threshold, log loss, the RSNA
 * weighted log loss, temperature scaling and the threshold for a target
 * sensitivity. Plain arrays: p probabilities, y 0/1 labels. */
#ifndef TRAIN_METRICS_H
#define TRAIN_METRICS_H

#include <stddef.h>

/* RSNA 2019 label weights: any 2, each subtype 1. */
extern const float train_rsna_weights[6];

struct train_binary {
    size_t n, pos, tp, fp, tn, fn;
    double auc;                                           /* NAN when one class is absent */
    double accuracy, sensitivity, specificity, precision; /* NAN when undefined */
    double logloss;
};

/* Metrics of probabilities p against labels y at threshold t (p >= t is
 * positive). */
void train_binary_eval(const float *p, const unsigned char *y, size_t n, float t,
                       struct train_binary *out);
double train_auc(const float *p, const unsigned char *y, size_t n);
double train_logloss(const float *p, const unsigned char *y, size_t n);
/* Points of the ROC curve (fpr, tpr), at most max points (thinned evenly),
 * from (0,0) to (1,1). Returns the count written. */
int train_roc(const float *p, const unsigned char *y, size_t n, float *fpr, float *tpr, int max);
/* The largest threshold whose sensitivity is at least target (0.5 when y has
 * no positives). */
float train_threshold_for_sensitivity(const float *p, const unsigned char *y, size_t n,
                                      double target);
/* Temperature T > 0 minimising the log loss of sigmoid(logit / T). */
float train_fit_temperature(const float *logit, const unsigned char *y, size_t n);

#endif

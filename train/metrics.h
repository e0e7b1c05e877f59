/* Binary-classification metrics for evaluation and early stopping: AUC
 * (ties counted half), confusion counts at a threshold, log loss, the RSNA
 * weighted log loss, temperature scaling and the threshold for a target
 * sensitivity. Plain arrays: p probabilities, y 0/1 labels. */
#ifndef TRAIN_METRICS_H
#define TRAIN_METRICS_H

#include <stdbool.h>
#include <stddef.h>

/* RSNA 2019 label weights: any 2, each subtype 1. */
extern const float train_rsna_weights[6];

struct train_binary {
    size_t n, pos, tp, fp, tn, fn;
    double auc;                                           /* NAN when one class is absent */
    double accuracy, sensitivity, specificity, precision; /* NAN when undefined */
    double logloss;
    /* 95% confidence intervals, from train_binary_ci; NAN until then and
     * where undefined */
    double auc_lo, auc_hi, sens_lo, sens_hi, spec_lo, spec_hi;
    int auc_ci_bound; /* 1: DeLong's variance was 0, the AUC's interval is the bound below */
};

/* Metrics of probabilities p against labels y at threshold t (p >= t is
 * positive). */
void train_binary_eval(const float *p, const unsigned char *y, size_t n, float t,
                       struct train_binary *out);
/* 95% confidence intervals of the metrics b holds for the same p and y: the
 * AUC's by DeLong's variance (normal, clipped to [0, 1]), sensitivity's and
 * specificity's by Wilson's score interval. Where DeLong's variance is 0
 * (AUC 1 or 0, or every score tied), which would give an interval of no
 * width, the AUC's is Wilson's interval of it as a proportion of min(P, N)
 * (the largest variance an AUC of P positives and N negatives can have is
 * A (1 - A) / min(P, N)), and auc_ci_bound says so. NAN with fewer than 2 of
 * either class. They assume independent samples: studies, not the slices of
 * a series (those would come out too narrow). */
void train_binary_ci(const float *p, const unsigned char *y, size_t n, struct train_binary *b);
/* DeLong's variance of the AUC (ties counted half); NAN with fewer than 2
 * of either class. */
double train_auc_variance(const float *p, const unsigned char *y, size_t n);
/* Two models' AUCs on the same samples, compared by DeLong's paired test:
 * auc_a - auc_b with its 95% interval and the two-sided p-value of "no
 * difference" (normal); the interval clipped to [-1, 1]. lo, hi, p NAN with
 * fewer than 2 of either class, and where the variance of the difference is
 * 0 while the AUCs differ (one model perfect, the other's scores all tied):
 * undefined, not p = 0. Two models that rank the samples alike (the same
 * model) have p = 1 and the interval [0, 0]. */
struct train_auc_diff {
    double auc_a, auc_b, diff, lo, hi, p;
};
void train_auc_paired(const float *pa, const float *pb, const unsigned char *y, size_t n,
                      struct train_auc_diff *out);
/* Automatic promotion's rule: the new model's study-level AUC and
 * sensitivity both at least the active one's, on the same test studies. False
 * when either figure is undefined on either side (the test split lacks
 * positive or negative studies): then nothing is compared, and a person
 * decides. */
bool train_at_least_as_good(const struct train_binary *fresh, const struct train_binary *active);
/* Wilson's 95% score interval of the proportion k of n (NAN for n = 0). */
void train_wilson(size_t k, size_t n, double *lo, double *hi);
double train_auc(const float *p, const unsigned char *y, size_t n);
double train_logloss(const float *p, const unsigned char *y, size_t n);
/* Points of the ROC curve (fpr, tpr), at most max points (thinned evenly),
 * from (0,0) to (1,1). Returns the count written, 0 when a score is NaN
 * (as train_auc is NAN then). */
int train_roc(const float *p, const unsigned char *y, size_t n, float *fpr, float *tpr, int max);
/* The largest threshold whose sensitivity is at least target (0.5 when y has
 * no positives). target is a double all the way from the command line: as a
 * float, 0.85 is 0.8500000238 and asks for one positive more. */
float train_threshold_for_sensitivity(const float *p, const unsigned char *y, size_t n,
                                      double target);
/* Temperature T minimising the log loss of sigmoid(logit / T), searched in
 * [0.05, 20]: at an end of that range when the best lies beyond. */
float train_fit_temperature(const float *logit, const unsigned char *y, size_t n);

#endif

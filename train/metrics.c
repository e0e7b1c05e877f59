/* train/metrics.c: AUC, confusion counts, log loss, ROC, calibration,
 * confidence intervals. */
#include "metrics.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

const float train_rsna_weights[6] = {2, 1, 1, 1, 1, 1};

struct pv {
    float p;
    unsigned char y;
    size_t i; /* index in the caller's arrays */
};

static int cmp_desc(const void *a, const void *b)
{
    float x = ((const struct pv *)a)->p, y = ((const struct pv *)b)->p;
    return x < y ? 1 : x > y ? -1 : 0;
}

static struct pv *sorted(const float *p, const unsigned char *y, size_t n)
{
    struct pv *v = malloc((n ? n : 1) * sizeof *v);
    if (!v) return NULL;
    for (size_t i = 0; i < n; i++)
        v[i].p = p[i], v[i].y = y[i] ? 1 : 0, v[i].i = i;
    qsort(v, n, sizeof *v, cmp_desc);
    return v;
}

static bool any_nan(const float *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (isnan(p[i])) return true;
    return false;
}

/* The end of the tie group that starts at a: at least a + 1, also where
 * v[a].p is NaN, which equals nothing (the walks below had stood still). */
static size_t tie_end(const struct pv *v, size_t n, size_t a)
{
    size_t b = a + 1;
    while (b < n && v[b].p == v[a].p)
        b++;
    return b;
}

/* The AUC (ties counted half), with var DeLong's variance of it, and with
 * comp each sample's structural component (at its own index): one walk over
 * the tie groups from the highest p down. NAN when a score is NaN: no
 * ranking, no AUC. */
static double auc_walk(const float *p, const unsigned char *y, size_t n, double *var, double *comp)
{
    if (var) *var = NAN;
    if (any_nan(p, n)) return NAN;
    struct pv *v = sorted(p, y, n);
    if (!v) return NAN;
    double P = 0, N = 0;
    for (size_t i = 0; i < n; i++)
        v[i].y ? P++ : N++;
    /* DeLong's structural components: a positive's V10 is the share of
     * negatives it beats, a negative's V01 the share of positives that beat
     * it (ties half). Their means are the AUC; var = var(V10) / P +
     * var(V01) / N. */
    double pos = 0, neg = 0, area = 0, s10 = 0, q10 = 0, q01 = 0;
    for (size_t a = 0, b; a < n; a = b) {
        double tp = 0, fp = 0;
        b = tie_end(v, n, a);
        for (size_t k = a; k < b; k++)
            v[k].y ? tp++ : fp++;
        /* Negatives in this tie group are beaten by every positive already
         * seen and by half of the positives tied with them. */
        area += fp * (pos + tp / 2);
        if (N > 0 && P > 0) {
            double v10 = (N - neg - fp / 2) / N; /* the negatives below, half the tied */
            double v01 = (pos + tp / 2) / P;
            s10 += tp * v10, q10 += tp * v10 * v10, q01 += fp * v01 * v01;
            for (size_t k = a; comp && k < b; k++)
                comp[v[k].i] = v[k].y ? v10 : v01;
        }
        pos += tp, neg += fp;
    }
    free(v);
    if (pos == 0 || neg == 0) return NAN;
    if (var && P >= 2 && N >= 2) {
        double s01 = area / P; /* the sum of the V01 */
        double var10 = (q10 - s10 * s10 / P) / (P - 1), var01 = (q01 - s01 * s01 / N) / (N - 1);
        *var = fmax(var10, 0) / P + fmax(var01, 0) / N;
    }
    return area / (pos * neg);
}

double train_auc(const float *p, const unsigned char *y, size_t n)
{
    return auc_walk(p, y, n, NULL, NULL);
}

double train_logloss(const float *p, const unsigned char *y, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++) {
        double q = fmin(fmax(p[i], 1e-7), 1 - 1e-7);
        s -= y[i] ? log(q) : log(1 - q);
    }
    return n ? s / (double)n : NAN;
}

void train_binary_eval(const float *p, const unsigned char *y, size_t n, float t,
                       struct train_binary *o)
{
    memset(o, 0, sizeof *o);
    o->n = n;
    for (size_t i = 0; i < n; i++) {
        int pred = p[i] >= t, pos = y[i] != 0;
        o->pos += (size_t)pos;
        if (pred && pos)
            o->tp++;
        else if (pred)
            o->fp++;
        else if (pos)
            o->fn++;
        else
            o->tn++;
    }
    o->accuracy = n ? (double)(o->tp + o->tn) / (double)n : NAN;
    o->sensitivity = o->tp + o->fn ? (double)o->tp / (double)(o->tp + o->fn) : NAN;
    o->specificity = o->tn + o->fp ? (double)o->tn / (double)(o->tn + o->fp) : NAN;
    o->precision = o->tp + o->fp ? (double)o->tp / (double)(o->tp + o->fp) : NAN;
    o->auc = train_auc(p, y, n);
    o->logloss = train_logloss(p, y, n);
    o->auc_lo = o->auc_hi = o->sens_lo = o->sens_hi = o->spec_lo = o->spec_hi = NAN;
}

#define Z95 1.959963984540054

double train_auc_variance(const float *p, const unsigned char *y, size_t n)
{
    double var;
    auc_walk(p, y, n, &var, NULL);
    return var;
}

/* Wilson's score interval of a proportion q of n: the p with
 * (q - p)^2 <= z^2 p (1 - p) / n. */
static void wilson(double q, double n, double *lo, double *hi)
{
    double z2 = Z95 * Z95, d = 1 + z2 / n;
    double c = (q + z2 / (2.0 * n)) / d;
    double h = Z95 * sqrt(q * (1 - q) / n + z2 / (4.0 * n * n)) / d;
    *lo = fmax(c - h, 0), *hi = fmin(c + h, 1);
}

void train_wilson(size_t k, size_t n, double *lo, double *hi)
{
    if (n == 0)
        *lo = *hi = NAN;
    else
        wilson((double)k / (double)n, (double)n, lo, hi);
}

void train_binary_ci(const float *p, const unsigned char *y, size_t n, struct train_binary *b)
{
    double var = train_auc_variance(p, y, n),
           m = (double)(b->pos < b->n - b->pos ? b->pos : b->n - b->pos);
    b->auc_ci_bound = var == 0;
    if (var > 0) {
        b->auc_lo = fmax(b->auc - Z95 * sqrt(var), 0);
        b->auc_hi = fmin(b->auc + Z95 * sqrt(var), 1);
    } else if (var == 0) {
        /* Every positive above every negative (or below, or every score
         * tied): DeLong's variance is 0 and its interval would have no
         * width whatever the sample size. The AUC's variance is at most
         * A (1 - A) / min(P, N) (Birnbaum and Klose 1957); the AUCs that
         * put the observed one within 1.96 such standard errors are
         * Wilson's interval of it as a proportion of min(P, N). */
        wilson(b->auc, m, &b->auc_lo, &b->auc_hi);
    } else {
        b->auc_lo = b->auc_hi = NAN;
    }
    train_wilson(b->tp, b->tp + b->fn, &b->sens_lo, &b->sens_hi);
    train_wilson(b->tn, b->tn + b->fp, &b->spec_lo, &b->spec_hi);
}

bool train_at_least_as_good(const struct train_binary *fresh, const struct train_binary *active)
{
    return isfinite(fresh->auc) && isfinite(active->auc) && isfinite(fresh->sensitivity) &&
           isfinite(active->sensitivity) && fresh->auc >= active->auc &&
           fresh->sensitivity >= active->sensitivity;
}

void train_auc_paired(const float *pa, const float *pb, const unsigned char *y, size_t n,
                      struct train_auc_diff *o)
{
    o->auc_a = o->auc_b = o->diff = o->lo = o->hi = o->p = NAN;
    double *ca = malloc((n ? n : 1) * sizeof *ca), *cb = malloc((n ? n : 1) * sizeof *cb);
    if (!ca || !cb) goto out;
    o->auc_a = auc_walk(pa, y, n, NULL, ca);
    o->auc_b = auc_walk(pb, y, n, NULL, cb);
    o->diff = o->auc_a - o->auc_b;
    double P = 0, N = 0;
    for (size_t i = 0; i < n; i++)
        y[i] ? P++ : N++;
    if (isnan(o->diff) || P < 2 || N < 2) goto out;
    /* var(A - B) = (S10aa + S10bb - 2 S10ab) / P + (S01aa + S01bb - 2 S01ab) / N,
     * the S the sample (co)variances of the components within each class:
     * the variance of the per-sample difference of components. The mean of
     * each class's components is the AUC. */
    double q[2] = {0, 0};
    for (size_t i = 0; i < n; i++) {
        double d = (ca[i] - o->auc_a) - (cb[i] - o->auc_b);
        q[y[i] ? 1 : 0] += d * d;
    }
    double se = sqrt(q[1] / (P - 1) / P + q[0] / (N - 1) / N);
    if (se > 0) {
        o->lo = fmax(o->diff - Z95 * se, -1), o->hi = fmin(o->diff + Z95 * se, 1);
        o->p = erfc(fabs(o->diff) / se / sqrt(2.0));
    } else if (o->diff == 0) {
        /* every sample's components the same for both: the two rank these
         * studies alike (the same model, or both perfect), no difference */
        o->lo = o->hi = 0, o->p = 1;
    }
    /* else the AUCs differ by the same amount in every sample's components
     * (one model perfect, the other's scores all tied): the variance is 0
     * and the test undefined, not p = 0; lo, hi and p stay NAN */
out:
    free(ca), free(cb);
}

int train_roc(const float *p, const unsigned char *y, size_t n, float *fpr, float *tpr, int max)
{
    struct pv *v = any_nan(p, n) ? NULL : sorted(p, y, n);
    if (!v || max < 2) {
        free(v);
        return 0;
    }
    size_t pos = 0;
    for (size_t i = 0; i < n; i++)
        pos += v[i].y;
    size_t neg = n - pos;
    /* Every threshold, then thinned to max points. */
    size_t cap = n + 2;
    float *fx = malloc(cap * sizeof *fx), *ty = malloc(cap * sizeof *ty);
    int k = 0;
    if (!fx || !ty) {
        free(v), free(fx), free(ty);
        return 0;
    }
    double tp = 0, fp = 0;
    fx[k] = 0, ty[k] = 0, k++;
    for (size_t a = 0, b; a < n; a = b) { /* a point per tie group: at most n + 1 in all */
        b = tie_end(v, n, a);
        for (size_t i = a; i < b; i++)
            v[i].y ? tp++ : fp++;
        fx[k] = neg ? (float)(fp / neg) : 0;
        ty[k] = pos ? (float)(tp / pos) : 0;
        k++;
    }
    int out = 0;
    if (k <= max) {
        memcpy(fpr, fx, (size_t)k * sizeof *fx);
        memcpy(tpr, ty, (size_t)k * sizeof *ty);
        out = k;
    } else {
        for (int i = 0; i < max; i++) {
            int j = (int)((double)i * (k - 1) / (max - 1));
            fpr[i] = fx[j], tpr[i] = ty[j];
        }
        out = max;
    }
    free(v), free(fx), free(ty);
    return out;
}

float train_threshold_for_sensitivity(const float *p, const unsigned char *y, size_t n,
                                      double target)
{
    size_t pos = 0;
    for (size_t i = 0; i < n; i++)
        pos += y[i] != 0;
    if (pos == 0) return 0.5f;
    float *pp = malloc(pos * sizeof *pp);
    if (!pp) return 0.5f;
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (y[i]) pp[k++] = p[i];
    /* Sort positives descending; the threshold is the ceil(target*pos)-th. */
    for (size_t i = 1; i < pos; i++) {
        float x = pp[i];
        size_t j = i;
        while (j > 0 && pp[j - 1] < x)
            pp[j] = pp[j - 1], j--;
        pp[j] = x;
    }
    /* ceil(target * pos) positives, less a relative hair: a decimal target
     * is a binary fraction a little above or below it (0.07 x 100 is
     * 7.000000000000001), and must not ask for one positive more. The
     * hair is far above double's rounding and below the step of any target
     * of up to six decimals for a million positives. */
    double want = target * (double)pos;
    size_t need = (size_t)ceil(want - 1e-9 * want);
    if (need < 1) need = 1;
    if (need > pos) need = pos;
    float t = pp[need - 1];
    free(pp);
    return t;
}

static double nll_at(const float *z, const unsigned char *y, size_t n, double T)
{
    double s = 0;
    for (size_t i = 0; i < n; i++) {
        double x = z[i] / T;
        /* -log sigmoid(x) = softplus(-x); -log(1 - sigmoid(x)) = softplus(x) */
        double a = y[i] ? -x : x;
        s += a > 0 ? a + log1p(exp(-a)) : log1p(exp(a));
    }
    return s;
}

float train_fit_temperature(const float *logit, const unsigned char *y, size_t n)
{
    /* Golden-section search on log T in [log 0.05, log 20]. */
    double a = log(0.05), b = log(20.0), g = (sqrt(5.0) - 1) / 2;
    double c = b - g * (b - a), d = a + g * (b - a);
    double fc = nll_at(logit, y, n, exp(c)), fd = nll_at(logit, y, n, exp(d));
    for (int it = 0; it < 60; it++) {
        if (fc < fd) {
            b = d, d = c, fd = fc;
            c = b - g * (b - a);
            fc = nll_at(logit, y, n, exp(c));
        } else {
            a = c, c = d, fc = fd;
            d = a + g * (b - a);
            fd = nll_at(logit, y, n, exp(d));
        }
    }
    return (float)exp((a + b) / 2);
}

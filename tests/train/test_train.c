/* tests/train/test_train.c: the pieces of `ichtriage train` that can be
 * checked without training: metrics against hand-computed values,
 * calibration, augmentation, the split by patient, the stage-1 head
 * computed from features against nn's own prediction, the choice of hard
 * negatives. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "metrics.h"
#include "nn.h"
#include "number.h"
#include "trainer.h"

Test(metrics, auc_by_hand)
{
    /* 2 positives, 3 negatives: pairs (pos > neg) = 5 of 6. */
    float p[] = {0.9f, 0.4f, 0.5f, 0.3f, 0.1f};
    unsigned char y[] = {1, 1, 0, 0, 0};
    cr_assert_float_eq(train_auc(p, y, 5), 5.0 / 6.0, 1e-9);
    /* ties count half: everything equal gives 0.5 */
    float q[] = {0.5f, 0.5f, 0.5f, 0.5f};
    unsigned char z[] = {1, 0, 1, 0};
    cr_assert_float_eq(train_auc(q, z, 4), 0.5, 1e-9);
    /* one class only: undefined */
    unsigned char o[] = {1, 1, 1, 1};
    cr_assert(isnan(train_auc(q, o, 4)));
}

/* Automatic promotion compares only figures that exist: a test split with
 * one class gives NAN, which `!(a < b)` had taken for "at least as good". */
Test(metrics, promotion_needs_figures_on_both_sides)
{
    struct train_binary fresh = {.auc = 0.9, .sensitivity = 0.95};
    struct train_binary active = {.auc = 0.9, .sensitivity = 0.95};
    cr_expect(train_at_least_as_good(&fresh, &active), "equal is at least as good");
    active.auc = 0.91;
    cr_expect(!train_at_least_as_good(&fresh, &active), "lower AUC");
    active.auc = 0.8, active.sensitivity = 0.96;
    cr_expect(!train_at_least_as_good(&fresh, &active), "lower sensitivity");
    active.sensitivity = 0.9;
    cr_expect(train_at_least_as_good(&fresh, &active), "better on both");
    fresh.auc = NAN;
    cr_expect(!train_at_least_as_good(&fresh, &active), "no AUC for the new model");
    fresh.auc = 0.9, active.auc = NAN;
    cr_expect(!train_at_least_as_good(&fresh, &active), "no AUC for the active one");
    active.auc = 0.8, fresh.sensitivity = NAN;
    cr_expect(!train_at_least_as_good(&fresh, &active), "no sensitivity");
}

Test(metrics, confusion_at_threshold)
{
    float p[] = {0.9f, 0.4f, 0.5f, 0.3f, 0.1f};
    unsigned char y[] = {1, 1, 0, 0, 0};
    struct train_binary b;
    train_binary_eval(p, y, 5, 0.45f, &b);
    cr_assert_eq(b.tp, 1);
    cr_assert_eq(b.fn, 1);
    cr_assert_eq(b.fp, 1);
    cr_assert_eq(b.tn, 2);
    cr_assert_float_eq(b.sensitivity, 0.5, 1e-9);
    cr_assert_float_eq(b.specificity, 2.0 / 3.0, 1e-9);
    cr_assert_float_eq(b.precision, 0.5, 1e-9);
    cr_assert_float_eq(b.accuracy, 0.6, 1e-9);
    double ll = -(log(0.9) + log(0.4) + log(0.5) + log(0.7) + log(0.9)) / 5;
    cr_assert_float_eq(b.logloss, ll, 1e-6);
}

/* DeLong's structural components by their definition, pair by pair, without
 * sorting: a positive's share of negatives it beats, a negative's share of
 * positives that beat it (ties half). Returns the AUC. */
static double components_by_pairs(const float *p, const unsigned char *y, int n, double *v)
{
    double P = 0, N = 0, auc = 0;
    for (int i = 0; i < n; i++)
        y[i] ? P++ : N++;
    for (int i = 0; i < n; i++) {
        double s = 0;
        for (int j = 0; j < n; j++) {
            if (y[i] == y[j]) continue;
            float a = y[i] ? p[i] : p[j], b = y[i] ? p[j] : p[i]; /* positive, negative */
            s += a > b ? 1 : a == b ? 0.5 : 0;
        }
        v[i] = s / (y[i] ? N : P);
        if (y[i]) auc += s / (N * P);
    }
    return auc;
}

/* DeLong's variance by its definition: the components' variance per class. */
static double delong_by_pairs(const float *p, const unsigned char *y, int n)
{
    double P = 0, N = 0, v[64];
    for (int i = 0; i < n; i++)
        y[i] ? P++ : N++;
    double auc = components_by_pairs(p, y, n, v), s10 = 0, s01 = 0;
    for (int i = 0; i < n; i++)
        if (y[i])
            s10 += (v[i] - auc) * (v[i] - auc);
        else
            s01 += (v[i] - auc) * (v[i] - auc);
    return s10 / (P - 1) / P + s01 / (N - 1) / N;
}

Test(metrics, auc_variance_is_delongs)
{
    /* ties within and across the classes */
    float p[] = {0.9f, 0.8f, 0.8f, 0.7f, 0.6f, 0.6f, 0.6f, 0.5f, 0.4f, 0.3f, 0.3f, 0.2f, 0.1f};
    unsigned char y[] = {1, 1, 0, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0};
    int n = (int)(sizeof p / sizeof p[0]);
    double want = delong_by_pairs(p, y, n);
    cr_assert_gt(want, 0);
    cr_assert_float_eq(train_auc_variance(p, y, (size_t)n), want, 1e-12);
    /* random scores, 60 studies */
    float q[60];
    unsigned char z[60];
    uint64_t rng = 7;
    for (int i = 0; i < 60; i++) {
        rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
        z[i] = (rng >> 40) % 3 == 0;
        q[i] = (float)((rng >> 20) % 1000) / 1000.0f + (z[i] ? 0.3f : 0.0f);
    }
    cr_assert_float_eq(train_auc_variance(q, z, 60), delong_by_pairs(q, z, 60), 1e-12);
    /* fewer than two of a class: undefined */
    unsigned char one[] = {1, 0, 0, 0};
    cr_assert(isnan(train_auc_variance(p, one, 4)));
}

/* The paired test by its textbook form: the 2x2 covariance matrices of the
 * two models' components, per class, and the contrast (1, -1). */
static double paired_var_by_pairs(const float *pa, const float *pb, const unsigned char *y, int n)
{
    double va[64], vb[64], P = 0, N = 0;
    double A = components_by_pairs(pa, y, n, va), B = components_by_pairs(pb, y, n, vb);
    double S[2][3] = {{0}}; /* [class][aa, bb, ab] */
    for (int i = 0; i < n; i++) {
        int c = y[i] ? 1 : 0;
        y[i] ? P++ : N++;
        S[c][0] += (va[i] - A) * (va[i] - A);
        S[c][1] += (vb[i] - B) * (vb[i] - B);
        S[c][2] += (va[i] - A) * (vb[i] - B);
    }
    return (S[1][0] + S[1][1] - 2 * S[1][2]) / (P - 1) / P +
           (S[0][0] + S[0][1] - 2 * S[0][2]) / (N - 1) / N;
}

Test(metrics, paired_auc_comparison_is_delongs)
{
    float a[60], b[60];
    unsigned char y[60];
    uint64_t rng = 11;
    for (int i = 0; i < 60; i++) {
        rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
        y[i] = (rng >> 40) % 3 == 0;
        float noise = (float)((rng >> 20) % 1000) / 1000.0f;
        a[i] = noise + (y[i] ? 0.4f : 0.0f);
        /* b: correlated with a, a weaker signal, coarse (ties) */
        b[i] = roundf((0.7f * noise + 0.3f * (float)((rng >> 8) % 100) / 100.0f +
                       (y[i] ? 0.2f : 0.0f)) *
                      10.0f) /
               10.0f;
    }
    struct train_auc_diff d;
    train_auc_paired(a, b, y, 60, &d);
    cr_assert_float_eq(d.auc_a, train_auc(a, y, 60), 1e-12);
    cr_assert_float_eq(d.auc_b, train_auc(b, y, 60), 1e-12);
    cr_assert_float_eq(d.diff, d.auc_a - d.auc_b, 1e-12);
    double se = sqrt(paired_var_by_pairs(a, b, y, 60));
    cr_assert_gt(se, 0);
    cr_assert_float_eq(d.lo, d.diff - 1.959963984540054 * se, 1e-9);
    cr_assert_float_eq(d.hi, d.diff + 1.959963984540054 * se, 1e-9);
    cr_assert_float_eq(d.p, erfc(fabs(d.diff) / se / sqrt(2.0)), 1e-9);
    /* Pairing matters: the same two AUCs as if independent would have the
     * sum of the variances, which is larger for correlated scores. */
    cr_assert_lt(se * se, train_auc_variance(a, y, 60) + train_auc_variance(b, y, 60));
    /* A model against itself: no difference, p = 1. */
    train_auc_paired(a, a, y, 60, &d);
    cr_assert_float_eq(d.diff, 0.0, 1e-15);
    cr_assert_float_eq(d.p, 1.0, 1e-15);
    /* One model perfect, the other's scores all tied: the variance of the
     * difference is 0 and the test undefined (it had said p = 0). */
    float perfect[60], tied[60];
    for (int i = 0; i < 60; i++)
        perfect[i] = y[i] ? 0.9f : 0.1f, tied[i] = 0.5f;
    train_auc_paired(perfect, tied, y, 60, &d);
    cr_assert_float_eq(d.diff, 0.5, 1e-12);
    cr_assert(isnan(d.p) && isnan(d.lo) && isnan(d.hi), "p %f [%f, %f]", d.p, d.lo, d.hi);
    /* Fewer than two of a class: no interval. */
    unsigned char one[] = {1, 0, 0, 0};
    train_auc_paired(a, b, one, 4, &d);
    cr_assert(isnan(d.p) && isnan(d.lo) && !isnan(d.diff));
}

Test(metrics, confidence_intervals)
{
    double lo, hi;
    train_wilson(0, 10, &lo, &hi); /* Wilson's known values */
    cr_assert_float_eq(lo, 0.0, 1e-9);
    cr_assert_float_eq(hi, 0.27753, 1e-5);
    train_wilson(10, 10, &lo, &hi);
    cr_assert_float_eq(lo, 0.72247, 1e-5);
    cr_assert_float_eq(hi, 1.0, 1e-9);
    train_wilson(5, 10, &lo, &hi);
    cr_assert_float_eq(lo, 0.23659, 1e-5);
    cr_assert_float_eq(hi, 0.76341, 1e-5);
    train_wilson(0, 0, &lo, &hi);
    cr_assert(isnan(lo) && isnan(hi));

    /* 7 positives, 5 of them at or above 0.55; 5 negatives, 4 below: each
     * interval of its own counts (equal counts could not tell them apart) */
    float p[] = {0.9f, 0.8f, 0.7f, 0.65f, 0.6f, 0.58f, 0.5f, 0.4f, 0.35f, 0.3f, 0.2f, 0.1f};
    unsigned char y[] = {1, 1, 0, 1, 1, 1, 0, 1, 0, 0, 1, 0};
    struct train_binary b;
    train_binary_eval(p, y, 12, 0.55f, &b);
    cr_assert(isnan(b.auc_lo) && isnan(b.sens_lo), "only train_binary_ci sets them");
    train_binary_ci(p, y, 12, &b);
    double se = sqrt(train_auc_variance(p, y, 12));
    cr_assert_gt(se, 0);
    cr_assert(!b.auc_ci_bound);
    cr_assert_float_eq(b.auc_lo, b.auc - 1.959964 * se, 1e-5);
    cr_assert_float_eq(b.auc_hi, fmin(b.auc + 1.959964 * se, 1.0), 1e-5);
    cr_assert_eq(b.tp + b.fn, 7);
    train_wilson(5, 7, &lo, &hi); /* 5 of the 7 positives at or above 0.55 */
    cr_assert_float_eq(b.sens_lo, lo, 1e-12);
    cr_assert_float_eq(b.sens_hi, hi, 1e-12);
    cr_assert_float_eq(lo, 0.35893, 1e-5); /* Wilson's 5 of 7 */
    cr_assert_float_eq(hi, 0.91778, 1e-5);
    train_wilson(4, 5, &lo, &hi); /* 4 of the 5 negatives below */
    cr_assert_float_eq(b.spec_lo, lo, 1e-12);
    cr_assert_float_eq(b.spec_hi, hi, 1e-12);
}

/* An AUC of 1 or 0, or scores all tied: DeLong's variance is 0, and its
 * interval had no width ("auc 1.000 [1.000, 1.000]") however few the
 * studies. The interval is Wilson's of the AUC as a proportion of the
 * smaller class; it narrows as that grows. */
Test(metrics, auc_interval_when_delongs_variance_is_0)
{
    float p[] = {0.9f, 0.8f, 0.7f, 0.6f, 0.5f, 0.4f, 0.3f, 0.2f, 0.1f};
    unsigned char y[] = {1, 1, 1, 1, 0, 0, 0, 0, 0}, r[9];
    struct train_binary b;
    double lo, hi;
    train_binary_eval(p, y, 9, 0.5f, &b);
    train_binary_ci(p, y, 9, &b);
    cr_assert_float_eq(b.auc, 1.0, 1e-12);
    cr_assert_eq(train_auc_variance(p, y, 9), 0.0);
    train_wilson(4, 4, &lo, &hi); /* 4 positives, the smaller class */
    cr_assert(b.auc_ci_bound);
    cr_assert_float_eq(b.auc_lo, lo, 1e-12, "AUC 1 of 4 and 5: from %f, not 1", b.auc_lo);
    cr_assert_lt(b.auc_lo, 0.6);
    cr_assert_float_eq(b.auc_hi, 1.0, 1e-12);
    for (int i = 0; i < 9; i++) /* every negative above: AUC 0 */
        r[i] = !y[i];
    train_binary_eval(p, r, 9, 0.5f, &b);
    train_binary_ci(p, r, 9, &b);
    cr_assert_float_eq(b.auc, 0.0, 1e-12);
    train_wilson(0, 4, &lo, &hi);
    cr_assert_float_eq(b.auc_lo, 0.0, 1e-12);
    cr_assert_float_eq(b.auc_hi, hi, 1e-12);
    float q[9] = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f}; /* all tied */
    train_binary_eval(q, y, 9, 0.5f, &b);
    train_binary_ci(q, y, 9, &b);
    train_wilson(2, 4, &lo, &hi);
    cr_assert(b.auc_ci_bound && b.auc_lo < 0.5 && b.auc_hi > 0.5);
    cr_assert_float_eq(b.auc_lo, lo, 1e-12);
    cr_assert_float_eq(b.auc_hi, hi, 1e-12);
    /* more studies, a narrower interval */
    float p40[80];
    unsigned char y40[80];
    for (int i = 0; i < 80; i++)
        p40[i] = (float)(80 - i), y40[i] = i < 40;
    struct train_binary b40;
    train_binary_eval(p40, y40, 80, 0.5f, &b40);
    train_binary_ci(p40, y40, 80, &b40);
    train_binary_eval(p, y, 9, 0.5f, &b);
    train_binary_ci(p, y, 9, &b);
    cr_assert(b40.auc_lo > b.auc_lo && b40.auc_lo < 1.0, "%f against %f", b40.auc_lo, b.auc_lo);
    /* and one positive: no interval at all */
    unsigned char one[9] = {1, 0, 0, 0, 0, 0, 0, 0, 0};
    train_binary_eval(p, one, 9, 0.5f, &b);
    train_binary_ci(p, one, 9, &b);
    cr_assert(isnan(b.auc_lo) && isnan(b.auc_hi) && !b.auc_ci_bound);
}

Test(metrics, threshold_reaches_the_sensitivity)
{
    float p[20];
    unsigned char y[20];
    for (int i = 0; i < 20; i++)
        p[i] = (float)i / 20, y[i] = i % 2;
    float t = train_threshold_for_sensitivity(p, y, 20, 0.95);
    struct train_binary b;
    train_binary_eval(p, y, 20, t, &b);
    cr_assert_geq(b.sensitivity, 0.95);
    /* and it is the highest such threshold: a hair above loses a positive */
    train_binary_eval(p, y, 20, nextafterf(t, 1.0f), &b);
    cr_assert_lt(b.sensitivity, 0.95);
}

/* --sensitivity as the commands read it (util_number_double, a double to
 * the threshold): the threshold keeps exactly ceil(target x positives) of
 * them, counted here in integers, however the decimal target rounds in
 * binary (0.07 x 100 is 7.000000000000001). calibrate's test below passes
 * the target through train_calibrate, where it had become a float. */
Test(metrics, threshold_for_every_target_and_positive_count)
{
    static const struct {
        const char *arg;
        int hundredths;
    } target[] = {{"0.8", 80},  {"0.85", 85}, {"0.9", 90}, {"0.95", 95}, {"0.97", 97},
                  {"0.98", 98}, {"0.99", 99}, {"0.07", 7}, {"0.57", 57}, {"1", 100}};
    static const int count[] = {5, 7, 10, 20, 33, 50, 100, 200, 1000};
    enum { MAXN = 2 * 1000 };
    float *p = malloc(MAXN * sizeof *p);
    unsigned char *y = malloc(MAXN);
    for (size_t a = 0; a < sizeof target / sizeof target[0]; a++) {
        double sens;
        cr_assert_eq(util_number_double(target[a].arg, &sens), 0);
        for (size_t c = 0; c < sizeof count / sizeof count[0]; c++) {
            int P = count[c], n = 2 * P;
            /* positives and negatives interleaved, every score its own */
            for (int i = 0; i < n; i++)
                p[i] = (float)(i + 1) / (float)(n + 1), y[i] = i % 2;
            float t = train_threshold_for_sensitivity(p, y, (size_t)n, sens);
            int kept = 0;
            for (int i = 0; i < n; i++)
                kept += y[i] && p[i] >= t;
            int need = (target[a].hundredths * P + 99) / 100;
            cr_expect_eq(kept, need,
                         "--sensitivity %s, %d positives: the threshold keeps %d, %d do",
                         target[a].arg, P, kept, need);
        }
    }
    free(p), free(y);
}

Test(metrics, temperature_recovers_a_known_scale)
{
    /* Labels drawn from sigmoid(z); logits given as 3 z: T should be ~3. */
    enum { N = 20000 };
    float *z = malloc(N * sizeof *z);
    unsigned char *y = malloc(N);
    uint64_t rng = 42;
    for (int i = 0; i < N; i++) {
        float t = 4 * nn_rng_normal(&rng);
        y[i] = nn_rng_uniform(&rng) < 1 / (1 + expf(-t));
        z[i] = 3 * t;
    }
    float T = train_fit_temperature(z, y, N);
    cr_assert(T > 2.6f && T < 3.4f, "T = %f", T);
    free(z), free(y);
}

Test(metrics, roc_runs_from_0_to_1)
{
    float p[] = {0.9f, 0.4f, 0.5f, 0.3f, 0.1f}, fx[10], ty[10];
    unsigned char y[] = {1, 1, 0, 0, 0};
    int n = train_roc(p, y, 5, fx, ty, 10);
    cr_assert_eq(n, 6);
    cr_assert_float_eq(fx[0], 0, 1e-9);
    cr_assert_float_eq(ty[n - 1], 1, 1e-9);
    cr_assert_float_eq(fx[n - 1], 1, 1e-9);
}

/* A NaN score: the AUC's walk over tie groups had stood still on it (a NaN
 * equals nothing), and the ROC's had written past its buffer. */
Test(metrics, a_nan_score_neither_hangs_nor_overruns, .timeout = 10)
{
    float p[] = {NAN, 0.9f, 0.1f, 0.5f, NAN}, fx[101], ty[101];
    unsigned char y[] = {1, 1, 0, 0, 0};
    cr_assert(isnan(train_auc(p, y, 5)));
    cr_assert(isnan(train_auc_variance(p, y, 5)));
    cr_assert_eq(train_roc(p, y, 5, fx, ty, 101), 0);
    struct train_binary b;
    train_binary_eval(p, y, 5, 0.5f, &b);
    train_binary_ci(p, y, 5, &b);
    cr_assert(isnan(b.auc) && isnan(b.auc_lo));
    struct train_auc_diff d;
    float q[] = {0.8f, 0.9f, 0.1f, 0.5f, 0.2f};
    train_auc_paired(q, p, y, 5, &d);
    cr_assert(isnan(d.diff) && isnan(d.p));
}

Test(augment, off_is_identity_and_flip_mirrors)
{
    enum { C = 3, H = 8, W = 8 };
    uint8_t in[C * H * W];
    for (int i = 0; i < C * H * W; i++)
        in[i] = (uint8_t)(i * 7 % 251);
    struct train_augment a = {0};
    float out[C * H * W];
    uint64_t rng = 1;
    train_augment_slice(&a, in, C, H, W, out, &rng);
    for (int i = 0; i < C * H * W; i++)
        cr_assert_float_eq(out[i], in[i] / 255.0f, 1e-6);
    a.flip = 1;
    int flipped = 0;
    for (int trial = 0; trial < 20; trial++) {
        train_augment_slice(&a, in, C, H, W, out, &rng);
        if (fabsf(out[1] - in[W - 2] / 255.0f) < 1e-6 && fabsf(out[0] - in[W - 1] / 255.0f) < 1e-6)
            flipped++;
    }
    cr_assert(flipped > 2 && flipped < 18, "flipped %d of 20", flipped);
}

/* --sharp 1: every slice is the input moved by whole pixels (perhaps
 * mirrored), each pixel a copy of one input pixel or 0 outside it, never a
 * blend; the default draws blend almost every pixel. */
static int whole_pixel_move(const uint8_t *in, const float *out, int h, int w)
{
    for (int flip = 0; flip <= 1; flip++)
        for (int dy = -4; dy <= 4; dy++)
            for (int dx = -4; dx <= 4; dx++) {
                int same = 1;
                for (int y = 0; y < h && same; y++)
                    for (int x = 0; x < w && same; x++) {
                        int sx = (flip ? w - 1 - x : x) - dx, sy = y - dy;
                        float want =
                            sx < 0 || sy < 0 || sx >= w || sy >= h ? 0 : in[sy * w + sx] / 255.0f;
                        same = fabsf(out[y * w + x] - want) < 1e-6f;
                    }
                if (same) return 1;
            }
    return 0;
}

Test(augment, sharp_slices_are_copied_by_whole_pixels)
{
    enum { H = 32, W = 32 };
    uint8_t in[H * W];
    for (int i = 0; i < H * W; i++)
        in[i] = (uint8_t)(1 + (i * 37 + (i / W) * 11) % 250); /* no two neighbours alike */
    struct train_augment a;
    train_augment_default(&a);
    a.gain = a.offset = 0; /* the pixels as they are */
    float out[H * W];
    int moved[2] = {0, 0}, blends[2] = {0, 0};
    for (int sharp = 0; sharp <= 1; sharp++) {
        a.sharp = (float)sharp;
        uint64_t rng = 9;
        for (int trial = 0; trial < 20; trial++) {
            train_augment_slice(&a, in, 1, H, W, out, &rng);
            moved[sharp] += whole_pixel_move(in, out, H, W);
            for (int i = 0; i < H * W; i++) {
                float v = out[i] * 255.0f;
                if (fabsf(v - roundf(v)) > 1e-3f) blends[sharp]++;
            }
        }
    }
    cr_assert_eq(moved[1], 20, "--sharp 1: %d of 20 slices a whole-pixel move", moved[1]);
    cr_assert_eq(blends[1], 0, "--sharp 1: %d blended pixels", blends[1]);
    cr_assert_lt(moved[0], 2, "default: %d of 20 slices a whole-pixel move", moved[0]);
    cr_assert_gt(blends[0], 20 * H * W / 2, "default: only %d blended pixels", blends[0]);
}

Test(augment, really_changes_the_slice)
{
    enum { C = 3, H = 32, W = 32 };
    uint8_t in[C * H * W];
    for (int i = 0; i < C * H * W; i++)
        in[i] = (uint8_t)((i % W) * 8);
    struct train_augment a;
    train_augment_default(&a);
    float o1[C * H * W], o2[C * H * W];
    uint64_t rng = 5;
    train_augment_slice(&a, in, C, H, W, o1, &rng);
    train_augment_slice(&a, in, C, H, W, o2, &rng);
    double d = 0;
    for (int i = 0; i < C * H * W; i++) {
        d += fabs(o1[i] - o2[i]);
        cr_assert(o1[i] >= 0 && o1[i] <= 1);
    }
    cr_assert_gt(d / (C * H * W), 0.01);
}

static void fake_dataset(struct train_dataset *d, int npatients)
{
    struct triage_windows w;
    triage_windows_default(&w);
    train_dataset_init(d, &w, 3, 16, 16);
    d->nseries = npatients * 2; /* two studies per patient */
    d->series = calloc((size_t)d->nseries, sizeof *d->series);
    size_t n = (size_t)d->nseries * 4;
    d->labels = calloc(n, TRAIN_LABELS);
    memset(train_dataset_reserve(d, n), 0, n * 3 * 16 * 16);
    d->nslices = n;
    for (int i = 0; i < d->nseries; i++) {
        struct train_series *s = &d->series[i];
        snprintf(s->patient_id, sizeof s->patient_id, "P%03d", i / 2);
        snprintf(s->study_uid, sizeof s->study_uid, "2.25.%d", i);
        snprintf(s->series_uid, sizeof s->series_uid, "1.2.%d", i);
        s->n = 4;
        s->first = (size_t)i * 4;
        s->slice_labels = 1;
        s->study[0] = (i / 2) % 3 == 0; /* a third of the patients positive */
    }
}

Test(split, by_patient_stratified_and_seeded)
{
    struct train_dataset d;
    fake_dataset(&d, 60);
    train_dataset_split(&d, 7, 0.2, 0.2);
    int count[3] = {0}, pos[3] = {0};
    for (int i = 0; i < d.nseries; i += 2) {
        cr_assert_eq(d.series[i].split, d.series[i + 1].split, "patient in two splits");
        count[d.series[i].split]++;
        pos[d.series[i].split] += d.series[i].study[0];
    }
    cr_assert_eq(count[1], 12);
    cr_assert_eq(count[2], 12);
    cr_assert_eq(pos[1], 4); /* 20 positive patients, 20% of them */
    cr_assert_eq(pos[2], 4);
    int first[120];
    for (int i = 0; i < d.nseries; i++)
        first[i] = d.series[i].split;
    train_dataset_split(&d, 7, 0.2, 0.2);
    for (int i = 0; i < d.nseries; i++)
        cr_assert_eq(d.series[i].split, first[i]);
    train_dataset_split(&d, 8, 0.2, 0.2);
    int diff = 0;
    for (int i = 0; i < d.nseries; i++)
        diff += d.series[i].split != first[i];
    cr_assert_gt(diff, 0, "another seed, another split");
    train_dataset_free(&d);
}

/* A model of arch with in_c x hw x hw input (random weights). */
static nn_model *model_of(const char *arch, int in_c, int hw)
{
    char err[512];
    nn_config c;
    nn_config_default(&c);
    c.arch = arch;
    c.in_c = in_c;
    c.in_h = c.in_w = hw;
    nn_model *m = nn_model_create(&c, err, sizeof err);
    cr_assert(m, "%s", err);
    return m;
}

/* A tiny LRCN for fake_dataset's 3x16x16 slices, and random pixels for them. */
static nn_model *tiny_model(void)
{
    return model_of("b4,M,b8,G|d12,D0.5", 3, 16);
}

static void random_pixels(struct train_dataset *d, uint64_t rng)
{
    for (size_t i = 0; i < d->nslices * 3 * 16 * 16; i++)
        d->runs[0].p[i] = (uint8_t)(nn_rng_next(&rng) & 0xff);
}

Test(predict, head_from_features_matches_nn_and_temperature_folds)
{
    nn_model *m = tiny_model();
    struct train_dataset d;
    fake_dataset(&d, 2);
    random_pixels(&d, 3);
    size_t n = d.nslices;
    float *a = malloc(n * 6 * sizeof(float)), *b = malloc(n * 6 * sizeof(float));
    float *l = malloc(n * 6 * sizeof(float)), *x = malloc(n * 3 * 16 * 16 * sizeof(float));
    for (size_t i = 0; i < n * 3 * 16 * 16; i++)
        x[i] = d.runs[0].p[i] / 255.0f;
    cr_assert_eq(train_predict(m, &d, -1, a, l), 0);
    cr_assert_eq(nn_cnn_predict(m, x, (int)n, b), 0);
    for (size_t i = 0; i < n * 6; i++)
        cr_assert_float_eq(a[i], b[i], 1e-4);
    float T[6] = {2, 1, 1, 1, 1, 4};
    cr_assert_eq(train_fold_temperature(m, 1, NULL, T), 0);
    cr_assert_eq(train_fold_temperature(m, 0, NULL, T), 0);
    float *a2 = malloc(n * 6 * sizeof(float)), *l2 = malloc(n * 6 * sizeof(float));
    cr_assert_eq(train_predict(m, &d, -1, a2, l2), 0);
    for (size_t i = 0; i < n * 6; i++) {
        cr_assert_float_eq(a2[i], a[i] / T[i % 6], 1e-4);
        cr_assert_float_eq(l2[i], l[i] / T[i % 6], 1e-4);
    }
    free(a), free(b), free(l), free(x), free(a2), free(l2);
    train_dataset_free(&d);
    nn_model_free(m);
}

/* A model whose outputs are in another order than our labels: with its
 * label_index every prediction comes out in our order, and a temperature
 * goes to the output of its label; train_outputs_reorder puts the outputs
 * back in ours. */
Test(predict, outputs_in_another_order_read_by_label_index)
{
    nn_model *m = tiny_model(), *p = tiny_model();
    struct train_dataset d;
    fake_dataset(&d, 2);
    random_pixels(&d, 5);
    size_t n = d.nslices;
    /* p's output k is m's output rot[k]: each label one place on, "any" last */
    const int rot[TRAIN_LABELS] = {1, 2, 3, 4, 5, 0},
              label_index[TRAIN_LABELS] = {5, 0, 1, 2, 3, 4};
    cr_assert_eq(train_outputs_reorder(p, rot), 0);
    float *a = malloc(n * 6 * sizeof(float)), *l = malloc(n * 6 * sizeof(float));
    float *a2 = malloc(n * 6 * sizeof(float)), *l2 = malloc(n * 6 * sizeof(float));
    cr_assert_eq(train_predict(m, &d, -1, a, l), 0);
    cr_assert_eq(train_predict(p, &d, -1, a2, l2), 0);
    cr_assert(fabsf(a2[0] - a[1]) < 1e-5f && fabsf(l2[5] - l[0]) < 1e-5f, "the outputs moved");
    cr_assert_eq(train_predict_features(p, &d, -1, NULL, label_index, a2, l2), 0);
    for (size_t i = 0; i < n * 6; i++) {
        cr_assert_float_eq(a2[i], a[i], 1e-5);
        cr_assert_float_eq(l2[i], l[i], 1e-5);
    }
    float T[6] = {2, 1, 1, 1, 1, 4};
    cr_assert_eq(train_fold_temperature(p, 1, label_index, T), 0);
    cr_assert_eq(train_fold_temperature(p, 0, label_index, T), 0);
    cr_assert_eq(train_predict_features(p, &d, -1, NULL, label_index, a2, l2), 0);
    for (size_t i = 0; i < n * 6; i++) {
        cr_assert_float_eq(a2[i], a[i] / T[i % 6], 1e-4);
        cr_assert_float_eq(l2[i], l[i] / T[i % 6], 1e-4);
    }
    cr_assert_eq(train_outputs_reorder(p, label_index), 0);
    cr_assert_eq(train_predict(p, &d, -1, a2, l2), 0);
    for (size_t i = 0; i < n * 6; i++)
        cr_assert_float_eq(l2[i], l[i] / T[i % 6], 1e-4);
    free(a), free(l), free(a2), free(l2);
    train_dataset_free(&d);
    nn_model_free(m), nn_model_free(p);
}

/* Neighbouring slices as channels ("context"): each slice's input is the
 * windows of its own series' slices around it, never another series', and
 * everything that feeds the model from a dataset builds it that way. */
Test(context, inputs_stay_within_the_series)
{
    struct train_dataset d;
    fake_dataset(&d, 2); /* 4 series of 4 slices */
    size_t per = 3 * 16 * 16;
    for (size_t i = 0; i < d.nslices; i++)
        memset(d.runs[0].p + i * per, (int)(10 * i + 1), per);
    d.context = 1;
    cr_assert_eq(train_dataset_input_size(&d), 3 * per);
    uint8_t *u = malloc(3 * per);
    float *f = malloc(3 * per * sizeof(float));
    for (size_t i = 0; i < d.nslices; i++) {
        size_t first = i / 4 * 4, last = first + 3;
        size_t want[3] = {i == first ? i : i - 1, i, i == last ? i : i + 1};
        train_dataset_input(&d, i, u);
        train_dataset_input_float(&d, i, f);
        for (int s = 0; s < 3; s++)
            for (size_t q = 0; q < per; q++) {
                cr_assert_eq(u[s * per + q], 10 * want[s] + 1, "slice %zu, neighbour %d", i, s - 1);
                cr_assert_float_eq(f[s * per + q], u[s * per + q] / 255.0f, 1e-7);
            }
    }
    d.context = 0;
    cr_assert_eq(train_dataset_input_size(&d), per);
    train_dataset_input(&d, 5, u);
    cr_assert_eq(memcmp(u, train_dataset_pixels(&d, 5), per), 0);
    free(u), free(f);
    train_dataset_free(&d);
}

Test(context, the_model_sees_each_slice_with_its_neighbours)
{
    nn_config c;
    nn_config_default(&c);
    c.arch = "b4,M,b8,G|d12,D0.5";
    c.in_c = 9;
    c.in_h = c.in_w = 16;
    char err[256];
    nn_model *m = nn_model_create(&c, err, sizeof err);
    cr_assert(m, "%s", err);
    struct train_dataset d;
    fake_dataset(&d, 2);
    random_pixels(&d, 11);
    d.context = 1;
    size_t n = d.nslices, per = 3 * 16 * 16;
    float *x = malloc(n * per * sizeof(float)), *xs = malloc(n * 3 * per * sizeof(float));
    for (size_t i = 0; i < n * per; i++)
        x[i] = d.runs[0].p[i] / 255.0f;
    for (int s = 0; s < d.nseries; s++)
        triage_context_stack(x + d.series[s].first * per, d.series[s].n, per, 1, 0, d.series[s].n,
                             xs + d.series[s].first * 3 * per);
    float *a = malloc(n * 6 * sizeof(float)), *b = malloc(n * 6 * sizeof(float));
    float *l = malloc(n * 6 * sizeof(float)), *l2 = malloc(n * 6 * sizeof(float));
    cr_assert_eq(train_predict(m, &d, -1, a, l), 0);
    cr_assert_eq(nn_cnn_predict(m, xs, (int)n, b), 0);
    for (size_t i = 0; i < n * 6; i++)
        cr_assert_float_eq(a[i], b[i], 1e-4, "CNN logit %zu", i);
    int lengths[4] = {4, 4, 4, 4};
    cr_assert_eq(nn_lrcn_predict(m, xs, lengths, 4, b), 0);
    for (size_t i = 0; i < n * 6; i++)
        cr_assert_float_eq(1 / (1 + expf(-l[i])), b[i], 1e-4, "LRCN %zu", i);
    size_t idx[3] = {3, 4, 9};
    cr_assert_eq(train_cnn_logits(m, &d, idx, 3, l2), 0);
    for (int k = 0; k < 3; k++)
        for (int j = 0; j < 6; j++)
            cr_assert_float_eq(l2[k * 6 + j], a[idx[k] * 6 + j], 1e-4);
    free(x), free(xs), free(a), free(b), free(l), free(l2);
    train_dataset_free(&d);
    nn_model_free(m);
}

Test(augment, a_window_jitters_alike_in_every_slice)
{
    enum { C = 9, H = 16, W = 16, P = 3 };
    uint8_t in[C * H * W];
    for (int i = 0; i < C * H * W; i++)
        in[i] = (uint8_t)(40 + (i % (H * W)) % 200); /* every channel the same picture */
    struct train_augment a;
    train_augment_default(&a);
    a.channel_period = P;
    float out[C * H * W];
    uint64_t rng = 9;
    for (int trial = 0; trial < 5; trial++) {
        train_augment_slice(&a, in, C, H, W, out, &rng);
        for (int k = P; k < C; k++)
            cr_assert_eq(memcmp(out + k * H * W, out + (k % P) * H * W, sizeof(float) * H * W), 0,
                         "channel %d differs from channel %d", k, k % P);
    }
    /* without the period, each channel has its own jitter */
    a.channel_period = 0;
    train_augment_slice(&a, in, C, H, W, out, &rng);
    cr_assert_neq(memcmp(out + P * H * W, out, sizeof(float) * H * W), 0);
}

/* Hard negatives: only slices of negative training series, the highest
 * "any" logits of the candidates, the same for the same seed. */
Test(hard_negatives, highest_any_of_negative_training_series_only)
{
    nn_model *m = tiny_model();
    struct train_dataset d;
    fake_dataset(&d, 30); /* 60 series of 4 slices, 20 of them positive */
    random_pixels(&d, 5);
    int neg_train = 0;
    for (int i = 0; i < d.nseries; i++) {
        struct train_series *s = &d.series[i];
        if (s->study[0]) d.labels[(s->first + 2) * TRAIN_LABELS] = 1; /* one slice bleeds */
        if (i == 2 || i == 4) s->split = TRAIN_SPLIT_VAL;             /* a negative, not train */
        if (i == 9) s->slice_labels = 0; /* a reviewed negative study: labels 0 */
        neg_train += !s->study[0] && s->split == TRAIN_SPLIT_TRAIN;
    }
    cr_assert_eq(d.series[2].study[0] + d.series[4].study[0] + d.series[9].study[0], 0);
    cr_assert_eq(neg_train, 38);
    cr_assert_eq(train_negative_slices(&d, NULL), 4 * neg_train);

    size_t n = d.nslices;
    float *z = malloc(n * TRAIN_LABELS * sizeof(float));
    cr_assert_eq(train_predict(m, &d, -1, z, NULL), 0);
    size_t hard[8], again[8];
    float hz[8];
    uint64_t r1 = 11, r2 = 11;
    /* All negative slices as candidates: the 8 highest of them. */
    int all = 4 * neg_train;
    cr_assert_eq(train_hard_negatives(m, &d, 1000, 8, &r1, hard, hz), 8);
    for (int k = 0; k < 8; k++) {
        int s = (int)(hard[k] / 4);
        cr_assert(!d.series[s].study[0] && d.series[s].split == TRAIN_SPLIT_TRAIN,
                  "slice %zu of series %d is not a negative training slice", hard[k], s);
        cr_assert_float_eq(hz[k], z[hard[k] * TRAIN_LABELS], 1e-4);
        if (k) cr_assert_geq(hz[k - 1], hz[k]);
        for (int j = 0; j < k; j++)
            cr_assert_neq(hard[j], hard[k]);
    }
    int above = 0;
    for (size_t i = 0; i < n; i++) {
        int s = (int)(i / 4), chosen = 0;
        for (int k = 0; k < 8; k++)
            chosen |= hard[k] == i;
        if (!chosen && !d.series[s].study[0] && d.series[s].split == TRAIN_SPLIT_TRAIN)
            above += z[i * TRAIN_LABELS] > hz[7] + 1e-4f;
    }
    cr_assert_eq(above, 0, "%d negative slices score above the hardest 8", above);
    /* Fewer candidates, drawn with the seed: the same draw again. */
    r1 = r2 = 12;
    cr_assert_eq(train_hard_negatives(m, &d, 20, 5, &r1, hard, NULL), 5);
    cr_assert_eq(train_hard_negatives(m, &d, 20, 5, &r2, again, NULL), 5);
    for (int k = 0; k < 5; k++)
        cr_assert_eq(hard[k], again[k]);
    /* More asked for than there are: what there is. */
    size_t *every = malloc((size_t)all * 2 * sizeof *every);
    cr_assert_eq(train_hard_negatives(m, &d, 2 * all, 2 * all, &r1, every, NULL), all);
    free(every), free(z);
    train_dataset_free(&d);
    nn_model_free(m);
}

/* Weight averaging: the decay warms up as (1 + t) / (10 + t) until it reaches
 * the one asked for; the average of a constant is that constant however it
 * starts, and each step moves the average by (1 - d) of the gap. */
Test(ema, the_average_follows_the_weights_with_a_warm_up)
{
    cr_expect_float_eq(train_ema_update((float[]){0}, (float[]){0}, 1, 0.999, 1), 2.0 / 11, 1e-12);
    cr_expect_float_eq(train_ema_update((float[]){0}, (float[]){0}, 1, 0.999, 100), 101.0 / 110,
                       1e-12);
    cr_expect_float_eq(train_ema_update((float[]){0}, (float[]){0}, 1, 0.9, 100), 0.9, 1e-12);
    float avg[3] = {0, 4, -2}, x[3] = {1, 1, 1};
    double keep[3] = {0, 4, -2};
    for (long t = 1; t <= 300; t++) {
        double d = train_ema_update(avg, x, 3, 0.99, t);
        cr_assert(d > 0 && d <= 0.99);
        for (int i = 0; i < 3; i++) {
            keep[i] = d * keep[i] + (1 - d);
            cr_assert_float_eq(avg[i], keep[i], 1e-5, "element %d at step %ld", i, t);
        }
    }
    /* after 300 steps, 0.99 per step from about the 90th: within 0.99^200 of 1 */
    for (int i = 0; i < 3; i++)
        cr_expect(fabsf(avg[i] - 1) < 0.5f * powf(0.99f, 200), "element %d: %g", i, avg[i]);
}

/* Small bleeds: the "any" slices of slice-labelled training series whose
 * "any" shows on 1 to max_slices slices; nothing of a bigger bleed, of a
 * validation series, of a study-level series or of a negative one. */
Test(small_bleeds, slices_of_training_series_with_few_bleeding_slices_only)
{
    struct train_dataset d;
    fake_dataset(&d, 30); /* 60 series of 4 slices, 20 of them positive */
    int want[240] = {0}, nwant = 0, npos = 0;
    for (int i = 0; i < d.nseries; i++) {
        struct train_series *s = &d.series[i];
        if (!s->study[0]) continue;
        int shows = 1 + npos++ % 4; /* 1, 2, 3, 4, 1, ... slices with blood */
        for (int k = 0; k < shows; k++)
            d.labels[(s->first + (size_t)k) * TRAIN_LABELS] = 1;
        int val = npos == 2, study_level = npos == 3;
        if (val) s->split = TRAIN_SPLIT_VAL;
        if (study_level) s->slice_labels = 0;
        if (shows <= 3 && !val && !study_level)
            for (int k = 0; k < shows; k++)
                want[nwant++] = (int)s->first + k;
    }
    cr_assert_eq(npos, 20);
    /* A subtype without "any" (a labelling error) makes no small bleed: only "any" counts. */
    d.labels[(d.series[2].first + 1) * TRAIN_LABELS + 2] = 1; /* a negative training series */
    size_t got[240];
    cr_assert_eq(train_small_bleed_slices(&d, 3, NULL), nwant);
    cr_assert_eq(train_small_bleed_slices(&d, 3, got), nwant);
    for (int k = 0; k < nwant; k++) /* in dataset order */
        cr_assert_eq(got[k], (size_t)want[k], "place %d: slice %zu, not %d", k, got[k], want[k]);
    /* 1 slice: the series with one; 4: every positive training series with slice labels. */
    cr_assert_eq(train_small_bleed_slices(&d, 1, NULL), 5);
    cr_assert_eq(train_small_bleed_slices(&d, 4, NULL), 5 * (1 + 2 + 3 + 4) - 2 - 3);
    train_dataset_free(&d);
}

/* Stage 1's validation sample: validation slices with slice labels only,
 * the same for the same seed, in dataset order; on all of them the CNN's
 * figures are train_evaluate's slice-level ones. */
Test(val_sample, seeded_subset_of_labelled_validation_slices)
{
    nn_model *m = tiny_model();
    struct train_dataset d;
    fake_dataset(&d, 30); /* 60 series of 4 slices */
    random_pixels(&d, 7);
    uint64_t rng = 3;
    for (size_t i = 0; i < d.nslices; i++)
        for (int l = 0; l < TRAIN_LABELS; l++)
            d.labels[i * TRAIN_LABELS + l] = (nn_rng_next(&rng) % 3) == 0;
    train_dataset_split(&d, 7, 0.3, 0.2);
    d.series[0].split = d.series[1].split = TRAIN_SPLIT_VAL;
    d.series[1].slice_labels = 0; /* a reviewed study: study labels only */
    size_t labelled = 0;
    for (int s = 0; s < d.nseries; s++)
        if (d.series[s].split == TRAIN_SPLIT_VAL && d.series[s].slice_labels)
            labelled += (size_t)d.series[s].n;
    cr_assert_gt(labelled, 20);

    size_t *all = malloc(d.nslices * sizeof *all), *a = malloc(d.nslices * sizeof *a);
    size_t *b = malloc(d.nslices * sizeof *b);
    cr_assert_eq(train_val_sample(&d, 0, 1, all), labelled);
    cr_assert_eq(train_val_sample(&d, labelled + 5, 1, a), labelled, "more than there is: all");
    cr_assert_eq(train_val_sample(&d, 20, 1, a), 20);
    cr_assert_eq(train_val_sample(&d, 20, 1, b), 20);
    for (int k = 0; k < 20; k++) {
        const struct train_series *se = &d.series[a[k] / 4];
        cr_assert(se->split == TRAIN_SPLIT_VAL && se->slice_labels,
                  "slice %zu is not a labelled validation slice", a[k]);
        cr_assert_eq(a[k], b[k], "the same seed, the same sample");
        if (k) cr_assert_lt(a[k - 1], a[k], "in dataset order, no slice twice");
    }
    cr_assert_eq(train_val_sample(&d, 20, 2, b), 20);
    int diff = 0;
    for (int k = 0; k < 20; k++)
        diff += a[k] != b[k];
    cr_assert_gt(diff, 0, "another seed, another sample");

    /* On every labelled validation slice: what train_evaluate says at slice level. */
    float thr[2][TRAIN_LABELS];
    for (int i = 0; i < 2 * TRAIN_LABELS; i++)
        thr[i / TRAIN_LABELS][i % TRAIN_LABELS] = 0.5f; /* as stage 1's validation */
    struct train_eval *e = malloc(sizeof *e);
    char err[256];
    cr_assert_eq(train_evaluate(m, NULL, &d, TRAIN_SPLIT_VAL, thr, e, err, sizeof err), 0, "%s",
                 err);
    struct train_binary r[TRAIN_LABELS];
    double wl;
    cr_assert_eq(train_evaluate_slices(m, &d, all, labelled, r, &wl, err, sizeof err), 0);
    for (int l = 0; l < TRAIN_LABELS; l++) {
        const struct train_binary *x = &e->m[TRAIN_LEVEL_SLICE][TRAIN_MODEL_CNN][l];
        cr_assert_float_eq(r[l].auc, x->auc, 1e-3, "label %d: %f against %f", l, r[l].auc, x->auc);
        cr_assert_float_eq(r[l].logloss, x->logloss, 1e-4);
    }
    cr_assert_float_eq(wl, e->weighted_logloss[TRAIN_LEVEL_SLICE][TRAIN_MODEL_CNN], 1e-4);
    /* A sample scores its own slices: another sample, other figures. */
    cr_assert_eq(train_evaluate_slices(m, &d, a, 20, r, &wl, err, sizeof err), 0);
    cr_assert(fabs(wl - e->weighted_logloss[TRAIN_LEVEL_SLICE][TRAIN_MODEL_CNN]) > 1e-6);
    free(all), free(a), free(b), free(e);
    train_dataset_free(&d);
    nn_model_free(m);
}

/* Weights that training made NaN (after the epoch's loss was taken, by its
 * last step) give NaN outputs: evaluation, stage 1's validation on a sample
 * and calibration refuse them with the reason, rather than score them. */
Test(evaluate, outputs_that_are_not_finite_are_an_error, .timeout = 60)
{
    struct train_dataset d;
    fake_dataset(&d, 4);
    random_pixels(&d, 19);
    for (int s = 0; s < d.nseries; s++)
        d.series[s].split = TRAIN_SPLIT_VAL;
    float thr[2][TRAIN_LABELS] = {{0.5f}, {0.5f}}, nan[TRAIN_LABELS] = {1, 1, 1, 1, 1, 1};
    nan[3] = NAN;
    struct train_eval *e = malloc(sizeof *e);
    struct train_reliability rel;
    char err[512] = "", t[256];
    for (int head = 0; head < 2; head++) {
        nn_model *m = tiny_model();
        cr_assert_eq(train_fold_temperature(m, head, NULL, nan), 0);
        const char *who = head ? "the CNN's" : "the LRCN's";
        cr_assert_eq(train_evaluate(m, NULL, &d, TRAIN_SPLIT_VAL, thr, e, err, sizeof err), -1);
        cr_assert(strstr(err, who) && strstr(err, "\"intraventricular\" is not a number") &&
                      strstr(err, "slice 1 of 4 of series 1.2."),
                  "%s", err);
        err[0] = 0;
        cr_assert_eq(
            train_calibrate(m, NULL, &d, NULL, 0.95, thr, &rel, NULL, t, sizeof t, err, sizeof err),
            -1);
        cr_assert(strstr(err, who), "%s", err);
        if (head) {
            size_t idx[] = {5, 6, 7};
            struct train_binary b[TRAIN_LABELS];
            double wl;
            err[0] = 0;
            cr_assert_eq(train_evaluate_slices(m, &d, idx, 3, b, &wl, err, sizeof err), NN_EFORMAT);
            cr_assert(strstr(err, "the CNN's") && strstr(err, "slice 2 of 4 of series 1.2.1"), "%s",
                      err);
        }
        nn_model_free(m);
    }
    free(e);
    train_dataset_free(&d);
}

/* fake_dataset's 2 x npatients series with random pixels, all of them
 * validation series with study labels only, as reviews give them. */
static void validation_studies(struct train_dataset *d, int npatients, uint64_t rng)
{
    fake_dataset(d, npatients);
    random_pixels(d, rng);
    for (int s = 0; s < d->nseries; s++)
        d->series[s].split = TRAIN_SPLIT_VAL, d->series[s].slice_labels = 0;
}

/* --sensitivity through train_calibrate as the commands pass it (a double):
 * the LRCN's threshold of "any" keeps exactly ceil(target x 20) of 20
 * positive studies. The labels follow the untrained model's own scores, every
 * third study out of place, so that the temperature has something to fit.
 * Each study's slices are of their own brightness, so that the untrained
 * model's scores differ by the input: random pixels alone gave scores within
 * about 1e-6 of each other, and the x1e4 needed to spread them spread the
 * rounding of two paths through the model as much (sanitizer builds: one
 * positive's score 4e-5 below the threshold calibrate chose for it). */
Test(calibrate, the_threshold_keeps_the_share_of_positives_asked_for)
{
    nn_model *m = tiny_model();
    struct train_dataset d;
    validation_studies(&d, 20, 13); /* 40 studies */
    for (int s = 0; s < d.nseries; s++) {
        uint8_t *p = d.runs[0].p + d.series[s].first * 3 * 16 * 16;
        for (size_t i = 0; i < (size_t)d.series[s].n * 3 * 16 * 16; i++)
            p[i] = (uint8_t)((p[i] & 0x3f) + 4 * ((s * 17) % 40)); /* a brightness per study */
    }
    float thr[2][TRAIN_LABELS] = {{0.5f}, {0.5f}}, score[40];
    struct train_eval *e = malloc(sizeof *e);
    char err[256];
    cr_assert_eq(
        train_evaluate_scores(m, NULL, &d, TRAIN_SPLIT_VAL, thr, e, score, NULL, err, sizeof err),
        0, "%s", err);
    int order[40];
    for (int i = 0; i < 40; i++)
        order[i] = i;
    for (int i = 1; i < 40; i++) /* by score, highest first */
        for (int j = i; j > 0 && score[order[j - 1]] < score[order[j]]; j--) {
            int t = order[j];
            order[j] = order[j - 1], order[j - 1] = t;
        }
    /* Spread the scores to logits of about -1 to 1 (the last layer scaled,
     * centred below). */
    double hi = score[order[0]], lo = score[order[39]];
    double range = log(hi / (1 - hi)) - log(lo / (1 - lo));
    cr_assert(range > 1e-4, "the scores hardly differ: %g to %g", lo, hi);
    float spread[TRAIN_LABELS];
    for (int l = 0; l < TRAIN_LABELS; l++)
        spread[l] = (float)(range / 2);
    cr_assert_eq(train_fold_temperature(m, 0, NULL, spread), 0);
    nn_tensor_info bias;
    cr_assert_eq(nn_model_tensor_find(m, "out.bias", &bias), 0);
    double mid = score[order[20]];
    bias.data[0] -= (float)(log(mid / (1 - mid)) / spread[0]);
    /* 20 positives among the first 30, every third of those negative */
    for (int r = 0; r < 40; r++)
        d.series[order[r]].study[0] = r < 30 && r % 3 != 2;
    static const struct {
        const char *arg;
        size_t need;
    } target[] = {{"0.8", 16}, {"0.85", 17}, {"0.9", 18}, {"0.95", 19}, {"0.97", 20}};
    for (size_t k = 0; k < sizeof target / sizeof target[0]; k++) {
        double sens;
        cr_assert_eq(util_number_double(target[k].arg, &sens), 0);
        struct train_reliability rel;
        char t[256];
        cr_assert_eq(
            train_calibrate(m, NULL, &d, NULL, sens, thr, &rel, NULL, t, sizeof t, err, sizeof err),
            0, "%s", err);
        /* The positives' scores as the folded model gives them, highest
         * first: the need-th is at the threshold, less the rounding of
         * another path through the model (scaled up with the scores'
         * spread: 1e-5 here), and the one after it is below. A target taken
         * for one positive more puts the threshold at that one. */
        cr_assert_eq(train_evaluate_scores(m, NULL, &d, TRAIN_SPLIT_VAL, thr, e, score, NULL, err,
                                           sizeof err),
                     0, "%s", err);
        float pp[20];
        int np = 0;
        for (int r = 0; r < 40; r++)
            if (d.series[order[r]].study[0]) pp[np++] = score[order[r]];
        cr_assert_eq(np, 20);
        for (int i = 1; i < np; i++)
            for (int j = i; j > 0 && pp[j - 1] < pp[j]; j--) {
                float x = pp[j];
                pp[j] = pp[j - 1], pp[j - 1] = x;
            }
        const double tol = 1e-4;
        size_t need = target[k].need;
        cr_expect(pp[need - 1] >= thr[TRAIN_MODEL_LRCN][0] - tol &&
                      (need == 20 || pp[need] < thr[TRAIN_MODEL_LRCN][0] - tol),
                  "--sensitivity %s: threshold %.6f, the positives' scores %.6f (%zu-th) and "
                  "%.6f (next); %zu of 20 asked for (%s)",
                  target[k].arg, thr[TRAIN_MODEL_LRCN][0], pp[need - 1], need,
                  need < 20 ? pp[need] : 0.0f, need, t);
    }
    free(e);
    train_dataset_free(&d);
    nn_model_free(m);
}

/* The series of one study (its brain and bone kernels) are one study, as on
 * the node's worklist: the study's score is the maximum over all of them,
 * its label positive when one of them is, and evaluation, the threshold and
 * the temperature count it once. Each series had counted as a study. */
Test(evaluate, the_series_of_a_study_are_one_study)
{
    nn_model *m = tiny_model();
    struct train_dataset d;
    validation_studies(&d, 12, 17); /* 24 series */
    float thr[2][TRAIN_LABELS] = {{0.5f}, {0.5f}}, series_score[24], study_score[24];
    unsigned char study_y[24];
    struct train_eval *e = malloc(sizeof *e);
    char err[256];
    cr_assert_eq(train_evaluate_scores(m, NULL, &d, TRAIN_SPLIT_VAL, thr, e, series_score, NULL,
                                       err, sizeof err),
                 0, "%s", err);
    cr_assert_eq(e->nstudies, 24, "a study per series");
    /* Series 12 + i a second series of study i (its patient too), some of
     * them the positive one of their study. */
    int pos = 0;
    for (int i = 0; i < 12; i++) {
        struct train_series *a = &d.series[i], *b = &d.series[12 + i];
        memcpy(b->study_uid, a->study_uid, sizeof b->study_uid);
        memcpy(b->patient_id, a->patient_id, sizeof b->patient_id);
        b->study[0] = i % 4 == 1;
        pos += a->study[0] || b->study[0];
    }
    cr_assert_eq(train_evaluate_scores(m, NULL, &d, TRAIN_SPLIT_VAL, thr, e, study_score, study_y,
                                       err, sizeof err),
                 0, "%s", err);
    cr_assert_eq(e->nseries, 24);
    cr_assert_eq(e->nstudies, 12);
    for (int mo = 0; mo < 2; mo++) {
        const struct train_binary *b = &e->m[TRAIN_LEVEL_STUDY][mo][0];
        cr_assert_eq(b->n, 12, "%zu studies scored", b->n);
        cr_assert_eq(b->pos, (size_t)pos, "%zu positive studies, %d", b->pos, pos);
    }
    for (int i = 0; i < 12; i++) {
        cr_assert_float_eq(study_score[i], fmaxf(series_score[i], series_score[12 + i]), 1e-7,
                           "study %d: the maximum over its two series", i);
        cr_assert_eq(study_y[i], d.series[i].study[0] || d.series[12 + i].study[0]);
    }
    struct train_reliability rel;
    char t[256];
    unsigned fitted;
    cr_assert_eq(
        train_calibrate(m, NULL, &d, NULL, 0.95, thr, &rel, &fitted, t, sizeof t, err, sizeof err),
        0, "%s", err);
    int n = 0;
    for (int b = 0; b < 10; b++)
        n += rel.count[0][b];
    cr_assert_eq(n, 12, "the temperature fitted on %d studies, 12", n);
    free(e);
    train_dataset_free(&d);
    nn_model_free(m);
}

/* Calibration takes every validation series, study-labelled (reviewed) ones
 * too: with only those, "any" still has both classes and is fitted. */
Test(calibrate, study_labelled_series_count)
{
    nn_model *m = tiny_model();
    struct train_dataset d;
    validation_studies(&d, 4, 9); /* 8 series, patients 0 and 3 positive */
    float thr[2][TRAIN_LABELS];
    struct train_reliability rel;
    unsigned fitted = 0;
    char t[256], err[256];
    cr_assert_eq(
        train_calibrate(m, NULL, &d, NULL, 0.95, thr, &rel, &fitted, t, sizeof t, err, sizeof err),
        0, "%s", err);
    cr_assert(fitted & 1u, "\"any\" fitted on study-labelled series (mask %x)", fitted);
    cr_assert_eq(fitted & ~1u, 0, "the subtypes have no positive study here");
    int n = 0;
    for (int c = 0; c < 2; c++)
        for (int b = 0; b < 10; b++)
            n += rel.count[c][b];
    cr_assert_eq(n, 2 * d.nseries, "every series in the reliability diagram");
    /* what each label was fitted on; a label without a positive study has
     * threshold 0.5 (it had 0.49995, as if chosen) */
    cr_assert_eq(rel.studies[0], 8);
    cr_assert_eq(rel.positives[0], 4);
    for (int l = 1; l < TRAIN_LABELS; l++) {
        cr_assert_eq(rel.studies[l], 8);
        cr_assert_eq(rel.positives[l], 0);
        cr_assert_eq(thr[0][l], 0.5f, "%s: %.6f", train_label_names[l], thr[0][l]);
        cr_assert_eq(thr[1][l], 0.5f, "%s: %.6f", train_label_names[l], thr[1][l]);
        cr_assert_eq(rel.temperature[l], 1.0f);
    }
    train_dataset_free(&d);
    nn_model_free(m);
}

/* The node's reviewed studies: files in the spool, a review in the database
 * -> series with the review as study-level labels and unknown slice labels. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "db.h"
#include "db_reviews.h"
#include "phantom.h"
#include "scp_info.h"
#include "pipeline.h"
#include "volume.h"

/* A test's scratch folder: made from a mkdtemp template, removed by the
 * test's .fini = scratch_fini whether the test passed or an assertion
 * stopped it (criterion runs fini either way; each test is a process of its
 * own, so one folder per test). */
static char scratch_path[256];

static void scratch(char *tmpl)
{
    cr_assert(mkdtemp(tmpl), "mkdtemp %s: %s", tmpl, strerror(errno));
    snprintf(scratch_path, sizeof scratch_path, "%s", tmpl);
}

static void scratch_fini(void)
{
    if (!scratch_path[0]) return;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", scratch_path);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", scratch_path);
    scratch_path[0] = 0;
}

static void copy(const char *src, const char *dst)
{
    FILE *a = fopen(src, "rb"), *b = fopen(dst, "wb");
    cr_assert(a && b);
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, a)) > 0)
        fwrite(buf, 1, n, b);
    fclose(a), fclose(b);
}

/* count phantom studies of 6 slices 64x64 of seed in dir. */
static void phantoms(char *dir, int seed, int count, int size)
{
    char err[512];
    struct train_phantom_opts o;
    train_phantom_opts_default(&o);
    o.outdir = dir, o.seed = (uint64_t)seed, o.count = count, o.size = size;
    o.slices_min = o.slices_max = 6;
    cr_assert_eq(train_phantom_run(&o, err, sizeof err), 0, "%s", err);
}

static void small_phantoms(char *dir, int seed, int count)
{
    phantoms(dir, seed, count, 64);
}

static void same_slices(const struct train_dataset *a, const struct train_dataset *b)
{
    cr_assert_eq(a->nseries, b->nseries);
    cr_assert_eq(a->nslices, b->nslices);
    cr_assert(a->c == b->c && a->h == b->h && a->w == b->w);
    for (size_t i = 0; i < a->nslices; i++) {
        cr_assert_eq(memcmp(train_dataset_pixels(a, i), train_dataset_pixels(b, i),
                            (size_t)a->c * a->h * a->w),
                     0, "slice %zu", i);
        cr_assert_eq(
            memcmp(a->labels + i * TRAIN_LABELS, b->labels + i * TRAIN_LABELS, TRAIN_LABELS), 0,
            "labels of slice %zu", i);
    }
}

static int review_fails(void *ud, const struct db_review_row *r)
{
    (void)ud, (void)r;
    return -1;
}

Test(reviews, reviewed_studies_become_study_labelled_series, .timeout = 120, .fini = scratch_fini)
{
    char tmp[] = "/tmp/ichtriage-reviews-XXXXXX";
    scratch(tmp);
    char ph[300], store[300], err[512];
    snprintf(ph, sizeof ph, "%s/ph", tmp);
    snprintf(store, sizeof store, "%s/store", tmp);
    small_phantoms(ph, 5, 3);
    mkdir(store, 0755);
    char spool[400];
    snprintf(spool, sizeof spool, "%s/spool", store);
    mkdir(spool, 0755);
    char dbp[400];
    snprintf(dbp, sizeof dbp, "%s/ichtriage.db", store);
    struct db *db;
    cr_assert_eq(db_open(&db, dbp, err, sizeof err), 0, "%s", err);
    /* Index every file into the spool. */
    char cmd[4000], line[1024], studies[3][SCP_UID_MAX], sops[3][2][SCP_UID_MAX];
    int nst = 0, nsop[3] = {0};
    snprintf(cmd, sizeof cmd, "ls %s/stage_2_train/*.dcm", ph);
    FILE *ls = popen(cmd, "r");
    while (fgets(line, sizeof line, ls)) {
        line[strcspn(line, "\n")] = 0;
        struct scp_info in;
        cr_assert_eq(scp_info_read(line, &in, err, sizeof err), 0);
        char dir[1200], rel[1200], dst[1600];
        snprintf(dir, sizeof dir, "%s/spool/%s", store, in.study_uid);
        mkdir(dir, 0755);
        snprintf(dir + strlen(dir), sizeof dir - strlen(dir), "/%s", in.series_uid);
        mkdir(dir, 0755);
        snprintf(rel, sizeof rel, "spool/%s/%s/%s.dcm", in.study_uid, in.series_uid, in.sop_uid);
        snprintf(dst, sizeof dst, "%s/%s", store, rel);
        copy(line, dst);
        struct db_instance di = {.patient_id = in.patient_id,
                                 .study_uid = in.study_uid,
                                 .series_uid = in.series_uid,
                                 .sop_uid = in.sop_uid,
                                 .sop_class = in.sop_class,
                                 .modality = "CT",
                                 .file_path = rel,
                                 .series_number = -1,
                                 .instance_number = -1,
                                 .rows = in.rows,
                                 .columns = in.columns};
        char old[600];
        cr_assert_eq(db_instance_put(db, &di, old, sizeof old, err, sizeof err), 0, "%s", err);
        int seen = 0;
        for (int k = 0; k < nst; k++)
            seen |= strcmp(studies[k], in.study_uid) == 0;
        if (!seen && nst < 3) snprintf(studies[nst++], SCP_UID_MAX, "%s", in.study_uid);
        for (int k = 0; k < nst; k++)
            if (strcmp(studies[k], in.study_uid) == 0 && nsop[k] < 2)
                snprintf(sops[k][nsop[k]++], SCP_UID_MAX, "%s", in.sop_uid);
    }
    pclose(ls);
    cr_assert_eq(nst, 3);
    /* Two reviewed (one positive with a subtype and two slices marked), one
     * not reviewed. A slice of another study cannot be marked. */
    char marks[200], foreign[100];
    snprintf(marks, sizeof marks, "%s/0,%s/0", sops[0][0], sops[0][1]);
    snprintf(foreign, sizeof foreign, "%s/0", sops[1][0]);
    cr_assert_eq(db_review_add(db, studies[0], true, "subdural", foreign, "", "dr a", 900, NULL,
                               NULL, err, sizeof err),
                 2);
    cr_assert(strstr(err, "not a slice of this study"), "%s", err);
    cr_assert_eq(db_review_add(db, studies[0], true, "subdural", marks, "", "dr a", 1000, NULL,
                               NULL, err, sizeof err),
                 0, "%s", err);
    cr_assert_eq(
        db_review_add(db, studies[1], false, "", "", "", "dr b", 2000, NULL, NULL, err, sizeof err),
        0, "%s", err);
    db_close(db);

    struct train_dataset d;
    struct triage_windows w;
    triage_windows_default(&w);
    train_dataset_init(&d, &w, 3, 32, 32);
    int added = 0;
    cr_assert_eq(train_dataset_add_reviews(&d, store, NULL, 0, &added, err, sizeof err), 0, "%s",
                 err);
    cr_assert_eq(added, 2);
    cr_assert_eq(d.nseries, 2);
    for (int i = 0; i < d.nseries; i++) {
        const struct train_series *s = &d.series[i];
        cr_assert_eq(s->slice_labels, 0);
        cr_assert_eq(s->n, 6);
        int pos = strcmp(s->study_uid, studies[0]) == 0;
        cr_assert_eq(s->study[0], pos);
        cr_assert_eq(s->study[5], pos); /* subdural */
        cr_assert_eq(s->study[1], 0);
        /* Negative study: every slice negative. Positive: the two marked
         * slices positive for any and subdural (its only subtype), nothing
         * else known. */
        int marked = 0, unknown = 0;
        for (int k = 0; k < s->n; k++) {
            const uint8_t *y = d.labels + (s->first + (size_t)k) * TRAIN_LABELS;
            if (!pos) {
                for (int l = 0; l < TRAIN_LABELS; l++)
                    cr_assert_eq(y[l], 0);
            } else if (y[0] == 1) {
                marked++;
                cr_assert(y[5] == 1 && y[1] == 0 && y[2] == 0 && y[3] == 0 && y[4] == 0);
            } else {
                unknown++;
                for (int l = 0; l < TRAIN_LABELS; l++)
                    cr_assert_eq(y[l], TRAIN_LABEL_UNKNOWN);
            }
        }
        if (pos) cr_assert(marked == 2 && unknown == 4, "marked %d unknown %d", marked, unknown);
    }
    /* With a spill folder the slices go to an unnamed file and are mapped;
     * with the disk low, or when a write fails part way, to memory: the same
     * slices and labels every time, and nothing left in the folder. */
    char spill[400];
    snprintf(spill, sizeof spill, "%s/spill", tmp);
    cr_assert_eq(mkdir(spill, 0755), 0);
    struct train_dataset sd[3];
    int64_t keep[3] = {INT64_MAX / 2, 0, 0};
    for (int k = 0; k < 3; k++) {
        /* 128x128 slices: the series (6 x 48 KiB) are larger than what the
         * database needs to be read */
        train_dataset_init(&sd[k], &w, 3, 128, 128);
        /* third: files may not grow past the first series */
        struct rlimit old, lim;
        cr_assert_eq(getrlimit(RLIMIT_FSIZE, &old), 0);
        lim = (struct rlimit){4096 + 6 * 3 * 128 * 128 + 4096, old.rlim_max};
        signal(SIGXFSZ, SIG_IGN);
        if (k == 2) cr_assert_eq(setrlimit(RLIMIT_FSIZE, &lim), 0);
        int rc = train_dataset_add_reviews(&sd[k], store, spill, keep[k], &added, err, sizeof err);
        cr_assert_eq(setrlimit(RLIMIT_FSIZE, &old), 0);
        cr_assert_eq(rc, 0, "%s", err);
        cr_assert_eq(memcmp(d.labels, sd[k].labels, d.nslices * TRAIN_LABELS), 0);
        same_slices(&sd[0], &sd[k]);
    }
    cr_assert(sd[0].nruns == 1 && !sd[0].runs[0].map, "not in memory with the disk low");
    cr_assert(sd[1].nruns == 1 && sd[1].runs[0].map, "not in the file");
    cr_assert(sd[2].nruns == 2 && sd[2].runs[0].map && sd[2].runs[0].n == 6 && !sd[2].runs[1].map,
              "the first series not in the file and the second in memory");
    /* Nothing left but the kept series (written by the second run: the
     * first had the disk low). */
    snprintf(cmd, sizeof cmd, "test \"$(ls -A %s)\" = reviewed-series", spill);
    cr_assert_eq(system(cmd), 0, "something was left in %s", spill);
    for (int k = 0; k < 3; k++)
        train_dataset_free(&sd[k]);
    train_dataset_free(&d);

    /* The kept series: one file per reviewed series, read instead of
     * decoding. Proof: a kept file's pixels changed to a pattern come back
     * as that series' slices. */
    char kept[600], files[2][700];
    snprintf(kept, sizeof kept, "%s/reviewed-series", spill);
    /* one folder per way of making slices (here 3x128x128, default
     * windows, no crop) */
    snprintf(cmd, sizeof cmd, "ls %s", kept);
    ls = popen(cmd, "r");
    cr_assert(fgets(line, sizeof line, ls));
    line[strcspn(line, "\n")] = 0;
    cr_assert(!fgets(cmd, sizeof cmd, ls), "more than one preprocessing");
    pclose(ls);
    cr_assert_eq(strlen(line), 16, "%s", line);
    snprintf(kept + strlen(kept), sizeof kept - strlen(kept), "/%.16s", line);
    snprintf(cmd, sizeof cmd, "ls %s/*.slices", kept);
    ls = popen(cmd, "r");
    int nfiles = 0;
    while (nfiles < 2 && fgets(files[nfiles], sizeof files[0], ls))
        files[nfiles][strcspn(files[nfiles], "\n")] = 0, nfiles++;
    cr_assert(!fgets(line, sizeof line, ls), "more than two kept series");
    pclose(ls);
    cr_assert_eq(nfiles, 2);
    size_t series_bytes = 6 * 3 * 128 * 128;
    struct stat st;
    cr_assert_eq(stat(files[0], &st), 0);
    cr_assert_eq((size_t)st.st_size, 40 + series_bytes, "a kept file is its head and the slices");
    cr_assert_eq(st.st_mode & 0077, 0, "a kept file is readable by others");
    uint8_t *pattern = malloc(series_bytes);
    for (size_t i = 0; i < series_bytes; i++)
        pattern[i] = (uint8_t)(i * 7 + 3);
    int fd = open(files[0], O_WRONLY);
    cr_assert_eq(pwrite(fd, pattern, series_bytes, 40), (ssize_t)series_bytes); /* after the head */
    close(fd);
    /* The review of the negative study changes: the labels are this run's,
     * the slices the kept ones. */
    cr_assert_eq(db_open(&db, dbp, err, sizeof err), 0, "%s", err);
    cr_assert_eq(db_review_add(db, studies[1], true, "epidural", "", "", "dr c", 3000, NULL, NULL,
                               err, sizeof err),
                 0, "%s", err);
    db_close(db);
    struct train_dataset k1;
    train_dataset_init(&k1, &w, 3, 128, 128);
    cr_assert_eq(train_dataset_add_reviews(&k1, store, spill, 0, &added, err, sizeof err), 0, "%s",
                 err);
    cr_assert_eq(k1.nseries, 2);
    int found = 0;
    for (int i = 0; i < k1.nseries; i++) {
        const struct train_series *se = &k1.series[i];
        cr_assert_eq(se->study[0], 1, "series %d: the new review's label", i);
        if (strcmp(se->study_uid, studies[1]) == 0) cr_assert_eq(se->study[1], 1);
        if (memcmp(train_dataset_pixels(&k1, se->first), pattern, series_bytes) == 0) found++;
    }
    cr_assert_eq(found, 1, "the kept slices were not used");
    /* A file of a series that changes: that series is decoded again (the
     * same slices as without the cache), its old file swept, the other
     * kept as it is. */
    train_dataset_free(&k1);
    cr_assert_eq(unlink(files[0]), 0); /* the pattern: decoded and kept again */
    train_dataset_init(&k1, &w, 3, 128, 128);
    cr_assert_eq(train_dataset_add_reviews(&k1, store, spill, 0, &added, err, sizeof err), 0, "%s",
                 err);
    train_dataset_free(&k1);
    ino_t ino[2];
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(stat(files[i], &st), 0, "%s was not kept", files[i]);
        ino[i] = st.st_ino;
    }
    /* (kept by an earlier run: the sweep goes by the files' times) */
    snprintf(cmd, sizeof cmd,
             "touch -d '2001-01-01' %s/*.slices \"$(ls %s/spool/%s/*/*.dcm | head -1)\"", kept,
             store, studies[0]);
    cr_assert_eq(system(cmd), 0);
    struct train_dataset ref;
    train_dataset_init(&ref, &w, 3, 128, 128);
    cr_assert_eq(train_dataset_add_reviews(&ref, store, NULL, 0, &added, err, sizeof err), 0, "%s",
                 err);
    train_dataset_init(&k1, &w, 3, 128, 128);
    cr_assert_eq(train_dataset_add_reviews(&k1, store, spill, 0, &added, err, sizeof err), 0, "%s",
                 err);
    same_slices(&ref, &k1);
    snprintf(cmd, sizeof cmd, "test $(ls %s | wc -l) -eq 2", kept);
    cr_assert_eq(system(cmd), 0, "not one file per reviewed series");
    int same = 0;
    for (int i = 0; i < 2; i++)
        same += stat(files[i], &st) == 0 && st.st_ino == ino[i];
    cr_assert_eq(same, 1, "not just the changed series written again");
    train_dataset_free(&ref);
    train_dataset_free(&k1);
    /* The study leaves the spool (retention): its kept series go too. */
    snprintf(cmd, sizeof cmd, "rm -rf %s/spool/%s && touch -d '2001-01-01' %s/*.slices", store,
             studies[0], kept);
    cr_assert_eq(system(cmd), 0);
    train_dataset_init(&k1, &w, 3, 128, 128);
    cr_assert_eq(train_dataset_add_reviews(&k1, store, spill, 0, &added, err, sizeof err), 0, "%s",
                 err);
    cr_assert_eq(added, 1);
    snprintf(cmd, sizeof cmd, "test $(ls %s | wc -l) -eq 1", kept);
    cr_assert_eq(system(cmd), 0, "the series of a study no longer in the spool was kept");
    free(pattern);
    train_dataset_free(&k1);
    /* A run for a model of another input keeps its own folder and leaves
     * this one; a folder not used for a month goes. */
    train_dataset_init(&k1, &w, 3, 64, 64);
    cr_assert_eq(train_dataset_add_reviews(&k1, store, spill, 0, &added, err, sizeof err), 0, "%s",
                 err);
    train_dataset_free(&k1);
    snprintf(cmd, sizeof cmd,
             "test $(ls %s/*.slices | wc -l) -eq 1 && test $(ls %s/.. | wc -l) -eq 2", kept, kept);
    cr_assert_eq(system(cmd), 0, "a run for another input swept this input's series");
    snprintf(cmd, sizeof cmd, "touch -d '40 days ago' %s/*.slices %s", kept, kept);
    cr_assert_eq(system(cmd), 0);
    train_dataset_init(&k1, &w, 3, 64, 64);
    cr_assert_eq(train_dataset_add_reviews(&k1, store, spill, 0, &added, err, sizeof err), 0, "%s",
                 err);
    train_dataset_free(&k1);
    cr_assert_eq(access(kept, F_OK), -1, "a folder not used for 40 days was kept");
    snprintf(cmd, sizeof cmd, "test $(ls %s/reviewed-series | wc -l) -eq 1", spill);
    cr_assert_eq(system(cmd), 0, "the folder in use went");
    /* A study whose PatientID is empty (type 2, often empty once
     * anonymised) is a patient of its own, as in RSNA folders, not one
     * patient with every other such study. */
    snprintf(cmd, sizeof cmd, "dcmodify -nb -m '(0010,0020)=' %s/spool/%s/*/*.dcm >/dev/null",
             store, studies[1]);
    cr_assert_eq(system(cmd), 0);
    train_dataset_init(&k1, &w, 3, 32, 32);
    cr_assert_eq(train_dataset_add_reviews(&k1, store, NULL, 0, &added, err, sizeof err), 0, "%s",
                 err);
    cr_assert_eq(k1.nseries, 1);
    cr_assert_str_eq(k1.series[0].patient_id, studies[1]);
    train_dataset_free(&k1);
    /* A callback that fails (as collecting does when memory runs out)
     * makes the read fail, not end early as if the list were whole. */
    cr_assert_eq(db_open(&db, dbp, err, sizeof err), 0, "%s", err);
    cr_assert_eq(db_reviews_latest(db, review_fails, NULL), -1);
    cr_assert_eq(db_reviews_of_study(db, studies[1], review_fails, NULL), -1);
    db_close(db);
    /* No database: a clear error, and none made. */
    cr_assert_neq(train_dataset_add_reviews(&d, tmp, NULL, 0, &added, err, sizeof err), 0);
    cr_assert(strstr(err, "holds no index of the node's"), "%s", err);
    snprintf(dbp, sizeof dbp, "%s/ichtriage.db", tmp);
    cr_assert_neq(access(dbp, F_OK), 0);
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
    cr_assert_eq(system(cmd), 0);
}

/* mtime of path in nanoseconds, or -1. */
static long long mtime_ns(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0) return -1;
    return (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
}

/* Loads dir into a fresh dataset of 3x32x32 slices (head-cropped or not)
 * with its cache in cache_dir. */
static void load_as(struct train_dataset *d, const char *dir, const char *cache_dir, bool crop)
{
    struct triage_windows w;
    triage_windows_default(&w);
    train_dataset_init(d, &w, 3, 32, 32);
    d->crop_head = crop;
    char err[512];
    cr_assert_eq(train_dataset_add_folder(d, dir, cache_dir, err, sizeof err), 0, "%s", err);
}

static void load(struct train_dataset *d, const char *dir, const char *cache_dir)
{
    load_as(d, dir, cache_dir, false);
}

Test(cache, the_same_folder_by_another_path_keeps_its_cache, .timeout = 120, .fini = scratch_fini)
{
    char tmp[] = "/tmp/ichtriage-cache-XXXXXX";
    scratch(tmp);
    char ph[300], link[300], cache[300], cmd[400];
    snprintf(ph, sizeof ph, "%s/ph", tmp);
    snprintf(link, sizeof link, "%s/link", tmp);
    snprintf(cache, sizeof cache, "%s/cache", tmp);
    small_phantoms(ph, 7, 2);
    cr_assert_eq(mkdir(cache, 0755), 0);
    cr_assert_eq(symlink(ph, link), 0);

    struct train_dataset a, b;
    load(&a, ph, cache);
    snprintf(cmd, sizeof cmd, "ls %s/*.cache", cache);
    FILE *ls = popen(cmd, "r");
    char cfile[600] = "";
    cr_assert(fgets(cfile, sizeof cfile, ls), "no cache file written in %s", cache);
    pclose(ls);
    cfile[strcspn(cfile, "\n")] = 0;
    long long t0 = mtime_ns(cfile);
    cr_assert_gt(t0, 0);
    usleep(20000);
    /* Through the symbolic link: read from the cache, not decoded and
     * written again, and the same slices. */
    load(&b, link, cache);
    cr_assert_eq(mtime_ns(cfile), t0, "the cache was rewritten for the same folder");
    cr_assert_eq(a.nslices, b.nslices);
    for (size_t i = 0; i < a.nslices; i++)
        cr_assert_eq(memcmp(train_dataset_pixels(&a, i), train_dataset_pixels(&b, i), 3 * 32 * 32),
                     0, "slice %zu", i);
    /* Both the run that wrote the cache and the one that found it use the
     * file, mapped, not a copy in memory. */
    cr_assert_eq(a.nruns, 1);
    cr_assert_eq(b.nruns, 1);
    cr_assert(a.runs[0].map && b.runs[0].map);
    train_dataset_free(&b);
    /* A file that changed invalidates it. */
    snprintf(cmd, sizeof cmd, "touch -d '2001-01-01' \"$(ls %s/stage_2_train/*.dcm | head -1)\"",
             ph);
    cr_assert_eq(system(cmd), 0);
    load(&b, link, cache);
    cr_assert_neq(mtime_ns(cfile), t0, "a changed file did not invalidate the cache");
    /* The new cache replaced the file a has mapped: a keeps reading the old
     * one (same pixels: only a date changed). */
    for (size_t i = 0; i < a.nslices; i++)
        cr_assert_eq(memcmp(train_dataset_pixels(&a, i), train_dataset_pixels(&b, i), 3 * 32 * 32),
                     0, "slice %zu", i);
    train_dataset_free(&a);
    train_dataset_free(&b);
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
    cr_assert_eq(system(cmd), 0);
}

/* A fresh folder from tmp (a mkdtemp template) with 2 small phantom studies
 * (12 slices) in tmp/ph. */
static void two_studies(char *tmp, char *ph, size_t n)
{
    scratch(tmp);
    snprintf(ph, n, "%s/ph", tmp);
    small_phantoms(ph, 7, 2);
}

static void rm_rf(const char *dir)
{
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}

/* The name of the one cache file in dir ("" when none). */
static void cache_file(const char *dir, char *out, size_t n)
{
    char cmd[400];
    snprintf(cmd, sizeof cmd, "ls %s/*.cache 2>/dev/null", dir);
    FILE *ls = popen(cmd, "r");
    if (!fgets(out, (int)n, ls)) out[0] = 0;
    pclose(ls);
    out[strcspn(out, "\n")] = 0;
}

/* The cache is written as the slices are decoded (so that a folder larger
 * than memory can be); when the disk fills part way, the folder is decoded
 * into memory instead, with the same result, and no part of a file stays. */
Test(cache, a_cache_that_cannot_be_written_whole_falls_back_to_memory, .timeout = 120,
     .fini = scratch_fini)
{
    char tmp[] = "/tmp/ichtriage-cache-XXXXXX", ph[300], c1[300], c2[300], cmd[400];
    two_studies(tmp, ph, sizeof ph); /* 12 slices of 3 KiB */
    snprintf(c1, sizeof c1, "%s/c1", tmp);
    snprintf(c2, sizeof c2, "%s/c2", tmp);
    cr_assert_eq(mkdir(c1, 0755), 0);
    cr_assert_eq(mkdir(c2, 0755), 0);
    struct train_dataset a, b;
    load(&a, ph, c1);
    cr_assert(a.nruns == 1 && a.runs[0].map);
    /* Files may grow to 16 KiB only: the cache stops after a few slices. */
    signal(SIGXFSZ, SIG_IGN);
    struct rlimit old, lim = {16384, 16384};
    cr_assert_eq(getrlimit(RLIMIT_FSIZE, &old), 0);
    lim.rlim_max = old.rlim_max;
    cr_assert_eq(setrlimit(RLIMIT_FSIZE, &lim), 0);
    load(&b, ph, c2);
    cr_assert_eq(setrlimit(RLIMIT_FSIZE, &old), 0);
    cr_assert(b.nruns == 1 && !b.runs[0].map, "the slices are not in memory");
    same_slices(&a, &b);
    snprintf(cmd, sizeof cmd, "test -z \"$(ls -A %s)\"", c2);
    cr_assert_eq(system(cmd), 0, "something was left in %s", c2);
    train_dataset_free(&a);
    train_dataset_free(&b);
    rm_rf(tmp);
}

/* Two runs decoding the same folder at once: one writes the cache, the
 * other decodes into memory rather than write the same file. */
Test(cache, a_cache_another_run_is_writing_is_left_to_it, .timeout = 120, .fini = scratch_fini)
{
    char tmp[] = "/tmp/ichtriage-cache-XXXXXX", ph[300], cache[300], cfile[600], part[620];
    two_studies(tmp, ph, sizeof ph);
    snprintf(cache, sizeof cache, "%s/cache", tmp);
    cr_assert_eq(mkdir(cache, 0755), 0);
    struct train_dataset a, b;
    load(&a, ph, cache);
    cache_file(cache, cfile, sizeof cfile);
    cr_assert_str_not_empty(cfile);
    cr_assert_eq(unlink(cfile), 0);
    /* "Another run" holds the file being written. */
    snprintf(part, sizeof part, "%s.tmp", cfile);
    int fd = open(part, O_RDWR | O_CREAT, 0644);
    cr_assert_geq(fd, 0);
    cr_assert_eq(flock(fd, LOCK_EX), 0);
    load(&b, ph, cache);
    cr_assert(b.nruns == 1 && !b.runs[0].map, "the slices are not in memory");
    same_slices(&a, &b);
    cr_assert_eq(access(cfile, F_OK), -1, "a cache was written beside the other run");
    struct stat st;
    cr_assert_eq(fstat(fd, &st), 0);
    cr_assert_eq(st.st_size, 0, "the other run's file was written to");
    train_dataset_free(&b);
    close(fd);
    /* Once it is gone, the cache is written (over its leftover) and used. */
    load(&b, ph, cache);
    cr_assert(b.nruns == 1 && b.runs[0].map);
    cr_assert_eq(access(cfile, F_OK), 0);
    cr_assert_eq(access(part, F_OK), -1);
    same_slices(&a, &b);
    train_dataset_free(&a);
    train_dataset_free(&b);
    rm_rf(tmp);
}

/* The size of path, -1 when there is none. */
static long long file_size(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? (long long)st.st_size : -1;
}

/* Decodes folder ph with its cache in dir in a child process, recording
 * its progress after every series, and kills it once the progress file
 * (prog) records two series. The head of that file is 40 bytes, each
 * record 240 bytes and the labels of its 6 slices. */
static void killed_decode(const char *ph, const char *dir, const char *prog)
{
    long long two = 40 + 2 * (240 + 6 * TRAIN_LABELS);
    int status = 0;
    /* On a busy machine the decode may end before this process looks:
     * then again, from nothing. */
    for (int tries = 0; tries < 5; tries++) {
        char cmd[400];
        snprintf(cmd, sizeof cmd, "rm -rf %s/* %s/.[!.]*", dir, dir);
        cr_assert_eq(system(cmd), 0);
        pid_t pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
            struct train_dataset d;
            struct triage_windows w;
            char err[512];
            triage_windows_default(&w);
            train_dataset_init(&d, &w, 3, 32, 32);
            d.cache_sync_ms = 0; /* a record after every series */
            _exit(train_dataset_add_folder(&d, ph, dir, err, sizeof err) == 0 ? 0 : 1);
        }
        for (int i = 0; i < 20000 && file_size(prog) < two; i++)
            usleep(500);
        kill(pid, SIGKILL);
        cr_assert_eq(waitpid(pid, &status, 0), pid);
        if (WIFSIGNALED(status)) break;
    }
    cr_assert(WIFSIGNALED(status), "the decode ended before it was killed, 5 times (status %d)",
              status);
    cr_assert_geq(file_size(prog), two, "fewer than two series recorded before the kill");
}

/* stderr of f(arg) into log (n bytes) through the file logp. */
static int logged(int (*f)(void *), void *arg, const char *logp, char *log, size_t n)
{
    fflush(stderr);
    int saved = dup(2), lf = open(logp, O_RDWR | O_CREAT | O_TRUNC, 0644);
    cr_assert(saved >= 0 && lf >= 0);
    dup2(lf, 2);
    int rc = f(arg);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    ssize_t k = pread(lf, log, n - 1, 0);
    log[k > 0 ? k : 0] = 0;
    close(lf);
    return rc;
}

struct calibrate_args {
    nn_model *m;
    struct train_dataset *d;
    float thr[2][TRAIN_LABELS];
    struct train_reliability rel;
    char t[256], err[256];
};

static int calibrate_call(void *v)
{
    struct calibrate_args *a = v;
    return train_calibrate(a->m, NULL, a->d, NULL, 0.95, a->thr, &a->rel, NULL, a->t, sizeof a->t,
                           a->err, sizeof a->err);
}

/* A temperature that the fit pushes to an end of [0.05, 20] is said: the
 * untrained model's scores tell nothing of its 4 positive studies in 8,
 * and the fit flattens them as far as it may (the shipped model's CNN has
 * such a temperature, 20.0000, for subarachnoid, which went unremarked). */
Test(calibrate, a_temperature_at_its_bound_is_logged, .fini = scratch_fini)
{
    char tmp[] = "/tmp/ichtriage-bound-XXXXXX", logp[300], log[4096];
    scratch(tmp);
    snprintf(logp, sizeof logp, "%s/log", tmp);
    struct train_dataset d;
    validation_studies(&d, 4, 9);
    struct calibrate_args a = {.m = tiny_model(), .d = &d};
    cr_assert_eq(logged(calibrate_call, &a, logp, log, sizeof log), 0, "%s", a.err);
    cr_assert_float_eq(a.rel.temperature[0], 20.0f, 1e-2);
    cr_assert(strstr(log, "level=warn event=train_temperature_at_bound model=lrcn label=any "
                          "temperature=20.0000 bound=20 studies=8 positive=4"),
              "%s", log);
    cr_assert(!strstr(log, "label=epidural"), "an unfitted label keeps 1, no bound: %s", log);
    train_dataset_free(&d);
    nn_model_free(a.m);
}

struct add_folder_args {
    struct train_dataset *d;
    const char *dir, *cache;
    char err[512];
};

static int add_folder_call(void *v)
{
    struct add_folder_args *a = v;
    return train_dataset_add_folder(a->d, a->dir, a->cache, a->err, sizeof a->err);
}

/* load() with what it logs in *log (n bytes). */
static void load_logged(struct train_dataset *d, const char *ph, const char *dir, const char *logp,
                        char *log, size_t n)
{
    struct triage_windows w;
    triage_windows_default(&w);
    train_dataset_init(d, &w, 3, 32, 32);
    struct add_folder_args a = {.d = d, .dir = ph, .cache = dir};
    cr_assert_eq(logged(add_folder_call, &a, logp, log, n), 0, "%s", a.err);
}

/* A decode that is killed part way (an RSNA folder takes about an hour) goes
 * on where it stopped: the next run takes the series the killed one had
 * recorded, as far as the file really holds them, decodes the rest, and
 * ends with what a decode from nothing gives. */
Test(cache, a_killed_decode_resumes_where_it_stopped, .timeout = 120, .fini = scratch_fini)
{
    char tmp[] = "/tmp/ichtriage-cache-XXXXXX", ph[300], c1[300], c2[300], cfile[600];
    char part[620], prog[640], recs[640], logp[320], log[8192];
    scratch(tmp);
    snprintf(ph, sizeof ph, "%s/ph", tmp);
    snprintf(c1, sizeof c1, "%s/c1", tmp);
    snprintf(c2, sizeof c2, "%s/c2", tmp);
    snprintf(logp, sizeof logp, "%s/log", tmp);
    phantoms(ph, 21, 40, 64); /* 40 series of 6 slices */
    cr_assert_eq(mkdir(c1, 0755), 0);
    cr_assert_eq(mkdir(c2, 0755), 0);
    struct train_dataset fresh, d;
    load(&fresh, ph, c2);
    cache_file(c2, cfile, sizeof cfile);
    cr_assert_str_not_empty(cfile);
    /* The same name in c1 (the key holds the folder, not where the cache is). */
    snprintf(part, sizeof part, "%s/%s.tmp", c1, strrchr(cfile, '/') + 1);
    snprintf(prog, sizeof prog, "%s.progress", part);
    snprintf(recs, sizeof recs, "%s.recs", part);
    killed_decode(ph, c1, prog);
    cr_assert_gt(file_size(recs), 0, "the killed run left no file records");
    /* The pixel file holds one whole series and a part of the next (as
     * after a crash that lost what was not yet on disk): only the first of
     * the series recorded may be taken. 4096: the file's head. */
    size_t series_bytes = 6 * 3 * 32 * 32;
    cr_assert_geq(file_size(part), 4096 + 2 * (long long)series_bytes);
    cr_assert_eq(truncate(part, 4096 + series_bytes + 1000), 0);

    load_logged(&d, ph, c1, logp, log, sizeof log);
    cr_assert(strstr(log, "event=train_cache_resumed") && strstr(log, " series=1 slices=6 "),
              "the run did not go on from the first series: %s", log);
    /* the headers were not read again: the records of the killed run */
    cr_assert(strstr(log, "event=train_headers_recorded") && strstr(log, " files=240 labelled=240"),
              "%s", log);
    same_slices(&fresh, &d);
    for (int s = 0; s < d.nseries; s++) {
        cr_assert_str_eq(d.series[s].series_uid, fresh.series[s].series_uid);
        cr_assert_eq(d.series[s].first, fresh.series[s].first);
        cr_assert_eq(memcmp(d.series[s].study, fresh.series[s].study, TRAIN_LABELS), 0);
    }
    cr_assert(d.nruns == 1 && d.runs[0].map, "the resumed cache is not the mapped file");
    cr_assert_eq(file_size(part), -1, "the .tmp was left");
    cr_assert_eq(file_size(prog), -1, "the progress file was left");
    cr_assert_eq(file_size(recs), -1, "the file records were left");
    strcat(recs, ".new");
    cr_assert_eq(file_size(recs), -1, "the file records being written were left");
    recs[strlen(recs) - 4] = '\0';
    train_dataset_free(&d);
    /* The cache is whole: the next run reads it and decodes nothing. */
    load_logged(&d, ph, c1, logp, log, sizeof log);
    cr_assert(strstr(log, "event=train_data_cached"), "%s", log);
    same_slices(&fresh, &d);
    train_dataset_free(&d);

    /* Killed again, and then one file changes: what was recorded is for
     * other files, and the folder is decoded from nothing. */
    rm_rf(c1);
    cr_assert_eq(mkdir(c1, 0755), 0);
    killed_decode(ph, c1, prog);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "touch -d '2001-01-01' \"$(ls %s/stage_2_train/*.dcm | tail -1)\"",
             ph);
    cr_assert_eq(system(cmd), 0);
    load_logged(&d, ph, c1, logp, log, sizeof log);
    cr_assert(!strstr(log, "event=train_cache_resumed") &&
                  !strstr(log, "event=train_headers_recorded") &&
                  strstr(log, "event=train_data_decoded"),
              "%s", log);
    same_slices(&fresh, &d);
    cr_assert_eq(file_size(prog), -1, "the progress file was left");
    train_dataset_free(&d);
    train_dataset_free(&fresh);
    rm_rf(tmp);
}

struct features_args {
    nn_model *m;
    struct train_dataset *d;
    float *feat;
};

static int features_call(void *v)
{
    struct features_args *a = v;
    return train_features(a->m, a->d, -1, a->feat);
}

/* Long passes show their progress: on a terminal a line redrawn in place,
 * otherwise a log line every progress_every_s seconds (here: every step):
 * decoding a folder (reading headers, then decoding) and computing
 * features. */
Test(cache, long_passes_log_their_progress, .timeout = 120, .fini = scratch_fini)
{
    char tmp[] = "/tmp/ichtriage-cache-XXXXXX", ph[300], cache[300], logp[320], log[16384];
    char want[400], err[512];
    two_studies(tmp, ph, sizeof ph); /* 2 series of 6 files */
    snprintf(cache, sizeof cache, "%s/cache", tmp);
    snprintf(logp, sizeof logp, "%s/log", tmp);
    cr_assert_eq(mkdir(cache, 0755), 0);
    struct train_dataset d;
    struct triage_windows w;
    triage_windows_default(&w);
    train_dataset_init(&d, &w, 3, 32, 32);
    cr_assert_eq(d.progress_every_s, 60);
    d.progress_every_s = 0;
    struct add_folder_args fa = {.d = &d, .dir = ph, .cache = cache};
    cr_assert_eq(logged(add_folder_call, &fa, logp, log, sizeof log), 0, "%s", fa.err);
    for (int i = 1; i < 12; i++) {
        snprintf(want, sizeof want,
                 "event=train_decode_progress dir=%s stage=headers done=%d total=12 unit=files ",
                 ph, i);
        cr_assert(strstr(log, want), "no \"%s\" in %s", want, log);
    }
    snprintf(want, sizeof want,
             "event=train_decode_progress dir=%s stage=slices done=6 total=12 unit=files ", ph);
    cr_assert(strstr(log, want), "no \"%s\" in %s", want, log);
    cr_assert(!strstr(log, "done=12 total=12"), "the end logged as progress: %s", log);

    nn_config c;
    nn_config_default(&c);
    c.arch = "b4,M,b8,G|d12,D0.5";
    c.in_c = 3, c.in_h = c.in_w = 32;
    nn_model *m = nn_model_create(&c, err, sizeof err);
    cr_assert(m, "%s", err);
    struct features_args ea = {m, &d, malloc(d.nslices * (size_t)nn_model_feature_size(m) * 4)};
    cr_assert_eq(logged(features_call, &ea, logp, log, sizeof log), 0);
    cr_assert(strstr(log, "event=train_features_progress split=all done=6 total=12 unit=slices "),
              "%s", log);
    cr_assert(!strstr(log, "done=12 total=12"), "the end logged as progress: %s", log);
    free(ea.feat);
    nn_model_free(m);
    train_dataset_free(&d);
    rm_rf(tmp);
}

/* The series' files of one series UID among the .dcm files of dir/stage_2_train. */
static int series_files(const char *dir, const char *series_uid, char **paths, int max)
{
    char cmd[400], line[1024], err[256];
    snprintf(cmd, sizeof cmd, "ls %s/stage_2_train/*.dcm", dir);
    FILE *ls = popen(cmd, "r");
    int n = 0;
    while (n < max && fgets(line, sizeof line, ls)) {
        line[strcspn(line, "\n")] = 0;
        struct scp_info info;
        cr_assert_eq(scp_info_read(line, &info, err, sizeof err), 0, "%s", err);
        if (strcmp(info.series_uid, series_uid) == 0) paths[n++] = strdup(line);
    }
    pclose(ls);
    return n;
}

Test(crop, training_slices_are_the_nodes_and_the_head_fills_more, .timeout = 120,
     .fini = scratch_fini)
{
    char tmp[] = "/tmp/ichtriage-crop-XXXXXX", ph[300], cache[300], cmd[400], err[512];
    scratch(tmp);
    snprintf(ph, sizeof ph, "%s/ph", tmp);
    snprintf(cache, sizeof cache, "%s/cache", tmp);
    phantoms(ph, 9, 3, 128); /* 128 pixels: the head is 80-90% of the image */
    cr_assert_eq(mkdir(cache, 0755), 0);
    struct train_dataset plain, crop;
    load_as(&plain, ph, cache, false);
    load_as(&crop, ph, cache, true);
    struct triage_windows w = crop.windows;
    /* Two caches: the crop is part of the key. */
    snprintf(cmd, sizeof cmd, "test $(ls %s/*.cache | wc -l) -eq 2", cache);
    cr_assert_eq(system(cmd), 0, "the cropped slices did not get a cache of their own");
    cr_assert_eq(plain.nslices, crop.nslices);
    size_t per = 3 * 32 * 32;
    for (int s = 0; s < crop.nseries; s++) {
        const struct train_series *se = &crop.series[s];
        char *paths[64];
        int n = series_files(ph, se->series_uid, paths, 64);
        struct triage_volume v;
        cr_assert_eq(triage_volume_build((const char *const *)paths, n, &v, err, sizeof err), 0,
                     "%s", err);
        cr_assert_eq(v.n, se->n);
        float *x = malloc(sizeof(float) * per * (size_t)v.n);
        cr_assert_eq(triage_preprocess_volume(&v, (const char *const *)paths, NULL, &w, true, 32,
                                              32, x, NULL, err, sizeof err),
                     0, "%s", err);
        /* What training learns from is what the node would feed the model. */
        for (size_t k = 0; k < per * (size_t)v.n; k++)
            cr_assert_eq(train_dataset_pixels(&crop, se->first)[k], (uint8_t)lrintf(x[k] * 255.0f),
                         "series %d, value %zu", s, k);
        /* The head (bone window above 0) covers more of the cropped input. */
        size_t head_plain = 0, head_crop = 0;
        for (int i = 0; i < v.n; i++)
            for (int p = 0; p < 32 * 32; p++) {
                head_plain +=
                    train_dataset_pixels(&plain, se->first + (size_t)i)[2 * 32 * 32 + p] > 0;
                head_crop +=
                    train_dataset_pixels(&crop, se->first + (size_t)i)[2 * 32 * 32 + p] > 0;
            }
        cr_assert_gt(head_crop, head_plain * 21 / 20, "series %d: %zu head pixels cropped, %zu not",
                     s, head_crop, head_plain);
        free(x);
        triage_volume_free(&v);
        for (int i = 0; i < n; i++)
            free(paths[i]);
    }
    train_dataset_free(&plain);
    train_dataset_free(&crop);
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
    cr_assert_eq(system(cmd), 0);
}

/* A model with context on the node: triage_predict_volume (which stacks the
 * neighbours a chunk at a time and runs the BiLSTM over the features) gives
 * what nn_lrcn_predict gives on the whole series stacked at once; a model
 * whose input channels do not match its windows and context is refused. */
Test(context, the_node_runs_a_context_model_on_a_series, .timeout = 120, .fini = scratch_fini)
{
    char tmp[] = "/tmp/ichtriage-context-XXXXXX", ph[300], path[300], cmd[400], err[512];
    scratch(tmp);
    snprintf(ph, sizeof ph, "%s/ph", tmp);
    snprintf(path, sizeof path, "%s/model.safetensors", tmp);
    struct train_phantom_opts o;
    train_phantom_opts_default(&o);
    o.outdir = ph, o.seed = 12, o.count = 1, o.size = 64;
    o.slices_min = o.slices_max = 21; /* more than one chunk of the node's (16) */
    cr_assert_eq(train_phantom_run(&o, err, sizeof err), 0, "%s", err);
    nn_model *m = model_of("b4,M,b8,G|d12,D0.5", 9, 32);
    nn_model_meta_set(m, "windows", "40/80,80/200,600/2800");
    nn_model_meta_set(m, "labels",
                      "any,epidural,intraparenchymal,intraventricular,subarachnoid,subdural");
    nn_model_meta_set(m, "thresholds", "0.5,0.5,0.5,0.5,0.5,0.5");
    nn_model_meta_set(m, "context", "1");
    /* Weights large enough that the output follows the input closely (a
     * freshly initialised LRCN gives about 0.5 whatever it sees). */
    for (int i = 0; i < nn_model_tensor_count(m); i++) {
        nn_tensor_info t;
        nn_model_tensor(m, i, &t);
        if (t.ndim < 2) continue;
        for (size_t k = 0; k < t.numel; k++)
            t.data[k] *= 4;
    }
    cr_assert_eq(nn_model_save(m, path, err, sizeof err), 0, "%s", err);

    struct triage_model tm;
    cr_assert_eq(triage_model_load(&tm, path, err, sizeof err), 0, "%s", err);
    cr_assert_eq(tm.context, 1);
    cr_assert_eq(tm.in_c, 9);
    char *paths[128];
    snprintf(cmd, sizeof cmd, "ls %s/stage_2_train/*.dcm", ph);
    FILE *ls = popen(cmd, "r");
    int n = 0;
    char line[1024];
    while (n < 128 && fgets(line, sizeof line, ls)) {
        line[strcspn(line, "\n")] = 0;
        paths[n++] = strdup(line);
    }
    pclose(ls);
    struct triage_volume v;
    cr_assert_eq(triage_volume_build((const char *const *)paths, n, &v, err, sizeof err), 0, "%s",
                 err);
    cr_assert_eq(v.n, 21);
    struct triage_result r;
    cr_assert_eq(
        triage_predict_volume(&tm, &v, (const char *const *)paths, NULL, &r, err, sizeof err), 0,
        "%s", err);
    size_t per = 3 * 32 * 32;
    float *x = malloc(sizeof(float) * per * (size_t)v.n);
    float *xs = malloc(sizeof(float) * 3 * per * (size_t)v.n);
    float *p = malloc(sizeof(float) * 6 * (size_t)v.n);
    cr_assert_eq(triage_preprocess_volume(&v, (const char *const *)paths, NULL, &tm.windows, false,
                                          32, 32, x, NULL, err, sizeof err),
                 0, "%s", err);
    triage_context_stack(x, v.n, per, 1, 0, v.n, xs);
    int len = v.n;
    cr_assert_eq(nn_lrcn_predict(m, xs, &len, 1, p), 0);
    for (int i = 0; i < v.n * 6; i++)
        cr_assert_float_eq(r.probs[i], p[i], 1e-5, "slice %d, label %d", i / 6, i % 6);
    triage_result_free(&r);
    triage_model_free(&tm);

    /* Three windows of three slices need nine channels. */
    nn_model_meta_set(m, "context", "2");
    cr_assert_eq(nn_model_save(m, path, err, sizeof err), 0, "%s", err);
    cr_assert_eq(triage_model_load(&tm, path, err, sizeof err), -1);
    cr_assert(strstr(err, "3 windows of 5 slices for 9 input channels"), "%s", err);
    nn_model_meta_set(m, "context", "many");
    cr_assert_eq(nn_model_save(m, path, err, sizeof err), 0, "%s", err);
    cr_assert_eq(triage_model_load(&tm, path, err, sizeof err), -1);
    cr_assert(strstr(err, "context"), "%s", err);

    free(x), free(xs), free(p);
    triage_volume_free(&v);
    for (int i = 0; i < n; i++)
        free(paths[i]);
    nn_model_free(m);
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
    cr_assert_eq(system(cmd), 0);
}

/* ---- blood masks and the localisation loss (--loc-loss) ---- */

#include "loc.h"

/* masks/<image>.png of a phantom folder (size x size), or NULL: no file. */
static uint8_t *mask_png(const char *ph, const char *sop, int size)
{
    char path[700], err[800];
    snprintf(path, sizeof path, "%s/masks/ID_%s.png", ph, sop);
    if (access(path, F_OK) != 0) return NULL;
    uint8_t *m = malloc((size_t)size * size);
    cr_assert_eq(train_mask_read(path, size, size, m, err, sizeof err), 0, "%s", err);
    return m;
}

/* Phantom studies with masks, all positive, 8 slices of 64x64, in ph; o is
 * left as it made them. */
static void masked_phantom(struct train_phantom_opts *o, const char *ph, uint64_t seed, int count)
{
    char err[512];
    train_phantom_opts_default(o);
    o->outdir = ph, o->seed = seed, o->count = count, o->size = 64, o->prevalence = 1;
    o->slices_min = o->slices_max = 8;
    o->masks = true;
    cr_assert_eq(train_phantom_run(o, err, sizeof err), 0, "%s", err);
}

static void load_masks(struct train_dataset *d, const char *dir, const char *cache, int hw,
                       bool crop, bool masks)
{
    struct triage_windows w;
    triage_windows_default(&w);
    train_dataset_init(d, &w, 3, hw, hw);
    d->crop_head = crop;
    d->masks = masks;
    char err[512];
    cr_assert_eq(train_dataset_add_folder(d, dir, cache, err, sizeof err), 0, "%s", err);
}

Test(masks, follow_the_blood_into_the_input_frame, .timeout = 120, .fini = scratch_fini)
{
    char tmp[] = "/tmp/ichtriage-masks-XXXXXX", ph[300], bare[300], cache[300];
    scratch(tmp);
    snprintf(ph, sizeof ph, "%s/ph", tmp);
    snprintf(bare, sizeof bare, "%s/bare", tmp);
    snprintf(cache, sizeof cache, "%s/cache", tmp);
    cr_assert_eq(mkdir(cache, 0755), 0);
    char err[512];
    struct train_phantom_opts o;
    masked_phantom(&o, ph, 21, 4);
    o.outdir = bare, o.masks = false;
    cr_assert_eq(train_phantom_run(&o, err, sizeof err), 0, "%s", err);

    /* Input = image, no crop: each mask cell is exactly the OR of the 4x4
     * pixels of the file it covers. */
    struct train_dataset a, plain, crop, none;
    load_masks(&a, ph, cache, 64, false, true);
    load_masks(&plain, ph, cache, 64, false, false);
    cr_assert_eq(train_dataset_mask_size(&a), 16 * 16);
    cr_assert_eq(train_dataset_mask_size(&plain), 0);
    int positive_slices = 0, subtypes = 0;
    for (int s = 0; s < a.nseries; s++) {
        const struct train_series *se = &a.series[s];
        char *paths[64];
        int np = series_files(ph, se->series_uid, paths, 64);
        struct triage_volume v;
        cr_assert_eq(triage_volume_build((const char *const *)paths, np, &v, err, sizeof err), 0);
        cr_assert_eq(v.n, se->n);
        for (int k = 0; k < se->n; k++) {
            size_t i = se->first + (size_t)k;
            /* the pixels are those of a dataset without masks */
            cr_assert_eq(
                memcmp(train_dataset_pixels(&a, i), train_dataset_pixels(&plain, i), 3 * 64 * 64),
                0, "slice %zu: pixels moved with the masks", i);
            cr_assert_null(train_dataset_mask(&plain, i));
            const uint8_t *m = train_dataset_mask(&a, i);
            cr_assert_not_null(m, "slice %zu: the folder has masks", i);
            uint8_t *src = mask_png(ph, v.slices[k].sop_uid, 64);
            cr_assert_eq(src != NULL, a.labels[i * TRAIN_LABELS] == 1);
            uint8_t all = 0;
            for (int cy = 0; cy < 16; cy++)
                for (int cx = 0; cx < 16; cx++) {
                    uint8_t want = 0;
                    for (int y = 4 * cy; src && y < 4 * cy + 4; y++)
                        for (int x = 4 * cx; x < 4 * cx + 4; x++)
                            want |= src[y * 64 + x];
                    cr_assert_eq(m[cy * 16 + cx], want, "slice %zu cell %d,%d", i, cy, cx);
                    all |= want;
                }
            for (int l = 1; l < TRAIN_LABELS; l++)
                cr_assert_eq(all >> (l - 1) & 1, a.labels[i * TRAIN_LABELS + l],
                             "slice %zu: mask bit of %s against its label", i,
                             train_label_names[l]);
            positive_slices += a.labels[i * TRAIN_LABELS] == 1;
            subtypes |= all;
            free(src);
        }
        for (int k = 0; k < np; k++)
            free(paths[k]);
        triage_volume_free(&v);
    }
    cr_assert_gt(positive_slices, 4);
    cr_assert_geq(__builtin_popcount((unsigned)subtypes), 3, "subtypes seen: %x", subtypes);

    /* Cropped and resized: a mask bit on exactly the slices its label has,
     * and the cache of the masked slices is another file than the plain one. */
    load_masks(&crop, ph, cache, 32, true, true);
    for (size_t i = 0; i < crop.nslices; i++) {
        const uint8_t *m = train_dataset_mask(&crop, i);
        cr_assert_not_null(m);
        uint8_t all = 0;
        for (size_t q = 0; q < train_dataset_mask_size(&crop); q++)
            all |= m[q];
        for (int l = 1; l < TRAIN_LABELS; l++)
            cr_assert_eq(all >> (l - 1) & 1, crop.labels[i * TRAIN_LABELS + l], "slice %zu", i);
    }
    /* A folder without masks/: not known, and nothing to learn from. */
    load_masks(&none, bare, cache, 32, true, true);
    for (size_t i = 0; i < none.nslices; i++)
        cr_assert_null(train_dataset_mask(&none, i));
    /* From the caches again: the same masks */
    struct train_dataset again;
    load_masks(&again, ph, cache, 32, true, true);
    for (size_t i = 0; i < crop.nslices; i++)
        cr_assert_eq(memcmp(train_dataset_pixels(&again, i), train_dataset_pixels(&crop, i),
                            3 * 32 * 32 + 8 * 8),
                     0);
    train_dataset_free(&again);

    /* A mask that is not one (not a PNG; a PNG of another size): the folder
     * is refused with the file's name, and the dataset keeps nothing of it. */
    char bad[700], cmd[1600];
    snprintf(cmd, sizeof cmd, "ls %s/masks | head -1", ph);
    FILE *ls = popen(cmd, "r");
    char first[400] = "";
    cr_assert_not_null(fgets(first, sizeof first, ls));
    pclose(ls);
    first[strcspn(first, "\n")] = 0;
    snprintf(bad, sizeof bad, "%s/masks/%s", ph, first);
    struct train_phantom_opts q = o; /* masks of 128x128 pixels, for the second round */
    char small[300];
    snprintf(small, sizeof small, "%s/small", tmp);
    q.outdir = small, q.size = 128, q.count = 1, q.masks = true;
    cr_assert_eq(train_phantom_run(&q, err, sizeof err), 0, "%s", err);
    for (int round = 0; round < 2; round++) {
        if (round == 0) {
            FILE *f = fopen(bad, "wb");
            cr_assert_not_null(f);
            fputs("not a png", f);
            fclose(f);
        } else {
            snprintf(cmd, sizeof cmd, "cp \"$(ls -d %s/masks/* | head -1)\" '%s'", small, bad);
            cr_assert_eq(system(cmd), 0);
        }
        /* a cache of its own, so that the folder is decoded again */
        char c2[320];
        snprintf(c2, sizeof c2, "%s/cache%d", tmp, round);
        cr_assert_eq(mkdir(c2, 0755), 0);
        struct train_dataset b;
        struct triage_windows w;
        triage_windows_default(&w);
        train_dataset_init(&b, &w, 3, 32, 32);
        b.crop_head = true, b.masks = true;
        cr_assert_eq(train_dataset_add_folder(&b, ph, c2, err, sizeof err), -1,
                     "round %d: a bad mask was accepted", round);
        cr_assert(strstr(err, first) != NULL, "round %d: the message names the file: %s", round,
                  err);
        cr_assert(strstr(err, round ? "64x64" : "PNG"),
                  "round %d: the message says what is wrong: %s", round, err);
        cr_assert_eq(b.nslices, 0);
        cr_assert_eq(b.nseries, 0);
        /* what a next run resumes from stays (the headers read) */
        snprintf(cmd, sizeof cmd, "test -s \"$(ls %s/*.cache.tmp.recs)\"", c2);
        cr_assert_eq(system(cmd), 0, "round %d: the file records were deleted", round);
        train_dataset_free(&b);
    }
    train_dataset_free(&a), train_dataset_free(&plain), train_dataset_free(&crop),
        train_dataset_free(&none);
    rm_rf(tmp);
}

/* The targets move with the pixels: a bright 4x4 block and its mask cell,
 * under no change, a flip, and random draws. */
Test(augment, cells_follow_the_pixels)
{
    enum { H = 64, G = 8 };
    uint8_t img[3 * H * H] = {0}, mask[(H / 4) * (H / 4)] = {0}, cells[G * G];
    int by = 24, bx = 44; /* the block's corner, on the mask's 4-pixel cells */
    for (int y = by; y < by + 4; y++)
        for (int x = bx; x < bx + 4; x++)
            img[y * H + x] = 255;
    mask[(by / 4) * (H / 4) + bx / 4] = 1u << 3;
    struct train_augment aug;
    train_augment_default(&aug);
    aug.gain = aug.offset = 0;
    float out[3 * H * H];
    uint64_t rng = 5;
    for (int round = 0; round < 12; round++) {
        struct train_affine t;
        if (round == 0)
            train_augment_none(&t);
        else
            train_augment_draw(&aug, 3, H, H, &rng, &t);
        if (round == 1) t.flip = 1, t.dx = t.dy = 0, t.cs = 1, t.sn = 0;
        train_augment_apply(&aug, &t, img, 3, H, H, out);
        train_augment_cells(&t, mask, H, H, cells, G, G);
        /* every grid cell where the block is clearly seen is a target, and
         * no target lies far from it */
        uint8_t seen[G * G] = {0};
        for (int y = 0; y < H; y++)
            for (int x = 0; x < H; x++)
                if (out[y * H + x] > 0.75f) seen[(y * G / H) * G + x * G / H] = 1;
        int nseen = 0;
        for (int c = 0; c < G * G; c++) {
            nseen += seen[c];
            if (seen[c]) cr_assert_eq(cells[c], 1u << 3, "round %d cell %d", round, c);
            if (cells[c]) {
                int cy = c / G, cx = c % G, near = 0;
                for (int dy = -1; dy <= 1; dy++)
                    for (int dx = -1; dx <= 1; dx++) {
                        int yy = cy + dy, xx = cx + dx;
                        near |= yy >= 0 && xx >= 0 && yy < G && xx < G && seen[yy * G + xx];
                    }
                cr_assert(near, "round %d: a target at cell %d, the block elsewhere", round, c);
            }
        }
        cr_assert_gt(nseen, 0, "round %d: the block left the image", round);
        if (round == 1) cr_assert_eq(cells[3 * G + (H - 1 - bx) * G / H], 1u << 3, "flipped");
    }
}

/* The head's loss against central differences, for its weights and for the map. */
Test(loc, the_gradients_are_the_losss)
{
    nn_model *m = tiny_model(); /* a 8 x 8 x 8 map before its global pool */
    struct train_loc l;
    char err[256];
    cr_assert_eq(train_loc_init(&l, m, 3, err, sizeof err), 0, "%s", err);
    cr_assert(l.c == 8 && l.gh == 8 && l.gw == 8);
    size_t nm = 3 * (size_t)l.c * l.gh * l.gw;
    uint64_t rng = 3;
    for (size_t i = 0; i < nm; i++)
        l.map[i] = nn_rng_uniform(&rng);
    for (size_t i = 0; i < l.nparam; i++)
        l.p[i] = nn_rng_uniform(&rng) - 0.5f;
    for (int i = 0; i < 3 * 64; i++)
        l.cells[i] = nn_rng_uniform(&rng) < 0.2f ? (uint8_t)(1 + nn_rng_next(&rng) % 31) : 0;
    l.known[0] = l.known[2] = true, l.known[1] = false;
    const float lw[6] = NN_RSNA_LABEL_WEIGHTS, pw[6] = {3, 5, 2, 2, 4, 2};
    memcpy(l.pos_w, pw, sizeof l.pos_w);
    train_loc_loss(&l, 3, lw, 2.0f);
    float *gp = malloc(l.nparam * sizeof(float)), *gm = malloc(nm * sizeof(float));
    memcpy(gp, l.grad, l.nparam * sizeof(float));
    memcpy(gm, l.dmap, nm * sizeof(float));
    double worst = 0;
    for (int k = 0; k < 40; k++) {
        float *v = k % 2 ? &l.p[nn_rng_next(&rng) % l.nparam] : &l.map[nn_rng_next(&rng) % nm];
        float g = k % 2 ? gp[v - l.p] : gm[v - l.map], x = *v;
        *v = x + 1e-2f;
        double lp = train_loc_loss(&l, 3, lw, 2.0f);
        *v = x - 1e-2f;
        double lm = train_loc_loss(&l, 3, lw, 2.0f);
        *v = x;
        worst = fmax(worst, fabs((lp - lm) / 2e-2 - g) / (fabs(g) + 1e-4));
    }
    cr_expect(worst < 2e-2, "relative error %.3g", worst);
    /* a slice without a mask adds nothing */
    for (size_t i = 64 * 8; i < 2 * 64 * 8; i++)
        cr_assert_eq(gm[i], 0.0f);
    free(gp), free(gm);
    train_loc_free(&l);
    nn_model_free(m);
}

/* --loc-cell-weights: negative / positive cells per label over the training
 * split's masked slices, on the map's grid, counted here straight from the
 * masks (a grid cell of 8x8 input pixels is 2x2 mask cells). */
Test(loc, cell_weights_count_the_training_masks, .timeout = 120, .fini = scratch_fini)
{
    char tmp[] = "/tmp/ichtriage-cellw-XXXXXX", ph[300], cache[300];
    scratch(tmp);
    snprintf(ph, sizeof ph, "%s/ph", tmp);
    snprintf(cache, sizeof cache, "%s/cache", tmp);
    cr_assert_eq(mkdir(cache, 0755), 0);
    struct train_phantom_opts o;
    masked_phantom(&o, ph, 22, 14);
    struct train_dataset d;
    load_masks(&d, ph, cache, 64, false, true);
    /* the last two series are validation: they must not count */
    cr_assert_geq(d.nseries, 4);
    for (int s = d.nseries - 2; s < d.nseries; s++)
        d.series[s].split = TRAIN_SPLIT_VAL;
    double pos[TRAIN_LABELS] = {0}, all = 0;
    size_t want_slices = 0;
    for (int s = 0; s < d.nseries; s++) {
        const struct train_series *se = &d.series[s];
        if (se->split != TRAIN_SPLIT_TRAIN) continue;
        for (int k = 0; k < se->n; k++) {
            const uint8_t *m = train_dataset_mask(&d, se->first + (size_t)k);
            cr_assert_not_null(m);
            want_slices++;
            for (int gy = 0; gy < 8; gy++)
                for (int gx = 0; gx < 8; gx++) {
                    uint8_t bits = 0;
                    for (int y = 2 * gy; y < 2 * gy + 2; y++)
                        for (int x = 2 * gx; x < 2 * gx + 2; x++)
                            bits |= m[y * 16 + x];
                    all++;
                    pos[0] += bits != 0;
                    for (int l = 1; l < TRAIN_LABELS; l++)
                        pos[l] += bits >> (l - 1) & 1;
                }
        }
    }
    cr_assert_gt(pos[0], 0, "the phantoms have blood");
    float pw[TRAIN_LABELS];
    cr_assert_eq(train_loc_cell_weights(&d, 8, 8, pw), want_slices);
    int subtypes = 0, clamped = 0;
    for (int l = 0; l < TRAIN_LABELS; l++) {
        double w = pos[l] > 0 ? (all - pos[l]) / pos[l] : 1;
        subtypes += l > 0 && pos[l] > 0;
        clamped += w > TRAIN_LOC_MAX_POS_W;
        w = w < 1 ? 1 : w > TRAIN_LOC_MAX_POS_W ? TRAIN_LOC_MAX_POS_W : w;
        cr_expect_float_eq(pw[l], (float)w, 1e-4f * (float)w, "%s: %g against %g (%g of %g)",
                           train_label_names[l], pw[l], w, pos[l], all);
    }
    /* the data has both sides of the clamp */
    cr_assert_geq(subtypes, 3, "subtypes with blood: %d", subtypes);
    cr_assert(clamped > 0 && clamped < subtypes, "labels clamped: %d", clamped);
    /* no mask anywhere (a dataset read without them): nothing counted */
    struct train_dataset plain;
    load_masks(&plain, ph, cache, 64, false, false);
    cr_assert_eq(train_loc_cell_weights(&plain, 8, 8, pw), 0);
    train_dataset_free(&plain), train_dataset_free(&d);
    rm_rf(tmp);
}

/* The slices of d's series s, pixels and labels, equal those of e's series t. */
static void same_series(const struct train_dataset *d, int s, const struct train_dataset *e, int t)
{
    const struct train_series *a = &d->series[s], *b = &e->series[t];
    cr_assert_str_eq(a->series_uid, b->series_uid);
    cr_assert_eq(a->n, b->n);
    cr_assert_eq(memcmp(a->study, b->study, TRAIN_LABELS), 0);
    for (int i = 0; i < a->n; i++) {
        cr_assert_eq(memcmp(train_dataset_pixels(d, a->first + i),
                            train_dataset_pixels(e, b->first + i), (size_t)d->c * d->h * d->w),
                     0, "series %s slice %d", a->series_uid, i);
        cr_assert_eq(memcmp(d->labels + (a->first + i) * TRAIN_LABELS,
                            e->labels + (b->first + i) * TRAIN_LABELS, TRAIN_LABELS),
                     0);
    }
}

/* One series whose pixel data does not match its header (RSNA has such a
 * file): that series is skipped, logged and counted, and the rest of the
 * folder loads, into the cache and into memory alike. */
Test(cache, a_series_whose_pixels_do_not_match_its_header_is_skipped, .timeout = 120,
     .fini = scratch_fini)
{
    char tmp[] = "/tmp/ichtriage-cache-XXXXXX", ph[300], c1[300], c2[300], c3[300], cfile[600];
    char part[620], logp[320], log[8192], cmd[1400], *paths[16];
    scratch(tmp);
    snprintf(ph, sizeof ph, "%s/ph", tmp);
    snprintf(c1, sizeof c1, "%s/c1", tmp);
    snprintf(c2, sizeof c2, "%s/c2", tmp);
    snprintf(c3, sizeof c3, "%s/c3", tmp);
    snprintf(logp, sizeof logp, "%s/log", tmp);
    phantoms(ph, 23, 3, 64); /* 3 series of 6 slices of 64x64 */
    cr_assert_eq(mkdir(c1, 0755), 0);
    cr_assert_eq(mkdir(c2, 0755), 0);
    cr_assert_eq(mkdir(c3, 0755), 0);
    struct train_dataset fresh, d;
    load(&fresh, ph, c1);
    cr_assert_eq(fresh.nseries, 3);
    /* The middle series' files say 128 rows; their pixels hold 64. */
    const char *bad = fresh.series[1].series_uid;
    int n = series_files(ph, bad, paths, 16);
    cr_assert_eq(n, fresh.series[1].n);
    for (int i = 0; i < n; i++) {
        snprintf(cmd, sizeof cmd, "dcmodify -nb -m '(0028,0010)=128' '%s' >/dev/null", paths[i]);
        cr_assert_eq(system(cmd), 0, "%s", cmd);
        free(paths[i]);
    }
    for (int round = 0; round < 3; round++) {
        /* 0: decoded into the cache; 1: read from it; 2: into memory, the
         * cache being another run's */
        const char *dir = round < 2 ? c2 : c3;
        int fd = -1;
        if (round == 2) {
            cache_file(c2, cfile, sizeof cfile);
            cr_assert_str_not_empty(cfile);
            snprintf(part, sizeof part, "%s/%s.tmp", c3, strrchr(cfile, '/') + 1);
            fd = open(part, O_RDWR | O_CREAT, 0644);
            cr_assert(fd >= 0 && flock(fd, LOCK_EX) == 0);
        }
        load_logged(&d, ph, dir, logp, log, sizeof log);
        if (fd >= 0) close(fd);
        cr_assert_eq(d.nseries, 2, "round %d: %s", round, log);
        cr_assert_eq(d.nslices, fresh.nslices - (size_t)fresh.series[1].n, "round %d", round);
        cr_assert_geq(d.skipped_files, fresh.skipped_files + n, "round %d", round);
        if (round != 1) {
            char want[200];
            snprintf(want, sizeof want, "event=train_series_skipped series=%s ", bad);
            cr_assert(strstr(log, want) && strstr(log, "expected"), "round %d: %s", round, log);
        }
        cr_assert(round != 2 || (d.nruns == 1 && !d.runs[0].map), "round 2 not in memory");
        same_series(&d, 0, &fresh, 0);
        same_series(&d, 1, &fresh, 2);
        train_dataset_free(&d);
    }
    train_dataset_free(&fresh);
    rm_rf(tmp);
}

/* A labels CSV without its header line keeps its first row (the header is
 * skipped only when it is one, also after a UTF-8 BOM): the labels are the
 * same as from the file as written. */
Test(labels, a_csv_without_its_header_keeps_its_first_row, .timeout = 120, .fini = scratch_fini)
{
    char tmp[] = "/tmp/ichtriage-labels-XXXXXX", ph[300], csv[320], cache[320], cmd[1600];
    scratch(tmp);
    snprintf(ph, sizeof ph, "%s/ph", tmp);
    snprintf(csv, sizeof csv, "%s/stage_2_train.csv", ph);
    phantoms(ph, 23, 3, 64);
    struct train_dataset fresh, d;
    snprintf(cache, sizeof cache, "%s/c0", tmp);
    cr_assert_eq(mkdir(cache, 0755), 0);
    load(&fresh, ph, cache);
    snprintf(cmd, sizeof cmd, "head -1 %s | grep -qx 'ID,Label' && grep -q ',1$' %s", csv, csv);
    cr_assert_eq(system(cmd), 0, "the phantom labels have no header or no positive row");
    for (int round = 0; round < 2; round++) {
        if (round == 0) /* no header, a positive row first */
            snprintf(cmd, sizeof cmd,
                     "cd %s && p=$(grep -m1 ',1$' stage_2_train.csv) && "
                     "{ echo \"$p\"; grep -vx -e 'ID,Label' -e \"$p\" stage_2_train.csv; } > x && "
                     "mv x stage_2_train.csv",
                     ph);
        else /* a header after a UTF-8 BOM */
            snprintf(cmd, sizeof cmd,
                     "cd %s && { printf '\\357\\273\\277ID,Label\\r\\n'; cat stage_2_train.csv; } "
                     "> x && mv x stage_2_train.csv",
                     ph);
        cr_assert_eq(system(cmd), 0);
        snprintf(cache, sizeof cache, "%s/c%d", tmp, round + 1);
        cr_assert_eq(mkdir(cache, 0755), 0);
        load(&d, ph, cache);
        same_slices(&fresh, &d);
        train_dataset_free(&d);
    }
    train_dataset_free(&fresh);
    rm_rf(tmp);
}

/* A fresh folder from tmp (a mkdtemp template) with 3 phantom series of 6
 * slices in tmp/ph, loaded into d with its cache in tmp/cache; the log's
 * file into logp. Each n bytes. */
static void three_series(char *tmp, char *ph, char *cache, char *logp, size_t n,
                         struct train_dataset *d)
{
    scratch(tmp);
    snprintf(ph, n, "%s/ph", tmp);
    snprintf(cache, n, "%s/cache", tmp);
    snprintf(logp, n, "%s/log", tmp);
    phantoms(ph, 23, 3, 64);
    cr_assert_eq(mkdir(cache, 0755), 0);
    load(d, ph, cache);
}

/* A label flipped (same size) within the second of the file's last change
 * is a change: the cache goes by the nanosecond. */
Test(cache, a_label_flipped_in_the_same_second_is_a_change, .timeout = 120, .fini = scratch_fini)
{
    char tmp[] = "/tmp/ichtriage-cache-XXXXXX", ph[320], csv[340], cache[320], cmd[1200];
    char logp[320], log[8192];
    struct train_dataset a, b;
    three_series(tmp, ph, cache, logp, sizeof ph, &a);
    snprintf(csv, sizeof csv, "%s/stage_2_train.csv", ph);
    struct stat st;
    cr_assert_eq(stat(csv, &st), 0);
    /* the first negative "any" row becomes positive, in place */
    snprintf(cmd, sizeof cmd,
             "n=$(grep -n -m1 '_any,0$' %s | cut -d: -f1) && sed -i \"${n}s/,0$/,1/\" %s", csv,
             csv);
    cr_assert_eq(system(cmd), 0);
    struct stat now;
    cr_assert_eq(stat(csv, &now), 0);
    cr_assert_eq(now.st_size, st.st_size);
    struct timespec t[2] = {st.st_mtim, st.st_mtim}; /* the same second, another nanosecond */
    t[1].tv_nsec = st.st_mtim.tv_nsec > 0 ? st.st_mtim.tv_nsec - 1 : 1;
    cr_assert_eq(utimensat(AT_FDCWD, csv, t, 0), 0);
    load_logged(&b, ph, cache, logp, log, sizeof log);
    cr_assert(strstr(log, "event=train_data_decoded") && !strstr(log, "event=train_data_cached"),
              "the cache of the old labels was used: %s", log);
    cr_assert_eq(a.nslices, b.nslices);
    cr_assert_neq(memcmp(a.labels, b.labels, a.nslices * TRAIN_LABELS), 0, "no label changed");
    train_dataset_free(&a);
    train_dataset_free(&b);
    rm_rf(tmp);
}

/* A cache file whose head is right but whose series records are not (a
 * disk or a copy gone wrong): its strings are ended within their fields,
 * and a series that would not lie within its slices makes the file not
 * taken; the folder is decoded again. */
Test(cache, a_corrupt_series_record_is_not_taken, .timeout = 120, .fini = scratch_fini)
{
    char tmp[] = "/tmp/ichtriage-cache-XXXXXX", ph[320], cache[320], cfile[600];
    char logp[320], log[8192];
    struct train_dataset fresh, d;
    three_series(tmp, ph, cache, logp, sizeof ph, &fresh);
    cache_file(cache, cfile, sizeof cfile);
    cr_assert_str_not_empty(cfile);
    /* the series records follow the file's head (4096 bytes) and pixels */
    off_t rec = (off_t)(4096 + fresh.nslices * 3 * 32 * 32);
    int fd = open(cfile, O_RDWR);
    cr_assert_geq(fd, 0);
    /* 1: the second series' study UID fills its field, without its end */
    char full[SCP_UID_MAX];
    memset(full, '7', sizeof full);
    off_t at = rec + (off_t)sizeof(struct train_series) + offsetof(struct train_series, study_uid);
    cr_assert_eq(pwrite(fd, full, sizeof full, at), (ssize_t)sizeof full);
    load_logged(&d, ph, cache, logp, log, sizeof log);
    cr_assert(strstr(log, "event=train_data_cached"), "%s", log);
    cr_assert_eq(strlen(d.series[1].study_uid), sizeof full - 1);
    train_dataset_free(&d);
    /* 2: the first series' slice count negative */
    int bad = -1;
    at = rec + offsetof(struct train_series, n);
    cr_assert_eq(pwrite(fd, &bad, sizeof bad, at), (ssize_t)sizeof bad);
    close(fd);
    load_logged(&d, ph, cache, logp, log, sizeof log);
    cr_assert(strstr(log, "event=train_data_decoded") && !strstr(log, "event=train_data_cached"),
              "the corrupt cache was taken: %s", log);
    same_slices(&fresh, &d);
    for (int i = 0; i < d.nseries; i++)
        cr_assert_eq(d.series[i].n, fresh.series[i].n);
    train_dataset_free(&d);
    train_dataset_free(&fresh);
    rm_rf(tmp);
}

#include "registry.h"

/* Automatic promotion promotes only over the model it compared with: an
 * admin's promote in between stands (it had been replaced). */
Test(registry, promote_over_refuses_when_the_active_model_changed, .fini = scratch_fini)
{
    char tmp[] = "/tmp/ichtriage-registry-XXXXXX", err[512], path[300], a[128], b[128], act[128];
    scratch(tmp);
    nn_model *m = model_of("b4,M,G|d8", 3, 16);
    snprintf(path, sizeof path, "%s/m.safetensors", tmp);
    cr_assert_eq(nn_model_save(m, path, err, sizeof err), 0, "%s", err);
    nn_model_free(m);
    cr_assert_eq(train_registry_add(tmp, path, a, sizeof a, err, sizeof err), 0, "%s", err);
    cr_assert_eq(train_registry_add(tmp, path, b, sizeof b, err, sizeof err), 0, "%s", err);
    cr_assert_str_neq(a, b);
    /* Compared with nothing active; an admin promotes a meanwhile. */
    cr_assert_eq(train_registry_promote(tmp, a, err, sizeof err), 0, "%s", err);
    cr_expect_eq(train_registry_promote_over(tmp, b, "", err, sizeof err), TRAIN_REGISTRY_CHANGED);
    train_registry_active(tmp, act, sizeof act);
    cr_expect_str_eq(act, a);
    /* Compared with a, still active: promoted. */
    cr_expect_eq(train_registry_promote_over(tmp, b, a, err, sizeof err), 0, "%s", err);
    train_registry_active(tmp, act, sizeof act);
    cr_expect_str_eq(act, b);
    rm_rf(tmp);
}

/* The frozen test split keeps every patient, also one whose ID starts with
 * '#' (which the file's comments do), so that none of them leaves the test
 * set when the file is read back; a second freeze leaves the first. */
Test(registry, the_frozen_split_reads_back_every_patient, .fini = scratch_fini)
{
    char tmp[] = "/tmp/ichtriage-registry-XXXXXX", err[512];
    scratch(tmp);
    char *ids[] = {"#12", "p1", "\\odd", "# 7", "2.25.1"}, *other[] = {"p9"};
    int n = (int)(sizeof ids / sizeof ids[0]), got = 0;
    cr_assert_eq(train_registry_freeze_test(tmp, ids, n, err, sizeof err), 0, "%s", err);
    cr_assert_eq(train_registry_freeze_test(tmp, other, 1, err, sizeof err), 0, "%s", err);
    char **back = NULL;
    cr_assert_eq(train_registry_test_patients(tmp, &back, &got, err, sizeof err), 1, "%s", err);
    cr_assert_eq(got, n);
    for (int i = 0; i < n; i++)
        cr_assert_str_eq(back[i], ids[i]);
    train_registry_free_ids(back, got);
    rm_rf(tmp);
}

/* Whether the text file at path holds "nan" in any case. */
static bool file_says_nan(const char *path)
{
    FILE *f = fopen(path, "r");
    cr_assert(f, "%s", path);
    char line[8192];
    bool nan = false;
    while (!nan && fgets(line, sizeof line, f))
        nan = strcasestr(line, "nan") != NULL;
    fclose(f);
    return nan;
}

/* Figures a class too few leaves undefined read "n/a" in the table, the
 * comparison, the HTML report and the metadata's summary (null in the
 * JSON), never "nan": the weighted log loss of a level with no known label,
 * `--compare`'s difference and p, and the summary's interval had printed
 * "nan" ("study_auc_any_ci95=nan-nan" in a model's metadata). */
Test(report, undefined_figures_read_n_a, .fini = scratch_fini)
{
    struct train_eval *e = calloc(1, sizeof *e);
    e->nstudies = e->nseries = 3, e->nslices = 24;
    for (int lv = 0; lv < 2; lv++)
        for (int mo = 0; mo < 2; mo++) {
            for (int l = 0; l < TRAIN_LABELS; l++)
                train_binary_eval(NULL, NULL, 0, 0.5f, &e->m[lv][mo][l]); /* nothing scored */
            e->weighted_logloss[lv][mo] = NAN;
            e->thresholds[mo][lv] = 0.5f;
        }
    e->cmp.valid = 1;
    snprintf(e->cmp.model, sizeof e->cmp.model, "other.safetensors");
    e->cmp.auc = (struct train_auc_diff){NAN, NAN, NAN, NAN, NAN, NAN};
    e->cmp.sensitivity = e->cmp.specificity = NAN;
    char *text = NULL, sum[512], tmp[] = "/tmp/ichtriage-report-XXXXXX", html[300], js[300],
         err[256];
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    train_eval_print(f, e);
    fclose(f);
    cr_assert(!strcasestr(text, "nan"), "%s", text);
    cr_assert(strstr(text, "weighted log loss n/a") && strstr(text, "p = n/a"), "%s", text);
    train_eval_summary(e, sum, sizeof sum);
    cr_assert(!strcasestr(sum, "nan") && strstr(sum, "study_auc_any_ci95=n/a"), "%s", sum);
    scratch(tmp);
    snprintf(html, sizeof html, "%s/r.html", tmp);
    snprintf(js, sizeof js, "%s/r.json", tmp);
    cr_assert_eq(
        train_report_write(html, js, "t", "m", NULL, e, NULL, 0, NULL, NULL, err, sizeof err), 0,
        "%s", err);
    cr_assert(!file_says_nan(html) && !file_says_nan(js));
    free(text), free(e);
}

/* The history chart names the validation figure train chose
 * (--val-metric): it had said "mean AUC" of a run scored on "any" alone. */
Test(report, the_history_chart_names_the_validation_metric, .fini = scratch_fini)
{
    struct train_eval *e = calloc(1, sizeof *e);
    struct train_epoch h[2] = {{1, 1, 0.6, 0.5, 0.7, 1}, {2, 1, 0.4, 0.45, 0.8, 1}};
    char tmp[] = "/tmp/ichtriage-report-XXXXXX", html[300], err[256];
    scratch(tmp);
    snprintf(html, sizeof html, "%s/r.html", tmp);
    cr_assert_eq(train_report_write(html, NULL, "t", "m", NULL, e, h, 2, "AUC of any", NULL, err,
                                    sizeof err),
                 0, "%s", err);
    FILE *f = fopen(html, "r");
    char text[65536];
    size_t n = fread(text, 1, sizeof text - 1, f);
    text[n] = 0;
    fclose(f);
    cr_assert(strstr(text, "validation AUC of any per epoch") && !strstr(text, "mean AUC"));
    free(e);
}

/* ---- stage 2 on studies labelled as a whole (reviews) ---- */

/* Series of the given studies; uid[i] starting with 's': labelled at study
 * level only, with study labels y (else slice labels). */
static void bag_dataset(struct train_dataset *d, const char *const *uid, int n,
                        const uint8_t y[TRAIN_LABELS])
{
    memset(d, 0, sizeof *d);
    d->series = calloc((size_t)n, sizeof *d->series);
    cr_assert(d->series);
    d->nseries = n;
    for (int i = 0; i < n; i++) {
        snprintf(d->series[i].study_uid, sizeof d->series[i].study_uid, "%s", uid[i]);
        d->series[i].slice_labels = uid[i][0] != 's';
        memcpy(d->series[i].study, y, TRAIN_LABELS);
    }
}

Test(stage2, a_study_labelled_as_a_whole_goes_into_one_batch)
{
    static const char *const uid[] = {"A", "s1", "B", "s2", "s1", "s2", "s1"};
    static const uint8_t y[TRAIN_LABELS] = {1, 0, 0, 0, 0, 0};
    struct train_dataset d;
    bag_dataset(&d, uid, 7, y);
    int ser[] = {3, 0, 6, 2, 1, 5, 4};
    cr_assert_eq(train_stage2_group(&d, ser, 7), 0);
    /* s2 behind its first (3), s1 behind its first (6), each in its order */
    const int want[] = {3, 5, 0, 6, 1, 4, 2};
    for (int i = 0; i < 7; i++)
        cr_expect_eq(ser[i], want[i], "place %d: %d, not %d", i, ser[i], want[i]);
    cr_expect_eq(train_stage2_group_size(&d, ser, 7, 0), 2);
    cr_expect_eq(train_stage2_group_size(&d, ser, 7, 1), 1, "from its second series on");
    cr_expect_eq(train_stage2_group_size(&d, ser, 7, 2), 1, "slice labels: alone");
    cr_expect_eq(train_stage2_group_size(&d, ser, 7, 3), 3);
    cr_expect_eq(train_stage2_group_size(&d, ser, 7, 6), 1);
    free(d.series);

    /* Slice labels only (RSNA, phantoms): the epoch's order as it was. */
    static const char *const sliced[] = {"A", "B", "A", "C"};
    bag_dataset(&d, sliced, 4, y);
    int order[] = {2, 0, 3, 1};
    cr_assert_eq(train_stage2_group(&d, order, 4), 0);
    cr_expect(order[0] == 2 && order[1] == 0 && order[2] == 3 && order[3] == 1);
    free(d.series);
}

static float bce_grad_ref(float z, float y, int l, float pw, double n)
{
    float sg = 1.0f / (1.0f + expf(-z));
    return (float)(train_rsna_weights[l] * (pw * y * (sg - 1) + (1 - y) * sg) / n);
}

/* A positive study of two series (3 and 2 slices) learns from its highest
 * slice over both: series were bags of their own, and the highest slice of
 * each was pushed up, also of the series where the blood is not. A
 * negative study pushes down the highest slice of each of its series; an
 * unknown label gives no gradient; a series with slice labels is left
 * alone. */
Test(stage2, a_positive_study_learns_from_its_highest_slice_over_all_its_series)
{
    static const char *const uid[] = {"s1", "s1", "A", "s2", "s2"};
    uint8_t y[TRAIN_LABELS] = {1, 1, 0, 0, 0, TRAIN_LABEL_UNKNOWN};
    struct train_dataset d;
    bag_dataset(&d, uid, 5, y);
    memset(d.series[3].study, 0, TRAIN_LABELS); /* s2: negative */
    d.series[3].study[5] = d.series[4].study[5] = 0;
    memset(d.series[4].study, 0, TRAIN_LABELS);
    const int src[] = {0, 1, 2, 3, 4}, len[] = {3, 2, 1, 2, 2};
    const size_t from[] = {0, 3, 5, 6, 8}, tot = 10;
    float lg[10 * TRAIN_LABELS], dl[10 * TRAIN_LABELS];
    const float pos_w[TRAIN_LABELS] = {3, 3, 3, 3, 3, 3};
    for (int r = 0; r < 10; r++)
        for (int l = 0; l < TRAIN_LABELS; l++) {
            lg[r * TRAIN_LABELS + l] = -1.0f + 0.1f * (float)((r * 7 + l * 3) % 5);
            dl[r * TRAIN_LABELS + l] = 7.0f; /* stale: set or cleared by the call */
        }
    for (int l = 0; l < TRAIN_LABELS; l++) {
        lg[1 * TRAIN_LABELS + l] = 1.0f; /* series 0's highest */
        lg[4 * TRAIN_LABELS + l] = 2.0f; /* series 1's, the study's highest */
        lg[6 * TRAIN_LABELS + l] = 0.5f; /* s2's first series */
        lg[9 * TRAIN_LABELS + l] = 0.8f; /* s2's second */
    }
    train_stage2_mil(&d, src, len, from, 5, tot, pos_w, lg, dl);
    const double norm = (double)tot * TRAIN_LABELS;
    for (int l = 0; l < TRAIN_LABELS; l++) {
        for (int r = 0; r < 5; r++) {
            float want = 0;
            if (l < 2 && r == 4) want = bce_grad_ref(2.0f, 1, l, 3, norm);
            if (l >= 2 && l < 5 && (r == 1 || r == 4))
                want = bce_grad_ref(lg[r * TRAIN_LABELS + l], 0, l, 1, norm);
            cr_expect_float_eq(dl[r * TRAIN_LABELS + l], want, 1e-7, "s1 row %d label %d: %g", r, l,
                               dl[r * TRAIN_LABELS + l]);
        }
        cr_expect_eq(dl[5 * TRAIN_LABELS + l], 7.0f, "the slice-labelled series is touched");
        for (int r = 6; r < 10; r++) {
            float want =
                r == 6 || r == 9 ? bce_grad_ref(lg[r * TRAIN_LABELS + l], 0, l, 1, norm) : 0;
            cr_expect_float_eq(dl[r * TRAIN_LABELS + l], want, 1e-7, "s2 row %d label %d", r, l);
        }
    }
    cr_expect_lt(dl[4 * TRAIN_LABELS], 0, "the highest slice is pushed up");
    free(d.series);
}

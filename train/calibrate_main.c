/* train/calibrate_main.c: `ichtriage calibrate MODEL DATA... -o OUT`: new
 * temperatures and operating thresholds for a trained model, picked on
 * labelled studies that neither trained it nor chose its epochs (a site's
 * own reviewed studies, or a held-out phantom set), without retraining.
 * The weights of the convolutions and the BiLSTM are unchanged; only the
 * last layers are rescaled (temperature) and the stored thresholds replaced.
 * Decision support, not a diagnosis. */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "config.h"
#include "log.h"
#include "number.h"
#include "pipeline.h"
#include "trainer.h"

/* Below this many positive studies the threshold for a 0.95 sensitivity
 * rests on the one or two lowest positives: said, not refused. */
#define FEW_POSITIVES 50

static void usage(FILE *f)
{
    fprintf(f,
            "usage: ichtriage calibrate [options] MODEL DATA... -o OUT\n"
            "Re-picks MODEL's calibration (a temperature per label) and its operating\n"
            "thresholds (the highest whose study-level sensitivity on these studies is at least\n"
            "--sensitivity) on labelled folders in the RSNA 2019 layout, or the node's reviewed\n"
            "studies, and writes the result to OUT. No retraining: the weights stay, the last\n"
            "layers are rescaled. Use studies the model was not trained or validated on. Prints\n"
            "the stored threshold's sensitivity and specificity on these studies before and the\n"
            "new one's after. Register OUT with `ichtriage model register OUT`.\n"
            "Decision support, not a diagnosis.\n\n"
            "  -o, --out FILE     the calibrated model (required; may be MODEL itself)\n"
            "  --sensitivity S    study-level sensitivity of \"any\" to aim at (default 0.95)\n"
            "  --reviews          also the node's reviewed studies (study-level labels from\n"
            "                     <store.dir>/ichtriage.db, images from its spool); not if\n"
            "                     the model was trained with --reviews on them\n"
            "  --report FILE      HTML report, with the reliability diagram (default\n"
            "                     calibrate-report.html)\n"
            "  --json FILE        metrics JSON (default calibrate-metrics.json)\n"
            "  --cache DIR        preprocessed-slice cache; with --reviews, the reviewed\n"
            "                     slices go to a file there instead of memory\n"
            "  --threads N        CPU threads (default: all cores)\n"
            "  --device D         auto, cpu or cuda (nn.device; default auto)\n"
            "  -c FILE, --set K=V configuration (store.dir for --reviews)\n"
            "  -h, --help         this text\n");
}

/* "old; then new", or new alone. */
static int meta_append(nn_model *m, const char *key, const char *add)
{
    const char *old = nn_model_meta_get(m, key);
    size_t n = (old ? strlen(old) : 0) + strlen(add) + 8;
    char *v = malloc(n);
    if (!v) return -1;
    if (old && *old)
        snprintf(v, n, "%s; then %s", old, add);
    else
        snprintf(v, n, "%s", add);
    int rc = nn_model_meta_set(m, key, v);
    free(v);
    return rc;
}

/* The positive and negative studies of "any" among d's series (a study is
 * positive when one of its series is). Returns 0, -1 when out of memory. */
static int count_studies(const struct train_dataset *d, int *npos, int *nneg)
{
    int *study_of = malloc(((size_t)d->nseries + 1) * sizeof *study_of);
    unsigned char *pos = calloc((size_t)d->nseries + 1, 1);
    int ns = study_of && pos ? train_dataset_studies(d, -1, study_of) : -1;
    for (int s = 0; s < d->nseries && ns > 0; s++)
        if (d->series[s].study[0] == 1) pos[study_of[s]] = 1;
    *npos = 0;
    for (int k = 0; k < ns; k++)
        *npos += pos[k];
    *nneg = ns - *npos;
    free(study_of), free(pos);
    return ns < 0 ? -1 : 0;
}

static void print_operating_point(const char *when, const struct train_eval *e, float thr)
{
    const struct train_binary *b = &e->m[TRAIN_LEVEL_STUDY][TRAIN_MODEL_LRCN][0];
    printf("%s: threshold %.4f: study-level sensitivity %.3f (%ld of %ld), specificity %.3f "
           "(%ld of %ld), AUC %.3f\n",
           when, thr, b->sensitivity, (long)b->tp, (long)(b->tp + b->fn), b->specificity,
           (long)b->tn, (long)(b->tn + b->fp), b->auc);
}

int train_calibrate_main(int argc, char **argv)
{
    struct triage_config cfg;
    char err[1400];
    if (triage_config_from_args(&cfg, &argc, argv, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage calibrate: %s\n", err);
        return 2;
    }
    static const struct option lo[] = {
        {"out", 1, 0, 'o'},     {"sensitivity", 1, 0, 'S'}, {"reviews", 0, 0, 'V'},
        {"report", 1, 0, 'r'},  {"json", 1, 0, 'j'},        {"cache", 1, 0, 'C'},
        {"threads", 1, 0, 'T'}, {"help", 0, 0, 'h'},        {0, 0, 0, 0}};
    const char *out_path = NULL, *report = "calibrate-report.html",
               *json = "calibrate-metrics.json", *cache = NULL;
    double sens = 0.95;
    int reviews = 0, rc = 2;
    struct train_dataset d;
    struct triage_model tm;
    struct train_eval *before = NULL, *after = NULL;
    float *feat = NULL;
    int have_d = 0;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "ho:", lo, NULL)) != -1) {
        switch (c) {
        case 'o':
            out_path = optarg;
            break;
        case 'S':
            if (util_number_double(optarg, &sens) != 0 || !(sens > 0 && sens <= 1)) {
                fprintf(stderr, "ichtriage calibrate: --sensitivity \"%s\": a number in (0, 1]\n",
                        optarg);
                goto out;
            }
            break;
        case 'V':
            reviews = 1;
            break;
        case 'r':
            report = optarg;
            break;
        case 'j':
            json = optarg;
            break;
        case 'C':
            cache = optarg;
            break;
        case 'T': {
            long n;
            if (util_number_long(optarg, 0, 1024, &n) != 0) {
                fprintf(stderr, "ichtriage calibrate: --threads \"%s\": an integer 0..1024\n",
                        optarg);
                goto out;
            }
            if (n > 0) nn_set_threads((int)n);
            break;
        }
        case 'h':
            usage(stdout);
            rc = 0;
            goto out;
        default:
            usage(stderr);
            goto out;
        }
    }
    if (argc - optind < 1 || (argc - optind < 2 && !reviews)) {
        fprintf(stderr, "ichtriage calibrate: need MODEL and DATA folders (or --reviews)\n");
        usage(stderr);
        goto out;
    }
    if (!out_path) {
        fprintf(stderr, "ichtriage calibrate: no --out FILE\n");
        goto out;
    }
    rc = 1;
    const char *model_path = argv[optind];
    char desc[2048];
    if (train_open_model_data(&tm, &d, model_path, triage_config_str(&cfg, CFG_NN_DEVICE),
                              argv + optind + 1, argc - optind - 1, cache, desc, sizeof desc, err,
                              sizeof err) != 0) {
        fprintf(stderr, "ichtriage calibrate: %s\n", err);
        goto out;
    }
    have_d = 1;
    int off = (int)strlen(desc);
    if (reviews) {
        int added = 0;
        if (train_reviews_add(&d, &cfg, cache, &added, err, sizeof err) != 0) {
            fprintf(stderr, "ichtriage calibrate: reviews: %s\n", err);
            goto out;
        }
        snprintf(desc + off, sizeof desc - (size_t)off, "%s%d reviewed series of %s",
                 off ? ", " : "", added, triage_config_str(&cfg, CFG_STORE_DIR));
    }
    /* Every series is calibration data; a study's series count as one. */
    for (int s = 0; s < d.nseries; s++)
        d.series[s].split = TRAIN_SPLIT_VAL;
    int npos = 0, nneg = 0;
    if (count_studies(&d, &npos, &nneg) != 0) {
        fprintf(stderr, "ichtriage calibrate: out of memory\n");
        goto out;
    }
    if (npos == 0 || nneg == 0) {
        fprintf(stderr,
                "ichtriage calibrate: the studies need both labels for \"any\": found %d "
                "positive and %d negative studies; nothing written\n",
                npos, nneg);
        goto out;
    }
    if (npos < FEW_POSITIVES)
        fprintf(stderr,
                "ichtriage calibrate: warning: only %d positive %s; the threshold for "
                "sensitivity %g rests on the lowest few of them\n",
                npos, npos == 1 ? "study" : "studies", sens);
    util_log(UTIL_LOG_INFO, "calibrate_start",
             "model=%s series=%d studies=%d positive=%d negative=%d", model_path, d.nseries,
             npos + nneg, npos, nneg);

    /* In our label order; tm.label_index says where each is among the
     * model's outputs, and in its thresholds. */
    float old[2][TRAIN_LABELS], thr[2][TRAIN_LABELS];
    train_model_thresholds(&tm, old);
    /* The CNN features once, for the three passes (before, the fit,
     * after): calibration changes only the layers above them. */
    before = malloc(sizeof *before), after = malloc(sizeof *after);
    feat = malloc(d.nslices * (size_t)nn_model_feature_size(tm.nn) * sizeof(float));
    if (!before || !after || !feat) goto out;
    if (train_features(tm.nn, &d, TRAIN_SPLIT_VAL, feat) != 0) {
        fprintf(stderr, "ichtriage calibrate: the model failed on the data\n");
        goto out;
    }
    if (train_evaluate_features(tm.nn, tm.label_index, &d, TRAIN_SPLIT_VAL, feat, old, before, err,
                                sizeof err) != 0) {
        fprintf(stderr, "ichtriage calibrate: %s\n", err);
        goto out;
    }
    struct train_reliability rel;
    unsigned fitted = 0;
    char tdesc[512];
    if (train_calibrate(tm.nn, tm.label_index, &d, feat, sens, thr, &rel, &fitted, tdesc,
                        sizeof tdesc, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage calibrate: calibration failed: %s\n", err);
        goto out;
    }
    /* A label with no positive (or no negative) study here keeps its
     * temperature (1, so the logits are unchanged) and its threshold. */
    char kept[256] = "";
    int koff = 0;
    for (int l = 0; l < TRAIN_LABELS; l++)
        if (!(fitted & (1u << l))) {
            thr[0][l] = old[0][l], thr[1][l] = old[1][l];
            koff += snprintf(kept + koff, sizeof kept - (size_t)koff, "%s%s", koff ? "," : "",
                             train_label_names[l]);
        }
    if (train_evaluate_features(tm.nn, tm.label_index, &d, TRAIN_SPLIT_VAL, feat, thr, after, err,
                                sizeof err) != 0) {
        fprintf(stderr, "ichtriage calibrate: %s\n", err);
        goto out;
    }
    printf("calibration data: %s: %d studies (%d series), %d positive for \"any\"\n", desc,
           npos + nneg, d.nseries, npos);
    print_operating_point("before (stored threshold)", before, old[TRAIN_MODEL_LRCN][0]);
    print_operating_point("after (new threshold, chosen on these studies)", after,
                          thr[TRAIN_MODEL_LRCN][0]);
    if (*kept) printf("kept (no positive or no negative study here): %s\n", kept);
    train_eval_print(stdout, after);

    char date[32], buf[4096];
    time_t tnow = time(NULL);
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&tnow));
    if (train_model_thresholds_set(tm.nn, tm.label_index, thr) != 0) {
        fprintf(stderr, "ichtriage calibrate: cannot store the new thresholds\n");
        goto out;
    }
    snprintf(buf, sizeof buf,
             "study-level sensitivity %.3f on %d studies (%d positive) of %s (ichtriage "
             "calibrate %s)%s%s",
             sens, npos + nneg, npos, desc, date, *kept ? "; kept from before: " : "", kept);
    nn_model_meta_set(tm.nn, "threshold_rule", buf);
    snprintf(buf, sizeof buf, "ichtriage calibrate %s: temperature scaling on %s: %s", date, desc,
             tdesc);
    meta_append(tm.nn, "calibration", buf);
    snprintf(buf, sizeof buf,
             "(at the thresholds of training; ichtriage calibrate %s replaced them, see "
             "calibration_metrics)",
             date);
    meta_append(tm.nn, "metrics", buf);
    char sum[512];
    train_eval_summary(after, sum, sizeof sum);
    snprintf(buf, sizeof buf, "calibration data (threshold chosen on it): %s", sum);
    nn_model_meta_set(tm.nn, "calibration_metrics", buf);
    snprintf(buf, sizeof buf, "recalibrated %s on %s", date, desc);
    meta_append(tm.nn, "provenance", buf);
    if (nn_model_save(tm.nn, out_path, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage calibrate: %s: %s\n", out_path, err);
        goto out;
    }
    snprintf(buf, sizeof buf, "%s (calibration data; the thresholds were chosen on it)", desc);
    if (train_report_write(report, json, "ichtriage calibrate", out_path, buf, after, NULL, 0, NULL,
                           &rel, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage calibrate: %s\n", err);
        goto out;
    }
    util_log(UTIL_LOG_INFO, "calibrate_done",
             "model=%s out=%s studies=%d positive=%d threshold_any=%.4f sensitivity=%.3f "
             "specificity=%.3f",
             model_path, out_path, npos + nneg, npos, thr[TRAIN_MODEL_LRCN][0],
             after->m[TRAIN_LEVEL_STUDY][TRAIN_MODEL_LRCN][0].sensitivity,
             after->m[TRAIN_LEVEL_STUDY][TRAIN_MODEL_LRCN][0].specificity);
    rc = 0;
out:
    free(before), free(after), free(feat);
    if (have_d) {
        train_dataset_free(&d);
        triage_model_free(&tm);
    }
    triage_config_free(&cfg);
    return rc;
}

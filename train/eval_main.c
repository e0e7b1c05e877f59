/* train/eval_main.c: `ichtriage eval MODEL DATA...`: the CNN alone and the
 * LRCN, per slice and per study, at the thresholds stored in the model, with
 * the HTML report and metrics JSON. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"
#include "number.h"
#include "pipeline.h"
#include "registry.h"
#include "trainer.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: ichtriage eval [options] MODEL DATA...\n"
               "Evaluates MODEL on folders in the RSNA 2019 layout (phantom folders too): per\n"
               "slice and per study (max over the slices of all its series), the CNN alone and\n"
               "the LRCN, at the thresholds stored in the model. Decision support, not a\n"
               "diagnosis.\n\n"
               "  --report FILE      HTML report (default eval-report.html)\n"
               "  --json FILE        metrics JSON (default eval-metrics.json)\n"
               "  --compare OTHER    also evaluate the model file OTHER on the same studies and\n"
               "                     compare the two study-level AUCs of \"any\" (DeLong's\n"
               "                     paired test): the difference, its 95%% interval, p\n"
               "  --split all|train|val|test  evaluate one split of the data as `train` made\n"
               "                     it with --seed/--val/--test (default all)\n"
               "  --seed N, --val F, --test F  the split (defaults as in train)\n"
               "  --cache DIR        preprocessed-slice cache\n"
               "  --threads N        CPU threads (default: all cores)\n"
               "  --device D         auto, cpu or cuda (nn.device; default auto)\n"
               "  -c FILE, --set K=V accepted like every subcommand\n"
               "  -h, --help         this text\n");
}

int train_open_model_data(struct triage_model *tm, struct train_dataset *d, const char *model_path,
                          const char *device, char *const *folders, int nfolders, const char *cache,
                          char *desc, size_t descn, char *err, size_t errlen)
{
    char e[1024];
    if (triage_model_load(tm, model_path, e, sizeof e) != 0) {
        snprintf(err, errlen, "%s: %s", model_path, e);
        return -1;
    }
    if (triage_nn_device(tm->nn, device, err, errlen) != 0) {
        triage_model_free(tm);
        return -1;
    }
    train_dataset_init(d, &tm->windows, tm->windows.n, tm->in_h, tm->in_w);
    d->crop_head = tm->crop_head;
    d->context = tm->context;
    int off = 0;
    if (descn) *desc = 0;
    for (int i = 0; i < nfolders; i++) {
        if (train_dataset_add_folder(d, folders[i], cache, err, errlen) != 0) {
            train_dataset_free(d);
            triage_model_free(tm);
            return -1;
        }
        off += snprintf(desc + off, descn - (size_t)off, "%s%s", off ? ", " : "", folders[i]);
        if ((size_t)off >= descn) off = (int)descn - 1;
    }
    return 0;
}

int train_model_fits(const struct triage_model *tm, const struct train_dataset *d)
{
    int same = tm->in_c == d->c * (2 * d->context + 1) && tm->context == d->context &&
               tm->in_h == d->h && tm->in_w == d->w && tm->windows.n == d->windows.n &&
               tm->crop_head == d->crop_head;
    for (int i = 0; same && i < tm->windows.n; i++)
        same = tm->windows.center[i] == d->windows.center[i] &&
               tm->windows.width[i] == d->windows.width[i];
    return same;
}

const struct train_dataset *train_dataset_for_model(const struct triage_model *tm,
                                                    const struct train_dataset *d,
                                                    struct train_dataset *view)
{
    if (train_model_fits(tm, d)) return d;
    *view = *d;
    view->context = tm->context;
    return train_model_fits(tm, view) ? view : NULL;
}

void train_model_thresholds(const struct triage_model *tm, float thr[2][TRAIN_LABELS])
{
    memcpy(thr[1], tm->thresholds, sizeof thr[1]);
    /* triage_model_load has checked that the outputs are at most NN_MAX_LABELS */
    float all[NN_MAX_LABELS];
    train_floats_parse(nn_model_meta_get(tm->nn, "cnn_thresholds"), all,
                       nn_model_config(tm->nn)->labels, 0.5f);
    for (int l = 0; l < TRAIN_LABELS; l++)
        thr[0][l] = all[tm->label_index[l]];
}

int train_model_thresholds_set(nn_model *m, const int *label_index,
                               const float thr[2][TRAIN_LABELS])
{
    static const char *const key[2] = {"cnn_thresholds", "thresholds"};
    int nout = nn_model_config(m)->labels;
    if (nout < TRAIN_LABELS || nout > NN_MAX_LABELS) return -1;
    for (int mo = 0; mo < 2; mo++) {
        float all[NN_MAX_LABELS];
        char buf[NN_MAX_LABELS * 16];
        train_floats_parse(nn_model_meta_get(m, key[mo]), all, nout, 0.5f);
        for (int l = 0; l < TRAIN_LABELS; l++)
            all[label_index ? label_index[l] : l] = thr[mo][l];
        train_floats_format(buf, sizeof buf, all, nout);
        if (nn_model_meta_set(m, key[mo], buf) != 0) return -1;
    }
    return 0;
}

/* store.dir: its frozen test patients are in the test split of --split,
 * as in every training run on its data. */
static char eval_store[1024];

/* --compare: the model at other_path on the same studies as e (d, split),
 * whose LRCN study-level "any" scores and labels are pa and ya: fills e->cmp.
 * A model made for other input gets the same folders preprocessed its own
 * way, and must find the same series in them. Returns 0 or -1 with a
 * message. */
static int compare_with(const char *other_path, const char *device, const struct train_dataset *d,
                        char *const *folders, int nfolders, const char *cache, int split,
                        uint64_t seed, double val, double test, const float *pa,
                        const unsigned char *ya, struct train_eval *e, char *err, size_t errlen)
{
    struct triage_model om;
    struct train_dataset od, view;
    const struct train_dataset *dd;
    char e2[512], desc[8];
    int rc = -1, own = 0;
    if (triage_model_load(&om, other_path, err, errlen) != 0) return -1;
    if (!(dd = train_dataset_for_model(&om, d, &view))) {
        /* made for another input: the folders again, preprocessed for it */
        triage_model_free(&om);
        if (train_open_model_data(&om, &od, other_path, device, folders, nfolders, cache, desc,
                                  sizeof desc, err, errlen) != 0)
            return -1;
        own = 1, dd = &od;
        if (split >= 0 && train_registry_split(&od, eval_store, seed, val, test, err, errlen) < 0)
            goto out;
        int same = od.nseries == d->nseries;
        for (int s = 0; same && s < d->nseries; s++)
            same = strcmp(od.series[s].series_uid, d->series[s].series_uid) == 0 &&
                   strcmp(od.series[s].study_uid, d->series[s].study_uid) == 0 &&
                   od.series[s].split == d->series[s].split;
        if (!same) {
            snprintf(err, errlen,
                     "%s: prepared for its own input, the folders do not give the "
                     "same series as for the first model",
                     other_path);
            goto out;
        }
    } else if (triage_nn_device(om.nn, device, err, errlen) != 0) {
        goto out;
    }
    float thr[2][TRAIN_LABELS];
    train_model_thresholds(&om, thr);
    struct train_eval *oe = malloc(sizeof *oe);
    float *pb = malloc((size_t)(d->nseries ? d->nseries : 1) * sizeof *pb);
    if (!oe || !pb) {
        snprintf(err, errlen, "out of memory");
    } else if (train_evaluate_scores(om.nn, om.label_index, dd, split, thr, oe, pb, NULL, e2,
                                     sizeof e2) != 0) {
        snprintf(err, errlen, "%s: %s", other_path, e2);
    } else {
        train_auc_paired(pa, pb, ya, (size_t)e->nstudies, &e->cmp.auc);
        snprintf(e->cmp.model, sizeof e->cmp.model, "%s", other_path);
        e->cmp.sensitivity = oe->m[TRAIN_LEVEL_STUDY][TRAIN_MODEL_LRCN][0].sensitivity;
        e->cmp.specificity = oe->m[TRAIN_LEVEL_STUDY][TRAIN_MODEL_LRCN][0].specificity;
        e->cmp.valid = 1;
        rc = 0;
    }
    free(oe), free(pb);
out:
    if (own) train_dataset_free(&od);
    triage_model_free(&om);
    return rc;
}

/* A number option's value that is not one, or out of its range. */
static int bad_number(const char *opt, const char *value)
{
    fprintf(stderr, "ichtriage eval: %s \"%s\": not a number in its range (see --help)\n", opt,
            value);
    return 2;
}

int train_eval_main(int argc, char **argv)
{
    struct triage_config cfg;
    char err[1024];
    if (triage_config_from_args(&cfg, &argc, argv, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage eval: %s\n", err);
        return 2;
    }
    char device[16];
    snprintf(device, sizeof device, "%s", triage_config_str(&cfg, CFG_NN_DEVICE));
    snprintf(eval_store, sizeof eval_store, "%s", triage_config_str(&cfg, CFG_STORE_DIR));
    triage_config_free(&cfg);
    static const struct option lo[] = {
        {"report", 1, 0, 'r'},  {"json", 1, 0, 'j'}, {"split", 1, 0, 'p'}, {"seed", 1, 0, 's'},
        {"val", 1, 0, 'v'},     {"test", 1, 0, 't'}, {"cache", 1, 0, 'C'}, {"threads", 1, 0, 'T'},
        {"compare", 1, 0, 'm'}, {"help", 0, 0, 'h'}, {0, 0, 0, 0}};
    const char *report = "eval-report.html", *json = "eval-metrics.json", *cache = NULL;
    const char *compare = NULL;
    int split = -1;
    uint64_t seed = 1;
    double val = 0.15, test = 0.15;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (c) {
        case 'r':
            report = optarg;
            break;
        case 'j':
            json = optarg;
            break;
        case 'p':
            split = strcmp(optarg, "train") == 0  ? 0
                    : strcmp(optarg, "val") == 0  ? 1
                    : strcmp(optarg, "test") == 0 ? 2
                    : strcmp(optarg, "all") == 0  ? -1
                                                  : -2;
            if (split == -2) {
                fprintf(stderr, "ichtriage eval: --split: all, train, val or test\n");
                return 2;
            }
            break;
        case 's':
            if (util_number_u64(optarg, &seed) != 0) return bad_number("--seed", optarg);
            break;
        case 'v':
            if (util_number_double(optarg, &val) != 0 || !(val > 0 && val < 0.5))
                return bad_number("--val", optarg);
            break;
        case 't':
            if (util_number_double(optarg, &test) != 0 || !(test >= 0 && test < 0.5))
                return bad_number("--test", optarg);
            break;
        case 'C':
            cache = optarg;
            break;
        case 'm':
            compare = optarg;
            break;
        case 'T': {
            long n;
            if (util_number_long(optarg, 0, 1024, &n) != 0) return bad_number("--threads", optarg);
            if (n > 0) nn_set_threads((int)n);
            break;
        }
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (argc - optind < 2) {
        usage(stderr);
        return 2;
    }
    const char *model_path = argv[optind];
    struct triage_model tm;
    struct train_dataset d;
    char desc[2048];
    if (train_open_model_data(&tm, &d, model_path, device, argv + optind + 1, argc - optind - 1,
                              cache, desc, sizeof desc, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage eval: %s\n", err);
        return 1;
    }
    float thr[2][TRAIN_LABELS];
    train_model_thresholds(&tm, thr);
    int rc = 1;
    struct train_eval *e = malloc(sizeof *e);
    float *pa = malloc((size_t)(d.nseries ? d.nseries : 1) * sizeof *pa);
    unsigned char *ya = malloc((size_t)(d.nseries ? d.nseries : 1));
    if (!e || !pa || !ya) goto out;
    int off = (int)strlen(desc);
    if (split >= 0) {
        if (train_registry_split(&d, eval_store, seed, val, test, err, sizeof err) < 0) {
            fprintf(stderr, "ichtriage eval: frozen test split: %s\n", err);
            goto out;
        }
        snprintf(desc + off, sizeof desc - (size_t)off, " (split %d of seed %llu)", split,
                 (unsigned long long)seed);
    }
    if (train_evaluate_scores(tm.nn, tm.label_index, &d, split, thr, e, pa, ya, err, sizeof err) !=
        0) {
        fprintf(stderr, "ichtriage eval: %s\n", err);
        goto out;
    }
    if (compare && compare_with(compare, device, &d, argv + optind + 1, argc - optind - 1, cache,
                                split, seed, val, test, pa, ya, e, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage eval: --compare %s\n", err);
        goto out;
    }
    train_eval_print(stdout, e);
    if (train_report_write(report, json, "ichtriage eval", model_path, desc, e, NULL, 0, NULL, NULL,
                           err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage eval: %s\n", err);
        goto out;
    }
    char sum[512];
    train_eval_summary(e, sum, sizeof sum);
    util_log(UTIL_LOG_INFO, "eval_done", "model=%s report=%s %s", model_path, report, sum);
    if (e->cmp.valid) {
        char x[6][32]; /* n/a for what the studies cannot give, as printed */
        util_log(UTIL_LOG_INFO, "eval_compare",
                 "model=%s other=%s study_auc_any=%s other_study_auc_any=%s "
                 "difference=%s difference_ci95=%s,%s p=%s",
                 model_path, compare, train_num(x[0], "%.4f", e->cmp.auc.auc_a),
                 train_num(x[1], "%.4f", e->cmp.auc.auc_b),
                 train_num(x[2], "%.4f", e->cmp.auc.diff), train_num(x[3], "%.4f", e->cmp.auc.lo),
                 train_num(x[4], "%.4f", e->cmp.auc.hi), train_num(x[5], "%.4g", e->cmp.auc.p));
    }
    rc = 0;
out:
    free(e), free(pa), free(ya);
    train_dataset_free(&d);
    triage_model_free(&tm);
    return rc;
}

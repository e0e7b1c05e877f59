/* train/eval_main.c: `ichtriage eval MODEL DATA...`: the CNN alone and the
 * LRCN, per slice and per study, at the thresholds stored in the model, with
 * the HTML report and metrics JSON. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"
#include "pipeline.h"
#include "trainer.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: ichtriage eval [options] MODEL DATA...\n"
               "Evaluates MODEL on folders in the RSNA 2019 layout (phantom folders too): per\n"
               "slice and per study (max over its slices), the CNN alone and the LRCN, at the\n"
               "thresholds stored in the model. Decision support, not a diagnosis.\n\n"
               "  --report FILE      HTML report (default eval-report.html)\n"
               "  --json FILE        metrics JSON (default eval-metrics.json)\n"
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
    train_dataset_init(d, &tm->windows, tm->in_c, tm->in_h, tm->in_w);
    d->crop_head = tm->crop_head;
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
    triage_config_free(&cfg);
    static const struct option lo[] = {
        {"report", 1, 0, 'r'}, {"json", 1, 0, 'j'}, {"split", 1, 0, 'p'}, {"seed", 1, 0, 's'},
        {"val", 1, 0, 'v'},    {"test", 1, 0, 't'}, {"cache", 1, 0, 'C'}, {"threads", 1, 0, 'T'},
        {"help", 0, 0, 'h'},   {0, 0, 0, 0}};
    const char *report = "eval-report.html", *json = "eval-metrics.json", *cache = NULL;
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
            seed = strtoull(optarg, NULL, 10);
            break;
        case 'v':
            val = atof(optarg);
            break;
        case 't':
            test = atof(optarg);
            break;
        case 'C':
            cache = optarg;
            break;
        case 'T':
            nn_set_threads(atoi(optarg));
            break;
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
    memcpy(thr[1], tm.thresholds, sizeof thr[1]);
    train_floats_parse(nn_model_meta_get(tm.nn, "cnn_thresholds"), thr[0], TRAIN_LABELS, 0.5f);
    int rc = 1;
    struct train_eval *e = malloc(sizeof *e);
    if (!e) goto out;
    int off = (int)strlen(desc);
    if (split >= 0) {
        train_dataset_split(&d, seed, val, test);
        snprintf(desc + off, sizeof desc - (size_t)off, " (split %d of seed %llu)", split,
                 (unsigned long long)seed);
    }
    if (train_evaluate(tm.nn, &d, split, thr, e, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage eval: %s\n", err);
        goto out;
    }
    train_eval_print(stdout, e);
    if (train_report_write(report, json, "ichtriage eval", model_path, desc, e, NULL, 0, NULL, err,
                           sizeof err) != 0) {
        fprintf(stderr, "ichtriage eval: %s\n", err);
        goto out;
    }
    char sum[512];
    train_eval_summary(e, sum, sizeof sum);
    util_log(UTIL_LOG_INFO, "eval_done", "model=%s report=%s %s", model_path, report, sum);
    rc = 0;
out:
    free(e);
    train_dataset_free(&d);
    triage_model_free(&tm);
    return rc;
}

/* train/train_main.c: `ichtriage train`, the two-stage training with early
 * stopping, checkpoints every epoch and resume, calibration, the operating
 * threshold, the final evaluation and report, and registration. */
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "config.h"
#include "loc.h"
#include "log.h"
#include "number.h"
#include "pipeline.h"
#include "registry.h"
#include "trainer.h"

#define MAX_DATA 16

/* The "labels" of every model the trainer makes: its outputs in our order. */
#define OUR_LABELS "any,epidural,intraparenchymal,intraventricular,subarachnoid,subdural"

struct opts {
    const char *data[MAX_DATA];
    int ndata;
    const char *out, *workdir, *cache, *arch, *init, *windows, *provenance;
    uint64_t seed;
    int input_hw;
    int epochs1, epochs2, patience, batch, series_batch, slices_per_epoch, threads;
    float lr1, lr2, lr_decay, val_frac, test_frac;
    double sensitivity; /* a double all the way to the threshold: 0.85f asks for too much */
    int reg;
    int no_augment;
    float sharp;
    int val_any;      /* early stopping on the AUC of "any" alone */
    int reviews;      /* the node's reviewed studies as data too */
    float study_loss; /* weight of the stage-2 max-over-slices term for slice-labelled series */
    float hard_neg;   /* share of each stage-1 epoch drawn from hard negatives */
    float small;      /* share of each stage-1 epoch drawn from small bleeds' slices */
    int small_slices; /* a small bleed shows on at most this many slices of its series */
    int auto_promote; /* with --register: promote if at least as good as the active model */
    bool crop_head;   /* --crop head: the head crop before the resize */
    int val_slices;   /* stage 1 validates on this many validation slices (0: all) */
    int context;      /* --context: neighbouring slices each side as channels */
    float loc_loss;   /* --loc-loss: weight of stage 1's localisation loss (0: none) */
    bool loc_cells;   /* --loc-cell-weights: the cells' own positive-class weights */
    float ema;        /* --ema: stage 1 validates and keeps an average of its weights (0: none) */
};

struct state {
    int stage; /* 1, 2, or 3 when both are done */
    int epoch; /* epochs completed in this stage */
    double best;
    int best_epoch, bad;
};

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: ichtriage train [options] DATA...\n"
        "Trains an LRCN (CNN per slice, BiLSTM across slices, 6 labels) in two stages on\n"
        "folders in the RSNA 2019 layout (phantom folders too), evaluates it and writes a\n"
        "report. Decision support, not a diagnosis.\n\n"
        "  -o, --out FILE          the trained model (default model.safetensors)\n"
        "  --workdir DIR           checkpoints, history, report (default OUT.work); a run\n"
        "                          that finds its checkpoints there resumes\n"
        "  --cache DIR             preprocessed-slice cache (default DATA/.ichtriage-cache);\n"
        "                          with --reviews, the reviewed slices go to a file there\n"
        "                          too (deleted at the end) instead of memory\n"
        "  --arch small|vgg19|SPEC architecture (default small)\n"
        "  --init FILE             start from these weights (a model file, e.g. VGG19 made\n"
        "                          by train/vgg19_to_ichtriage.py; with --context, a first\n"
        "                          convolution made for one slice goes to the centre one)\n"
        "  --windows C/W,C/W,C/W   channel windows (default 40/80,80/200,600/2800)\n"
        "  --input N               slice size N x N (default 128)\n"
        "  --crop head|none        crop each series to a square around the head before\n"
        "                          the resize (preprocessing crop=head; default none)\n"
        "  --context K             each slice's input also holds the windows of the K\n"
        "                          slices either side of it (0-4, default 0: the slice\n"
        "                          alone; the model's \"context\")\n"
        "  --seed N                split, weights, shuffles, augmentation (default 1)\n"
        "  --epochs1 N, --epochs2 N  most epochs per stage (default 12, 30; --epochs2 0:\n"
        "                          stage 1 only)\n"
        "  --patience N            epochs without a better validation score (default 3)\n"
        "  --batch N               slices per stage-1 step (default 32)\n"
        "  --series-batch N        series per stage-2 step (default 8)\n"
        "  --slices-per-epoch N    stage-1 slices drawn per epoch (default: all)\n"
        "  --lr1 X, --lr2 X        Adam learning rates (default 1e-3, 1e-3)\n"
        "  --lr-decay F            stage-1 learning rate times F after each epoch (1)\n"
        "  --study-loss W          stage 2: add W x a max-over-slices (study-level) loss\n"
        "                          for series with slice labels too (default 0)\n"
        "  --hard-negatives F      stage 1, from the second epoch: a share F of each epoch's\n"
        "                          slices are the negatives the model finds hardest (the\n"
        "                          highest \"any\" of 4x as many slices of negative series\n"
        "                          drawn at random); default 0\n"
        "  --small-bleeds F        stage 1: a share F of each epoch's slices are drawn from\n"
        "                          the slices of small bleeds (series whose \"any\" shows on\n"
        "                          1 to --small-bleed-slices slices); default 0\n"
        "  --small-bleed-slices N  what a small bleed is, in slices (default 3)\n"
        "  --ema D                 stage 1: keep an exponential moving average of the\n"
        "                          weights (decay D per step, 0.5 <= D < 1), validate it\n"
        "                          and keep it as the stage's result; default 0 (none)\n"
        "  --loc-loss W            stage 1: add W x a loss on where the blood is, per cell\n"
        "                          of the CNN's last map, for slices with blood masks\n"
        "                          (phantom folders made with --masks); default 0\n"
        "  --loc-cell-weights      with --loc-loss: weigh blood in a cell by how rare blood\n"
        "                          is among the cells of the training masks (negative /\n"
        "                          positive cells, at most 100), not among slices\n"
        "  --val F, --test F       share of patients for validation and test (0.15, 0.15)\n"
        "  --sensitivity S         study-level sensitivity the threshold aims at (0.95)\n"
        "  --val-metric mean|any   early stopping on the mean slice-level validation AUC\n"
        "                          over the labels (default) or on that of \"any\"\n"
        "  --val-slices N          stage 1 validates on N validation slices drawn once with\n"
        "                          the seed (default 0: all); stage 2 and the final\n"
        "                          evaluation use all of them\n"
        "  --threads N             CPU threads (default: all cores)\n"
        "  --device auto|cpu|cuda  where the model runs (nn.device; default auto)\n"
        "  --sharp F               stage 1: a share F of the augmented slices are moved by\n"
        "                          whole pixels only (no rotation), so that they keep the\n"
        "                          sharpness inference sees (default 0)\n"
        "  --no-augment            (tests) no augmentation\n"
        "  --provenance TEXT       added to the model's provenance\n"
        "  --register              register the model under <store.dir>/models\n"
        "  --auto-promote          implies --register; makes it the active model if it is at\n"
        "                          least as good as the active one on the frozen test\n"
        "                          patients (also: train.auto_promote = yes)\n"
        "                          (study AUC for any and sensitivity at its threshold)\n"
        "  --reviews               also learn from the node's reviewed studies (study-level\n"
        "                          labels from <store.dir>/ichtriage.db, images from its spool)\n"
        "  -c FILE, --set K=V      configuration (store.dir for --register)\n"
        "  -h, --help              this text\n");
}

/* A number option's value; *bad is set to it when it is not a number of
 * the kind (or is out of range), so that "--epochs1 x" is refused rather
 * than read as 0. */
static int int_arg(const char *s, const char **bad)
{
    long v = 0;
    if (util_number_long(s, INT_MIN, INT_MAX, &v) != 0) *bad = s;
    return (int)v;
}

static double double_arg(const char *s, const char **bad)
{
    double v = 0;
    if (util_number_double(s, &v) != 0) *bad = s;
    return v;
}

static float float_arg(const char *s, const char **bad)
{
    double v = double_arg(s, bad);
    if (fabs(v) > FLT_MAX) *bad = s;
    return (float)v;
}

static uint64_t seed_arg(const char *s, const char **bad)
{
    uint64_t v = 0;
    if (util_number_u64(s, &v) != 0) *bad = s;
    return v;
}

static int parse(struct opts *o, int argc, char **argv)
{
    const char *bad = NULL; /* a number option's value that is not one */
    static const struct option lo[] = {
        {"out", 1, 0, 'o'},          {"workdir", 1, 0, 'w'},
        {"cache", 1, 0, 'C'},        {"arch", 1, 0, 'a'},
        {"init", 1, 0, 'I'},         {"windows", 1, 0, 'W'},
        {"input", 1, 0, 'i'},        {"seed", 1, 0, 's'},
        {"epochs1", 1, 0, '1'},      {"epochs2", 1, 0, '2'},
        {"patience", 1, 0, 'p'},     {"batch", 1, 0, 'b'},
        {"series-batch", 1, 0, 'B'}, {"slices-per-epoch", 1, 0, 'S'},
        {"lr1", 1, 0, 'l'},          {"lr2", 1, 0, 'L'},
        {"val", 1, 0, 'v'},          {"test", 1, 0, 't'},
        {"sensitivity", 1, 0, 'x'},  {"threads", 1, 0, 'T'},
        {"no-augment", 0, 0, 'N'},   {"sharp", 1, 0, 'F'},
        {"provenance", 1, 0, 'P'},   {"register", 0, 0, 'R'},
        {"val-metric", 1, 0, 'M'},   {"lr-decay", 1, 0, 'y'},
        {"reviews", 0, 0, 'V'},      {"study-loss", 1, 0, 'Y'},
        {"auto-promote", 0, 0, 'A'}, {"hard-negatives", 1, 0, 'H'},
        {"small-bleeds", 1, 0, 'E'}, {"small-bleed-slices", 1, 0, 'e'},
        {"ema", 1, 0, 'Z'},          {"crop", 1, 0, 'K'},
        {"val-slices", 1, 0, 'Q'},   {"context", 1, 0, 'k'},
        {"loc-loss", 1, 0, 'G'},     {"loc-cell-weights", 0, 0, 'g'},
        {"help", 0, 0, 'h'},         {0, 0, 0, 0}};
    *o = (struct opts){.out = "model.safetensors",
                       .arch = "small",
                       .seed = 1,
                       .input_hw = 128,
                       .epochs1 = 12,
                       .epochs2 = 30,
                       .patience = 3,
                       .batch = 32,
                       .series_batch = 8,
                       .lr1 = 1e-3f,
                       .lr_decay = 1.0f,
                       .lr2 = 1e-3f,
                       .val_frac = 0.15f,
                       .test_frac = 0.15f,
                       .sensitivity = 0.95,
                       .small_slices = 3};
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "o:h", lo, NULL)) != -1) {
        switch (c) {
        case 'o':
            o->out = optarg;
            break;
        case 'w':
            o->workdir = optarg;
            break;
        case 'C':
            o->cache = optarg;
            break;
        case 'a':
            o->arch = optarg;
            break;
        case 'I':
            o->init = optarg;
            break;
        case 'W':
            o->windows = optarg;
            break;
        case 'i':
            o->input_hw = int_arg(optarg, &bad);
            break;
        case 's':
            o->seed = seed_arg(optarg, &bad);
            break;
        case '1':
            o->epochs1 = int_arg(optarg, &bad);
            break;
        case '2':
            o->epochs2 = int_arg(optarg, &bad);
            break;
        case 'p':
            o->patience = int_arg(optarg, &bad);
            break;
        case 'b':
            o->batch = int_arg(optarg, &bad);
            break;
        case 'B':
            o->series_batch = int_arg(optarg, &bad);
            break;
        case 'S':
            o->slices_per_epoch = int_arg(optarg, &bad);
            break;
        case 'l':
            o->lr1 = float_arg(optarg, &bad);
            break;
        case 'L':
            o->lr2 = float_arg(optarg, &bad);
            break;
        case 'v':
            o->val_frac = float_arg(optarg, &bad);
            break;
        case 't':
            o->test_frac = float_arg(optarg, &bad);
            break;
        case 'x':
            o->sensitivity = double_arg(optarg, &bad);
            break;
        case 'T':
            o->threads = int_arg(optarg, &bad);
            break;
        case 'N':
            o->no_augment = 1;
            break;
        case 'F':
            o->sharp = float_arg(optarg, &bad);
            break;
        case 'P':
            o->provenance = optarg;
            break;
        case 'R':
            o->reg = 1;
            break;
        case 'A':
            o->auto_promote = 1;
            o->reg = 1;
            break;
        case 'Y':
            o->study_loss = float_arg(optarg, &bad);
            break;
        case 'H':
            o->hard_neg = float_arg(optarg, &bad);
            break;
        case 'E':
            o->small = float_arg(optarg, &bad);
            break;
        case 'e':
            o->small_slices = int_arg(optarg, &bad);
            break;
        case 'Z':
            o->ema = float_arg(optarg, &bad);
            break;
        case 'K':
            if (strcmp(optarg, "head") != 0 && strcmp(optarg, "none") != 0) return -1;
            o->crop_head = strcmp(optarg, "head") == 0;
            break;
        case 'Q':
            o->val_slices = int_arg(optarg, &bad);
            break;
        case 'k':
            o->context = int_arg(optarg, &bad);
            break;
        case 'G':
            o->loc_loss = float_arg(optarg, &bad);
            break;
        case 'g':
            o->loc_cells = true;
            break;
        case 'V':
            o->reviews = 1;
            break;
        case 'y':
            o->lr_decay = float_arg(optarg, &bad);
            break;
        case 'M':
            if (strcmp(optarg, "any") != 0 && strcmp(optarg, "mean") != 0) return -1;
            o->val_any = strcmp(optarg, "any") == 0;
            break;
        case 'h':
            usage(stdout);
            exit(0);
        default:
            return -1;
        }
    }
    for (int i = optind; i < argc; i++) {
        if (o->ndata == MAX_DATA) {
            fprintf(stderr, "ichtriage train: at most %d data folders\n", MAX_DATA);
            return -1;
        }
        o->data[o->ndata++] = argv[i];
    }
    if (o->ndata == 0 && !o->reviews) {
        fprintf(stderr, "ichtriage train: no DATA folder given (nor --reviews)\n");
        return -1;
    }
    if (bad) {
        fprintf(stderr, "ichtriage train: \"%s\" is not a number this option takes (see --help)\n",
                bad);
        return -1;
    }
    if (o->input_hw < 16 || o->input_hw > 512 || o->epochs1 < 0 || o->epochs2 < 0 ||
        o->patience < 1 || o->batch < 1 || o->batch > 1024 || o->series_batch < 1 ||
        !(o->val_frac > 0 && o->val_frac < 0.5) || !(o->test_frac >= 0 && o->test_frac < 0.5) ||
        !(o->sensitivity > 0 && o->sensitivity <= 1) || !(o->lr1 > 0) || !(o->lr2 > 0) ||
        !(o->lr_decay > 0 && o->lr_decay <= 1) || !(o->hard_neg >= 0 && o->hard_neg <= 0.5f) ||
        !(o->small >= 0 && o->small <= 0.5f) || o->small_slices < 1 || o->small_slices > 1000 ||
        o->val_slices < 0 || o->context < 0 || o->context > TRIAGE_MAX_CONTEXT ||
        !(o->loc_loss >= 0 && o->loc_loss <= 100) ||
        !(o->ema == 0 || (o->ema >= 0.5f && o->ema < 1)) || !(o->sharp >= 0 && o->sharp <= 1) ||
        (o->loc_loss > 0 && o->input_hw % TRAIN_MASK_SCALE != 0)) {
        fprintf(stderr, "ichtriage train: an option is out of range (see --help)\n");
        return -1;
    }
    if (o->loc_cells && !(o->loc_loss > 0)) {
        fprintf(stderr, "ichtriage train: --loc-cell-weights needs --loc-loss W (W > 0)\n");
        return -1;
    }
    return 0;
}

/* ---- state and history files ------------------------------------------------ */

static int state_read(const char *dir, struct state *s)
{
    char p[1200];
    snprintf(p, sizeof p, "%s/state", dir);
    FILE *f = fopen(p, "r");
    if (!f) return -1;
    int n = fscanf(f, "stage=%d epoch=%d best=%lf best_epoch=%d bad=%d", &s->stage, &s->epoch,
                   &s->best, &s->best_epoch, &s->bad);
    fclose(f);
    return n == 5 ? 0 : -1;
}

/* The training state inside the checkpoint's own metadata, written with the
 * weights in one file (a crash between two files cannot pair one epoch's
 * weights with another's state), and the optimizer's step count to match. */
#define CHECKPOINT_KEY "train_checkpoint"

static int state_parse(const char *v, struct state *s, long *adam_steps)
{
    return v && sscanf(v, "stage=%d epoch=%d best=%lf best_epoch=%d bad=%d adam_steps=%ld",
                       &s->stage, &s->epoch, &s->best, &s->best_epoch, &s->bad, adam_steps) == 6
               ? 0
               : -1;
}

/* Replaces dir/name with text: a temporary file, fsync, rename. */
static int replace_text(const char *dir, const char *name, const char *text)
{
    char p[1200], t[1210];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    snprintf(t, sizeof t, "%s.tmp", p);
    FILE *f = fopen(t, "w");
    if (!f) return -1;
    fputs(text, f);
    if (fflush(f) != 0 || fsync(fileno(f)) != 0) {
        fclose(f);
        unlink(t);
        return -1;
    }
    fclose(f);
    return rename(t, p);
}

static int state_write(const char *dir, const struct state *s)
{
    char text[200];
    snprintf(text, sizeof text, "stage=%d epoch=%d best=%.17g best_epoch=%d bad=%d\n", s->stage,
             s->epoch, s->best, s->best_epoch, s->bad);
    return replace_text(dir, "state", text);
}

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        h = (h ^ ((const uint8_t *)p)[i]) * 1099511628211ULL;
    return h;
}

/* What a run trains on, as a key: every series (UIDs, patient, slices,
 * labels) with the split it is in (which the seed, the fractions and the
 * frozen test patients decide), the seed, the architecture and --init. A
 * checkpoint made for another key is not resumed: its patients may now be
 * in the validation or test split, and a finished run must not stand for
 * one on new data (the weekly timer reuses its workdir). */
static uint64_t run_key(const struct train_dataset *d, const struct opts *o)
{
    uint64_t h = 1469598103934665603ULL;
    h = fnv(h, &o->seed, sizeof o->seed);
    h = fnv(h, o->arch ? o->arch : "", strlen(o->arch ? o->arch : "") + 1);
    h = fnv(h, o->init ? o->init : "", strlen(o->init ? o->init : "") + 1);
    for (int s = 0; s < d->nseries; s++) {
        const struct train_series *se = &d->series[s];
        h = fnv(h, se->study_uid, strlen(se->study_uid) + 1);
        h = fnv(h, se->series_uid, strlen(se->series_uid) + 1);
        h = fnv(h, se->patient_id, strlen(se->patient_id) + 1);
        int v[3] = {se->n, se->slice_labels, se->split};
        h = fnv(h, v, sizeof v);
        h = fnv(h, se->study, sizeof se->study);
        h = fnv(h, d->labels + se->first * TRAIN_LABELS, (size_t)se->n * TRAIN_LABELS);
    }
    return h;
}

/* The key of the run a workdir holds (workdir/run-key); 0 when it has none
 * (made before the key was kept). */
static uint64_t run_key_read(const char *dir)
{
    char p[1200];
    snprintf(p, sizeof p, "%s/run-key", dir);
    FILE *f = fopen(p, "r");
    unsigned long long k = 0;
    if (f) {
        if (fscanf(f, "%llx", &k) != 1) k = 0;
        fclose(f);
    }
    return (uint64_t)k;
}

static int run_key_write(const char *dir, uint64_t key)
{
    char text[32];
    snprintf(text, sizeof text, "%016llx\n", (unsigned long long)key);
    return replace_text(dir, "run-key", text);
}

static int history_read(const char *dir, struct train_epoch *h, int max)
{
    char p[1200];
    snprintf(p, sizeof p, "%s/history.csv", dir);
    FILE *f = fopen(p, "r");
    if (!f) return 0;
    int n = 0;
    char line[256];
    while (n < max && fgets(line, sizeof line, f)) {
        struct train_epoch e;
        if (sscanf(line, "%d,%d,%lf,%lf,%lf,%lf", &e.stage, &e.epoch, &e.train_loss, &e.val_loss,
                   &e.val_auc, &e.seconds) == 6)
            h[n++] = e;
    }
    fclose(f);
    return n;
}

/* One row of history.csv. */
static void history_row(FILE *f, const struct train_epoch *e)
{
    fprintf(f, "%d,%d,%.6f,%.6f,%.6f,%.1f\n", e->stage, e->epoch, e->train_loss, e->val_loss,
            e->val_auc, e->seconds);
}

/* At a resume: drops the rows of epochs after the checkpoint's (stage,
 * epoch). A kill between an epoch's row and its checkpoint left the row,
 * and the epoch, trained again, was listed twice in the history and the
 * report. */
static void history_trim(const char *dir, int stage, int epoch)
{
    enum { MAX = 10000 };
    struct train_epoch *h = malloc(MAX * sizeof *h);
    if (!h) return;
    int n = history_read(dir, h, MAX), keep = 0;
    for (int i = 0; i < n; i++)
        if (h[i].stage < stage || (h[i].stage == stage && h[i].epoch <= epoch)) h[keep++] = h[i];
    if (keep < n) {
        char p[1200], t[1210];
        snprintf(p, sizeof p, "%s/history.csv", dir);
        snprintf(t, sizeof t, "%s.tmp", p);
        FILE *f = fopen(t, "w");
        for (int i = 0; f && i < keep; i++)
            history_row(f, &h[i]);
        if (f && fclose(f) == 0 && rename(t, p) == 0)
            util_log(UTIL_LOG_INFO, "train_history_trimmed", "rows_dropped=%d", n - keep);
    }
    free(h);
}

static void history_append(const char *dir, const struct train_epoch *e)
{
    char p[1200];
    snprintf(p, sizeof p, "%s/history.csv", dir);
    FILE *f = fopen(p, "a");
    if (!f) return;
    history_row(f, e);
    fclose(f);
}

/* ---- progress ------------------------------------------------------------------- */

struct progress {
    int tty;
    double t0;
    int stage, epoch, epochs;
    size_t items;  /* slices (stage 1) or series (stage 2) trained on so far */
    double t_last; /* when the last step ended */
};

/* Slices or series per second of the epoch's training steps (validation
 * not counted). */
static double progress_rate(const struct progress *p)
{
    return p->t_last > p->t0 ? (double)p->items / (p->t_last - p->t0) : 0;
}

static void progress_show(struct progress *p, int done, int total, double loss, size_t items)
{
    p->items = items, p->t_last = util_clock_s();
    if (!p->tty) return;
    double el = p->t_last - p->t0, rate = el > 0 ? (double)items / el : 0;
    double eta = done > 0 ? el * (total - done) / done : 0;
    char bar[31];
    int fill = total ? 30 * done / total : 0;
    for (int i = 0; i < 30; i++)
        bar[i] = i < fill ? '#' : '.';
    bar[30] = 0;
    fprintf(stderr, "\rstage %d epoch %d/%d [%s] %d/%d loss %.4f %.1f %s/s ETA %dm%02ds ", p->stage,
            p->epoch, p->epochs, bar, done, total, loss, rate, p->stage == 1 ? "slices" : "series",
            (int)eta / 60, (int)eta % 60);
    if (done == total) fputc('\n', stderr);
}

/* ---- validation score ----------------------------------------------------------- */

/* The early-stopping score: the mean AUC of b over the labels present, or
 * that of "any" alone. */
/* NAN when no label has an AUC. */
static double mean_auc_or_nan(const struct train_binary b[TRAIN_LABELS], int any_only)
{
    double s = 0;
    int n = 0;
    for (int l = 0; l < (any_only ? 1 : TRAIN_LABELS); l++)
        if (!isnan(b[l].auc)) s += b[l].auc, n++;
    return n ? s / n : NAN;
}

static double mean_auc(const struct train_binary b[TRAIN_LABELS], int any_only)
{
    double a = mean_auc_or_nan(b, any_only);
    return isnan(a) ? 0 : a;
}

/* Mean slice-level AUC over the labels present on validation, and the RSNA
 * weighted log loss, of the CNN (stage 1) or LRCN (stage 2). A validation
 * split of reviewed studies only has no slice labels: then the same at the
 * study level (max over slices), which reviews label; it had scored 0 and
 * NAN every epoch, and early stopping kept the first. */
static int validate(nn_model *m, const struct train_dataset *d, const float *feat, int lrcn,
                    int any_only, double *auc, double *loss, char *err, size_t errlen)
{
    float thr[2][TRAIN_LABELS];
    for (int i = 0; i < 2; i++)
        for (int l = 0; l < TRAIN_LABELS; l++)
            thr[i][l] = 0.5f;
    struct train_eval *e = malloc(sizeof *e);
    if (!e) snprintf(err, errlen, "out of memory");
    if (!e ||
        train_evaluate_features(m, NULL, d, TRAIN_SPLIT_VAL, feat, thr, e, err, errlen) != 0) {
        free(e);
        return -1;
    }
    int mo = lrcn ? TRAIN_MODEL_LRCN : TRAIN_MODEL_CNN;
    int level = isnan(mean_auc_or_nan(e->m[TRAIN_LEVEL_SLICE][mo], any_only)) ? TRAIN_LEVEL_STUDY
                                                                              : TRAIN_LEVEL_SLICE;
    *auc = mean_auc(e->m[level][mo], any_only);
    *loss = e->weighted_logloss[level][mo];
    free(e);
    return 0;
}

/* The same score for stage 1 on a fixed sample of validation slices (the
 * CNN alone, slice level): each epoch's validation costs a pass over them. */
static int validate_sample(nn_model *m, const struct train_dataset *d, const size_t *idx, size_t n,
                           int any_only, double *auc, double *loss, char *err, size_t errlen)
{
    struct train_binary b[TRAIN_LABELS];
    if (train_evaluate_slices(m, d, idx, n, b, loss, err, errlen) != 0) return -1;
    *auc = mean_auc(b, any_only);
    return 0;
}

/* ---- stage 1 --------------------------------------------------------------------- */

/* Fisher-Yates over idx [0, n), seeded by *rng. */
static void shuffle(size_t *idx, size_t n, uint64_t *rng)
{
    for (size_t i = n - 1; n > 1 && i > 0; i--) {
        size_t j = nn_rng_next(rng) % (i + 1), t = idx[i];
        idx[i] = idx[j], idx[j] = t;
    }
}

/* n of the training slices of small bleeds (train_small_bleed_slices) into
 * out, in a fresh random order each round through them (so each appears
 * n / pool times, give or take one). Returns the pool's size (0: nothing
 * written, the places keep their draw) or a negative NN_E* code. */
static int small_bleeds(const struct train_dataset *d, int max_slices, int n, uint64_t *rng,
                        size_t *out)
{
    int np = train_small_bleed_slices(d, max_slices, NULL);
    if (np == 0) return 0;
    size_t *pool = malloc((size_t)np * sizeof *pool);
    if (!pool) return NN_ENOMEM;
    train_small_bleed_slices(d, max_slices, pool);
    for (int k = 0; k < n; k++) {
        if (k % np == 0) shuffle(pool, (size_t)np, rng);
        out[k] = pool[k % np];
    }
    free(pool);
    return np;
}

static int save_model(nn_model *m, const char *path)
{
    char err[256];
    int rc = nn_model_save(m, path, err, sizeof err);
    if (rc != 0) util_log(UTIL_LOG_ERROR, "train_save_failed", "path=%s error=\"%s\"", path, err);
    return rc;
}

/* Saves m with one more metadata entry, key = value, that stays out of m. */
static int save_model_with(nn_model *m, const char *path, const char *key, const char *value)
{
    if (nn_model_meta_set(m, key, value) != 0) return -1;
    int rc = save_model(m, path);
    nn_model_meta_set(m, key, NULL);
    return rc;
}

/* ---- weight averaging (--ema) ------------------------------------------------------ */

/* Stage 1's average of the weights: updated after every optimizer step,
 * validated, kept as the best epoch's weights and checkpointed with the run
 * (workdir/last-ema.safetensors, a model file of its own, tied to the
 * optimizer's step count). raw holds the trained weights while the average
 * is in the model. */
struct ema {
    float *avg, *raw;
    size_t n;
    double decay;
};

#define EMA_STEPS_KEY "train_ema_steps"

static void ema_free(struct ema *e)
{
    free(e->avg), free(e->raw);
    *e = (struct ema){0};
}

static void ema_step(struct ema *e, nn_model *m)
{
    nn_model_state_get(m, e->raw);
    train_ema_update(e->avg, e->raw, e->n, e->decay, nn_model_optimizer_steps(m));
}

/* The average in, the trained weights out of the way; and back. */
static void ema_in(struct ema *e, nn_model *m)
{
    nn_model_state_get(m, e->raw);
    nn_model_state_set(m, e->avg);
}

static void ema_out(struct ema *e, nn_model *m)
{
    nn_model_state_set(m, e->raw);
}

/* The average of a run resumed at m's optimizer step, else (a new run, or a
 * checkpoint of another step) m's own weights, with a warning when a run
 * resumes without it. */
static int ema_start(struct ema *e, nn_model *m, double decay, const char *workdir)
{
    e->n = nn_model_state_size(m);
    e->decay = decay;
    e->avg = malloc(e->n * sizeof(float));
    e->raw = malloc(e->n * sizeof(float));
    if (!e->avg || !e->raw) {
        ema_free(e);
        return -1;
    }
    nn_model_state_get(m, e->avg);
    long steps = nn_model_optimizer_steps(m);
    if (steps == 0) return 0;
    char p[1200], err[512] = "", why[1400] = "";
    snprintf(p, sizeof p, "%s/last-ema.safetensors", workdir);
    nn_model *a = nn_model_load(p, err, sizeof err);
    const char *v = a ? nn_model_meta_get(a, EMA_STEPS_KEY) : NULL;
    if (!a)
        snprintf(why, sizeof why, "%s", err);
    else if (!v || strtol(v, NULL, 10) != steps)
        snprintf(why, sizeof why, "%s is of step %s, the checkpoint of step %ld", p, v ? v : "?",
                 steps);
    else if (nn_model_state_size(a) != e->n)
        snprintf(why, sizeof why, "%s is of another architecture", p);
    else
        nn_model_state_get(a, e->avg);
    nn_model_free(a);
    if (why[0])
        util_log(UTIL_LOG_WARN, "train_resume_ema",
                 "state=fresh reason=\"%s\" (the average starts again from the weights; the run "
                 "goes on, not bit-identical to an uninterrupted one)",
                 why);
    return 0;
}

/* Writes the average (in the model now) as workdir/last-ema.safetensors,
 * before the checkpoint of the same step. */
static int ema_save(nn_model *m, const char *workdir)
{
    char p[1200], v[32];
    snprintf(p, sizeof p, "%s/last-ema.safetensors", workdir);
    snprintf(v, sizeof v, "%ld", nn_model_optimizer_steps(m));
    return save_model_with(m, p, EMA_STEPS_KEY, v);
}

/* What stage 1 may learn from, being certain: slices with labels; of
 * study-level (reviewed) series, every slice of a negative study and, of a
 * positive one, the slices the reviewer marked (their unknown subtype
 * labels are left out of the loss). */
static bool certain_slice(const struct train_dataset *d, const struct train_series *se, int k)
{
    return se->slice_labels || !se->study[0] ||
           d->labels[(se->first + (size_t)k) * TRAIN_LABELS] == 1;
}

static size_t certain_train_slices(const struct train_dataset *d)
{
    size_t n = 0;
    for (int s = 0; s < d->nseries; s++)
        for (int k = 0; d->series[s].split == TRAIN_SPLIT_TRAIN && k < d->series[s].n; k++)
            n += certain_slice(d, &d->series[s], k);
    return n;
}

/* Unknown labels (the subtypes of a marked slice, or those a labels CSV did
 * not give) teach nothing: for one row of nn_bce_logits' (labels y, logits
 * lg, gradient dl, its mean taken over denom elements), the gradient of each
 * unknown label is set to 0 and its share of the loss (counted as y = 0) is
 * returned, to be taken off. */
static float unknown_out(const uint8_t *y, const float *lg, float *dl, double denom)
{
    double off = 0;
    for (int l = 0; l < TRAIN_LABELS; l++) {
        if (y[l] != TRAIN_LABEL_UNKNOWN) continue;
        float z = lg[l];
        off += train_rsna_weights[l] * (fmaxf(z, 0) + log1pf(expf(-fabsf(z)))) / denom;
        dl[l] = 0;
    }
    return (float)off;
}

static double stage1_epoch(nn_model *m, const struct train_dataset *d, const struct opts *o,
                           int epoch, const float *pos_w, struct train_loc *loc, struct ema *ema,
                           double *loc_loss, struct progress *pg)
{
    size_t per = train_dataset_input_size(d);
    /* Counted as the draw below takes them (slice-labelled series only had
     * been counted: reviews overran the array, or left it empty). */
    size_t n = certain_train_slices(d);
    size_t *idx = malloc((n ? n : 1) * sizeof *idx);
    float *x = malloc((size_t)o->batch * per * sizeof(float));
    uint8_t *u = malloc(per);
    float *lg = malloc((size_t)o->batch * TRAIN_LABELS * sizeof(float));
    float *dl = malloc((size_t)o->batch * TRAIN_LABELS * sizeof(float));
    float *yt = malloc((size_t)o->batch * TRAIN_LABELS * sizeof(float));
    double total = NAN;
    if (!idx || !x || !u || !lg || !dl || !yt || n == 0) goto out;
    n = 0;
    for (int s = 0; s < d->nseries; s++) {
        const struct train_series *se = &d->series[s];
        if (se->split != TRAIN_SPLIT_TRAIN) continue;
        for (int k = 0; k < se->n; k++)
            if (certain_slice(d, se, k)) idx[n++] = se->first + (size_t)k;
    }
    uint64_t rng = o->seed * 1000003ULL + (uint64_t)epoch * 7919ULL + 1;
    shuffle(idx, n, &rng);
    size_t use = o->slices_per_epoch > 0 && (size_t)o->slices_per_epoch < n
                     ? (size_t)o->slices_per_epoch
                     : n;
    /* Hard negatives (from the second epoch, when the model has learnt
     * something to be wrong about) take the last places of the draw, small
     * bleeds the places before them; then the draw is shuffled again. */
    int nhard = epoch > 0 ? (int)lroundf(o->hard_neg * (float)use) : 0;
    int nsmall = (int)lroundf(o->small * (float)use);
    if (nsmall > (int)use - nhard) nsmall = (int)use - nhard;
    if (nsmall > 0) {
        int got = small_bleeds(d, o->small_slices, nsmall, &rng, idx + use - nhard - nsmall);
        if (got < 0) goto out;
        util_log(got ? UTIL_LOG_INFO : UTIL_LOG_WARN, "train_small_bleeds",
                 "epoch=%d slices=%d pool=%d max_slices=%d", epoch + 1, got ? nsmall : 0, got,
                 o->small_slices);
    }
    if (nhard > 0) {
        float *z = malloc((size_t)nhard * sizeof *z);
        nn_model_set_training(m, 0);
        /* Fewer negatives than asked for: the other places keep their draw. */
        int got = z ? train_hard_negatives(m, d, 4 * nhard, nhard, &rng, idx + use - nhard, z)
                    : NN_ENOMEM;
        if (got < 0) {
            free(z);
            goto out;
        }
        util_log(UTIL_LOG_INFO, "train_hard_negatives",
                 "epoch=%d slices=%d candidates=%d p_any_highest=%.3f p_any_lowest=%.3f", epoch + 1,
                 got, 4 * nhard, got ? 1 / (1 + exp(-z[0])) : 0.0,
                 got ? 1 / (1 + exp(-z[got - 1])) : 0.0);
        free(z);
    }
    if (nhard > 0 || nsmall > 0) shuffle(idx, use, &rng);
    int steps = (int)((use + (size_t)o->batch - 1) / (size_t)o->batch);
    struct train_augment aug;
    train_augment_default(&aug);
    if (d->context) aug.channel_period = d->c; /* a window jitters alike in every slice */
    aug.sharp = o->sharp;
    nn_adam adam;
    nn_adam_default(&adam);
    adam.lr = o->lr1 * powf(o->lr_decay, (float)epoch);
    nn_model_seed(m, rng);
    nn_model_set_training(m, 1);
    double sum = 0, lsum = 0;
    for (int st = 0; st < steps; st++) {
        size_t a = (size_t)st * o->batch;
        int b = (int)(use - a < (size_t)o->batch ? use - a : (size_t)o->batch);
        for (int k = 0; k < b; k++) {
            size_t i = idx[a + k];
            struct train_affine t;
            if (o->no_augment) {
                train_dataset_input_float(d, i, x + k * per);
                train_augment_none(&t);
            } else {
                int c = (2 * d->context + 1) * d->c;
                train_dataset_input(d, i, u);
                train_augment_draw(&aug, c, d->h, d->w, &rng, &t);
                train_augment_apply(&aug, &t, u, c, d->h, d->w, x + k * per);
            }
            if (loc) {
                /* the mask moves with the pixels */
                const uint8_t *mask = train_dataset_mask(d, i);
                loc->known[k] = mask != NULL;
                if (mask)
                    train_augment_cells(&t, mask, d->h, d->w,
                                        loc->cells + (size_t)k * loc->gh * loc->gw, loc->gh,
                                        loc->gw);
            }
            for (int l = 0; l < TRAIN_LABELS; l++) {
                uint8_t v = d->labels[i * TRAIN_LABELS + l];
                yt[k * TRAIN_LABELS + l] = v == 1 ? 1.0f : 0.0f;
            }
        }
        nn_model_zero_grad(m);
        if (nn_cnn_forward(m, x, b, lg) != 0) goto out;
        float loss = nn_bce_logits(dl, lg, yt, train_rsna_weights, pos_w, b, TRAIN_LABELS);
        for (int k = 0; k < b; k++)
            loss -= unknown_out(d->labels + idx[a + k] * TRAIN_LABELS, lg + k * TRAIN_LABELS,
                                dl + k * TRAIN_LABELS, (double)b * TRAIN_LABELS);
        if (loc) {
            if (nn_cnn_map(m, loc->map) != 0) goto out;
            lsum += train_loc_loss(loc, b, train_rsna_weights, o->loc_loss);
            if (nn_cnn_backward_map(m, dl, loc->dmap) != 0) goto out;
            train_loc_step(loc, adam.lr);
        } else if (nn_cnn_backward(m, dl) != 0) {
            goto out;
        }
        nn_model_adam_step(m, &adam);
        if (ema) ema_step(ema, m);
        sum += loss;
        progress_show(pg, st + 1, steps, sum / (st + 1), a + (size_t)b);
    }
    total = sum / steps;
    *loc_loss = lsum / steps;
out:
    nn_model_set_training(m, 0);
    free(idx), free(x), free(u), free(lg), free(dl), free(yt);
    return total;
}

/* ---- stage 2 --------------------------------------------------------------------- */

static double stage2_epoch(nn_model *m, const struct train_dataset *d, const struct opts *o,
                           int epoch, const float *feat, const float *pos_w, struct progress *pg)
{
    int F = nn_model_feature_size(m);
    int *ser = malloc((size_t)d->nseries * sizeof *ser), ns = 0;
    size_t maxn = 0;
    for (int s = 0; s < d->nseries; s++)
        if (d->series[s].split == TRAIN_SPLIT_TRAIN) {
            ser[ns++] = s;
            if ((size_t)d->series[s].n > maxn) maxn = (size_t)d->series[s].n;
        }
    size_t cap = maxn * (size_t)o->series_batch;
    float *fb = malloc(cap * F * sizeof(float)), *lg = malloc(cap * TRAIN_LABELS * sizeof(float));
    float *dl = malloc(cap * TRAIN_LABELS * sizeof(float));
    float *yt = malloc(cap * TRAIN_LABELS * sizeof(float));
    int *len = malloc((size_t)o->series_batch * sizeof *len);
    int *src = malloc((size_t)o->series_batch * sizeof *src);
    size_t *from = malloc((size_t)o->series_batch * sizeof *from);
    size_t *off_of = malloc((size_t)o->series_batch * sizeof *off_of); /* its first slice taken */
    double total = NAN;
    int *batch_end = NULL, steps = 0; /* where each batch ends in ser */
    if (!ser || !fb || !lg || !dl || !yt || !len || !src || !from || !off_of || ns == 0) goto out;
    uint64_t rng = o->seed * 2000003ULL + (uint64_t)epoch * 104729ULL + 7;
    for (int i = ns - 1; i > 0; i--) {
        int j = (int)(nn_rng_next(&rng) % (uint64_t)(i + 1)), t = ser[i];
        ser[i] = ser[j], ser[j] = t;
    }
    nn_adam adam;
    nn_adam_default(&adam);
    adam.lr = o->lr2;
    /* A study labelled as a whole goes into one batch, all its series. */
    if (train_stage2_group(d, ser, ns) != 0) goto out;
    batch_end = malloc((size_t)ns * sizeof *batch_end);
    if (!batch_end) goto out;
    for (int k = 0; k < ns; steps++) {
        int b = 0;
        while (k < ns && b < o->series_batch) {
            int g = train_stage2_group_size(d, ser, ns, k);
            if (b > 0 && b + g > o->series_batch) break;          /* whole, in the next batch */
            if (g > o->series_batch - b) g = o->series_batch - b; /* larger than a batch */
            k += g, b += g;
        }
        batch_end[steps] = k;
    }
    nn_model_seed(m, rng);
    nn_model_set_training(m, 1);
    double sum = 0;
    for (int st = 0; st < steps; st++) {
        int b = 0;
        size_t tot = 0;
        for (int k = st ? batch_end[st - 1] : 0; k < batch_end[st]; k++, b++) {
            const struct train_series *se = &d->series[ser[k]];
            int n = se->n, off = 0;
            /* Sequence augmentation: half of the series with slice labels
             * are cut to a random contiguous part of at least half. */
            if (se->slice_labels && n >= 4 && nn_rng_uniform(&rng) < 0.5f) {
                int nn2 = n / 2 + (int)(nn_rng_next(&rng) % (uint64_t)(n - n / 2 + 1));
                if (nn2 > n) nn2 = n;
                off = (int)(nn_rng_next(&rng) % (uint64_t)(n - nn2 + 1));
                n = nn2;
            }
            len[b] = n, src[b] = ser[k], from[b] = tot, off_of[b] = (size_t)off;
            memcpy(fb + tot * F, feat + (se->first + (size_t)off) * F,
                   (size_t)n * F * sizeof(float));
            for (int i = 0; i < n; i++)
                for (int l = 0; l < TRAIN_LABELS; l++) {
                    uint8_t v = d->labels[(se->first + (size_t)off + i) * TRAIN_LABELS + l];
                    yt[(tot + i) * TRAIN_LABELS + l] = v == 1 ? 1.0f : 0.0f;
                }
            tot += (size_t)n;
        }
        nn_model_zero_grad(m);
        if (nn_lrcn_forward_features(m, fb, len, b, lg) != 0) goto out;
        float loss = nn_bce_logits(dl, lg, yt, train_rsna_weights, pos_w, (int)tot, TRAIN_LABELS);
        /* Slice labels the CSV did not give (an "any"-only CSV's subtypes). */
        for (int k = 0; k < b; k++) {
            const struct train_series *se = &d->series[src[k]];
            for (int i = 0; se->slice_labels && i < len[k]; i++) {
                size_t r = from[k] + (size_t)i;
                loss -= unknown_out(d->labels + (se->first + off_of[k] + (size_t)i) * TRAIN_LABELS,
                                    lg + r * TRAIN_LABELS, dl + r * TRAIN_LABELS,
                                    (double)tot * TRAIN_LABELS);
            }
        }
        /* Series with study-level labels only: max over the slices of the
         * study's series per label (multiple-instance), the gradient flows
         * to the slice that is max. */
        train_stage2_mil(d, src, len, from, b, tot, pos_w, lg, dl);
        /* --study-loss W: for series with slice labels too, a study-level
         * term on the maximum over the slices (the quantity the node flags
         * on), weighted W against the mean slice loss. */
        for (int k = 0; o->study_loss > 0 && k < b; k++) {
            const struct train_series *se = &d->series[src[k]];
            if (!se->slice_labels) continue;
            for (int l = 0; l < TRAIN_LABELS; l++) {
                if (se->study[l] == TRAIN_LABEL_UNKNOWN) continue; /* no gradient */
                size_t arg = from[k];
                float yv = 0;
                for (int i = 0; i < len[k]; i++) {
                    size_t r = from[k] + (size_t)i;
                    if (lg[r * TRAIN_LABELS + l] > lg[arg * TRAIN_LABELS + l]) arg = r;
                    if (yt[r * TRAIN_LABELS + l] > 0) yv = 1;
                }
                float z = lg[arg * TRAIN_LABELS + l], sg = 1.0f / (1.0f + expf(-z));
                float wl = o->study_loss * train_rsna_weights[l] / (float)(b * TRAIN_LABELS);
                dl[arg * TRAIN_LABELS + l] += wl * (sg - yv);
                loss += wl * (yv > 0 ? log1pf(expf(-z)) : log1pf(expf(z)));
            }
        }
        if (nn_lrcn_backward(m, dl) != 0) goto out;
        nn_model_adam_step(m, &adam);
        sum += loss;
        progress_show(pg, st + 1, steps, sum / (st + 1), (size_t)batch_end[st]);
    }
    total = sum / steps;
out:
    nn_model_set_training(m, 0);
    free(ser), free(fb), free(lg), free(dl), free(yt), free(len), free(src), free(from);
    free(off_of), free(batch_end);
    return total;
}

/* Positive-class weights from the training slices: negatives / positives,
 * clamped to [1, 20]. */
static void pos_weights(const struct train_dataset *d, float *pw)
{
    double pos[TRAIN_LABELS] = {0}, all[TRAIN_LABELS] = {0};
    for (int s = 0; s < d->nseries; s++) {
        const struct train_series *se = &d->series[s];
        if (se->split != TRAIN_SPLIT_TRAIN || !se->slice_labels) continue;
        for (int k = 0; k < se->n; k++)
            for (int l = 0; l < TRAIN_LABELS; l++) {
                uint8_t v = d->labels[(se->first + (size_t)k) * TRAIN_LABELS + l];
                all[l] += v != TRAIN_LABEL_UNKNOWN;
                pos[l] += v == 1;
            }
    }
    for (int l = 0; l < TRAIN_LABELS; l++) {
        double w = pos[l] > 0 ? (all[l] - pos[l]) / pos[l] : 1;
        pw[l] = (float)(w < 1 ? 1 : w > 20 ? 20 : w);
    }
}

/* A checkpoint: the optimizer's state (workdir/last-optimizer.safetensors),
 * with --loc-loss in stage 1 the localisation head (workdir/last-loc.bin),
 * then the weights with the training state in their metadata (last), then
 * the state file for people and older runs. */
static int checkpoint(nn_model *m, const char *workdir, const char *last, const struct state *st,
                      const struct train_loc *loc)
{
    char p[1200], err[256], v[256];
    snprintf(p, sizeof p, "%s/last-optimizer.safetensors", workdir);
    if (nn_model_save_optimizer(m, p, err, sizeof err) != 0) {
        util_log(UTIL_LOG_ERROR, "train_save_failed", "path=%s error=\"%s\"", p, err);
        return -1;
    }
    snprintf(p, sizeof p, "%s/last-loc.bin", workdir);
    if (loc && train_loc_save(loc, p, nn_model_optimizer_steps(m)) != 0) {
        util_log(UTIL_LOG_ERROR, "train_save_failed", "path=%s error=\"%s\"", p, strerror(errno));
        return -1;
    }
    snprintf(v, sizeof v, "stage=%d epoch=%d best=%.17g best_epoch=%d bad=%d adam_steps=%ld",
             st->stage, st->epoch, st->best, st->best_epoch, st->bad, nn_model_optimizer_steps(m));
    if (save_model_with(m, last, CHECKPOINT_KEY, v) != 0) return -1;
    return state_write(workdir, st) != 0 ? -1 : 0;
}

/* Resuming: the state saved with the weights (else the state file), and the
 * optimizer's state if it belongs to these weights. */
static void resume_state(nn_model *m, const char *workdir, struct state *st)
{
    long steps = -1;
    if (state_parse(nn_model_meta_get(m, CHECKPOINT_KEY), st, &steps) != 0) steps = -1;
    nn_model_meta_set(m, CHECKPOINT_KEY, NULL);
    char p[1200], err[1400] = "";
    snprintf(p, sizeof p, "%s/last-optimizer.safetensors", workdir);
    int rc = steps >= 0 ? nn_model_load_optimizer(m, p, err, sizeof err) : -1;
    if (rc == 0 && nn_model_optimizer_steps(m) != steps) {
        snprintf(err, sizeof err, "%s is of step %ld, the checkpoint of step %ld", p,
                 nn_model_optimizer_steps(m), steps);
        nn_model_reset_optimizer(m);
        rc = -1;
    }
    if (rc != 0)
        util_log(UTIL_LOG_WARN, "train_resume_optimizer",
                 "state=fresh reason=\"%s\" (the run goes on, not bit-identical to an "
                 "uninterrupted one)",
                 steps < 0 ? "checkpoint without optimizer state" : err);
}

/* The model to start from: a checkpoint, --init weights or a fresh one. */
/* The model's "preprocessing": the steps of this run (with or without the
 * head crop), then the notes of from (an --init file's, such as "no ImageNet
 * normalisation"; NULL for none). */
static void set_preprocessing(nn_model *m, bool crop_head, const char *from)
{
    static const char *const steps[] = {"hu=", "window=", "resize=", "crop="};
    char buf[1024];
    int off = snprintf(buf, sizeof buf, "%s",
                       crop_head ? TRIAGE_PREPROCESSING_CROP : TRIAGE_PREPROCESSING);
    for (const char *p = from; p && *p;) {
        size_t len = strcspn(p, ";");
        bool step = len == 0;
        for (size_t i = 0; !step && i < sizeof steps / sizeof *steps; i++)
            step = strncmp(p, steps[i], strlen(steps[i])) == 0;
        if (!step && off < (int)sizeof buf)
            off += snprintf(buf + off, sizeof buf - (size_t)off, ";%.*s", (int)len, p);
        p += len;
        if (*p == ';') p++;
    }
    nn_model_meta_set(m, "preprocessing", buf);
}

/* An --init file, its outputs in our label order: one whose "labels" name
 * them in another order (made in PyTorch, say) has the rows of its last
 * layers put in ours, so that each is copied to the output it belongs to. */
static nn_model *init_load(const char *path, char *err, size_t errlen)
{
    nn_model *src = nn_model_load(path, err, errlen);
    const char *labels = src ? nn_model_meta_get(src, "labels") : NULL;
    if (!labels || strcmp(labels, OUR_LABELS) == 0) return src;
    char e[512], named[160];
    snprintf(named, sizeof named, "%s", labels);
    nn_model_free(src);
    struct triage_model tm; /* for its label_index */
    if (triage_model_load(&tm, path, e, sizeof e) != 0) {
        snprintf(err, errlen, "--init: outputs labelled \"%s\": %s", named, e);
        return NULL;
    }
    /* With another number of outputs the last layers have other shapes and
     * are not copied. */
    int rc = nn_model_config(tm.nn)->labels == TRAIN_LABELS
                 ? train_outputs_reorder(tm.nn, tm.label_index)
                 : 0;
    if (rc != 0) {
        snprintf(err, errlen, "--init %s: cannot put its outputs in our order (nn error %d)", path,
                 rc);
        triage_model_free(&tm);
        return NULL;
    }
    char safe[256];
    util_log(UTIL_LOG_INFO, "train_init_labels", "file=%s labels=\"%s\" outputs=%d reordered=%s",
             path, util_log_safe(safe, sizeof safe, named), nn_model_config(tm.nn)->labels,
             nn_model_config(tm.nn)->labels == TRAIN_LABELS ? "yes" : "no");
    return tm.nn; /* the model is all that is kept of it */
}

static nn_model *start_model(const struct opts *o, const struct triage_windows *w, char *err,
                             size_t errlen)
{
    nn_config cfg;
    nn_config_default(&cfg);
    cfg.arch = o->arch;
    cfg.in_c = w->n * (2 * o->context + 1);
    cfg.in_h = cfg.in_w = o->input_hw;
    cfg.seed = o->seed;
    nn_model *m = nn_model_create(&cfg, err, errlen);
    if (!m) return NULL;
    if (o->init) {
        nn_model *src = init_load(o->init, err, errlen);
        if (!src) {
            nn_model_free(m);
            return NULL;
        }
        /* Copy every tensor present in both with the same shape (for
         * example VGG19's convolutions); the rest keeps its fresh weights.
         * A first convolution made for one slice, where this model sees
         * 2 context + 1 (--context), goes to the centre slice's channels
         * and the neighbours' start at zero: the model starts out as the
         * one it was given, and learns what the neighbours add. */
        int copied = 0, inflated = 0, S = 2 * o->context + 1;
        for (int i = 0; i < nn_model_tensor_count(m); i++) {
            nn_tensor_info a, b;
            nn_model_tensor(m, i, &a);
            if (nn_model_tensor_find(src, a.name, &b) != 0 || b.ndim != a.ndim) continue;
            if (b.numel == a.numel) {
                memcpy(a.data, b.data, a.numel * sizeof(float));
                copied++;
            } else if (S > 1 && a.ndim == 4 && a.shape[0] == b.shape[0] &&
                       a.shape[1] == S * b.shape[1] && a.shape[2] == b.shape[2] &&
                       a.shape[3] == b.shape[3]) {
                size_t k = (size_t)(b.shape[2] * b.shape[3]), cin = (size_t)b.shape[1];
                memset(a.data, 0, a.numel * sizeof(float));
                for (int64_t oc = 0; oc < a.shape[0]; oc++)
                    memcpy(a.data + ((size_t)oc * S * cin + (size_t)o->context * cin) * k,
                           b.data + (size_t)oc * cin * k, cin * k * sizeof(float));
                copied++, inflated++;
            }
        }
        set_preprocessing(m, o->crop_head, nn_model_meta_get(src, "preprocessing"));
        nn_model_free(src);
        if (copied == 0) {
            snprintf(err, errlen, "%s: no tensor matches the architecture '%s'", o->init, o->arch);
            nn_model_free(m);
            return NULL;
        }
        util_log(UTIL_LOG_INFO, "train_init", "file=%s tensors=%d inflated=%d", o->init, copied,
                 inflated);
    }
    /* What the node needs to load it, so every checkpoint can be tried
     * with `ichtriage eval` or `predict`; the final model overwrites these. */
    char buf[256];
    int off = 0;
    for (int i = 0; i < w->n; i++)
        off += snprintf(buf + off, sizeof buf - (size_t)off, "%s%g/%g", i ? "," : "", w->center[i],
                        w->width[i]);
    nn_model_meta_set(m, "windows", buf);
    snprintf(buf, sizeof buf, "%dx%dx%d", cfg.in_c, o->input_hw, o->input_hw);
    nn_model_meta_set(m, "input", buf);
    if (o->context) {
        snprintf(buf, sizeof buf, "%d", o->context);
        nn_model_meta_set(m, "context", buf);
    }
    nn_model_meta_set(m, "format", "ichtriage-lrcn-1");
    nn_model_meta_set(m, "labels", OUR_LABELS);
    nn_model_meta_set(m, "thresholds", "0.5,0.5,0.5,0.5,0.5,0.5");
    set_preprocessing(m, o->crop_head, nn_model_meta_get(m, "preprocessing"));
    return m;
}

/* The labels train_calibrate could not fit on validation (fitted: its
 * mask): logged as a warning, and into out, for the threshold rule, as
 * "; not fitted: no positive validation study (threshold 0.5, temperature
 * 1): a,b; no negative ... (temperature 1): c", or "" when every label was
 * fitted. The thresholds had been stored as if chosen. */
static void not_fitted(const struct train_reliability *rel, unsigned fitted, char *out, size_t n)
{
    char list[2][112] = {"", ""}; /* the six names fit */
    int off[2] = {0, 0};
    for (int l = 0; l < TRAIN_LABELS; l++) {
        if (fitted & (1u << l)) continue;
        int k = rel->positives[l] > 0; /* 0: no positive study, 1: no negative one */
        off[k] += snprintf(list[k] + off[k], sizeof list[k] - (size_t)off[k], "%s%s",
                           off[k] ? "," : "", train_label_names[l]);
    }
    *out = 0;
    if (!*list[0] && !*list[1]) return;
    util_log(UTIL_LOG_WARN, "train_labels_not_fitted",
             "no_positive=%s no_negative=%s split=val threshold_no_positive=0.5 temperature=1",
             *list[0] ? list[0] : "-", *list[1] ? list[1] : "-");
    int o = snprintf(out, n, "; not fitted");
    if (*list[0])
        o += snprintf(out + o, n - (size_t)o,
                      ": no positive validation study (threshold 0.5, temperature 1): %s", list[0]);
    if (*list[1])
        snprintf(out + o, n - (size_t)o, "%s no negative validation study (temperature 1): %s",
                 *list[0] ? ";" : ":", list[1]);
}

/* --auto-promote: the new model replaces the active one only if it is at
 * least as good on the same held-out split of this run's data: study-level
 * AUC for "any" and sensitivity at each model's own threshold. mine_p and
 * y: the new model's study scores of "any" on that split, for DeLong's
 * paired test of the two AUCs, which the log and the message give (it does
 * not decide: the rule is the one above). Returns 1 to promote (also when
 * nothing is active), 0 to keep the active model. */
static int better_than_active(const char *store, const struct train_dataset *d, int split,
                              const struct train_eval *mine, const float *mine_p,
                              const unsigned char *y)
{
    char path[1200], err[512];
    snprintf(path, sizeof path, "%s/models/active.safetensors", store);
    if (access(path, R_OK) != 0) return 1;
    struct triage_model tm;
    if (triage_model_load(&tm, path, err, sizeof err) != 0) {
        util_log(UTIL_LOG_WARN, "model_compare", "active=unreadable error=\"%s\" promote=yes", err);
        return 1;
    }
    int better = 0;
    struct train_eval *old = malloc(sizeof *old);
    float *old_p = malloc((size_t)(d->nseries ? d->nseries : 1) * sizeof *old_p);
    float thr[2][TRAIN_LABELS];
    train_model_thresholds(&tm, thr);
    struct train_dataset view;
    const struct train_dataset *od = train_dataset_for_model(&tm, d, &view);
    if (!od) {
        util_log(UTIL_LOG_WARN, "model_compare", "reason=other_input_or_windows promote=no");
    } else if (old && old_p &&
               train_evaluate_scores(tm.nn, tm.label_index, od, split, thr, old, old_p, NULL, err,
                                     sizeof err) == 0) {
        const struct train_binary *a = &mine->m[TRAIN_LEVEL_STUDY][TRAIN_MODEL_LRCN][0];
        const struct train_binary *b = &old->m[TRAIN_LEVEL_STUDY][TRAIN_MODEL_LRCN][0];
        struct train_auc_diff dd;
        train_auc_paired(mine_p, old_p, y, (size_t)mine->nstudies, &dd);
        better = train_at_least_as_good(a, b);
        char x[8][32];
        util_log(UTIL_LOG_INFO, "model_compare",
                 "new_auc=%s new_sensitivity=%s active_auc=%s active_sensitivity=%s "
                 "auc_difference=%s auc_difference_ci95=%s,%s p=%s series=%d "
                 "studies=%d promote=%s",
                 train_num(x[0], "%.4f", a->auc), train_num(x[1], "%.4f", a->sensitivity),
                 train_num(x[2], "%.4f", b->auc), train_num(x[3], "%.4f", b->sensitivity),
                 train_num(x[4], "%.4f", dd.diff), train_num(x[5], "%.4f", dd.lo),
                 train_num(x[6], "%.4f", dd.hi), train_num(x[7], "%.4g", dd.p), mine->nseries,
                 mine->nstudies, better ? "yes" : "no");
        printf("against the active model on the %d test studies: study AUC of \"any\" %s "
               "against %s, difference %s [95%% interval %s, %s], p = %s (DeLong, paired); "
               "sensitivity %s against %s\n",
               mine->nstudies, train_num(x[0], "%.3f", a->auc), train_num(x[1], "%.3f", b->auc),
               train_num(x[2], "%+.3f", dd.diff), train_num(x[3], "%+.3f", dd.lo),
               train_num(x[4], "%+.3f", dd.hi), train_num(x[5], "%.3g", dd.p),
               train_num(x[6], "%.3f", a->sensitivity), train_num(x[7], "%.3f", b->sensitivity));
    } else {
        util_log(UTIL_LOG_WARN, "model_compare",
                 "reason=active_not_evaluated error=\"%s\" promote=no",
                 old && old_p ? err : "out of memory");
    }
    free(old), free(old_p);
    triage_model_free(&tm);
    return better;
}

/* --loc-loss: the head, from the checkpoint's when it belongs to it. Only
 * data with masks teaches it; none at all is a mistake worth stopping for.
 * Returns 0, or -1 (said). */
static int start_loc(struct train_loc *loc, nn_model *m, const struct train_dataset *d,
                     const struct opts *o, const char *workdir, const float *slice_pw)
{
    char err[1400] = "";
    size_t known = 0, positive = 0;
    for (int s = 0; s < d->nseries; s++) {
        const struct train_series *se = &d->series[s];
        if (se->split != TRAIN_SPLIT_TRAIN) continue;
        for (int k = 0; k < se->n; k++) {
            const uint8_t *mk = train_dataset_mask(d, se->first + (size_t)k);
            if (!mk) continue;
            known++;
            for (size_t q = 0; q < train_dataset_mask_size(d) && mk; q++)
                if (mk[q]) positive++, mk = NULL;
        }
    }
    if (known == 0) {
        fprintf(stderr, "ichtriage train: --loc-loss: no training slice has a blood mask (phantom "
                        "folders made with `ichtriage phantom --masks` have them)\n");
        return -1;
    }
    if (train_loc_init(loc, m, o->batch, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage train: %s\n", err);
        return -1;
    }
    char p[1200];
    snprintf(p, sizeof p, "%s/last-loc.bin", workdir);
    long steps = nn_model_optimizer_steps(m);
    if (steps > 0 && train_loc_load(loc, p, steps, err, sizeof err) != 0) {
        util_log(UTIL_LOG_WARN, "train_resume_loc",
                 "state=fresh reason=\"%s\" (the run goes on, not bit-identical to an "
                 "uninterrupted one)",
                 err);
        train_loc_free(loc);
        if (train_loc_init(loc, m, o->batch, err, sizeof err) != 0) return -1;
    }
    /* the cells' weights come from the data, not the checkpoint: a resumed
     * run computes the same ones */
    memcpy(loc->pos_w, slice_pw, sizeof loc->pos_w);
    if (o->loc_cells && train_loc_cell_weights(d, loc->gh, loc->gw, loc->pos_w) == 0) {
        fprintf(stderr, "ichtriage train: --loc-cell-weights: out of memory\n");
        train_loc_free(loc);
        return -1;
    }
    char pws[200];
    int at = 0;
    for (int y = 0; y < TRAIN_LABELS && at < (int)sizeof pws; y++)
        at += snprintf(pws + at, sizeof pws - (size_t)at, "%s%.1f", y ? "," : "", loc->pos_w[y]);
    util_log(UTIL_LOG_INFO, "train_loc",
             "weight=%g map=%dx%dx%d masked_slices=%zu with_blood=%zu head_steps=%ld "
             "pos_weights=%s from=%s",
             o->loc_loss, loc->c, loc->gh, loc->gw, known, positive, loc->t, pws,
             o->loc_cells ? "cells" : "slices");
    return 0;
}

int train_train_main(int argc, char **argv)
{
    struct triage_config cfg;
    char err[1024] = "";
    if (triage_config_from_args(&cfg, &argc, argv, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage train: %s\n", err);
        return 2;
    }
    struct opts o;
    int cfg_auto = 0;
    if (parse(&o, argc, argv) != 0) {
        triage_config_free(&cfg);
        usage(stderr);
        return 2;
    }
    if (triage_config_bool(&cfg, CFG_TRAIN_AUTO_PROMOTE, &cfg_auto, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage train: %s\n", err);
        triage_config_free(&cfg);
        return 2;
    }
    /* train.auto_promote = yes: what --auto-promote does, for registered runs. */
    if (cfg_auto && o.reg) o.auto_promote = 1;
    int rc = 1;
    nn_model *m = NULL;
    float *feat = NULL;
    size_t *vs = NULL, nvs = 0; /* stage 1's validation sample (--val-slices) */
    struct train_eval *ev = NULL;
    float *scores = NULL;
    unsigned char *score_y = NULL;
    struct train_dataset d;
    struct train_loc loc = {0}; /* --loc-loss: stage 1's localisation head */
    struct ema ema = {0};       /* --ema: stage 1's average of the weights */
    struct triage_windows win;
    triage_windows_default(&win);
    if (o.windows && triage_windows_parse(o.windows, &win, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage train: --windows: %s\n", err);
        triage_config_free(&cfg);
        return 2;
    }
    if (o.threads > 0) nn_set_threads(o.threads);
    char workdir[1100];
    snprintf(workdir, sizeof workdir, "%s", o.workdir ? o.workdir : "");
    if (!o.workdir) snprintf(workdir, sizeof workdir, "%s.work", o.out);
    if (mkdir(workdir, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "ichtriage train: %s: %s\n", workdir, strerror(errno));
        triage_config_free(&cfg);
        return 1;
    }
    /* One run per workdir (the timer's and an admin's had interleaved their
     * history and overwritten each other's checkpoints); held to the end. */
    char lockp[1200];
    snprintf(lockp, sizeof lockp, "%s/.lock", workdir);
    int lockfd = open(lockp, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (lockfd < 0 || flock(lockfd, LOCK_EX | LOCK_NB) != 0) {
        fprintf(stderr, "ichtriage train: %s: %s\n", lockp,
                lockfd >= 0 && errno == EWOULDBLOCK ? "another ichtriage train runs in this workdir"
                                                    : strerror(errno));
        if (lockfd >= 0) close(lockfd);
        triage_config_free(&cfg);
        return 1;
    }
    train_dataset_init(&d, &win, win.n, o.input_hw, o.input_hw);
    d.crop_head = o.crop_head;
    d.context = o.context;
    d.masks = o.loc_loss > 0;
    for (int i = 0; i < o.ndata; i++) {
        if (train_dataset_add_folder(&d, o.data[i], o.cache, err, sizeof err) != 0) {
            fprintf(stderr, "ichtriage train: %s\n", err);
            goto out;
        }
    }
    if (o.reviews) {
        int added = 0;
        if (train_reviews_add(&d, &cfg, o.cache, &added, err, sizeof err) != 0) {
            fprintf(stderr, "ichtriage train: reviews: %s\n", err);
            goto out;
        }
    }
    if (d.nseries == 0 && o.reviews && o.ndata == 0) {
        /* The weekly timer before the first review: nothing to do is no
         * failure of the unit, and leaves nothing behind. */
        printf("nothing to learn yet: no study reviewed in %s\n",
               triage_config_str(&cfg, CFG_STORE_DIR));
        unlink(lockp);
        rmdir(workdir);
        rc = 0;
        goto out;
    }
    if (d.nseries == 0) {
        fprintf(stderr, "ichtriage train: no labelled series found\n");
        goto out;
    }
    /* Every run keeps the store's frozen test patients out, whatever its
     * seed and data, so that every model it may register is scored on them
     * (a plain run had trained on them, and could be registered after). */
    const char *store = triage_config_str(&cfg, CFG_STORE_DIR);
    const char *device = triage_config_str(&cfg, CFG_NN_DEVICE);
    int frozen = train_registry_split(&d, store, o.seed, o.val_frac, o.test_frac, err, sizeof err);
    if (frozen < 0) {
        fprintf(stderr, "ichtriage train: frozen test split: %s\n", err);
        goto out;
    }
    int cnt[3], pos[3];
    size_t sl[3], psl[3];
    for (int s = 0; s < 3; s++)
        train_dataset_count(&d, s, &cnt[s], &sl[s], &psl[s], &pos[s]);
    util_log(UTIL_LOG_INFO, "train_data",
             "series=%d slices=%zu train=%d/%zu val=%d/%zu test=%d/%zu positive_series=%d/%d/%d",
             d.nseries, d.nslices, cnt[0], sl[0], cnt[1], sl[1], cnt[2], sl[2], pos[0], pos[1],
             pos[2]);
    if (cnt[0] == 0 || cnt[1] == 0) {
        fprintf(stderr,
                "ichtriage train: too few patients to split into train and validation "
                "(%d series)\n",
                d.nseries);
        goto out;
    }
    if (o.val_slices > 0) {
        vs = malloc(d.nslices * sizeof *vs);
        if (!vs) goto out;
        nvs = train_val_sample(&d, (size_t)o.val_slices, o.seed, vs);
        util_log(UTIL_LOG_INFO, "train_val_sample", "stage=1 slices=%zu of=%zu", nvs, sl[1]);
    }

    struct state st = {.stage = 1, .epoch = 0, .best = -1, .best_epoch = -1, .bad = 0};
    char last[1200], best1[1200], best2[1200];
    snprintf(last, sizeof last, "%s/last.safetensors", workdir);
    snprintf(best1, sizeof best1, "%s/best-stage1.safetensors", workdir);
    snprintf(best2, sizeof best2, "%s/best-stage2.safetensors", workdir);
    uint64_t key = run_key(&d, &o), held = run_key_read(workdir);
    bool have = state_read(workdir, &st) == 0 && access(last, R_OK) == 0;
    if (have && held != 0 && held != key) {
        /* Its checkpoints go before anything else is written: a run cut
         * short from here on must not find them again under the new key. */
        util_log(UTIL_LOG_WARN, "train_workdir_reset",
                 "workdir=%s stage=%d epoch=%d reason=\"it holds a run on other data, split, seed, "
                 "architecture or --init: training starts again\"",
                 workdir, st.stage, st.epoch);
        char sp[1200];
        snprintf(sp, sizeof sp, "%s/state", workdir);
        if ((unlink(sp) != 0 && errno != ENOENT) || (unlink(last) != 0 && errno != ENOENT)) {
            fprintf(stderr, "ichtriage train: cannot reset %s: %s\n", workdir, strerror(errno));
            goto out;
        }
        have = false;
    }
    if (!have && run_key_write(workdir, key) != 0) {
        fprintf(stderr, "ichtriage train: cannot write %s/run-key: %s\n", workdir, strerror(errno));
        goto out;
    }
    if (have) {
        /* Only with the input it was made for: windows, context, crop, size. */
        struct triage_model ck;
        if (triage_model_load(&ck, last, err, sizeof err) != 0) {
            fprintf(stderr, "ichtriage train: checkpoint %s: %s\n", last, err);
            goto out;
        }
        if (!train_model_fits(&ck, &d)) {
            fprintf(stderr,
                    "ichtriage train: checkpoint %s: made for windows %s, context %d, crop %s, "
                    "input %dx%dx%d; these options (--windows, --context, --crop, --input) give "
                    "context %d, crop %s, input %zux%dx%d; resume with the options it was "
                    "started with, or use another --workdir\n",
                    last, nn_model_meta_get(ck.nn, "windows"), ck.context,
                    ck.crop_head ? "head" : "none", ck.in_c, ck.in_h, ck.in_w, d.context,
                    d.crop_head ? "head" : "none",
                    train_dataset_input_size(&d) / ((size_t)d.h * d.w), d.h, d.w);
            triage_model_free(&ck);
            goto out;
        }
        /* Training writes our label order into every checkpoint; one in
         * another order was not made by it, and its optimizer state (kept
         * per weight) could not follow a reordering. */
        const char *labels = nn_model_meta_get(ck.nn, "labels");
        if (strcmp(labels, OUR_LABELS) != 0) {
            fprintf(stderr,
                    "ichtriage train: checkpoint %s: its outputs are labelled \"%s\", not "
                    "\"%s\" as training makes them; it was not made by ichtriage train: use "
                    "another --workdir (or start from it with --init)\n",
                    last, labels, OUR_LABELS);
            triage_model_free(&ck);
            goto out;
        }
        m = ck.nn; /* the model is all that is kept of it */
        if (triage_nn_device(m, device, err, sizeof err) != 0) {
            fprintf(stderr, "ichtriage train: checkpoint %s: %s\n", last, err);
            goto out;
        }
        resume_state(m, workdir, &st);
        history_trim(workdir, st.stage, st.epoch);
        util_log(UTIL_LOG_INFO, "train_resume", "workdir=%s stage=%d epoch=%d", workdir, st.stage,
                 st.epoch);
    } else {
        st = (struct state){.stage = 1, .best = -1, .best_epoch = -1};
        char hp[1200];
        snprintf(hp, sizeof hp, "%s/history.csv", workdir);
        unlink(hp);
        m = start_model(&o, &win, err, sizeof err);
        if (!m || triage_nn_device(m, device, err, sizeof err) != 0) {
            fprintf(stderr, "ichtriage train: %s\n", err);
            goto out;
        }
    }
    float pw[TRAIN_LABELS];
    pos_weights(&d, pw);
    struct progress pg = {.tty = isatty(2)};
    if (o.loc_loss > 0 && st.stage == 1 && start_loc(&loc, m, &d, &o, workdir, pw) != 0) goto out;
    if (o.ema > 0 && st.stage == 1) {
        if (ema_start(&ema, m, o.ema, workdir) != 0) {
            fprintf(stderr, "ichtriage train: --ema: out of memory\n");
            goto out;
        }
        util_log(UTIL_LOG_INFO, "train_ema", "decay=%g floats=%zu", o.ema, ema.n);
    }

    /* Stage 1. */
    while (st.stage == 1) {
        if (st.epoch >= o.epochs1 || st.bad >= o.patience) {
            /* the best epoch's weights; with --epochs1 0, the model as it
             * started (--init) */
            const char *from = access(best1, R_OK) == 0  ? best1
                               : access(last, R_OK) == 0 ? last
                                                         : NULL;
            if (from) {
                nn_model_free(m);
                m = nn_model_load(from, err, sizeof err);
            }
            if (!m || triage_nn_device(m, device, err, sizeof err) != 0) {
                fprintf(stderr, "ichtriage train: %s\n", err);
                goto out;
            }
            st = (struct state){.stage = 2, .best = -1, .best_epoch = -1};
            if (checkpoint(m, workdir, last, &st, NULL) != 0) goto out;
            break;
        }
        pg.t0 = util_clock_s(), pg.stage = 1, pg.epoch = st.epoch + 1, pg.epochs = o.epochs1;
        pg.items = 0, pg.t_last = pg.t0;
        double lloss = 0;
        double loss = stage1_epoch(m, &d, &o, st.epoch, pw, loc.c ? &loc : NULL,
                                   ema.avg ? &ema : NULL, &lloss, &pg);
        double auc = 0, vloss = 0;
        int bad = isnan(loss);
        if (bad) snprintf(err, sizeof err, "the epoch's loss is not a number (training diverged)");
        /* With --ema the average is what is validated and kept as the best
         * epoch's weights; training goes on from the trained ones. */
        if (!bad && ema.avg) ema_in(&ema, m);
        /* Validation series that are all study-labelled have no slices to
         * sample: the whole validation split, as without the option. */
        if (!bad && nvs > 0)
            bad = validate_sample(m, &d, vs, nvs, o.val_any, &auc, &vloss, err, sizeof err) != 0;
        else if (!bad)
            bad = validate(m, &d, NULL, 0, o.val_any, &auc, &vloss, err, sizeof err) != 0;
        if (bad && certain_train_slices(&d) == 0) {
            fprintf(stderr,
                    "ichtriage train: stage 1 has no slice to learn from: the training split "
                    "holds no slice-labelled series, no negative reviewed study and no slice a "
                    "reviewer marked (review more studies, mark the slices that show the bleed, "
                    "or start from a model with --init and --epochs1 0)\n");
            goto out;
        }
        if (bad) {
            fprintf(stderr, "ichtriage train: stage 1 failed at epoch %d: %s\n", st.epoch + 1, err);
            goto out;
        }
        st.epoch++;
        struct train_epoch he = {1, st.epoch, loss, vloss, auc, util_clock_s() - pg.t0};
        history_append(workdir, &he);
        char ls[64] = "";
        if (loc.c) snprintf(ls, sizeof ls, " loc_loss=%.4f", lloss);
        util_log(UTIL_LOG_INFO, "train_epoch",
                 "stage=1 epoch=%d loss=%.4f%s val_loss=%.4f val_auc=%.4f seconds=%.0f "
                 "slices_per_s=%.1f",
                 st.epoch, loss, ls, vloss, auc, he.seconds, progress_rate(&pg));
        if (auc > st.best) {
            st.best = auc, st.best_epoch = st.epoch, st.bad = 0;
            if (save_model(m, best1) != 0) goto out;
        } else {
            st.bad++;
        }
        if (ema.avg) {
            if (ema_save(m, workdir) != 0) goto out;
            ema_out(&ema, m);
        }
        if (checkpoint(m, workdir, last, &st, loc.c ? &loc : NULL) != 0) goto out;
    }

    /* Stage 2: convolutions (and the stage-1 head) frozen. With --epochs2 0
     * there is nothing to train: no features (calibration makes its own). */
    if (st.stage == 2 && o.epochs2 > 0) {
        nn_model_freeze(m, "cnn.", 1);
        int F = nn_model_feature_size(m);
        feat = malloc(d.nslices * (size_t)F * sizeof(float));
        if (!feat) goto out;
        nn_model_set_training(m, 0);
        double t0 = util_clock_s();
        if (train_features(m, &d, TRAIN_SPLIT_TRAIN, feat) != 0 ||
            train_features(m, &d, TRAIN_SPLIT_VAL, feat) != 0)
            goto out;
        util_log(UTIL_LOG_INFO, "train_features", "slices=%zu seconds=%.0f", sl[0],
                 util_clock_s() - t0);
    }
    while (st.stage == 2) {
        if (st.epoch >= o.epochs2 || st.bad >= o.patience) {
            nn_model_free(m);
            m = nn_model_load(access(best2, R_OK) == 0 ? best2 : last, err, sizeof err);
            if (!m || triage_nn_device(m, device, err, sizeof err) != 0) {
                fprintf(stderr, "ichtriage train: %s\n", err);
                goto out;
            }
            st = (struct state){.stage = 3, .best = -1, .best_epoch = -1};
            if (checkpoint(m, workdir, last, &st, NULL) != 0) goto out;
            break;
        }
        pg.t0 = util_clock_s(), pg.stage = 2, pg.epoch = st.epoch + 1, pg.epochs = o.epochs2;
        pg.items = 0, pg.t_last = pg.t0;
        double loss = stage2_epoch(m, &d, &o, st.epoch, feat, pw, &pg);
        double auc = 0, vloss = 0;
        if (isnan(loss))
            snprintf(err, sizeof err, "the epoch's loss is not a number (training diverged)");
        if (isnan(loss) ||
            validate(m, &d, feat, 1, o.val_any, &auc, &vloss, err, sizeof err) != 0) {
            fprintf(stderr, "ichtriage train: stage 2 failed at epoch %d: %s\n", st.epoch + 1, err);
            goto out;
        }
        st.epoch++;
        struct train_epoch he = {2, st.epoch, loss, vloss, auc, util_clock_s() - pg.t0};
        history_append(workdir, &he);
        util_log(UTIL_LOG_INFO, "train_epoch",
                 "stage=2 epoch=%d loss=%.4f val_loss=%.4f val_auc=%.4f seconds=%.1f "
                 "series_per_s=%.1f",
                 st.epoch, loss, vloss, auc, he.seconds, progress_rate(&pg));
        /* Only a higher score is an improvement: a tie (within 1e-9)
         * keeps the earlier epoch, whatever its loss. */
        if (auc > st.best + 1e-9) {
            st.best = auc, st.best_epoch = st.epoch, st.bad = 0;
            if (save_model(m, best2) != 0) goto out;
        } else {
            st.bad++;
        }
        if (checkpoint(m, workdir, last, &st, NULL) != 0) goto out;
    }

    /* Calibration, threshold, evaluation on the test split (validation when
     * there is no test split), metadata, report. */
    nn_model_freeze(m, "", 0);
    float thr[2][TRAIN_LABELS];
    struct train_reliability rel;
    char tdesc[512];
    /* feat: the validation features of stage 2 (the CNN is frozen), or NULL
     * when a resumed run did not get to stage 2 here. */
    unsigned fitted = 0;
    if (train_calibrate(m, NULL, &d, feat, o.sensitivity, thr, &rel, &fitted, tdesc, sizeof tdesc,
                        err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage train: calibration failed: %s\n", err);
        goto out;
    }
    char unfitted[512];
    not_fitted(&rel, fitted, unfitted, sizeof unfitted);
    ev = malloc(sizeof *ev);
    int split = cnt[2] > 0 ? TRAIN_SPLIT_TEST : TRAIN_SPLIT_VAL;
    /* the test series' study scores, for a paired comparison at promotion */
    scores = malloc((size_t)(d.nseries ? d.nseries : 1) * sizeof *scores);
    score_y = malloc((size_t)(d.nseries ? d.nseries : 1));
    if (!ev || !scores || !score_y ||
        train_evaluate_scores(m, NULL, &d, split, thr, ev, scores, score_y, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage train: evaluation: %s\n", err);
        goto out;
    }
    train_eval_print(stdout, ev);

    char buf[2048], summary[512], date[32];
    time_t tnow = time(NULL);
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&tnow));
    nn_model_meta_set(m, "format", "ichtriage-lrcn-1");
    snprintf(buf, sizeof buf, "%dx%dx%d", nn_model_config(m)->in_c, d.h, d.w);
    nn_model_meta_set(m, "input", buf);
    nn_model_meta_set(m, "labels", OUR_LABELS);
    int off = 0;
    for (int i = 0; i < win.n; i++)
        off += snprintf(buf + off, sizeof buf - (size_t)off, "%s%g/%g", i ? "," : "", win.center[i],
                        win.width[i]);
    nn_model_meta_set(m, "windows", buf);
    train_model_thresholds_set(m, NULL, thr);
    snprintf(buf, sizeof buf, "study-level sensitivity %.3f on validation%s", o.sensitivity,
             unfitted);
    nn_model_meta_set(m, "threshold_rule", buf);
    set_preprocessing(m, o.crop_head, nn_model_meta_get(m, "preprocessing"));
    snprintf(buf, sizeof buf,
             "temperature scaling on validation study maxima, folded into the "
             "last layers: %s",
             tdesc);
    nn_model_meta_set(m, "calibration", buf);
    train_eval_summary(ev, summary, sizeof summary);
    snprintf(buf, sizeof buf, "%s split: %s", split == TRAIN_SPLIT_TEST ? "test" : "val", summary);
    nn_model_meta_set(m, "metrics", buf);
    off = 0;
    for (int i = 0; i < o.ndata; i++)
        off += snprintf(buf + off, sizeof buf - (size_t)off, "%s%s", i ? "," : "", o.data[i]);
    nn_model_meta_set(m, "data", buf);
    snprintf(buf, sizeof buf,
             "series=%d slices=%zu split(train/val/test series)=%d/%d/%d split_seed=%llu "
             "val=%.2f test=%.2f",
             d.nseries, d.nslices, cnt[0], cnt[1], cnt[2], (unsigned long long)o.seed, o.val_frac,
             o.test_frac);
    nn_model_meta_set(m, "data_split", buf);
    snprintf(
        buf, sizeof buf,
        "arch=%s input=%d crop=%s context=%d seed=%llu epochs1=%d epochs2=%d patience=%d batch=%d "
        "series_batch=%d slices_per_epoch=%d hard_negatives=%g small_bleeds=%g/%d loc_loss=%g%s "
        "ema=%g "
        "lr1=%g lr_decay=%g "
        "lr2=%g study_loss=%g val_metric=%s val_slices=%d augment=%s sharp=%g "
        "init=%s",
        o.arch, o.input_hw, o.crop_head ? "head" : "none", o.context, (unsigned long long)o.seed,
        o.epochs1, o.epochs2, o.patience, o.batch, o.series_batch, o.slices_per_epoch, o.hard_neg,
        o.small, o.small_slices, o.loc_loss, o.loc_cells ? " loc_weights=cells" : "", o.ema, o.lr1,
        o.lr_decay, o.lr2, o.study_loss, o.val_any ? "any" : "mean", o.val_slices,
        o.no_augment ? "no" : "shift,rotation,flip,intensity", o.no_augment ? 0.0 : o.sharp,
        o.init ? o.init : "none");
    nn_model_meta_set(m, "training", buf);
    nn_model_meta_set(m, "date", date);
    snprintf(buf, sizeof buf, "ichtriage train %s; %s%s%s", date, summary, o.provenance ? "; " : "",
             o.provenance ? o.provenance : "");
    nn_model_meta_set(m, "provenance", buf);
    nn_model_meta_set(m, "notice", "decision support, not a diagnosis");
    if (save_model(m, o.out) != 0) goto out;

    struct train_epoch hist[512];
    int nh = history_read(workdir, hist, 512);
    char html[1200], json[1200];
    snprintf(html, sizeof html, "%s/report.html", workdir);
    snprintf(json, sizeof json, "%s/metrics.json", workdir);
    snprintf(buf, sizeof buf, "%s; %s; evaluated on the %s split", nn_model_meta_get(m, "data"),
             nn_model_meta_get(m, "data_split"), split == TRAIN_SPLIT_TEST ? "test" : "validation");
    if (train_report_write(html, json, "ichtriage train", o.out, buf, ev, hist, nh,
                           o.val_any ? "AUC of any" : "mean AUC", &rel, err, sizeof err) != 0)
        fprintf(stderr, "ichtriage train: report: %s\n", err);
    util_log(UTIL_LOG_INFO, "train_done", "model=%s report=%s %s", o.out, html, summary);
    if (o.reg) {
        char id[128];
        if (train_registry_add(triage_config_str(&cfg, CFG_STORE_DIR), o.out, id, sizeof id, err,
                               sizeof err) != 0) {
            fprintf(stderr, "ichtriage train: register: %s\n", err);
            goto out;
        }
        if (!frozen && cnt[2] > 0) {
            const char **tp;
            int ntp = train_dataset_patients(&d, TRAIN_SPLIT_TEST, &tp);
            if (ntp < 0 ||
                train_registry_freeze_test(store, (char *const *)tp, ntp, err, sizeof err) != 0) {
                fprintf(stderr, "ichtriage train: frozen test split: %s\n",
                        ntp < 0 ? "out of memory" : err);
                if (ntp >= 0) free(tp);
                goto out;
            }
            free(tp);
        }
        if (!o.auto_promote) {
            printf("registered %s (promote it with: ichtriage model promote %s)\n", id, id);
        } else if (cnt[2] == 0) {
            util_log(UTIL_LOG_WARN, "model_compare", "reason=no_test_patients promote=no");
            printf("registered %s, kept the active model (no test patients in this run's data "
                   "to compare on; promote it with: ichtriage model promote %s)\n",
                   id, id);
        } else {
            /* Promoted only over the model it was compared with: an admin's
             * promote or rollback during the comparison stands. */
            char was[128];
            train_registry_active(store, was, sizeof was);
            int better = better_than_active(store, &d, split, ev, scores, score_y);
            int pr = better ? train_registry_promote_over(store, id, was, err, sizeof err) : 0;
            if (pr == TRAIN_REGISTRY_CHANGED) {
                util_log(UTIL_LOG_WARN, "model_compare", "promote=no reason=\"%s\"", err);
                printf("registered %s, not promoted: %s (promote it with: ichtriage model "
                       "promote %s)\n",
                       id, err, id);
            } else if (pr != 0) {
                fprintf(stderr, "ichtriage train: promote: %s\n", err);
                goto out;
            } else {
                printf(better ? "registered %s, promoted (a running node loads it now)\n"
                              : "registered %s, kept the active model (not at least as good)\n",
                       id);
            }
        }
    }
    rc = 0;
out:
    close(lockfd);
    free(ev);
    free(scores), free(score_y);
    free(feat);
    free(vs);
    train_loc_free(&loc);
    ema_free(&ema);
    nn_model_free(m);
    train_dataset_free(&d);
    triage_config_free(&cfg);
    return rc;
}

/* triage/predict.c: `ichtriage predict`. Files are grouped by series, each
 * series is ordered and run through the same pipeline as the node's. */
#define _XOPEN_SOURCE 700
#include "predict.h"

#include <cjson/cJSON.h>
#include <ftw.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include "config.h"
#include "pipeline.h"
#include "progress.h"
#include "rows.h"
#include "scp_info.h"
#include "volume.h"

struct file {
    char *path;
    struct scp_info info;
};

struct files {
    struct file *v;
    int n, cap, skipped;
    size_t total;             /* files to read (counted first), for the progress */
    struct util_progress *pg; /* reading their headers; NULL while counting */
};

/* nftw has no user pointer: the walk's state is this one static, used only
 * during the walk on the main thread. */
static struct files *walk_into;

static int read_file(const char *path, struct files *fs)
{
    if (fs->n == fs->cap) {
        int cap = fs->cap ? fs->cap * 2 : 256;
        struct file *v = realloc(fs->v, sizeof *v * (size_t)cap);
        if (!v) return -1;
        fs->v = v;
        fs->cap = cap;
    }
    struct file *f = &fs->v[fs->n];
    char err[256];
    if (scp_info_read(path, &f->info, err, sizeof err) != 0 || !f->info.has_pixel_data ||
        !f->info.series_uid[0]) {
        fs->skipped++;
        return 0;
    }
    f->path = strdup(path);
    if (!f->path) return -1;
    fs->n++;
    return 0;
}

/* Counts the file (no fs->pg yet), or reads it and shows the progress. */
static int add_file(const char *path, struct files *fs)
{
    if (!fs->pg) {
        fs->total++;
        return 0;
    }
    int rc = read_file(path, fs);
    util_progress_step(fs->pg, (size_t)fs->n + (size_t)fs->skipped);
    return rc;
}

static int on_walk(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
    (void)st;
    (void)ftw;
    if (type != FTW_F) return 0;
    return add_file(path, walk_into) ? -1 : 0;
}

/* Adds the DICOM images of paths (files, or folders walked) to fs, or, before
 * fs->pg is set, counts the files. Returns 0, or -1 with a message. */
static int walk(struct files *fs, char *const *paths, int npaths)
{
    for (int i = 0; i < npaths; i++) {
        struct stat st;
        if (stat(paths[i], &st) != 0) {
            fprintf(stderr, "ichtriage predict: cannot read %s\n", paths[i]);
            return -1;
        }
        int bad;
        if (S_ISDIR(st.st_mode)) {
            /* A folder given as a symbolic link is walked where it points
             * (nftw with FTW_PHYS would report the link and not descend);
             * links met inside are not followed. */
            char *real = realpath(paths[i], NULL);
            bad = !real || nftw(real, on_walk, 16, FTW_PHYS) != 0;
            free(real);
        } else {
            bad = add_file(paths[i], fs) != 0;
        }
        if (bad) {
            fprintf(stderr, "ichtriage predict: cannot read %s\n", paths[i]);
            return -1;
        }
    }
    return 0;
}

static int by_series(const void *a, const void *b)
{
    const struct file *x = a, *y = b;
    int c = strcmp(x->info.study_uid, y->info.study_uid);
    return c ? c : strcmp(x->info.series_uid, y->info.series_uid);
}

/* Series together, and within one the files in path order: the same input
 * gives the same output (qsort is not stable). */
static int by_series_then_path(const void *a, const void *b)
{
    int c = by_series(a, b);
    return c ? c : strcmp(((const struct file *)a)->path, ((const struct file *)b)->path);
}

static int by_sop_then_path(const void *a, const void *b)
{
    const struct file *x = a, *y = b;
    int c = strcmp(x->info.sop_uid, y->info.sop_uid);
    return c ? c : strcmp(x->path, y->path);
}

/* Keeps the first file (in path order) of each SOP Instance UID, as the node
 * stores one file per instance: a copy of a folder given beside it would
 * otherwise be every slice twice. Says how many were left out. */
static void drop_copies(struct files *fs)
{
    qsort(fs->v, (size_t)fs->n, sizeof *fs->v, by_sop_then_path);
    int kept = 0, copies = 0;
    for (int i = 0; i < fs->n; i++) {
        if (kept && fs->v[i].info.sop_uid[0] &&
            strcmp(fs->v[i].info.sop_uid, fs->v[kept - 1].info.sop_uid) == 0) {
            if (!copies++)
                fprintf(stderr,
                        "ichtriage predict: %s is another file of the instance in %s: left out\n",
                        fs->v[i].path, fs->v[kept - 1].path);
            free(fs->v[i].path);
            continue;
        }
        fs->v[kept++] = fs->v[i];
    }
    fs->n = kept;
    if (copies)
        fprintf(stderr,
                "ichtriage predict: %d file(s) skipped (another file of the same SOP instance)\n",
                copies);
}

static int64_t now_ms(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (int64_t)tv.tv_sec * 1000 + tv.tv_usec / 1000;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: ichtriage predict [-c FILE] [--set K=V]... [--device D] [--json] PATH...\n\n"
               "Runs the triage model on DICOM files or folders (searched recursively), one\n"
               "result per series, with the field names of the worklist API. The model is\n"
               "triage.model, else <store.dir>/models/active.safetensors, else the shipped\n"
               "default; --device auto|cpu|cuda (nn.device) says where it runs. The CT\n"
               "images given are triaged whatever their body part or number (the node's\n"
               "triage.head_patterns and triage.min_slices do not apply), but slices that are\n"
               "not axial within triage.max_tilt are not applicable, as on the node.\n"
               "Copies (files of one SOP instance) count once, the first in path order, as\n"
               "the node keeps one file per instance.\n"
               "Decision support, not a diagnosis.\n");
}

int triage_predict_main(int argc, char **argv)
{
    struct triage_config cfg;
    char err[1200];
    if (triage_config_from_args(&cfg, &argc, argv, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage predict: %s\n", err);
        return 2;
    }
    int json = 0, npaths = 0, rc = 1;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0) {
            json = 1;
        } else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            triage_config_free(&cfg);
            return 0;
        } else if (argv[i][0] == '-' && argv[i][1]) {
            fprintf(stderr, "ichtriage predict: unknown option '%s'\n", argv[i]);
            triage_config_free(&cfg);
            return 2;
        } else {
            argv[1 + npaths++] = argv[i];
        }
    }
    if (npaths == 0) {
        usage(stderr);
        triage_config_free(&cfg);
        return 2;
    }
    /* The node's check on a built volume that its slices are axial
     * (triage_volume_check); the files chosen stand for its other rules. */
    int64_t max_tilt;
    if (triage_config_get(&cfg, CFG_TRIAGE_MAX_TILT, &max_tilt, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage predict: %s\n", err);
        triage_config_free(&cfg);
        return 2;
    }
    struct triage_model model;
    char path[1000];
    if (triage_model_resolve(triage_config_str(&cfg, CFG_TRIAGE_MODEL),
                             triage_config_str(&cfg, CFG_STORE_DIR), path, sizeof path) != 0) {
        fprintf(stderr, "ichtriage predict: no model file: %s\n", path);
        triage_config_free(&cfg);
        return 1;
    }
    if (triage_model_load(&model, path, err, sizeof err) != 0 ||
        triage_nn_device(model.nn, triage_config_str(&cfg, CFG_NN_DEVICE), err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage predict: %s\n", err);
        triage_config_free(&cfg);
        return 1;
    }
    triage_config_free(&cfg);

    /* Two walks: the first counts the files (names only), the second reads
     * their headers, which takes a while on a big folder, with a progress */
    struct files fs = {0};
    struct util_progress read_pg;
    walk_into = &fs;
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) {
            fs.pg = &read_pg;
            util_progress_begin(&read_pg, "predict_read_progress", "reading headers", "", "files",
                                fs.total, 0, 60);
        }
        int bad = walk(&fs, argv + 1, npaths);
        if (pass == 1) util_progress_end(&read_pg);
        if (bad) goto done;
    }
    walk_into = NULL;
    if (fs.skipped)
        fprintf(stderr, "ichtriage predict: %d file(s) skipped (not DICOM images)\n", fs.skipped);
    if (fs.n == 0) fprintf(stderr, "ichtriage predict: no DICOM images found\n");
    drop_copies(&fs);
    qsort(fs.v, (size_t)fs.n, sizeof *fs.v, by_series_then_path);
    cJSON *array = json ? cJSON_CreateArray() : NULL;
    if (!json) triage_row_print_header(stdout);
    int rank = 0, failures = 0, nseries = 0;
    for (int a = 0; a < fs.n; a++)
        nseries += a == 0 || by_series(&fs.v[a - 1], &fs.v[a]) != 0;
    /* --json prints nothing until the end, and rows printed to a file or a
     * pipe are not seen either: the progress, on stderr. */
    struct util_progress pg;
    bool progress = json || !isatty(STDOUT_FILENO);
    if (progress)
        util_progress_begin(&pg, "predict_progress", "predicting", "", "series", (size_t)nseries, 0,
                            60);
    for (int a = 0; a < fs.n;) {
        int b = a;
        while (b < fs.n && by_series(&fs.v[a], &fs.v[b]) == 0)
            b++;
        const char **paths = malloc(sizeof *paths * (size_t)(b - a));
        if (!paths) goto done;
        /* The CT images of the series, wherever they sort: another object
         * in it (a dose report, a screen capture) is left out, by
         * triage_volume_build as on the node, and does not decide for the
         * whole series. */
        int nct = 0;
        const struct scp_info *in = &fs.v[a].info; /* the first CT image's, if any */
        for (int k = a; k < b; k++) {
            paths[k - a] = fs.v[k].path;
            if (scp_sop_class_is_ct(fs.v[k].info.sop_class) && nct++ == 0) in = &fs.v[k].info;
        }
        struct db_worklist_row row = {
            .study_uid = in->study_uid,
            .series_uid = in->series_uid,
            .accession = in->accession,
            .patient_id = in->patient_id,
            .patient_name = in->patient_name,
            .study_desc = in->study_desc,
            .study_date = in->study_date,
            .study_time = in->study_time,
            .status = "triaged",
            .status_reason = "",
            .model_version = model.version,
            .received_at_ms = now_ms(),
            .updated_at_ms = now_ms(),
            .slices = nct,
        };
        struct triage_volume v;
        struct triage_result r = {0};
        char e[1024] = "";
        if (nct == 0) {
            row.status = "not_applicable";
            row.slices = b - a;
            snprintf(e, sizeof e, "not a CT image (modality %s)", in->modality);
        } else if (triage_volume_build(paths, b - a, &v, e, sizeof e) != 0) {
            row.status = "failed";
        } else {
            if (triage_volume_check(&v, (double)max_tilt, 1, e, sizeof e) != 0) {
                row.status = "not_applicable";
            } else if (triage_predict_volume(&model, &v, paths, NULL, &r, e, sizeof e) != 0) {
                row.status = "failed";
            } else {
                row.has_probability = true;
                row.probability = r.study[0];
                for (int l = 1; l < TRIAGE_LABELS; l++)
                    row.subtypes[l - 1] = r.study[l];
                row.flagged = r.flagged;
                row.slices = r.n;
                snprintf(e, sizeof e, "%s", v.note);
            }
            triage_volume_free(&v);
        }
        row.status_reason = e;
        if (strcmp(row.status, "failed") == 0) failures++;
        rank++;
        if (json) {
            cJSON *o = triage_row_json(&row);
            if (o && r.probs) {
                cJSON_AddNumberToObject(o, "key_slice", r.key_slice);
                cJSON *per = cJSON_AddArrayToObject(o, "slice_probabilities");
                for (int i = 0; per && i < r.n; i++)
                    cJSON_AddItemToArray(per,
                                         cJSON_CreateNumber(r.probs[(size_t)i * TRIAGE_LABELS]));
            }
            if (o && !cJSON_AddItemToArray(array, o)) cJSON_Delete(o); /* no array: out of memory */
        } else {
            triage_row_print(stdout, rank, &row, row.received_at_ms);
            if (e[0]) printf("     %s\n", e);
        }
        triage_result_free(&r);
        free(paths);
        a = b;
        if (progress) util_progress_step(&pg, (size_t)rank);
    }
    if (progress) util_progress_end(&pg);
    if (json) {
        char *text = cJSON_Print(array);
        if (text) puts(text);
        cJSON_free(text);
        cJSON_Delete(array);
        if (!text) {
            fprintf(stderr, "predict: out of memory while writing the JSON\n");
            failures++;
        }
    } else {
        printf("-- %d series. Decision support, not a diagnosis.\n", rank);
    }
    rc = failures ? 1 : 0;
done:
    walk_into = NULL;
    for (int i = 0; i < fs.n; i++)
        free(fs.v[i].path);
    free(fs.v);
    triage_model_free(&model);
    return rc;
}

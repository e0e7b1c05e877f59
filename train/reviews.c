/* train/reviews.c: the node's own reviewed studies as training data. The
 * latest review of each study (db_reviews_latest) labels the whole study:
 * hemorrhage yes/no, the subtypes seen and the slices marked as showing the
 * bleed. Every series of the study in the spool (<store.dir>/spool/<study>/
 * <series>/ files ending .dcm) becomes a series with study-level labels:
 * stage 1 takes its slices when the study is negative, and of a positive
 * study only the slices the reviewer marked; stage 2 learns from it with the
 * max-over-slices loss. */
#include <dirent.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "db.h"
#include "config.h"
#include "db_reviews.h"
#include "log.h"
#include "trainer.h"

#define MAX_SERIES_FILES 4000

static const char *const subtype_names[TRAIN_LABELS] = {
    "any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"};

struct review {
    char study[SCP_UID_MAX];
    uint8_t y[TRAIN_LABELS];
    char *slices; /* marked slices, "sop/frame,..." (owned; NULL: none) */
};

struct review_list {
    struct review *r;
    int n, cap;
    bool oom;
};

static int collect(void *ud, const struct db_review_row *row)
{
    struct review_list *l = ud;
    if (!row->study_uid || !scp_uid_valid(row->study_uid)) return 0;
    if (l->n == l->cap) {
        int cap = l->cap ? l->cap * 2 : 64;
        struct review *nr = realloc(l->r, (size_t)cap * sizeof *nr);
        if (!nr) return l->oom = true, -1; /* an error, not a shorter list */
        l->r = nr, l->cap = cap;
    }
    struct review *r = &l->r[l->n++];
    memset(r, 0, sizeof *r);
    snprintf(r->study, sizeof r->study, "%s", row->study_uid);
    r->y[0] = row->hemorrhage ? 1 : 0;
    /* A bleed with no subtype named says nothing of the subtypes: unknown,
     * left out of the losses and the metrics (it had counted as five
     * negatives). Once one is named, the others are absent. */
    bool named = row->subtypes && row->subtypes[0];
    for (int k = 1; row->hemorrhage && k < TRAIN_LABELS; k++) {
        const char *s = named ? strstr(row->subtypes, subtype_names[k]) : NULL;
        r->y[k] = named ? s != NULL : TRAIN_LABEL_UNKNOWN;
    }
    if (row->hemorrhage && row->slices && row->slices[0] && !(r->slices = strdup(row->slices)))
        return l->oom = true, -1;
    return 0;
}

static void list_free(struct review_list *l)
{
    for (int i = 0; i < l->n; i++)
        free(l->r[i].slices);
    free(l->r);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The *.dcm files of one series folder, sorted. Returns the count (0..max). */
static int series_files(const char *dir, char **paths, int max)
{
    DIR *dd = opendir(dir);
    if (!dd) return 0;
    int n = 0;
    struct dirent *de;
    while (n < max && (de = readdir(dd))) {
        size_t l = strlen(de->d_name);
        if (de->d_name[0] == '.' || l < 5 || strcmp(de->d_name + l - 4, ".dcm") != 0) continue;
        char p[PATH_MAX];
        if (snprintf(p, sizeof p, "%s/%s", dir, de->d_name) >= (int)sizeof p) continue;
        paths[n] = strdup(p);
        if (paths[n]) n++;
    }
    closedir(dd);
    qsort(paths, (size_t)n, sizeof *paths, cmp_str);
    return n;
}

int train_dataset_add_reviews(struct train_dataset *d, const char *store_dir, const char *spill_dir,
                              int64_t keep_free, int *added, char *err, size_t errlen)
{
    char dbp[PATH_MAX];
    snprintf(dbp, sizeof dbp, "%s/ichtriage.db", store_dir);
    *added = 0;
    struct db *db = NULL;
    if (db_open_existing(&db, dbp, err, errlen) != 0) return -1;
    struct review_list l = {0};
    int rc = db_reviews_latest(db, collect, &l);
    db_close(db);
    if (rc != 0) {
        snprintf(err, errlen, "%s: reading the reviews failed%s", dbp,
                 l.oom ? ": out of memory" : "");
        list_free(&l);
        return -1;
    }
    char **paths = malloc(MAX_SERIES_FILES * sizeof *paths);
    if (!paths) {
        list_free(&l);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    int nmarked = 0;
    if (spill_dir) {
        /* Their labels change from run to run, their slices do not: the
         * slices of each series are kept in spill_dir/reviewed-series. */
        char sc[PATH_MAX];
        snprintf(sc, sizeof sc, "%s/reviewed-series", spill_dir);
        train_dataset_series_cache_begin(d, sc, keep_free);
        train_dataset_spill_begin(d, spill_dir, keep_free);
    }
    for (int i = 0; i < l.n; i++) {
        char sdir[PATH_MAX];
        snprintf(sdir, sizeof sdir, "%s/spool/%s", store_dir, l.r[i].study);
        DIR *dd = opendir(sdir);
        if (!dd) {
            util_log(UTIL_LOG_WARN, "train_review_skipped", "study=%s reason=not_in_spool",
                     l.r[i].study);
            continue;
        }
        struct dirent *de;
        while ((de = readdir(dd))) {
            if (!scp_uid_valid(de->d_name)) continue;
            char ser[PATH_MAX];
            if (snprintf(ser, sizeof ser, "%s/%s", sdir, de->d_name) >= (int)sizeof ser) continue;
            int n = series_files(ser, paths, MAX_SERIES_FILES);
            if (n > 0) {
                char e[512];
                int m = 0;
                if (train_dataset_add_series(d, (const char *const *)paths, n, l.r[i].y,
                                             l.r[i].slices, &m, e, sizeof e) == 0)
                    (*added)++, nmarked += m;
                else
                    util_log(UTIL_LOG_WARN, "train_review_skipped",
                             "study=%s series=%s reason=\"%s\"", l.r[i].study, de->d_name, e);
            }
            for (int k = 0; k < n; k++)
                free(paths[k]);
        }
        closedir(dd);
    }
    free(paths);
    /* Every reviewed study was seen: the kept series of studies no longer
     * reviewed (or no longer in the spool, or changed) go. */
    int kept = train_dataset_series_cache_end(d, true);
    rc = train_dataset_spill_end(d, err, errlen);
    if (rc == 0)
        util_log(UTIL_LOG_INFO, "train_reviews",
                 "studies=%d series=%d marked_slices=%d series_not_decoded=%d", l.n, *added,
                 nmarked, kept);
    list_free(&l);
    return rc;
}

int train_reviews_add(struct train_dataset *d, const struct triage_config *cfg,
                      const char *spill_dir, int *added, char *err, size_t errlen)
{
    int64_t min_free_mb;
    if (triage_config_int(cfg, CFG_STORE_MIN_FREE_MB, 0, INT64_C(1) << 30, &min_free_mb, err,
                          errlen) != 0)
        return -1;
    return train_dataset_add_reviews(d, triage_config_str(cfg, CFG_STORE_DIR), spill_dir,
                                     (min_free_mb << 20) + (INT64_C(2) << 30), added, err, errlen);
}

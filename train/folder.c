/* train/folder.c: folders in the RSNA 2019 layout (a labels CSV, DICOM
 * files anywhere below) -> series of preprocessed slices with labels, through
 * a cache file per folder so that each DICOM file is decoded once; a first
 * decode that is killed resumes where it stopped. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "dataset.h"
#include "dataset_parts.h"
#include "log.h"
#include "progress.h"
#include "volume.h"

#define MAX_FILES 2000000
/* 4: a second file of one instance is dropped; a cache of 3 may hold it twice.
 * 5: a subtype the CSV has no row for is unknown; a cache of 4 holds it as 0. */
#define CACHE_MAGIC "ICHTCACHE5\n"

/* ---- labels CSV: sop -> 6 labels, open addressing ---------------------- */

struct label_entry {
    char *sop; /* without the "ID_" prefix */
    uint8_t y[TRAIN_LABELS];
};
struct label_map {
    struct label_entry *e;
    size_t cap, n;
};

static void map_free(struct label_map *m)
{
    for (size_t i = 0; i < m->cap; i++)
        free(m->e[i].sop);
    free(m->e);
    memset(m, 0, sizeof *m);
}

static struct label_entry *map_get(struct label_map *m, const char *sop, size_t n, int create)
{
    if (create && (m->n + 1) * 2 > m->cap) {
        struct label_map g = {.cap = m->cap ? m->cap * 2 : 1024};
        g.e = calloc(g.cap, sizeof *g.e);
        if (!g.e) return NULL;
        for (size_t i = 0; i < m->cap; i++) {
            if (!m->e[i].sop) continue;
            size_t j = ds_fnv(m->e[i].sop, strlen(m->e[i].sop), DS_FNV_BASIS) & (g.cap - 1);
            while (g.e[j].sop)
                j = (j + 1) & (g.cap - 1);
            g.e[j] = m->e[i];
        }
        free(m->e);
        m->e = g.e, m->cap = g.cap;
    }
    if (!m->cap) return NULL;
    size_t j = ds_fnv(sop, n, DS_FNV_BASIS) & (m->cap - 1);
    while (m->e[j].sop) {
        if (strlen(m->e[j].sop) == n && memcmp(m->e[j].sop, sop, n) == 0) return &m->e[j];
        j = (j + 1) & (m->cap - 1);
    }
    if (!create) return NULL;
    m->e[j].sop = strndup(sop, n);
    if (!m->e[j].sop) return NULL;
    memset(m->e[j].y, TRAIN_LABEL_UNKNOWN, TRAIN_LABELS);
    m->n++;
    return &m->e[j];
}

/* Reads "ID,Label" rows ID_<sop>_<label>,0|1. Returns 0 or -1. */
static int labels_read(const char *path, struct label_map *m, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    char line[512];
    long lineno = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        size_t len = strcspn(line, "\r\n");
        line[len] = 0;
        char *id = line;
        if (lineno == 1 && strncmp(id, "\xef\xbb\xbf", 3) == 0) id += 3; /* a UTF-8 BOM */
        /* RSNA's files start with the header; one without has a row there */
        if ((lineno == 1 && strcmp(id, "ID,Label") == 0) || len == 0) continue;
        char *comma = strrchr(id, ',');
        if (!comma || strncmp(id, "ID_", 3) != 0) {
            snprintf(err, errlen, "%s:%ld: expected ID_<sop>_<label>,0|1", path, lineno);
            fclose(f);
            return -1;
        }
        *comma = 0;
        char *us = strrchr(id, '_');
        int li = -1;
        for (int l = 0; us && l < TRAIN_LABELS; l++)
            if (strcmp(us + 1, train_label_names[l]) == 0) li = l;
        /* exactly 0 or 1: "0.7" or "1x" is not a label */
        int v = strcmp(comma + 1, "0") == 0 ? 0 : strcmp(comma + 1, "1") == 0 ? 1 : -1;
        if (li < 0 || us <= id + 3 || v < 0) {
            snprintf(err, errlen, "%s:%ld: bad row (label name or value)", path, lineno);
            fclose(f);
            return -1;
        }
        struct label_entry *e = map_get(m, id + 3, (size_t)(us - id - 3), 1);
        if (!e) {
            snprintf(err, errlen, "out of memory reading %s", path);
            fclose(f);
            return -1;
        }
        e->y[li] = (uint8_t)v;
    }
    fclose(f);
    return 0;
}

/* The labels CSV of a folder: stage_2_train.csv, stage_1_train.csv, else the
 * only top-level *.csv whose header is "ID,Label". */
static int find_labels_csv(const char *dir, char *out, size_t n, char *err, size_t errlen)
{
    const char *names[] = {"stage_2_train.csv", "stage_1_train.csv", "labels.csv"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(out, n, "%s/%s", dir, names[i]);
        if (access(out, R_OK) == 0) return 0;
    }
    DIR *dd = opendir(dir);
    if (!dd) {
        snprintf(err, errlen, "%s: %s", dir, strerror(errno));
        return -1;
    }
    struct dirent *de;
    int found = 0;
    char other[PATH_MAX] = "";
    while ((de = readdir(dd))) {
        size_t l = strlen(de->d_name);
        if (l < 5 || strcmp(de->d_name + l - 4, ".csv") != 0) continue;
        char p[PATH_MAX];
        snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
        FILE *f = fopen(p, "r");
        char head[64] = "";
        if (f) {
            if (!fgets(head, sizeof head, f)) head[0] = 0;
            fclose(f);
        }
        /* a spreadsheet's export may begin with a UTF-8 byte order mark */
        const char *h = strncmp(head, "\xEF\xBB\xBF", 3) == 0 ? head + 3 : head;
        if (strncmp(h, "ID,Label", 8) != 0) continue;
        if (found++)
            snprintf(other, sizeof other, "%s", p);
        else
            snprintf(out, n, "%s", p);
    }
    closedir(dd);
    if (found > 1) {
        /* which one readdir gives first is no way to choose labels */
        snprintf(err, errlen,
                 "%s: more than one CSV with header ID,Label (%s, %s): name the labels "
                 "stage_2_train.csv",
                 dir, out, other);
        return -1;
    }
    if (!found)
        snprintf(err, errlen,
                 "%s: no labels file (stage_2_train.csv or a CSV with header ID,Label); "
                 "expected the RSNA 2019 layout",
                 dir);
    return found ? 0 : -1;
}

/* ---- DICOM files below a folder ------------------------------------------ */

struct file_list {
    char **p;
    size_t n, cap;
    /* Folders walked, by device and inode: one reached again through a
     * link (a loop such as again -> ., or a second link to it) is walked
     * once; every file below a loop had been read eight times. */
    struct {
        dev_t dev;
        ino_t ino;
    } seen[4096];
    size_t nseen;
};

static int walk(const char *dir, struct file_list *fl, int depth, char *err, size_t errlen)
{
    if (depth > 8) return 0;
    struct stat ds;
    if (stat(dir, &ds) != 0) {
        snprintf(err, errlen, "%s: %s", dir, strerror(errno));
        return -1;
    }
    for (size_t i = 0; i < fl->nseen; i++)
        if (fl->seen[i].dev == ds.st_dev && fl->seen[i].ino == ds.st_ino) {
            util_log(UTIL_LOG_WARN, "train_folder_again", "path=%s reason=\"walked already\"", dir);
            return 0;
        }
    if (fl->nseen < sizeof fl->seen / sizeof fl->seen[0])
        fl->seen[fl->nseen++] = (typeof(fl->seen[0])){ds.st_dev, ds.st_ino};
    DIR *dd = opendir(dir);
    if (!dd) {
        snprintf(err, errlen, "%s: %s", dir, strerror(errno));
        return -1;
    }
    struct dirent *de;
    int rc = 0;
    while (rc == 0 && (de = readdir(dd))) {
        if (de->d_name[0] == '.') continue;
        char p[PATH_MAX];
        if (snprintf(p, sizeof p, "%s/%s", dir, de->d_name) >= (int)sizeof p) continue;
        struct stat st;
        if (stat(p, &st) != 0) continue;
        if (S_ISDIR(st.st_mode)) {
            rc = walk(p, fl, depth + 1, err, errlen);
            continue;
        }
        size_t l = strlen(de->d_name);
        if (!S_ISREG(st.st_mode) || l < 5 || strcasecmp(de->d_name + l - 4, ".dcm") != 0) continue;
        if (fl->n >= MAX_FILES) {
            snprintf(err, errlen, "%s: more than %d DICOM files", dir, MAX_FILES);
            rc = -1;
            break;
        }
        if (fl->n == fl->cap) {
            size_t cap = fl->cap ? fl->cap * 2 : 1024;
            char **np = realloc(fl->p, cap * sizeof *np);
            if (!np) {
                rc = -1;
                snprintf(err, errlen, "out of memory");
                break;
            }
            fl->p = np, fl->cap = cap;
        }
        fl->p[fl->n] = strdup(p);
        if (!fl->p[fl->n]) {
            rc = -1;
            snprintf(err, errlen, "out of memory");
            break;
        }
        fl->n++;
    }
    closedir(dd);
    return rc;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void files_free(struct file_list *fl)
{
    for (size_t i = 0; i < fl->n; i++)
        free(fl->p[i]);
    free(fl->p);
    memset(fl, 0, sizeof *fl);
}

/* One file's identity, for grouping. */
struct file_rec {
    int idx; /* into the file list */
    char study[SCP_UID_MAX], series[SCP_UID_MAX], sop[SCP_UID_MAX];
    char patient[65];
};

static int cmp_series(const struct file_rec *x, const struct file_rec *y)
{
    int c = strcmp(x->study, y->study);
    return c ? c : strcmp(x->series, y->series);
}

static int cmp_rec(const void *a, const void *b)
{
    const struct file_rec *x = a, *y = b;
    int c = cmp_series(x, y);
    return c ? c : x->idx - y->idx;
}

/* By series, then SOP Instance UID, then file: copies of one instance next
 * to each other, the first file first. */
static int cmp_rec_sop(const void *a, const void *b)
{
    const struct file_rec *x = a, *y = b;
    int c = cmp_series(x, y);
    if (!c) c = strcmp(x->sop, y->sop);
    return c ? c : x->idx - y->idx;
}

/* The SOP key of a file: its SOPInstanceUID without "ID_", else its name. */
static struct label_entry *labels_of(struct label_map *m, const char *sop, const char *path)
{
    const char *k = strncmp(sop, "ID_", 3) == 0 ? sop + 3 : sop;
    struct label_entry *e = map_get(m, k, strlen(k), 0);
    if (e) return e;
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    if (strncmp(base, "ID_", 3) == 0) base += 3;
    size_t n = strlen(base);
    if (n > 4) n -= 4; /* .dcm */
    return map_get(m, base, n, 0);
}

/* ---- the cache ---------------------------------------------------------------
 * One file per (folder, windows, slice size), invalidated by a fingerprint of
 * the file names (relative to the folder, so that the same folder reached
 * through another path or a symbolic link keeps its cache), sizes and
 * modification times and of the labels CSV. */

static void cache_path(const struct train_dataset *d, const char *dir, const char *cache_dir,
                       char *out, size_t n)
{
    char real[PATH_MAX], prep[256];
    if (!realpath(dir, real)) snprintf(real, sizeof real, "%s", dir);
    char key[PATH_MAX + 256];
    ds_prep_string(d, prep, sizeof prep);
    snprintf(key, sizeof key, "%s%s", real, prep);
    uint64_t h = ds_fnv(key, strlen(key), DS_FNV_BASIS);
    if (cache_dir)
        snprintf(out, n, "%s/%016llx.cache", cache_dir, (unsigned long long)h);
    else
        snprintf(out, n, "%s/.ichtriage-cache/%016llx.cache", dir, (unsigned long long)h);
}

/* With masks, the folder's masks/ (NULL when it has none) into mask_dir. */
static const char *masks_of(const struct train_dataset *d, const char *dir, char *mask_dir,
                            size_t n)
{
    struct stat st;
    snprintf(mask_dir, n, "%s/masks", dir);
    return d->masks && stat(mask_dir, &st) == 0 && S_ISDIR(st.st_mode) ? mask_dir : NULL;
}

/* h with a file's size and modification time (to the nanosecond). */
static uint64_t fnv_stat(const struct stat *st, uint64_t h)
{
    long long v[3] = {(long long)st->st_size, (long long)st->st_mtim.tv_sec,
                      (long long)st->st_mtim.tv_nsec};
    return ds_fnv((const char *)v, sizeof v, h);
}

static uint64_t fingerprint(const struct file_list *fl, const char *dir, const char *csv,
                            const char *mask_dir)
{
    uint64_t h = DS_FNV_BASIS;
    struct stat st;
    size_t skip = strlen(dir);
    for (size_t i = 0; i < fl->n; i++) {
        const char *rel = strncmp(fl->p[i], dir, skip) == 0 ? fl->p[i] + skip : fl->p[i];
        h = ds_fnv(rel, strlen(rel), h);
        if (stat(fl->p[i], &st) == 0) h = fnv_stat(&st, h);
    }
    /* nanoseconds: a label flipped (same size) in the second of the last
     * change is a change */
    if (stat(csv, &st) == 0) h = fnv_stat(&st, h);
    /* a mask added or removed changes the folder's time */
    if (mask_dir && stat(mask_dir, &st) == 0) {
        long long v[2] = {(long long)st.st_mtim.tv_sec, (long long)st.st_mtim.tv_nsec};
        h = ds_fnv((const char *)v, sizeof v, h);
    }
    return h;
}

struct cache_head {
    char magic[12];
    uint64_t fingerprint;
    int32_t c, h, w, nseries;
    uint64_t nslices;
    int32_t skipped;
};

static size_t cache_size(const struct train_dataset *d, size_t nslices, int nseries)
{
    return DS_FILE_HEAD + nslices * ds_slice_bytes(d) +
           (size_t)nseries * sizeof(struct train_series) + nslices * TRAIN_LABELS;
}

static int cache_load(struct train_dataset *d, const char *path, uint64_t fp)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    struct cache_head h;
    struct stat st;
    int rc = -1;
    if (ds_pread_full(fd, &h, sizeof h, 0) != 0 ||
        memcmp(h.magic, CACHE_MAGIC, sizeof h.magic) != 0 || h.fingerprint != fp || h.c != d->c ||
        h.h != d->h || h.w != d->w || h.nseries <= 0 || h.nslices == 0 ||
        h.nslices > (1ULL << 32) || fstat(fd, &st) != 0 ||
        (size_t)st.st_size != cache_size(d, h.nslices, h.nseries))
        goto out;
    if (ds_grow(d, h.nslices, h.nseries) != 0) goto out;
    struct train_series *s = d->series + d->nseries;
    size_t meta = DS_FILE_HEAD + h.nslices * ds_slice_bytes(d);
    if (ds_pread_full(fd, s, (size_t)h.nseries * sizeof *s, meta) != 0 ||
        ds_pread_full(fd, d->labels + d->nslices * TRAIN_LABELS, h.nslices * TRAIN_LABELS,
                      meta + (size_t)h.nseries * sizeof *s) != 0)
        goto out;
    /* a corrupt file with the right head: whole series within the slices */
    for (int i = 0; i < h.nseries; i++) {
        s[i].study_uid[sizeof s[i].study_uid - 1] = s[i].series_uid[sizeof s[i].series_uid - 1] = 0;
        s[i].patient_id[sizeof s[i].patient_id - 1] = 0;
        if (s[i].n <= 0 || s[i].n > TRIAGE_MAX_SLICES || s[i].first > h.nslices ||
            (size_t)s[i].n > h.nslices - s[i].first)
            goto out;
    }
    size_t first = d->nslices;
    d->nslices += h.nslices;
    if (ds_map_pixels(d, fd, (size_t)st.st_size, first) != 0) {
        d->nslices = first;
        goto out;
    }
    for (int i = 0; i < h.nseries; i++)
        s[i].first += first;
    d->nseries += h.nseries;
    d->skipped_files += h.skipped;
    rc = 0;
out:
    close(fd);
    return rc;
}

/* A cache being written: the pixels go to <cache>.tmp as series are
 * decoded, so that a folder larger than memory can be decoded; the file is
 * then mapped. <cache>.tmp.progress records the series whose pixels are on
 * disk (made durable about once a second), so that a decode that is killed
 * (an RSNA folder takes about an hour) goes on where it stopped. */
struct cache_writer {
    int fd;       /* <cache>.tmp, locked; -1 when there is none */
    FILE *f;      /* its pixels */
    int progress; /* <cache>.tmp.progress, or -1 */
    char *pend;   /* records of series not yet made durable */
    size_t npend, cappend;
    size_t first_slice; /* the folder's first slice in the dataset */
    int unlabelled;     /* files skipped before decoding */
    int sync_ms;
    struct timespec synced_at;
    char tmp[PATH_MAX + 410], prog[PATH_MAX + 430], recs[PATH_MAX + 430];
};

#define PROGRESS_MAGIC "ICHTPROG2\n" /* 2: as the cache's 5 */

struct progress_head {
    char magic[12];
    uint64_t fingerprint;
    int32_t c, h, w, pad;
};

/* One series whose pixels are in the file, followed by its s.n x
 * TRAIN_LABELS labels. */
struct progress_rec {
    uint64_t next;   /* the file record (recs index) after the series */
    int32_t skipped; /* files skipped by the decode so far */
    int32_t pad;
    struct train_series s; /* s.first: from the folder's first slice */
};

/* <cache>.tmp.recs: the labelled files' records (study, series, SOP,
 * patient), sorted, so that a resumed decode does not read every header
 * again (752k files for RSNA). */
#define RECS_MAGIC "ICHTRECS1\n"

struct recs_head {
    char magic[12];
    uint32_t rec_size; /* sizeof(struct file_rec) */
    uint64_t fingerprint, nrec;
    int32_t unlabelled, pad;
};

/* The records an earlier run that was stopped wrote for the nfiles files of
 * fp, or NULL; *nrec and *unlabelled (files without pixels or labels) with
 * them. */
static struct file_rec *recs_read(const struct cache_writer *cw, uint64_t fp, size_t nfiles,
                                  size_t *nrec, int *unlabelled)
{
    int fd = open(cw->recs, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NULL;
    struct recs_head h;
    struct stat st;
    struct file_rec *r = NULL;
    bool ok = ds_pread_full(fd, &h, sizeof h, 0) == 0 &&
              memcmp(h.magic, RECS_MAGIC, sizeof RECS_MAGIC) == 0 && h.rec_size == sizeof *r &&
              h.fingerprint == fp && h.nrec > 0 && h.nrec <= nfiles && h.unlabelled >= 0 &&
              fstat(fd, &st) == 0 && (uint64_t)st.st_size == sizeof h + h.nrec * sizeof *r &&
              (r = malloc(h.nrec * sizeof *r)) &&
              ds_pread_full(fd, r, h.nrec * sizeof *r, sizeof h) == 0;
    for (size_t i = 0; ok && i < h.nrec; i++) {
        ok = r[i].idx >= 0 && (size_t)r[i].idx < nfiles;
        r[i].study[sizeof r[i].study - 1] = r[i].series[sizeof r[i].series - 1] = 0;
        r[i].sop[sizeof r[i].sop - 1] = r[i].patient[sizeof r[i].patient - 1] = 0;
    }
    close(fd);
    if (!ok) {
        free(r);
        return NULL;
    }
    *nrec = h.nrec;
    *unlabelled = h.unlabelled;
    return r;
}

/* Keeps the records for a resume: written whole to <recs>.new (the same
 * name each time, under the cache's lock: what a killed run left is written
 * over), synced, renamed. Without them a resume reads the headers again. */
static void recs_write(const struct cache_writer *cw, uint64_t fp, const struct file_rec *r,
                       size_t n, int unlabelled)
{
    struct recs_head h = {
        .rec_size = sizeof *r, .fingerprint = fp, .nrec = n, .unlabelled = unlabelled};
    memcpy(h.magic, RECS_MAGIC, sizeof RECS_MAGIC);
    char tmp[PATH_MAX + 450];
    snprintf(tmp, sizeof tmp, "%s.new", cw->recs);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (ds_write_synced(fd, &h, sizeof h, r, n * sizeof *r) != 0 || rename(tmp, cw->recs) != 0)
        unlink(tmp);
}

/* Opens <path>.tmp, locked, so that two runs decoding the same folder do not
 * write one file. Returns 0, or -1 (logged) when no cache can be written:
 * the folder is then decoded into memory. */
static int cache_create(struct cache_writer *cw, const char *path)
{
    char dirp[PATH_MAX + 400];
    snprintf(dirp, sizeof dirp, "%s", path);
    char *sl = strrchr(dirp, '/');
    if (sl) {
        *sl = 0;
        mkdir(dirp, 0755);
    }
    snprintf(cw->tmp, sizeof cw->tmp, "%s.tmp", path);
    snprintf(cw->prog, sizeof cw->prog, "%s.tmp.progress", path);
    snprintf(cw->recs, sizeof cw->recs, "%s.tmp.recs", path);
    for (int tries = 0; tries < 10; tries++) {
        int fd = open(cw->tmp, O_RDWR | O_CREAT | O_CLOEXEC, 0644); /* read: mapped after */
        if (fd < 0) break;
        if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
            close(fd);
            util_log(UTIL_LOG_WARN, "train_cache_busy",
                     "path=%s reason=\"another run is writing it\" decoding=memory", cw->tmp);
            return -1;
        }
        /* Still the file of that name (not one another run has just renamed
         * into place as the cache)? */
        struct stat a, b;
        if (fstat(fd, &a) == 0 && stat(cw->tmp, &b) == 0 && a.st_ino == b.st_ino &&
            a.st_dev == b.st_dev) {
            cw->fd = fd;
            return 0;
        }
        close(fd);
    }
    util_log(UTIL_LOG_WARN, "train_cache_unwritable", "path=%s error=\"%s\" decoding=memory", path,
             strerror(errno));
    return -1;
}

/* Adds to d the series that cw's progress file records for the files of
 * fingerprint fp (their pixels are in the file, mapped at the end), as far
 * as the file holds their pixels and they are the series of recs. Returns
 * how many bytes of the progress file those records take (0: none usable);
 * *next gets the record to go on from, *vskipped the files skipped. */
static long progress_read(struct cache_writer *cw, struct train_dataset *d, uint64_t fp,
                          const struct file_rec *recs, size_t nrec, size_t *next, int *vskipped)
{
    int fd = open(cw->prog, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    FILE *f = fdopen(fd, "rb");
    struct progress_head h;
    struct stat st;
    long good = 0;
    size_t done = 0, per = ds_slice_bytes(d);
    if (!f || fread(&h, sizeof h, 1, f) != 1 ||
        memcmp(h.magic, PROGRESS_MAGIC, sizeof PROGRESS_MAGIC) != 0 || h.fingerprint != fp ||
        h.c != d->c || h.h != d->h || h.w != d->w || fstat(cw->fd, &st) != 0)
        goto out;
    good = (long)sizeof h;
    struct progress_rec r;
    while (fread(&r, sizeof r, 1, f) == 1) {
        struct train_series *s = &r.s;
        s->study_uid[sizeof s->study_uid - 1] = s->series_uid[sizeof s->series_uid - 1] = 0;
        s->patient_id[sizeof s->patient_id - 1] = 0;
        if (s->n <= 0 || s->first != done || r.next <= *next || r.next > nrec ||
            strcmp(recs[r.next - 1].series, s->series_uid) != 0 ||
            strcmp(recs[r.next - 1].study, s->study_uid) != 0 ||
            (size_t)st.st_size < DS_FILE_HEAD + (done + (size_t)s->n) * per ||
            ds_grow(d, (size_t)s->n, 1) != 0 ||
            fread(d->labels + d->nslices * TRAIN_LABELS, TRAIN_LABELS, (size_t)s->n, f) !=
                (size_t)s->n)
            break;
        s->first = d->nslices;
        d->series[d->nseries++] = *s;
        d->nslices += (size_t)s->n;
        done += (size_t)s->n;
        *next = r.next;
        *vskipped = r.skipped;
        good = ftell(f);
    }
out:
    if (f)
        fclose(f);
    else
        close(fd);
    return good;
}

/* Starts writing: goes on from what an earlier run that was stopped left
 * (progress_read; logged), else from nothing. *next gets the first record
 * to decode, *vskipped the files the earlier run skipped. Returns 0, or -1
 * (logged) when the file cannot be written: cw is abandoned. */
static void cache_abandon(struct cache_writer *cw);
static void progress_sync(struct cache_writer *cw);
static int cache_start(struct cache_writer *cw, struct train_dataset *d, uint64_t fp,
                       const struct file_rec *recs, size_t nrec, size_t *next, int *vskipped)
{
    int first_series = d->nseries;
    cw->first_slice = d->nslices;
    *next = 0, *vskipped = 0;
    long good = progress_read(cw, d, fp, recs, nrec, next, vskipped);
    size_t kept = d->nslices - cw->first_slice;
    if (!(cw->f = ds_pixels_file(cw->fd, kept * ds_slice_bytes(d)))) {
        util_log(UTIL_LOG_WARN, "train_cache_unwritable", "path=%s error=\"%s\" decoding=memory",
                 cw->tmp, strerror(errno));
        cache_abandon(cw);
        d->nseries = first_series, d->nslices = cw->first_slice;
        *next = 0, *vskipped = 0;
        return -1;
    }
    cw->fd = -1; /* the stream's now */
    clock_gettime(CLOCK_MONOTONIC, &cw->synced_at);
    if (d->nseries > first_series)
        util_log(UTIL_LOG_INFO, "train_cache_resumed", "path=%s series=%d slices=%zu next_file=%zu",
                 cw->tmp, d->nseries - first_series, kept, *next);
    /* Without a progress file the cache is still written, only not resumable. */
    struct progress_head h = {.fingerprint = fp, .c = d->c, .h = d->h, .w = d->w};
    memcpy(h.magic, PROGRESS_MAGIC, sizeof PROGRESS_MAGIC);
    cw->progress = open(cw->prog, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (cw->progress >= 0 &&
        (good > 0
             ? ftruncate(cw->progress, good) != 0 || lseek(cw->progress, good, SEEK_SET) != good
             : ftruncate(cw->progress, 0) != 0 ||
                   write(cw->progress, &h, sizeof h) != (ssize_t)sizeof h)) {
        close(cw->progress);
        cw->progress = -1;
        unlink(cw->prog);
    }
    return 0;
}

/* Notes that the series just added (d->series[d->nseries - 1]) ends before
 * record next; about once every cw->sync_ms, makes the pixels written so
 * far durable and then records their series, so that a killed run resumes
 * after them. */
static void cache_progress(struct cache_writer *cw, const struct train_dataset *d, size_t next,
                           int skipped)
{
    if (cw->progress < 0) return;
    const struct train_series *s = &d->series[d->nseries - 1];
    size_t need = sizeof(struct progress_rec) + (size_t)s->n * TRAIN_LABELS;
    if (cw->npend + need > cw->cappend) {
        size_t cap = (cw->npend + need) * 2;
        char *p = realloc(cw->pend, cap);
        if (!p) return; /* a resume would find fewer series */
        cw->pend = p, cw->cappend = cap;
    }
    struct progress_rec r = {.next = next, .skipped = skipped - cw->unlabelled, .s = *s};
    r.s.first -= cw->first_slice;
    memcpy(cw->pend + cw->npend, &r, sizeof r);
    memcpy(cw->pend + cw->npend + sizeof r, d->labels + s->first * TRAIN_LABELS,
           (size_t)s->n * TRAIN_LABELS);
    cw->npend += need;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if ((now.tv_sec - cw->synced_at.tv_sec) * 1000 +
            (now.tv_nsec - cw->synced_at.tv_nsec) / 1000000 <
        cw->sync_ms)
        return;
    cw->synced_at = now;
    progress_sync(cw);
}

/* Makes the pixels written so far durable, then records their series. */
static void progress_sync(struct cache_writer *cw)
{
    if (cw->progress < 0 || cw->npend == 0) return;
    if (fflush(cw->f) != 0 || fdatasync(fileno(cw->f)) != 0) return; /* the write fails too */
    if (write(cw->progress, cw->pend, cw->npend) != (ssize_t)cw->npend ||
        fdatasync(cw->progress) != 0) {
        /* a part of a record is ignored by the next run; stop recording */
        close(cw->progress);
        cw->progress = -1;
        return;
    }
    cw->npend = 0;
}

/* Stops writing the cache: with keep (the folder failed for a reason that
 * a next run may not meet, such as memory), what is on disk stays for that
 * run to resume from, as after a kill; else (the cache cannot be written)
 * its files go. */
static void cache_close(struct cache_writer *cw, bool keep)
{
    if (cw->fd < 0 && !cw->f) return;
    if (keep && cw->f) {
        progress_sync(cw);
    } else if (!keep) {
        unlink(cw->tmp);
        unlink(cw->prog);
        unlink(cw->recs);
    }
    if (cw->f) fclose(cw->f);
    if (cw->fd >= 0) close(cw->fd);
    if (cw->progress >= 0) close(cw->progress);
    free(cw->pend);
    cw->f = NULL, cw->fd = -1, cw->progress = -1, cw->pend = NULL;
}

static void cache_abandon(struct cache_writer *cw)
{
    cache_close(cw, false);
}

/* Writes the series from first_series on and their labels, then the head;
 * syncs, maps the file as those slices' pixels and renames it into place.
 * Returns 0, or -1 when it could not be written or mapped (logged). */
static int cache_finish(struct cache_writer *cw, struct train_dataset *d, int first_series,
                        size_t first_slice, int skipped, const char *path, uint64_t fp)
{
    struct cache_head h = {.fingerprint = fp,
                           .c = d->c,
                           .h = d->h,
                           .w = d->w,
                           .nseries = d->nseries - first_series,
                           .nslices = d->nslices - first_slice,
                           .skipped = skipped};
    memcpy(h.magic, CACHE_MAGIC, sizeof h.magic);
    FILE *f = cw->f;
    int ok = 1;
    for (int i = first_series; ok && i < d->nseries; i++) {
        struct train_series s = d->series[i];
        s.first -= first_slice;
        ok = fwrite(&s, sizeof s, 1, f) == 1;
    }
    ok = ok &&
         fwrite(d->labels + first_slice * TRAIN_LABELS, TRAIN_LABELS, h.nslices, f) == h.nslices;
    ok = ok && fflush(f) == 0 && pwrite(fileno(f), &h, sizeof h, 0) == (ssize_t)sizeof h &&
         fsync(fileno(f)) == 0;
    size_t total = cache_size(d, h.nslices, h.nseries);
    if (!ok || ds_map_pixels(d, fileno(f), total, first_slice) != 0) {
        util_log(UTIL_LOG_WARN, "train_cache_unwritable", "path=%s error=\"%s\" decoding=memory",
                 path, strerror(errno));
        cache_abandon(cw);
        return -1;
    }
    if (rename(cw->tmp, path) != 0) {
        /* the mapping stays valid; the next run decodes again */
        util_log(UTIL_LOG_WARN, "train_cache_unwritable", "path=%s error=\"%s\"", path,
                 strerror(errno));
        unlink(cw->tmp);
    }
    unlink(cw->prog);
    unlink(cw->recs);
    fclose(cw->f);
    if (cw->progress >= 0) close(cw->progress);
    free(cw->pend);
    cw->f = NULL, cw->progress = -1, cw->pend = NULL;
    return 0;
}

/* The progress of a stage ("headers", "slices") of decoding dir: the
 * first decode of the RSNA folder (752k files) takes about an hour. */
static void decode_progress(struct util_progress *p, const struct train_dataset *d, const char *dir,
                            const char *stage, size_t total, size_t first)
{
    char label[PATH_MAX + 40], fields[PATH_MAX + 40];
    snprintf(label, sizeof label, "%s: %s", dir,
             strcmp(stage, "headers") == 0 ? "reading headers" : "decoding");
    snprintf(fields, sizeof fields, "dir=%s stage=%s", dir, stage);
    util_progress_begin(p, "train_decode_progress", label, fields, "files", total, first,
                        d->progress_every_s);
}

/* Reads the header of every file of fl: the records of those with pixels
 * and a row in lm, sorted by series (*nrec of them; *skipped counts the
 * others). NULL with a message when none is left or memory runs out. */
static struct file_rec *read_headers(const struct train_dataset *d, const char *dir,
                                     const struct file_list *fl, struct label_map *lm,
                                     const char *csv, size_t *nrec, int *skipped, char *err,
                                     size_t errlen)
{
    struct file_rec *recs = calloc(fl->n, sizeof *recs);
    if (!recs) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    size_t n = 0, unreadable = 0;
    char first_bad[512] = "";
    struct util_progress pg;
    decode_progress(&pg, d, dir, "headers", fl->n, 0);
    for (size_t i = 0; i < fl->n; util_progress_step(&pg, ++i)) {
        struct scp_info info;
        char e[256] = "";
        if (scp_info_read(fl->p[i], &info, e, sizeof e) != 0 || !info.has_pixel_data) {
            if (!unreadable++)
                snprintf(first_bad, sizeof first_bad, "%.300s: %.200s", fl->p[i],
                         e[0] ? e : "no pixel data");
            (*skipped)++;
            continue;
        }
        if (!labels_of(lm, info.sop_uid, fl->p[i])) {
            (*skipped)++;
            continue;
        }
        struct file_rec *r = &recs[n++];
        r->idx = (int)i;
        snprintf(r->study, sizeof r->study, "%s", info.study_uid);
        snprintf(r->series, sizeof r->series, "%s", info.series_uid);
        snprintf(r->sop, sizeof r->sop, "%s", info.sop_uid);
        snprintf(r->patient, sizeof r->patient, "%s", info.patient_id);
    }
    util_progress_end(&pg);
    /* Files that are not readable images leave holes in their series: said
     * as a warning with the first one (an info count had been all). */
    char safe[512];
    if (unreadable)
        util_log(UTIL_LOG_WARN, "train_files_unreadable", "dir=%s files=%zu of=%zu first=%s", dir,
                 unreadable, fl->n, util_log_safe(safe, sizeof safe, first_bad));
    if (n == 0 && unreadable == fl->n) {
        snprintf(err, errlen, "%s: none of its %zu .dcm files is a readable DICOM image (%s)", dir,
                 fl->n, first_bad);
        free(recs);
        return NULL;
    }
    if (n == 0) {
        snprintf(err, errlen, "%s: none of its %zu DICOM files has a row in %s", dir, fl->n, csv);
        free(recs);
        return NULL;
    }
    /* A second file of the same instance (a copy beside it) would be the
     * same slice twice in its series: the first file is kept. */
    qsort(recs, n, sizeof *recs, cmp_rec_sop);
    size_t kept = 0, copies = 0;
    for (size_t i = 0; i < n; i++) {
        if (kept && cmp_series(&recs[i], &recs[kept - 1]) == 0 &&
            strcmp(recs[i].sop, recs[kept - 1].sop) == 0) {
            if (!copies++)
                util_log(UTIL_LOG_WARN, "train_files_duplicate",
                         "dir=%s dropped=\"%.300s\" kept=\"%.300s\"", dir, fl->p[recs[i].idx],
                         fl->p[recs[kept - 1].idx]);
            (*skipped)++;
            continue;
        }
        recs[kept++] = recs[i];
    }
    if (copies) util_log(UTIL_LOG_WARN, "train_files_duplicate", "dir=%s files=%zu", dir, copies);
    n = kept;
    qsort(recs, n, sizeof *recs, cmp_rec);
    *nrec = n;
    return recs;
}

/* Decodes the series of recs (nrec, sorted by series) from start on into the dataset:
 * their pixels into cw's file, or into memory when cw is NULL. Returns 0,
 * -1 with a message, or 1 when the cache file could not be written (logged;
 * the caller drops what was added and decodes into memory). */
static int decode_folder(struct train_dataset *d, const char *dir, const struct file_list *fl,
                         struct label_map *lm, const struct file_rec *recs, size_t start,
                         size_t nrec, struct cache_writer *cw, const char *cpath, int *skipped,
                         const char *mask_dir, char *err, size_t errlen)
{
    size_t per = ds_slice_bytes(d);
    const char **paths = malloc(nrec * sizeof *paths);
    uint8_t *buf = NULL;
    size_t bufn = 0;
    int rc = 0;
    /* Labels the CSV has no row for (subtypes: unknown; "any": from the
     * subtypes), and slices with a subtype but not "any": said, not
     * silently trained on. */
    size_t missing = 0, any_missing = 0, inconsistent = 0;
    if (!paths) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    struct util_progress pg;
    decode_progress(&pg, d, dir, "slices", nrec, start);
    for (size_t a = start, b; a < nrec && rc == 0; util_progress_step(&pg, a = b)) {
        for (b = a + 1; b < nrec && strcmp(recs[a].study, recs[b].study) == 0 &&
                        strcmp(recs[a].series, recs[b].series) == 0;
             b++)
            ;
        int np = (int)(b - a);
        for (int k = 0; k < np; k++)
            paths[k] = fl->p[recs[a + k].idx];
        struct triage_volume v;
        char e[512];
        if (triage_volume_build(paths, np, &v, e, sizeof e) != 0) {
            util_log(UTIL_LOG_WARN, "train_series_skipped", "series=%s reason=\"%s\"",
                     recs[a].series, e);
            *skipped += np;
            continue;
        }
        uint8_t *px = NULL;
        if (ds_grow(d, (size_t)v.n, 1) == 0) {
            if (!cw) {
                px = train_dataset_reserve(d, (size_t)v.n);
            } else {
                if ((size_t)v.n > bufn) {
                    free(buf);
                    bufn = (buf = malloc((size_t)v.n * per)) ? (size_t)v.n : 0;
                }
                px = buf;
            }
        }
        int dec = px ? ds_decode(d, &v, paths, mask_dir, px, e, sizeof e) : -1;
        if (dec == 1) {
            /* pixels that do not match the header (RSNA has such a file):
             * that series only, as when its volume cannot be built */
            util_log(UTIL_LOG_WARN, "train_series_skipped", "series=%s reason=\"%s\"",
                     recs[a].series, e);
            *skipped += np;
            if (!cw) ds_runs_truncate(d, d->nslices); /* the slices reserved for it */
            triage_volume_free(&v);
            continue;
        }
        if (!px) {
            snprintf(err, errlen, "out of memory for a series of %d slices", v.n);
            rc = -1;
        } else if (dec != 0) {
            snprintf(err, errlen, "%s", e);
            rc = -1;
        } else if (cw && fwrite(px, per, (size_t)v.n, cw->f) != (size_t)v.n) {
            util_log(UTIL_LOG_WARN, "train_cache_unwritable",
                     "path=%s error=\"%s\" decoding=memory", cpath, strerror(errno));
            rc = 1;
        }
        if (rc != 0) {
            triage_volume_free(&v);
            break;
        }
        struct train_series *s = &d->series[d->nseries];
        memset(s, 0, sizeof *s);
        snprintf(s->study_uid, sizeof s->study_uid, "%s", recs[a].study);
        snprintf(s->series_uid, sizeof s->series_uid, "%s", recs[a].series);
        snprintf(s->patient_id, sizeof s->patient_id, "%s",
                 recs[a].patient[0] ? recs[a].patient : recs[a].study);
        s->n = v.n;
        s->first = d->nslices;
        s->slice_labels = 1;
        for (int i = 0; i < v.n; i++) {
            const char *path = paths[v.slices[i].file];
            /* The slice's SOP: from the volume (frames share their file's). */
            struct label_entry *le = labels_of(lm, v.slices[i].sop_uid, path);
            uint8_t *y = d->labels + (d->nslices + (size_t)i) * TRAIN_LABELS;
            int sub = 0;
            for (int l = 1; l < TRAIN_LABELS; l++) {
                bool known = le && le->y[l] != TRAIN_LABEL_UNKNOWN;
                missing += !known;
                y[l] = known ? le->y[l] : TRAIN_LABEL_UNKNOWN;
                sub |= y[l] == 1;
            }
            /* "any" without its row: 1 with a subtype, otherwise 0 */
            bool any_known = le && le->y[0] != TRAIN_LABEL_UNKNOWN;
            any_missing += !any_known;
            y[0] = any_known ? le->y[0] : sub;
            inconsistent += sub && y[0] != 1;
            /* the series' labels: 1 where a slice has it, otherwise
             * unknown where a slice's is, otherwise 0 */
            for (int l = 0; l < TRAIN_LABELS; l++)
                if (y[l] == 1 || (y[l] == TRAIN_LABEL_UNKNOWN && s->study[l] == 0))
                    s->study[l] = y[l];
        }
        d->nslices += (size_t)v.n;
        d->nseries++;
        triage_volume_free(&v);
        if (cw) cache_progress(cw, d, b, *skipped);
    }
    util_progress_end(&pg);
    if (missing)
        util_log(UTIL_LOG_WARN, "train_labels_missing",
                 "dir=%s labels=%zu reason=\"subtypes with no row in the labels CSV: unknown, not"
                 " trained on nor scored\"",
                 dir, missing);
    if (any_missing)
        util_log(UTIL_LOG_WARN, "train_labels_missing",
                 "dir=%s labels=%zu reason=\"'any' with no row in the labels CSV: taken from the"
                 " slice's subtypes (absent without one)\"",
                 dir, any_missing);
    if (inconsistent)
        util_log(UTIL_LOG_WARN, "train_labels_inconsistent",
                 "dir=%s slices=%zu reason=\"a subtype 1 with any 0\"", dir, inconsistent);
    free(buf);
    free(paths);
    return rc;
}

int train_dataset_add_folder(struct train_dataset *d, const char *dir, const char *cache_dir,
                             char *err, size_t errlen)
{
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "%s: not a folder", dir);
        return -1;
    }
    char csv[PATH_MAX];
    if (find_labels_csv(dir, csv, sizeof csv, err, errlen) != 0) return -1;
    struct file_list fl = {0};
    if (walk(dir, &fl, 0, err, errlen) != 0) {
        files_free(&fl);
        return -1;
    }
    if (fl.n == 0) {
        snprintf(err, errlen, "%s: no DICOM files (*.dcm) found below it", dir);
        files_free(&fl);
        return -1;
    }
    qsort(fl.p, fl.n, sizeof *fl.p, cmp_str);
    char mdir[PATH_MAX + 8];
    const char *masks = masks_of(d, dir, mdir, sizeof mdir);
    uint64_t fp = fingerprint(&fl, dir, csv, masks);
    const char *said = !d->masks ? "" : masks ? " masks=yes" : " masks=no"; /* for the log */
    char cpath[PATH_MAX + 300];
    cache_path(d, dir, cache_dir, cpath, sizeof cpath);
    int series_before = d->nseries;
    size_t slices_before = d->nslices;
    if (cache_load(d, cpath, fp) == 0) {
        /* this folder's, not the running totals of every folder so far */
        util_log(UTIL_LOG_INFO, "train_data_cached", "dir=%s series=%d slices=%zu%s", dir,
                 d->nseries - series_before, d->nslices - slices_before, said);
        files_free(&fl);
        return 0;
    }

    struct label_map lm = {0};
    struct file_rec *recs = NULL;
    struct cache_writer cw = {.fd = -1, .progress = -1, .sync_ms = d->cache_sync_ms};
    int rc = -1, first_series = d->nseries, skipped = 0, unlabelled;
    size_t first_slice = d->nslices, nrec = 0;
    if (labels_read(csv, &lm, err, errlen) != 0) goto out;
    if (lm.n == 0) {
        snprintf(err, errlen, "%s: no label rows", csv);
        goto out;
    }
    /* The cache file is locked first: a run that was stopped may have left
     * the file records, and then the headers need not be read again. */
    bool locked = cache_create(&cw, cpath) == 0;
    if (locked && (recs = recs_read(&cw, fp, fl.n, &nrec, &skipped))) {
        util_log(UTIL_LOG_INFO, "train_headers_recorded", "path=%s files=%zu labelled=%zu", cw.recs,
                 fl.n, nrec);
    } else {
        if (!(recs = read_headers(d, dir, &fl, &lm, csv, &nrec, &skipped, err, errlen))) goto out;
        if (locked) recs_write(&cw, fp, recs, nrec, skipped);
    }
    unlabelled = cw.unlabelled = skipped;
    size_t start = 0;
    int vskipped = 0;
    bool cached = locked && cache_start(&cw, d, fp, recs, nrec, &start, &vskipped) == 0;
    skipped += vskipped;
    int r = decode_folder(d, dir, &fl, &lm, recs, start, nrec, cached ? &cw : NULL, cpath, &skipped,
                          masks, err, errlen);
    if (r == 0 && cw.f && d->nseries > first_series &&
        cache_finish(&cw, d, first_series, first_slice, skipped, cpath, fp) != 0)
        r = 1;
    if (r == 1) {
        /* the cache could not be written (logged): into memory, again */
        cache_abandon(&cw);
        d->nseries = first_series;
        d->nslices = first_slice;
        ds_runs_truncate(d, first_slice);
        skipped = unlabelled;
        r = decode_folder(d, dir, &fl, &lm, recs, 0, nrec, NULL, cpath, &skipped, masks, err,
                          errlen);
    }
    if (r != 0) goto out;
    if (d->nseries == first_series) {
        snprintf(err, errlen, "%s: no usable series (all %zu labelled files skipped)", dir, nrec);
        goto out;
    }
    d->skipped_files += skipped;
    util_log(UTIL_LOG_INFO, "train_data_decoded", "dir=%s series=%d slices=%zu skipped_files=%d%s",
             dir, d->nseries - first_series, d->nslices - first_slice, skipped, said);
    rc = 0;
out:
    cache_close(&cw, rc != 0); /* kept on an error: a next run resumes */
    if (rc != 0) {
        d->nseries = first_series;
        d->nslices = first_slice;
        ds_runs_truncate(d, first_slice);
    }
    free(recs);
    map_free(&lm);
    files_free(&fl);
    return rc;
}

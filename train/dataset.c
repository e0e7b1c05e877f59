/* train/dataset.c: folders in the RSNA 2019 layout -> series of
 * preprocessed slices with labels, through a cache so that each DICOM file is
 * decoded once. */
#include "dataset.h"

#include <dirent.h>
#include <stdbool.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "nn.h"
#include "pipeline.h"
#include "progress.h"
#include "volume.h"

#define MAX_FILES 2000000
#define CACHE_MAGIC "ICHTCACHE3\n"

/* The pixels of series being added, going to an unnamed file (spill_begin). */
struct train_spill {
    FILE *f;
    size_t first; /* the first slice in the file */
    int64_t keep_free;
    char dir[PATH_MAX];
};

const char *const train_label_names[TRAIN_LABELS] = {
    "any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"};

void train_dataset_init(struct train_dataset *d, const struct triage_windows *w, int c, int h,
                        int wd)
{
    memset(d, 0, sizeof *d);
    d->windows = *w;
    d->c = c, d->h = h, d->w = wd;
    d->cache_sync_ms = 1000;
    d->progress_every_s = 60;
}

size_t train_dataset_input_size(const struct train_dataset *d)
{
    return (size_t)(2 * d->context + 1) * d->c * d->h * d->w;
}

/* Of the n records of size bytes at v, sorted by the size_t at offset off,
 * the index of the last one whose value is at most i (0 if none). */
static int last_at_or_before(const void *v, int n, size_t size, size_t off, size_t i)
{
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        size_t at;
        memcpy(&at, (const char *)v + (size_t)mid * size + off, sizeof at);
        if (at <= i)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

/* The series slice i belongs to (series are stored in slice order). */
static const struct train_series *series_of(const struct train_dataset *d, size_t i)
{
    return &d->series[last_at_or_before(d->series, d->nseries, sizeof *d->series,
                                        offsetof(struct train_series, first), i)];
}

/* ---- pixels: runs of slices, mapped or in memory ------------------------- */

static size_t slice_bytes(const struct train_dataset *d)
{
    return (size_t)d->c * d->h * d->w;
}

const uint8_t *train_dataset_pixels(const struct train_dataset *d, size_t i)
{
    /* the last run that starts at or before i */
    const struct train_pixel_run *r = &d->runs[last_at_or_before(
        d->runs, d->nruns, sizeof *d->runs, offsetof(struct train_pixel_run, first), i)];
    return r->p + (i - r->first) * slice_bytes(d);
}

static void run_free(struct train_pixel_run *r)
{
    if (r->map)
        munmap(r->map, r->maplen);
    else
        free(r->p);
    memset(r, 0, sizeof *r);
}

static struct train_pixel_run *run_add(struct train_dataset *d)
{
    struct train_pixel_run *v = realloc(d->runs, (size_t)(d->nruns + 1) * sizeof *v);
    if (!v) return NULL;
    d->runs = v;
    struct train_pixel_run *r = &d->runs[d->nruns++];
    memset(r, 0, sizeof *r);
    r->first = d->nslices;
    return r;
}

/* Drops the pixels of slices from nslices on (after a folder failed). */
static void runs_truncate(struct train_dataset *d, size_t nslices)
{
    while (d->nruns > 0 && d->runs[d->nruns - 1].first >= nslices)
        run_free(&d->runs[--d->nruns]);
    if (d->nruns > 0) {
        struct train_pixel_run *r = &d->runs[d->nruns - 1];
        if (r->first + r->n > nslices) r->n = nslices - r->first;
    }
}

uint8_t *train_dataset_reserve(struct train_dataset *d, size_t n)
{
    size_t per = slice_bytes(d);
    struct train_pixel_run *r = d->nruns ? &d->runs[d->nruns - 1] : NULL;
    if (!r || r->map || r->first + r->n != d->nslices) {
        if (!(r = run_add(d))) return NULL;
    }
    size_t need = r->n + n;
    if (need > r->cap) {
        size_t cap = r->cap ? r->cap : 64;
        while (cap < need)
            cap *= 2;
        uint8_t *p = realloc(r->p, cap * per);
        if (!p) return NULL;
        r->p = p, r->cap = cap;
    }
    r->n = need;
    return r->p + (d->nslices - r->first) * per;
}

/* A file of slices (a cache, a spill) starts with a head padded to
 * CACHE_PIXELS (a page, so that the pixels are aligned), then the pixels,
 * slice after slice; a cache then has the series and their labels. */
#define CACHE_PIXELS 4096

/* fd, cut after its first `keep` bytes of pixels, as a stream that writes
 * the pixels from there on (the head is written last); opened for reading
 * too, to be mapped. NULL on failure (fd stays open). */
static FILE *pixels_file(int fd, size_t keep)
{
    off_t at = (off_t)(CACHE_PIXELS + keep);
    if (ftruncate(fd, at) != 0 || lseek(fd, at, SEEK_SET) < 0) return NULL;
    return fdopen(fd, "w+b");
}

/* Maps fd (total bytes) read-only as the pixels of slices first ..
 * d->nslices - 1. Returns 0 or -1. */
static int map_pixels(struct train_dataset *d, int fd, size_t total, size_t first)
{
    void *map = mmap(NULL, total, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) return -1;
    struct train_pixel_run *r = run_add(d);
    if (!r) {
        munmap(map, total);
        return -1;
    }
    r->first = first;
    r->n = d->nslices - first;
    r->p = (uint8_t *)map + CACHE_PIXELS;
    r->map = map;
    r->maplen = total;
    return 0;
}

/* The dataset indices of the slices in slice i's input, in order: i alone
 * without context, else its series' slices i-context..i+context (the end
 * slice beyond either end). Returns how many (2 context + 1). */
static int input_slices(const struct train_dataset *d, size_t i, size_t *j)
{
    if (d->context == 0) {
        j[0] = i;
        return 1;
    }
    const struct train_series *se = series_of(d, i);
    int k = (int)(i - se->first), n = 0;
    for (int o = -d->context; o <= d->context; o++)
        j[n++] = se->first + (size_t)triage_context_slice(k, o, se->n);
    return n;
}

void train_dataset_input(const struct train_dataset *d, size_t i, uint8_t *out)
{
    size_t per = slice_bytes(d), j[2 * TRIAGE_MAX_CONTEXT + 1];
    int n = input_slices(d, i, j);
    for (int s = 0; s < n; s++)
        memcpy(out + (size_t)s * per, train_dataset_pixels(d, j[s]), per);
}

void train_dataset_input_float(const struct train_dataset *d, size_t i, float *out)
{
    size_t per = slice_bytes(d), j[2 * TRIAGE_MAX_CONTEXT + 1];
    int n = input_slices(d, i, j);
    for (int s = 0; s < n; s++, out += per) {
        const uint8_t *p = train_dataset_pixels(d, j[s]);
        for (size_t q = 0; q < per; q++)
            out[q] = (float)p[q] / 255.0f;
    }
}

void train_dataset_free(struct train_dataset *d)
{
    if (!d) return;
    if (d->spill) {
        fclose(d->spill->f);
        free(d->spill);
    }
    free(d->scache);
    for (int i = 0; i < d->nruns; i++)
        run_free(&d->runs[i]);
    free(d->runs);
    free(d->series);
    free(d->labels);
    memset(d, 0, sizeof *d);
}

/* ---- labels CSV: sop -> 6 labels, open addressing ---------------------- */

struct label_entry {
    char *sop; /* without the "ID_" prefix */
    uint8_t y[TRAIN_LABELS];
};
struct label_map {
    struct label_entry *e;
    size_t cap, n;
};

static uint64_t fnv(const char *s, size_t n, uint64_t h)
{
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 1099511628211ULL;
    return h;
}

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
            size_t j = fnv(m->e[i].sop, strlen(m->e[i].sop), 14695981039346656037ULL) & (g.cap - 1);
            while (g.e[j].sop)
                j = (j + 1) & (g.cap - 1);
            g.e[j] = m->e[i];
        }
        free(m->e);
        m->e = g.e, m->cap = g.cap;
    }
    if (!m->cap) return NULL;
    size_t j = fnv(sop, n, 14695981039346656037ULL) & (m->cap - 1);
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
        if (lineno == 1 || len == 0) continue;
        char *comma = strrchr(line, ',');
        char *id = line;
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
        int v = atoi(comma + 1);
        if (li < 0 || us <= id + 3 || (v != 0 && v != 1) || (comma[1] != '0' && comma[1] != '1')) {
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
        if (strncmp(head, "ID,Label", 8) == 0) {
            snprintf(out, n, "%s", p);
            found = 1;
            break;
        }
    }
    closedir(dd);
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
    uint64_t fingerprint; /* names, sizes and mtimes */
};

static int walk(const char *dir, struct file_list *fl, int depth, char *err, size_t errlen)
{
    if (depth > 8) return 0;
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

/* ---- growing the dataset -------------------------------------------------- */

static int grow(struct train_dataset *d, size_t add_slices, int add_series)
{
    uint8_t *lb = realloc(d->labels, (d->nslices + add_slices) * TRAIN_LABELS);
    if (!lb) return -1;
    d->labels = lb;
    struct train_series *s = realloc(d->series, (size_t)(d->nseries + add_series) * sizeof *s);
    if (!s) return -1;
    d->series = s;
    return 0;
}

/* Decodes and preprocesses the slices of v into dst (v->n slices), through
 * the node's own path (triage_preprocess_volume). Returns 0 or -1. */
static int decode_volume(const struct train_dataset *d, const struct triage_volume *v,
                         const char *const *paths, uint8_t *dst, char *err, size_t errlen)
{
    size_t per = slice_bytes(d);
    float *x = malloc(per * (size_t)v->n * sizeof(float));
    if (!x) {
        snprintf(err, errlen, "out of memory for a series of %d slices", v->n);
        return -1;
    }
    int rc = triage_preprocess_volume(v, paths, NULL, &d->windows, d->crop_head, d->h, d->w, x,
                                      NULL, err, errlen);
    for (size_t k = 0; rc == 0 && k < per * (size_t)v->n; k++)
        dst[k] = (uint8_t)lrintf(x[k] * 255.0f);
    free(x);
    return rc;
}

/* True when "sop/frame" is an entry of the comma-separated list. */
static bool marked_in(const char *list, const char *sop, int frame)
{
    char e[SCP_UID_MAX + 16];
    int n = snprintf(e, sizeof e, "%s/%d", sop, frame);
    for (const char *p = list; p && (p = strstr(p, e)); p += n)
        if ((p == list || p[-1] == ',') && (p[n] == ',' || p[n] == '\0')) return true;
    return false;
}

int train_dataset_spill_begin(struct train_dataset *d, const char *dir, int64_t keep_free)
{
    struct train_spill *sp = calloc(1, sizeof *sp);
    int fd = sp ? open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600) : -1;
    if (fd < 0 || !(sp->f = pixels_file(fd, 0))) {
        util_log(UTIL_LOG_WARN, "train_spill_unavailable", "dir=%s error=\"%s\" decoding=memory",
                 dir, strerror(errno));
        if (fd >= 0) close(fd);
        free(sp);
        return -1;
    }
    sp->first = d->nslices;
    sp->keep_free = keep_free;
    snprintf(sp->dir, sizeof sp->dir, "%s", dir);
    d->spill = sp;
    return 0;
}

int train_dataset_spill_end(struct train_dataset *d, char *err, size_t errlen)
{
    struct train_spill *sp = d->spill;
    if (!sp) return 0;
    d->spill = NULL;
    size_t n = d->nslices - sp->first;
    int rc = 0;
    if (n > 0 && map_pixels(d, fileno(sp->f), CACHE_PIXELS + n * slice_bytes(d), sp->first) != 0) {
        snprintf(err, errlen, "cannot map the slices written to a file in %s: %s", sp->dir,
                 strerror(errno));
        rc = -1;
    }
    fclose(sp->f);
    free(sp);
    return rc;
}

/* Writes the n slices at px to the spill file, whole or not at all (the
 * file is flushed). Returns 0, or -1 when they do not fit or cannot be
 * written (logged): then the spill ends and they belong in memory. */
/* Whether writing bytes more to dir's file system would leave less than
 * keep_free free there (false when it cannot be told). */
static bool disk_low(const char *dir, int64_t keep_free, size_t bytes)
{
    struct statvfs v;
    return statvfs(dir, &v) == 0 &&
           (int64_t)v.f_bavail * (int64_t)v.f_frsize < keep_free + (int64_t)bytes;
}

static int spill_put(struct train_dataset *d, const uint8_t *px, size_t n)
{
    struct train_spill *sp = d->spill;
    size_t bytes = n * slice_bytes(d);
    const char *why = NULL;
    if (disk_low(sp->dir, sp->keep_free, bytes))
        why = "disk_low";
    else if (fwrite(px, 1, bytes, sp->f) != bytes || fflush(sp->f) != 0)
        why = strerror(errno);
    if (!why) return 0;
    util_log(UTIL_LOG_WARN, "train_spill_stopped",
             "dir=%s reason=\"%s\" slices_written=%zu decoding=memory", sp->dir, why,
             d->nslices - sp->first);
    return -1;
}

/* How d's slices are made (their shape, the windows, the crop), as a
 * string for cache keys. */
static void prep_string(const struct train_dataset *d, char *key, size_t n)
{
    int k = snprintf(key, n, "|%dx%dx%d", d->c, d->h, d->w);
    for (int i = 0; i < d->windows.n && k < (int)n - 40; i++)
        k += snprintf(key + k, n - k, "|%g/%g", d->windows.center[i], d->windows.width[i]);
    if (d->crop_head) snprintf(key + k, n - k, "|crop=head");
}

/* prep_string hashed: the kept series' folder and the start of their keys. */
static uint64_t prep_hash(const struct train_dataset *d)
{
    char prep[256];
    prep_string(d, prep, sizeof prep);
    return fnv(prep, strlen(prep), 14695981039346656037ULL);
}

static int pread_full(int fd, void *buf, size_t n, size_t off)
{
    for (size_t k = 0; k < n;) {
        ssize_t r = pread(fd, (char *)buf + k, n - k, (off_t)(off + k));
        if (r <= 0) return -1;
        k += (size_t)r;
    }
    return 0;
}

/* ---- reviewed series kept between runs ----------------------------------- */

/* <dir>/<key>.slices: a head, then the series' n slices as decoded. */
#define SERIES_MAGIC "ICHTSERIES1\n"

struct series_head {
    char magic[16];
    uint64_t key;
    int32_t c, h, w, n;
};

struct train_series_cache {
    char parent[PATH_MAX], dir[PATH_MAX + 20]; /* dir: parent/<preprocessing> */
    int64_t keep_free;
    struct timespec start; /* files not used since are swept at the end */
    int used, written;
    bool stopped; /* writing stopped (disk low, a write failed; logged) */
};

/* A folder of kept series for each way of making slices, so that runs for
 * models of other inputs (train at 128, calibrate a 256 model) do not sweep
 * each other's; there, a series not used for this long goes. */
#define SERIES_CACHE_UNUSED_DAYS 30

int train_dataset_series_cache_begin(struct train_dataset *d, const char *dir, int64_t keep_free)
{
    struct train_series_cache *c = calloc(1, sizeof *c);
    struct stat st;
    if (c) snprintf(c->dir, sizeof c->dir, "%s/%016llx", dir, (unsigned long long)prep_hash(d));
    if (!c || (mkdir(dir, 0700) != 0 && errno != EEXIST) ||
        (mkdir(c->dir, 0700) != 0 && errno != EEXIST) || stat(c->dir, &st) != 0 ||
        !S_ISDIR(st.st_mode) || access(c->dir, W_OK | X_OK) != 0) {
        util_log(UTIL_LOG_WARN, "train_series_cache_unavailable", "dir=%s error=\"%s\"", dir,
                 strerror(errno));
        free(c);
        return -1;
    }
    snprintf(c->parent, sizeof c->parent, "%s", dir);
    c->keep_free = keep_free;
    /* the clock file times come from */
    clock_gettime(CLOCK_REALTIME_COARSE, &c->start);
    d->scache = c;
    return 0;
}

static bool older(const struct timespec *a, const struct timespec *b)
{
    return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

/* Deletes the kept series in dir (<key>.slices, and what killed runs left
 * of <key>.slices.XXXXXX) last used before t. Returns how many. */
static int sweep_slices(const char *dir, const struct timespec *t)
{
    int removed = 0;
    DIR *dd = opendir(dir);
    struct dirent *de;
    while (dd && (de = readdir(dd))) {
        if (!strstr(de->d_name, ".slices")) continue;
        struct stat st;
        if (fstatat(dirfd(dd), de->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode) &&
            older(&st.st_mtim, t) && unlinkat(dirfd(dd), de->d_name, 0) == 0)
            removed++;
    }
    if (dd) closedir(dd);
    return removed;
}

int train_dataset_series_cache_end(struct train_dataset *d, bool sweep)
{
    struct train_series_cache *c = d->scache;
    if (!c) return 0;
    d->scache = NULL;
    int removed = 0, used = c->used;
    if (sweep) {
        removed = sweep_slices(c->dir, &c->start);
        /* in the folders of other preprocessings, what was not used for a
         * month (their own runs keep what they use); empty folders go */
        struct timespec month = c->start;
        month.tv_sec -= SERIES_CACHE_UNUSED_DAYS * 86400;
        DIR *dd = opendir(c->parent);
        struct dirent *de;
        while (dd && (de = readdir(dd))) {
            char sub[PATH_MAX + 300];
            struct stat st;
            if (strlen(de->d_name) != 16 || strspn(de->d_name, "0123456789abcdef") != 16 ||
                fstatat(dirfd(dd), de->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 ||
                !S_ISDIR(st.st_mode))
                continue;
            snprintf(sub, sizeof sub, "%s/%s", c->parent, de->d_name);
            removed += sweep_slices(sub, &month);
            unlinkat(dirfd(dd), de->d_name, AT_REMOVEDIR); /* fails if anything else is there */
        }
        if (dd) closedir(dd);
    }
    util_log(UTIL_LOG_INFO, "train_series_cache", "dir=%s used=%d written=%d removed=%d", c->dir,
             c->used, c->written, removed);
    free(c);
    return used;
}

/* The key of the series of files paths (as listed): the preprocessing and
 * each file's name, size and modification time. */
static uint64_t series_key(const struct train_dataset *d, const char *const *paths, int npaths)
{
    uint64_t h = prep_hash(d);
    for (int i = 0; i < npaths; i++) {
        struct stat st;
        h = fnv(paths[i], strlen(paths[i]) + 1, h);
        if (stat(paths[i], &st) == 0) {
            long long v[3] = {(long long)st.st_size, (long long)st.st_mtim.tv_sec,
                              (long long)st.st_mtim.tv_nsec};
            h = fnv((const char *)v, sizeof v, h);
        }
    }
    return h;
}

/* The n slices of the series key from the cache into px, the file marked as
 * used. Returns true, or false when it has no good copy. */
static bool scache_read(struct train_dataset *d, uint64_t key, int n, uint8_t *px)
{
    char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/%016llx.slices", d->scache->dir, (unsigned long long)key);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    struct series_head h;
    struct stat st;
    size_t bytes = (size_t)n * slice_bytes(d);
    bool ok = pread_full(fd, &h, sizeof h, 0) == 0 &&
              memcmp(h.magic, SERIES_MAGIC, sizeof SERIES_MAGIC) == 0 && h.key == key &&
              h.c == d->c && h.h == d->h && h.w == d->w && h.n == n && fstat(fd, &st) == 0 &&
              (size_t)st.st_size == sizeof h + bytes && pread_full(fd, px, bytes, sizeof h) == 0;
    /* used now: the sweep at the end keeps it (read-only: utimensat) */
    if (ok) utimensat(AT_FDCWD, path, NULL, 0);
    close(fd);
    if (ok) d->scache->used++;
    return ok;
}

/* Keeps the n slices at px as series key: written whole under another
 * name, synced, then renamed. While less than keep_free would be left, or
 * after a write fails, nothing more is written (logged once). */
static void scache_write(struct train_dataset *d, uint64_t key, int n, const uint8_t *px)
{
    struct train_series_cache *c = d->scache;
    if (c->stopped) return;
    struct series_head h = {.key = key, .c = d->c, .h = d->h, .w = d->w, .n = n};
    memcpy(h.magic, SERIES_MAGIC, sizeof SERIES_MAGIC);
    size_t bytes = (size_t)n * slice_bytes(d);
    char path[PATH_MAX + 64], tmp[PATH_MAX + 80];
    snprintf(path, sizeof path, "%s/%016llx.slices", c->dir, (unsigned long long)key);
    snprintf(tmp, sizeof tmp, "%s.XXXXXX", path);
    const char *why = NULL;
    if (disk_low(c->dir, c->keep_free, sizeof h + bytes)) {
        why = "disk_low";
    } else {
        int fd = mkostemp(tmp, O_CLOEXEC);
        bool ok = fd >= 0 && write(fd, &h, sizeof h) == (ssize_t)sizeof h &&
                  write(fd, px, bytes) == (ssize_t)bytes && fdatasync(fd) == 0;
        if (fd >= 0 && close(fd) != 0) ok = false;
        if (ok && rename(tmp, path) == 0) {
            c->written++;
            return;
        }
        why = strerror(errno);
        if (fd >= 0) unlink(tmp);
    }
    util_log(UTIL_LOG_WARN, "train_series_cache_stopped",
             "dir=%s reason=\"%s\" written=%d rest=decoded_each_run", c->dir, why, c->written);
    c->stopped = true;
}

int train_dataset_add_series(struct train_dataset *d, const char *const *paths, int npaths,
                             const uint8_t study[TRAIN_LABELS], const char *marked, int *nmarked,
                             char *err, size_t errlen)
{
    struct triage_volume v;
    if (triage_volume_build(paths, npaths, &v, err, errlen) != 0) return -1;
    size_t n = (size_t)v.n;
    uint8_t *buf = d->spill ? malloc(n * slice_bytes(d)) : NULL, *px = NULL;
    int rc = -1, used_before = d->scache ? d->scache->used : 0;
    uint64_t key = d->scache ? series_key(d, paths, npaths) : 0;
    if (grow(d, n, 1) != 0 || !(px = d->spill ? buf : train_dataset_reserve(d, n))) {
        snprintf(err, errlen, "out of memory");
    } else if ((d->scache && scache_read(d, key, v.n, px)) ||
               decode_volume(d, &v, paths, px, err, errlen) == 0) {
        rc = 0;
        if (d->scache && d->scache->used == used_before) scache_write(d, key, v.n, px);
        if (d->spill && spill_put(d, px, n) != 0) {
            /* what is in the file is mapped; this series and the rest: memory */
            uint8_t *m = NULL;
            if (train_dataset_spill_end(d, err, errlen) != 0) {
                rc = -1;
            } else if (!(m = train_dataset_reserve(d, n))) {
                snprintf(err, errlen, "out of memory");
                rc = -1;
            } else {
                memcpy(m, px, n * slice_bytes(d));
            }
        }
    }
    free(buf);
    if (rc != 0) {
        runs_truncate(d, d->nslices);
        triage_volume_free(&v);
        return -1;
    }
    struct train_series *s = &d->series[d->nseries];
    memset(s, 0, sizeof *s);
    snprintf(s->study_uid, sizeof s->study_uid, "%s", v.study_uid);
    snprintf(s->series_uid, sizeof s->series_uid, "%s", v.series_uid);
    struct scp_info info;
    char e[256];
    if (scp_info_read(paths[0], &info, e, sizeof e) == 0)
        snprintf(s->patient_id, sizeof s->patient_id, "%s", info.patient_id);
    s->n = v.n;
    s->first = d->nslices;
    memcpy(s->study, study, TRAIN_LABELS);
    s->slice_labels = 0;
    memset(d->labels + d->nslices * TRAIN_LABELS, TRAIN_LABEL_UNKNOWN, (size_t)v.n * TRAIN_LABELS);
    /* Every slice of a negative study is negative. Marked slices of a
     * positive study: the bleed is there; which subtype only when the study
     * has one. */
    if (study[0] == 0) memset(d->labels + d->nslices * TRAIN_LABELS, 0, (size_t)v.n * TRAIN_LABELS);
    int nsub = 0, sub = -1, nm = 0;
    for (int l = 1; l < TRAIN_LABELS; l++)
        if (study[l] == 1) nsub++, sub = l;
    for (int i = 0; study[0] == 1 && marked && i < v.n; i++) {
        if (!marked_in(marked, v.slices[i].sop_uid, v.slices[i].frame)) continue;
        uint8_t *y = d->labels + (d->nslices + (size_t)i) * TRAIN_LABELS;
        y[0] = 1;
        if (nsub == 1)
            for (int l = 1; l < TRAIN_LABELS; l++)
                y[l] = l == sub;
        nm++;
    }
    if (nmarked) *nmarked = nm;
    d->nslices += (size_t)v.n;
    d->nseries++;
    triage_volume_free(&v);
    return 0;
}

/* One file's identity, for grouping. */
struct file_rec {
    int idx; /* into the file list */
    char study[SCP_UID_MAX], series[SCP_UID_MAX], sop[SCP_UID_MAX];
    char patient[65];
};

static int cmp_rec(const void *a, const void *b)
{
    const struct file_rec *x = a, *y = b;
    int c = strcmp(x->study, y->study);
    if (!c) c = strcmp(x->series, y->series);
    if (!c) c = x->idx - y->idx;
    return c;
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
    prep_string(d, prep, sizeof prep);
    snprintf(key, sizeof key, "%s%s", real, prep);
    uint64_t h = fnv(key, strlen(key), 14695981039346656037ULL);
    if (cache_dir)
        snprintf(out, n, "%s/%016llx.cache", cache_dir, (unsigned long long)h);
    else
        snprintf(out, n, "%s/.ichtriage-cache/%016llx.cache", dir, (unsigned long long)h);
}

static uint64_t fingerprint(const struct file_list *fl, const char *dir, const char *csv)
{
    uint64_t h = 14695981039346656037ULL;
    struct stat st;
    size_t skip = strlen(dir);
    for (size_t i = 0; i < fl->n; i++) {
        const char *rel = strncmp(fl->p[i], dir, skip) == 0 ? fl->p[i] + skip : fl->p[i];
        h = fnv(rel, strlen(rel), h);
        if (stat(fl->p[i], &st) == 0) {
            long long v[2] = {(long long)st.st_size, (long long)st.st_mtime};
            h = fnv((const char *)v, sizeof v, h);
        }
    }
    if (stat(csv, &st) == 0) {
        long long v[2] = {(long long)st.st_size, (long long)st.st_mtime};
        h = fnv((const char *)v, sizeof v, h);
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
    return CACHE_PIXELS + nslices * slice_bytes(d) + (size_t)nseries * sizeof(struct train_series) +
           nslices * TRAIN_LABELS;
}

static int cache_load(struct train_dataset *d, const char *path, uint64_t fp)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    struct cache_head h;
    struct stat st;
    int rc = -1;
    if (pread_full(fd, &h, sizeof h, 0) != 0 || memcmp(h.magic, CACHE_MAGIC, sizeof h.magic) != 0 ||
        h.fingerprint != fp || h.c != d->c || h.h != d->h || h.w != d->w || h.nseries <= 0 ||
        h.nslices == 0 || h.nslices > (1ULL << 32) || fstat(fd, &st) != 0 ||
        (size_t)st.st_size != cache_size(d, h.nslices, h.nseries))
        goto out;
    if (grow(d, h.nslices, h.nseries) != 0) goto out;
    struct train_series *s = d->series + d->nseries;
    size_t meta = CACHE_PIXELS + h.nslices * slice_bytes(d);
    if (pread_full(fd, s, (size_t)h.nseries * sizeof *s, meta) != 0 ||
        pread_full(fd, d->labels + d->nslices * TRAIN_LABELS, h.nslices * TRAIN_LABELS,
                   meta + (size_t)h.nseries * sizeof *s) != 0)
        goto out;
    for (int i = 0; i < h.nseries; i++)
        if (s[i].first + (size_t)s[i].n > h.nslices) goto out;
    size_t first = d->nslices;
    d->nslices += h.nslices;
    if (map_pixels(d, fd, (size_t)st.st_size, first) != 0) {
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
    char tmp[PATH_MAX + 410], prog[PATH_MAX + 430];
};

#define PROGRESS_MAGIC "ICHTPROG1\n"

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
    size_t done = 0, per = slice_bytes(d);
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
            (size_t)st.st_size < CACHE_PIXELS + (done + (size_t)s->n) * per ||
            grow(d, (size_t)s->n, 1) != 0 ||
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
static int cache_start(struct cache_writer *cw, struct train_dataset *d, uint64_t fp,
                       const struct file_rec *recs, size_t nrec, size_t *next, int *vskipped)
{
    int first_series = d->nseries;
    cw->first_slice = d->nslices;
    *next = 0, *vskipped = 0;
    long good = progress_read(cw, d, fp, recs, nrec, next, vskipped);
    size_t kept = d->nslices - cw->first_slice;
    if (!(cw->f = pixels_file(cw->fd, kept * slice_bytes(d)))) {
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

static void cache_abandon(struct cache_writer *cw)
{
    if (cw->fd < 0 && !cw->f) return;
    unlink(cw->tmp);
    unlink(cw->prog);
    if (cw->f) fclose(cw->f);
    if (cw->fd >= 0) close(cw->fd);
    if (cw->progress >= 0) close(cw->progress);
    free(cw->pend);
    cw->f = NULL, cw->fd = -1, cw->progress = -1, cw->pend = NULL;
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
    if (!ok || map_pixels(d, fileno(f), total, first_slice) != 0) {
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

/* Decodes the series of recs (nrec, sorted by series) from start on into the dataset:
 * their pixels into cw's file, or into memory when cw is NULL. Returns 0,
 * -1 with a message, or 1 when the cache file could not be written (logged;
 * the caller drops what was added and decodes into memory). */
static int decode_folder(struct train_dataset *d, const char *dir, const struct file_list *fl,
                         struct label_map *lm, const struct file_rec *recs, size_t start,
                         size_t nrec, struct cache_writer *cw, const char *cpath, int *skipped,
                         char *err, size_t errlen)
{
    size_t per = slice_bytes(d);
    const char **paths = malloc(nrec * sizeof *paths);
    uint8_t *buf = NULL;
    size_t bufn = 0;
    int rc = 0;
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
        if (grow(d, (size_t)v.n, 1) == 0) {
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
        if (!px) {
            snprintf(err, errlen, "out of memory for a series of %d slices", v.n);
            rc = -1;
        } else if (decode_volume(d, &v, paths, px, err, errlen) != 0) {
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
            for (int l = 0; l < TRAIN_LABELS; l++) {
                y[l] = le && le->y[l] != TRAIN_LABEL_UNKNOWN ? le->y[l] : 0;
                if (y[l] == 1) s->study[l] = 1;
            }
        }
        d->nslices += (size_t)v.n;
        d->nseries++;
        triage_volume_free(&v);
        if (cw) cache_progress(cw, d, b, *skipped);
    }
    util_progress_end(&pg);
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
    uint64_t fp = fingerprint(&fl, dir, csv);
    char cpath[PATH_MAX + 300];
    cache_path(d, dir, cache_dir, cpath, sizeof cpath);
    if (cache_load(d, cpath, fp) == 0) {
        util_log(UTIL_LOG_INFO, "train_data_cached", "dir=%s series=%d slices=%zu", dir, d->nseries,
                 d->nslices);
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
    recs = calloc(fl.n, sizeof *recs);
    if (!recs) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    struct util_progress pg;
    decode_progress(&pg, d, dir, "headers", fl.n, 0);
    for (size_t i = 0; i < fl.n; util_progress_step(&pg, ++i)) {
        struct scp_info info;
        char e[256];
        if (scp_info_read(fl.p[i], &info, e, sizeof e) != 0 || !info.has_pixel_data) {
            skipped++;
            continue;
        }
        if (!labels_of(&lm, info.sop_uid, fl.p[i])) {
            skipped++;
            continue;
        }
        struct file_rec *r = &recs[nrec++];
        r->idx = (int)i;
        snprintf(r->study, sizeof r->study, "%s", info.study_uid);
        snprintf(r->series, sizeof r->series, "%s", info.series_uid);
        snprintf(r->sop, sizeof r->sop, "%s", info.sop_uid);
        snprintf(r->patient, sizeof r->patient, "%s", info.patient_id);
    }
    util_progress_end(&pg);
    if (nrec == 0) {
        snprintf(err, errlen, "%s: none of its %zu DICOM files has a row in %s", dir, fl.n, csv);
        goto out;
    }
    qsort(recs, nrec, sizeof *recs, cmp_rec);
    unlabelled = cw.unlabelled = skipped;
    size_t start = 0;
    int vskipped = 0;
    bool cached = cache_create(&cw, cpath) == 0 &&
                  cache_start(&cw, d, fp, recs, nrec, &start, &vskipped) == 0;
    skipped += vskipped;
    int r = decode_folder(d, dir, &fl, &lm, recs, start, nrec, cached ? &cw : NULL, cpath, &skipped,
                          err, errlen);
    if (r == 0 && cw.f && d->nseries > first_series &&
        cache_finish(&cw, d, first_series, first_slice, skipped, cpath, fp) != 0)
        r = 1;
    if (r == 1) {
        /* the cache could not be written (logged): into memory, again */
        cache_abandon(&cw);
        d->nseries = first_series;
        d->nslices = first_slice;
        runs_truncate(d, first_slice);
        skipped = unlabelled;
        r = decode_folder(d, dir, &fl, &lm, recs, 0, nrec, NULL, cpath, &skipped, err, errlen);
    }
    if (r != 0) goto out;
    if (d->nseries == first_series) {
        snprintf(err, errlen, "%s: no usable series (all %zu labelled files skipped)", dir, nrec);
        goto out;
    }
    d->skipped_files += skipped;
    util_log(UTIL_LOG_INFO, "train_data_decoded", "dir=%s series=%d slices=%zu skipped_files=%d",
             dir, d->nseries - first_series, d->nslices - first_slice, skipped);
    rc = 0;
out:
    cache_abandon(&cw);
    if (rc != 0) {
        d->nseries = first_series;
        d->nslices = first_slice;
        runs_truncate(d, first_slice);
    }
    free(recs);
    map_free(&lm);
    files_free(&fl);
    return rc;
}

/* ---- split by patient ----------------------------------------------------- */

struct patient {
    const char *id;
    int positive;
    uint64_t key;
    int split;
};

static int cmp_patient(const void *a, const void *b)
{
    const struct patient *x = a, *y = b;
    if (x->positive != y->positive) return x->positive - y->positive;
    if (x->key != y->key) return x->key < y->key ? -1 : 1;
    return strcmp(x->id, y->id);
}

void train_dataset_split(struct train_dataset *d, uint64_t seed, double val_frac, double test_frac)
{
    struct patient *p = calloc((size_t)d->nseries + 1, sizeof *p);
    if (!p) return;
    int np = 0;
    for (int i = 0; i < d->nseries; i++) {
        int j;
        for (j = 0; j < np; j++)
            if (strcmp(p[j].id, d->series[i].patient_id) == 0) break;
        if (j == np) p[np++].id = d->series[i].patient_id;
        if (d->series[i].study[0]) p[j].positive = 1;
    }
    /* The order within each stratum: a hash of the id keyed by the seed, so
     * it depends on nothing but the patient and the seed. */
    for (int j = 0; j < np; j++) {
        uint64_t s = seed * 0x9E3779B97F4A7C15ULL + 1;
        p[j].key = fnv(p[j].id, strlen(p[j].id), nn_rng_next(&s));
    }
    qsort(p, (size_t)np, sizeof *p, cmp_patient);
    for (int a = 0, b; a < np; a = b) {
        for (b = a; b < np && p[b].positive == p[a].positive; b++)
            ;
        int n = b - a;
        int nt = (int)lround(n * test_frac), nv = (int)lround(n * val_frac);
        if (test_frac > 0 && nt == 0 && n >= 3) nt = 1;
        if (val_frac > 0 && nv == 0 && n >= 3) nv = 1;
        for (int k = 0; k < n; k++)
            p[a + k].split = k < nt        ? TRAIN_SPLIT_TEST
                             : k < nt + nv ? TRAIN_SPLIT_VAL
                                           : TRAIN_SPLIT_TRAIN;
    }
    for (int i = 0; i < d->nseries; i++)
        for (int j = 0; j < np; j++)
            if (strcmp(p[j].id, d->series[i].patient_id) == 0) d->series[i].split = p[j].split;
    free(p);
}

int train_dataset_hold_out(struct train_dataset *d, char *const *ids, int n)
{
    int held = 0;
    for (int i = 0; i < d->nseries; i++) {
        struct train_series *s = &d->series[i];
        int listed = 0;
        for (int j = 0; j < n && !listed; j++)
            listed = strcmp(ids[j], s->patient_id) == 0;
        if (listed)
            s->split = TRAIN_SPLIT_TEST;
        else if (s->split == TRAIN_SPLIT_TEST)
            s->split = TRAIN_SPLIT_TRAIN;
        held += listed;
    }
    return held;
}

int train_dataset_patients(const struct train_dataset *d, int split, const char ***ids)
{
    const char **v = malloc(((size_t)d->nseries + 1) * sizeof *v);
    if (!v) return -1;
    int n = 0;
    for (int i = 0; i < d->nseries; i++) {
        if (d->series[i].split != split) continue;
        int seen = 0;
        for (int j = 0; j < n && !seen; j++)
            seen = strcmp(v[j], d->series[i].patient_id) == 0;
        if (!seen) v[n++] = d->series[i].patient_id;
    }
    *ids = v;
    return n;
}

void train_dataset_count(const struct train_dataset *d, int split, int *nseries, size_t *nslices,
                         size_t *pos_slices, int *pos_series)
{
    int ns = 0, ps = 0;
    size_t nsl = 0, psl = 0;
    for (int i = 0; i < d->nseries; i++) {
        const struct train_series *s = &d->series[i];
        if (split >= 0 && s->split != split) continue;
        ns++;
        nsl += (size_t)s->n;
        ps += s->study[0] ? 1 : 0;
        for (int k = 0; k < s->n; k++)
            if (d->labels[(s->first + (size_t)k) * TRAIN_LABELS] == 1) psl++;
    }
    if (nseries) *nseries = ns;
    if (nslices) *nslices = nsl;
    if (pos_slices) *pos_slices = psl;
    if (pos_series) *pos_series = ps;
}

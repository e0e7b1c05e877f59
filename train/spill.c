/* train/spill.c: reviewed series on disk rather than in memory: the
 * spill (this run's slices, to an unnamed file that is then mapped) and the
 * series kept between runs (<cache>/reviewed-series/<preprocessing>/<key>.slices),
 * so that a weekly run decodes only what is new. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "dataset.h"
#include "dataset_parts.h"
#include "log.h"

/* The pixels of series being added, going to an unnamed file (spill_begin). */
struct train_spill {
    FILE *f;
    size_t first; /* the first slice in the file */
    int64_t keep_free;
    char dir[PATH_MAX];
};

int train_dataset_spill_begin(struct train_dataset *d, const char *dir, int64_t keep_free)
{
    struct train_spill *sp = calloc(1, sizeof *sp);
    int fd = sp ? open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600) : -1;
    if (fd < 0 || !(sp->f = ds_pixels_file(fd, 0))) {
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
    if (n > 0 &&
        ds_map_pixels(d, fileno(sp->f), DS_FILE_HEAD + n * ds_slice_bytes(d), sp->first) != 0) {
        snprintf(err, errlen, "cannot map the slices written to a file in %s: %s", sp->dir,
                 strerror(errno));
        rc = -1;
    }
    fclose(sp->f);
    free(sp);
    return rc;
}

/* Whether writing bytes more to dir's file system would leave less than
 * keep_free free there (false when it cannot be told). */
static bool disk_low(const char *dir, int64_t keep_free, size_t bytes)
{
    struct statvfs v;
    return statvfs(dir, &v) == 0 &&
           (int64_t)v.f_bavail * (int64_t)v.f_frsize < keep_free + (int64_t)bytes;
}

/* Writes the n slices at px to the spill file, whole or not at all (the
 * file is flushed). Returns 0, or -1 when they do not fit or cannot be
 * written (logged): then the spill ends and they belong in memory. */
int ds_spill_put(struct train_dataset *d, const uint8_t *px, size_t n)
{
    struct train_spill *sp = d->spill;
    size_t bytes = n * ds_slice_bytes(d);
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

/* How d's slices are made (their shape, the windows, the crop, the masks),
 * as a string for cache keys. */
void ds_prep_string(const struct train_dataset *d, char *key, size_t n)
{
    int k = snprintf(key, n, "|%dx%dx%d", d->c, d->h, d->w);
    for (int i = 0; i < d->windows.n && k < (int)n - 40; i++)
        k += snprintf(key + k, n - k, "|%g/%g", d->windows.center[i], d->windows.width[i]);
    if (d->crop_head) k += snprintf(key + k, n - k, "|crop=head");
    if (d->masks && k < (int)n) snprintf(key + k, n - k, "|masks=%d", TRAIN_MASK_SCALE);
}

/* ds_prep_string hashed: the kept series' folder and the start of their keys. */
static uint64_t prep_hash(const struct train_dataset *d)
{
    char prep[256];
    ds_prep_string(d, prep, sizeof prep);
    return ds_fnv(prep, strlen(prep), DS_FNV_BASIS);
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
uint64_t ds_series_key(const struct train_dataset *d, const char *const *paths, int npaths)
{
    uint64_t h = prep_hash(d);
    for (int i = 0; i < npaths; i++) {
        struct stat st;
        h = ds_fnv(paths[i], strlen(paths[i]) + 1, h);
        if (stat(paths[i], &st) == 0) {
            long long v[3] = {(long long)st.st_size, (long long)st.st_mtim.tv_sec,
                              (long long)st.st_mtim.tv_nsec};
            h = ds_fnv((const char *)v, sizeof v, h);
        }
    }
    return h;
}

/* The n slices of the series key from the cache into px, the file marked as
 * used. Returns true, or false when it has no good copy. */
bool ds_kept_read(struct train_dataset *d, uint64_t key, int n, uint8_t *px)
{
    char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/%016llx.slices", d->scache->dir, (unsigned long long)key);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    struct series_head h;
    struct stat st;
    size_t bytes = (size_t)n * ds_slice_bytes(d);
    bool ok = ds_pread_full(fd, &h, sizeof h, 0) == 0 &&
              memcmp(h.magic, SERIES_MAGIC, sizeof SERIES_MAGIC) == 0 && h.key == key &&
              h.c == d->c && h.h == d->h && h.w == d->w && h.n == n && fstat(fd, &st) == 0 &&
              (size_t)st.st_size == sizeof h + bytes && ds_pread_full(fd, px, bytes, sizeof h) == 0;
    /* used now: the sweep at the end keeps it (read-only: utimensat) */
    if (ok) utimensat(AT_FDCWD, path, NULL, 0);
    close(fd);
    if (ok) d->scache->used++;
    return ok;
}

/* Keeps the n slices at px as series key: written whole under another
 * name, synced, then renamed. While less than keep_free would be left, or
 * after a write fails, nothing more is written (logged once). */
void ds_kept_write(struct train_dataset *d, uint64_t key, int n, const uint8_t *px)
{
    struct train_series_cache *c = d->scache;
    if (c->stopped) return;
    struct series_head h = {.key = key, .c = d->c, .h = d->h, .w = d->w, .n = n};
    memcpy(h.magic, SERIES_MAGIC, sizeof SERIES_MAGIC);
    size_t bytes = (size_t)n * ds_slice_bytes(d);
    char path[PATH_MAX + 64], tmp[PATH_MAX + 80];
    snprintf(path, sizeof path, "%s/%016llx.slices", c->dir, (unsigned long long)key);
    snprintf(tmp, sizeof tmp, "%s.XXXXXX", path);
    const char *why = NULL;
    if (disk_low(c->dir, c->keep_free, sizeof h + bytes)) {
        why = "disk_low";
    } else {
        int fd = mkostemp(tmp, O_CLOEXEC);
        if (ds_write_synced(fd, &h, sizeof h, px, bytes) == 0 && rename(tmp, path) == 0) {
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

/* For train_dataset_free: the spill file closed (its slices are lost unless
 * train_dataset_spill_end mapped them) and the kept series' state freed. */
void ds_disk_free(struct train_dataset *d)
{
    if (d->spill) {
        fclose(d->spill->f);
        free(d->spill);
    }
    free(d->scache);
    d->spill = NULL, d->scache = NULL;
}

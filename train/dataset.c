/* train/dataset.c: the training data in memory: series of preprocessed
 * slices (runs of pixels, in memory or mapped from a file), their labels,
 * series added one at a time (reviewed studies), and the split by patient.
 * Folders in the RSNA layout are read by folder.c, reviewed series on disk
 * are spill.c's. */
#include "dataset.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <png.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "dataset_parts.h"
#include "io.h"
#include "nn.h"
#include "pipeline.h"
#include "volume.h"

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

size_t ds_pixel_bytes(const struct train_dataset *d)
{
    return (size_t)d->c * d->h * d->w;
}

size_t train_dataset_mask_size(const struct train_dataset *d)
{
    return d->masks ? (size_t)(d->h / TRAIN_MASK_SCALE) * (size_t)(d->w / TRAIN_MASK_SCALE) : 0;
}

size_t ds_slice_bytes(const struct train_dataset *d)
{
    return ds_pixel_bytes(d) + train_dataset_mask_size(d);
}

/* The first byte of a mask that is not known (no bit of a real mask). */
#define MASK_UNKNOWN 0x80

const uint8_t *train_dataset_mask(const struct train_dataset *d, size_t i)
{
    if (!d->masks) return NULL;
    const uint8_t *m = train_dataset_pixels(d, i) + ds_pixel_bytes(d);
    return m[0] & MASK_UNKNOWN ? NULL : m;
}

const uint8_t *train_dataset_pixels(const struct train_dataset *d, size_t i)
{
    /* the last run that starts at or before i */
    const struct train_pixel_run *r = &d->runs[last_at_or_before(
        d->runs, d->nruns, sizeof *d->runs, offsetof(struct train_pixel_run, first), i)];
    return r->p + (i - r->first) * ds_slice_bytes(d);
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
void ds_runs_truncate(struct train_dataset *d, size_t nslices)
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
    size_t per = ds_slice_bytes(d);
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

/* fd, cut after its first `keep` bytes of pixels, as a stream that writes
 * the pixels from there on (the head is written last); opened for reading
 * too, to be mapped. NULL on failure (fd stays open). */
FILE *ds_pixels_file(int fd, size_t keep)
{
    off_t at = (off_t)(DS_FILE_HEAD + keep);
    if (ftruncate(fd, at) != 0 || lseek(fd, at, SEEK_SET) < 0) return NULL;
    return fdopen(fd, "w+b");
}

/* Maps fd (total bytes) read-only as the pixels of slices first ..
 * d->nslices - 1. Returns 0 or -1. */
int ds_map_pixels(struct train_dataset *d, int fd, size_t total, size_t first)
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
    r->p = (uint8_t *)map + DS_FILE_HEAD;
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
    size_t per = ds_pixel_bytes(d), j[2 * TRIAGE_MAX_CONTEXT + 1];
    int n = input_slices(d, i, j);
    for (int s = 0; s < n; s++)
        memcpy(out + (size_t)s * per, train_dataset_pixels(d, j[s]), per);
}

void train_dataset_input_float(const struct train_dataset *d, size_t i, float *out)
{
    size_t per = ds_pixel_bytes(d), j[2 * TRIAGE_MAX_CONTEXT + 1];
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
    ds_disk_free(d);
    for (int i = 0; i < d->nruns; i++)
        run_free(&d->runs[i]);
    free(d->runs);
    free(d->series);
    free(d->labels);
    memset(d, 0, sizeof *d);
}

/* FNV-1a of n bytes at s, from h (DS_FNV_BASIS to start). */
uint64_t ds_fnv(const char *s, size_t n, uint64_t h)
{
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 1099511628211ULL;
    return h;
}

/* ---- growing the dataset -------------------------------------------------- */

int ds_grow(struct train_dataset *d, size_t add_slices, int add_series)
{
    uint8_t *lb = realloc(d->labels, (d->nslices + add_slices) * TRAIN_LABELS);
    if (!lb) return -1;
    d->labels = lb;
    struct train_series *s = realloc(d->series, (size_t)(d->nseries + add_series) * sizeof *s);
    if (!s) return -1;
    d->series = s;
    return 0;
}

/* libpng's errors into the message (not onto stderr), then back to the setjmp. */
static void png_error_said(png_structp png, png_const_charp msg)
{
    snprintf(png_get_error_ptr(png), 128, "%s", msg);
    png_longjmp(png, 1);
}

static void png_warning_dropped(png_structp png, png_const_charp msg)
{
    (void)png, (void)msg;
}

int train_mask_read(const char *path, int rows, int cols, uint8_t *out, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    char why[128] = "out of memory";
    png_structp png =
        png_create_read_struct(PNG_LIBPNG_VER_STRING, why, png_error_said, png_warning_dropped);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    int rc = -1;
    if (!png || !info || setjmp(png_jmpbuf(png))) {
        snprintf(err, errlen, "%s: not a PNG that can be read (%s)", path, why);
        goto out;
    }
    png_init_io(png, f);
    png_read_info(png, info);
    if (png_get_color_type(png, info) != PNG_COLOR_TYPE_GRAY || png_get_bit_depth(png, info) != 8 ||
        png_get_interlace_type(png, info) != 0 ||
        png_get_image_width(png, info) != (png_uint_32)cols ||
        png_get_image_height(png, info) != (png_uint_32)rows) {
        snprintf(err, errlen, "%s: a mask must be an 8-bit grey PNG of the slice's %dx%d pixels",
                 path, cols, rows);
        goto out;
    }
    for (int y = 0; y < rows; y++)
        png_read_row(png, out + (size_t)y * cols, NULL);
    rc = 0;
out:
    png_destroy_read_struct(&png, &info, NULL);
    fclose(f);
    return rc;
}

/* Slice i's mask record (mh x mw) from mask_dir/ID_<sop>.png: each source
 * pixel's bits go to the cell its centre falls in, after the crop (region)
 * and the resize to h x w. No file: no blood. Returns 0 or -1. */
static int mask_make(const struct train_dataset *d, const struct triage_volume *v, int i,
                     const char *mask_dir, const struct triage_region *region, uint8_t *src,
                     uint8_t *out, char *err, size_t errlen)
{
    size_t mb = train_dataset_mask_size(d);
    memset(out, 0, mb);
    if (!mask_dir || v->slices[i].frame > 0) {
        out[0] = MASK_UNKNOWN;
        return 0;
    }
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/ID_%s.png", mask_dir, v->slices[i].sop_uid);
    if (access(path, F_OK) != 0) return 0;
    if (train_mask_read(path, v->rows, v->columns, src, err, errlen) != 0) return -1;
    int mh = d->h / TRAIN_MASK_SCALE, mw = d->w / TRAIN_MASK_SCALE;
    for (int y = 0; y < v->rows; y++)
        for (int x = 0; x < v->columns; x++) {
            uint8_t b = src[(size_t)y * v->columns + x] & 0x1f;
            if (!b) continue;
            double ix = ((double)x + 0.5 - region->x) * d->w / region->w;
            double iy = ((double)y + 0.5 - region->y) * d->h / region->h;
            if (ix < 0 || iy < 0 || ix >= d->w || iy >= d->h) continue;
            int cx = (int)(ix / TRAIN_MASK_SCALE), cy = (int)(iy / TRAIN_MASK_SCALE);
            out[(size_t)(cy < mh ? cy : mh - 1) * mw + (cx < mw ? cx : mw - 1)] |= b;
        }
    return 0;
}

/* Decodes and preprocesses the slices of v into dst (v->n slice records),
 * through the node's own path (triage_preprocess_volume); with d->masks,
 * each slice's mask from mask_dir (NULL: not known). Returns 0; 1 when the
 * series' own pixels cannot be decoded (pixel data that does not match its
 * header: the series is to be skipped); -1 when memory runs out or a mask
 * cannot be read. err says why. */
int ds_decode(const struct train_dataset *d, const struct triage_volume *v,
              const char *const *paths, const char *mask_dir, uint8_t *dst, char *err,
              size_t errlen)
{
    size_t per = ds_pixel_bytes(d), rec = ds_slice_bytes(d);
    float *x = malloc(per * (size_t)v->n * sizeof(float));
    uint8_t *src = d->masks && mask_dir ? malloc((size_t)v->rows * v->columns) : NULL;
    if (!x || (d->masks && mask_dir && !src)) {
        free(x);
        snprintf(err, errlen, "out of memory for a series of %d slices", v->n);
        return -1;
    }
    struct triage_region used;
    errno = 0;
    int rc = triage_preprocess_volume(v, paths, NULL, &d->windows, d->crop_head, d->h, d->w, x,
                                      &used, err, errlen);
    if (rc != 0) rc = errno == ENOMEM ? -1 : 1;
    for (int i = 0; rc == 0 && i < v->n; i++) {
        uint8_t *o = dst + rec * (size_t)i;
        for (size_t k = 0; k < per; k++)
            o[k] = (uint8_t)lrintf(x[per * (size_t)i + k] * 255.0f);
        if (d->masks) rc = mask_make(d, v, i, mask_dir, &used, src, o + per, err, errlen);
    }
    free(src);
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

/* Writes a (an bytes), then b (bn bytes), to fd, syncs its data and closes
 * it (fd < 0: nothing, a failure). Returns 0, or -1 with errno set. */
int ds_write_synced(int fd, const void *a, size_t an, const void *b, size_t bn)
{
    if (fd < 0) return -1;
    const void *part[2] = {a, b};
    size_t len[2] = {an, bn};
    bool ok = true;
    for (int i = 0; i < 2 && ok; i++)
        ok = util_write_all(fd, part[i], len[i]) == 0;
    ok = ok && fdatasync(fd) == 0;
    int e = errno;
    if (close(fd) != 0 && ok) return -1;
    errno = e;
    return ok ? 0 : -1;
}

/* n bytes at off of fd into buf. Returns 0, or -1 (an error or a short file). */
int ds_pread_full(int fd, void *buf, size_t n, size_t off)
{
    for (size_t k = 0; k < n;) {
        ssize_t r = pread(fd, (char *)buf + k, n - k, (off_t)(off + k));
        if (r <= 0) return -1;
        k += (size_t)r;
    }
    return 0;
}

int train_dataset_add_series(struct train_dataset *d, const char *const *paths, int npaths,
                             const uint8_t study[TRAIN_LABELS], const char *marked, int *nmarked,
                             char *err, size_t errlen)
{
    struct triage_volume v;
    if (triage_volume_build(paths, npaths, &v, err, errlen) != 0) return -1;
    size_t n = (size_t)v.n;
    uint8_t *buf = d->spill ? malloc(n * ds_slice_bytes(d)) : NULL, *px = NULL;
    int rc = -1;
    bool kept = false;
    uint64_t key = d->scache ? ds_series_key(d, paths, npaths) : 0;
    if (ds_grow(d, n, 1) != 0 || !(px = d->spill ? buf : train_dataset_reserve(d, n))) {
        snprintf(err, errlen, "out of memory");
    } else if ((kept = d->scache && ds_kept_read(d, key, v.n, px)) ||
               ds_decode(d, &v, paths, NULL, px, err, errlen) == 0) {
        rc = 0;
        if (d->scache && !kept) ds_kept_write(d, key, v.n, px);
        if (d->spill && ds_spill_put(d, px, n) != 0) {
            /* what is in the file is mapped; this series and the rest: memory */
            uint8_t *m = NULL;
            if (train_dataset_spill_end(d, err, errlen) != 0) {
                rc = -1;
            } else if (!(m = train_dataset_reserve(d, n))) {
                snprintf(err, errlen, "out of memory");
                rc = -1;
            } else {
                memcpy(m, px, n * ds_slice_bytes(d));
            }
        }
    }
    free(buf);
    if (rc != 0) {
        ds_runs_truncate(d, d->nslices);
        triage_volume_free(&v);
        return -1;
    }
    struct train_series *s = &d->series[d->nseries];
    memset(s, 0, sizeof *s);
    snprintf(s->study_uid, sizeof s->study_uid, "%s", v.study_uid);
    snprintf(s->series_uid, sizeof s->series_uid, "%s", v.series_uid);
    struct scp_info info;
    char e[256];
    /* an empty PatientID (type 2, often empty once anonymised): the study
     * is its own patient, as in folders, not one patient of all such */
    bool pid = scp_info_read(paths[0], &info, e, sizeof e) == 0 && info.patient_id[0];
    snprintf(s->patient_id, sizeof s->patient_id, "%s", pid ? info.patient_id : v.study_uid);
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
        p[j].key = ds_fnv(p[j].id, strlen(p[j].id), nn_rng_next(&s));
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
struct uid_at {
    const char *uid;
    int i;
};

static int by_uid_then_index(const void *a, const void *b)
{
    const struct uid_at *x = a, *y = b;
    int c = strcmp(x->uid, y->uid);
    return c ? c : (x->i > y->i) - (x->i < y->i);
}

int train_dataset_studies(const struct train_dataset *d, int split, int *study_of)
{
    struct uid_at *v = malloc(((size_t)d->nseries + 1) * sizeof *v);
    if (!v) return -1;
    int n = 0;
    for (int i = 0; i < d->nseries; i++) {
        study_of[i] = -1;
        if (split < 0 || d->series[i].split == split)
            v[n++] = (struct uid_at){d->series[i].study_uid, i};
    }
    /* Sorted by UID, each series of a study points at the study's first
     * series (by index); the studies are then numbered in dataset order:
     * a first series takes the next number, the others their first's,
     * already numbered. */
    qsort(v, (size_t)n, sizeof *v, by_uid_then_index);
    for (int a = 0, b; a < n; a = b)
        for (b = a; b < n && strcmp(v[b].uid, v[a].uid) == 0; b++)
            study_of[v[b].i] = v[a].i;
    free(v);
    int ns = 0;
    for (int i = 0; i < d->nseries; i++)
        if (study_of[i] >= 0) study_of[i] = study_of[i] == i ? ns++ : study_of[study_of[i]];
    return ns;
}

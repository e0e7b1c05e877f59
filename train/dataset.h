/* Training data: series of preprocessed slices with their labels, loaded
 * from folders in the RSNA 2019 layout (a labels CSV "ID,Label" with rows
 * ID_<sop>_<label>,0|1, and DICOM files anywhere below) -- phantom folders
 * use the same layout -- and from the node's reviewed studies (study-level
 * labels). Slices are grouped by (StudyInstanceUID, SeriesInstanceUID),
 * ordered along the normal by triage_volume_build and preprocessed by
 * triage_preprocess_volume, the node's own preprocessing. Each DICOM file is
 * decoded once: the preprocessed slices are kept as uint8 in a cache file,
 * which is then mapped read-only rather than read, so that the data can be
 * larger than memory (the RSNA 2019 set is 37 GB at 3 x 128 x 128); the
 * kernel's page cache keeps what fits. */
#ifndef TRAIN_DATASET_H
#define TRAIN_DATASET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "preprocess.h"
#include "scp_info.h"

#define TRAIN_LABELS 6
/* "any", then the five subtypes in the RSNA 2019 order. */
extern const char *const train_label_names[TRAIN_LABELS];
#define TRAIN_LABEL_UNKNOWN 255 /* slice label of a study-level (review) series */

enum train_split { TRAIN_SPLIT_TRAIN = 0, TRAIN_SPLIT_VAL = 1, TRAIN_SPLIT_TEST = 2 };

struct train_series {
    char study_uid[SCP_UID_MAX], series_uid[SCP_UID_MAX];
    char patient_id[65];
    int n;                       /* slices */
    size_t first;                /* index of its first slice in the dataset */
    uint8_t study[TRAIN_LABELS]; /* study-level labels (max over slices, or the review) */
    int slice_labels;            /* 1: per-slice labels known, 0: study-level only */
    int split;                   /* enum train_split */
};

/* The pixels of consecutive slices: part of a mapped cache file, or memory
 * (no cache could be written, reviewed studies, tests). */
struct train_pixel_run {
    size_t first, n; /* slices first .. first + n - 1 */
    uint8_t *p;      /* their pixels, n x c x h x w */
    void *map;       /* the mapped cache file (maplen bytes), or NULL: p is malloc'd */
    size_t maplen;
    size_t cap; /* memory runs: slices p has room for */
};

struct train_spill;
struct train_series_cache;

struct train_dataset {
    int c, h, w;                   /* slice shape, 3 x 128 x 128 */
    struct triage_windows windows; /* the windows the pixels were made with */
    bool crop_head;                /* and the head crop ("crop=head"), set after init */
    int context;                   /* each input holds the slices this far either side
                                      (the model's "context"), set after init */
    bool masks;                    /* each slice carries its blood mask (below), set after
                                      init, before any data is added */
    struct train_series *series;   /* owned */
    int nseries;
    size_t nslices;
    struct train_pixel_run *runs; /* owned, in slice order; value/255 is the window output */
    int nruns;
    struct train_spill *spill;         /* between train_dataset_spill_begin and _end */
    struct train_series_cache *scache; /* between train_dataset_series_cache_begin and _end */
    uint8_t *labels;         /* owned: nslices * TRAIN_LABELS, 0, 1 or TRAIN_LABEL_UNKNOWN */
    int skipped_files;       /* files without labels or not usable as slices */
    int cache_sync_ms;       /* how often a cache being written records what is on disk, so
                                that a killed decode resumes (init: 1000) */
    double progress_every_s; /* a decode's progress in the log this often when stderr is
                                not a terminal (init: 60) */
};

/* The c x h x w pixels of slice i (i < nslices). */
const uint8_t *train_dataset_pixels(const struct train_dataset *d, size_t i);
/* Blood masks, for a localisation loss in training (train --loc-loss).
 * With d->masks, every slice carries after its pixels a mask of
 * (h / TRAIN_MASK_SCALE) x (w / TRAIN_MASK_SCALE) bytes in the frame of the
 * model's input (after the crop and the resize): bit k set where any pixel
 * of subtype k's blood falls in that cell (k in label order without "any":
 * epidural 0 .. subdural 4). They come from a folder's masks/ID_<sop>.png
 * (`ichtriage phantom --masks`, docs/phantom.md): a slice without a file
 * there shows no blood. train_dataset_mask gives slice i's mask, or NULL
 * when it is not known (no masks, a folder without masks/, a reviewed
 * series, a frame of a multi-frame file). */
#define TRAIN_MASK_SCALE 4
const uint8_t *train_dataset_mask(const struct train_dataset *d, size_t i);
size_t train_dataset_mask_size(const struct train_dataset *d); /* bytes, 0 without masks */
/* One mask file (masks/ID_<sop>.png: an 8-bit grey PNG of the slice's rows x
 * cols, bit k for subtype k) into out. Returns 0, or -1 with a message. */
int train_mask_read(const char *path, int rows, int cols, uint8_t *out, char *err, size_t errlen);
/* Room in memory for the pixels of slices nslices .. nslices + n - 1, which
 * the caller fills and then counts in nslices. Returns it, NULL when out of
 * memory. */
uint8_t *train_dataset_reserve(struct train_dataset *d, size_t n);

/* Initialises an empty dataset of slices c x h x w made with windows w. */
void train_dataset_init(struct train_dataset *d, const struct triage_windows *w, int c, int h,
                        int wd);
/* Appends every labelled series found in dir (RSNA layout). cache_dir: where
 * the cache file goes (NULL: dir/.ichtriage-cache, or no cache when that
 * cannot be written). Returns 0, or -1 with a message that names the folder
 * and the problem (no labels CSV, no DICOM files, nothing labelled...). */
int train_dataset_add_folder(struct train_dataset *d, const char *dir, const char *cache_dir,
                             char *err, size_t errlen);
/* Appends one series from files with study-level labels study[], as used
 * for the node's reviewed studies. marked: the slices a reviewer marked as
 * showing the bleed ("sop/frame" entries, comma-separated; NULL for none):
 * those get "any" = 1, and the study's subtype when it has exactly one; every
 * other slice label stays unknown. *nmarked (may be NULL) gets how many of
 * the series' slices were marked. Returns 0 or -1. */
int train_dataset_add_series(struct train_dataset *d, const char *const *paths, int npaths,
                             const uint8_t study[TRAIN_LABELS], const char *marked, int *nmarked,
                             char *err, size_t errlen);
/* From train_dataset_spill_begin to _end, the pixels of the series that
 * train_dataset_add_series adds go to an unnamed temporary file in dir
 * (deleted when the dataset is freed) and are then mapped: they need disk,
 * not memory. While less than keep_free bytes would be left on dir's file
 * system, or when a write fails, they go to memory instead (logged).
 * begin returns 0, or -1 (logged) when no such file can be made: memory.
 * end maps them; returns 0 or -1 with a message. No pixels of the series
 * added in between can be read before end. */
int train_dataset_spill_begin(struct train_dataset *d, const char *dir, int64_t keep_free);
int train_dataset_spill_end(struct train_dataset *d, char *err, size_t errlen);
/* From train_dataset_series_cache_begin to _end, train_dataset_add_series
 * keeps each series' slices in dir (<preprocessing>/<key>.slices, 0600,
 * keyed by its files' names, sizes and modification times, one folder per
 * way of making slices) and takes them from there instead of decoding while
 * its files stay the same. Files are written only while keep_free bytes
 * would stay free (logged when not). begin returns 0, or -1 (logged) when
 * dir cannot be used: no cache. end with sweep deletes the files of this
 * preprocessing's series not added in between, and those of the others not
 * used for 30 days; it returns how many series came from dir. */
int train_dataset_series_cache_begin(struct train_dataset *d, const char *dir, int64_t keep_free);
int train_dataset_series_cache_end(struct train_dataset *d, bool sweep);
/* Appends the node's reviewed studies (train/reviews.c): every series in
 * <store_dir>/spool of each study whose latest review is in
 * <store_dir>/ichtriage.db, with the review as study-level labels. Their
 * pixels spill to a file in spill_dir (NULL: memory) as above, and each
 * series' slices are kept in spill_dir/reviewed-series between runs (the
 * series cache above, swept at the end), leaving keep_free bytes free there.
 * *added gets the number of series. Returns 0 or -1 with a message. */
int train_dataset_add_reviews(struct train_dataset *d, const char *store_dir, const char *spill_dir,
                              int64_t keep_free, int *added, char *err, size_t errlen);
/* train_dataset_add_reviews for the store of cfg; the spill (--cache DIR,
 * NULL: memory) leaves the node's store.min_free_mb plus 2 GiB free. */
struct triage_config;
int train_reviews_add(struct train_dataset *d, const struct triage_config *cfg,
                      const char *spill_dir, int *added, char *err, size_t errlen);
/* The studies of split (-1: all): series whose StudyInstanceUIDs are the
 * same (a study's brain and bone kernels, its reformats) are one study, as
 * they are one row of the node's worklist. study_of[s] (room for
 * d->nseries) gets the number of series s's study, the studies numbered in
 * the order they first appear, or -1 for a series of another split.
 * Returns the number of studies, -1 when out of memory. */
int train_dataset_studies(const struct train_dataset *d, int split, int *study_of);
void train_dataset_free(struct train_dataset *d);
/* The model's input for slice i: (2 context + 1) x c x h x w, the windows of
 * slices i-context..i+context of its series (docs/model-format.md,
 * "context"), as stored (value/255 is the window output) or as floats. */
size_t train_dataset_input_size(const struct train_dataset *d);
void train_dataset_input(const struct train_dataset *d, size_t i, uint8_t *out);
void train_dataset_input_float(const struct train_dataset *d, size_t i, float *out);

/* Splits by patient: every series of a patient gets the same split;
 * patients with and without a positive study are shuffled separately
 * (stratified) with seed, val_frac and test_frac of each go to validation
 * and test. Deterministic for a given dataset and seed. */
void train_dataset_split(struct train_dataset *d, uint64_t seed, double val_frac, double test_frac);
/* The frozen test split: the patients in ids (n) go to test, every other
 * patient that the split put in test goes to training instead. Returns the
 * number of series now in test. */
int train_dataset_hold_out(struct train_dataset *d, char *const *ids, int n);
/* The distinct patient IDs of one split (borrowed from d; free the array
 * only). Returns the count, -1 when out of memory. */
int train_dataset_patients(const struct train_dataset *d, int split, const char ***ids);
/* Series and slices counts of one split (-1: all). */
void train_dataset_count(const struct train_dataset *d, int split, int *nseries, size_t *nslices,
                         size_t *pos_slices, int *pos_series);

#endif

/* train/dataset_parts.h: what the three parts of the training data share,
 * and nothing outside them uses: dataset.c (the slices in memory or mapped,
 * series, labels, splits), folder.c (RSNA-layout folders and their cache)
 * and spill.c (reviewed series on disk). */
#ifndef TRAIN_DATASET_PARTS_H
#define TRAIN_DATASET_PARTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "dataset.h"
#include "volume.h"

/* A file of slices (a cache, a spill) starts with a head padded to
 * DS_FILE_HEAD (a page, so that the pixels are aligned), then the slices'
 * records (pixels, then the mask with d->masks), slice after slice; a cache
 * then has the series and their labels. */
#define DS_FILE_HEAD 4096
#define DS_FNV_BASIS 14695981039346656037ULL

/* dataset.c */
size_t ds_slice_bytes(const struct train_dataset *d); /* a slice's record: pixels, then mask */
size_t ds_pixel_bytes(const struct train_dataset *d); /* c x h x w */
uint64_t ds_fnv(const char *s, size_t n, uint64_t h);
int ds_grow(struct train_dataset *d, size_t add_slices, int add_series);
void ds_runs_truncate(struct train_dataset *d, size_t nslices);
FILE *ds_pixels_file(int fd, size_t keep);
int ds_map_pixels(struct train_dataset *d, int fd, size_t total, size_t first);
int ds_decode(const struct train_dataset *d, const struct triage_volume *v,
              const char *const *paths, const char *mask_dir, uint8_t *dst, char *err,
              size_t errlen);
int ds_pread_full(int fd, void *buf, size_t n, size_t off);
int ds_write_synced(int fd, const void *a, size_t an, const void *b, size_t bn);

/* spill.c */
void ds_prep_string(const struct train_dataset *d, char *key, size_t n);
int ds_spill_put(struct train_dataset *d, const uint8_t *px, size_t n);
uint64_t ds_series_key(const struct train_dataset *d, const char *const *paths, int npaths);
bool ds_kept_read(struct train_dataset *d, uint64_t key, int n, uint8_t *px);
void ds_kept_write(struct train_dataset *d, uint64_t key, int n, const uint8_t *px);
void ds_disk_free(struct train_dataset *d);

#endif

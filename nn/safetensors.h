/* nn/safetensors.h: read (into memory) and write safetensors files.
 *
 * Format: 8-byte little-endian header length, a JSON header mapping tensor
 * names to {"dtype", "shape", "data_offsets": [begin, end]} plus an optional
 * "__metadata__" object of string to string, then the raw little-endian data.
 * Every length and offset from the file is checked before use, and the
 * tensors must cover the data exactly (no overlap, no hole); a file that
 * does not follow the format is refused with a message naming the problem. */
#ifndef NN_SAFETENSORS_H
#define NN_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#define NN_ST_MAX_DIMS 8
/* Header cap: a model header is a few kB; anything near this is hostile. */
#define NN_ST_MAX_HEADER (64u << 20)
/* Tensor cap: a model holds a few hundred, an optimizer file twice that;
 * the cap bounds the work of the name checks on a hostile header. */
#define NN_ST_MAX_TENSORS 4096

typedef enum nn_st_dtype {
    NN_ST_F32 = 0,
    NN_ST_F16,
    NN_ST_BF16,
    NN_ST_F64,
    NN_ST_I64,
    NN_ST_I32,
    NN_ST_U8,
    NN_ST_BOOL,
} nn_st_dtype;

typedef struct nn_st_tensor {
    const char *name;
    nn_st_dtype dtype;
    int ndim;
    int64_t shape[NN_ST_MAX_DIMS];
    const void *data; /* inside the mapping: may be unaligned, use memcpy */
    size_t nbytes;
} nn_st_tensor;

typedef struct nn_st_file nn_st_file;

/* Maps and validates path. Returns a file the caller frees with
 * nn_st_close(), or NULL with a message in err. */
nn_st_file *nn_st_open(const char *path, char *err, size_t errlen);
void nn_st_close(nn_st_file *f);
int nn_st_count(const nn_st_file *f);
/* Borrowed pointers, valid until nn_st_close(). */
const nn_st_tensor *nn_st_at(const nn_st_file *f, int i);
const nn_st_tensor *nn_st_find(const nn_st_file *f, const char *name);
/* Metadata value for key or NULL; borrowed. */
const char *nn_st_meta(const nn_st_file *f, const char *key);
int nn_st_meta_count(const nn_st_file *f);
/* i-th metadata pair; borrowed. */
void nn_st_meta_at(const nn_st_file *f, int i, const char **key, const char **value);

/* Copies tensor name (dtype F32, exactly n elements) into dst.
 * Returns 0, or -1 with err naming the mismatch. */
int nn_st_read_f32(const nn_st_file *f, const char *name, float *dst, size_t n, char *err,
                   size_t errlen);

/* One tensor to write; data is nbytes of little-endian values. */
typedef struct nn_st_entry {
    const char *name;
    nn_st_dtype dtype;
    int ndim;
    int64_t shape[NN_ST_MAX_DIMS];
    const void *data;
} nn_st_entry;

/* Writes the tensors and the metadata pairs (meta_keys[i] = meta_values[i])
 * to path through a temporary file (<path>.<pid>.tmp: a name ending in
 * ".tmp", which `ichtriage backup` leaves out of models/) and rename, so a
 * reader never sees half a file. Returns 0 or -1 with err. */
int nn_st_write(const char *path, const nn_st_entry *t, int n, const char *const *meta_keys,
                const char *const *meta_values, int nmeta, char *err, size_t errlen);

size_t nn_st_dtype_size(nn_st_dtype t);

#endif

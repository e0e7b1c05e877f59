/* nn/safetensors.c: the safetensors reader (read + cJSON) and writer. */
#include "safetensors.h"
#include "err.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct nn_st_file {
    void *map; /* the whole file, read into memory */
    size_t map_size;
    cJSON *root;
    nn_st_tensor *tensors;
    int ntensors;
    const cJSON *meta; /* the __metadata__ object or NULL */
};

static const char *const dtype_names[] = {"F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL"};
static const size_t dtype_sizes[] = {4, 2, 2, 8, 8, 4, 1, 1};
#define NDTYPES ((int)(sizeof(dtype_sizes) / sizeof(dtype_sizes[0])))

size_t nn_st_dtype_size(nn_st_dtype t)
{
    return (int)t >= 0 && (int)t < NDTYPES ? dtype_sizes[t] : 0;
}

/* A JSON number that is a whole value in [0, 2^53]. */
static int json_uint(const cJSON *j, uint64_t *out)
{
    if (!cJSON_IsNumber(j)) return -1;
    double v = j->valuedouble;
    if (!(v >= 0.0) || v > 9007199254740992.0 || floor(v) != v) return -1;
    *out = (uint64_t)v;
    return 0;
}

void nn_st_close(nn_st_file *f)
{
    if (!f) return;
    free(f->map);
    cJSON_Delete(f->root);
    free(f->tensors);
    free(f);
}

static int parse_tensor(nn_st_tensor *t, const cJSON *j, const uint8_t *data, size_t data_size,
                        char *err, size_t errlen)
{
    const char *name = j->string;
    if (!cJSON_IsObject(j)) {
        nn_errf(err, errlen, "tensor %s: entry is not an object", name);
        return -1;
    }
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(j, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(j, "shape");
    const cJSON *of = cJSON_GetObjectItemCaseSensitive(j, "data_offsets");
    if (!cJSON_IsString(dt) || !cJSON_IsArray(sh) || !cJSON_IsArray(of)) {
        nn_errf(err, errlen, "tensor %s: needs string dtype, array shape and data_offsets", name);
        return -1;
    }
    t->name = name;
    t->dtype = (nn_st_dtype)-1;
    for (int i = 0; i < NDTYPES; i++)
        if (strcmp(dt->valuestring, dtype_names[i]) == 0) t->dtype = (nn_st_dtype)i;
    if ((int)t->dtype < 0) {
        nn_errf(err, errlen, "tensor %s: unsupported dtype %.16s", name, dt->valuestring);
        return -1;
    }
    int nd = cJSON_GetArraySize(sh);
    if (nd > NN_ST_MAX_DIMS) {
        nn_errf(err, errlen, "tensor %s: %d dimensions, at most %d", name, nd, NN_ST_MAX_DIMS);
        return -1;
    }
    t->ndim = nd;
    uint64_t numel = 1;
    for (int i = 0; i < nd; i++) {
        uint64_t d;
        if (json_uint(cJSON_GetArrayItem(sh, i), &d) != 0 || d > (1ull << 40)) {
            nn_errf(err, errlen, "tensor %s: bad shape entry %d", name, i);
            return -1;
        }
        t->shape[i] = (int64_t)d;
        numel *= d;
        if (numel > (1ull << 40)) {
            nn_errf(err, errlen, "tensor %s: too many elements", name);
            return -1;
        }
    }
    uint64_t b, e;
    if (cJSON_GetArraySize(of) != 2 || json_uint(cJSON_GetArrayItem(of, 0), &b) != 0 ||
        json_uint(cJSON_GetArrayItem(of, 1), &e) != 0 || b > e) {
        nn_errf(err, errlen, "tensor %s: bad data_offsets", name);
        return -1;
    }
    if (e > data_size) {
        nn_errf(err, errlen,
                "tensor %s: data ends at %llu, past the file's %zu data bytes (truncated?)", name,
                (unsigned long long)e, data_size);
        return -1;
    }
    if (numel * dtype_sizes[t->dtype] != e - b) {
        nn_errf(err, errlen, "tensor %s: shape needs %llu bytes, offsets give %llu", name,
                (unsigned long long)(numel * dtype_sizes[t->dtype]), (unsigned long long)(e - b));
        return -1;
    }
    t->data = data + b;
    t->nbytes = (size_t)(e - b);
    return 0;
}

/* A tensor's bytes in the data section, for the coverage check. */
struct st_range {
    size_t begin, end;
    const char *name;
};

static int range_cmp(const void *a, const void *b)
{
    const struct st_range *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

/* The format's rule: the tensors cover the data section exactly, no two
 * sharing a byte and no byte left to none (a hole could hide a second file;
 * tensors that overlap are two views of one set of weights, which no writer
 * makes). */
static int check_coverage(const nn_st_file *f, const uint8_t *data, size_t data_size,
                          const char *path, char *err, size_t errlen)
{
    struct st_range *r = malloc(sizeof(*r) * (f->ntensors > 0 ? (size_t)f->ntensors : 1));
    if (!r) {
        nn_errf(err, errlen, "out of memory");
        return -1;
    }
    for (int i = 0; i < f->ntensors; i++) {
        const nn_st_tensor *t = &f->tensors[i];
        r[i].begin = (size_t)((const uint8_t *)t->data - data);
        r[i].end = r[i].begin + t->nbytes;
        r[i].name = t->name;
    }
    qsort(r, (size_t)f->ntensors, sizeof(*r), range_cmp);
    size_t at = 0;
    int rc = 0;
    for (int i = 0; i < f->ntensors && rc == 0; i++) {
        if (r[i].begin < at) {
            nn_errf(err, errlen, "%s: tensors %s and %s overlap", path, r[i - 1].name, r[i].name);
            rc = -1;
        } else if (r[i].begin > at) {
            nn_errf(err, errlen, "%s: data bytes %zu to %zu belong to no tensor (before %s)", path,
                    at, r[i].begin, r[i].name);
            rc = -1;
        }
        at = r[i].end;
    }
    if (rc == 0 && at != data_size) {
        nn_errf(err, errlen, "%s: data bytes %zu to %zu belong to no tensor (after the last)", path,
                at, data_size);
        rc = -1;
    }
    free(r);
    return rc;
}

nn_st_file *nn_st_open(const char *path, char *err, size_t errlen)
{
    nn_st_file *f = calloc(1, sizeof(*f));
    if (!f) {
        nn_errf(err, errlen, "out of memory");
        return NULL;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        nn_errf(err, errlen, "%s: %s", path, strerror(errno));
        free(f);
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        nn_errf(err, errlen, "%s: not a regular file", path);
        goto fail_fd;
    }
    if (st.st_size < 8) {
        nn_errf(err, errlen, "%s: %lld bytes, too short for a safetensors header", path,
                (long long)st.st_size);
        goto fail_fd;
    }
    /* Read, not mapped: a file cut short while it is loaded (a model copied
     * over in place) is an error here; mapped, it was a SIGBUS that ended
     * the node. The weights are copied out of it anyway. */
    f->map_size = (size_t)st.st_size;
    f->map = malloc(f->map_size);
    if (!f->map) {
        nn_errf(err, errlen, "%s: out of memory for %zu bytes", path, f->map_size);
        goto fail_fd;
    }
    for (size_t got = 0; got < f->map_size;) {
        ssize_t r = pread(fd, (char *)f->map + got, f->map_size - got, (off_t)got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            nn_errf(err, errlen, "%s: %s", path,
                    r < 0 ? strerror(errno) : "shorter than its size: changed while read");
            goto fail_fd;
        }
        got += (size_t)r;
    }
    close(fd);
    const uint8_t *p = f->map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | p[i];
    if (hlen > NN_ST_MAX_HEADER || hlen > f->map_size - 8) {
        nn_errf(err, errlen, "%s: header length %llu exceeds the file (%zu bytes) or the cap", path,
                (unsigned long long)hlen, f->map_size);
        goto fail;
    }
    f->root = cJSON_ParseWithLength((const char *)p + 8, (size_t)hlen);
    if (!cJSON_IsObject(f->root)) {
        nn_errf(err, errlen, "%s: header is not a JSON object", path);
        goto fail;
    }
    const uint8_t *data = p + 8 + hlen;
    size_t data_size = f->map_size - 8 - (size_t)hlen;
    int n = cJSON_GetArraySize(f->root);
    f->tensors = calloc(n > 0 ? (size_t)n : 1, sizeof(*f->tensors));
    if (!f->tensors) {
        nn_errf(err, errlen, "out of memory");
        goto fail;
    }
    const cJSON *j;
    cJSON_ArrayForEach(j, f->root)
    {
        if (!j->string) {
            nn_errf(err, errlen, "%s: header entry without a name", path);
            goto fail;
        }
        if (strcmp(j->string, "__metadata__") == 0) {
            if (!cJSON_IsObject(j)) {
                nn_errf(err, errlen, "%s: __metadata__ is not an object", path);
                goto fail;
            }
            const cJSON *m;
            cJSON_ArrayForEach(m, j) if (!cJSON_IsString(m))
            {
                nn_errf(err, errlen, "%s: metadata %s is not a string", path, m->string);
                goto fail;
            }
            f->meta = j;
            continue;
        }
        if (f->ntensors == NN_ST_MAX_TENSORS) {
            nn_errf(err, errlen, "%s: more than %d tensors in the header", path, NN_ST_MAX_TENSORS);
            goto fail;
        }
        for (int i = 0; i < f->ntensors; i++)
            if (strcmp(f->tensors[i].name, j->string) == 0) {
                nn_errf(err, errlen, "%s: tensor %s appears twice", path, j->string);
                goto fail;
            }
        if (parse_tensor(&f->tensors[f->ntensors], j, data, data_size, err, errlen) != 0) goto fail;
        f->ntensors++;
    }
    if (check_coverage(f, data, data_size, path, err, errlen) != 0) goto fail;
    return f;
fail_fd:
    close(fd);
fail:
    nn_st_close(f);
    return NULL;
}

int nn_st_count(const nn_st_file *f)
{
    return f->ntensors;
}

const nn_st_tensor *nn_st_at(const nn_st_file *f, int i)
{
    return i >= 0 && i < f->ntensors ? &f->tensors[i] : NULL;
}

const nn_st_tensor *nn_st_find(const nn_st_file *f, const char *name)
{
    for (int i = 0; i < f->ntensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0) return &f->tensors[i];
    return NULL;
}

const char *nn_st_meta(const nn_st_file *f, const char *key)
{
    if (!f->meta) return NULL;
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(f->meta, key);
    return cJSON_IsString(m) ? m->valuestring : NULL;
}

int nn_st_meta_count(const nn_st_file *f)
{
    return f->meta ? cJSON_GetArraySize(f->meta) : 0;
}

void nn_st_meta_at(const nn_st_file *f, int i, const char **key, const char **value)
{
    const cJSON *m = f->meta ? cJSON_GetArrayItem(f->meta, i) : NULL;
    *key = m ? m->string : NULL;
    *value = m ? m->valuestring : NULL;
}

int nn_st_read_f32(const nn_st_file *f, const char *name, float *dst, size_t n, char *err,
                   size_t errlen)
{
    const nn_st_tensor *t = nn_st_find(f, name);
    if (!t) {
        nn_errf(err, errlen, "tensor %s: missing", name);
        return -1;
    }
    if (t->dtype != NN_ST_F32) {
        nn_errf(err, errlen, "tensor %s: dtype %s, expected F32", name, dtype_names[t->dtype]);
        return -1;
    }
    if (t->nbytes != n * sizeof(float)) {
        nn_errf(err, errlen, "tensor %s: %zu elements, expected %zu", name, t->nbytes / 4, n);
        return -1;
    }
    memcpy(dst, t->data, t->nbytes);
    return 0;
}

static int write_all(FILE *fp, const void *p, size_t n)
{
    return fwrite(p, 1, n, fp) == n ? 0 : -1;
}

int nn_st_write(const char *path, const nn_st_entry *t, int n, const char *const *meta_keys,
                const char *const *meta_values, int nmeta, char *err, size_t errlen)
{
    int rc = -1;
    char *json = NULL, *tmp = NULL;
    FILE *fp = NULL;
    cJSON *root = cJSON_CreateObject();
    if (!root) goto oom;
    if (nmeta > 0) {
        cJSON *m = cJSON_AddObjectToObject(root, "__metadata__");
        if (!m) goto oom;
        for (int i = 0; i < nmeta; i++)
            if (!cJSON_AddStringToObject(m, meta_keys[i], meta_values[i])) goto oom;
    }
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        size_t numel = 1;
        for (int d = 0; d < t[i].ndim; d++)
            numel *= (size_t)t[i].shape[d];
        uint64_t nb = numel * nn_st_dtype_size(t[i].dtype);
        cJSON *e = cJSON_AddObjectToObject(root, t[i].name);
        if (!e || !cJSON_AddStringToObject(e, "dtype", dtype_names[t[i].dtype])) goto oom;
        cJSON *sh = cJSON_AddArrayToObject(e, "shape");
        cJSON *of = cJSON_AddArrayToObject(e, "data_offsets");
        if (!sh || !of) goto oom;
        for (int d = 0; d < t[i].ndim; d++)
            cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)t[i].shape[d]));
        cJSON_AddItemToArray(of, cJSON_CreateNumber((double)off));
        cJSON_AddItemToArray(of, cJSON_CreateNumber((double)(off + nb)));
        off += nb;
    }
    json = cJSON_PrintUnformatted(root);
    if (!json) goto oom;
    size_t jl = strlen(json), padded = (jl + 7) & ~(size_t)7;
    size_t tl = strlen(path) + 32;
    tmp = malloc(tl);
    if (!tmp) goto oom;
    snprintf(tmp, tl, "%s.%ld.tmp", path, (long)getpid());
    fp = fopen(tmp, "wb");
    if (!fp) {
        nn_errf(err, errlen, "%s: %s", tmp, strerror(errno));
        goto out;
    }
    uint8_t len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    int bad = write_all(fp, len8, 8) || write_all(fp, json, jl);
    for (size_t i = jl; i < padded && !bad; i++)
        bad = fputc(' ', fp) == EOF;
    for (int i = 0; i < n && !bad; i++) {
        size_t numel = 1;
        for (int d = 0; d < t[i].ndim; d++)
            numel *= (size_t)t[i].shape[d];
        bad = write_all(fp, t[i].data, numel * nn_st_dtype_size(t[i].dtype));
    }
    if (!bad) bad = fflush(fp) != 0 || fsync(fileno(fp)) != 0;
    if (fclose(fp) != 0) bad = 1;
    fp = NULL;
    if (bad || rename(tmp, path) != 0) {
        nn_errf(err, errlen, "%s: write failed: %s", path, strerror(errno));
        unlink(tmp);
        goto out;
    }
    /* The new name is durable only once its folder is synced: without it a
     * crash could bring back the previous checkpoint, or no file at all. */
    char *slash = strrchr(tmp, '/');
    if (slash)
        slash[slash == tmp ? 1 : 0] = '\0';
    else
        snprintf(tmp, tl, ".");
    int dfd = open(tmp, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    bad = dfd < 0 || (fsync(dfd) != 0 && errno != EINVAL); /* EINVAL: no such sync here */
    if (bad) nn_errf(err, errlen, "%s: cannot sync its folder: %s", path, strerror(errno));
    if (dfd >= 0) close(dfd);
    if (bad) goto out;
    rc = 0;
    goto out;
oom:
    nn_errf(err, errlen, "out of memory");
out:
    if (fp) fclose(fp);
    free(tmp);
    free(json);
    cJSON_Delete(root);
    return rc;
}

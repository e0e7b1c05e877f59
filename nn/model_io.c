/* nn/model_io.c: models to and from safetensors files; the architecture
 * comes from the metadata, every tensor is checked by name, dtype and shape. */
#include "err.h"
#include "model_internal.h"
#include "safetensors.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int count_items(const char *s)
{
    if (!*s) return 0;
    int n = 1;
    for (; *s; s++)
        n += *s == ',';
    return n;
}

static int meta_int(const nn_st_file *f, const char *key, int dflt, int lo, int hi, int *out,
                    char *err, size_t errlen)
{
    const char *v = nn_st_meta(f, key);
    if (!v) {
        *out = dflt;
        return 0;
    }
    char *end;
    long x = strtol(v, &end, 10);
    if (end == v || *end || x < lo || x > hi) {
        nn_errf(err, errlen, "metadata %s='%.32s' is not an integer in [%d, %d]", key, v, lo, hi);
        return -1;
    }
    *out = (int)x;
    return 0;
}

/* The metadata is read by key (the first of equal keys) and copied into the
 * model in order (the last one wins): two values of one key would give a
 * model that is not what its metadata says. Bounded first, so the check is. */
static int meta_check(const nn_st_file *f, const char *path, char *err, size_t errlen)
{
    int n = nn_st_meta_count(f);
    if (n > NN_MAX_META) {
        nn_errf(err, errlen, "%s: %d metadata entries, at most %d", path, n, NN_MAX_META);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        const char *k, *v, *o;
        nn_st_meta_at(f, i, &k, &v);
        for (int j = 0; j < i; j++) {
            nn_st_meta_at(f, j, &o, &v);
            if (strcmp(k, o) == 0) {
                nn_errf(err, errlen, "%s: metadata %.64s appears twice", path, k);
                return -1;
            }
        }
    }
    return 0;
}

/* Text from the file reaches log lines inside error="...": no quote,
 * backslash or control character may end the value or forge a line. */
static void err_safe(char *err, size_t errlen)
{
    for (size_t i = 0; err && i < errlen && err[i]; i++) {
        unsigned char ch = (unsigned char)err[i];
        if (ch < ' ' || ch == '"' || ch == '\\' || ch == 0x7f) err[i] = '_';
    }
}

nn_model *nn_model_load(const char *path, char *err, size_t errlen)
{
    if (err && errlen) err[0] = '\0';
    nn_st_file *f = nn_st_open(path, err, errlen);
    if (!f) {
        err_safe(err, errlen);
        return NULL;
    }
    nn_model *m = NULL;
    nn_config c;
    nn_config_default(&c);
    if (meta_check(f, path, err, errlen) != 0) goto out;
    c.arch = nn_st_meta(f, "arch");
    const char *input = nn_st_meta(f, "input"), *labels = nn_st_meta(f, "labels");
    const char *dd = nn_st_meta(f, "dense_dropout");
    /* what the file does not say is not made up: no default input size
     * (the weights of a G or GM model fit any), and no other metadata than
     * the file's own (nn_model_build, not nn_model_create) */
    if (!c.arch || !input) {
        nn_errf(err, errlen, "%s: metadata has no '%s'", path, c.arch ? "input" : "arch");
        goto out;
    }
    int end = 0;
    if (sscanf(input, "%dx%dx%d%n", &c.in_c, &c.in_h, &c.in_w, &end) != 3 || input[end]) {
        nn_errf(err, errlen, "%s: metadata input='%.32s' is not CxHxW", path, input);
        goto out;
    }
    if (labels) c.labels = count_items(labels);
    if (dd) {
        char *e;
        c.dense_dropout = strtof(dd, &e);
        if (e == dd || *e) {
            nn_errf(err, errlen, "%s: metadata dense_dropout='%.32s' is not a number", path, dd);
            goto out;
        }
    }
    if (meta_int(f, "lstm_hidden", 100, 1, 4096, &c.lstm_hidden, err, errlen) ||
        meta_int(f, "dense", 100, 1, 65536, &c.dense, err, errlen))
        goto out;
    m = nn_model_build(&c, err, errlen);
    if (!m) goto out;
    for (int i = 0; i < m->ntensors; i++) {
        nn_tensor *t = &m->tensors[i];
        const nn_st_tensor *s = nn_st_find(f, t->name);
        int same = s && s->dtype == NN_ST_F32 && s->ndim == t->ndim;
        for (int d = 0; same && d < t->ndim; d++)
            same = s->shape[d] == t->shape[d];
        if (!same) {
            char want[64];
            int o = snprintf(want, sizeof(want), "F32[");
            for (int d = 0; d < t->ndim; d++)
                o += snprintf(want + o, sizeof(want) - o, d ? ",%lld" : "%lld",
                              (long long)t->shape[d]);
            snprintf(want + o, sizeof(want) - o, "]");
            nn_errf(err, errlen, "%s: tensor %s %s, the model needs %s", path, t->name,
                    s ? "has another dtype or shape" : "is missing", want);
            goto fail;
        }
        /* A NaN or Inf weight (a diverged run, an fp16 overflow in an
         * export) makes every output NaN, which would read as "not flagged".
         * No data has a negative variance: batch-norm would take the square
         * root of it (NaN), or of nearly nothing (a wild scale). */
        float *d = nn_tensor_data(m, i);
        memcpy(d, s->data, s->nbytes);
        size_t n = s->nbytes / sizeof(float);
        const char *leaf = strrchr(t->name, '.');
        int variance = leaf && strcmp(leaf, ".running_var") == 0;
        for (size_t k = 0; k < n; k++) {
            if (!isfinite(d[k])) {
                nn_errf(err, errlen, "%s: tensor %s holds a non-finite value at index %zu", path,
                        t->name, k);
                goto fail;
            }
            if (variance && d[k] < 0.0f) {
                nn_errf(err, errlen, "%s: tensor %s holds a negative variance at index %zu", path,
                        t->name, k);
                goto fail;
            }
        }
    }
    for (int i = 0; i < nn_st_count(f); i++) {
        const char *name = nn_st_at(f, i)->name;
        const char *leaf = strrchr(name, '.');
        if (leaf && strcmp(leaf, ".num_batches_tracked") == 0) continue;
        nn_tensor_info info;
        if (nn_model_tensor_find(m, name, &info) != 0) {
            nn_errf(err, errlen, "%s: tensor %s is not part of arch %.64s", path, name, c.arch);
            goto fail;
        }
    }
    for (int i = 0; i < nn_st_meta_count(f); i++) {
        const char *k, *v;
        nn_st_meta_at(f, i, &k, &v);
        if (nn_model_meta_set(m, k, v) != 0) {
            nn_errf(err, errlen, "%s: too much metadata", path);
            goto fail;
        }
    }
    goto out;
fail:
    nn_model_free(m);
    m = NULL;
out:
    nn_st_close(f);
    if (!m) err_safe(err, errlen);
    return m;
}

int nn_model_save(const nn_model *m, const char *path, char *err, size_t errlen)
{
    /* a model on a GPU: its device copy is the model (the host copy is a cache) */
    nn_model_sync_host((nn_model *)m);
    nn_st_entry *e = calloc((size_t)m->ntensors * 2, sizeof(*e));
    char(*nbt)[NN_NAME_MAX] = calloc((size_t)m->ntensors, NN_NAME_MAX);
    int64_t zero = 0;
    if (!e || !nbt) {
        free(e);
        free(nbt);
        nn_errf(err, errlen, "out of memory");
        return NN_ENOMEM;
    }
    int n = 0;
    for (int i = 0; i < m->ntensors; i++) {
        const nn_tensor *t = &m->tensors[i];
        e[n].name = t->name;
        e[n].dtype = NN_ST_F32;
        e[n].ndim = t->ndim;
        memcpy(e[n].shape, t->shape, sizeof(int64_t) * t->ndim);
        e[n].data = t->is_buffer ? m->buffers + t->off : m->params + t->off;
        n++;
        /* PyTorch's BatchNorm also keeps a step counter; write it so that
         * load_state_dict(strict=True) accepts the file. */
        const char *leaf = strrchr(t->name, '.');
        if (leaf && strcmp(leaf, ".running_var") == 0) {
            snprintf(nbt[i], NN_NAME_MAX, "%.*s.num_batches_tracked", (int)(leaf - t->name),
                     t->name);
            e[n].name = nbt[i];
            e[n].dtype = NN_ST_I64;
            e[n].ndim = 0;
            e[n].data = &zero;
            n++;
        }
    }
    int rc = nn_st_write(path, e, n, (const char *const *)m->meta_k, (const char *const *)m->meta_v,
                         m->nmeta, err, errlen);
    free(e);
    free(nbt);
    return rc == 0 ? NN_OK : NN_EIO;
}

/* nn/optim_io.c: the optimizer's state (Adam's first and second moments and
 * its step count) in a safetensors file of its own, next to a checkpoint, so
 * that a training run resumed from a checkpoint continues exactly as one
 * that was never interrupted. Tensors are named as in PyTorch's Adam state,
 * "<param>.exp_avg" and "<param>.exp_avg_sq"; metadata "format" is
 * "ichtriage-adam-1" and "step" the number of steps taken. */
#include "err.h"
#include "model_internal.h"
#include "safetensors.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define OPTIM_FORMAT "ichtriage-adam-1"

/* Moment k (0: exp_avg, 1: exp_avg_sq) of parameter tensor t: its name in
 * the file and its values in the model. */
static float *moment(nn_model *m, const nn_tensor *t, int k, char *name, size_t n)
{
    snprintf(name, n, "%s.%s", t->name, k ? "exp_avg_sq" : "exp_avg");
    return (k ? m->adam_v : m->adam_m) + t->off;
}

int nn_model_save_optimizer(nn_model *m, const char *path, char *err, size_t errlen)
{
    nn_model_sync_host(m);
    nn_st_entry *e = calloc((size_t)m->ntensors * 2 + 1, sizeof *e);
    char(*names)[NN_NAME_MAX + 16] = calloc((size_t)m->ntensors * 2 + 1, sizeof *names);
    if (!e || !names) {
        free(e);
        free(names);
        nn_errf(err, errlen, "out of memory");
        return NN_ENOMEM;
    }
    int n = 0;
    for (int i = 0; i < m->ntensors; i++) {
        const nn_tensor *t = &m->tensors[i];
        if (t->is_buffer) continue;
        for (int k = 0; k < 2; k++, n++) {
            e[n].data = moment(m, t, k, names[n], sizeof names[n]);
            e[n].name = names[n];
            e[n].dtype = NN_ST_F32;
            e[n].ndim = t->ndim;
            memcpy(e[n].shape, t->shape, sizeof(int64_t) * (size_t)t->ndim);
        }
    }
    char step[32];
    snprintf(step, sizeof step, "%ld", m->adam_t);
    const char *keys[] = {"format", "step"}, *vals[] = {OPTIM_FORMAT, step};
    int rc = nn_st_write(path, e, n, keys, vals, 2, err, errlen);
    free(e);
    free(names);
    return rc == 0 ? NN_OK : NN_EIO;
}

void nn_model_reset_optimizer(nn_model *m)
{
    memset(m->adam_m, 0, sizeof(float) * m->nparams);
    memset(m->adam_v, 0, sizeof(float) * m->nparams);
    m->adam_t = 0;
    if (m->be != nn_backend_cpu()) {
        m->be->upload(m->bctx, m->badam_m, m->adam_m, sizeof(float) * m->nparams);
        m->be->upload(m->bctx, m->badam_v, m->adam_v, sizeof(float) * m->nparams);
    }
}

int nn_model_load_optimizer(nn_model *m, const char *path, char *err, size_t errlen)
{
    nn_st_file *f = nn_st_open(path, err, errlen);
    if (!f) {
        nn_model_reset_optimizer(m);
        return NN_EIO;
    }
    int rc = NN_EFORMAT;
    const char *fmt = nn_st_meta(f, "format"), *step = nn_st_meta(f, "step");
    char *end = NULL;
    long t = step ? strtol(step, &end, 10) : -1;
    if (!fmt || strcmp(fmt, OPTIM_FORMAT) != 0 || !end || *end || t < 0) {
        nn_errf(err, errlen, "%s: not an optimizer state (format %s)", path, OPTIM_FORMAT);
        goto out;
    }
    /* Both moments of every parameter tensor, and nothing else. */
    int want = 0;
    for (int i = 0; i < m->ntensors; i++) {
        const nn_tensor *t = &m->tensors[i];
        if (t->is_buffer) continue;
        for (int k = 0; k < 2; k++, want++) {
            char name[NN_NAME_MAX + 16];
            float *dst = moment(m, t, k, name, sizeof name);
            if (nn_st_read_f32(f, name, dst, t->numel, err, errlen) != 0)
                goto out;
        }
    }
    if (nn_st_count(f) != want) {
        nn_errf(err, errlen, "%s: %d tensors, the model's optimizer state has %d", path,
                nn_st_count(f), want);
        goto out;
    }
    m->adam_t = t;
    if (m->be != nn_backend_cpu()) {
        m->be->upload(m->bctx, m->badam_m, m->adam_m, sizeof(float) * m->nparams);
        m->be->upload(m->bctx, m->badam_v, m->adam_v, sizeof(float) * m->nparams);
    }
    rc = NN_OK;
out:
    if (rc != NN_OK) nn_model_reset_optimizer(m); /* nothing half-loaded */
    nn_st_close(f);
    return rc;
}

long nn_model_optimizer_steps(const nn_model *m)
{
    return m->adam_t;
}

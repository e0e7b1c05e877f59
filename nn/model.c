/* nn/model.c: the nn_model object: creation (architecture from arch.c,
 * one parameter buffer with its gradients and Adam moments beside it),
 * freeing, metadata, freezing, modes and accessors. */
#include "err.h"
#include "model_internal.h"
#include "pool.h"

#include <cblas.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* 4 GiB of weights; VGG19's LRCN has 36 M. */
#define NN_MAX_PARAMS (1u << 30)
/* Floats in the largest layer output (or input) of one slice. Inference
 * holds three buffers of NN_INFER_BATCH times this (nn_stack_reserve): at
 * 2^24, 2 GiB each. VGG19 at 512x512, the largest input `ichtriage train`
 * makes, is right at it; its documented 128x128 needs 1/16 of it. */
#define NN_MAX_ACT (1u << 24)

static const char *const default_labels =
    "any,epidural,intraparenchymal,intraventricular,subarachnoid,subdural";

void nn_config_default(nn_config *c)
{
    c->arch = "small";
    c->in_c = 3;
    c->in_h = 128;
    c->in_w = 128;
    c->labels = 6;
    c->lstm_hidden = 100;
    c->dense = 100;
    c->dense_dropout = 0.5f;
    c->seed = 1;
}

/* Threads for models created from now on; 0 until nn_set_threads or the
 * first model (which takes OpenBLAS's own count: OPENBLAS_NUM_THREADS, else
 * every core). */
static atomic_int default_threads;

void nn_set_threads(int n)
{
    atomic_store(&default_threads, n < 1 ? 1 : n);
}

/* The threads a new model's pool gets. nn/ splits its matrix products
 * itself, so OpenBLAS's own threads are told to stand aside: two thread
 * pools on the same cores spin against each other. */
static int model_threads(void)
{
    int n = atomic_load(&default_threads);
    if (n < 1) {
        n = openblas_get_num_threads();
        if (n < 1) n = 1;
        int zero = 0;
        atomic_compare_exchange_strong(&default_threads, &zero, n);
        n = atomic_load(&default_threads);
    }
    openblas_set_num_threads(1);
    return n;
}

static char *xstrdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

/* The keys nn_model_load() rebuilds the architecture from. */
static int set_arch_meta(nn_model *m)
{
    char hidden[16], dense[16], dd[32], input[64];
    snprintf(hidden, sizeof(hidden), "%d", m->cfg.lstm_hidden);
    snprintf(dense, sizeof(dense), "%d", m->cfg.dense);
    snprintf(dd, sizeof(dd), "%g", (double)m->cfg.dense_dropout);
    snprintf(input, sizeof(input), "%dx%dx%d", m->cfg.in_c, m->cfg.in_h, m->cfg.in_w);
    return nn_model_meta_set(m, "format", "ichtriage-lrcn-1") ||
           nn_model_meta_set(m, "arch", m->arch) || nn_model_meta_set(m, "input", input) ||
           nn_model_meta_set(m, "lstm_hidden", hidden) || nn_model_meta_set(m, "dense", dense) ||
           nn_model_meta_set(m, "dense_dropout", dd);
}

nn_model *nn_model_build(const nn_config *c, char *err, size_t errlen)
{
    /* the config may come from a file's metadata: bound every size */
    if (!c || !c->arch || c->in_c < 1 || c->in_c > 64 || c->in_h < 1 || c->in_h > 4096 ||
        c->in_w < 1 || c->in_w > 4096 || c->labels < 1 || c->labels > NN_MAX_LABELS ||
        c->lstm_hidden < 1 || c->lstm_hidden > 4096 || c->dense < 1 || c->dense > 65536 ||
        !(c->dense_dropout >= 0.0f && c->dense_dropout < 1.0f)) {
        nn_errf(err, errlen, "config: a size is out of range");
        return NULL;
    }
    nn_model *m = calloc(1, sizeof(*m));
    if (!m) goto oom;
    m->cfg = *c;
    m->arch = xstrdup(c->arch);
    if (!m->arch) goto oom;
    m->cfg.arch = m->arch;
    m->be = nn_backend_cpu();
    m->workers = nn_pool_create(model_threads());
    if (!m->workers) goto oom;
    m->bctx = m->workers;
    m->rng = c->seed ^ 0x5eed5eed5eed5eedULL;
    if (nn_arch_build(m, err, errlen) != 0) {
        nn_model_free(m);
        return NULL;
    }
    if (m->nparams > NN_MAX_PARAMS) {
        nn_errf(err, errlen, "arch: %zu parameters, more than the %zu allowed", m->nparams,
                (size_t)NN_MAX_PARAMS);
        nn_model_free(m);
        return NULL;
    }
    /* refused here, not at the first series: its buffers could never be had */
    if (m->cnn.max_act > NN_MAX_ACT) {
        nn_errf(err, errlen,
                "arch: a layer of %zu values per %dx%d slice, more than the %zu allowed (%zu MiB "
                "for a batch of %d slices)",
                m->cnn.max_act, c->in_h, c->in_w, (size_t)NN_MAX_ACT,
                m->cnn.max_act * NN_INFER_BATCH * sizeof(float) >> 20, NN_INFER_BATCH);
        nn_model_free(m);
        return NULL;
    }
    m->params = calloc(m->nparams, sizeof(float));
    m->grads = calloc(m->nparams, sizeof(float));
    m->adam_m = calloc(m->nparams, sizeof(float));
    m->adam_v = calloc(m->nparams, sizeof(float));
    m->buffers = calloc(m->nbuffers + 1, sizeof(float));
    m->stat = calloc(m->nstat + 1, sizeof(float));
    size_t fold = 1;
    for (int i = 0; i < m->cnn.n; i++)
        if (m->cnn.layers[i].kind == NN_L_CONV) {
            const nn_tensor *w = &m->tensors[m->cnn.layers[i].wt];
            if (w->numel + w->shape[0] > fold) fold = w->numel + w->shape[0];
        }
    m->fold = malloc(sizeof(float) * fold);
    if (!m->params || !m->grads || !m->adam_m || !m->adam_v || !m->buffers || !m->stat || !m->fold)
        goto oom;
    m->bparams = m->params;
    m->bgrads = m->grads;
    m->badam_m = m->adam_m;
    m->badam_v = m->adam_v;
    m->bbuffers = m->buffers;
    nn_arch_init_weights(m);
    if (set_arch_meta(m)) goto oom;
    return m;
oom:
    nn_errf(err, errlen, "out of memory");
    nn_model_free(m);
    return NULL;
}

nn_model *nn_model_create(const nn_config *c, char *err, size_t errlen)
{
    nn_model *m = nn_model_build(c, err, errlen);
    if (!m) return NULL;
    char prov[96];
    snprintf(prov, sizeof(prov), "untrained: initialised by nn_model_create seed=%llu",
             (unsigned long long)c->seed);
    if (nn_model_meta_set(m, "windows", "40/80,80/200,600/2800") ||
        nn_model_meta_set(m, "labels", c->labels == 6 ? default_labels : "") ||
        nn_model_meta_set(m, "thresholds", "0.5,0.5,0.5,0.5,0.5,0.5") ||
        nn_model_meta_set(m, "preprocessing",
                          "hu=stored*slope+intercept;window=clamp01;resize=area") ||
        nn_model_meta_set(m, "provenance", prov)) {
        nn_errf(err, errlen, "out of memory");
        nn_model_free(m);
        return NULL;
    }
    return m;
}

static void free_stack(nn_model *m, nn_stack *st)
{
    void *c = m->bctx;
    m->be->dealloc(c, st->cache);
    m->be->dealloc(c, st->idx);
    m->be->dealloc(c, st->pp[0]);
    m->be->dealloc(c, st->pp[1]);
    st->cache = st->pp[0] = st->pp[1] = NULL;
    st->idx = NULL;
    st->cap = st->pp_cap = st->cached_n = 0;
}

void nn_model_free_workspaces(nn_model *m)
{
    free_stack(m, &m->cnn);
    free_stack(m, &m->head);
    m->be->dealloc(m->bctx, m->col);
    m->be->dealloc(m->bctx, m->pool_idx);
    m->be->dealloc(m->bctx, m->xin);
    m->be->dealloc(m->bctx, m->din);
    m->col = NULL;
    m->pool_idx = NULL;
    m->xin = m->din = NULL;
    m->col_cap = 0;
    m->xin_cap = m->din_cap = 0;
    nn_lrcn_free_workspace(m);
    m->lrcn_n = 0;
}

/* Frees the device copies and the backend context; the model is on the CPU after. */
static void drop_device(nn_model *m)
{
    if (m->be == nn_backend_cpu()) return;
    nn_model_free_workspaces(m);
    void *c = m->bctx;
    m->be->dealloc(c, m->bparams);
    m->be->dealloc(c, m->bgrads);
    m->be->dealloc(c, m->badam_m);
    m->be->dealloc(c, m->badam_v);
    m->be->dealloc(c, m->bbuffers);
    m->be->dealloc(c, m->stat);
    m->be->release(c);
    m->be = nn_backend_cpu();
    m->bctx = m->workers;
    m->bparams = m->params;
    m->bgrads = m->grads;
    m->badam_m = m->adam_m;
    m->badam_v = m->adam_v;
    m->bbuffers = m->buffers;
    m->stat = calloc(m->nstat + 1, sizeof(float));
}

void nn_model_sync_host(nn_model *m)
{
    if (m->be == nn_backend_cpu()) return;
    m->be->download(m->bctx, m->params, m->bparams, sizeof(float) * m->nparams);
    m->be->download(m->bctx, m->grads, m->bgrads, sizeof(float) * m->nparams);
    m->be->download(m->bctx, m->adam_m, m->badam_m, sizeof(float) * m->nparams);
    m->be->download(m->bctx, m->adam_v, m->badam_v, sizeof(float) * m->nparams);
    m->be->download(m->bctx, m->buffers, m->bbuffers, sizeof(float) * (m->nbuffers + 1));
}

int nn_model_be_check(nn_model *m)
{
    return m->be->status(m->bctx, NULL, 0) == 0 ? 0 : NN_EIO;
}

int nn_model_set_device(nn_model *m, const char *device, int flags, char *err, size_t errlen)
{
    const nn_backend *want;
    if (strcmp(device, "cpu") == 0) {
        want = nn_backend_cpu();
    } else if (strcmp(device, "cuda") == 0) {
        want = nn_backend_cuda();
        if (!want) {
            nn_errf(err, errlen, "device cuda: this build has no CUDA backend (nn/cuda/)");
            return NN_EINVAL;
        }
    } else if (strcmp(device, "auto") == 0) {
        want = nn_cuda_device_count() > 0 ? nn_backend_cuda() : nn_backend_cpu();
    } else {
        nn_errf(err, errlen, "device '%.32s': expected auto, cpu or cuda", device);
        return NN_EINVAL;
    }
    /* back to the host first: the host copy is the one every backend starts from */
    nn_model_sync_host(m);
    drop_device(m);
    nn_model_free_workspaces(m);
    if (!m->stat) return NN_ENOMEM;
    m->be_fp32 = (flags & NN_DEVICE_FP32) != 0;
    if (want == nn_backend_cpu()) return 0;
    void *c = NULL;
    int rc = want->init(&c, m->be_fp32 ? NN_BACKEND_FP32 : 0, err, errlen);
    if (rc != 0) return rc;
    free(m->stat);
    m->stat = NULL;
    m->be = want;
    m->bctx = c;
    size_t np = sizeof(float) * m->nparams, nb = sizeof(float) * (m->nbuffers + 1);
    m->bparams = want->alloc(c, np);
    m->bgrads = want->alloc(c, np);
    m->badam_m = want->alloc(c, np);
    m->badam_v = want->alloc(c, np);
    m->bbuffers = want->alloc(c, nb);
    m->stat = want->alloc(c, sizeof(float) * (m->nstat + 1));
    if (!m->bparams || !m->bgrads || !m->badam_m || !m->badam_v || !m->bbuffers || !m->stat) {
        nn_errf(err, errlen, "device %s: out of device memory for %zu parameters", want->name,
                m->nparams);
        drop_device(m);
        return NN_ENOMEM;
    }
    want->upload(c, m->bparams, m->params, np);
    want->upload(c, m->bgrads, m->grads, np);
    want->upload(c, m->badam_m, m->adam_m, np);
    want->upload(c, m->badam_v, m->adam_v, np);
    want->upload(c, m->bbuffers, m->buffers, nb);
    if (want->status(c, err, errlen) != 0) {
        drop_device(m);
        return NN_EIO;
    }
    return 0;
}

const char *nn_model_device(const nn_model *m)
{
    return m->be->name;
}

void nn_model_free(nn_model *m)
{
    if (!m) return;
    drop_device(m);
    nn_model_free_workspaces(m);
    free(m->params);
    free(m->grads);
    free(m->adam_m);
    free(m->adam_v);
    free(m->buffers);
    free(m->stat);
    free(m->fold);
    free(m->len);
    for (int i = 0; i < m->nmeta; i++) {
        free(m->meta_k[i]);
        free(m->meta_v[i]);
    }
    free(m->arch);
    nn_pool_free(m->workers);
    free(m);
}

/* ---- small accessors ----------------------------------------------------- */

const nn_config *nn_model_config(const nn_model *m)
{
    return &m->cfg;
}

int nn_model_feature_size(const nn_model *m)
{
    return m->feat_size;
}

size_t nn_model_param_count(const nn_model *m)
{
    return m->nparams;
}

size_t nn_model_state_size(const nn_model *m)
{
    return m->nparams + m->nbuffers;
}

void nn_model_state_get(const nn_model *m, float *dst)
{
    m->be->download(m->bctx, dst, m->bparams, sizeof(float) * m->nparams);
    m->be->download(m->bctx, dst + m->nparams, m->bbuffers, sizeof(float) * m->nbuffers);
}

void nn_model_state_set(nn_model *m, const float *src)
{
    m->be->upload(m->bctx, m->bparams, src, sizeof(float) * m->nparams);
    m->be->upload(m->bctx, m->bbuffers, src + m->nparams, sizeof(float) * m->nbuffers);
    if (m->be != nn_backend_cpu()) {
        /* the host view follows, as after a download */
        memcpy(m->params, src, sizeof(float) * m->nparams);
        memcpy(m->buffers, src + m->nparams, sizeof(float) * m->nbuffers);
    }
}

float *nn_tensor_data(nn_model *m, int t)
{
    if (t < 0) return NULL;
    nn_tensor *x = &m->tensors[t];
    return x->is_buffer ? m->bbuffers + x->off : m->bparams + x->off;
}

float *nn_tensor_grad(nn_model *m, int t)
{
    if (t < 0 || m->tensors[t].frozen || m->tensors[t].is_buffer) return NULL;
    return m->bgrads + m->tensors[t].off;
}

int nn_model_tensor_count(const nn_model *m)
{
    return m->ntensors;
}

int nn_model_tensor(const nn_model *m, int i, nn_tensor_info *out)
{
    if (i < 0 || i >= m->ntensors) return NN_EINVAL;
    const nn_tensor *t = &m->tensors[i];
    if (m->be != nn_backend_cpu()) {
        /* the device copy is the model: refresh this tensor's host view (the
         * host buffers are caches, so this is no change of the model) */
        size_t bytes = sizeof(float) * t->numel;
        if (t->is_buffer) {
            m->be->download(m->bctx, m->buffers + t->off, m->bbuffers + t->off, bytes);
        } else {
            m->be->download(m->bctx, m->params + t->off, m->bparams + t->off, bytes);
            m->be->download(m->bctx, m->grads + t->off, m->bgrads + t->off, bytes);
        }
    }
    out->name = t->name;
    out->ndim = t->ndim;
    memcpy(out->shape, t->shape, sizeof(out->shape));
    out->numel = t->numel;
    out->data = t->is_buffer ? m->buffers + t->off : m->params + t->off;
    out->grad = t->is_buffer ? NULL : m->grads + t->off;
    out->frozen = t->frozen;
    return 0;
}

int nn_model_tensor_find(const nn_model *m, const char *name, nn_tensor_info *out)
{
    for (int i = 0; i < m->ntensors; i++)
        if (strcmp(m->tensors[i].name, name) == 0) return nn_model_tensor(m, i, out);
    return NN_EINVAL;
}

void nn_model_seed(nn_model *m, uint64_t seed)
{
    m->rng = seed;
}

void nn_model_set_training(nn_model *m, int training)
{
    m->training = training != 0;
}

int nn_model_freeze(nn_model *m, const char *prefix, int frozen)
{
    int n = 0;
    size_t pl = strlen(prefix);
    for (int i = 0; i < m->ntensors; i++)
        if (strncmp(m->tensors[i].name, prefix, pl) == 0) {
            m->tensors[i].frozen = frozen != 0;
            n++;
        }
    return n;
}

void nn_model_zero_grad(nn_model *m)
{
    m->be->zero(m->bctx, m->bgrads, sizeof(float) * m->nparams);
}

/* ---- metadata ------------------------------------------------------------ */

const char *nn_model_meta_get(const nn_model *m, const char *key)
{
    for (int i = 0; i < m->nmeta; i++)
        if (strcmp(m->meta_k[i], key) == 0) return m->meta_v[i];
    return NULL;
}

int nn_model_meta_set(nn_model *m, const char *key, const char *value)
{
    int i = 0;
    while (i < m->nmeta && strcmp(m->meta_k[i], key) != 0)
        i++;
    if (!value) {
        if (i == m->nmeta) return 0;
        free(m->meta_k[i]);
        free(m->meta_v[i]);
        m->nmeta--;
        m->meta_k[i] = m->meta_k[m->nmeta];
        m->meta_v[i] = m->meta_v[m->nmeta];
        return 0;
    }
    char *v = xstrdup(value);
    if (!v) return NN_ENOMEM;
    if (i < m->nmeta) {
        free(m->meta_v[i]);
        m->meta_v[i] = v;
        return 0;
    }
    char *k = xstrdup(key);
    if (!k || m->nmeta >= NN_MAX_META) {
        free(k);
        free(v);
        return k ? NN_EINVAL : NN_ENOMEM;
    }
    m->meta_k[m->nmeta] = k;
    m->meta_v[m->nmeta++] = v;
    return 0;
}

/* nn/model.c: building an LRCN from its architecture spec, its tensor table
 * (one parameter buffer, one gradient buffer, Adam moments beside them),
 * metadata, freezing, weights I/O through safetensors, and the Adam step. */
#include "err.h"
#include "model_internal.h"
#include "safetensors.h"

#include <cblas.h>
#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const preset_names[] = {"small", "vgg19"};
static const char *const preset_specs[] = {
    "b32,M,b64,M,b128,M,b256,M,b256,G|",
    "c64,c64,M,c128,c128,M,c256,c256,c256,c256,M,c512,c512,c512,c512,M,"
    "c512,c512,c512,c512,M,F|d1000,D0.5,d1000",
};
/* 4 GiB of weights; VGG19's LRCN has 36 M. */
#define NN_MAX_PARAMS (1u << 30)

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

void nn_adam_default(nn_adam *a)
{
    a->lr = 1e-4f;
    a->beta1 = 0.9f;
    a->beta2 = 0.999f;
    a->eps = 1e-8f;
    a->weight_decay = 0.0f;
    a->decoupled = 0;
}

void nn_set_threads(int n)
{
    openblas_set_num_threads(n);
}

/* ---- building ------------------------------------------------------------ */

static int add_tensor(nn_model *m, int is_buffer, int ndim, const int64_t *shape, const char *fmt,
                      ...) __attribute__((format(printf, 5, 6)));
static int add_tensor(nn_model *m, int is_buffer, int ndim, const int64_t *shape, const char *fmt,
                      ...)
{
    if (m->ntensors >= NN_MAX_TENSORS) return -1;
    nn_tensor *t = &m->tensors[m->ntensors];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof(t->name), fmt, ap);
    va_end(ap);
    t->ndim = ndim;
    t->numel = 1;
    for (int i = 0; i < ndim; i++) {
        t->shape[i] = shape[i];
        t->numel *= (size_t)shape[i];
    }
    t->is_buffer = is_buffer;
    if (is_buffer) {
        t->off = m->nbuffers;
        m->nbuffers += t->numel;
    } else {
        t->off = m->nparams;
        m->nparams += t->numel;
    }
    return m->ntensors++;
}

static nn_layer *push_layer(nn_stack *st, nn_layer_kind kind, int c, int h, int w)
{
    if (st->n >= NN_MAX_LAYERS) return NULL;
    nn_layer *l = &st->layers[st->n++];
    memset(l, 0, sizeof(*l));
    l->kind = kind;
    l->c = l->oc = c;
    l->h = l->oh = h;
    l->w = l->ow = w;
    l->wt = l->bt = l->rm = l->rv = -1;
    return l;
}

static int add_linear(nn_model *m, nn_stack *st, const char *prefix, int in, int out)
{
    nn_layer *l = push_layer(st, NN_L_LINEAR, in, 1, 1);
    if (!l) return -1;
    l->oc = out;
    l->wt = add_tensor(m, 0, 2, (int64_t[]){out, in}, "%s.weight", prefix);
    l->bt = add_tensor(m, 0, 1, (int64_t[]){out}, "%s.bias", prefix);
    return l->wt < 0 || l->bt < 0 ? -1 : 0;
}

static int add_bn(nn_model *m, nn_stack *st, const char *prefix, int c, int h, int w)
{
    nn_layer *l = push_layer(st, NN_L_BN, c, h, w);
    if (!l) return -1;
    int64_t sh[1] = {c};
    l->wt = add_tensor(m, 0, 1, sh, "%s.weight", prefix);
    l->bt = add_tensor(m, 0, 1, sh, "%s.bias", prefix);
    l->rm = add_tensor(m, 1, 1, sh, "%s.running_mean", prefix);
    l->rv = add_tensor(m, 1, 1, sh, "%s.running_var", prefix);
    l->stat = m->nstat;
    m->nstat += 2 * (size_t)c;
    return l->rv < 0 ? -1 : 0;
}

static int add_simple(nn_stack *st, nn_layer_kind kind, int c, int h, int w, float p)
{
    nn_layer *l = push_layer(st, kind, c, h, w);
    if (!l) return -1;
    l->p = p;
    l->inplace = st->n > 1;
    return 0;
}

/* Parses an integer after *s; returns -1 when there is none or it is out of range. */
static int parse_int(const char **s, int lo, int hi)
{
    if (!isdigit((unsigned char)**s)) return -1;
    long v = strtol(*s, (char **)s, 10);
    return v < lo || v > hi ? -1 : (int)v;
}

/* Features: cN / bN [kK][sS][pP], M[k], G, F. */
static int build_features(nn_model *m, const char *tok, int *c, int *h, int *w, int *idx, char *err,
                          size_t errlen)
{
    nn_stack *st = &m->cnn;
    const char *s = tok + 1;
    char pre[NN_NAME_MAX];
    snprintf(pre, sizeof(pre), "cnn.features.%d", *idx);
    if (tok[0] == 'c' || tok[0] == 'b') {
        int oc = parse_int(&s, 1, 65536), k = 3, stride = 1, pad = -1;
        while (oc > 0 && *s) {
            char key = *s++;
            int v = parse_int(&s, key == 'p' ? 0 : 1, 64);
            if (v < 0 || (key != 'k' && key != 's' && key != 'p')) oc = -1;
            if (key == 'k') k = v;
            if (key == 's') stride = v;
            if (key == 'p') pad = v;
        }
        if (pad < 0) pad = k / 2;
        if (oc < 0 || *h + 2 * pad < k || *w + 2 * pad < k) {
            nn_errf(err, errlen, "arch: bad conv token '%s'", tok);
            return -1;
        }
        nn_layer *l = push_layer(st, NN_L_CONV, *c, *h, *w);
        if (!l) return -1;
        nn_conv_shape_init(&l->conv, *c, *h, *w, oc, k, stride, pad);
        l->oc = oc;
        l->oh = l->conv.oh;
        l->ow = l->conv.ow;
        l->wt = add_tensor(m, 0, 4, (int64_t[]){oc, *c, k, k}, "%s.weight", pre);
        l->bt = add_tensor(m, 0, 1, (int64_t[]){oc}, "%s.bias", pre);
        *c = oc;
        *h = l->oh;
        *w = l->ow;
        (*idx)++;
        if (tok[0] == 'b') {
            snprintf(pre, sizeof(pre), "cnn.features.%d", *idx);
            if (add_bn(m, st, pre, *c, *h, *w) != 0) return -1;
            (*idx)++;
        }
        (*idx)++;
        return add_simple(st, NN_L_RELU, *c, *h, *w, 0.0f);
    }
    if (tok[0] == 'M') {
        int k = *s ? parse_int(&s, 1, 64) : 2;
        if (k < 0 || *s || *h < k || *w < k) {
            nn_errf(err, errlen, "arch: bad max-pool token '%s'", tok);
            return -1;
        }
        nn_layer *l = push_layer(st, NN_L_MAXPOOL, *c, *h, *w);
        if (!l) return -1;
        l->k = l->stride = k;
        l->oh = *h = (*h - k) / k + 1;
        l->ow = *w = (*w - k) / k + 1;
        (*idx)++;
        return 0;
    }
    if ((tok[0] == 'G' || tok[0] == 'F') && !*s) {
        nn_layer *l = push_layer(st, tok[0] == 'G' ? NN_L_GAP : NN_L_FLATTEN, *c, *h, *w);
        if (!l) return -1;
        if (tok[0] == 'F') {
            l->inplace = st->n > 1;
            *c = *c * *h * *w;
        } else {
            (*idx)++; /* the Flatten after AdaptiveAvgPool2d */
        }
        l->oc = *c;
        l->oh = l->ow = *h = *w = 1;
        (*idx)++;
        return 0;
    }
    nn_errf(err, errlen, "arch: unknown token '%s' in the features", tok);
    return -1;
}

/* Classifier: dN (Linear + ReLU), Dp (dropout); the last Linear is added by the caller. */
static int build_classifier(nn_model *m, const char *tok, int *c, int *idx, char *err,
                            size_t errlen)
{
    const char *s = tok + 1;
    char pre[NN_NAME_MAX];
    snprintf(pre, sizeof(pre), "cnn.classifier.%d", *idx);
    if (tok[0] == 'd') {
        int n = parse_int(&s, 1, 1 << 20);
        if (n < 0 || *s) goto bad;
        if (add_linear(m, &m->cnn, pre, *c, n) != 0) return -1;
        *c = n;
        *idx += 2;
        return add_simple(&m->cnn, NN_L_RELU, n, 1, 1, 0.0f);
    }
    if (tok[0] == 'D') {
        char *end;
        float p = strtof(s, &end);
        if (end == s || *end || !(p >= 0.0f && p < 1.0f)) goto bad;
        (*idx)++;
        return add_simple(&m->cnn, NN_L_DROPOUT, *c, 1, 1, p);
    }
bad:
    nn_errf(err, errlen, "arch: bad classifier token '%s'", tok);
    return -1;
}

static int build_cnn(nn_model *m, const char *spec, char *err, size_t errlen)
{
    char buf[1024];
    if (strlen(spec) >= sizeof(buf) || !strchr(spec, '|')) {
        nn_errf(err, errlen, "arch: '%.64s' is neither a preset nor a spec 'features|classifier'",
                spec);
        return -1;
    }
    strcpy(buf, spec);
    char *bar = strchr(buf, '|');
    *bar = '\0';
    int c = m->cfg.in_c, h = m->cfg.in_h, w = m->cfg.in_w, idx = 0;
    char *save = NULL;
    for (char *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save))
        if (build_features(m, t, &c, &h, &w, &idx, err, errlen) != 0) return -1;
    if (m->cnn.n == 0 || h != 1 || w != 1) {
        nn_errf(err, errlen, "arch: the features must end with G (global pool) or F (flatten)");
        return -1;
    }
    m->feat_end = m->cnn.n;
    m->feat_size = c;
    idx = 0;
    for (char *t = strtok_r(bar + 1, ",", &save); t; t = strtok_r(NULL, ",", &save))
        if (build_classifier(m, t, &c, &idx, err, errlen) != 0) return -1;
    char pre[NN_NAME_MAX];
    snprintf(pre, sizeof(pre), "cnn.classifier.%d", idx);
    return add_linear(m, &m->cnn, pre, c, m->cfg.labels);
}

static int build_lrcn(nn_model *m)
{
    int H = m->cfg.lstm_hidden, F = m->feat_size, D = m->cfg.dense;
    for (int d = 0; d < 2; d++) {
        const char *sfx = d ? "_reverse" : "";
        m->lstm_t[d][0] = add_tensor(m, 0, 2, (int64_t[]){4 * H, F}, "lstm.weight_ih_l0%s", sfx);
        m->lstm_t[d][1] = add_tensor(m, 0, 2, (int64_t[]){4 * H, H}, "lstm.weight_hh_l0%s", sfx);
        m->lstm_t[d][2] = add_tensor(m, 0, 1, (int64_t[]){4 * H}, "lstm.bias_ih_l0%s", sfx);
        m->lstm_t[d][3] = add_tensor(m, 0, 1, (int64_t[]){4 * H}, "lstm.bias_hh_l0%s", sfx);
        if (m->lstm_t[d][3] < 0) return -1;
    }
    nn_stack *st = &m->head;
    int in = 2 * H;
    for (int b = 0; b < 2; b++) {
        char pre[NN_NAME_MAX];
        snprintf(pre, sizeof(pre), "dense.%d", 4 * b);
        if (add_linear(m, st, pre, in, D) != 0) return -1;
        snprintf(pre, sizeof(pre), "dense.%d", 4 * b + 1);
        if (add_bn(m, st, pre, D, 1, 1) != 0) return -1;
        if (add_simple(st, NN_L_RELU, D, 1, 1, 0.0f) != 0) return -1;
        if (add_simple(st, NN_L_DROPOUT, D, 1, 1, m->cfg.dense_dropout) != 0) return -1;
        in = D;
    }
    return add_linear(m, st, "out", D, m->cfg.labels);
}

/* Per-sample cache offsets of a stack, after its layers are known. */
static void layout_stack(nn_stack *st, size_t in_size)
{
    st->in_size = in_size;
    st->act_total = st->idx_total = 0;
    st->max_act = in_size;
    size_t prev = 0;
    for (int i = 0; i < st->n; i++) {
        nn_layer *l = &st->layers[i];
        size_t out = (size_t)l->oc * l->oh * l->ow;
        if (out > st->max_act) st->max_act = out;
        if (l->inplace) {
            l->act = prev;
        } else {
            l->act = st->act_total;
            st->act_total += out;
        }
        if (l->kind == NN_L_DROPOUT) {
            l->aux = st->act_total;
            st->act_total += out;
        } else if (l->kind == NN_L_MAXPOOL) {
            l->aux = st->idx_total;
            st->idx_total += out;
        }
        prev = l->act;
    }
}

static void init_weights(nn_model *m)
{
    uint64_t rng = m->cfg.seed;
    for (int i = 0; i < m->ntensors; i++) {
        nn_tensor *t = &m->tensors[i];
        float *p = t->is_buffer ? m->buffers + t->off : m->params + t->off;
        const char *leaf = strrchr(t->name, '.') + 1;
        int is_bias = strncmp(leaf, "bias", 4) == 0;
        if (strcmp(leaf, "running_var") == 0) {
            for (size_t k = 0; k < t->numel; k++)
                p[k] = 1.0f;
        } else if (t->ndim == 1 && !strncmp(t->name, "lstm.", 5)) {
            float a = 1.0f / sqrtf((float)m->cfg.lstm_hidden);
            for (size_t k = 0; k < t->numel; k++)
                p[k] = a * (2.0f * nn_rng_uniform(&rng) - 1.0f);
        } else if (t->ndim == 1) {
            /* BN gamma 1, everything else (bias, beta, running mean) 0; linear biases below */
            int gamma = !is_bias && strcmp(leaf, "weight") == 0;
            for (size_t k = 0; k < t->numel; k++)
                p[k] = gamma ? 1.0f : 0.0f;
        } else if (t->ndim == 4) {
            /* conv: Kaiming normal, fan_out, as torchvision's VGG */
            float sd = sqrtf(2.0f / (float)(t->shape[0] * t->shape[2] * t->shape[3]));
            for (size_t k = 0; k < t->numel; k++)
                p[k] = sd * nn_rng_normal(&rng);
        } else {
            /* linear and LSTM matrices: PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)) */
            float a = strncmp(t->name, "lstm.", 5) == 0 ? 1.0f / sqrtf((float)m->cfg.lstm_hidden)
                                                        : 1.0f / sqrtf((float)t->shape[1]);
            for (size_t k = 0; k < t->numel; k++)
                p[k] = a * (2.0f * nn_rng_uniform(&rng) - 1.0f);
            /* the bias right after a linear weight shares its bound */
            if (i + 1 < m->ntensors && strncmp(t->name, "lstm.", 5) != 0) {
                nn_tensor *b = &m->tensors[i + 1];
                float *bp = m->params + b->off;
                for (size_t k = 0; k < b->numel; k++)
                    bp[k] = a * (2.0f * nn_rng_uniform(&rng) - 1.0f);
                i++;
            }
        }
    }
}

static const char *resolve_arch(const char *arch)
{
    for (size_t i = 0; i < sizeof(preset_names) / sizeof(preset_names[0]); i++)
        if (strcmp(arch, preset_names[i]) == 0) return preset_specs[i];
    return arch;
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
    char hidden[16], dense[16], dd[32];
    snprintf(hidden, sizeof(hidden), "%d", m->cfg.lstm_hidden);
    snprintf(dense, sizeof(dense), "%d", m->cfg.dense);
    snprintf(dd, sizeof(dd), "%g", (double)m->cfg.dense_dropout);
    return nn_model_meta_set(m, "format", "ichtriage-lrcn-1") ||
           nn_model_meta_set(m, "arch", m->arch) || nn_model_meta_set(m, "lstm_hidden", hidden) ||
           nn_model_meta_set(m, "dense", dense) || nn_model_meta_set(m, "dense_dropout", dd);
}

nn_model *nn_model_create(const nn_config *c, char *err, size_t errlen)
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
    m->rng = c->seed ^ 0x5eed5eed5eed5eedULL;
    if (build_cnn(m, resolve_arch(c->arch), err, errlen) != 0 || build_lrcn(m) != 0) {
        if (err && !err[0]) nn_errf(err, errlen, "arch: too many layers or tensors");
        nn_model_free(m);
        return NULL;
    }
    if (m->nparams > NN_MAX_PARAMS) {
        nn_errf(err, errlen, "arch: %zu parameters, more than the %zu allowed", m->nparams,
                (size_t)NN_MAX_PARAMS);
        nn_model_free(m);
        return NULL;
    }
    layout_stack(&m->cnn, (size_t)c->in_c * c->in_h * c->in_w);
    layout_stack(&m->head, 2 * (size_t)c->lstm_hidden);
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
    init_weights(m);
    char seed[32], input[64], prov[96];
    snprintf(seed, sizeof(seed), "%llu", (unsigned long long)c->seed);
    snprintf(input, sizeof(input), "%dx%dx%d", c->in_c, c->in_h, c->in_w);
    snprintf(prov, sizeof(prov), "untrained: initialised by nn_model_create seed=%s", seed);
    if (nn_model_meta_set(m, "windows", "40/80,80/200,600/2800") ||
        nn_model_meta_set(m, "labels", c->labels == 6 ? default_labels : "") ||
        nn_model_meta_set(m, "thresholds", "0.5,0.5,0.5,0.5,0.5,0.5") ||
        nn_model_meta_set(m, "preprocessing",
                          "hu=stored*slope+intercept;window=clamp01;resize=area") ||
        nn_model_meta_set(m, "provenance", prov) || nn_model_meta_set(m, "input", input) ||
        set_arch_meta(m))
        goto oom;
    return m;
oom:
    nn_errf(err, errlen, "out of memory");
    nn_model_free(m);
    return NULL;
}

static void free_stack(nn_stack *st)
{
    free(st->cache);
    free(st->idx);
    free(st->pp[0]);
    free(st->pp[1]);
}

void nn_model_free(nn_model *m)
{
    if (!m) return;
    free_stack(&m->cnn);
    free_stack(&m->head);
    free(m->params);
    free(m->grads);
    free(m->adam_m);
    free(m->adam_v);
    free(m->buffers);
    free(m->stat);
    free(m->fold);
    free(m->col);
    free(m->pool_idx);
    nn_lrcn_free_workspace(m);
    free(m->len);
    for (int i = 0; i < m->nmeta; i++) {
        free(m->meta_k[i]);
        free(m->meta_v[i]);
    }
    free(m->arch);
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

float *nn_tensor_data(nn_model *m, int t)
{
    if (t < 0) return NULL;
    nn_tensor *x = &m->tensors[t];
    return x->is_buffer ? m->buffers + x->off : m->params + x->off;
}

float *nn_tensor_grad(nn_model *m, int t)
{
    if (t < 0 || m->tensors[t].frozen || m->tensors[t].is_buffer) return NULL;
    return m->grads + m->tensors[t].off;
}

int nn_model_tensor_count(const nn_model *m)
{
    return m->ntensors;
}

int nn_model_tensor(const nn_model *m, int i, nn_tensor_info *out)
{
    if (i < 0 || i >= m->ntensors) return NN_EINVAL;
    const nn_tensor *t = &m->tensors[i];
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
    memset(m->grads, 0, sizeof(float) * m->nparams);
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

/* ---- Adam ---------------------------------------------------------------- */

void nn_model_adam_step(nn_model *m, const nn_adam *a)
{
    m->adam_t++;
    float bc1 = 1.0f - powf(a->beta1, (float)m->adam_t);
    float bc2 = sqrtf(1.0f - powf(a->beta2, (float)m->adam_t));
    float step = a->lr / bc1;
    for (int i = 0; i < m->ntensors; i++) {
        nn_tensor *t = &m->tensors[i];
        if (t->is_buffer || t->frozen) continue;
        float *p = m->params + t->off, *g = m->grads + t->off;
        float *mm = m->adam_m + t->off, *vv = m->adam_v + t->off;
        for (size_t k = 0; k < t->numel; k++) {
            float gk = g[k];
            if (a->weight_decay != 0.0f) {
                if (a->decoupled)
                    p[k] *= 1.0f - a->lr * a->weight_decay;
                else
                    gk += a->weight_decay * p[k];
            }
            mm[k] = a->beta1 * mm[k] + (1.0f - a->beta1) * gk;
            vv[k] = a->beta2 * vv[k] + (1.0f - a->beta2) * gk * gk;
            p[k] -= step * mm[k] / (sqrtf(vv[k]) / bc2 + a->eps);
        }
    }
}

/* ---- weights I/O --------------------------------------------------------- */

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

nn_model *nn_model_load(const char *path, char *err, size_t errlen)
{
    if (err && errlen) err[0] = '\0';
    nn_st_file *f = nn_st_open(path, err, errlen);
    if (!f) return NULL;
    nn_model *m = NULL;
    nn_config c;
    nn_config_default(&c);
    c.arch = nn_st_meta(f, "arch");
    const char *input = nn_st_meta(f, "input"), *labels = nn_st_meta(f, "labels");
    const char *dd = nn_st_meta(f, "dense_dropout");
    if (!c.arch) {
        nn_errf(err, errlen, "%s: metadata has no 'arch'", path);
        goto out;
    }
    if (input && sscanf(input, "%dx%dx%d", &c.in_c, &c.in_h, &c.in_w) != 3) {
        nn_errf(err, errlen, "%s: metadata input='%.32s' is not CxHxW", path, input);
        goto out;
    }
    if (labels) c.labels = count_items(labels);
    if (dd) c.dense_dropout = strtof(dd, NULL);
    if (meta_int(f, "lstm_hidden", 100, 1, 4096, &c.lstm_hidden, err, errlen) ||
        meta_int(f, "dense", 100, 1, 65536, &c.dense, err, errlen))
        goto out;
    m = nn_model_create(&c, err, errlen);
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
        memcpy(nn_tensor_data(m, i), s->data, s->nbytes);
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
    return m;
}

int nn_model_save(const nn_model *m, const char *path, char *err, size_t errlen)
{
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

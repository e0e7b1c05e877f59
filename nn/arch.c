/* nn/arch.c: an LRCN's layers and tensor table from its architecture spec
 * (docs/model-format.md), the per-sample cache layout of each layer stack,
 * and PyTorch's default initialisation of the weights. */
#include "err.h"
#include "model_internal.h"

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

/* Features: cN / bN [kK][sS][pP], M[k], G, GM, F. */
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
    if (strcmp(tok, "GM") == 0) {
        /* AdaptiveMaxPool2d(1), Flatten: one max-pool window over the whole
         * map, so its argmax and backward are the max-pool layer's */
        if (*h != *w) {
            nn_errf(err, errlen, "arch: GM needs a square map, not %dx%d", *h, *w);
            return -1;
        }
        nn_layer *l = push_layer(st, NN_L_MAXPOOL, *c, *h, *w);
        if (!l) return -1;
        l->k = l->stride = *h;
        l->oh = l->ow = *h = *w = 1;
        *idx += 2;
        return 0;
    }
    if ((tok[0] == 'G' || tok[0] == 'F') && !*s) {
        nn_layer *l = push_layer(st, tok[0] == 'G' ? NN_L_GAP : NN_L_FLATTEN, *c, *h, *w);
        if (!l) return -1;
        if (tok[0] == 'F') {
            /* in 64 bits: c <= 65536 and a 4096x4096 input overflow an int */
            int64_t f = (int64_t)*c * *h * *w;
            if (f > 1 << 20) {
                nn_errf(err, errlen, "arch: F flattens %lld features, at most %d", (long long)f,
                        1 << 20);
                return -1;
            }
            l->inplace = st->n > 1;
            *c = (int)f;
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
        nn_errf(err, errlen,
                "arch: the features must end with G or GM (global pool) or F (flatten)");
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

void nn_arch_init_weights(nn_model *m)
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

int nn_arch_build(nn_model *m, char *err, size_t errlen)
{
    if (build_cnn(m, resolve_arch(m->cfg.arch), err, errlen) != 0 || build_lrcn(m) != 0) {
        if (err && !err[0]) nn_errf(err, errlen, "arch: too many layers or tensors");
        return NN_EINVAL;
    }
    layout_stack(&m->cnn, (size_t)m->cfg.in_c * m->cfg.in_h * m->cfg.in_w);
    layout_stack(&m->head, 2 * (size_t)m->cfg.lstm_hidden);
    return 0;
}

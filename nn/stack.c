/* nn/stack.c: forward and backward through a sequential stack of layers (the
 * CNN, the per-step dense head), with the workspaces they reuse. */
#include "model_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define BN_MOMENTUM 0.1f
#define BN_EPS 1e-5f

/* Grows *p (backend memory) to n elements of size sz; contents are not kept. */
static int grow(nn_model *m, void *p, size_t n, size_t sz)
{
    void **pp = p;
    m->be->dealloc(m->bctx, *pp);
    *pp = m->be->alloc(m->bctx, n ? n * sz : sz);
    return *pp ? 0 : NN_ENOMEM;
}

int nn_stack_reserve(nn_model *m, nn_stack *st, int n, int cache)
{
    if (n > st->pp_cap) {
        st->pp_cap = 0;
        if (grow(m, &st->pp[0], st->max_act * n, sizeof(float)) ||
            grow(m, &st->pp[1], st->max_act * n, sizeof(float)))
            return NN_ENOMEM;
        st->pp_cap = n;
    }
    if (st == &m->cnn && n > m->col_cap) {
        size_t col = 1;
        for (int i = 0; i < st->n; i++)
            if (st->layers[i].kind == NN_L_CONV) {
                size_t c = m->be->conv2d_col_size(&st->layers[i].conv, n);
                if (c > col) col = c;
            }
        m->col_cap = 0;
        if (grow(m, &m->col, col, sizeof(float)) ||
            grow(m, &m->pool_idx, st->max_act * n, sizeof(int32_t)))
            return NN_ENOMEM;
        m->col_cap = n;
    }
    if (!cache || n <= st->cap) return 0;
    st->cap = 0;
    if (grow(m, &st->cache, st->act_total * n, sizeof(float)) ||
        grow(m, &st->idx, st->idx_total * n, sizeof(int32_t)))
        return NN_ENOMEM;
    st->cap = n;
    return 0;
}

static size_t out_size(const nn_layer *l)
{
    return (size_t)l->oc * l->oh * l->ow;
}

static int bn_uses_batch(const nn_model *m, const nn_layer *l, int training)
{
    return training && !m->tensors[l->wt].frozen;
}

/* w2 [oc, k] and b2 [oc] <- conv weights w, bias b (may be NULL) scaled and
 * shifted by the eval-mode batch-norm bn that follows the convolution. */
static void fold_bn(float *w2, float *b2, const float *w, const float *b, nn_model *m,
                    const nn_layer *bn, size_t k)
{
    const float *g = nn_tensor_data(m, bn->wt), *beta = nn_tensor_data(m, bn->bt);
    const float *rm = nn_tensor_data(m, bn->rm), *rv = nn_tensor_data(m, bn->rv);
    for (int o = 0; o < bn->c; o++) {
        float scale = g[o] / sqrtf(rv[o] + BN_EPS);
        for (size_t j = 0; j < k; j++)
            w2[o * k + j] = w[o * k + j] * scale;
        b2[o] = ((b ? b[o] : 0.0f) - rm[o]) * scale + beta[o];
    }
}

const float *nn_stack_forward(nn_model *m, nn_stack *st, const float *in, int n, int end, int cache,
                              int training)
{
    const nn_backend *be = m->be;
    void *c = m->bctx;
    const float *cur = in;
    training = training && cache;
    for (int i = 0; i < end; i++) {
        nn_layer *l = &st->layers[i];
        size_t sz = (size_t)n * out_size(l);
        float *out;
        if (cache)
            out = st->cache + (size_t)n * l->act;
        else if (l->inplace)
            out = (float *)cur;
        else
            out = cur == st->pp[0] ? st->pp[1] : st->pp[0];
        const float *w = nn_tensor_data(m, l->wt), *b = nn_tensor_data(m, l->bt);
        switch (l->kind) {
        case NN_L_CONV:
            if (m->be->fold_bn && !cache && i + 1 < end && st->layers[i + 1].kind == NN_L_BN) {
                /* eval: the batch-norm folds into the convolution, one pass instead of two;
                 * the conv writes the batch-norm's output and the loop skips that layer */
                size_t wn = (size_t)l->oc * l->c * l->conv.kh * l->conv.kw;
                fold_bn(m->fold, m->fold + wn, w, b, m, &st->layers[i + 1], wn / l->oc);
                m->be->conv2d_forward(m->bctx, out, m->col, cur, m->fold, m->fold + wn, n,
                                      &l->conv);
                i++;
                break;
            }
            be->conv2d_forward(c, out, m->col, cur, w, b, n, &l->conv);
            break;
        case NN_L_BN: {
            float *mean = m->stat + l->stat;
            be->batchnorm_forward(c, out, mean, mean + l->c, nn_tensor_data(m, l->rm),
                                  nn_tensor_data(m, l->rv), cur, w, b, n, l->c, l->h * l->w,
                                  bn_uses_batch(m, l, training), BN_MOMENTUM, BN_EPS);
            break;
        }
        case NN_L_RELU:
            be->relu_forward(c, out, cur, sz);
            break;
        case NN_L_MAXPOOL:
            be->maxpool_forward(c, out, cache ? st->idx + (size_t)n * l->aux : m->pool_idx, cur, n,
                                l->c, l->h, l->w, l->k, l->stride);
            break;
        case NN_L_GAP:
            be->gap_forward(c, out, cur, n, l->c, l->h * l->w);
            break;
        case NN_L_FLATTEN:
            if (out != cur) be->copy(c, out, cur, sizeof(float) * sz);
            break;
        case NN_L_LINEAR:
            be->linear_forward(c, out, cur, w, b, n, l->c, l->oc);
            break;
        case NN_L_DROPOUT:
            if (cache)
                be->dropout_forward(c, out, st->cache + (size_t)n * l->aux, cur, sz,
                                    training ? l->p : 0.0f, &m->rng);
            else if (out != cur)
                be->copy(c, out, cur, sizeof(float) * sz);
            break;
        }
        cur = out;
    }
    if (cache) {
        st->cached_n = n;
        st->cached_end = end;
        st->cached_in = in;
        st->cached_training = training;
    }
    return cur;
}

static int layer_trainable(const nn_model *m, const nn_layer *l)
{
    return (l->wt >= 0 && !m->tensors[l->wt].frozen) || (l->bt >= 0 && !m->tensors[l->bt].frozen);
}

void nn_stack_backward(nn_model *m, nn_stack *st, const float *dout, float *dx)
{
    nn_stack_backward_at(m, st, dout, dx, -1, NULL);
}

void nn_stack_backward_at(nn_model *m, nn_stack *st, const float *dout, float *dx, int at,
                          const float *dextra)
{
    const nn_backend *be = m->be;
    void *c = m->bctx;
    int n = st->cached_n, end = st->cached_end, stop = 0;
    if (!dx) {
        while (stop < end && !layer_trainable(m, &st->layers[stop]))
            stop++;
        if (stop == end) return;
    }
    const float *g = dout;
    for (int i = end - 1; i >= stop; i--) {
        nn_layer *l = &st->layers[i];
        const float *in = i == 0 ? st->cached_in : st->cache + (size_t)n * st->layers[i - 1].act;
        const float *out = st->cache + (size_t)n * l->act;
        size_t in_sz = (size_t)n * l->c * l->h * l->w, sz = (size_t)n * out_size(l);
        float *gin = NULL;
        if (i == 0) {
            gin = dx;
        } else if (i > stop) {
            gin = g == st->pp[0] ? st->pp[1] : st->pp[0];
            be->zero(c, gin, sizeof(float) * in_sz);
        }
        const float *w = nn_tensor_data(m, l->wt);
        float *dw = nn_tensor_grad(m, l->wt), *db = nn_tensor_grad(m, l->bt);
        switch (l->kind) {
        case NN_L_CONV:
            be->conv2d_backward(c, gin, dw, db, m->col, g, in, w, n, &l->conv);
            break;
        case NN_L_BN: {
            const float *mean = m->stat + l->stat;
            int batch = st->cached_training && !m->tensors[l->wt].frozen;
            be->batchnorm_backward(c, gin, dw, db, g, in, mean, mean + l->c, w, n, l->c,
                                   l->h * l->w, batch, BN_EPS);
            break;
        }
        case NN_L_RELU:
            if (gin) be->relu_backward(c, gin, g, out, sz);
            break;
        case NN_L_MAXPOOL:
            if (gin)
                be->maxpool_backward(c, gin, g, st->idx + (size_t)n * l->aux, n, l->c, l->h, l->w,
                                     l->k, l->stride);
            break;
        case NN_L_GAP:
            if (gin) be->gap_backward(c, gin, g, n, l->c, l->h * l->w);
            break;
        case NN_L_FLATTEN:
            if (gin) be->add(c, gin, g, sz);
            break;
        case NN_L_LINEAR:
            be->linear_backward(c, gin, dw, db, g, in, w, n, l->c, l->oc);
            break;
        case NN_L_DROPOUT:
            if (gin) be->dropout_backward(c, gin, g, st->cache + (size_t)n * l->aux, sz);
            break;
        }
        /* a second loss on this layer's input: its gradient joins the one from above */
        if (i == at && gin && dextra) be->add(c, gin, dextra, in_sz);
        g = gin;
    }
}

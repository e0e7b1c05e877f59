/* nn/lrcn.c: the model-level passes: CNN features and stage-1 logits, and
 * the LRCN (CNN per slice, BiLSTM across the slices of each series, dense
 * head per step) for inference and training. */
#include "model_internal.h"

#include <stdlib.h>
#include <string.h>

static int sum_lengths(const int *len, int S)
{
    if (!len || S < 1) return -1;
    long n = 0;
    for (int s = 0; s < S; s++) {
        if (len[s] < 1 || len[s] > NN_MAX_SERIES_LEN) return -1;
        n += len[s];
    }
    return n > (1 << 24) ? -1 : (int)n;
}

void nn_lrcn_free_workspace(nn_model *m)
{
    void *c = m->bctx;
    m->lcap = 0;
    m->be->dealloc(c, m->feat);
    m->be->dealloc(c, m->dfeat);
    m->be->dealloc(c, m->lstm_out);
    m->be->dealloc(c, m->dlstm_out);
    m->be->dealloc(c, m->lstm_cache);
    m->be->dealloc(c, m->lstm_work);
    m->feat = m->dfeat = m->lstm_out = m->dlstm_out = m->lstm_cache = m->lstm_work = NULL;
}

static int reserve_lrcn(nn_model *m, int N, int S)
{
    int F = m->feat_size, H = m->cfg.lstm_hidden;
    if (S > m->len_cap) {
        int cap = S < 64 ? 64 : S; /* series per batch rarely grow past this */
        free(m->len);
        m->len = malloc(sizeof(int) * cap);
        m->len_cap = m->len ? cap : 0;
        if (!m->len) return NN_ENOMEM;
    }
    if (N <= m->lcap) return 0;
    nn_lrcn_free_workspace(m);
    const nn_backend *be = m->be;
    void *c = m->bctx;
    m->feat = be->alloc(c, sizeof(float) * N * F);
    m->dfeat = be->alloc(c, sizeof(float) * N * F);
    m->lstm_out = be->alloc(c, sizeof(float) * N * 2 * H);
    m->dlstm_out = be->alloc(c, sizeof(float) * N * 2 * H);
    m->lstm_cache = be->alloc(c, sizeof(float) * be->lstm_cache_size(N, H));
    m->lstm_work = be->alloc(c, sizeof(float) * be->lstm_work_size(N, H));
    if (!m->feat || !m->dfeat || !m->lstm_out || !m->dlstm_out || !m->lstm_cache || !m->lstm_work)
        return NN_ENOMEM;
    m->lcap = N;
    return 0;
}

/* Grows *buf (backend memory) to hold n floats; contents are not kept.
 * Returns 0, or NN_ENOMEM. */
static int reserve(nn_model *m, float **buf, size_t *cap, size_t n)
{
    if (n <= *cap) return 0;
    m->be->dealloc(m->bctx, *buf);
    *buf = m->be->alloc(m->bctx, sizeof(float) * n);
    *cap = *buf ? n : 0;
    return *buf ? 0 : NN_ENOMEM;
}

/* Host floats into the backend: the pointer itself on the CPU, else a copy
 * in *buf (grown to n floats). NULL when out of memory. */
static const float *stage(nn_model *m, float **buf, size_t *cap, const float *host, size_t n)
{
    if (m->be == nn_backend_cpu()) return host;
    if (reserve(m, buf, cap, n) != 0) return NULL;
    m->be->upload(m->bctx, *buf, host, sizeof(float) * n);
    return *buf;
}

/* A public call's result: rc, or NN_EIO when the backend failed meanwhile. */
static int done(nn_model *m, int rc)
{
    return rc == 0 ? nn_model_be_check(m) : rc;
}

static nn_lstm_params lstm_params(nn_model *m)
{
    nn_lstm_params p;
    for (int d = 0; d < 2; d++) {
        p.wih[d] = nn_tensor_data(m, m->lstm_t[d][0]);
        p.whh[d] = nn_tensor_data(m, m->lstm_t[d][1]);
        p.bih[d] = nn_tensor_data(m, m->lstm_t[d][2]);
        p.bhh[d] = nn_tensor_data(m, m->lstm_t[d][3]);
    }
    return p;
}

/* Eval-mode CNN layers [0, end) in chunks of NN_INFER_BATCH slices; y is
 * host memory, or backend memory when y_be. */
static int cnn_eval(nn_model *m, const float *x, int n, int end, float *y, size_t ysize, int y_be)
{
    if (n < 0) return NN_EINVAL;
    size_t in = m->cnn.in_size;
    for (int b = 0; b < n; b += NN_INFER_BATCH) {
        int k = n - b < NN_INFER_BATCH ? n - b : NN_INFER_BATCH;
        if (nn_stack_reserve(m, &m->cnn, k, 0) != 0) return NN_ENOMEM;
        const float *xb = stage(m, &m->xin, &m->xin_cap, x + b * in, k * in);
        if (!xb) return NN_ENOMEM;
        const float *out = nn_stack_forward(m, &m->cnn, xb, k, end, 0, 0);
        size_t bytes = sizeof(float) * k * ysize;
        if (y_be)
            m->be->copy(m->bctx, y + b * ysize, out, bytes);
        else
            m->be->download(m->bctx, y + b * ysize, out, bytes);
    }
    return 0;
}

int nn_cnn_features(nn_model *m, const float *x, int n, float *feat)
{
    return done(m, cnn_eval(m, x, n, m->feat_end, feat, (size_t)m->feat_size, 0));
}

int nn_cnn_predict(nn_model *m, const float *x, int n, float *logits)
{
    return done(m, cnn_eval(m, x, n, m->cnn.n, logits, (size_t)m->cfg.labels, 0));
}

int nn_cnn_forward(nn_model *m, const float *x, int n, float *logits)
{
    if (n < 1) return NN_EINVAL;
    if (nn_stack_reserve(m, &m->cnn, n, 1) != 0) return NN_ENOMEM;
    const float *xb = stage(m, &m->xin, &m->xin_cap, x, (size_t)n * m->cnn.in_size);
    if (!xb) return NN_ENOMEM;
    const float *out = nn_stack_forward(m, &m->cnn, xb, n, m->cnn.n, 1, m->training);
    m->be->download(m->bctx, logits, out, sizeof(float) * n * m->cfg.labels);
    return done(m, 0);
}

int nn_cnn_backward(nn_model *m, const float *dlogits)
{
    if (m->cnn.cached_n < 1 || m->cnn.cached_end != m->cnn.n) return NN_EINVAL;
    const float *g =
        stage(m, &m->din, &m->din_cap, dlogits, (size_t)m->cnn.cached_n * m->cfg.labels);
    if (!g) return NN_ENOMEM;
    nn_stack_backward(m, &m->cnn, g, NULL);
    return done(m, 0);
}

/* The global pool that ends the features (G or GM): its index, or -1. */
static int map_layer(const nn_model *m)
{
    for (int i = 0; i < m->feat_end; i++) {
        const nn_layer *l = &m->cnn.layers[i];
        if ((l->kind == NN_L_GAP || l->kind == NN_L_MAXPOOL) && l->oh == 1 && l->ow == 1 &&
            l->h * l->w > 1 && i > 0)
            return i;
    }
    return -1;
}

int nn_cnn_map_shape(const nn_model *m, int *c, int *h, int *w)
{
    int i = map_layer(m);
    if (i < 0) return NN_EINVAL;
    const nn_layer *l = &m->cnn.layers[i];
    *c = l->c, *h = l->h, *w = l->w;
    return 0;
}

int nn_cnn_map(nn_model *m, float *map)
{
    int i = map_layer(m);
    if (i < 0 || m->cnn.cached_n < 1 || m->cnn.cached_end != m->cnn.n) return NN_EINVAL;
    const nn_layer *l = &m->cnn.layers[i];
    int n = m->cnn.cached_n;
    const float *in = m->cnn.cache + (size_t)n * m->cnn.layers[i - 1].act;
    m->be->download(m->bctx, map, in, sizeof(float) * (size_t)n * l->c * l->h * l->w);
    return done(m, 0);
}

int nn_cnn_backward_map(nn_model *m, const float *dlogits, const float *dmap)
{
    int i = map_layer(m);
    if (i < 0 || m->cnn.cached_n < 1 || m->cnn.cached_end != m->cnn.n) return NN_EINVAL;
    const nn_layer *l = &m->cnn.layers[i];
    size_t n = (size_t)m->cnn.cached_n;
    size_t nl = n * m->cfg.labels, nm = n * l->c * l->h * l->w;
    const float *g = dlogits;
    if (m->be != nn_backend_cpu()) {
        /* both staged at once: din holds the logits' gradient, then the map's */
        if (reserve(m, &m->din, &m->din_cap, nl + nm) != 0) return NN_ENOMEM;
        m->be->upload(m->bctx, m->din, dlogits, sizeof(float) * nl);
        m->be->upload(m->bctx, m->din + nl, dmap, sizeof(float) * nm);
        g = m->din;
        dmap = m->din + nl;
    }
    nn_stack_backward_at(m, &m->cnn, g, NULL, i, dmap);
    return done(m, 0);
}

/* LSTM and head over features [N, F] in backend memory (kept until backward). */
static int lrcn_tail(nn_model *m, const float *feat, int N, const int *len, int S, float *logits,
                     int training)
{
    int H = m->cfg.lstm_hidden;
    nn_lstm_params p = lstm_params(m);
    m->be->lstm_forward(m->bctx, m->lstm_out, m->lstm_cache, feat, &p, len, S, m->feat_size, H);
    if (nn_stack_reserve(m, &m->head, N, 1) != 0) return NN_ENOMEM;
    const float *out = nn_stack_forward(m, &m->head, m->lstm_out, N, m->head.n, 1, training);
    m->be->download(m->bctx, logits, out, sizeof(float) * N * m->cfg.labels);
    memcpy(m->len, len, sizeof(int) * S);
    m->nseries = S;
    m->lrcn_n = N;
    m->lrcn_feat = feat;
    return 0;
}

int nn_lrcn_predict(nn_model *m, const float *x, const int *lengths, int nseries, float *prob)
{
    int N = sum_lengths(lengths, nseries);
    if (N < 0) return NN_EINVAL;
    if (reserve_lrcn(m, N, nseries) != 0) return NN_ENOMEM;
    int rc = cnn_eval(m, x, N, m->feat_end, m->feat, (size_t)m->feat_size, 1);
    m->lrcn_cnn_grad = 0;
    if (rc == 0) rc = lrcn_tail(m, m->feat, N, lengths, nseries, prob, 0);
    if (rc == 0) nn_sigmoid_forward(prob, prob, (size_t)N * m->cfg.labels);
    m->lrcn_n = 0; /* nothing here for nn_lrcn_backward */
    return done(m, rc);
}

static int cnn_features_trainable(const nn_model *m)
{
    for (int i = 0; i < m->feat_end; i++) {
        const nn_layer *l = &m->cnn.layers[i];
        if ((l->wt >= 0 && !m->tensors[l->wt].frozen) || (l->bt >= 0 && !m->tensors[l->bt].frozen))
            return 1;
    }
    return 0;
}

int nn_lrcn_forward(nn_model *m, const float *x, const int *lengths, int nseries, float *logits)
{
    int N = sum_lengths(lengths, nseries);
    if (N < 0) return NN_EINVAL;
    if (reserve_lrcn(m, N, nseries) != 0) return NN_ENOMEM;
    const float *feat = m->feat;
    m->lrcn_cnn_grad = cnn_features_trainable(m);
    if (m->lrcn_cnn_grad) {
        if (nn_stack_reserve(m, &m->cnn, N, 1) != 0) return NN_ENOMEM;
        const float *xb = stage(m, &m->xin, &m->xin_cap, x, (size_t)N * m->cnn.in_size);
        if (!xb) return NN_ENOMEM;
        feat = nn_stack_forward(m, &m->cnn, xb, N, m->feat_end, 1, m->training);
    } else if (cnn_eval(m, x, N, m->feat_end, m->feat, (size_t)m->feat_size, 1) != 0) {
        return NN_ENOMEM;
    }
    return done(m, lrcn_tail(m, feat, N, lengths, nseries, logits, m->training));
}

int nn_lrcn_forward_features(nn_model *m, const float *feat, const int *lengths, int nseries,
                             float *logits)
{
    int N = sum_lengths(lengths, nseries);
    if (N < 0) return NN_EINVAL;
    if (reserve_lrcn(m, N, nseries) != 0) return NN_ENOMEM;
    m->be->upload(m->bctx, m->feat, feat, sizeof(float) * N * m->feat_size);
    m->lrcn_cnn_grad = 0;
    return done(m, lrcn_tail(m, m->feat, N, lengths, nseries, logits, m->training));
}

int nn_lrcn_backward(nn_model *m, const float *dlogits)
{
    int N = m->lrcn_n, H = m->cfg.lstm_hidden, F = m->feat_size;
    if (N < 1) return NN_EINVAL;
    const nn_backend *be = m->be;
    void *c = m->bctx;
    const float *g = stage(m, &m->din, &m->din_cap, dlogits, (size_t)N * m->cfg.labels);
    if (!g) return NN_ENOMEM;
    be->zero(c, m->dlstm_out, sizeof(float) * N * 2 * H);
    nn_stack_backward(m, &m->head, g, m->dlstm_out);
    nn_lstm_params p = lstm_params(m);
    nn_lstm_grads gr;
    for (int d = 0; d < 2; d++) {
        gr.wih[d] = nn_tensor_grad(m, m->lstm_t[d][0]);
        gr.whh[d] = nn_tensor_grad(m, m->lstm_t[d][1]);
        gr.bih[d] = nn_tensor_grad(m, m->lstm_t[d][2]);
        gr.bhh[d] = nn_tensor_grad(m, m->lstm_t[d][3]);
    }
    float *dx = m->lrcn_cnn_grad ? m->dfeat : NULL;
    if (dx) be->zero(c, dx, sizeof(float) * N * F);
    be->lstm_backward(c, dx, &gr, m->lstm_work, m->dlstm_out, m->lstm_cache, m->lrcn_feat, &p,
                      m->len, m->nseries, F, H);
    if (dx) nn_stack_backward(m, &m->cnn, dx, NULL);
    return done(m, 0);
}

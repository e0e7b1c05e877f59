/* nn/lrcn.c: the model-level passes: CNN features and stage-1 logits, and
 * the LRCN (CNN per slice, BiLSTM across the slices of each series, dense
 * head per step) for inference and training. */
#include "model_internal.h"

#include <stdlib.h>
#include <string.h>

/* Slices per CNN call at inference: bounds the workspaces for 1000-slice series. */
#define NN_INFER_BATCH 32

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
    m->lcap = 0;
    free(m->feat);
    free(m->dfeat);
    free(m->lstm_out);
    free(m->dlstm_out);
    free(m->lstm_cache);
    free(m->lstm_work);
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
    m->feat = malloc(sizeof(float) * N * F);
    m->dfeat = malloc(sizeof(float) * N * F);
    m->lstm_out = malloc(sizeof(float) * N * 2 * H);
    m->dlstm_out = malloc(sizeof(float) * N * 2 * H);
    m->lstm_cache = malloc(sizeof(float) * nn_lstm_cache_size(N, H));
    m->lstm_work = malloc(sizeof(float) * nn_lstm_work_size(N, H));
    if (!m->feat || !m->dfeat || !m->lstm_out || !m->dlstm_out || !m->lstm_cache || !m->lstm_work)
        return NN_ENOMEM;
    m->lcap = N;
    return 0;
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

/* Eval-mode CNN layers [0, end) in chunks of NN_INFER_BATCH slices. */
static int cnn_eval(nn_model *m, const float *x, int n, int end, float *y, size_t ysize)
{
    if (n < 0) return NN_EINVAL;
    size_t in = m->cnn.in_size;
    for (int b = 0; b < n; b += NN_INFER_BATCH) {
        int k = n - b < NN_INFER_BATCH ? n - b : NN_INFER_BATCH;
        if (nn_stack_reserve(m, &m->cnn, k, 0) != 0) return NN_ENOMEM;
        const float *out = nn_stack_forward(m, &m->cnn, x + b * in, k, end, 0, 0);
        memcpy(y + b * ysize, out, sizeof(float) * k * ysize);
    }
    return 0;
}

int nn_cnn_features(nn_model *m, const float *x, int n, float *feat)
{
    return cnn_eval(m, x, n, m->feat_end, feat, (size_t)m->feat_size);
}

int nn_cnn_predict(nn_model *m, const float *x, int n, float *logits)
{
    return cnn_eval(m, x, n, m->cnn.n, logits, (size_t)m->cfg.labels);
}

int nn_cnn_forward(nn_model *m, const float *x, int n, float *logits)
{
    if (n < 1) return NN_EINVAL;
    if (nn_stack_reserve(m, &m->cnn, n, 1) != 0) return NN_ENOMEM;
    const float *out = nn_stack_forward(m, &m->cnn, x, n, m->cnn.n, 1, m->training);
    memcpy(logits, out, sizeof(float) * n * m->cfg.labels);
    return 0;
}

int nn_cnn_backward(nn_model *m, const float *dlogits)
{
    if (m->cnn.cached_n < 1 || m->cnn.cached_end != m->cnn.n) return NN_EINVAL;
    nn_stack_backward(m, &m->cnn, dlogits, NULL);
    return 0;
}

/* LSTM and head over features [N, F] (kept until backward). */
static int lrcn_tail(nn_model *m, const float *feat, int N, const int *len, int S, float *logits,
                     int training)
{
    int H = m->cfg.lstm_hidden;
    nn_lstm_params p = lstm_params(m);
    nn_lstm_forward(m->lstm_out, m->lstm_cache, feat, &p, len, S, m->feat_size, H);
    if (nn_stack_reserve(m, &m->head, N, 1) != 0) return NN_ENOMEM;
    const float *out = nn_stack_forward(m, &m->head, m->lstm_out, N, m->head.n, 1, training);
    memcpy(logits, out, sizeof(float) * N * m->cfg.labels);
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
    int rc = nn_cnn_features(m, x, N, m->feat);
    m->lrcn_cnn_grad = 0;
    if (rc == 0) rc = lrcn_tail(m, m->feat, N, lengths, nseries, prob, 0);
    if (rc == 0) nn_sigmoid_forward(prob, prob, (size_t)N * m->cfg.labels);
    m->lrcn_n = 0; /* nothing here for nn_lrcn_backward */
    return rc;
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
        feat = nn_stack_forward(m, &m->cnn, x, N, m->feat_end, 1, m->training);
    } else if (nn_cnn_features(m, x, N, m->feat) != 0) {
        return NN_ENOMEM;
    }
    return lrcn_tail(m, feat, N, lengths, nseries, logits, m->training);
}

int nn_lrcn_forward_features(nn_model *m, const float *feat, const int *lengths, int nseries,
                             float *logits)
{
    int N = sum_lengths(lengths, nseries);
    if (N < 0) return NN_EINVAL;
    if (reserve_lrcn(m, N, nseries) != 0) return NN_ENOMEM;
    memcpy(m->feat, feat, sizeof(float) * N * m->feat_size);
    m->lrcn_cnn_grad = 0;
    return lrcn_tail(m, m->feat, N, lengths, nseries, logits, m->training);
}

int nn_lrcn_backward(nn_model *m, const float *dlogits)
{
    int N = m->lrcn_n, H = m->cfg.lstm_hidden, F = m->feat_size;
    if (N < 1) return NN_EINVAL;
    memset(m->dlstm_out, 0, sizeof(float) * N * 2 * H);
    nn_stack_backward(m, &m->head, dlogits, m->dlstm_out);
    nn_lstm_params p = lstm_params(m);
    nn_lstm_grads g;
    for (int d = 0; d < 2; d++) {
        g.wih[d] = nn_tensor_grad(m, m->lstm_t[d][0]);
        g.whh[d] = nn_tensor_grad(m, m->lstm_t[d][1]);
        g.bih[d] = nn_tensor_grad(m, m->lstm_t[d][2]);
        g.bhh[d] = nn_tensor_grad(m, m->lstm_t[d][3]);
    }
    float *dx = m->lrcn_cnn_grad ? m->dfeat : NULL;
    if (dx) memset(dx, 0, sizeof(float) * N * F);
    nn_lstm_backward(dx, &g, m->lstm_work, m->dlstm_out, m->lstm_cache, m->lrcn_feat, &p, m->len,
                     m->nseries, F, H);
    if (dx) nn_stack_backward(m, &m->cnn, dx, NULL);
    return 0;
}

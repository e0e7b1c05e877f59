/* nn/lstm.c: bidirectional LSTM over packed variable-length sequences.
 *
 * The input projection of every step of every sequence is one GEMM; only the
 * recurrent part (h * W_hh^T, a GEMV per step) runs step by step. Cache per
 * direction: activated gates [N, 4H] (i, f, g, o), cell [N, H], hidden [N, H]. */
#include "layers.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

size_t nn_lstm_cache_size(int N, int H)
{
    return (size_t)2 * N * 6 * H;
}

size_t nn_lstm_work_size(int N, int H)
{
    return (size_t)N * 5 * H + 3 * (size_t)H;
}

static float sigm(float x)
{
    return 1.0f / (1.0f + expf(-x));
}

/* Row of step k (0-based in processing order) of a sequence at off, len. */
static int step_row(int d, int off, int len, int k)
{
    return d == 0 ? off + k : off + len - 1 - k;
}

void nn_lstm_forward(float *out, float *cache, const float *x, const nn_lstm_params *p,
                     const int *len, int S, int F, int H)
{
    int N = 0;
    for (int s = 0; s < S; s++)
        N += len[s];
    int G = 4 * H;
    for (int d = 0; d < 2; d++) {
        float *gates = cache + (size_t)d * N * 6 * H;
        float *cell = gates + (size_t)N * G;
        float *hid = cell + (size_t)N * H;
        for (int r = 0; r < N; r++)
            for (int j = 0; j < G; j++)
                gates[(size_t)r * G + j] = p->bih[d][j] + p->bhh[d][j];
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, G, F, 1.0f, x, F, p->wih[d], F,
                    1.0f, gates, G);
        int off = 0;
        for (int s = 0; s < S; s++) {
            for (int k = 0; k < len[s]; k++) {
                int r = step_row(d, off, len[s], k);
                int rp = k > 0 ? step_row(d, off, len[s], k - 1) : -1;
                float *g = gates + (size_t)r * G;
                if (rp >= 0)
                    cblas_sgemv(CblasRowMajor, CblasNoTrans, G, H, 1.0f, p->whh[d], H,
                                hid + (size_t)rp * H, 1, 1.0f, g, 1);
                for (int j = 0; j < H; j++) {
                    float gi = sigm(g[j]), gf = sigm(g[H + j]);
                    float gg = tanhf(g[2 * H + j]), go = sigm(g[3 * H + j]);
                    g[j] = gi;
                    g[H + j] = gf;
                    g[2 * H + j] = gg;
                    g[3 * H + j] = go;
                    float cp = rp >= 0 ? cell[(size_t)rp * H + j] : 0.0f;
                    float c = gf * cp + gi * gg;
                    float h = go * tanhf(c);
                    cell[(size_t)r * H + j] = c;
                    hid[(size_t)r * H + j] = h;
                    out[(size_t)r * 2 * H + d * H + j] = h;
                }
            }
            off += len[s];
        }
    }
}

void nn_lstm_backward(float *dx, const nn_lstm_grads *gr, float *work, const float *dout,
                      const float *cache, const float *x, const nn_lstm_params *p, const int *len,
                      int S, int F, int H)
{
    int N = 0;
    for (int s = 0; s < S; s++)
        N += len[s];
    int G = 4 * H;
    float *dG = work;                       /* [N, 4H] */
    float *hprev = dG + (size_t)N * G;      /* [N, H] */
    float *dh_next = hprev + (size_t)N * H; /* [H] */
    float *dc_next = dh_next + H;           /* [H] */
    float *dh = dc_next + H;                /* [H] */
    for (int d = 0; d < 2; d++) {
        const float *gates = cache + (size_t)d * N * 6 * H;
        const float *cell = gates + (size_t)N * G;
        const float *hid = cell + (size_t)N * H;
        int off = 0;
        for (int s = 0; s < S; s++) {
            memset(dh_next, 0, sizeof(float) * H);
            memset(dc_next, 0, sizeof(float) * H);
            for (int k = len[s] - 1; k >= 0; k--) {
                int r = step_row(d, off, len[s], k);
                int rp = k > 0 ? step_row(d, off, len[s], k - 1) : -1;
                const float *g = gates + (size_t)r * G;
                float *dg = dG + (size_t)r * G;
                for (int j = 0; j < H; j++) {
                    float gi = g[j], gf = g[H + j], gg = g[2 * H + j], go = g[3 * H + j];
                    float tc = tanhf(cell[(size_t)r * H + j]);
                    float cp = rp >= 0 ? cell[(size_t)rp * H + j] : 0.0f;
                    float dhj = dout[(size_t)r * 2 * H + d * H + j] + dh_next[j];
                    float dc = dhj * go * (1.0f - tc * tc) + dc_next[j];
                    dg[j] = dc * gg * gi * (1.0f - gi);
                    dg[H + j] = dc * cp * gf * (1.0f - gf);
                    dg[2 * H + j] = dc * gi * (1.0f - gg * gg);
                    dg[3 * H + j] = dhj * tc * go * (1.0f - go);
                    dc_next[j] = dc * gf;
                    hprev[(size_t)r * H + j] = rp >= 0 ? hid[(size_t)rp * H + j] : 0.0f;
                }
                if (rp >= 0) {
                    cblas_sgemv(CblasRowMajor, CblasTrans, G, H, 1.0f, p->whh[d], H, dg, 1, 0.0f,
                                dh, 1);
                    memcpy(dh_next, dh, sizeof(float) * H);
                }
            }
            off += len[s];
        }
        if (gr->whh[d])
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, G, H, N, 1.0f, dG, G, hprev, H,
                        1.0f, gr->whh[d], H);
        if (gr->wih[d])
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, G, F, N, 1.0f, dG, G, x, F, 1.0f,
                        gr->wih[d], F);
        for (int r = 0; r < N; r++)
            for (int j = 0; j < G; j++) {
                float v = dG[(size_t)r * G + j];
                if (gr->bih[d]) gr->bih[d][j] += v;
                if (gr->bhh[d]) gr->bhh[d][j] += v;
            }
        if (dx)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, F, G, 1.0f, dG, G, p->wih[d],
                        F, 1.0f, dx, F);
    }
}

/* nn/layers.c: the element-wise and small layers (pooling, ReLU, batch-norm,
 * linear, dropout, global average pool, sigmoid, BCE loss) and the random
 * numbers they draw. Convolution is in conv.c, the LSTM in lstm.c. */
#include "layers.h"
#include "pool.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

/* ---- max-pool ---------------------------------------------------------- */
/* A NaN wins every comparison, as in PyTorch: an overflow upstream must
 * reach the output, where triage fails the series, not vanish into a
 * plausible maximum. */
static inline int pool_wins(float v, float best)
{
    return v > best || v != v;
}

/* The VGG case, 2x2 windows with stride 2, over P planes of H x W. */
static void maxpool2x2(float *out, int32_t *idx, const float *in, int P, int H, int W)
{
    int OH = H / 2, OW = W / 2;
    for (size_t p = 0; p < (size_t)P; p++) {
        const float *src = in + p * H * W;
        float *dst = out + p * OH * OW;
        int32_t *arg = idx ? idx + p * OH * OW : NULL;
        for (int oy = 0; oy < OH; oy++) {
            const float *r0 = src + (2 * oy) * W, *r1 = r0 + W;
            for (int ox = 0; ox < OW; ox++) {
                float a = r0[2 * ox], b = r0[2 * ox + 1], c = r1[2 * ox], d = r1[2 * ox + 1];
                int b_wins = pool_wins(b, a), d_wins = pool_wins(d, c);
                float ab = b_wins ? b : a, cd = d_wins ? d : c;
                int cd_wins = pool_wins(cd, ab);
                dst[oy * OW + ox] = cd_wins ? cd : ab;
                if (arg) {
                    int32_t o = 2 * oy * W + 2 * ox;
                    int32_t iab = b_wins ? o + 1 : o, icd = d_wins ? o + W + 1 : o + W;
                    arg[oy * OW + ox] = cd_wins ? icd : iab;
                }
            }
        }
    }
}

void nn_maxpool_forward(float *out, int32_t *idx, const float *in, int B, int C, int H, int W,
                        int k, int stride)
{
    int OH = (H - k) / stride + 1, OW = (W - k) / stride + 1;
    if (k == 2 && stride == 2) {
        maxpool2x2(out, idx, in, B * C, H, W);
        return;
    }
    for (size_t p = 0; p < (size_t)B * C; p++) {
        const float *src = in + p * H * W;
        float *dst = out + p * OH * OW;
        int32_t *arg = idx ? idx + p * OH * OW : NULL;
        for (int oy = 0; oy < OH; oy++)
            for (int ox = 0; ox < OW; ox++) {
                int32_t bi = (oy * stride) * W + ox * stride;
                float best = src[bi];
                for (int ky = 0; ky < k; ky++)
                    for (int kx = 0; kx < k; kx++) {
                        int32_t o = (oy * stride + ky) * W + ox * stride + kx;
                        if (pool_wins(src[o], best)) {
                            best = src[o];
                            bi = o;
                        }
                    }
                dst[oy * OW + ox] = best;
                if (idx) arg[oy * OW + ox] = bi;
            }
    }
}

void nn_maxpool_backward(float *din, const float *dout, const int32_t *idx, int B, int C, int H,
                         int W, int k, int stride)
{
    int OH = (H - k) / stride + 1, OW = (W - k) / stride + 1;
    for (size_t p = 0; p < (size_t)B * C; p++) {
        float *dst = din + p * H * W;
        const float *g = dout + p * OH * OW;
        const int32_t *arg = idx + p * OH * OW;
        for (int i = 0; i < OH * OW; i++)
            dst[arg[i]] += g[i];
    }
}

/* ---- ReLU ---------------------------------------------------------------- */
void nn_relu_forward(float *out, const float *in, size_t n)
{
    /* out may equal in, so no restrict here; the loop still vectorises.
     * NaN passes (PyTorch's threshold: x <= 0 ? 0 : x), so an overflow
     * upstream reaches the output and fails the series instead of turning
     * into a confident 0. */
    for (size_t i = 0; i < n; i++)
        out[i] = in[i] <= 0.0f ? 0.0f : in[i];
}

void nn_relu_backward(float *restrict din, const float *restrict dout, const float *restrict out,
                      size_t n)
{
    /* a product, not a branch: the sign pattern is random, and GCC vectorises
     * this form. PyTorch's rule, out <= 0 ? 0 : dout: a NaN output passes its
     * gradient on. */
    for (size_t i = 0; i < n; i++)
        din[i] += dout[i] * (float)!(out[i] <= 0.0f);
}

/* ---- batch-norm ---------------------------------------------------------- */
/* Channels are independent: the pool takes them in ranges, each channel
 * summed in the same order as on one thread. */
struct bn_job {
    float *out, *mean, *rstd, *running_mean, *running_var, *din, *dgamma, *dbeta;
    const float *in, *gamma, *beta, *dout, *cmean, *crstd;
    int B, C, S, training, pieces;
    float momentum, eps;
};

/* Ranges of channels; small layers (the 1-D batch-norm of the dense head)
 * are not worth waking the workers for. */
static int bn_pieces(nn_pool *p, int B, int C, int S)
{
    if ((size_t)B * C * S < 16384) return 1;
    return nn_pool_ranges((size_t)C, 1, 2 * nn_pool_threads(p));
}

static void bn_forward_channels(const struct bn_job *j, int c0, int c1)
{
    float *out = j->out, *mean = j->mean, *rstd = j->rstd, *running_mean = j->running_mean,
          *running_var = j->running_var;
    const float *in = j->in, *gamma = j->gamma, *beta = j->beta;
    int B = j->B, C = j->C, S = j->S, training = j->training;
    float momentum = j->momentum, eps = j->eps;
    size_t n = (size_t)B * S;
    for (int c = c0; c < c1; c++) {
        float m, r;
        if (training) {
            /* two passes; each plane sums in float (vectorised), the planes in
             * double: the sums run over up to millions of values */
            double sum = 0.0, sq = 0.0;
            for (int b = 0; b < B; b++) {
                const float *x = in + ((size_t)b * C + c) * S;
                float part = 0.0f;
#pragma omp simd reduction(+ : part)
                for (int s = 0; s < S; s++)
                    part += x[s];
                sum += part;
            }
            double mu = sum / (double)n;
            float muf = (float)mu;
            for (int b = 0; b < B; b++) {
                const float *x = in + ((size_t)b * C + c) * S;
                float part = 0.0f;
#pragma omp simd reduction(+ : part)
                for (int s = 0; s < S; s++)
                    part += (x[s] - muf) * (x[s] - muf);
                sq += part;
            }
            double var = sq / (double)n;
            m = (float)mu;
            r = (float)(1.0 / sqrt(var + eps));
            if (running_mean) {
                double unbiased = n > 1 ? sq / (double)(n - 1) : var;
                running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * m;
                running_var[c] = (1.0f - momentum) * running_var[c] + momentum * (float)unbiased;
            }
        } else {
            m = running_mean[c];
            r = 1.0f / sqrtf(running_var[c] + eps);
        }
        mean[c] = m;
        rstd[c] = r;
        float scale = r * (gamma ? gamma[c] : 1.0f), shift = (beta ? beta[c] : 0.0f) - m * scale;
        for (int b = 0; b < B; b++) {
            const float *x = in + ((size_t)b * C + c) * S;
            float *y = out + ((size_t)b * C + c) * S;
            for (int s = 0; s < S; s++)
                y[s] = x[s] * scale + shift;
        }
    }
}

static void bn_forward_piece(void *arg, int i)
{
    const struct bn_job *j = arg;
    size_t lo, hi;
    nn_pool_range((size_t)j->C, j->pieces, i, &lo, &hi);
    bn_forward_channels(j, (int)lo, (int)hi);
}

void nn_batchnorm_forward(nn_pool *p, float *out, float *mean, float *rstd, float *running_mean,
                          float *running_var, const float *in, const float *gamma,
                          const float *beta, int B, int C, int S, int training, float momentum,
                          float eps)
{
    struct bn_job j = {.out = out,
                       .mean = mean,
                       .rstd = rstd,
                       .running_mean = running_mean,
                       .running_var = running_var,
                       .in = in,
                       .gamma = gamma,
                       .beta = beta,
                       .B = B,
                       .C = C,
                       .S = S,
                       .training = training,
                       .momentum = momentum,
                       .eps = eps};
    j.pieces = bn_pieces(p, B, C, S);
    nn_pool_run(p, j.pieces, bn_forward_piece, &j);
}

static void bn_backward_channels(const struct bn_job *j, int c0, int c1)
{
    float *din = j->din, *dgamma = j->dgamma, *dbeta = j->dbeta;
    const float *dout = j->dout, *in = j->in, *mean = j->cmean, *rstd = j->crstd, *gamma = j->gamma;
    int B = j->B, C = j->C, S = j->S, training = j->training;
    size_t n = (size_t)B * S;
    for (int c = c0; c < c1; c++) {
        float m = mean[c], r = rstd[c], gm = gamma ? gamma[c] : 1.0f;
        double sum_g = 0.0, sum_gx = 0.0; /* sum(dout), sum(dout * xhat) */
        for (int b = 0; b < B; b++) {
            const float *x = in + ((size_t)b * C + c) * S;
            const float *g = dout + ((size_t)b * C + c) * S;
            float pg = 0.0f, pgx = 0.0f;
#pragma omp simd reduction(+ : pg, pgx)
            for (int s = 0; s < S; s++) {
                pg += g[s];
                pgx += g[s] * (x[s] - m);
            }
            sum_g += pg;
            sum_gx += pgx * r;
        }
        if (dgamma) dgamma[c] += (float)sum_gx;
        if (dbeta) dbeta[c] += (float)sum_g;
        if (!din) continue;
        float k = gm * r;
        float mg = training ? (float)(sum_g / (double)n) : 0.0f;
        float mgx = training ? (float)(sum_gx / (double)n) : 0.0f;
        for (int b = 0; b < B; b++) {
            const float *x = in + ((size_t)b * C + c) * S;
            const float *g = dout + ((size_t)b * C + c) * S;
            float *dx = din + ((size_t)b * C + c) * S;
            for (int s = 0; s < S; s++)
                dx[s] += k * (g[s] - mg - (x[s] - m) * r * mgx);
        }
    }
}

static void bn_backward_piece(void *arg, int i)
{
    const struct bn_job *j = arg;
    size_t lo, hi;
    nn_pool_range((size_t)j->C, j->pieces, i, &lo, &hi);
    bn_backward_channels(j, (int)lo, (int)hi);
}

void nn_batchnorm_backward(nn_pool *p, float *din, float *dgamma, float *dbeta, const float *dout,
                           const float *in, const float *mean, const float *rstd,
                           const float *gamma, int B, int C, int S, int training)
{
    struct bn_job j = {.din = din,
                       .dgamma = dgamma,
                       .dbeta = dbeta,
                       .dout = dout,
                       .in = in,
                       .cmean = mean,
                       .crstd = rstd,
                       .gamma = gamma,
                       .B = B,
                       .C = C,
                       .S = S,
                       .training = training};
    j.pieces = bn_pieces(p, B, C, S);
    nn_pool_run(p, j.pieces, bn_backward_piece, &j);
}

/* ---- linear -------------------------------------------------------------- */
void nn_linear_forward(float *out, const float *in, const float *w, const float *b, int N, int IC,
                       int OC)
{
    if (b)
        for (int i = 0; i < N; i++)
            memcpy(out + (size_t)i * OC, b, sizeof(float) * OC);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, IC, 1.0f, in, IC, w, IC,
                b ? 1.0f : 0.0f, out, OC);
}

void nn_linear_backward(float *din, float *dw, float *db, const float *dout, const float *in,
                        const float *w, int N, int IC, int OC)
{
    if (din)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, IC, OC, 1.0f, dout, OC, w, IC,
                    1.0f, din, IC);
    if (dw)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, IC, N, 1.0f, dout, OC, in, IC,
                    1.0f, dw, IC);
    if (db)
        for (int i = 0; i < N; i++)
            for (int o = 0; o < OC; o++)
                db[o] += dout[(size_t)i * OC + o];
}

/* ---- dropout ------------------------------------------------------------- */
void nn_dropout_forward(float *out, float *mask, const float *in, size_t n, float p, uint64_t *rng)
{
    float keep = 1.0f / (1.0f - p);
    for (size_t i = 0; i < n; i++) {
        mask[i] = (p > 0.0f && nn_rng_uniform(rng) < p) ? 0.0f : (p > 0.0f ? keep : 1.0f);
        out[i] = in[i] * mask[i];
    }
}

void nn_dropout_backward(float *din, const float *dout, const float *mask, size_t n)
{
    for (size_t i = 0; i < n; i++)
        din[i] += dout[i] * mask[i];
}

/* ---- global average pool ------------------------------------------------- */
void nn_gap_forward(float *out, const float *in, int B, int C, int S)
{
    for (size_t p = 0; p < (size_t)B * C; p++) {
        const float *x = in + p * S;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int s = 0; s < S; s++)
            acc += x[s];
        out[p] = acc / (float)S;
    }
}

void nn_gap_backward(float *din, const float *dout, int B, int C, int S)
{
    for (size_t p = 0; p < (size_t)B * C; p++) {
        float g = dout[p] / (float)S;
        float *dx = din + p * S;
        for (int s = 0; s < S; s++)
            dx[s] += g;
    }
}

/* ---- sigmoid ------------------------------------------------------------- */
void nn_sigmoid_forward(float *out, const float *in, size_t n)
{
    for (size_t i = 0; i < n; i++)
        out[i] = 1.0f / (1.0f + expf(-in[i]));
}

void nn_sigmoid_backward(float *din, const float *dout, const float *out, size_t n)
{
    for (size_t i = 0; i < n; i++)
        din[i] += dout[i] * out[i] * (1.0f - out[i]);
}

/* ---- BCE with logits ----------------------------------------------------- */
static double softplus(double x)
{
    return x > 0 ? x + log1p(exp(-x)) : log1p(exp(x));
}

float nn_bce_logits(float *dlogits, const float *logits, const float *targets, const float *label_w,
                    const float *pos_w, int N, int L)
{
    double total = 0.0, inv = 1.0 / ((double)N * L);
    for (int i = 0; i < N; i++)
        for (int l = 0; l < L; l++) {
            size_t k = (size_t)i * L + l;
            double x = logits[k], y = targets[k];
            double w = label_w ? label_w[l] : 1.0, pw = pos_w ? pos_w[l] : 1.0;
            total += w * (pw * y * softplus(-x) + (1.0 - y) * softplus(x));
            if (dlogits) {
                double sig = 1.0 / (1.0 + exp(-x));
                dlogits[k] = (float)(w * (-pw * y * (1.0 - sig) + (1.0 - y) * sig) * inv);
            }
        }
    return (float)(total * inv);
}

/* ---- random numbers ------------------------------------------------------ */
uint64_t nn_rng_next(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

float nn_rng_uniform(uint64_t *state)
{
    return (float)(nn_rng_next(state) >> 40) * (1.0f / 16777216.0f);
}

float nn_rng_normal(uint64_t *state)
{
    double u1 = ((double)(nn_rng_next(state) >> 11) + 1.0) * (1.0 / 9007199254740993.0);
    double u2 = (double)(nn_rng_next(state) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* train/bench_main.c: train-bench, the C side of bench/train.sh: training
 * throughput of an architecture in slices per second, measured the way
 * `ichtriage train` trains.
 *   stage 1: batches of BATCH slices 3 x 128 x 128 (augmented from uint8, as
 *            in training), CNN forward, weighted BCE, backward, Adam step;
 *   stage 2: CNN frozen, batches of SERIES series of LEN slices of
 *            precomputed features, BiLSTM + dense forward, BCE, backward,
 *            Adam step (features are computed once per run, not timed).
 *   train-bench ARCH BATCH SERIES LEN SECONDS
 * Prints "stage1_slices_per_s=.. stage2_slices_per_s=..". Threads:
 * OPENBLAS_NUM_THREADS, the default of the model's worker pool. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "nn.h"
#include "number.h"
#include "trainer.h"

int main(int argc, char **argv)
{
    char blas_err[256]; /* the node's kernels, so that the figures are the node's */
    if (nn_blas_rerun(argv, blas_err, sizeof blas_err) != 0)
        fprintf(stderr, "train-bench: %s\n", blas_err);
    if (argc != 6) {
        fprintf(stderr, "usage: train-bench ARCH BATCH SERIES LEN SECONDS\n");
        return 2;
    }
    const char *arch = argv[1];
    long b, s, l;
    double secs;
    if (util_number_long(argv[2], 1, 4096, &b) != 0 ||
        util_number_long(argv[3], 1, 4096, &s) != 0 ||
        util_number_long(argv[4], 1, NN_MAX_SERIES_LEN, &l) != 0 ||
        util_number_double(argv[5], &secs) != 0 || !(secs > 0 && secs <= 86400)) {
        fprintf(stderr,
                "train-bench: BATCH 1..4096, SERIES 1..4096, LEN 1..%d and SECONDS "
                "(0, 86400] are numbers\n",
                NN_MAX_SERIES_LEN);
        return 2;
    }
    int B = (int)b, S = (int)s, L = (int)l;
    nn_config c;
    nn_config_default(&c);
    c.arch = arch;
    char err[256];
    nn_model *m = nn_model_create(&c, err, sizeof err);
    if (!m) {
        fprintf(stderr, "train-bench: %s\n", err);
        return 1;
    }
    size_t per = (size_t)c.in_c * c.in_h * c.in_w;
    uint8_t *px = malloc((size_t)B * per);
    float *x = malloc((size_t)B * per * sizeof(float));
    int N = S * L, F = nn_model_feature_size(m);
    float *lg = malloc((size_t)(N > B ? N : B) * c.labels * sizeof(float));
    float *dl = malloc((size_t)(N > B ? N : B) * c.labels * sizeof(float));
    float *y = calloc((size_t)(N > B ? N : B) * c.labels, sizeof(float));
    float *feat = malloc((size_t)N * F * sizeof(float));
    int *len = malloc((size_t)S * sizeof *len);
    if (!px || !x || !lg || !dl || !y || !feat || !len) return 1;
    uint64_t rng = 1;
    for (size_t i = 0; i < (size_t)B * per; i++)
        px[i] = (uint8_t)(nn_rng_next(&rng) & 0xff);
    for (int i = 0; i < B * c.labels; i += 7)
        y[i] = 1;
    struct train_augment aug;
    train_augment_default(&aug);
    nn_adam adam;
    nn_adam_default(&adam);

    /* Stage 1. */
    nn_model_set_training(m, 1);
    int steps = 0;
    double t0 = util_clock_s(), t;
    for (;;) {
        for (int k = 0; k < B; k++)
            train_augment_slice(&aug, px + k * per, c.in_c, c.in_h, c.in_w, x + k * per, &rng);
        nn_model_zero_grad(m);
        nn_cnn_forward(m, x, B, lg);
        nn_bce_logits(dl, lg, y, train_rsna_weights, NULL, B, c.labels);
        nn_cnn_backward(m, dl);
        nn_model_adam_step(m, &adam);
        steps++;
        if ((t = util_clock_s() - t0) >= secs && steps >= 2) break;
    }
    double s1 = steps * (double)B / t;

    /* Stage 2 on features of random slices. */
    nn_model_set_training(m, 0);
    for (int a = 0; a < N; a += B) {
        int n = N - a < B ? N - a : B;
        for (int k = 0; k < n; k++)
            for (size_t i = 0; i < per; i++)
                x[k * per + i] = px[(size_t)k * per + i] / 255.0f;
        nn_cnn_features(m, x, n, feat + (size_t)a * F);
    }
    for (int s = 0; s < S; s++)
        len[s] = L;
    nn_model_freeze(m, "cnn.", 1);
    nn_model_set_training(m, 1);
    steps = 0;
    t0 = util_clock_s();
    for (;;) {
        nn_model_zero_grad(m);
        nn_lrcn_forward_features(m, feat, len, S, lg);
        nn_bce_logits(dl, lg, y, train_rsna_weights, NULL, N, c.labels);
        nn_lrcn_backward(m, dl);
        nn_model_adam_step(m, &adam);
        steps++;
        if ((t = util_clock_s() - t0) >= secs && steps >= 2) break;
    }
    double s2 = steps * (double)N / t;
    printf("arch=%s batch=%d series=%d len=%d blas=%s stage1_slices_per_s=%.2f "
           "stage2_slices_per_s=%.1f\n",
           arch, B, S, L, nn_blas_core(), s1, s2);
    nn_model_free(m);
    free(px), free(x), free(lg), free(dl), free(y), free(feat), free(len);
    return 0;
}

/* One axial slice of a phantom: the head sampled across the slice thickness
 * (partial volume), artifacts, noise, and for each subtype what its blood
 * adds to the noise-free slice (the basis of the labels). */
#include "phantom_model.h"

#include <math.h>
#include <string.h>

/* Samples across the slice: one per 1.25 mm or less, at least 2. */
static int sub_count(float thickness)
{
    int n = (int)ceilf(thickness / 1.25f - 0.01f);
    return n < 2 ? 2 : n > 8 ? 8 : n;
}

/* A fixed pseudo-random number in [0, 1) for pixel (i, j), sample s. */
static float jitter(int i, int j, int s)
{
    uint32_t x = (uint32_t)i * 73856093u ^ (uint32_t)j * 19349663u ^ (uint32_t)s * 83492791u;
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return (float)(x >> 8) * (1.0f / 16777216.0f);
}

static void sample_slice(const struct ph_slice_ctx *ctx, float z, float *hu,
                         float *delta[TRAIN_PHANTOM_NSUBTYPES])
{
    const struct ph_head *hd = ctx->hd;
    const struct ph_series_geom *g = &ctx->g;
    int n = g->size, nsub = sub_count(g->thickness);
    const float *R = hd->rot;
    float T = hd->skull_t + hd->scalp_t;
    float rb = fmaxf(hd->a * (1.0f + hd->egg), fmaxf(hd->b, hd->c)) + T + 20.0f;
    unsigned study_types = ph_lesions_types(ctx->les, ctx->nles);

    for (size_t i = 0; i < (size_t)n * n; i++)
        hu[i] = 0;
    for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++)
        if (delta[k]) memset(delta[k], 0, sizeof(float) * (size_t)n * n);

    float step[3] = {g->spacing * R[0], g->spacing * R[1], g->spacing * R[2]};
    float inv = 1.0f / (float)nsub;
    for (int j = 0; j < n; j++) {
        float y = g->origin[1] + g->spacing * (float)j;
        float dy = y - hd->centre[1];
        float half = rb * rb - dy * dy;
        int i0 = n, i1 = -1;
        if (half > 0) {
            half = sqrtf(half);
            i0 = (int)floorf((hd->centre[0] - half - g->origin[0]) / g->spacing);
            i1 = (int)ceilf((hd->centre[0] + half - g->origin[0]) / g->spacing);
            if (i0 < 0) i0 = 0;
            if (i1 > n - 1) i1 = n - 1;
        }
        float *row = hu + (size_t)j * n;
        for (int i = 0; i < n; i++)
            if (i < i0 || i > i1) row[i] = -1000.0f;
        for (int s = 0; s < nsub; s++) {
            float zs = z + g->thickness * (((float)s + 0.5f) * inv - 0.5f);
            float d[3] = {g->origin[0] + g->spacing * (float)i0 - hd->centre[0], dy,
                          zs - hd->centre[2]};
            float h[3];
            for (int k = 0; k < 3; k++)
                h[k] = R[k] * d[0] + R[3 + k] * d[1] + R[6 + k] * d[2];
            float zstep = g->thickness * inv; /* one stratum */
            for (int i = i0; i <= i1; i++) {
                /* a jittered position inside the stratum: regular samples
                 * would draw surfaces nearly parallel to the slice as
                 * terraces */
                float dz = zstep * (jitter(i, j, s) - 0.5f);
                float hp[3] = {h[0] + dz * R[6], h[1] + dz * R[7], h[2] + dz * R[8]};
                struct ph_point pt;
                ph_head_eval(hd, hp, &pt);
                float v = pt.hu;
                if (ctx->nles > 0) {
                    struct ph_hit hits[2 * PH_MAX_LESIONS];
                    unsigned types = 0;
                    int nh = ph_lesions_hit(ctx->les, ctx->nles, &pt, hits, &types);
                    if (nh > 0) {
                        v = ph_lesions_compose(pt.hu, hits, nh, ctx->omit_mask);
                        types &= study_types;
                        for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++) {
                            if (!(types & (1u << k)) || !delta[k]) continue;
                            float wo =
                                ph_lesions_compose(pt.hu, hits, nh, ctx->omit_mask | (1u << k));
                            delta[k][(size_t)j * n + i] += (v - wo) * inv;
                        }
                    }
                }
                row[i] += v * inv;
                h[0] += step[0];
                h[1] += step[1];
                h[2] += step[2];
            }
        }
    }
}

/* Box blur of length len along x (dir 0) or y (dir 1), in place. */
static void blur_line(float *img, int n, int len, int dir, float *tmp)
{
    int r = len / 2;
    for (int a = 0; a < n; a++) {
        for (int b = 0; b < n; b++) {
            float s = 0;
            int c = 0;
            for (int o = -r; o <= r; o++) {
                int bb = b + o;
                if (bb < 0 || bb >= n) continue;
                s += dir == 0 ? img[(size_t)a * n + bb] : img[(size_t)bb * n + a];
                c++;
            }
            tmp[b] = s / (float)c;
        }
        for (int b = 0; b < n; b++) {
            if (dir == 0)
                img[(size_t)a * n + b] = tmp[b];
            else
                img[(size_t)b * n + a] = tmp[b];
        }
    }
}

/* Streaks from a dense edge: thin alternating bright and dark lines. */
static void add_streaks(float *hu, int n, struct ph_rng *r, int count)
{
    for (int s = 0; s < count; s++) {
        /* start on something dense (bone) if one is found */
        int x0 = n / 2, y0 = n / 2;
        for (int t = 0; t < 200; t++) {
            int x = (int)(ph_rng_uniform(r) * n), y = (int)(ph_rng_uniform(r) * n);
            if (hu[(size_t)y * n + x] > 300) {
                x0 = x;
                y0 = y;
                break;
            }
        }
        float ang = (float)ph_rng_range(r, 0, M_PI);
        float ca = cosf(ang), sa = sinf(ang);
        float amp = (float)ph_rng_range(r, 25, 70) * (ph_rng_chance(r, 0.5) ? 1 : -1);
        float width = (float)ph_rng_range(r, 0.6, 1.5);
        for (int y = 0; y < n; y++) {
            for (int x = 0; x < n; x++) {
                size_t i = (size_t)y * n + x;
                if (hu[i] < -300 || hu[i] > 300) continue;
                float dx = (float)(x - x0), dy = (float)(y - y0);
                float perp = -sa * dx + ca * dy, along = fabsf(ca * dx + sa * dy);
                if (fabsf(perp) > 4 * width) continue;
                float e = perp / width;
                hu[i] += amp * expf(-e * e) * expf(-along / (0.6f * (float)n));
            }
        }
    }
}

/* Correlated noise: white noise smoothed by [1 2 1]/4 both ways, rescaled. */
static void add_noise(float *hu, int n, float sd, struct ph_rng *r, float *buf)
{
    if (sd <= 0) return;
    size_t nn = (size_t)n * n;
    /* unit-variance noise from four uniform 16-bit parts of one draw (the
     * smoothing below makes it Gaussian for all practical purposes) */
    for (size_t i = 0; i < nn; i++) {
        uint64_t x = ph_rng_next(r);
        uint32_t sum = (uint32_t)(x & 0xffff) + (uint32_t)((x >> 16) & 0xffff) +
                       (uint32_t)((x >> 32) & 0xffff) + (uint32_t)(x >> 48);
        buf[i] = ((float)sum * (1.0f / 65536.0f) - 2.0f) * 1.7320508f;
    }
    /* [1 2 1]/4 keeps 0.375 of the variance per axis: sd shrinks by 0.375 */
    float *row = buf + nn;
    for (int y = 0; y < n; y++) {
        float *b = buf + (size_t)y * n;
        for (int x = 0; x < n; x++) {
            float l = b[x > 0 ? x - 1 : x], c = b[x], rr = b[x < n - 1 ? x + 1 : x];
            row[x] = 0.25f * l + 0.5f * c + 0.25f * rr;
        }
        memcpy(b, row, sizeof(float) * n);
    }
    float k = sd / 0.375f;
    for (int y = 0; y < n; y++) {
        const float *up = buf + (size_t)(y > 0 ? y - 1 : y) * n;
        const float *mid = buf + (size_t)y * n;
        const float *dn = buf + (size_t)(y < n - 1 ? y + 1 : y) * n;
        for (int x = 0; x < n; x++)
            hu[(size_t)y * n + x] += k * (0.25f * up[x] + 0.5f * mid[x] + 0.25f * dn[x]);
    }
}

void ph_slice_render(const struct ph_slice_ctx *ctx, float z, float *hu,
                     float *delta[TRAIN_PHANTOM_NSUBTYPES])
{
    int n = ctx->g.size;
    sample_slice(ctx, z, hu, delta);
    struct ph_rng r;
    ph_rng_seed(&r, ctx->noise_seed, 0x5eed);
    if (ctx->motion) {
        int len = 3 + (int)(ph_rng_uniform(&r) * 6);
        int dir = ph_rng_chance(&r, 0.5) ? 0 : 1;
        blur_line(hu, n, len, dir, ctx->scratch);
        for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++)
            if (delta[k]) blur_line(delta[k], n, len, dir, ctx->scratch);
    }
    if (ctx->nstreaks > 0) add_streaks(hu, n, &r, ctx->nstreaks);
    add_noise(hu, n, ctx->noise_sd, &r, ctx->scratch);
}

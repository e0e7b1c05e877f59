/* triage/preprocess.c: HU -> windows -> area-averaging resize (see
 * preprocess.h). Separable: rows are windowed and shrunk horizontally into
 * scratch, then columns vertically into out. */
#include "preprocess.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void triage_windows_default(struct triage_windows *w)
{
    *w = (struct triage_windows){3, {40, 80, 600}, {80, 200, 2800}};
}

int triage_windows_parse(const char *s, struct triage_windows *w, char *err, size_t errlen)
{
    struct triage_windows r = {0};
    const char *p = s;
    while (*p) {
        char *end;
        double c = strtod(p, &end);
        if (end == p || *end != '/') goto bad;
        p = end + 1;
        double wd = strtod(p, &end);
        /* Widths below 1e-3 HU (or denormal in float) would make 1/width infinite. */
        if (end == p || !(wd >= 1e-3) || !isfinite((float)wd) || !isfinite((float)c) ||
            r.n == TRIAGE_MAX_WINDOWS)
            goto bad;
        r.center[r.n] = (float)c;
        r.width[r.n] = (float)wd;
        r.n++;
        p = end;
        if (*p == ',')
            p++;
        else if (*p)
            goto bad;
    }
    if (r.n == 0) goto bad;
    *w = r;
    return 0;
bad:
    snprintf(err, errlen, "bad windows '%s': want center/width pairs such as 40/80,80/200", s);
    return -1;
}

size_t triage_preprocess_scratch(int rows, int out_w, int nwindows)
{
    return (size_t)rows * (size_t)out_w * (size_t)nwindows;
}

/* For output cell o of m over an input of n: the first input index and the
 * weights of the input cells it covers (they sum to 1). Returns the count. */
static int area_weights(int o, int m, int n, int *first, float *wt, int maxw)
{
    double scale = (double)n / m;
    double a = o * scale, b = (o + 1) * scale;
    int i0 = (int)floor(a), i1 = (int)ceil(b);
    if (i1 > n) i1 = n;
    int k = 0;
    for (int i = i0; i < i1 && k < maxw; i++) {
        double lo = i > a ? i : a, hi = i + 1 < b ? i + 1 : b;
        wt[k++] = (float)((hi - lo) / scale);
    }
    *first = i0;
    return k;
}

int triage_preprocess_slice(const float *hu, int rows, int cols, const struct triage_windows *w,
                            int out_h, int out_w, float *out, float *scratch)
{
    if (rows <= 0 || cols <= 0 || out_h <= 0 || out_w <= 0 || w->n <= 0 ||
        w->n > TRIAGE_MAX_WINDOWS || cols / out_w > 4096 || rows / out_h > 4096)
        return -1;
    enum { MAXW = 4100 };
    float wt[MAXW];
    float lo[TRIAGE_MAX_WINDOWS], inv[TRIAGE_MAX_WINDOWS];
    for (int c = 0; c < w->n; c++) {
        lo[c] = w->center[c] - w->width[c] / 2;
        inv[c] = 1.0f / w->width[c];
    }
    /* Horizontal: scratch[c][y][ox]. */
    for (int ox = 0; ox < out_w; ox++) {
        int first, k = area_weights(ox, out_w, cols, &first, wt, MAXW);
        for (int y = 0; y < rows; y++) {
            const float *row = hu + (size_t)y * cols + first;
            for (int c = 0; c < w->n; c++) {
                float acc = 0;
                for (int j = 0; j < k; j++) {
                    float v = (row[j] - lo[c]) * inv[c];
                    v = v > 0 ? (v < 1 ? v : 1) : 0; /* NaN counts as below the window */
                    acc += wt[j] * v;
                }
                scratch[((size_t)c * rows + y) * out_w + ox] = acc;
            }
        }
    }
    /* Vertical: out[c][oy][ox]. */
    for (int oy = 0; oy < out_h; oy++) {
        int first, k = area_weights(oy, out_h, rows, &first, wt, MAXW);
        for (int c = 0; c < w->n; c++) {
            float *o = out + ((size_t)c * out_h + oy) * out_w;
            memset(o, 0, sizeof(float) * (size_t)out_w);
            for (int j = 0; j < k; j++) {
                const float *s = scratch + ((size_t)c * rows + first + j) * out_w;
                for (int ox = 0; ox < out_w; ox++)
                    o[ox] += wt[j] * s[ox];
            }
        }
    }
    return 0;
}

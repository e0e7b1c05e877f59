/* triage/preprocess.c: HU -> windows -> area-averaging resize (see
 * preprocess.h). Separable: rows are windowed and shrunk horizontally into
 * scratch, then columns vertically into out. */
#include "preprocess.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "number.h"

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

/* One window (lower edge lo, 1/width inv) applied to one HU value. */
static inline float window_at(float hu, float lo, float inv)
{
    float v = (hu - lo) * inv;
    return v > 0 ? (v < 1 ? v : 1) : 0; /* NaN counts as below the window */
}

int triage_preprocess_slice(const float *hu, int rows, int cols, const struct triage_region *region,
                            const struct triage_windows *w, int out_h, int out_w, float *out,
                            float *scratch)
{
    struct triage_region whole = {0, 0, cols, rows};
    const struct triage_region *r = region ? region : &whole;
    if (rows <= 0 || cols <= 0 || out_h <= 0 || out_w <= 0 || w->n <= 0 ||
        w->n > TRIAGE_MAX_WINDOWS || r->w <= 0 || r->h <= 0 || r->w / out_w > 4096 ||
        r->h / out_h > 4096 || r->x < -4 * cols || r->x > 4 * cols || r->y < -4 * rows ||
        r->y > 4 * rows || r->w > 8 * cols || r->h > 8 * rows)
        return -1;
    enum { MAXW = 4100 };
    float wt[MAXW];
    float lo[TRIAGE_MAX_WINDOWS], inv[TRIAGE_MAX_WINDOWS], pad[TRIAGE_MAX_WINDOWS];
    for (int c = 0; c < w->n; c++) {
        lo[c] = w->center[c] - w->width[c] / 2;
        inv[c] = 1.0f / w->width[c];
        pad[c] = window_at(-1024.0f, lo[c], inv[c]); /* air, outside the image */
    }
    /* Horizontal: scratch[c][y][ox] over the region's rows. */
    for (int ox = 0; ox < out_w; ox++) {
        int first, k = area_weights(ox, out_w, r->w, &first, wt, MAXW);
        /* The cells of the image among them are [ja, jb); the rest is air. */
        int x0 = r->x + first, ja = 0, jb = k;
        if (x0 < 0) ja = -x0 < k ? -x0 : k;
        if (x0 + jb > cols) jb = cols - x0 > ja ? cols - x0 : ja;
        float wpad = 0;
        for (int j = 0; j < ja; j++)
            wpad += wt[j];
        for (int j = jb; j < k; j++)
            wpad += wt[j];
        for (int yy = 0; yy < r->h; yy++) {
            int y = r->y + yy;
            bool inside = y >= 0 && y < rows;
            const float *row = hu + (inside ? (size_t)y * cols : 0);
            for (int c = 0; c < w->n; c++) {
                float acc = wpad * pad[c];
                if (inside)
                    for (int j = ja; j < jb; j++)
                        acc += wt[j] * window_at(row[x0 + j], lo[c], inv[c]);
                else
                    for (int j = ja; j < jb; j++)
                        acc += wt[j] * pad[c];
                scratch[((size_t)c * r->h + yy) * out_w + ox] = acc;
            }
        }
    }
    /* Vertical: out[c][oy][ox]. */
    for (int oy = 0; oy < out_h; oy++) {
        int first, k = area_weights(oy, out_h, r->h, &first, wt, MAXW);
        for (int c = 0; c < w->n; c++) {
            float *o = out + ((size_t)c * out_h + oy) * out_w;
            memset(o, 0, sizeof(float) * (size_t)out_w);
            for (int j = 0; j < k; j++) {
                const float *s = scratch + ((size_t)c * r->h + first + j) * out_w;
                for (int ox = 0; ox < out_w; ox++)
                    o[ox] += wt[j] * s[ox];
            }
        }
    }
    return 0;
}

/* ---- the head crop -------------------------------------------------------- */

void triage_head_box_init(struct triage_head_box *b)
{
    *b = (struct triage_head_box){.x0 = 1, .y0 = 1, .x1 = 0, .y1 = 0};
}

void triage_head_box_add(struct triage_head_box *b, const float *hu, int rows, int cols, int *count)
{
    int *colc = count, *rowc = count + cols;
    memset(count, 0, sizeof(int) * (size_t)(rows + cols));
    for (int y = 0; y < rows; y++) {
        const float *row = hu + (size_t)y * cols;
        for (int x = 0; x < cols; x++)
            if (row[x] > TRIAGE_HEAD_HU) {
                colc[x]++;
                rowc[y]++;
            }
    }
    int need_c = rows / 64 > 2 ? rows / 64 : 2, need_r = cols / 64 > 2 ? cols / 64 : 2;
    int x0 = 0, x1 = cols - 1, y0 = 0, y1 = rows - 1;
    while (x0 < cols && colc[x0] < need_c)
        x0++;
    while (x1 > x0 && colc[x1] < need_c)
        x1--;
    while (y0 < rows && rowc[y0] < need_r)
        y0++;
    while (y1 > y0 && rowc[y1] < need_r)
        y1--;
    if (x0 == cols || y0 == rows) return; /* no head on this slice */
    if (b->x1 < b->x0) {
        *b = (struct triage_head_box){x0, y0, x1, y1};
        return;
    }
    if (x0 < b->x0) b->x0 = x0;
    if (y0 < b->y0) b->y0 = y0;
    if (x1 > b->x1) b->x1 = x1;
    if (y1 > b->y1) b->y1 = y1;
}

/* Where a square of side starts so that it is centred on [lo, hi] and, when
 * it fits, inside [0, n). */
static int square_start(int lo, int hi, int side, int n)
{
    int twice = lo + hi + 1 - side;
    int start = twice >= 0 ? twice / 2 : -((1 - twice) / 2);
    if (side <= n) {
        if (start < 0) start = 0;
        if (start + side > n) start = n - side;
    }
    return start;
}

void triage_head_region(const struct triage_head_box *b, int rows, int cols,
                        struct triage_region *r)
{
    *r = (struct triage_region){0, 0, cols, rows};
    if (b->x1 < b->x0 || b->y1 < b->y0) return;
    int big = rows > cols ? rows : cols;
    int bw = b->x1 - b->x0 + 1, bh = b->y1 - b->y0 + 1;
    int side = bw > bh ? bw : bh;
    side += side / 16;
    if (side < (big + 1) / 2) side = (big + 1) / 2;
    if (side >= big) return;
    r->x = square_start(b->x0, b->x1, side, cols);
    r->y = square_start(b->y0, b->y1, side, rows);
    r->w = r->h = side;
}

int triage_crop_parse(const char *preprocessing, bool *crop_head, char *err, size_t errlen)
{
    *crop_head = false;
    for (const char *p = preprocessing; p && *p;) {
        size_t len = strcspn(p, ";");
        if (len >= 5 && strncmp(p, "crop=", 5) == 0) {
            if (len == 9 && strncmp(p + 5, "head", 4) == 0)
                *crop_head = true;
            else if (len == 9 && strncmp(p + 5, "none", 4) == 0)
                *crop_head = false;
            else {
                snprintf(err, errlen, "unknown preprocessing step '%.*s' (known: crop=head)",
                         (int)(len > 64 ? 64 : len), p);
                return -1;
            }
        }
        p += len;
        if (*p == ';') p++;
    }
    return 0;
}

void triage_context_stack(const float *x, int n, size_t per, int k, int first, int count,
                          float *out)
{
    for (int i = first; i < first + count; i++)
        for (int d = -k; d <= k; d++) {
            memcpy(out, x + (size_t)triage_context_slice(i, d, n) * per, per * sizeof *x);
            out += per;
        }
}

int triage_context_parse(const char *s, int *k, char *err, size_t errlen)
{
    *k = 0;
    if (!s) return 0;
    long v;
    if (util_number_long(s, 0, TRIAGE_MAX_CONTEXT, &v) != 0) {
        snprintf(err, errlen, "'context' is '%.32s', not a number of slices 0-%d", s,
                 TRIAGE_MAX_CONTEXT);
        return -1;
    }
    *k = (int)v;
    return 0;
}

/* triage/pacs_render.c: the Secondary Capture summary picture (cairo). */
#include "pacs_render.h"

#include <cairo.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { W = TRIAGE_PACS_PICTURE_WIDTH, H = TRIAGE_PACS_PICTURE_HEIGHT };
enum { HEAD_H = 56, IMG_Y = HEAD_H, IMG_H = 512, STRIP_Y = IMG_Y + IMG_H + 4, STRIP_H = 72 };

static const char *const subtype_names[5] = {"epidural", "intraparenchymal", "intraventricular",
                                             "subarachnoid", "subdural"};

/* The key slice in the brain window (center 40, width 80) as a cairo
 * surface; NULL when out of memory. */
static cairo_surface_t *slice_surface(const struct triage_pacs_picture *in)
{
    cairo_surface_t *s = cairo_image_surface_create(CAIRO_FORMAT_RGB24, in->hu_cols, in->hu_rows);
    if (cairo_surface_status(s) != CAIRO_STATUS_SUCCESS) {
        cairo_surface_destroy(s);
        return NULL;
    }
    cairo_surface_flush(s);
    unsigned char *data = cairo_image_surface_get_data(s);
    int stride = cairo_image_surface_get_stride(s);
    for (int y = 0; y < in->hu_rows; y++) {
        uint32_t *row = (uint32_t *)(data + (size_t)y * (size_t)stride);
        for (int x = 0; x < in->hu_cols; x++) {
            float v = (in->hu[(size_t)y * (size_t)in->hu_cols + (size_t)x] - 0.0f) / 80.0f;
            uint32_t g = v <= 0 ? 0 : v >= 1 ? 255 : (uint32_t)lrintf(v * 255.0f);
            row[x] = (g << 16) | (g << 8) | g;
        }
    }
    cairo_surface_mark_dirty(s);
    return s;
}

static void text_at(cairo_t *cr, double x, double y, double size, const char *s)
{
    cairo_set_font_size(cr, size);
    cairo_move_to(cr, x, y);
    cairo_show_text(cr, s);
}

void triage_slice_caption(char *out, size_t n, int index, int slices, int instance_number,
                          int frame, int frames)
{
    int k = snprintf(out, n, "slice %d of %d", index + 1, slices);
    if (k < 0 || (size_t)k >= n || instance_number < 0) return;
    if (frames > 1)
        snprintf(out + k, n - (size_t)k, " (image %d, frame %d)", instance_number, frame + 1);
    else
        snprintf(out + k, n - (size_t)k, " (image %d)", instance_number);
}

static void draw_strip(cairo_t *cr, const struct triage_pacs_picture *in, double thr)
{
    double x0 = 8, w = W - 16, y0 = STRIP_Y + 14, h = STRIP_H - 18;
    cairo_set_source_rgb(cr, 0.12, 0.12, 0.12);
    cairo_rectangle(cr, x0, y0, w, h);
    cairo_fill(cr);
    cairo_set_source_rgb(cr, 0.85, 0.85, 0.85);
    text_at(cr, x0, STRIP_Y + 10, 11,
            "probability of hemorrhage per slice, feet (left) to head (right)");
    if (in->slices <= 0 || !in->p_any) return;
    double bw = w / in->slices;
    for (int i = 0; i < in->slices; i++) {
        double p = in->p_any[i] < 0 ? 0 : in->p_any[i] > 1 ? 1 : in->p_any[i];
        if (i == in->key_index)
            cairo_set_source_rgb(cr, 1.0, 0.85, 0.1);
        else if (p >= thr)
            cairo_set_source_rgb(cr, 0.9, 0.25, 0.2);
        else
            cairo_set_source_rgb(cr, 0.35, 0.65, 0.9);
        cairo_rectangle(cr, x0 + i * bw, y0 + h * (1 - p), bw > 2 ? bw - 1 : bw, h * p);
        cairo_fill(cr);
    }
    /* 0.5 guide line */
    cairo_set_source_rgb(cr, 0.6, 0.6, 0.6);
    cairo_set_line_width(cr, 1);
    cairo_move_to(cr, x0, y0 + h * 0.5);
    cairo_line_to(cr, x0 + w, y0 + h * 0.5);
    cairo_stroke(cr);
}

int triage_pacs_render(const struct triage_pacs_picture *in, uint8_t **rgb, int *rows, int *cols,
                       char *err, size_t errlen)
{
    *rgb = NULL;
    if (!in || !in->hu || in->hu_rows <= 0 || in->hu_cols <= 0) {
        snprintf(err, errlen, "render: no key slice");
        return -1;
    }
    cairo_surface_t *out = cairo_image_surface_create(CAIRO_FORMAT_RGB24, W, H);
    cairo_surface_t *slice = slice_surface(in);
    if (cairo_surface_status(out) != CAIRO_STATUS_SUCCESS || !slice) {
        cairo_surface_destroy(out);
        if (slice) cairo_surface_destroy(slice);
        snprintf(err, errlen, "render: out of memory");
        return -1;
    }
    cairo_t *cr = cairo_create(out);
    cairo_set_source_rgb(cr, 0, 0, 0);
    cairo_paint(cr);
    cairo_select_font_face(cr, "DejaVu Sans", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_BOLD);

    /* The finding. */
    char line[256];
    if (in->suspected) {
        cairo_set_source_rgb(cr, 1.0, 0.35, 0.3);
        snprintf(line, sizeof line, "Intracranial hemorrhage SUSPECTED  (p = %.2f)", in->p_study);
    } else {
        cairo_set_source_rgb(cr, 0.6, 0.9, 0.6);
        snprintf(line, sizeof line, "No intracranial hemorrhage suspected  (p = %.2f)",
                 in->p_study);
    }
    text_at(cr, 8, 22, 17, line);
    cairo_set_source_rgb(cr, 0.9, 0.9, 0.9);
    char subs[200] = "";
    size_t used = 0;
    for (int i = 0; i < 5 && in->p_subtype; i++)
        if (in->p_subtype[i] >= in->subtype_threshold && used < sizeof subs) {
            int k = snprintf(subs + used, sizeof subs - used, "%s%s %.2f", used ? ", " : "",
                             subtype_names[i], in->p_subtype[i]);
            if (k > 0) used += (size_t)k;
        }
    snprintf(line, sizeof line, "Suspected subtypes: %s", used ? subs : "none");
    cairo_select_font_face(cr, "DejaVu Sans", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
    text_at(cr, 8, 44, 13, line);

    /* The key slice, fitted into the square, aspect kept. */
    double aspect = in->pixel_aspect > 0 ? in->pixel_aspect : 1.0;
    double sw = in->hu_cols, sh = in->hu_rows * aspect;
    double scale = fmin(W / sw, IMG_H / sh);
    double ox = (W - sw * scale) / 2, oy = IMG_Y + (IMG_H - sh * scale) / 2;
    cairo_save(cr);
    cairo_translate(cr, ox, oy);
    cairo_scale(cr, scale, scale * aspect);
    cairo_set_source_surface(cr, slice, 0, 0);
    cairo_pattern_set_filter(cairo_get_source(cr), CAIRO_FILTER_BILINEAR);
    cairo_paint(cr);
    cairo_restore(cr);
    cairo_set_source_rgb(cr, 1.0, 0.85, 0.1);
    char key[96];
    triage_slice_caption(key, sizeof key, in->key_index, in->slices, in->key_instance_number,
                         in->key_frame, in->key_frames);
    snprintf(line, sizeof line, "key %s, brain window 40/80", key);
    text_at(cr, 8, IMG_Y + IMG_H - 8, 12, line);

    draw_strip(cr, in, 0.5);

    cairo_set_source_rgb(cr, 0.9, 0.9, 0.9);
    snprintf(line, sizeof line, "ichtriage, model %.100s, result revision %d",
             in->model_version ? in->model_version : "?", in->revision);
    text_at(cr, 8, H - 28, 12, line);
    cairo_select_font_face(cr, "DejaVu Sans", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_BOLD);
    cairo_set_source_rgb(cr, 1.0, 0.85, 0.1);
    text_at(cr, 8, H - 10, 13, "Decision support, not a diagnosis.");
    cairo_destroy(cr);
    cairo_surface_flush(out);

    uint8_t *buf = malloc((size_t)W * H * 3);
    if (buf) {
        const unsigned char *data = cairo_image_surface_get_data(out);
        int stride = cairo_image_surface_get_stride(out);
        for (int y = 0; y < H; y++) {
            const uint32_t *row = (const uint32_t *)(data + (size_t)y * (size_t)stride);
            for (int x = 0; x < W; x++) {
                uint8_t *p = buf + ((size_t)y * W + (size_t)x) * 3;
                p[0] = (uint8_t)(row[x] >> 16);
                p[1] = (uint8_t)(row[x] >> 8);
                p[2] = (uint8_t)row[x];
            }
        }
    }
    cairo_surface_destroy(slice);
    cairo_surface_destroy(out);
    if (!buf) {
        snprintf(err, errlen, "render: out of memory");
        return -1;
    }
    *rgb = buf;
    *rows = H;
    *cols = W;
    return 0;
}

/* The --preview contact sheet: every slice of a study in the brain window
 * (40/80), downsampled to a tile, with the visible part of each lesion
 * outlined in its subtype's colour, written as an RGB PNG with libpng; and
 * the --masks files, one grey PNG per slice that shows blood. */
#include "phantom_model.h"

#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SHEET_COLS 8

/* epidural red, intraparenchymal yellow, intraventricular cyan,
 * subarachnoid green, subdural magenta */
static const uint8_t colours[TRAIN_PHANTOM_NSUBTYPES][3] = {
    {255, 40, 40}, {255, 230, 0}, {0, 220, 255}, {40, 255, 40}, {255, 60, 255}};

int ph_sheet_init(struct ph_sheet *sh, int nslices, int tile)
{
    memset(sh, 0, sizeof *sh);
    sh->tile = tile;
    sh->cols = nslices < SHEET_COLS ? nslices : SHEET_COLS;
    sh->rows = (nslices + SHEET_COLS - 1) / SHEET_COLS;
    sh->width = sh->cols * tile;
    sh->height = sh->rows * tile;
    sh->rgb = calloc((size_t)sh->width * sh->height, 3);
    sh->tile_mask = calloc((size_t)tile * tile, 1);
    if (!sh->rgb || !sh->tile_mask) {
        ph_sheet_free(sh);
        return -1;
    }
    return 0;
}

void ph_sheet_add(struct ph_sheet *sh, int index, const float *hu, const uint8_t *mask, int size)
{
    int t = sh->tile, ox = (index % SHEET_COLS) * t, oy = (index / SHEET_COLS) * t;
    uint8_t *tm = sh->tile_mask; /* each tile pixel is written below */
    for (int ty = 0; ty < t; ty++) {
        int y0 = ty * size / t, y1 = (ty + 1) * size / t;
        for (int tx = 0; tx < t; tx++) {
            int x0 = tx * size / t, x1 = (tx + 1) * size / t;
            double s = 0;
            uint8_t m = 0;
            for (int y = y0; y < y1; y++)
                for (int x = x0; x < x1; x++) {
                    s += hu[(size_t)y * size + x];
                    m |= mask[(size_t)y * size + x];
                }
            double v = s / ((double)(y1 - y0) * (x1 - x0));
            double g = (v - 0.0) / 80.0 * 255.0; /* brain window 40/80 */
            uint8_t px = (uint8_t)(g < 0 ? 0 : g > 255 ? 255 : g);
            uint8_t *o = sh->rgb + 3 * ((size_t)(oy + ty) * sh->width + ox + tx);
            o[0] = o[1] = o[2] = px;
            tm[(size_t)ty * t + tx] = m;
        }
    }
    /* outline: mask pixels with a 4-neighbour outside the mask */
    for (int ty = 0; ty < t; ty++)
        for (int tx = 0; tx < t; tx++) {
            uint8_t m = tm[(size_t)ty * t + tx];
            if (!m) continue;
            for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++) {
                uint8_t bit = (uint8_t)(1u << k);
                if (!(m & bit)) continue;
                bool edge = tx == 0 || ty == 0 || tx == t - 1 || ty == t - 1 ||
                            !(tm[(size_t)ty * t + tx - 1] & bit) ||
                            !(tm[(size_t)ty * t + tx + 1] & bit) ||
                            !(tm[(size_t)(ty - 1) * t + tx] & bit) ||
                            !(tm[(size_t)(ty + 1) * t + tx] & bit);
                if (!edge) continue;
                uint8_t *o = sh->rgb + 3 * ((size_t)(oy + ty) * sh->width + ox + tx);
                memcpy(o, colours[k], 3);
            }
        }
    /* a corner mark on positive slices, in the colour of each subtype */
    uint8_t all = 0;
    for (size_t i = 0; i < (size_t)t * t; i++)
        all |= tm[i];
    for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++) {
        if (!(all & (1u << k))) continue;
        for (int y = 2; y < 6 && y < t; y++)
            for (int x = 2 + 6 * k; x < 6 + 6 * k && x < t; x++)
                memcpy(sh->rgb + 3 * ((size_t)(oy + y) * sh->width + ox + x), colours[k], 3);
    }
}

/* Writes w x h pixels of ch channels (1: grey, 3: RGB), 8 bits each, as a PNG. */
static int write_png(const char *path, const uint8_t *px, int w, int h, int ch, char *err,
                     size_t errlen)
{
    FILE *f = fopen(path, "wb");
    if (!f) {
        snprintf(err, errlen, "%s: cannot create", path);
        return -1;
    }
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    if (!png || !info || setjmp(png_jmpbuf(png))) {
        png_destroy_write_struct(&png, &info);
        fclose(f);
        snprintf(err, errlen, "%s: PNG write failed", path);
        return -1;
    }
    png_init_io(png, f);
    png_set_IHDR(png, info, (png_uint_32)w, (png_uint_32)h, 8,
                 ch == 1 ? PNG_COLOR_TYPE_GRAY : PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_write_info(png, info);
    for (int y = 0; y < h; y++)
        png_write_row(png, (png_bytep)(px + (size_t)ch * y * w));
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    if (fclose(f) != 0) {
        snprintf(err, errlen, "%s: write failed", path);
        return -1;
    }
    return 0;
}

int ph_sheet_write(const struct ph_sheet *sh, const char *path, char *err, size_t errlen)
{
    return write_png(path, sh->rgb, sh->width, sh->height, 3, err, errlen);
}

int ph_mask_write(const char *path, const uint8_t *mask, int size, char *err, size_t errlen)
{
    return write_png(path, mask, size, size, 1, err, errlen);
}

void ph_sheet_free(struct ph_sheet *sh)
{
    if (!sh) return;
    free(sh->rgb);
    free(sh->tile_mask);
    memset(sh, 0, sizeof *sh);
}

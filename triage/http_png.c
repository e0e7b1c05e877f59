/* triage/http_png.c: GET /api/studies/{study}/slices/{sop}.png[?frame=N]:
 * one stored slice rendered server-side in the brain window (40/80 HU,
 * triage_windows_default's first window) as an 8-bit grey PNG with libpng.
 * The decode runs on the loop: one slice (one frame, also of a multi-frame
 * file) takes milliseconds. */
#include "http_internal.h"

#include <limits.h>
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "db_web.h"
#include "log.h"
#include "number.h"
#include "preprocess.h"
#include "rows.h"
#include "scp_pixels.h"

struct png_mem {
    unsigned char *p;
    size_t len, cap;
    bool oom;
};

static void png_mem_write(png_structp png, png_bytep data, png_size_t len)
{
    struct png_mem *m = png_get_io_ptr(png);
    if (m->oom) return;
    if (m->len + len > m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 65536;
        while (cap < m->len + len)
            cap *= 2;
        unsigned char *grown = realloc(m->p, cap);
        if (!grown) {
            m->oom = true;
            return;
        }
        m->p = grown;
        m->cap = cap;
    }
    memcpy(m->p + m->len, data, len);
    m->len += len;
}

static void png_mem_flush(png_structp png)
{
    (void)png;
}

/* grey[rows*cols] -> PNG bytes in *m. Returns 0 or -1. */
static int encode_png(const unsigned char *grey, int rows, int cols, struct png_mem *m)
{
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    if (!png || !info) {
        png_destroy_write_struct(&png, &info);
        return -1;
    }
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_write_struct(&png, &info);
        return -1;
    }
    png_set_write_fn(png, m, png_mem_write, png_mem_flush);
    png_set_IHDR(png, info, (png_uint_32)cols, (png_uint_32)rows, 8, PNG_COLOR_TYPE_GRAY,
                 PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_set_compression_level(png, 3);
    png_write_info(png, info);
    for (int r = 0; r < rows; r++)
        png_write_row(png, (png_const_bytep)(grey + (size_t)r * (size_t)cols));
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    return m->oom ? -1 : 0;
}

static int purged_cb(void *ud, const struct db_study_view *v)
{
    *(int64_t *)ud = v->row.purged_at_ms;
    return 0;
}

/* A slice of a study whose files retention removed: 410, saying so, not a
 * 404 that reads as a wrong link. Else 404. */
static int no_such_slice(struct triage_http *h, h2o_req_t *req, const char *study_uid)
{
    int64_t purged = 0;
    if (db_study_view(h->db, study_uid, purged_cb, &purged) == 0 && purged) {
        char day[32], msg[96];
        triage_iso_time(purged, day, sizeof day);
        snprintf(msg, sizeof msg, "images removed by retention on %.10s", day);
        return http_send_error(req, 410, msg);
    }
    return http_send_error(req, 404, "no such slice in this study");
}

int http_slice_png(struct triage_http *h, h2o_req_t *req, const char *study_uid,
                   const char *sop_uid)
{
    char rel[600], path[2000], num[16];
    long frame = 0;
    if (req->query_at != SIZE_MAX &&
        http_param(req->path.base + req->query_at + 1, req->path.len - req->query_at - 1, "frame",
                   num, sizeof num) != 0 &&
        util_number_long(num, 0, INT_MAX, &frame) != 0)
        return http_send_error(req, 400, "frame: a frame number, 0 or more");
    int rc = db_study_instance_file(h->db, study_uid, sop_uid, rel, sizeof rel);
    if (rc == 1) return no_such_slice(h, req, study_uid);
    if (rc != 0) return http_send_error(req, 500, "cannot read the index");
    /* Decoded here, in the node, only what triage has already decoded
     * without harm (in the pixel-decoder child, issue 10): the slices with a
     * result, from this very file. A file that crashed or never reached the
     * decoder (a re-sent instance not yet triaged again) is not parsed for
     * its pixels in this process. */
    rc = db_slice_has_result(h->db, sop_uid, (int)frame);
    if (rc == 1)
        return http_send_error(req, 404, "no triaged slice: only slices with a result are shown");
    if (rc == 2) {
        util_log(UTIL_LOG_INFO, "slice_image_refused", "sop=%s frame=%ld reason=received_again",
                 sop_uid, frame);
        return http_send_error(req, 409,
                               "slice received again since triage: not shown until triaged again");
    }
    if (rc != 0) return http_send_error(req, 500, "cannot read the index");
    snprintf(path, sizeof path, "%s/%s", h->store->dir, rel);
    struct scp_pixels px;
    char err[256];
    /* Only the requested frame: a multi-frame (Enhanced CT) file is not
     * decoded whole on the loop for one image. */
    rc = scp_pixels_read_frame(path, frame, &px, err, sizeof err);
    if (rc == 1) return http_send_error(req, 404, "no such frame");
    if (rc != 0) {
        util_log(UTIL_LOG_WARN, "slice_image_failed", "sop=%s frame=%ld reason=\"%s\"", sop_uid,
                 frame, err);
        return http_send_error(req, 500, "cannot decode the slice");
    }
    struct triage_windows w;
    triage_windows_default(&w);
    float lo = w.center[0] - w.width[0] / 2, width = w.width[0];
    size_t n = (size_t)px.rows * (size_t)px.columns;
    unsigned char *grey = malloc(n);
    struct png_mem m = {0};
    if (grey) {
        const float *hu = px.hu;
        for (size_t i = 0; i < n; i++) {
            float v = (hu[i] - lo) / width;
            grey[i] = (unsigned char)(v <= 0 ? 0 : v >= 1 ? 255 : v * 255.0f + 0.5f);
        }
    }
    rc = grey ? encode_png(grey, px.rows, px.columns, &m) : -1;
    free(grey);
    scp_pixels_free(&px);
    if (rc != 0) {
        free(m.p);
        return http_send_error(req, 500, "cannot encode the image");
    }
    rc = http_send(req, 200, "image/png", (const char *)m.p, m.len);
    free(m.p);
    return rc;
}

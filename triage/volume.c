/* triage/volume.c: ordering the slices of a series along its normal (never
 * by instance number, which scanners number as they please), with the
 * checks that tell whether the series is one consistent volume. */
#include "volume.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "scp_pixels.h"

static void cross(const double a[3], const double b[3], double out[3])
{
    out[0] = a[1] * b[2] - a[2] * b[1];
    out[1] = a[2] * b[0] - a[0] * b[2];
    out[2] = a[0] * b[1] - a[1] * b[0];
    double n = sqrt(out[0] * out[0] + out[1] * out[1] + out[2] * out[2]);
    if (n > 0)
        for (int i = 0; i < 3; i++)
            out[i] /= n;
}

/* A slice normal within max_tilt_deg of the head-foot axis. */
static bool normal_axial(const double n[3], double max_tilt_deg)
{
    return fabs(n[2]) >= cos(max_tilt_deg * M_PI / 180.0);
}

bool triage_orientation_axial(const double o[6], double max_tilt_deg)
{
    double n[3];
    cross(o, o + 3, n);
    return normal_axial(n, max_tilt_deg);
}

int triage_volume_check(const struct triage_volume *v, double max_tilt_deg, int min_slices,
                        char *err, size_t errlen)
{
    if (!normal_axial(v->normal, max_tilt_deg)) {
        snprintf(err, errlen, "slices are not axial (normal %.2f,%.2f,%.2f)", v->normal[0],
                 v->normal[1], v->normal[2]);
        return 1;
    }
    if (v->n < min_slices) {
        snprintf(err, errlen, "%d slices placed, fewer than triage.min_slices=%d%s%.400s", v->n,
                 min_slices, v->note[0] ? ": " : "", v->note);
        return 2;
    }
    return 0;
}

bool triage_image_type_is_localizer(const char *image_type)
{
    /* ImageType value 3 names localizers; some scanners say SCOUT. */
    return strstr(image_type, "LOCALIZER") != NULL || strstr(image_type, "SCOUT") != NULL;
}

static int by_along(const void *a, const void *b)
{
    const struct triage_slice *x = a, *y = b;
    if (x->along != y->along) return x->along < y->along ? -1 : 1;
    return x->instance_number - y->instance_number;
}

static int by_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

void triage_volume_free(struct triage_volume *v)
{
    if (!v) return;
    free(v->slices);
    memset(v, 0, sizeof *v);
}

/* Images the model can read, by size (volume.h). */
static bool size_in_range(const struct scp_info *in)
{
    return in->rows >= TRIAGE_MIN_DIM && in->columns >= TRIAGE_MIN_DIM &&
           in->rows <= SCP_PIXELS_MAX_DIM && in->columns <= SCP_PIXELS_MAX_DIM;
}

struct candidate {
    struct scp_info info;
    int frames;        /* frames with a position (counted, voted, kept) */
    int unplaced;      /* frames of a multi-frame object without a position */
    int nread;         /* multi-frame: frame_pos entries, placed or NaN */
    double *frame_pos; /* nread * 3, for multi-frame objects */
};

int triage_volume_build(const char *const *paths, int npaths, struct triage_volume *out, char *err,
                        size_t errlen)
{
    memset(out, 0, sizeof *out);
    if (npaths <= 0) {
        snprintf(err, errlen, "no files");
        return -1;
    }
    struct candidate *c = calloc((size_t)npaths, sizeof *c);
    if (!c) goto oom;
    int rc = -1;
    /* 1. headers; 2. the dominant orientation and size (by count). */
    double ref_orient[6] = {0}, best_nz = 0; /* best_nz: |z| of its plane's normal */
    int ref_rows = 0, ref_cols = 0, best = 0;
    const struct scp_info *odd_size = NULL; /* the first image of a size out of range */
    for (int i = 0; i < npaths; i++) {
        char e[256];
        if (scp_info_read(paths[i], &c[i].info, e, sizeof e) != 0) {
            snprintf(err, errlen, "%s: %s", paths[i], e);
            goto done;
        }
        struct scp_info *in = &c[i].info;
        /* Another object stored in the series (a screen capture, a dose
         * report) is not a slice even when it carries a position: left out
         * and counted, as completion and `ichtriage predict` leave it out.
         * A file without a SOP Class UID (de-identified training data may
         * have none) is taken as an image. */
        if (in->sop_class[0] && !scp_sop_class_is_ct(in->sop_class)) {
            out->dropped_not_ct++;
            continue;
        }
        c[i].frames = in->has_pixel_data ? in->number_of_frames : 0;
        if (in->number_of_frames > 1 && c[i].frames > 0) {
            /* as for single-frame files: never triage a part of the series */
            if (in->number_of_frames > TRIAGE_MAX_SLICES) {
                snprintf(err, errlen, "more than %d slices in one series (%d frames in one image)",
                         TRIAGE_MAX_SLICES, in->number_of_frames);
                goto done;
            }
            c[i].frame_pos = malloc(sizeof(double) * 3 * (size_t)in->number_of_frames);
            if (!c[i].frame_pos) goto oom_done;
            bool ho, hs;
            int got = scp_info_frames(paths[i], in->number_of_frames, c[i].frame_pos,
                                      in->orientation, &ho, in->pixel_spacing, &hs, e, sizeof e);
            if (ho) in->has_orientation = true;
            if (hs) in->has_pixel_spacing = true;
            /* A frame without a position is dropped, and counted. */
            c[i].nread = got > 0 ? got : 0;
            c[i].frames = 0;
            for (int f = 0; f < c[i].nread; f++)
                c[i].frames += !isnan(c[i].frame_pos[3 * f]);
            c[i].unplaced = in->number_of_frames - c[i].frames;
            in->has_position = c[i].frames > 0;
        }
        if (c[i].frames && !size_in_range(in) && !odd_size) odd_size = in;
    }
    for (int i = 0; i < npaths; i++) {
        struct scp_info *in = &c[i].info;
        if (!c[i].frames || !in->has_orientation || !size_in_range(in) ||
            triage_image_type_is_localizer(in->image_type))
            continue;
        int votes = 0;
        for (int j = 0; j < npaths; j++) {
            struct scp_info *o = &c[j].info;
            if (!c[j].frames || !o->has_orientation || o->rows != in->rows ||
                o->columns != in->columns)
                continue;
            double dot = 0;
            for (int k = 0; k < 6; k++)
                dot += in->orientation[k] * o->orientation[k];
            if (dot > 1.98) votes += c[j].frames; /* both cosines within ~8 degrees */
        }
        /* A tie goes to the more axial plane (the one the model reads), not
         * to the file listed first: the node and predict list files in
         * other orders. */
        double normal[3];
        cross(in->orientation, in->orientation + 3, normal);
        if (votes > best || (votes == best && fabs(normal[2]) > best_nz)) {
            best = votes;
            best_nz = fabs(normal[2]);
            memcpy(ref_orient, in->orientation, sizeof ref_orient);
            ref_rows = in->rows;
            ref_cols = in->columns;
        }
    }
    if (best == 0 && odd_size) {
        snprintf(err, errlen, "image size %dx%d out of range (%dx%d to %dx%d)", odd_size->rows,
                 odd_size->columns, TRIAGE_MIN_DIM, TRIAGE_MIN_DIM, SCP_PIXELS_MAX_DIM,
                 SCP_PIXELS_MAX_DIM);
        goto done;
    }
    if (best == 0) {
        snprintf(err, errlen, "no image with position and orientation in %d file(s)", npaths);
        goto done;
    }
    out->slices = calloc((size_t)(best < TRIAGE_MAX_SLICES ? best : TRIAGE_MAX_SLICES) + 1,
                         sizeof *out->slices);
    if (!out->slices) goto oom_done;
    cross(ref_orient, ref_orient + 3, out->normal);
    /* The normal toward the head (+z of the patient's coordinates), however
     * the rows and columns run (columns running 0,-1,0 give 0,0,-1): the
     * slices go from the feet to the head, the order that the page and the
     * PACS summary label and that the model is given. */
    if (out->normal[2] < 0)
        for (int k = 0; k < 3; k++)
            out->normal[k] = -out->normal[k];
    out->rows = ref_rows;
    out->columns = ref_cols;
    /* 3. keep the images in that plane and size; count the rest. */
    for (int i = 0; i < npaths; i++) {
        struct scp_info *in = &c[i].info;
        out->dropped_inconsistent += c[i].unplaced;
        if (!c[i].frames) continue;
        if (triage_image_type_is_localizer(in->image_type)) {
            out->dropped_localizers += c[i].frames;
            continue;
        }
        double dot = 0;
        for (int k = 0; k < 6 && in->has_orientation; k++)
            dot += in->orientation[k] * ref_orient[k];
        if (!in->has_orientation || !in->has_position) {
            out->dropped_inconsistent += c[i].frames;
            continue;
        }
        if (dot <= 1.98) {
            out->dropped_localizers += c[i].frames;
            continue;
        }
        if (in->rows != ref_rows || in->columns != ref_cols) {
            out->dropped_inconsistent += c[i].frames;
            continue;
        }
        for (int f = 0; f < (c[i].frame_pos ? c[i].nread : c[i].frames); f++) {
            if (c[i].frame_pos && isnan(c[i].frame_pos[3 * f])) continue;
            if (out->n >= TRIAGE_MAX_SLICES) {
                snprintf(err, errlen, "more than %d slices in one series", TRIAGE_MAX_SLICES);
                goto done;
            }
            struct triage_slice *s = &out->slices[out->n++];
            s->file = i;
            s->frame = f;
            const double *p = c[i].frame_pos ? c[i].frame_pos + 3 * f : in->position;
            memcpy(s->pos, p, sizeof s->pos);
            s->along = p[0] * out->normal[0] + p[1] * out->normal[1] + p[2] * out->normal[2];
            snprintf(s->sop_uid, sizeof s->sop_uid, "%s", in->sop_uid);
            s->instance_number = in->instance_number;
            if (!out->study_uid[0]) {
                snprintf(out->study_uid, sizeof out->study_uid, "%s", in->study_uid);
                snprintf(out->series_uid, sizeof out->series_uid, "%s", in->series_uid);
            }
        }
    }
    /* 4. order along the normal; spacing, gaps and duplicates. */
    qsort(out->slices, (size_t)out->n, sizeof *out->slices, by_along);
    if (out->n > 1) {
        double *d = malloc(sizeof(double) * (size_t)(out->n - 1));
        if (!d) goto oom_done;
        for (int i = 1; i < out->n; i++)
            d[i - 1] = out->slices[i].along - out->slices[i - 1].along;
        double *sorted = malloc(sizeof(double) * (size_t)(out->n - 1));
        if (!sorted) {
            free(d);
            goto oom_done;
        }
        memcpy(sorted, d, sizeof(double) * (size_t)(out->n - 1));
        qsort(sorted, (size_t)(out->n - 1), sizeof(double), by_double);
        out->spacing = sorted[(out->n - 1) / 2];
        free(sorted);
        for (int i = 0; i < out->n - 1; i++) {
            if (d[i] < 0.01 + 0.05 * out->spacing)
                out->duplicate_positions++;
            else if (out->spacing > 0 && d[i] > 1.5 * out->spacing)
                out->missing_slices += (int)lround(d[i] / out->spacing) - 1;
        }
        free(d);
    }
    int k = 0;
    out->note[0] = 0;
    if (out->dropped_not_ct)
        k += snprintf(out->note + k, sizeof out->note - (size_t)k,
                      "%d object(s) other than CT images left out; ", out->dropped_not_ct);
    if (out->dropped_localizers)
        k += snprintf(out->note + k, sizeof out->note - (size_t)k,
                      "%d localizer/off-plane image(s) dropped; ", out->dropped_localizers);
    if (out->dropped_inconsistent && k < (int)sizeof out->note)
        k += snprintf(out->note + k, sizeof out->note - (size_t)k,
                      "%d image(s) of other size or without geometry dropped; ",
                      out->dropped_inconsistent);
    if (out->missing_slices && k < (int)sizeof out->note)
        k += snprintf(out->note + k, sizeof out->note - (size_t)k,
                      "about %d slice(s) missing (gaps along the normal); ", out->missing_slices);
    if (out->duplicate_positions && k < (int)sizeof out->note)
        k += snprintf(out->note + k, sizeof out->note - (size_t)k,
                      "%d slice(s) at a duplicate position; ", out->duplicate_positions);
    if (k > 2 && k < (int)sizeof out->note) out->note[k - 2] = 0;
    rc = 0;
    goto done;
oom_done:
    snprintf(err, errlen, "out of memory");
done:
    for (int i = 0; c && i < npaths; i++)
        free(c[i].frame_pos);
    free(c);
    if (rc != 0) triage_volume_free(out);
    return rc;
oom:
    snprintf(err, errlen, "out of memory");
    return -1;
}

/* The one preprocessing of the project, used by serving (triage/) and
 * training (train/) alike: HU -> windows -> area-averaging resize. HU come
 * from scp_pixels_read() (stored * slope + intercept, padding as air). See
 * docs/model-format.md, which is normative. */
#ifndef TRIAGE_PREPROCESS_H
#define TRIAGE_PREPROCESS_H

#include <stdbool.h>
#include <stddef.h>

#define TRIAGE_MAX_WINDOWS 4

struct triage_windows {
    int n;
    float center[TRIAGE_MAX_WINDOWS], width[TRIAGE_MAX_WINDOWS];
};

/* The default: brain 40/80, subdural 80/200, bone 600/2800. */
void triage_windows_default(struct triage_windows *w);
/* Parses "40/80,80/200,600/2800" (center/width in HU, channel order).
 * Returns 0, or -1 with a message. */
int triage_windows_parse(const char *s, struct triage_windows *w, char *err, size_t errlen);

/* A rectangle of a slice in its pixel coordinates (x: column, y: row). It
 * may reach past the image: what lies outside is air, -1024 HU. */
struct triage_region {
    int x, y, w, h;
};

/* hu [rows * cols] -> out [w->n, out_h, out_w]: each window maps
 * [center - width/2, center + width/2] linearly to [0, 1], clamped; then each
 * channel is resized by area averaging (each output pixel is the mean of the
 * input area it covers, fractional edges weighted). Works for shrinking and
 * enlarging. region: the part of the slice that becomes the output (NULL:
 * the whole slice). scratch must hold triage_preprocess_scratch(region rows,
 * out_w, w->n) floats; the caller owns both buffers. Returns 0, or -1 on bad
 * sizes. */
int triage_preprocess_slice(const float *hu, int rows, int cols, const struct triage_region *region,
                            const struct triage_windows *w, int out_h, int out_w, float *out,
                            float *scratch);
size_t triage_preprocess_scratch(int rows, int out_w, int nwindows);

/* The head crop (preprocessing "crop=head", docs/model-format.md): the
 * bounding box of the head over some slices of a series, then one square
 * around it that every slice of the series is cropped to, so that the head
 * fills the model's input whatever the field of view, at the same scale
 * along the series. Tissue is HU above TRIAGE_HEAD_HU; a column (row) is
 * part of the head where at least max(2, rows/64) (max(2, cols/64)) of its
 * pixels are tissue, so that stray bright pixels in the air do not count. */
#define TRIAGE_HEAD_HU (-300.0f)
/* Slices of a series the head box is taken from: this many, evenly spaced
 * along it (all of them in a shorter series). */
#define TRIAGE_HEAD_SAMPLES 8
/* The model metadata "preprocessing" of each variant. */
#define TRIAGE_PREPROCESSING "hu=stored*slope+intercept;window=clamp01;resize=area"
#define TRIAGE_PREPROCESSING_CROP "hu=stored*slope+intercept;window=clamp01;crop=head;resize=area"
/* Reads the crop from a "preprocessing" value (';'-separated steps; NULL:
 * none): *crop_head is true for a step "crop=head", false without a crop
 * step or with "crop=none". Other steps describe what every model does.
 * Returns 0, or -1 with a message for any other crop. */
int triage_crop_parse(const char *preprocessing, bool *crop_head, char *err, size_t errlen);
/* Neighbouring slices as channels (model metadata "context" = k,
 * docs/model-format.md): the input of slice i of a series is the windows of
 * slices i-k, ..., i+k in that order, each slice's windows together; beyond
 * either end of the series the end slice stands in. k = 0: the slice alone. */
#define TRIAGE_MAX_CONTEXT 4
static inline int triage_context_slice(int i, int d, int n)
{
    int j = i + d;
    return j < 0 ? 0 : j >= n ? n - 1 : j;
}
/* x: the n slices of one series in order, per floats each (its windows) ->
 * out: the inputs of slices first, ..., first + count - 1, (2k+1) * per
 * floats each. */
void triage_context_stack(const float *x, int n, size_t per, int k, int first, int count,
                          float *out);
/* Reads metadata "context" (NULL or absent: 0): an integer 0..TRIAGE_MAX_CONTEXT.
 * Returns 0, or -1 with a message. */
int triage_context_parse(const char *s, int *k, char *err, size_t errlen);
struct triage_head_box {
    int x0, y0, x1, y1; /* inclusive; x1 < x0 while nothing was found */
};
void triage_head_box_init(struct triage_head_box *b);
/* Adds one slice's head to the box. count: scratch of rows + cols ints. */
void triage_head_box_add(struct triage_head_box *b, const float *hu, int rows, int cols,
                         int *count);
/* The square to crop to: the box's longer side plus 1/16, centred on the box,
 * at least half the image's longer side (a small head or a partial box is
 * never blown up more than 2x). The whole slice when nothing was found or
 * the square would not be smaller than the image. */
void triage_head_region(const struct triage_head_box *b, int rows, int cols,
                        struct triage_region *r);

#endif

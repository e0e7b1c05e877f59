/* The one preprocessing of the project, used by serving (triage/) and
 * training (train/) alike: HU -> windows -> area-averaging resize. HU come
 * from scp_pixels_read() (stored * slope + intercept, padding as air). See
 * docs/model-format.md, which is normative. */
#ifndef TRIAGE_PREPROCESS_H
#define TRIAGE_PREPROCESS_H

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

/* hu [rows * cols] -> out [w->n, out_h, out_w]: each window maps
 * [center - width/2, center + width/2] linearly to [0, 1], clamped; then each
 * channel is resized by area averaging (each output pixel is the mean of the
 * input area it covers, fractional edges weighted). Works for shrinking and
 * enlarging. scratch must hold triage_preprocess_scratch(rows, out_w, w->n)
 * floats; the caller owns both buffers. Returns 0, or -1 on bad sizes. */
int triage_preprocess_slice(const float *hu, int rows, int cols, const struct triage_windows *w,
                            int out_h, int out_w, float *out, float *scratch);
size_t triage_preprocess_scratch(int rows, int out_w, int nwindows);

#endif

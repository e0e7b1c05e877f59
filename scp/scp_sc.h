/* The result's summary image as a Secondary Capture Image Storage object
 * (RGB, 8 bits), in a new series of the triaged study; the picture itself is
 * drawn by triage/ (pacs_render.c). See scp_sr.h for what the two derived
 * objects share. */
#ifndef SCP_SC_H
#define SCP_SC_H

#include <stdint.h>

#include "scp_sr.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Writes the SC to path (Explicit VR Little Endian, file meta header),
 * replacing any file there. rgb: rows * columns * 3 bytes, row by row,
 * borrowed. source: the key slice the picture shows (Source Image Sequence,
 * with its frame number when it is a frame of a multi-frame object); NULL
 * for none. Returns 0, or -1 with a message in err. Never throws. */
int scp_write_sc(const char *path, const struct scp_derived *d, const uint8_t *rgb, int rows,
                 int columns, const struct scp_sr_image_ref *source, char *err,
                 unsigned long errlen);

#ifdef __cplusplus
}
#endif

#endif

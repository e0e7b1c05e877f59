/* Decoded pixels of a DICOM image file as Hounsfield units, read with dcmtk.
 * Handles uncompressed and JPEG, JPEG-LS and RLE transfer syntaxes, signed and
 * unsigned stored values, Rescale Slope/Intercept (top level or in the shared
 * or per-frame functional groups of enhanced objects), padding values and
 * multi-frame objects. Used by triage, training and the phantom tests. */
#ifndef SCP_PIXELS_H
#define SCP_PIXELS_H

#ifdef __cplusplus
extern "C" {
#endif

/* Value given to pixels that carry the Pixel Padding Value (or lie in the
 * padding range): air, so that windows and resizing treat them as outside
 * the patient. */
#define SCP_PIXELS_PAD_HU (-1024.0f)
/* Hard caps on what a file may make us allocate. */
#define SCP_PIXELS_MAX_DIM 8192
#define SCP_PIXELS_MAX_TOTAL (1UL << 28) /* pixels over all frames */

struct scp_pixels {
    int rows, columns, frames;
    /* frames * rows * columns HU values, frame by frame, row by row. Owned by
     * the struct; release with scp_pixels_free. */
    float *hu;
    unsigned long padded; /* pixels that were padding */
};

/* Reads and decodes the pixel data of the file at path into *out (zeroed
 * first). Returns 0, or -1 with a message in err (size errlen): not DICOM,
 * no pixel data, a colour image, an undecodable transfer syntax, sizes
 * beyond the caps above, or no Rescale Slope and Intercept for a frame (or
 * slope 0): without them stored values are no HU. Enhanced CT Image Storage
 * must carry them in its Pixel Value Transformation functional groups;
 * other objects at the top level, which functional groups may override.
 * On failure *out owns nothing. Never throws; thread-safe. */
int scp_pixels_read(const char *path, struct scp_pixels *out, char *err, unsigned long errlen);

/* scp_pixels_read with a lower cap on rows * columns * frames (at most
 * SCP_PIXELS_MAX_TOTAL), checked before anything is decoded: "image size out
 * of range" beyond it. For callers that bound their work per file (the fuzz
 * target: a compressed file of a few hundred bytes can declare 2^28 pixels,
 * which take minutes to decode under the sanitizers). */
int scp_pixels_read_max(const char *path, unsigned long max_pixels, struct scp_pixels *out,
                        char *err, unsigned long errlen);

/* Only frame (0-based) of the file at path, decoded on its own (dcmtk reads
 * and decompresses that frame's bytes only, not the whole multi-frame
 * object): *out as scp_pixels_read gives it with frames 1. Returns 0, 1 when
 * the file has fewer frames (message in err), -1 as scp_pixels_read. */
int scp_pixels_read_frame(const char *path, long frame, struct scp_pixels *out, char *err,
                          unsigned long errlen);

/* Releases what *px owns and zeroes it; NULL and zeroed structs are fine. */
void scp_pixels_free(struct scp_pixels *px);

#ifdef __cplusplus
}
#endif

#endif

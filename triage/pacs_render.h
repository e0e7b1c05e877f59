/* The picture of the Secondary Capture summary (results to PACS): the key
 * slice in the brain window, the per-slice probability strip and the text of
 * the finding, drawn with cairo. Pure function of its input; thread-safe. */
#ifndef TRIAGE_PACS_RENDER_H
#define TRIAGE_PACS_RENDER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct triage_pacs_picture {
    const float *hu; /* the key slice, hu_rows * hu_cols Hounsfield units; borrowed */
    int hu_rows, hu_cols;
    double pixel_aspect; /* row spacing / column spacing; 1 when unknown */
    const float *p_any;  /* per slice, from the feet to the head; borrowed */
    int slices, key_index;
    /* The key slice's InstanceNumber (-1 when unknown), and its frame
     * (0-based) in its instance of key_frames frames. */
    int key_instance_number, key_frame, key_frames;
    bool suspected;
    double p_study;
    const double *p_subtype; /* 5: epidural .. subdural */
    double subtype_threshold;
    const char *model_version;
    int revision;
};

#define TRIAGE_PACS_PICTURE_WIDTH 512
#define TRIAGE_PACS_PICTURE_HEIGHT 720

/* The name of slice index (0-based) of slices, as the web page and this
 * picture give it: "slice 3 of 12 (image 10)", the position from the feet
 * and the InstanceNumber PACS shows ("(image 1, frame 3)" for a frame of a
 * multi-frame instance, no image where instance_number is -1). */
void triage_slice_caption(char *out, size_t n, int index, int slices, int instance_number,
                          int frame, int frames);

/* Draws the picture. *rgb (rows * cols * 3 bytes, row by row) is the
 * caller's to free(). Returns 0, or -1 with a message. */
int triage_pacs_render(const struct triage_pacs_picture *in, uint8_t **rgb, int *rows, int *cols,
                       char *err, size_t errlen);

#endif

/* A series as the model sees it: its image slices (frames of enhanced
 * objects included) in order along the slice normal, localizers and
 * off-plane images dropped, gaps and inconsistent geometry reported. Built
 * from file headers (scp_info); shared by serving and training. */
#ifndef TRIAGE_VOLUME_H
#define TRIAGE_VOLUME_H

#include <stdbool.h>
#include <stddef.h>

#include "scp_info.h"

#define TRIAGE_MAX_SLICES 1000
/* Rows and columns of an image the model reads, each: at least
 * TRIAGE_MIN_DIM, as a CT slice has hundreds (a series of 1x1 "images" had
 * been triaged at 0.000), and at most SCP_PIXELS_MAX_DIM, what the pixel
 * reader decodes (a series whose headers said 65535x65535 had the node
 * allocate 17 GB for one slice before its decoder refused). Other images
 * are left out and counted, and a series of nothing else fails. */
#define TRIAGE_MIN_DIM 64

struct triage_slice {
    int file;  /* index into the paths given to triage_volume_build */
    int frame; /* 0 for single-frame objects */
    double pos[3];
    double along; /* position projected on the normal (mm) */
    char sop_uid[SCP_UID_MAX];
    int instance_number;
};

struct triage_volume {
    struct triage_slice *slices; /* owned; along the normal, from the feet to the head */
    int n;
    int rows, columns;
    double normal[3]; /* unit; its z never negative */
    double spacing;   /* median distance between neighbours (mm); 0 for one slice */
    char study_uid[SCP_UID_MAX], series_uid[SCP_UID_MAX];
    int dropped_not_ct;       /* objects of another SOP class (screen captures, ...) */
    int dropped_localizers;   /* localizers, scouts, images off the main plane */
    int dropped_inconsistent; /* other size, or no position/orientation */
    int missing_slices;       /* slices missing from gaps along the normal */
    int duplicate_positions;  /* neighbours at (almost) the same position */
    char note[512];           /* human-readable summary of the above, "" when clean */
};

/* Reads the headers of paths (npaths files of one series) and builds the
 * volume. Files that are not images of the series are skipped and counted.
 * Returns 0, or -1 with a message when nothing usable remains or a file
 * cannot be read. The caller frees with triage_volume_free(). */
int triage_volume_build(const char *const *paths, int npaths, struct triage_volume *out, char *err,
                        size_t errlen);
void triage_volume_free(struct triage_volume *v);

/* True when ImageType (backslash-separated) names a localizer or scout. */
bool triage_image_type_is_localizer(const char *image_type);

/* True when orientation (6 direction cosines) is axial enough for the model:
 * its normal within max_tilt_deg of the patient's head-foot axis. */
bool triage_orientation_axial(const double orientation[6], double max_tilt_deg);

/* Whether the model may run on the built volume, as the node and `ichtriage
 * predict` both decide: slices axial within max_tilt_deg, and at least
 * min_slices of them placed. Returns 0; 1 (not axial: the series is not
 * applicable) or 2 (too few placed: it fails) with the reason in err. */
int triage_volume_check(const struct triage_volume *v, double max_tilt_deg, int min_slices,
                        char *err, size_t errlen);

#endif

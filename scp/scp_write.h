/* Writing DICOM objects with dcmtk behind a C API: CT images (phantoms) now;
 * SR and Secondary Capture writers belong beside it. The caller fills plain
 * structs; nothing here keeps state between calls. */
#ifndef SCP_WRITE_H
#define SCP_WRITE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Patient and study attributes shared by every instance of a study. Strings
 * are plain ASCII (ISO_IR 100 is declared); an empty string writes an empty
 * Type 2 element. Dates are YYYYMMDD, times HHMMSS. */
struct scp_ct_study {
    const char *patient_name;
    const char *patient_id;
    const char *patient_birth_date;
    const char *patient_sex; /* "M", "F", "O" or "" */
    const char *study_uid;
    const char *study_date;
    const char *study_time;
    const char *study_id;
    const char *accession;
    const char *study_desc;
    const char *referring_physician;
};

/* Attributes shared by every instance of a series. */
struct scp_ct_series {
    const char *series_uid;
    const char *frame_of_ref_uid;
    const char *series_desc;
    const char *manufacturer;
    const char *model_name;
    const char *convolution_kernel;
    const char *body_part; /* "HEAD" */
    int series_number;
    double kvp;
    double slice_thickness;  /* mm */
    double pixel_spacing[2]; /* row spacing, column spacing (mm) */
    double orientation[6];   /* ImageOrientationPatient */
    double window_center, window_width;
};

/* One single-frame CT image: stored values with BitsStored 12, unsigned,
 * so stored = (HU - rescale_intercept) / rescale_slope must lie in 0..4095. */
struct scp_ct_image {
    const char *sop_uid;
    int instance_number;
    double position[3]; /* ImagePositionPatient of the first pixel (mm) */
    double slice_location;
    double rescale_slope, rescale_intercept;
    int rows, columns;
    const uint16_t *pixels; /* rows * columns, row by row; borrowed */
};

/* Writes a CT Image Storage object to path (Explicit VR Little Endian, with
 * the file meta header), replacing any file there. Returns 0, or -1 with a
 * message in err (size errlen). Never throws. */
int scp_write_ct(const char *path, const struct scp_ct_study *study,
                 const struct scp_ct_series *series, const struct scp_ct_image *image, char *err,
                 unsigned long errlen);

#ifdef __cplusplus
}
#endif

#endif

/* The attributes of one DICOM instance that the node indexes and that triage,
 * training and the phantom round-trip need, read from a file's header with
 * dcmtk (pixel data is not loaded). C API over scp/'s C++ layer. */
#ifndef SCP_INFO_H
#define SCP_INFO_H

#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SCP_UID_MAX 65 /* 64 characters + NUL */
/* Deepest nesting of sequences the node parses. dcmtk parses nested
 * sequences by recursion with no limit of its own; thousands of levels
 * overflow a thread's stack. Real objects (SR content trees included) stay
 * far below this. */
#define SCP_NESTING_MAX 128
/* Most data elements (items and delimiters included) the node parses in one
 * dataset. dcmtk keeps an object of about 200 bytes for each, so a dataset
 * of tiny elements under the size cap would need some 28 times its size in
 * memory (a 48 MB one took 1.35 GB). The largest real objects, enhanced
 * multi-frame CT with per-frame groups for thousands of frames, hold a few
 * hundred thousand. */
#define SCP_ELEMENTS_MAX 1000000

struct scp_info {
    char sop_class[SCP_UID_MAX];
    char sop_uid[SCP_UID_MAX];
    char study_uid[SCP_UID_MAX];
    char series_uid[SCP_UID_MAX];
    char transfer_syntax[SCP_UID_MAX]; /* from the file meta header */
    char frame_of_ref_uid[SCP_UID_MAX];
    char patient_id[65];
    char patient_name[325]; /* as stored, in specific_charset */
    char specific_charset[129];
    char patient_birth_date[9];
    char patient_sex[17];
    char accession[17];
    char study_id[17];
    char study_date[9];
    char study_time[17];
    char study_desc[65];
    char modality[17];
    char body_part[17];
    char series_desc[65];
    char image_type[129]; /* backslash-separated values */
    char manufacturer[65];
    char station_name[17];
    char convolution_kernel[65];
    int series_number;   /* -1 when absent */
    int instance_number; /* -1 when absent */
    int rows, columns;   /* 0 when absent */
    int bits_allocated, bits_stored, pixel_representation, samples_per_pixel;
    int number_of_frames;      /* 1 for single-frame objects */
    int images_in_acquisition; /* (0020,1002); 0 when absent */
    bool has_pixel_spacing, has_position, has_orientation, has_pixel_data;
    double pixel_spacing[2]; /* row spacing, column spacing (mm) */
    double slice_thickness;  /* 0 when absent */
    /* ImagePositionPatient and ImageOrientationPatient; has_position and
     * has_orientation are false when a value is missing or not finite. */
    double position[3];
    double orientation[6];
    double rescale_slope, rescale_intercept; /* 1 and 0 when absent */
    double window_center, window_width;      /* 0 when absent */
    /* The first of the UIDs above (SOP class, SOP instance, study, series,
     * frame of reference) longer than 64 characters, which its field holds
     * cut to 64: "study" etc. (a static string), with its length; NULL when
     * none is. */
    const char *overlong_uid;
    int overlong_uid_len;
};

/* Reads the attributes of the DICOM file at path into *out (zeroed first).
 * Large element values are left on disk. Returns 0, or -1 with a message in
 * err (size errlen) when the file cannot be parsed as DICOM or nests
 * sequences deeper than SCP_NESTING_MAX. Missing
 * attributes are left at their documented defaults; validation is the
 * caller's choice. Never throws. */
int scp_info_read(const char *path, struct scp_info *out, char *err, unsigned long errlen);

/* Walks the element headers of the DICOM file at path (any transfer syntax
 * the node accepts; a deflated dataset is inflated as it is walked) and
 * returns -1 with a message in err when sequences nest deeper than
 * max_levels or there are more than SCP_ELEMENTS_MAX elements, else 0 (also for a file it cannot
 * read: the parser judges those). Memory is bounded by max_levels; values are seeked over, not
 * read. scp_info_read and scp_info_frames run it before dcmtk parses the file. Never throws;
 * thread-safe. */
int scp_nesting_check(const char *path, int max_levels, char *err, unsigned long errlen);

/* The SHA-256 (64 hex digits and a NUL into out) of the dataset of the
 * DICOM file at path, without its meta header: for a stored instance, the
 * bytes as its sender sent them, the index's content_digest. Returns 0, or
 * -1 with a message in err. Never throws; thread-safe. */
int scp_dataset_digest(const char *path, char out[65], char *err, unsigned long errlen);

/* The SHA-256 (64 hex digits and a NUL into out) of the bytes of the file
 * at path from offset on, any file (`ichtriage backup` lists its copies
 * with it); *size: how many bytes that was. Returns 0, or -1 with a
 * message in err. Never throws; thread-safe. */
int scp_file_digest(const char *path, long offset, char out[65], long long *size, char *err,
                    unsigned long errlen);

/* For multi-frame (enhanced) images: the position of each frame, from the
 * per-frame functional groups (PlanePositionSequence), into positions
 * [max * 3] (NaN, NaN, NaN for a frame without one, or with a value that is
 * not finite), and the orientation and
 * pixel spacing from the shared (or first per-frame) functional groups,
 * where has_* say whether they were found. Returns the number of frames
 * whose group was read (at most max), or -1 with a message when the file
 * cannot be parsed. */
int scp_info_frames(const char *path, int max, double *positions, double orientation[6],
                    bool *has_orientation, double spacing[2], bool *has_spacing, char *err,
                    unsigned long errlen);

/* dcmtk logs on its own to stderr in its own format; the node logs what
 * matters itself. verbose != 0 lets dcmtk's warnings through (log.level
 * debug), else only its fatal errors. */
void scp_log_init(int verbose);

/* True when uid is a usable DICOM UID: 1..64 characters of digits and dots,
 * not starting or ending with a dot. Everything the node puts in a path
 * passes this check first. */
bool scp_uid_valid(const char *uid);

/* True for the SOP classes the node accepts for storage (image storage
 * classes and the objects PACS send along with them). */
bool scp_sop_class_storable(const char *sop_class);
/* True for CT Image Storage and Enhanced CT Image Storage. */
bool scp_sop_class_is_ct(const char *sop_class);

#ifdef __cplusplus
}
#endif

#endif

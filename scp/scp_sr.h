/* The node's result as DICOM objects: a Comprehensive SR (this file) and a
 * Secondary Capture summary image (scp_sc.h), both in a new series of the
 * triaged study. Patient and study attributes are copied element by element
 * from one instance of that study, so names keep their bytes and their
 * Specific Character Set. Every object says who made it (Manufacturer
 * SCP_DERIVED_MANUFACTURER) and that it is decision support, not a
 * diagnosis. Nothing here keeps state between calls; thread-safe. */
#ifndef SCP_SR_H
#define SCP_SR_H

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Manufacturer (0008,0070) of every object the node writes: with the SR and
 * SC SOP classes (never CT), it marks objects that come back as our own. */
#define SCP_DERIVED_MANUFACTURER "ichtriage"

/* What the SR and the SC share. Strings are borrowed for the call. */
struct scp_derived {
    const char *source_path; /* an instance of the study; its patient/study attributes are copied */
    const char *series_uid, *sop_uid; /* of the new object (scp_uid_new) */
    int series_number, instance_number;
    const char *series_desc;
    const char *software_version; /* SoftwareVersions: ichtriage's own version */
};

/* A new UID under dcmtk's root into out (size at least 65). */
void scp_uid_new(char *out, size_t len);

/* One slice the finding is best seen on: a reference to the original
 * instance (frame >= 1 for a frame of a multi-frame object, 0 otherwise). */
struct scp_sr_image_ref {
    const char *sop_class, *sop_uid;
    int frame;
};

#define SCP_SR_SUBTYPES                                                                            \
    5 /* epidural, intraparenchymal, intraventricular, subarachnoid, subdural                      \
       */

struct scp_sr_content {
    bool suspected; /* the model's threshold was reached */
    double p_any;   /* 0..1 */
    double p_subtype[SCP_SR_SUBTYPES];
    double subtype_threshold; /* subtypes at or above it are listed as suspected */
    const char *model_name, *model_version;
    const char *ref_series_uid; /* the series the referenced images belong to */
    const struct scp_sr_image_ref *refs;
    int nrefs;
    int revision; /* 1, 2, ...: a re-triaged study sends a new revision */
    /* The SR of the previous revision, which this one replaces (Predecessor
     * Documents Sequence); NULL or "": none. */
    const char *predecessor_series_uid, *predecessor_sop_uid;
};

/* Writes a Comprehensive SR to path (Explicit VR Little Endian, file meta
 * header), replacing any file there. Returns 0, or -1 with a message in err.
 * Never throws. */
int scp_write_sr(const char *path, const struct scp_derived *d, const struct scp_sr_content *c,
                 char *err, unsigned long errlen);

#ifdef __cplusplus
}
#endif

#endif

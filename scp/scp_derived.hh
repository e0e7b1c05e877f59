// scp/scp_derived.hh: what scp_sr.cc, scp_sc.cc and scp_write.cc share (C++
// only, never included from C).
#ifndef SCP_DERIVED_HH
#define SCP_DERIVED_HH

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dctk.h>

#include <string>

#include "scp_sr.h"

// Copies the Patient and General Study attributes (and Specific Character
// Set) of the file at source into dst; Type 2 attributes the source lacks are
// written empty. Returns false with why.
bool scp_copy_patient_study(const char *source, DcmItem *dst, std::string &study_uid,
                            std::string &why);

// Sets the SOP Common, General Series and General Equipment attributes that
// both objects take from d (modality: "SR" or "OT").
OFCondition scp_put_derived(DcmItem *dst, const scp_derived *d, const char *modality);

// Writes file to path (explicit VR little endian). On failure returns false
// with why: dcmtk's reason and, where the system gave one, the system's (a
// full disk: "No space left on device"), and removes what was written (a
// regular file; never a device or a link).
bool scp_save_file(DcmFileFormat &file, const char *path, std::string &why);

#endif

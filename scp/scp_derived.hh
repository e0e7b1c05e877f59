// scp/scp_derived.hh: what scp_sr.cc and scp_sc.cc share (C++ only, never
// included from C).
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

#endif

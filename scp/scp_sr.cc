// scp/scp_sr.cc: the result as a Comprehensive SR (dcmsr's DSRDocument), in
// the spirit of TID 1500: a finding (suspected yes/no), probabilities, the
// suspected subtypes, key slices as image references, the algorithm's name
// and version, and "decision support, not a diagnosis". Also the attribute
// copying both derived objects use (scp_derived.hh). C API in scp_sr.h; no
// exception leaves this file.
#include "scp_derived.hh"

#include <dcmtk/dcmdata/dcuid.h>
#include <dcmtk/dcmsr/dsrdoc.h>

#include <cstdio>
#include <exception>

namespace
{

void set_err(char *err, unsigned long errlen, const std::string &msg)
{
    if (err && errlen > 0) std::snprintf(err, errlen, "%s", msg.c_str());
}

// Codes of our own, in a private coding scheme (designators starting with
// "99" are private by definition); standard codes where one fits exactly.
const char *const kScheme = "99ICHT";
const char *const kSubtypeNames[SCP_SR_SUBTYPES] = {"epidural", "intraparenchymal",
                                                    "intraventricular", "subarachnoid", "subdural"};

DSRCodedEntryValue own(const char *value, const std::string &meaning)
{
    return DSRCodedEntryValue(value, kScheme, meaning.c_str());
}

std::string prob(double p)
{
    char b[32];
    std::snprintf(b, sizeof b, "%.4f", p < 0 ? 0.0 : p > 1 ? 1.0 : p);
    return b;
}

// Adds one child (first) or sibling item and gives it a concept name; the
// tree's cursor is on the new item afterwards.
struct tree_writer {
    DSRDocumentTree &t;
    OFCondition first = EC_Normal;

    void keep(const OFCondition &c)
    {
        if (c.bad() && first.good()) first = c;
    }
    DSRContentItem &add(DSRTypes::E_RelationshipType rel, DSRTypes::E_ValueType vt,
                        DSRTypes::E_AddMode mode, const DSRCodedEntryValue &concept)
    {
        if (t.addContentItem(rel, vt, mode) == 0) keep(SR_EC_CannotAddContentItem);
        DSRContentItem &it = t.getCurrentContentItem();
        keep(it.setConceptName(concept));
        return it;
    }
};

using T = DSRTypes;

bool build_tree(DSRDocument &doc, const scp_sr_content *c, std::string &why)
{
    tree_writer w{doc.getTree()};
    w.add(T::RT_isRoot, T::VT_Container, T::AM_afterCurrent,
          DSRCodedEntryValue("126000", "DCM", "Imaging Measurement Report"));
    // Who observed: a device (TID 1004 in spirit).
    w.keep(w.add(T::RT_hasObsContext, T::VT_Code, T::AM_belowCurrent,
                 DSRCodedEntryValue("121005", "DCM", "Observer Type"))
               .setCodeValue(DSRCodedEntryValue("121007", "DCM", "Device")));
    w.keep(w.add(T::RT_hasObsContext, T::VT_Text, T::AM_afterCurrent,
                 DSRCodedEntryValue("121013", "DCM", "Device Observer Name"))
               .setStringValue("ichtriage"));
    w.keep(w.add(T::RT_hasObsContext, T::VT_Text, T::AM_afterCurrent,
                 DSRCodedEntryValue("121015", "DCM", "Device Observer Model Name"))
               .setStringValue(c->model_name && *c->model_name ? c->model_name : "unknown"));
    // The finding.
    w.keep(w.add(T::RT_contains, T::VT_Code, T::AM_afterCurrent,
                 own("ICH001", "Intracranial hemorrhage suspected"))
               .setCodeValue(c->suspected ? DSRCodedEntryValue("373066001", "SCT", "Yes")
                                          : DSRCodedEntryValue("373067005", "SCT", "No")));
    const DSRCodedEntryValue no_units("1", "UCUM", "no units");
    w.keep(w.add(T::RT_contains, T::VT_Num, T::AM_afterCurrent,
                 own("ICH002", "Probability of intracranial hemorrhage"))
               .setNumericValue(DSRNumericMeasurementValue(prob(c->p_any).c_str(), no_units)));
    for (int i = 0; i < SCP_SR_SUBTYPES; i++) {
        char code[16];
        std::snprintf(code, sizeof code, "ICH01%d", i);
        w.keep(w.add(T::RT_contains, T::VT_Num, T::AM_afterCurrent,
                     own(code, std::string("Probability of ") + kSubtypeNames[i] + " hemorrhage"))
                   .setNumericValue(
                       DSRNumericMeasurementValue(prob(c->p_subtype[i]).c_str(), no_units)));
    }
    for (int i = 0; i < SCP_SR_SUBTYPES; i++) {
        if (!(c->p_subtype[i] >= c->subtype_threshold)) continue;
        char code[16];
        std::snprintf(code, sizeof code, "ICH02%d", i);
        w.keep(w.add(T::RT_contains, T::VT_Code, T::AM_afterCurrent,
                     own("ICH003", "Suspected hemorrhage subtype"))
                   .setCodeValue(own(code, std::string(kSubtypeNames[i]) + " hemorrhage")));
    }
    for (int i = 0; i < c->nrefs; i++) {
        const scp_sr_image_ref &r = c->refs[i];
        DSRImageReferenceValue ref(r.sop_class, r.sop_uid);
        if (r.frame > 0) ref.getFrameList().addItem((Sint32)r.frame);
        w.keep(w.add(T::RT_contains, T::VT_Image, T::AM_afterCurrent,
                     DSRCodedEntryValue("121080", "DCM", "Best illustration of finding"))
                   .setImageReference(ref));
    }
    w.keep(w.add(T::RT_contains, T::VT_Text, T::AM_afterCurrent,
                 DSRCodedEntryValue("111001", "DCM", "Algorithm Name"))
               .setStringValue(c->model_name && *c->model_name ? c->model_name : "unknown"));
    w.keep(
        w.add(T::RT_contains, T::VT_Text, T::AM_afterCurrent,
              DSRCodedEntryValue("111003", "DCM", "Algorithm Version"))
            .setStringValue(c->model_version && *c->model_version ? c->model_version : "unknown"));
    char note[512];
    std::snprintf(note, sizeof note,
                  "Decision support, not a diagnosis. Automated triage of head CT for "
                  "intracranial hemorrhage by ichtriage (revision %d of this result); "
                  "subtypes with probability >= %.2f are listed as suspected. A radiologist "
                  "reads every study.",
                  c->revision, c->subtype_threshold);
    w.keep(w.add(T::RT_contains, T::VT_Text, T::AM_afterCurrent,
                 DSRCodedEntryValue("121106", "DCM", "Comment"))
               .setStringValue(note));
    if (w.first.bad()) {
        why = std::string("SR content: ") + w.first.text();
        return false;
    }
    return true;
}

const DcmTagKey kPatientStudy[] = {
    DCM_SpecificCharacterSet,
    DCM_PatientName,
    DCM_PatientID,
    DCM_IssuerOfPatientID,
    DCM_PatientBirthDate,
    DCM_PatientSex,
    DCM_PatientAge,
    DCM_StudyInstanceUID,
    DCM_StudyDate,
    DCM_StudyTime,
    DCM_ReferringPhysicianName,
    DCM_StudyID,
    DCM_AccessionNumber,
    DCM_StudyDescription,
};
// Type 2 in the Patient and General Study modules: present even if empty.
const DcmTagKey kType2[] = {
    DCM_PatientName,    DCM_PatientID, DCM_PatientBirthDate,       DCM_PatientSex,
    DCM_StudyDate,      DCM_StudyTime, DCM_ReferringPhysicianName, DCM_StudyID,
    DCM_AccessionNumber};

int write_sr(const char *path, const scp_derived *d, const scp_sr_content *c, char *err,
             unsigned long errlen)
{
    if (!path || !d || !c || !d->series_uid || !*d->series_uid || !d->sop_uid || !*d->sop_uid ||
        (c->nrefs > 0 && !c->refs) || c->nrefs < 0) {
        set_err(err, errlen, "scp_write_sr: bad arguments");
        return -1;
    }
    DcmFileFormat file;
    DcmDataset *ds = file.getDataset();
    std::string study_uid, why;
    DcmItem patient;
    if (!scp_copy_patient_study(d->source_path, &patient, study_uid, why)) {
        set_err(err, errlen, "scp_write_sr: " + why);
        return -1;
    }
    DSRDocument doc(DSRTypes::DT_ComprehensiveSR);
    OFCondition cond = doc.createNewSeriesInStudy(study_uid.c_str());
    if (cond.good() && !build_tree(doc, c, why)) {
        set_err(err, errlen, "scp_write_sr: " + why);
        return -1;
    }
    // Every referenced image is evidence of this report.
    for (int i = 0; cond.good() && i < c->nrefs; i++)
        cond = doc.getCurrentRequestedProcedureEvidence().addItem(
            study_uid.c_str(), c->ref_series_uid ? c->ref_series_uid : "", c->refs[i].sop_class,
            c->refs[i].sop_uid);
    if (cond.good() && c->predecessor_sop_uid && *c->predecessor_sop_uid &&
        c->predecessor_series_uid && *c->predecessor_series_uid)
        cond = doc.getPredecessorDocuments().addItem(study_uid.c_str(), c->predecessor_series_uid,
                                                     UID_ComprehensiveSRStorage,
                                                     c->predecessor_sop_uid);
    if (cond.good())
        cond = doc.getCodingSchemeIdentification().addItem(kScheme, "", "ichtriage result codes",
                                                           "ichtriage project");
    if (cond.good()) cond = doc.completeDocument();
    if (cond.good()) cond = doc.write(*ds);
    if (cond.bad()) {
        set_err(err, errlen, std::string("scp_write_sr: ") + cond.text());
        return -1;
    }
    for (DcmObject *o = patient.nextInContainer(nullptr); o; o = patient.nextInContainer(o))
        ds->insert(static_cast<DcmElement *>(o->clone()), true);
    cond = scp_put_derived(ds, d, "SR");
    if (cond.bad()) why = cond.text();
    if (cond.bad() || !scp_save_file(file, path, why)) {
        set_err(err, errlen, std::string("scp_write_sr: ") + path + ": " + why);
        return -1;
    }
    return 0;
}

} // namespace

bool scp_copy_patient_study(const char *source, DcmItem *dst, std::string &study_uid,
                            std::string &why)
{
    if (!source || !*source) {
        why = "no source instance";
        return false;
    }
    DcmFileFormat src;
    OFCondition c = src.loadFile(source, EXS_Unknown, EGL_noChange, 4096);
    if (c.bad()) {
        why = std::string("cannot read ") + source + ": " + c.text();
        return false;
    }
    DcmDataset *sd = src.getDataset();
    for (const DcmTagKey &tag : kPatientStudy) {
        DcmElement *e = nullptr;
        if (sd->findAndGetElement(tag, e).good() && e)
            dst->insert(static_cast<DcmElement *>(e->clone()), true);
    }
    for (const DcmTagKey &tag : kType2)
        if (!dst->tagExists(tag)) dst->insertEmptyElement(tag);
    OFString uid;
    if (dst->findAndGetOFString(DCM_StudyInstanceUID, uid).bad() || uid.empty()) {
        why = std::string(source) + " has no Study Instance UID";
        return false;
    }
    study_uid = uid.c_str();
    return true;
}

OFCondition scp_put_derived(DcmItem *dst, const scp_derived *d, const char *modality)
{
    OFCondition c = dst->putAndInsertString(DCM_SOPInstanceUID, d->sop_uid);
    if (c.good()) c = dst->putAndInsertString(DCM_SeriesInstanceUID, d->series_uid);
    if (c.good()) c = dst->putAndInsertString(DCM_Modality, modality);
    if (c.good())
        c = dst->putAndInsertString(DCM_SeriesNumber, std::to_string(d->series_number).c_str());
    if (c.good())
        c = dst->putAndInsertString(DCM_InstanceNumber, std::to_string(d->instance_number).c_str());
    if (c.good())
        c = dst->putAndInsertString(DCM_SeriesDescription, d->series_desc ? d->series_desc : "");
    if (c.good()) c = dst->putAndInsertString(DCM_Manufacturer, SCP_DERIVED_MANUFACTURER);
    if (c.good())
        c = dst->putAndInsertString(DCM_SoftwareVersions,
                                    d->software_version ? d->software_version : "");
    if (c.good()) c = dst->putAndInsertString(DCM_ManufacturerModelName, "ichtriage");
    return c;
}

extern "C" void scp_uid_new(char *out, size_t len)
{
    char buf[100];
    dcmGenerateUniqueIdentifier(buf, SITE_INSTANCE_UID_ROOT);
    std::snprintf(out, len, "%s", buf);
}

extern "C" int scp_write_sr(const char *path, const struct scp_derived *d,
                            const struct scp_sr_content *c, char *err, unsigned long errlen)
{
    try {
        return write_sr(path, d, c, err, errlen);
    } catch (const std::exception &e) {
        set_err(err, errlen, std::string("scp_write_sr: ") + e.what());
    } catch (...) {
        set_err(err, errlen, "scp_write_sr: unknown exception");
    }
    return -1;
}

// scp/scp_sc.cc: the summary image as a Secondary Capture object. C API in
// scp_sc.h; no exception leaves this file.
#include "scp_sc.h"

#include "scp_derived.hh"

#include <dcmtk/dcmdata/dcuid.h>

#include <cstdio>
#include <ctime>
#include <exception>

namespace
{

void set_err(char *err, unsigned long errlen, const std::string &msg)
{
    if (err && errlen > 0) std::snprintf(err, errlen, "%s", msg.c_str());
}

int write_sc(const char *path, const scp_derived *d, const uint8_t *rgb, int rows, int columns,
             const scp_sr_image_ref *src, char *err, unsigned long errlen)
{
    if (!path || !d || !rgb || rows <= 0 || columns <= 0 || rows > 4096 || columns > 4096 ||
        !d->series_uid || !*d->series_uid || !d->sop_uid || !*d->sop_uid) {
        set_err(err, errlen, "scp_write_sc: bad arguments");
        return -1;
    }
    DcmFileFormat file;
    DcmDataset *ds = file.getDataset();
    std::string study_uid, why;
    if (!scp_copy_patient_study(d->source_path, ds, study_uid, why)) {
        set_err(err, errlen, "scp_write_sc: " + why);
        return -1;
    }
    char date[16], tm_s[16];
    std::time_t now = std::time(nullptr);
    struct tm t;
    localtime_r(&now, &t);
    std::strftime(date, sizeof date, "%Y%m%d", &t);
    std::strftime(tm_s, sizeof tm_s, "%H%M%S", &t);

    OFCondition c = ds->putAndInsertString(DCM_SOPClassUID, UID_SecondaryCaptureImageStorage);
    if (c.good()) c = scp_put_derived(ds, d, "OT");
    struct kv {
        DcmTagKey tag;
        const char *value;
    } const strs[] = {
        {DCM_InstanceCreationDate, date},
        {DCM_InstanceCreationTime, tm_s},
        {DCM_SeriesDate, date},
        {DCM_SeriesTime, tm_s},
        {DCM_ConversionType, "WSD"}, // workstation: drawn, not digitised
        {DCM_DateOfSecondaryCapture, date},
        {DCM_TimeOfSecondaryCapture, tm_s},
        {DCM_ContentDate, date},
        {DCM_ContentTime, tm_s},
        {DCM_PatientOrientation, ""},
        // Laterality (Type 2C) is absent: the head is not a paired structure.
        {DCM_BodyPartExamined, "HEAD"},
        {DCM_ImageType, "DERIVED\\SECONDARY"},
        {DCM_DerivationDescription,
         "ichtriage summary: key slice (brain window 40/80), per-slice probability of "
         "hemorrhage, finding. Decision support, not a diagnosis."},
        // The text drawn into the picture identifies nobody.
        {DCM_BurnedInAnnotation, "NO"},
        {DCM_RecognizableVisualFeatures, "NO"},
        {DCM_LossyImageCompression, "00"},
        {DCM_PhotometricInterpretation, "RGB"},
    };
    for (const kv &e : strs)
        if (c.good()) c = ds->putAndInsertString(e.tag, e.value);
    if (c.good()) c = ds->putAndInsertUint16(DCM_SamplesPerPixel, 3);
    if (c.good()) c = ds->putAndInsertUint16(DCM_PlanarConfiguration, 0);
    if (c.good()) c = ds->putAndInsertUint16(DCM_Rows, (Uint16)rows);
    if (c.good()) c = ds->putAndInsertUint16(DCM_Columns, (Uint16)columns);
    if (c.good()) c = ds->putAndInsertUint16(DCM_BitsAllocated, 8);
    if (c.good()) c = ds->putAndInsertUint16(DCM_BitsStored, 8);
    if (c.good()) c = ds->putAndInsertUint16(DCM_HighBit, 7);
    if (c.good()) c = ds->putAndInsertUint16(DCM_PixelRepresentation, 0);
    if (c.good())
        c = ds->putAndInsertUint8Array(DCM_PixelData, rgb, (unsigned long)rows * columns * 3);
    if (c.good() && src && src->sop_class && *src->sop_class && src->sop_uid && *src->sop_uid) {
        DcmItem *item = nullptr;
        c = ds->findOrCreateSequenceItem(DCM_SourceImageSequence, item, -2);
        if (c.good()) c = item->putAndInsertString(DCM_ReferencedSOPClassUID, src->sop_class);
        if (c.good()) c = item->putAndInsertString(DCM_ReferencedSOPInstanceUID, src->sop_uid);
        if (c.good() && src->frame > 0)
            c = item->putAndInsertString(DCM_ReferencedFrameNumber,
                                         std::to_string(src->frame).c_str());
    }
    if (c.bad()) why = c.text();
    if (c.bad() || !scp_save_file(file, path, why)) {
        set_err(err, errlen, std::string("scp_write_sc: ") + path + ": " + why);
        return -1;
    }
    return 0;
}

} // namespace

extern "C" int scp_write_sc(const char *path, const struct scp_derived *d, const uint8_t *rgb,
                            int rows, int columns, const struct scp_sr_image_ref *source, char *err,
                            unsigned long errlen)
{
    try {
        return write_sc(path, d, rgb, rows, columns, source, err, errlen);
    } catch (const std::exception &e) {
        set_err(err, errlen, std::string("scp_write_sc: ") + e.what());
    } catch (...) {
        set_err(err, errlen, "scp_write_sc: unknown exception");
    }
    return -1;
}

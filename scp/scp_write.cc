// scp/scp_write.cc: writing DICOM objects with dcmtk (CT images for the
// phantom generator). C API in scp_write.h; no exception leaves this file.
#include "scp_write.h"

#include "scp_derived.hh"

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dctk.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <sys/stat.h>
#include <unistd.h>

namespace
{

void set_err(char *err, unsigned long errlen, const std::string &msg)
{
    if (err && errlen > 0) std::snprintf(err, errlen, "%s", msg.c_str());
}

// Decimal strings are at most 16 characters; %.8g always fits.
std::string ds(double v)
{
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.8g", v);
    return buf;
}

std::string ds_multi(const double *v, int n)
{
    std::string s;
    for (int i = 0; i < n; i++) {
        if (i) s += '\\';
        s += ds(v[i]);
    }
    return s;
}

const char *or_empty(const char *s)
{
    return s ? s : "";
}

// Collects the first failing status so that the long list of puts below
// reads as a list of attributes rather than a list of checks.
struct putter {
    explicit putter(DcmDataset *d) : ds(d) {}
    DcmDataset *ds;
    OFCondition first = EC_Normal;
    std::string what;

    void str(const DcmTagKey &tag, const char *value)
    {
        OFCondition c = ds->putAndInsertString(tag, or_empty(value));
        keep(c, tag);
    }
    void str(const DcmTagKey &tag, const std::string &value)
    {
        str(tag, value.c_str());
    }
    void u16(const DcmTagKey &tag, Uint16 value)
    {
        keep(ds->putAndInsertUint16(tag, value), tag);
    }
    void keep(const OFCondition &c, const DcmTagKey &tag)
    {
        if (c.bad() && first.good()) {
            first = c;
            what = DcmTag(tag).getTagName();
        }
    }
};

int write_ct(const char *path, const scp_ct_study *st, const scp_ct_series *se,
             const scp_ct_image *im, char *err, unsigned long errlen)
{
    if (!path || !st || !se || !im || !im->pixels || im->rows <= 0 || im->columns <= 0 ||
        im->rows > 65535 || im->columns > 65535) {
        set_err(err, errlen, "scp_write_ct: bad arguments");
        return -1;
    }
    if (!im->sop_uid || !*im->sop_uid || !st->study_uid || !*st->study_uid || !se->series_uid ||
        !*se->series_uid || !se->frame_of_ref_uid || !*se->frame_of_ref_uid) {
        set_err(err, errlen, "scp_write_ct: missing UID");
        return -1;
    }
    DcmFileFormat file;
    putter p(file.getDataset());

    // SOP Common
    p.str(DCM_SpecificCharacterSet, "ISO_IR 100");
    p.str(DCM_SOPClassUID, UID_CTImageStorage);
    p.str(DCM_SOPInstanceUID, im->sop_uid);
    p.str(DCM_InstanceCreationDate, st->study_date);
    p.str(DCM_InstanceCreationTime, st->study_time);
    // Patient
    p.str(DCM_PatientName, st->patient_name);
    p.str(DCM_PatientID, st->patient_id);
    p.str(DCM_PatientBirthDate, st->patient_birth_date);
    p.str(DCM_PatientSex, st->patient_sex);
    // General Study
    p.str(DCM_StudyInstanceUID, st->study_uid);
    p.str(DCM_StudyDate, st->study_date);
    p.str(DCM_StudyTime, st->study_time);
    p.str(DCM_ReferringPhysicianName, st->referring_physician);
    p.str(DCM_StudyID, st->study_id);
    p.str(DCM_AccessionNumber, st->accession);
    p.str(DCM_StudyDescription, st->study_desc);
    // General Series
    p.str(DCM_Modality, "CT");
    p.str(DCM_SeriesInstanceUID, se->series_uid);
    p.str(DCM_SeriesNumber, std::to_string(se->series_number));
    p.str(DCM_SeriesDescription, se->series_desc);
    p.str(DCM_SeriesDate, st->study_date);
    p.str(DCM_SeriesTime, st->study_time);
    p.str(DCM_PatientPosition, "HFS");
    p.str(DCM_BodyPartExamined, se->body_part);
    // Frame of Reference
    p.str(DCM_FrameOfReferenceUID, se->frame_of_ref_uid);
    p.str(DCM_PositionReferenceIndicator, "");
    // General Equipment
    p.str(DCM_Manufacturer, se->manufacturer);
    p.str(DCM_ManufacturerModelName, se->model_name);
    // General Image, General Acquisition
    p.str(DCM_InstanceNumber, std::to_string(im->instance_number));
    p.str(DCM_ContentDate, st->study_date);
    p.str(DCM_ContentTime, st->study_time);
    p.str(DCM_AcquisitionDate, st->study_date);
    p.str(DCM_AcquisitionTime, st->study_time);
    p.str(DCM_AcquisitionNumber, "1");
    p.str(DCM_ImageType, "ORIGINAL\\PRIMARY\\AXIAL");
    p.str(DCM_BurnedInAnnotation, "NO");
    // Image Plane
    p.str(DCM_PixelSpacing, ds_multi(se->pixel_spacing, 2));
    p.str(DCM_ImageOrientationPatient, ds_multi(se->orientation, 6));
    p.str(DCM_ImagePositionPatient, ds_multi(im->position, 3));
    p.str(DCM_SliceThickness, ds(se->slice_thickness));
    p.str(DCM_SliceLocation, ds(im->slice_location));
    // CT Image
    p.str(DCM_KVP, ds(se->kvp));
    p.str(DCM_ConvolutionKernel, se->convolution_kernel);
    p.str(DCM_RescaleIntercept, ds(im->rescale_intercept));
    p.str(DCM_RescaleSlope, ds(im->rescale_slope));
    p.str(DCM_RescaleType, "HU");
    // VOI LUT
    if (se->window_width > 0) {
        p.str(DCM_WindowCenter, ds(se->window_center));
        p.str(DCM_WindowWidth, ds(se->window_width));
    }
    // Image Pixel
    p.u16(DCM_SamplesPerPixel, 1);
    p.str(DCM_PhotometricInterpretation, "MONOCHROME2");
    p.u16(DCM_Rows, (Uint16)im->rows);
    p.u16(DCM_Columns, (Uint16)im->columns);
    p.u16(DCM_BitsAllocated, 16);
    p.u16(DCM_BitsStored, 12);
    p.u16(DCM_HighBit, 11);
    p.u16(DCM_PixelRepresentation, 0);
    unsigned long n = (unsigned long)im->rows * (unsigned long)im->columns;
    p.keep(file.getDataset()->putAndInsertUint16Array(DCM_PixelData, im->pixels, n), DCM_PixelData);
    if (p.first.bad()) {
        set_err(err, errlen, std::string("scp_write_ct: ") + p.what + ": " + p.first.text());
        return -1;
    }
    std::string why;
    if (!scp_save_file(file, path, why)) {
        set_err(err, errlen, std::string("scp_write_ct: ") + path + ": " + why);
        return -1;
    }
    return 0;
}

} // namespace

bool scp_save_file(DcmFileFormat &file, const char *path, std::string &why)
{
    errno = 0;
    OFCondition c = file.saveFile(path, EXS_LittleEndianExplicit);
    if (c.good()) return true;
    // dcmtk says only that the stream ended; the system says why
    int sys = errno;
    why = c.text();
    if (sys != 0) why += std::string(" (") + std::strerror(sys) + ")";
    // no half-written file left behind (a device or link is not ours)
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISREG(st.st_mode)) unlink(path);
    return false;
}

extern "C" int scp_write_ct(const char *path, const struct scp_ct_study *study,
                            const struct scp_ct_series *series, const struct scp_ct_image *image,
                            char *err, unsigned long errlen)
{
    try {
        return write_ct(path, study, series, image, err, errlen);
    } catch (const std::exception &e) {
        set_err(err, errlen, std::string("scp_write_ct: ") + e.what());
    } catch (...) {
        set_err(err, errlen, "scp_write_ct: unknown exception");
    }
    return -1;
}

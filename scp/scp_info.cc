// scp/scp_info.cc: reads the attributes the node indexes from a DICOM file's
// header with dcmtk. Pixel data and other large values stay on disk.
#include "scp_info.h"

#include <algorithm>
#include <cerrno>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include <openssl/evp.h>
#include <zlib.h>

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dcistrmf.h>
#include <dcmtk/dcmdata/dctk.h>
#include <dcmtk/oflog/oflog.h>

namespace
{

// Largest element value read into memory; bigger ones (pixel data) are
// loaded lazily and never here.
const Uint32 kMaxReadLength = 4096;

// Copies the value, cut to fit n; returns its length before the cut.
size_t copy_str(DcmItem *item, const DcmTagKey &tag, char *out, size_t n)
{
    OFString v;
    out[0] = 0;
    if (item->findAndGetOFStringArray(tag, v).good()) {
        // Trailing spaces and NULs are padding in DICOM strings.
        size_t len = v.length();
        while (len > 0 && (v[len - 1] == ' ' || v[len - 1] == '\0'))
            len--;
        size_t start = 0;
        while (start < len && v[start] == ' ')
            start++;
        size_t k = len - start < n - 1 ? len - start : n - 1;
        memcpy(out, v.c_str() + start, k);
        out[k] = 0;
        return len - start;
    }
    return 0;
}

// A UID cut to fit would name another object: the first one too long is
// noted in *info for the caller to refuse.
void copy_uid(DcmItem *item, const DcmTagKey &tag, char *out, const char *name, scp_info *info)
{
    size_t len = copy_str(item, tag, out, SCP_UID_MAX);
    if (len >= SCP_UID_MAX && !info->overlong_uid) {
        info->overlong_uid = name;
        info->overlong_uid_len = (int)len;
    }
}

int get_int(DcmItem *item, const DcmTagKey &tag, int dflt)
{
    Sint32 s;
    Uint16 u;
    OFString str;
    // US elements (Rows, Columns) and IS elements (numbers as text) both occur.
    if (item->findAndGetUint16(tag, u).good()) return u;
    if (item->findAndGetSint32(tag, s).good()) return s;
    if (item->findAndGetOFString(tag, str).good()) {
        char *end = nullptr;
        long v = strtol(str.c_str(), &end, 10);
        if (end != str.c_str()) return (int)v;
    }
    return dflt;
}

bool get_doubles(DcmItem *item, const DcmTagKey &tag, double *out, int count)
{
    for (int i = 0; i < count; i++) {
        Float64 v;
        if (item->findAndGetFloat64(tag, v, (unsigned long)i).bad()) return false;
        out[i] = v;
    }
    return true;
}

// get_doubles, and every value finite: a position or orientation of NaN or
// infinity is no geometry (it would scramble the order of a whole series).
bool get_finite_doubles(DcmItem *item, const DcmTagKey &tag, double *out, int count)
{
    if (!get_doubles(item, tag, out, count)) return false;
    for (int i = 0; i < count; i++)
        if (!std::isfinite(out[i])) return false;
    return true;
}

// The first item of sequence seq inside group, or null.
DcmItem *first_item(DcmItem *group, const DcmTagKey &seq)
{
    DcmItem *item = nullptr;
    if (group && group->findAndGetSequenceItem(seq, item, 0).good()) return item;
    return nullptr;
}

// Follows the element headers of a dataset as its bytes stream by and keeps
// the open sequences and items on a bounded stack of their own, so that a
// nesting dcmtk would parse by recursion (one thread stack frame per level,
// no limit of its own) is refused before dcmtk sees it. Values are passed
// over. Explicit VR (little or big endian) and implicit VR little endian,
// which also holds inside a UN of undefined length (PS3.5 6.2.2); in implicit
// VR a defined length opens a sequence when the dictionary says SQ, as it
// does for dcmtk. Any undefined length other than Pixel Data's counts as a
// sequence, the way dcmtk reads it; the items of encapsulated pixel data are
// fragments and are passed over.
class NestWalker
{
  public:
    NestWalker(bool implicit, bool big, int max_levels, long long max_elements)
        : implicit_(implicit), big_(big), cap_(2 * max_levels), max_elements_(max_elements)
    {
        stack_.reserve((size_t)cap_);
    }
    // Feeds the next n bytes; false once the nesting is past the limit.
    bool feed(const unsigned char *p, size_t n)
    {
        const unsigned char *end = p + n;
        while (p < end && !over_) {
            long long gap = skip_until_ - pos_; // the rest of a value passed over
            if (gap > 0) {
                long long step = std::min<long long>(gap, end - p);
                p += step;
                pos_ += step;
                continue;
            }
            if (have_ == 0) close_ended();
            hdr_[have_++] = *p++;
            pos_++;
            if (have_ == need_) header();
        }
        return !over_;
    }
    // True when the walk stopped at too many elements (not too deep).
    bool too_many() const
    {
        return elements_ > max_elements_;
    }
    // Where the walk wants to read next (past a value it passes over).
    long long next() const
    {
        return skip_until_ > pos_ ? skip_until_ : pos_;
    }
    void seek(long long pos)
    {
        pos_ = pos;
    }

  private:
    struct Open {
        long long end; // -1: undefined length, closed by a delimiter
        bool item;
        bool implicit; // implicit VR little endian inside (a UN's content)
    };
    unsigned u16(const unsigned char *b, bool big) const
    {
        return big ? (b[0] << 8) | b[1] : b[0] | (b[1] << 8);
    }
    unsigned long u32(const unsigned char *b, bool big) const
    {
        return big ? ((unsigned long)b[0] << 24) | ((unsigned long)b[1] << 16) | (b[2] << 8) | b[3]
                   : b[0] | (b[1] << 8) | ((unsigned long)b[2] << 16) | ((unsigned long)b[3] << 24);
    }
    // The length field's size as dcmtk reads it (a VR it does not know has
    // the 4-byte form).
    static bool short_form(const unsigned char *vr)
    {
        char name[3] = {(char)vr[0], (char)vr[1], 0};
        return !DcmVR(name).usesExtendedLengthEncoding();
    }
    bool in_implicit() const
    {
        return stack_.empty() ? implicit_ : stack_.back().implicit;
    }
    // Sequences and items of defined length end where their length says.
    void close_ended()
    {
        while (!stack_.empty() && stack_.back().end >= 0 && pos_ >= stack_.back().end)
            stack_.pop_back();
    }
    void open(unsigned long len, bool item, bool implicit)
    {
        if ((int)stack_.size() >= cap_) {
            over_ = true;
            return;
        }
        stack_.push_back({len == 0xFFFFFFFFUL ? -1 : pos_ + (long long)len, item, implicit});
    }
    // One more element (or item, or delimiter) header read whole: dcmtk
    // keeps an object of some 200 bytes for each.
    void count()
    {
        if (++elements_ > max_elements_) over_ = true;
    }
    void header()
    {
        bool imp = in_implicit(), big = big_ && !imp;
        unsigned g = u16(hdr_, big), e = u16(hdr_ + 2, big);
        if (g == 0xFFFE) { // item or delimiter: no VR
            unsigned long len = u32(hdr_ + 4, big);
            have_ = 0;
            need_ = 8;
            count();
            if (fragments_) {
                if (e == 0xE000 && len != 0xFFFFFFFFUL)
                    skip_until_ = pos_ + (long long)len;
                else
                    fragments_ = false;
                return;
            }
            if (e == 0xE000) {
                open(len, true, imp);
            } else if (e == 0xE00D) {
                if (!stack_.empty() && stack_.back().item) stack_.pop_back();
            } else if (e == 0xE0DD) {
                if (!stack_.empty() && stack_.back().item) stack_.pop_back();
                if (!stack_.empty() && !stack_.back().item) stack_.pop_back();
            }
            return;
        }
        bool pixels = g == 0x7FE0 && e == 0x0010;
        if (imp) {
            unsigned long len = u32(hdr_ + 4, false);
            have_ = 0;
            count();
            if (len == 0xFFFFFFFFUL) {
                if (pixels)
                    fragments_ = true;
                else
                    open(len, false, true);
            } else if (DcmTag(DcmTagKey((Uint16)g, (Uint16)e)).getEVR() == EVR_SQ) {
                open(len, false, true);
            } else {
                skip_until_ = pos_ + (long long)len;
            }
            return;
        }
        if (need_ == 8 && !short_form(hdr_ + 4)) {
            need_ = 12; // two reserved bytes, then a 4-byte length
            return;
        }
        unsigned long len = need_ == 8 ? u16(hdr_ + 6, big) : u32(hdr_ + 8, big);
        bool sq = hdr_[4] == 'S' && hdr_[5] == 'Q', un = hdr_[4] == 'U' && hdr_[5] == 'N';
        have_ = 0;
        need_ = 8;
        count();
        if (len == 0xFFFFFFFFUL && pixels)
            fragments_ = true;
        else if (len == 0xFFFFFFFFUL || sq)
            open(len, false, un && len == 0xFFFFFFFFUL);
        else
            skip_until_ = pos_ + (long long)len;
    }

    bool implicit_, big_;
    int cap_;
    long long max_elements_, elements_ = 0;
    std::vector<Open> stack_;
    unsigned char hdr_[12];
    int have_ = 0, need_ = 8;
    long long pos_ = 0, skip_until_ = 0;
    bool fragments_ = false, over_ = false;
};

// The dataset's offset in a Part 10 file and its transfer syntax, read by
// dcmtk's meta header reader (offset 0 and no syntax without a preamble).
long meta_end(const char *path, OFString *ts)
{
    DcmInputFileStream in(path);
    if (!in.good()) return -1;
    DcmMetaInfo mi;
    mi.transferInit();
    OFCondition c = mi.read(in, EXS_Unknown, EGL_noChange, kMaxReadLength);
    mi.transferEnd();
    if (c.bad()) return -1;
    if (mi.findAndGetOFString(DCM_TransferSyntaxUID, *ts).bad()) ts->clear();
    return (long)in.tell();
}

} // namespace

extern "C" int scp_file_digest(const char *path, long offset, char out[65], long long *size,
                               char *err, unsigned long errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "cannot read %s: %s", path, strerror(errno));
        return -1;
    }
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    bool ok =
        md && EVP_DigestInit_ex(md, EVP_sha256(), nullptr) == 1 && fseek(f, offset, SEEK_SET) == 0;
    std::vector<unsigned char> buf(1 << 16);
    size_t n;
    *size = 0;
    while (ok && (n = fread(buf.data(), 1, buf.size(), f)) > 0) {
        ok = EVP_DigestUpdate(md, buf.data(), n) == 1;
        *size += (long long)n;
    }
    ok = ok && !ferror(f);
    unsigned char d[EVP_MAX_MD_SIZE];
    unsigned len = 0;
    ok = ok && EVP_DigestFinal_ex(md, d, &len) == 1 && len == 32;
    EVP_MD_CTX_free(md);
    fclose(f);
    if (!ok) {
        snprintf(err, errlen, "%s: cannot read it whole", path);
        return -1;
    }
    for (unsigned i = 0; i < len; i++)
        snprintf(out + 2 * i, 3, "%02x", d[i]);
    return 0;
}

extern "C" int scp_dataset_digest(const char *path, char out[65], char *err, unsigned long errlen)
{
    OFString ts;
    long start = meta_end(path, &ts);
    if (start < 0) {
        snprintf(err, errlen, "%s: cannot read a DICOM file", path);
        return -1;
    }
    long long size;
    return scp_file_digest(path, start, out, &size, err, errlen);
}

extern "C" int scp_nesting_check(const char *path, int max_levels, char *err, unsigned long errlen)
{
    OFString xfer;
    long start = meta_end(path, &xfer);
    FILE *f = start >= 0 ? fopen(path, "rb") : nullptr;
    if (!f) return 0; // the parser reports what it cannot open or read
    const char *ts = xfer.c_str();
    bool ok = true, too_many = false;
    if (fseek(f, start, SEEK_SET) == 0) {
        std::vector<unsigned char> in(1 << 16);
        bool deflated = strcmp(ts, UID_DeflatedExplicitVRLittleEndianTransferSyntax) == 0;
        bool implicit = strcmp(ts, UID_LittleEndianImplicitTransferSyntax) == 0;
        if (!ts[0]) { // no meta header: explicit when a VR follows the first tag
            size_t n = fread(in.data(), 1, 6, f);
            implicit = n == 6 && !(isupper(in[4]) && isupper(in[5]));
            fseek(f, start, SEEK_SET);
        }
        NestWalker walk(implicit, strcmp(ts, UID_BigEndianExplicitTransferSyntax) == 0, max_levels,
                        SCP_ELEMENTS_MAX);
        z_stream z;
        memset(&z, 0, sizeof z);
        if (deflated && inflateInit2(&z, -MAX_WBITS) != Z_OK) deflated = false;
        if (deflated) {
            std::vector<unsigned char> out(1 << 16);
            int rc = Z_OK;
            while (ok && rc == Z_OK) {
                if (z.avail_in == 0) {
                    size_t n = fread(in.data(), 1, in.size(), f);
                    if (n == 0) break;
                    z.next_in = in.data();
                    z.avail_in = (uInt)n;
                }
                z.next_out = out.data();
                z.avail_out = (uInt)out.size();
                rc = inflate(&z, Z_NO_FLUSH);
                ok = walk.feed(out.data(), out.size() - z.avail_out);
                if (rc == Z_BUF_ERROR) rc = Z_OK;
            }
            inflateEnd(&z);
        } else {
            long long at = 0;
            for (;;) {
                // Values passed over are not read: seek past them.
                if (walk.next() > at) {
                    at = walk.next();
                    if (fseek(f, start + at, SEEK_SET) != 0) break;
                    walk.seek(at);
                }
                size_t n = fread(in.data(), 1, in.size(), f);
                if (n == 0 || !(ok = walk.feed(in.data(), n))) break;
                at += (long long)n;
            }
        }
        too_many = walk.too_many();
    }
    fclose(f);
    if (!ok && too_many)
        snprintf(err, errlen, "more than %d data elements", SCP_ELEMENTS_MAX);
    else if (!ok)
        snprintf(err, errlen, "sequences nested deeper than %d levels", max_levels);
    return ok ? 0 : -1;
}

extern "C" int scp_info_frames(const char *path, int max, double *positions, double orientation[6],
                               bool *has_orientation, double spacing[2], bool *has_spacing,
                               char *err, unsigned long errlen)
{
    *has_orientation = false;
    *has_spacing = false;
    try {
        if (scp_nesting_check(path, SCP_NESTING_MAX, err, errlen) != 0) return -1;
        DcmFileFormat ff;
        OFCondition c =
            ff.loadFile(path, EXS_Unknown, EGL_noChange, kMaxReadLength, ERM_autoDetect);
        if (c.bad()) {
            snprintf(err, errlen, "cannot parse DICOM: %s", c.text());
            return -1;
        }
        DcmDataset *ds = ff.getDataset();
        DcmItem *shared = first_item(ds, DCM_SharedFunctionalGroupsSequence);
        DcmSequenceOfItems *per = nullptr;
        ds->findAndGetSequence(DCM_PerFrameFunctionalGroupsSequence, per);
        DcmItem *first = per && per->card() > 0 ? per->getItem(0) : nullptr;
        DcmItem *groups[2] = {shared, first};
        for (DcmItem *g : groups) {
            DcmItem *o = first_item(g, DCM_PlaneOrientationSequence);
            if (!*has_orientation && o)
                *has_orientation =
                    get_finite_doubles(o, DCM_ImageOrientationPatient, orientation, 6);
            DcmItem *m = first_item(g, DCM_PixelMeasuresSequence);
            if (!*has_spacing && m) *has_spacing = get_doubles(m, DCM_PixelSpacing, spacing, 2);
        }
        int n = 0;
        // nextInContainer, not getItem(i): the latter walks from the head.
        for (DcmObject *it = per ? per->nextInContainer(nullptr) : nullptr; it && n < max;
             it = per->nextInContainer(it)) {
            DcmItem *pp = first_item(static_cast<DcmItem *>(it), DCM_PlanePositionSequence);
            double *p = positions + 3 * n;
            if (!pp || !get_finite_doubles(pp, DCM_ImagePositionPatient, p, 3))
                p[0] = p[1] = p[2] = NAN; /* this frame only: the next ones are read */
            n++;
        }
        return n;
    } catch (const std::exception &e) {
        snprintf(err, errlen, "cannot parse DICOM: %s", e.what());
    } catch (...) {
        snprintf(err, errlen, "cannot parse DICOM: unknown error");
    }
    return -1;
}

extern "C" void scp_log_init(int verbose)
{
    OFLog::configure(verbose ? OFLogger::WARN_LOG_LEVEL : OFLogger::FATAL_LOG_LEVEL);
}

extern "C" bool scp_uid_valid(const char *uid)
{
    size_t n = uid ? strlen(uid) : 0;
    if (n == 0 || n > 64 || uid[0] == '.' || uid[n - 1] == '.') return false;
    for (size_t i = 0; i < n; i++) {
        char c = uid[i];
        if (!(c == '.' || (c >= '0' && c <= '9'))) return false;
        if (c == '.' && uid[i + 1] == '.') return false;
    }
    return true;
}

extern "C" bool scp_sop_class_is_ct(const char *sop_class)
{
    return strcmp(sop_class, UID_CTImageStorage) == 0 ||
           strcmp(sop_class, UID_EnhancedCTImageStorage) == 0;
}

extern "C" bool scp_sop_class_storable(const char *sop_class)
{
    // dcmtk's list of storage SOP classes: every image, SR and other object a
    // PACS may route along with a study.
    return dcmIsaStorageSOPClassUID(sop_class, ESSC_All);
}

extern "C" int scp_info_read(const char *path, struct scp_info *out, char *err,
                             unsigned long errlen)
{
    memset(out, 0, sizeof *out);
    out->series_number = -1;
    out->instance_number = -1;
    out->number_of_frames = 1;
    out->samples_per_pixel = 1;
    out->rescale_slope = 1.0;
    try {
        if (scp_nesting_check(path, SCP_NESTING_MAX, err, errlen) != 0) return -1;
        DcmFileFormat ff;
        OFCondition c =
            ff.loadFile(path, EXS_Unknown, EGL_noChange, kMaxReadLength, ERM_autoDetect);
        if (c.bad()) {
            snprintf(err, errlen, "cannot parse DICOM: %s", c.text());
            return -1;
        }
        DcmMetaInfo *meta = ff.getMetaInfo();
        DcmDataset *ds = ff.getDataset();
        if (!ds || ds->card() == 0) {
            snprintf(err, errlen, "cannot parse DICOM: empty dataset");
            return -1;
        }
        if (meta)
            copy_str(meta, DCM_TransferSyntaxUID, out->transfer_syntax,
                     sizeof out->transfer_syntax);
        if (!out->transfer_syntax[0]) {
            DcmXfer x(ds->getOriginalXfer());
            snprintf(out->transfer_syntax, sizeof out->transfer_syntax, "%s", x.getXferID());
        }
        copy_uid(ds, DCM_SOPClassUID, out->sop_class, "SOP class", out);
        copy_uid(ds, DCM_SOPInstanceUID, out->sop_uid, "SOP instance", out);
        copy_uid(ds, DCM_StudyInstanceUID, out->study_uid, "study", out);
        copy_uid(ds, DCM_SeriesInstanceUID, out->series_uid, "series", out);
        copy_uid(ds, DCM_FrameOfReferenceUID, out->frame_of_ref_uid, "frame of reference", out);
        copy_str(ds, DCM_PatientID, out->patient_id, sizeof out->patient_id);
        copy_str(ds, DCM_PatientName, out->patient_name, sizeof out->patient_name);
        copy_str(ds, DCM_SpecificCharacterSet, out->specific_charset, sizeof out->specific_charset);
        copy_str(ds, DCM_PatientBirthDate, out->patient_birth_date, sizeof out->patient_birth_date);
        copy_str(ds, DCM_PatientSex, out->patient_sex, sizeof out->patient_sex);
        copy_str(ds, DCM_AccessionNumber, out->accession, sizeof out->accession);
        copy_str(ds, DCM_StudyID, out->study_id, sizeof out->study_id);
        copy_str(ds, DCM_StudyDate, out->study_date, sizeof out->study_date);
        copy_str(ds, DCM_StudyTime, out->study_time, sizeof out->study_time);
        copy_str(ds, DCM_StudyDescription, out->study_desc, sizeof out->study_desc);
        copy_str(ds, DCM_Modality, out->modality, sizeof out->modality);
        copy_str(ds, DCM_BodyPartExamined, out->body_part, sizeof out->body_part);
        copy_str(ds, DCM_SeriesDescription, out->series_desc, sizeof out->series_desc);
        copy_str(ds, DCM_ImageType, out->image_type, sizeof out->image_type);
        copy_str(ds, DCM_Manufacturer, out->manufacturer, sizeof out->manufacturer);
        copy_str(ds, DCM_StationName, out->station_name, sizeof out->station_name);
        copy_str(ds, DCM_ConvolutionKernel, out->convolution_kernel,
                 sizeof out->convolution_kernel);
        out->series_number = get_int(ds, DCM_SeriesNumber, -1);
        out->instance_number = get_int(ds, DCM_InstanceNumber, -1);
        out->rows = get_int(ds, DCM_Rows, 0);
        out->columns = get_int(ds, DCM_Columns, 0);
        out->bits_allocated = get_int(ds, DCM_BitsAllocated, 0);
        out->bits_stored = get_int(ds, DCM_BitsStored, 0);
        out->pixel_representation = get_int(ds, DCM_PixelRepresentation, 0);
        out->samples_per_pixel = get_int(ds, DCM_SamplesPerPixel, 1);
        out->number_of_frames = get_int(ds, DCM_NumberOfFrames, 1);
        if (out->number_of_frames < 1) out->number_of_frames = 1;
        out->images_in_acquisition = get_int(ds, DCM_ImagesInAcquisition, 0);
        out->has_pixel_spacing = get_doubles(ds, DCM_PixelSpacing, out->pixel_spacing, 2);
        out->has_position = get_finite_doubles(ds, DCM_ImagePositionPatient, out->position, 3);
        out->has_orientation =
            get_finite_doubles(ds, DCM_ImageOrientationPatient, out->orientation, 6);
        get_doubles(ds, DCM_SliceThickness, &out->slice_thickness, 1);
        if (!get_doubles(ds, DCM_RescaleSlope, &out->rescale_slope, 1)) out->rescale_slope = 1.0;
        get_doubles(ds, DCM_RescaleIntercept, &out->rescale_intercept, 1);
        get_doubles(ds, DCM_WindowCenter, &out->window_center, 1);
        get_doubles(ds, DCM_WindowWidth, &out->window_width, 1);
        out->has_pixel_data = ds->tagExists(DCM_PixelData);
        return 0;
    } catch (const std::exception &e) {
        snprintf(err, errlen, "cannot parse DICOM: %s", e.what());
    } catch (...) {
        snprintf(err, errlen, "cannot parse DICOM: unknown error");
    }
    return -1;
}

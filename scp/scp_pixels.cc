// scp/scp_pixels.cc: decoded pixel data as HU with dcmtk. C API in
// scp_pixels.h; no exception leaves this file.
#include "scp_pixels.h"

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dcfcache.h>
#include <dcmtk/dcmdata/dcpxitem.h>
#include <dcmtk/dcmdata/dcrledrg.h>
#include <dcmtk/dcmdata/dctk.h>
#include <dcmtk/dcmjpeg/djdecode.h>
#include <dcmtk/dcmjpls/djdecode.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

namespace
{

void set_err(char *err, unsigned long errlen, const std::string &msg)
{
    if (err && errlen > 0) std::snprintf(err, errlen, "%s", msg.c_str());
}

// dcmtk's codec registry is process-wide; register the decoders once.
void register_decoders()
{
    static std::once_flag once;
    std::call_once(once, [] {
        DJDecoderRegistration::registerCodecs();
        DJLSDecoderRegistration::registerCodecs();
        DcmRLEDecoderRegistration::registerCodecs();
    });
}

struct rescale {
    double slope = 1.0, intercept = 0.0;
    bool has_slope = false, has_intercept = false;
};

// Slope and intercept from item (top level or a Pixel Value Transformation
// Sequence item); keeps r's values for whatever is absent.
void read_rescale(DcmItem *item, rescale &r)
{
    Float64 v;
    if (item->findAndGetFloat64(DCM_RescaleSlope, v).good()) {
        r.slope = v;
        r.has_slope = true;
    }
    if (item->findAndGetFloat64(DCM_RescaleIntercept, v).good()) {
        r.intercept = v;
        r.has_intercept = true;
    }
}

void read_group_rescale(DcmItem *group, rescale &r)
{
    DcmItem *pvt = nullptr;
    if (group &&
        group->findAndGetSequenceItem(DCM_PixelValueTransformationSequence, pvt, 0).good() && pvt)
        read_rescale(pvt, r);
}

// Stored values are HU only through Rescale Slope and Intercept (Type 1 in
// CT Image Storage; in Enhanced CT, in the Pixel Value Transformation
// functional group of every frame): an image without them, or with slope 0,
// is refused rather than read with 1 and 0 (a positive study without its
// intercept was triaged at 0.030 instead of 0.992). Returns "" or why not.
std::string rescale_problem(const rescale &r, bool enhanced, int frame)
{
    const char *where = enhanced ? " in the Pixel Value Transformation functional group" : "";
    std::string which = enhanced ? " of frame " + std::to_string(frame) : "";
    if (!r.has_intercept) return std::string("no Rescale Intercept (0028,1052)") + where + which;
    if (!r.has_slope) return std::string("no Rescale Slope (0028,1053)") + where + which;
    if (r.slope == 0.0) return "Rescale Slope 0" + which;
    // A hostile file can carry "NaN" or "1e999" here; NaN HU would pass every
    // window unclamped and reach the model (found by fuzz/fuzz_scp_pixels).
    if (!std::isfinite(r.slope) || !std::isfinite(r.intercept) ||
        std::fabs(r.slope) * 4294967296.0 + std::fabs(r.intercept) > 1e30)
        return "Rescale Slope/Intercept not finite or out of range" + which;
    return "";
}

struct layout {
    int rows = 0, columns = 0, frames = 1;
    int bits_allocated = 0, bits_stored = 0, high_bit = 0;
    bool is_signed = false;
    bool has_pad = false;
    long pad_lo = 0, pad_hi = 0;
};

bool get_u16(DcmItem *item, const DcmTagKey &tag, int &out)
{
    Uint16 v;
    if (item->findAndGetUint16(tag, v).bad()) return false;
    out = v;
    return true;
}

// Padding values are US or SS depending on Pixel Representation; dcmtk may
// also have read them as the other type from an implicit-VR file.
bool get_pad(DcmItem *item, const DcmTagKey &tag, bool is_signed, long &out)
{
    Uint16 u;
    Sint16 s;
    if (item->findAndGetUint16(tag, u).good()) {
        out = is_signed ? (long)(Sint16)u : (long)u;
        return true;
    }
    if (item->findAndGetSint16(tag, s).good()) {
        out = is_signed ? (long)s : (long)(Uint16)s;
        return true;
    }
    return false;
}

int read_layout(DcmDataset *ds, unsigned long max_pixels, layout &l, std::string &why)
{
    int spp = 1, pixrep = 0;
    if (!get_u16(ds, DCM_Rows, l.rows) || !get_u16(ds, DCM_Columns, l.columns) ||
        !get_u16(ds, DCM_BitsAllocated, l.bits_allocated)) {
        why = "missing Rows, Columns or BitsAllocated";
        return -1;
    }
    if (!get_u16(ds, DCM_BitsStored, l.bits_stored)) l.bits_stored = l.bits_allocated;
    if (!get_u16(ds, DCM_HighBit, l.high_bit)) l.high_bit = l.bits_stored - 1;
    get_u16(ds, DCM_SamplesPerPixel, spp);
    get_u16(ds, DCM_PixelRepresentation, pixrep);
    l.is_signed = pixrep == 1;
    Sint32 nf = 1;
    if (ds->findAndGetSint32(DCM_NumberOfFrames, nf).good()) l.frames = nf;
    if (spp != 1) {
        why = "not a greyscale image (SamplesPerPixel " + std::to_string(spp) + ")";
        return -1;
    }
    if (l.bits_allocated != 8 && l.bits_allocated != 16) {
        why = "unsupported BitsAllocated " + std::to_string(l.bits_allocated);
        return -1;
    }
    if (l.bits_stored < 1 || l.bits_stored > l.bits_allocated || l.high_bit < l.bits_stored - 1 ||
        l.high_bit >= l.bits_allocated) {
        why = "inconsistent BitsStored/HighBit";
        return -1;
    }
    if (l.rows < 1 || l.columns < 1 || l.rows > SCP_PIXELS_MAX_DIM ||
        l.columns > SCP_PIXELS_MAX_DIM || l.frames < 1 ||
        (unsigned long)l.rows * (unsigned long)l.columns * (unsigned long)l.frames > max_pixels) {
        why = "image size out of range";
        return -1;
    }
    long pad, limit;
    if (get_pad(ds, DCM_PixelPaddingValue, l.is_signed, pad)) {
        l.has_pad = true;
        l.pad_lo = l.pad_hi = pad;
        if (get_pad(ds, DCM_PixelPaddingRangeLimit, l.is_signed, limit)) {
            l.pad_lo = pad < limit ? pad : limit;
            l.pad_hi = pad < limit ? limit : pad;
        }
    }
    return 0;
}

// The stored value of one raw cell: the BitsStored bits ending at HighBit,
// sign-extended when Pixel Representation says so.
inline long stored_value(unsigned raw, const layout &l)
{
    unsigned shift = (unsigned)(l.high_bit + 1 - l.bits_stored);
    unsigned mask = l.bits_stored >= 32 ? 0xffffffffu : ((1u << l.bits_stored) - 1u);
    unsigned v = (raw >> shift) & mask;
    if (l.is_signed && (v & (1u << (l.bits_stored - 1)))) return (long)v - (1L << l.bits_stored);
    return (long)v;
}

// The pixel item (fragment) where frame starts, for getUncompressedFrame; 0
// lets dcmtk find it. dcmtk 3.6.7 finds it only with exactly one fragment
// per frame or from a filled Basic Offset Table, while PS3.5 A.4 allows the
// JPEG family several fragments per frame with an empty table (and a table
// may be wrong). A JPEG or JPEG-LS frame is one codestream that starts with
// SOI (FF D8), which no codestream holds inside (every FF in entropy-coded
// data is stuffed): when exactly frames fragments start with it, they are
// the frames' starts. Only the first two bytes of each fragment are read.
// RLE allows one fragment per frame only (A.4.2); dcmtk still decodes more
// from a filled table. note: why dcmtk may fail, for its message.
Uint32 start_fragment(DcmPixelData *pd, const layout &l, long frame, DcmFileCache &cache,
                      std::string &note)
{
    E_TransferSyntax xfer = EXS_Unknown;
    const DcmRepresentationParameter *param = nullptr;
    pd->getOriginalRepresentationKey(xfer, param);
    DcmPixelSequence *seq = nullptr;
    if (!DcmXfer(xfer).isEncapsulated() ||
        pd->getEncapsulatedRepresentation(xfer, param, seq).bad() || !seq)
        return 0;
    unsigned long fragments = seq->card() - (seq->card() > 0); // item 0: the offset table
    if (fragments == (unsigned long)l.frames) return 0;        // dcmtk's own rule holds
    if (xfer == EXS_RLELossless) {
        note = "RLE Lossless with " + std::to_string(fragments) + " fragments for " +
               std::to_string(l.frames) + " frame(s): PS3.5 A.4.2 allows one fragment per frame";
        return 0;
    }
    if (l.frames == 1) return 0;
    long starts = 0;
    Uint32 start = 0;
    for (unsigned long i = 1; i <= fragments; i++) {
        DcmPixelItem *item = nullptr;
        Uint8 head[2];
        if (seq->getItem(item, i).bad() || !item || item->getLength() < 2 ||
            item->getPartialValue(head, 0, 2, &cache).bad())
            continue;
        if (head[0] != 0xFF || head[1] != 0xD8) continue;
        if (starts++ == frame) start = (Uint32)i;
    }
    if (starts == l.frames) return start;
    note = std::to_string(starts) + " of " + std::to_string(fragments) +
           " fragments start a JPEG image, for " + std::to_string(l.frames) + " frames";
    return 0;
}

// One frame of the pixel data (frame >= 0) into buf, decoded on its own:
// dcmtk reads (and decompresses) only that frame's bytes. Returns 0, or -1
// with why.
int read_one_frame(DcmDataset *ds, const layout &l, long frame, std::vector<Uint16> &buf,
                   std::string &why)
{
    DcmElement *pd = nullptr;
    Uint32 size = 0;
    if (ds->findAndGetElement(DCM_PixelData, pd).bad() || !pd || pd->ident() != EVR_PixelData ||
        pd->getUncompressedFrameSize(ds, size).bad()) {
        why = "no pixel data";
        return -1;
    }
    size_t need = (size_t)l.rows * (size_t)l.columns * (size_t)(l.bits_allocated / 8);
    if (size < need) {
        why = "frame of " + std::to_string(size) + " bytes, " + std::to_string(need) + " expected";
        return -1;
    }
    buf.assign((size_t)size / 2 + 1, 0); // Uint16 cells; room for a pad byte
    DcmFileCache cache;
    std::string note;
    Uint32 first = start_fragment(static_cast<DcmPixelData *>(pd), l, frame, cache, note);
    OFString model;
    OFCondition c = pd->getUncompressedFrame(ds, (Uint32)frame, first, buf.data(),
                                             (Uint32)(buf.size() * 2), model, &cache);
    if (c.bad()) {
        why = "cannot decode frame " + std::to_string(frame) + " (transfer syntax " +
              DcmXfer(ds->getOriginalXfer()).getXferName() + "): " + c.text() +
              (note.empty() ? "" : " (" + note + ")");
        return -1;
    }
    return 0;
}

// The rescale of frames first .. first + nframes - 1 into out. Enhanced CT
// carries it in its functional groups only; other objects at the top level,
// which functional groups may override per frame. Returns 0, or -1 with why.
int read_frame_rescale(DcmDataset *ds, int first, int nframes, std::vector<rescale> &out,
                       std::string &why)
{
    OFString sop_class;
    ds->findAndGetOFString(DCM_SOPClassUID, sop_class);
    bool enhanced = sop_class == UID_EnhancedCTImageStorage;
    out.assign((size_t)nframes, rescale());
    rescale base;
    if (!enhanced) read_rescale(ds, base);
    DcmItem *shared = nullptr;
    if (ds->findAndGetSequenceItem(DCM_SharedFunctionalGroupsSequence, shared, 0).good())
        read_group_rescale(shared, base);
    // One walk along the per-frame items: getItem(f) walks the list from its
    // head, which made tens of thousands of frames quadratic (seconds).
    DcmSequenceOfItems *per = nullptr;
    if (ds->findAndGetSequence(DCM_PerFrameFunctionalGroupsSequence, per).bad()) per = nullptr;
    DcmObject *pf = per ? per->nextInContainer(nullptr) : nullptr;
    for (int f = 0; pf && f < first; f++)
        pf = per->nextInContainer(pf);
    for (int f = 0; f < nframes; f++) {
        out[(size_t)f] = base;
        if (pf) {
            read_group_rescale(static_cast<DcmItem *>(pf), out[(size_t)f]);
            pf = per->nextInContainer(pf);
        }
        why = rescale_problem(out[(size_t)f], enhanced, first + f + 1);
        if (!why.empty()) {
            why += ": stored values cannot be read as HU";
            return -1;
        }
    }
    return 0;
}

// frame < 0: every frame; else only that one (out->frames 1), 1 when the
// file has no such frame.
int read_pixels(const char *path, unsigned long max_pixels, long frame, scp_pixels *out, char *err,
                unsigned long errlen)
{
    register_decoders();
    DcmFileFormat file;
    OFCondition c = file.loadFile(path);
    if (c.bad()) {
        set_err(err, errlen, std::string(path) + ": " + c.text());
        return -1;
    }
    DcmDataset *ds = file.getDataset();
    layout l;
    std::string why;
    if (read_layout(ds, max_pixels, l, why) != 0) {
        set_err(err, errlen, std::string(path) + ": " + why);
        return -1;
    }
    if (frame >= l.frames) {
        set_err(err, errlen,
                std::string(path) + ": no frame " + std::to_string(frame) + " of " +
                    std::to_string(l.frames));
        return 1;
    }
    int first = frame < 0 ? 0 : (int)frame, nframes = frame < 0 ? l.frames : 1;
    std::vector<rescale> frame_rescale;
    if (read_frame_rescale(ds, first, nframes, frame_rescale, why) != 0) {
        set_err(err, errlen, std::string(path) + ": " + why);
        return -1;
    }
    std::vector<Uint16> one;
    if (frame >= 0) {
        if (read_one_frame(ds, l, frame, one, why) != 0) {
            set_err(err, errlen, std::string(path) + ": " + why);
            return -1;
        }
    } else if (DcmXfer(ds->getOriginalXfer()).isEncapsulated()) {
        c = ds->chooseRepresentation(EXS_LittleEndianExplicit, nullptr);
        if (c.bad() || !ds->canWriteXfer(EXS_LittleEndianExplicit)) {
            set_err(err, errlen,
                    std::string(path) + ": cannot decode transfer syntax " +
                        DcmXfer(ds->getOriginalXfer()).getXferName() +
                        (c.bad() ? std::string(": ") + c.text() : std::string()));
            return -1;
        }
    }
    size_t per_frame = (size_t)l.rows * (size_t)l.columns;
    size_t total = per_frame * (size_t)nframes;
    const Uint16 *p16 = nullptr;
    const Uint8 *p8 = nullptr;
    unsigned long count = 0;
    if (frame >= 0) {
        if (l.bits_allocated == 16)
            p16 = one.data();
        else
            p8 = reinterpret_cast<const Uint8 *>(one.data());
        count = (unsigned long)total;
    } else if (l.bits_allocated == 16) {
        c = ds->findAndGetUint16Array(DCM_PixelData, p16, &count);
    } else {
        c = ds->findAndGetUint8Array(DCM_PixelData, p8, &count);
    }
    if ((frame < 0 && c.bad()) || (!p16 && !p8)) {
        set_err(err, errlen, std::string(path) + ": no pixel data");
        return -1;
    }
    if (count < total) {
        set_err(err, errlen,
                std::string(path) + ": pixel data holds " + std::to_string(count) + " values, " +
                    std::to_string(total) + " expected");
        return -1;
    }

    float *hu = static_cast<float *>(std::malloc(total * sizeof(float)));
    if (!hu) {
        set_err(err, errlen, std::string(path) + ": out of memory");
        return -1;
    }
    unsigned long padded = 0;
    for (int f = 0; f < nframes; f++) {
        const rescale &r = frame_rescale[(size_t)f];
        size_t base_i = (size_t)f * per_frame;
        for (size_t i = 0; i < per_frame; i++) {
            unsigned raw = p16 ? p16[base_i + i] : p8[base_i + i];
            long v = stored_value(raw, l);
            if (l.has_pad && v >= l.pad_lo && v <= l.pad_hi) {
                hu[base_i + i] = SCP_PIXELS_PAD_HU;
                padded++;
            } else {
                hu[base_i + i] = (float)((double)v * r.slope + r.intercept);
            }
        }
    }
    out->rows = l.rows;
    out->columns = l.columns;
    out->frames = nframes;
    out->hu = hu;
    out->padded = padded;
    return 0;
}

} // namespace

extern "C" int scp_pixels_read(const char *path, struct scp_pixels *out, char *err,
                               unsigned long errlen)
{
    return scp_pixels_read_max(path, SCP_PIXELS_MAX_TOTAL, out, err, errlen);
}

namespace
{

int read_guarded(const char *path, unsigned long max_pixels, long frame, struct scp_pixels *out,
                 char *err, unsigned long errlen)
{
    if (!out) {
        set_err(err, errlen, "scp_pixels_read: out is NULL");
        return -1;
    }
    std::memset(out, 0, sizeof *out);
    if (!path) {
        set_err(err, errlen, "scp_pixels_read: path is NULL");
        return -1;
    }
    try {
        if (max_pixels > SCP_PIXELS_MAX_TOTAL) max_pixels = SCP_PIXELS_MAX_TOTAL;
        return read_pixels(path, max_pixels, frame, out, err, errlen);
    } catch (const std::exception &e) {
        set_err(err, errlen, std::string(path) + ": " + e.what());
    } catch (...) {
        set_err(err, errlen, std::string(path) + ": unknown exception");
    }
    scp_pixels_free(out);
    return -1;
}

} // namespace

extern "C" int scp_pixels_read_max(const char *path, unsigned long max_pixels,
                                   struct scp_pixels *out, char *err, unsigned long errlen)
{
    return read_guarded(path, max_pixels, -1, out, err, errlen);
}

extern "C" int scp_pixels_read_frame(const char *path, long frame, struct scp_pixels *out,
                                     char *err, unsigned long errlen)
{
    if (frame < 0) {
        if (out) std::memset(out, 0, sizeof *out);
        set_err(err, errlen, "scp_pixels_read_frame: negative frame");
        return -1;
    }
    return read_guarded(path, SCP_PIXELS_MAX_TOTAL, frame, out, err, errlen);
}

extern "C" void scp_pixels_free(struct scp_pixels *px)
{
    if (!px) return;
    std::free(px->hu);
    std::memset(px, 0, sizeof *px);
}

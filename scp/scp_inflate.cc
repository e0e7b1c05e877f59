// scp/scp_inflate.cc: counts what a deflated dataset inflates to, and finds
// element lengths that claim more than it holds, before dcmtk loads it (see
// scp_inflate.h). The meta header walk reads only group 0002 of a file the
// SCP itself wrote, each length checked against the file.
#include "scp_inflate.h"

#include <cstdio>
#include <cstring>
#include <vector>

#include <zlib.h>

namespace
{

bool long_form(const unsigned char *vr)
{
    static const char *const vrs[] = {"OB", "OW", "OF", "SQ", "UT", "UN",
                                      "UC", "UR", "OD", "OL", "OV"};
    for (const char *v : vrs)
        if (vr[0] == v[0] && vr[1] == v[1]) return true;
    return false;
}

// Offset of the dataset (first byte after group 0002), or -1.
long dataset_offset(FILE *f)
{
    unsigned char h[132];
    if (fread(h, 1, sizeof h, f) != sizeof h || memcmp(h + 128, "DICM", 4) != 0) return -1;
    long pos = 132;
    for (int n = 0; n < 256; n++) {
        unsigned char e[12];
        if (fseek(f, pos, SEEK_SET) != 0 || fread(e, 1, 8, f) != 8) return -1;
        if (e[0] != 0x02 || e[1] != 0x00) return pos;
        unsigned long len;
        int hdr;
        if (long_form(e + 4)) {
            if (fread(e + 8, 1, 4, f) != 4) return -1;
            len = e[8] | (e[9] << 8) | ((unsigned long)e[10] << 16) | ((unsigned long)e[11] << 24);
            hdr = 12;
        } else {
            len = e[6] | (e[7] << 8);
            hdr = 8;
        }
        if (len > (1UL << 20)) return -1;
        pos += hdr + (long)len;
    }
    return -1;
}

// Follows the element headers of an Explicit VR Little Endian dataset as its
// bytes stream by, passing over values, and keeps the furthest end a length
// claims. Positions are absolute, so nesting needs no stack: every value and
// every defined-length sequence or item must end within the stream. Reads
// headers as dcmtk does (a VR it does not know has the 4-byte length form).
// The content of a UN of undefined length is implicit VR (PS3.5 6.2.2), read
// by dcmtk as a sequence: followed in implicit mode (tag and 4-byte length;
// an undefined length opens a sequence) until its sequence delimiter. Stops,
// without a verdict on what follows, where the content is not elements: an
// undefined length other than a sequence, a UN or encapsulated pixel data.
class Walker
{
  public:
    void feed(const unsigned char *p, size_t n)
    {
        while (n > 0 && !stopped_) {
            if (pos_ < skip_until_) {
                long long k = skip_until_ - pos_;
                size_t step = k < (long long)n ? (size_t)k : n;
                pos_ += (long long)step;
                p += step;
                n -= step;
                continue;
            }
            hdr_[have_++] = *p++;
            n--;
            pos_++;
            if (have_ == need_) header();
        }
    }
    // The furthest end any length claims, with the element that claims it.
    long long claimed_end() const
    {
        return end_;
    }
    unsigned group() const
    {
        return group_;
    }
    unsigned element() const
    {
        return element_;
    }
    unsigned long length() const
    {
        return len_;
    }

  private:
    static unsigned u16(const unsigned char *b)
    {
        return b[0] | (b[1] << 8);
    }
    static unsigned long u32(const unsigned char *b)
    {
        return b[0] | (b[1] << 8) | ((unsigned long)b[2] << 16) | ((unsigned long)b[3] << 24);
    }
    static bool short_form(const unsigned char *vr)
    {
        static const char *const vrs[] = {"AE", "AS", "AT", "CS", "DA", "DS", "DT",
                                          "FL", "FD", "IS", "LO", "LT", "PN", "SH",
                                          "SL", "SS", "ST", "TM", "UI", "UL", "US"};
        for (const char *v : vrs)
            if (vr[0] == v[0] && vr[1] == v[1]) return true;
        return false;
    }
    void claim(unsigned g, unsigned e, unsigned long len)
    {
        if (pos_ + (long long)len > end_) {
            end_ = pos_ + (long long)len;
            group_ = g;
            element_ = e;
            len_ = len;
        }
    }
    void header()
    {
        unsigned g = u16(hdr_), e = u16(hdr_ + 2);
        if (implicit_ > 0 && g != 0xFFFE) {
            unsigned long len = u32(hdr_ + 4);
            have_ = 0;
            if (len == 0xFFFFFFFFUL) {
                if (g == 0x7FE0 && e == 0x0010)
                    stopped_ = true; // no encapsulated pixel data in implicit VR
                else
                    implicit_++; // a sequence
                return;
            }
            claim(g, e, len);
            skip_until_ = pos_ + (long long)len;
            return;
        }
        if (g == 0xFFFE) { // item, item or sequence delimiter: no VR
            unsigned long len = u32(hdr_ + 4);
            if (implicit_ > 0) {
                // Items of undefined length and sequences nest; their
                // delimiters close them, and the UN's own delimiter ends it.
                // A defined-length item's elements follow in place.
                if (e == 0xE000 && len == 0xFFFFFFFFUL)
                    implicit_++;
                else if (e == 0xE000)
                    claim(g, e, len);
                else if (e == 0xE00D || e == 0xE0DD)
                    implicit_--;
                have_ = 0;
                return;
            }
            if (e == 0xE0DD) fragments_ = false;
            if (e == 0xE000 && len != 0xFFFFFFFFUL) {
                claim(g, e, len);
                if (fragments_) skip_until_ = pos_ + (long long)len;
            } else if (e == 0xE000 && fragments_) {
                stopped_ = true;
            }
            have_ = 0;
            need_ = 8;
            return;
        }
        if (need_ == 8 && !short_form(hdr_ + 4)) {
            need_ = 12; // two reserved bytes, then a 4-byte length
            return;
        }
        bool sq = hdr_[4] == 'S' && hdr_[5] == 'Q';
        unsigned long len = need_ == 8 ? u16(hdr_ + 6) : u32(hdr_ + 8);
        have_ = 0;
        need_ = 8;
        if (len == 0xFFFFFFFFUL) {
            if (g == 0x7FE0 && e == 0x0010)
                fragments_ = true; // encapsulated pixel data: items are fragments
            else if (hdr_[4] == 'U' && hdr_[5] == 'N')
                implicit_ = 1; // implicit VR inside, until its sequence delimiter
            else if (!sq)
                stopped_ = true;
            return;
        }
        claim(g, e, len);
        if (!sq) skip_until_ = pos_ + (long long)len;
    }

    unsigned char hdr_[12];
    int have_ = 0, need_ = 8;
    long long pos_ = 0, skip_until_ = 0, end_ = 0;
    bool fragments_ = false, stopped_ = false;
    int implicit_ = 0; // depth of nesting inside a UN of undefined length
    unsigned group_ = 0, element_ = 0;
    unsigned long len_ = 0;
};

} // namespace

extern "C" int scp_deflated_check(const char *path, long long cap, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    int over = 0;
    long start = dataset_offset(f);
    z_stream z;
    memset(&z, 0, sizeof z);
    if (start >= 0 && fseek(f, start, SEEK_SET) == 0 && inflateInit2(&z, -MAX_WBITS) == Z_OK) {
        std::vector<unsigned char> in(1 << 16), out(1 << 16);
        long long total = 0;
        int rc = Z_OK;
        Walker walk;
        while (rc == Z_OK && !over) {
            if (z.avail_in == 0) {
                size_t n = fread(in.data(), 1, in.size(), f);
                if (n == 0) break; // truncated: not ours to judge
                z.next_in = in.data();
                z.avail_in = (uInt)n;
            }
            z.next_out = out.data();
            z.avail_out = (uInt)out.size();
            rc = inflate(&z, Z_NO_FLUSH);
            total += (long long)(out.size() - z.avail_out);
            walk.feed(out.data(), out.size() - z.avail_out);
            if (total > cap) {
                over = 1;
                snprintf(err, errlen, "deflated dataset inflates to more than %lld bytes", cap);
            }
            if (rc == Z_BUF_ERROR) rc = Z_OK; // more input needed; read above
        }
        // dcmtk reserves what a length claims before it reads the value (it
        // cannot leave a deflated value on disk): up to 4 GB for a lie.
        if (!over && walk.claimed_end() > total) {
            over = 2;
            snprintf(err, errlen,
                     "deflated dataset: element (%04x,%04x) claims %lu bytes, only %lld follow",
                     walk.group(), walk.element(), walk.length(),
                     total - (walk.claimed_end() - (long long)walk.length()));
        }
        inflateEnd(&z);
    }
    fclose(f);
    return over;
}

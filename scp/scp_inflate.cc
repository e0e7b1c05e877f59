// scp/scp_inflate.cc: counts what a deflated dataset inflates to, before
// dcmtk loads it (see scp_inflate.h). The meta header walk reads only group
// 0002 of a file the SCP itself wrote, each length checked against the file.
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

} // namespace

extern "C" int scp_deflated_over(const char *path, long long cap, char *err, size_t errlen)
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
            if (total > cap) {
                over = 1;
                snprintf(err, errlen, "deflated dataset inflates to more than %lld bytes", cap);
            }
            if (rc == Z_BUF_ERROR) rc = Z_OK; // more input needed; read above
        }
        inflateEnd(&z);
    }
    fclose(f);
    return over;
}

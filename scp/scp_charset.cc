// scp/scp_charset.cc: DICOM text to UTF-8 with DcmSpecificCharacterSet.
#include "scp_charset.h"

#include <cstring>

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dcspchrs.h>

static void copy_utf8(const char *s, size_t n, char *out, size_t outlen)
{
    if (outlen == 0) return;
    if (n >= outlen) {
        n = outlen - 1;
        // do not cut a multi-byte sequence
        while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80)
            n--;
    }
    std::memcpy(out, s, n);
    out[n] = '\0';
}

static void fallback(const char *in, char *out, size_t outlen)
{
    size_t i = 0;
    for (; in[i] && i + 1 < outlen; i++) {
        unsigned char ch = static_cast<unsigned char>(in[i]);
        out[i] = (ch >= 0x20 && ch < 0x7F) ? static_cast<char>(ch) : '?';
    }
    if (outlen) out[i] = '\0';
}

static bool plain_ascii(const char *s)
{
    for (; *s; s++)
        if (static_cast<unsigned char>(*s) >= 0x80 || *s == 0x1B) return false;
    return true;
}

extern "C" int scp_charset_to_utf8(const char *charset, const char *in, int person_name, char *out,
                                   size_t outlen)
{
    if (!in) in = "";
    if (!charset) charset = "";
    try {
        // The default repertoire is ASCII; ASCII is UTF-8 as it is.
        if (plain_ascii(in)) {
            copy_utf8(in, std::strlen(in), out, outlen);
            return 0;
        }
        DcmSpecificCharacterSet cs;
        if (cs.selectCharacterSet(OFString(charset), OFString("ISO_IR 192")).bad()) {
            fallback(in, out, outlen);
            return -1;
        }
        OFString converted;
        const OFString delimiters = person_name ? OFString("\\^=") : OFString("\\");
        if (cs.convertString(OFString(in), converted, delimiters).bad()) {
            fallback(in, out, outlen);
            return -1;
        }
        copy_utf8(converted.c_str(), converted.length(), out, outlen);
        return 0;
    } catch (...) {
        fallback(in, out, outlen);
        return -1;
    }
}

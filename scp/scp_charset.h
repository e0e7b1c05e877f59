/* Text of a DICOM dataset as UTF-8: converts a string value from the
 * dataset's Specific Character Set (0008,0005) with dcmtk's
 * DcmSpecificCharacterSet (iconv/ICU underneath). Used to show patient names
 * and descriptions on the web worklist. */
#ifndef SCP_CHARSET_H
#define SCP_CHARSET_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Converts in (as stored, in the character set named by charset, the raw
 * value of (0008,0005), "" for the default repertoire) into UTF-8 in out
 * (size outlen, always terminated, truncated at a character boundary).
 * person_name: in is a PN value (component and group delimiters reset ISO
 * 2022 escapes). When the conversion fails, out gets in with every byte
 * outside printable ASCII replaced by '?'. Returns 0 when converted, -1 when
 * the fallback was used. Never throws; thread-safe. */
int scp_charset_to_utf8(const char *charset, const char *in, int person_name, char *out,
                        size_t outlen);

#ifdef __cplusplus
}
#endif

#endif

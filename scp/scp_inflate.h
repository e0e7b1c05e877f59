/* A Deflated Explicit VR Little Endian dataset checked with zlib before
 * dcmtk parses it. dcmtk cannot leave the values of a deflated stream on
 * disk: a small upload that inflates a thousandfold would all be loaded into
 * memory, and an element whose length claims gigabytes gets them reserved
 * before its value is found missing. C API over scp/'s C++ layer. */
#ifndef SCP_INFLATE_H
#define SCP_INFLATE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* For the Part 10 file at path whose dataset is a raw deflate stream (after
 * the group 0002 meta header): returns 1 with a message in err when the
 * stream inflates to more than cap bytes, 2 when an element's (or a
 * sequence's or item's) length claims more bytes than the stream inflates
 * to, 0 otherwise (including a file that is not such a file or a corrupt
 * stream: the DICOM parser judges those). Reads at most the file, in 64 kB
 * steps, with 64 kB of output buffer. Never throws; thread-safe. */
int scp_deflated_check(const char *path, long long cap, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif

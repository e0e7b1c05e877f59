/* The inflated size of a Deflated Explicit VR Little Endian dataset, counted
 * with zlib before dcmtk parses it: dcmtk cannot leave the values of a
 * deflated stream on disk, so a small upload that inflates a thousandfold
 * (or more) would all be loaded into memory. C API over scp/'s C++ layer. */
#ifndef SCP_INFLATE_H
#define SCP_INFLATE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* For the Part 10 file at path whose dataset is a raw deflate stream (after
 * the group 0002 meta header): returns 1 with a message in err when the
 * stream inflates to more than cap bytes, 0 otherwise (including a file that
 * is not such a file or a corrupt stream: the DICOM parser judges those).
 * Reads at most the file, in 64 kB steps, with 64 kB of output buffer.
 * Never throws; thread-safe. */
int scp_deflated_over(const char *path, long long cap, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif

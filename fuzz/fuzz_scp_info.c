/* fuzz/fuzz_scp_info.c: the attribute extraction of a received dataset
 * (scp_info_read, which the SCP runs on every C-STORE's temp file) and the
 * per-frame positions of enhanced objects (scp_info_frames). Seeds: Part 10
 * files from tests/tools/gen_ct.py and `ichtriage phantom`. */
#include <stdbool.h>
#include <string.h>

#include "fuzz_input.h"
#include "scp_inflate.h"
#include "scp_info.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_input_path(data, size);
    struct scp_info info;
    char err[256];
    /* As the SCP does: a deflated dataset whose lengths lie (or that
     * inflates beyond the cap) never reaches dcmtk. */
    static const char deflated[] = "1.2.840.10008.1.2.1.99";
    if (memmem(data, size < 2048 ? size : 2048, deflated, sizeof deflated - 1) &&
        scp_deflated_check(path, 1LL << 30, err, sizeof err) != 0)
        return 0;
    if (scp_info_read(path, &info, err, sizeof err) == 0) {
        /* What the SCP checks before the UIDs become path components. */
        (void)scp_uid_valid(info.study_uid);
        (void)scp_uid_valid(info.series_uid);
        (void)scp_uid_valid(info.sop_uid);
        (void)scp_sop_class_storable(info.sop_class);
        if (info.number_of_frames > 1) {
            double pos[64 * 3], orient[6], spacing[2];
            bool has_o, has_s;
            (void)scp_info_frames(path, 64, pos, orient, &has_o, spacing, &has_s, err, sizeof err);
        }
    }
    return 0;
}

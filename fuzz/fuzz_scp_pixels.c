/* fuzz/fuzz_scp_pixels.c: pixel decoding of an untrusted file (scp_pixels_read:
 * uncompressed, RLE, JPEG, JPEG-LS through dcmtk's codecs) followed by the
 * preprocessing triage runs on each decoded frame. Seeds: gen_ct.py files
 * in every transfer syntax, phantom slices. */
#include <math.h>

#include "fuzz_input.h"
#include "preprocess.h"
#include "scp_pixels.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_input_path(data, size);
    struct scp_pixels px;
    char err[256];
    /* At most 2^20 pixels per input (1024 x 1024, or 16 frames of 256 x
     * 256), through the same size check as the node's 2^28: two mutated bytes
     * (Rows, Columns) make dcmtk decode a 16 x 16 JPEG seed into 4112 x 4112,
     * and that one input took 16 s under the sanitizers, past the 10 s timeout
     * (CI, 2026-12-02). Large images are the node's legitimate work, not a
     * fault to look for here. */
    if (scp_pixels_read_max(path, 1UL << 20, &px, err, sizeof err) != 0) return 0;
    /* HU are finite whatever the file says (Rescale Slope "NaN", "1e999"). */
    for (size_t i = 0; i < (size_t)px.frames * px.rows * px.columns; i++)
        if (!isfinite(px.hu[i])) {
            fprintf(stderr, "hu[%zu] = %g\n", i, px.hu[i]);
            abort();
        }
    struct triage_windows w;
    triage_windows_default(&w);
    enum { OUT = 32 };
    static float out[TRIAGE_MAX_WINDOWS * OUT * OUT];
    /* Each frame as a whole, then cropped to the head found on the first
     * four (the square can reach past the image). */
    int big = px.rows > px.columns ? px.rows : px.columns;
    float *scratch = malloc(triage_preprocess_scratch(big, OUT, w.n) * sizeof *scratch);
    int *count = malloc(sizeof(int) * ((size_t)px.rows + px.columns));
    if (scratch && count) {
        struct triage_head_box box;
        triage_head_box_init(&box);
        for (int f = 0; f < px.frames && f < 4; f++) {
            const float *hu = px.hu + (size_t)f * px.rows * px.columns;
            (void)triage_preprocess_slice(hu, px.rows, px.columns, NULL, &w, OUT, OUT, out,
                                          scratch);
            triage_head_box_add(&box, hu, px.rows, px.columns, count);
        }
        struct triage_region r;
        triage_head_region(&box, px.rows, px.columns, &r);
        if (r.w > big || r.h > big) abort();
        for (int f = 0; f < px.frames && f < 4; f++)
            (void)triage_preprocess_slice(px.hu + (size_t)f * px.rows * px.columns, px.rows,
                                          px.columns, &r, &w, OUT, OUT, out, scratch);
    }
    free(count);
    free(scratch);
    scp_pixels_free(&px);
    return 0;
}

/* fuzz/fuzz_preprocess.c: triage_preprocess_slice on arbitrary sizes, window
 * settings (triage_windows_parse of a string from the input, as a model's
 * metadata supplies it) and HU values, NaN and infinities included. Input:
 * 4 bytes of sizes, a NUL-terminated windows string, then floats. */
#include <math.h>
#include <string.h>

#include "fuzz_input.h"
#include "preprocess.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 5) return 0;
    int rows = 1 + data[0] % 96, cols = 1 + data[1] % 96;
    int out_h = data[2] % 80, out_w = data[3] % 80; /* 0 must be refused */
    data += 4;
    size -= 4;
    const uint8_t *nul = memchr(data, 0, size < 128 ? size : 128);
    struct triage_windows w;
    char err[128];
    if (nul) {
        if (triage_windows_parse((const char *)data, &w, err, sizeof err) != 0) return 0;
        size -= (size_t)(nul + 1 - data);
        data = nul + 1;
    } else {
        triage_windows_default(&w);
    }
    size_t n = (size_t)rows * cols;
    float *hu = calloc(n, sizeof *hu);
    float *out = malloc((size_t)TRIAGE_MAX_WINDOWS * (out_h ? out_h : 1) * (out_w ? out_w : 1) *
                        sizeof *out);
    float *scratch =
        malloc(triage_preprocess_scratch(rows, out_w ? out_w : 1, w.n) * sizeof *scratch);
    if (hu && out && scratch) {
        memcpy(hu, data, size < n * sizeof *hu ? size : n * sizeof *hu);
        if (triage_preprocess_slice(hu, rows, cols, &w, out_h, out_w, out, scratch) == 0) {
            /* A window maps to [0, 1] whatever comes in, NaN included (the
             * area weights may sum to 1 plus a rounding error). */
            for (int i = 0; i < w.n * out_h * out_w; i++)
                if (!(out[i] >= 0.0f && out[i] <= 1.0f + 1e-5f)) {
                    fprintf(stderr, "out[%d] = %g outside [0, 1]\n", i, out[i]);
                    abort();
                }
        }
    }
    free(hu);
    free(out);
    free(scratch);
    return 0;
}

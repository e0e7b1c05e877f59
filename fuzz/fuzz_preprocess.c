/* fuzz/fuzz_preprocess.c: triage_preprocess_slice on arbitrary sizes, window
 * settings (triage_windows_parse of a string from the input, as a model's
 * metadata supplies it) and HU values, NaN and infinities included; on the
 * whole slice, then on the head crop found on it. Input:
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
    int big = rows > cols ? rows : cols;
    float *scratch =
        malloc(triage_preprocess_scratch(big, out_w ? out_w : 1, w.n) * sizeof *scratch);
    int *count = malloc(sizeof(int) * (size_t)(rows + cols));
    if (hu && out && scratch && count) {
        memcpy(hu, data, size < n * sizeof *hu ? size : n * sizeof *hu);
        struct triage_head_box box;
        triage_head_box_init(&box);
        triage_head_box_add(&box, hu, rows, cols, count);
        struct triage_region head;
        triage_head_region(&box, rows, cols, &head);
        if (head.w <= 0 || head.h <= 0 || head.w > big || head.h > big) {
            fprintf(stderr, "head region %d,%d %dx%d of a %dx%d slice\n", head.x, head.y, head.w,
                    head.h, cols, rows);
            abort();
        }
        for (int pass = 0; pass < 2; pass++) {
            if (triage_preprocess_slice(hu, rows, cols, pass ? &head : NULL, &w, out_h, out_w, out,
                                        scratch) != 0)
                continue;
            /* A window maps to [0, 1] whatever comes in, NaN included (the
             * area weights may sum to 1 plus a rounding error). */
            for (int i = 0; i < w.n * out_h * out_w; i++)
                if (!(out[i] >= 0.0f && out[i] <= 1.0f + 1e-5f)) {
                    fprintf(stderr, "out[%d] = %g outside [0, 1]\n", i, out[i]);
                    abort();
                }
        }
    }
    free(count);
    free(hu);
    free(out);
    free(scratch);
    return 0;
}

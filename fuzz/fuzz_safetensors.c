/* fuzz/fuzz_safetensors.c: a model file from outside (the registry, a
 * PyTorch user, a reload on SIGHUP): nn_st_open's validation of the header
 * and offsets, every tensor and metadata pair, then nn_model_load on the same
 * bytes. Seeds: tests/triage/make_test_model output and small hand-made
 * files. */
#include "fuzz_input.h"
#include "nn.h"
#include "safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_input_path(data, size);
    char err[256];
    nn_st_file *f = nn_st_open(path, err, sizeof err);
    if (f) {
        volatile uint8_t sink = 0;
        for (int i = 0; i < nn_st_count(f); i++) {
            const nn_st_tensor *t = nn_st_at(f, i);
            /* The data must lie inside the mapping: touch both ends. */
            if (t->nbytes)
                sink ^= ((const uint8_t *)t->data)[0] ^ ((const uint8_t *)t->data)[t->nbytes - 1];
            (void)nn_st_find(f, t->name);
        }
        for (int i = 0; i < nn_st_meta_count(f); i++) {
            const char *k, *v;
            nn_st_meta_at(f, i, &k, &v);
            (void)nn_st_meta(f, k);
        }
        (void)sink;
        nn_st_close(f);
    }
    nn_model *m = nn_model_load(path, err, sizeof err);
    nn_model_free(m);
    return 0;
}

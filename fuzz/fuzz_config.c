/* fuzz/fuzz_config.c: the INI config file (triage_config_load on inih) and
 * every key read back as the node reads it, as string and as integer. Seeds:
 * etc/ichtriage.conf and small variants. */
#include <string.h>

#include "config.h"
#include "fuzz_input.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_input_path(data, size);
    struct triage_config c;
    char err[256];
    if (triage_config_load(&c, path, err, sizeof err) == 0) {
        for (int k = 0; k < CFG_NKEYS; k++) {
            int64_t v;
            (void)triage_config_str(&c, (enum triage_config_key)k);
            (void)triage_config_int(&c, (enum triage_config_key)k, INT64_MIN, INT64_MAX, &v, err,
                                    sizeof err);
        }
    }
    triage_config_free(&c);
    /* The same bytes as one --set assignment. */
    char *a = malloc(size + 1);
    if (a && triage_config_load(&c, NULL, err, sizeof err) == 0) {
        memcpy(a, data, size);
        a[size] = 0;
        (void)triage_config_set(&c, a, err, sizeof err);
        triage_config_free(&c);
    }
    free(a);
    return 0;
}

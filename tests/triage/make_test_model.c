/* Writes a small LRCN with random weights and the metadata the node needs,
 * for tests of the triage plumbing (order, states, restarts), which do not
 * depend on what the model has learnt:
 *   make_test_model OUT.safetensors [ARCH] [SEED] [THRESHOLD] [PREPROCESSING]
 * (PREPROCESSING: the metadata's steps, e.g. "crop=head"; none by default). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nn.h"

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s OUT.safetensors [ARCH] [SEED] [THRESHOLD] [PREPROCESSING]\n",
                argv[0]);
        return 2;
    }
    nn_config c;
    nn_config_default(&c);
    c.arch = argc > 2 ? argv[2] : "b8,M,b16,M,b16,M,b16,G|";
    /* Presets keep the real sizes (for benchmarks: speed does not depend on
     * the weights); a spec gets a tiny LSTM and dense part. */
    if (strcmp(c.arch, "small") != 0 && strcmp(c.arch, "vgg19") != 0) {
        c.lstm_hidden = 16;
        c.dense = 16;
    }
    c.seed = argc > 3 ? strtoull(argv[3], NULL, 10) : 1;
    char err[512];
    nn_model *m = nn_model_create(&c, err, sizeof err);
    if (!m) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    char th[128];
    const char *t = argc > 4 ? argv[4] : "0.5";
    snprintf(th, sizeof th, "%s,%s,%s,%s,%s,%s", t, t, t, t, t, t);
    nn_model_meta_set(m, "labels",
                      "any,epidural,intraparenchymal,intraventricular,subarachnoid,subdural");
    nn_model_meta_set(m, "windows", "40/80,80/200,600/2800");
    nn_model_meta_set(m, "thresholds", th);
    if (argc > 5) nn_model_meta_set(m, "preprocessing", argv[5]);
    nn_model_meta_set(m, "version", "test-random-weights");
    nn_model_meta_set(m, "provenance", "random weights for plumbing tests; learnt nothing");
    int rc = nn_model_save(m, argv[1], err, sizeof err);
    if (rc != 0) fprintf(stderr, "%s\n", err);
    nn_model_free(m);
    return rc ? 1 : 0;
}

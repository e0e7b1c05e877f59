/* triage/main.c: the `ichtriage` command and its subcommands. */
#include <stdio.h>
#include <string.h>

#include "log.h"
#include "nn.h"
#include "phantom.h"
#include "trainer.h"
#include "backup.h"
#include "decode.h"
#include "pacs_cmd.h"
#include "predict.h"
#include "scp_info.h"
#include "serve.h"
#include "worklist.h"
#include "status.h"

struct command {
    const char *name;
    int (*main)(int argc, char **argv);
    const char *help;
};

static const struct command commands[] = {
    {"serve", triage_serve_main, "run the node (DICOM Storage SCP, index, triage)"},
    {"worklist", triage_worklist_main, "print the worklist in reading order (--json)"},
    {"predict", triage_predict_main, "run the model on DICOM files or folders (--json)"},
    {"status", triage_status_main, "health at a glance: port, index, disk (--json)"},
    {"pacs", triage_pacs_main,
     "results to PACS: list what waits or was given up, retry or dismiss it"},
    {"backup", triage_backup_main, "copy the index (online) and the spool into DIR"},
    {"restore", triage_restore_main, "put a backup back into an empty store.dir"},
    {"phantom", train_phantom_main, "write synthetic head-CT studies with labelled hemorrhages"},
    {"train", train_train_main, "train a model (two stages) on RSNA-layout or phantom folders"},
    {"eval", train_eval_main, "evaluate a model on labelled folders; HTML report + JSON"},
    {"calibrate", train_calibrate_main,
     "re-pick a model's calibration and thresholds on labelled studies"},
    {"model", train_model_main, "the model registry: list, promote ID, rollback, register"},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: ichtriage COMMAND [-c FILE] [--set section.key=value]... [ARGS]\n\n"
               "Head-CT triage node. Decision support, not a diagnosis.\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].help);
    fprintf(f, "\n'ichtriage COMMAND --help' tells more.\n");
}

int main(int argc, char **argv)
{
    /* OpenBLAS's fastest kernels this CPU runs, before anything starts. */
    char err[256];
    if (nn_blas_rerun(argv, err, sizeof err) != 0)
        util_log(UTIL_LOG_WARN, "nn_blas_slow", "error=\"%s\"", err);
    scp_log_init(0);
    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("ichtriage %s\n", ICHTRIAGE_VERSION);
        const char *chose = nn_blas_fallback();
        printf("OpenBLAS kernels: %s", nn_blas_core());
        if (chose) printf(" (OpenBLAS chose %s: it does not know this CPU)", chose);
        putchar('\n');
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(argv[1], commands[i].name) == 0) return commands[i].main(argc - 1, argv + 1);
    /* Not listed: the node's own pixel decoder child (triage/decode.h). */
    if (strcmp(argv[1], "decode-pixels") == 0) return triage_decode_main(argc - 1, argv + 1);
    fprintf(stderr, "ichtriage: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}

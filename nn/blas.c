/* nn/blas.c: OpenBLAS's kernels for this CPU (see nn.h, nn_blas_*).
 *
 * Debian's OpenBLAS is built for every x86-64 CPU (DYNAMIC_ARCH) and picks
 * its kernels at load time from the CPU's family and model numbers. A model
 * it does not know gets its most generic kernels, Prescott's (SSE3). Debian
 * 12's 0.3.21 does not know Intel's Xeons of 2023 on (Emerald Rapids, family
 * 6 model 207, is one): there sgemm, and with it a training step, ran 2.5x
 * slower than with the AVX-512 kernels the CPU can run. OpenBLAS reads
 * OPENBLAS_CORETYPE only when it loads, so the fix is to set it and run the
 * program again. */
#include "nn.h"

#include <cblas.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

/* What OpenBLAS chose by itself, handed to the rerun. */
#define CHOSE_ENV "ICHTRIAGE_OPENBLAS_CHOSE"

const char *nn_blas_core(void)
{
    const char *c = openblas_get_corename();
    return c && c[0] ? c : "unknown";
}

const char *nn_blas_fallback(void)
{
    return getenv(CHOSE_ENV);
}

unsigned nn_cpu_features(void)
{
    unsigned f = 0;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) f |= NN_CPU_AVX2_FMA;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl"))
        f |= NN_CPU_AVX512;
#endif
    return f;
}

const char *nn_blas_better_core(const char *chosen, unsigned features)
{
    /* Only OpenBLAS's fallback is second-guessed: a CPU it knows keeps its
     * choice, tuned for it. The names are those 0.3.21 accepts. */
    if (!chosen || strcasecmp(chosen, "Prescott") != 0) return NULL;
    if ((features & NN_CPU_AVX512) && (features & NN_CPU_AVX2_FMA)) return "SkylakeX";
    if (features & NN_CPU_AVX2_FMA) return "Haswell";
    return NULL;
}

int nn_blas_rerun(char **argv, char *err, size_t errlen)
{
    if (getenv("OPENBLAS_CORETYPE")) return 0; /* someone chose; a rerun has */
    const char *chosen = nn_blas_core();
    const char *better = nn_blas_better_core(chosen, nn_cpu_features());
    if (!better) return 0;
    if (setenv("OPENBLAS_CORETYPE", better, 1) != 0 || setenv(CHOSE_ENV, chosen, 1) != 0) {
        snprintf(err, errlen, "setenv: %s", strerror(errno));
        return -1;
    }
    /* The program's path, not /proc/self/exe itself: under valgrind that is
     * valgrind's tool, and readlink() answers the program's path. */
    char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
        self[n] = '\0';
        fflush(NULL);
        execv(self, argv);
    }
    snprintf(err, errlen,
             "OpenBLAS chose %s kernels for this CPU; running again with "
             "OPENBLAS_CORETYPE=%s failed: %s",
             chosen, better, strerror(errno));
    unsetenv("OPENBLAS_CORETYPE");
    unsetenv(CHOSE_ENV);
    return -1;
}

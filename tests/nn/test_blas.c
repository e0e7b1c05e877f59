/* tests/nn/test_blas.c: which OpenBLAS kernels nn/ asks for (nn/blas.c).
 * Only OpenBLAS's fallback, Prescott's kernels, is replaced, and only by
 * kernels the CPU can run; a choice made in OPENBLAS_CORETYPE stands. The
 * rerun itself is checked on the real program by
 * tests/integration/test_blas.py. */
#include "nn.h"

#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

static const char *better(const char *chosen, unsigned f)
{
    const char *b = nn_blas_better_core(chosen, f);
    return b ? b : "(stands)";
}

Test(blas, only_the_fallback_is_replaced_by_what_the_cpu_runs)
{
    const unsigned both = NN_CPU_AVX2_FMA | NN_CPU_AVX512;
    cr_expect_str_eq(better("Prescott", both), "SkylakeX");
    cr_expect_str_eq(better("PRESCOTT", both), "SkylakeX");
    cr_expect_str_eq(better("Prescott", NN_CPU_AVX2_FMA), "Haswell");
    /* no AVX2 and FMA: Prescott's kernels may be all it runs */
    cr_expect_str_eq(better("Prescott", 0), "(stands)");
    cr_expect_str_eq(better("Prescott", NN_CPU_AVX512), "(stands)");
    /* a CPU OpenBLAS knows keeps the kernels tuned for it */
    cr_expect_str_eq(better("Haswell", both), "(stands)");
    cr_expect_str_eq(better("Zen", both), "(stands)");
    cr_expect_str_eq(better("SkylakeX", both), "(stands)");
    cr_expect_str_eq(better(NULL, both), "(stands)");
}

Test(blas, a_chosen_coretype_is_not_second_guessed)
{
    /* With OPENBLAS_CORETYPE set, whatever OpenBLAS runs, nothing is rerun:
     * the call returns (an exec would not) with nothing to report. */
    setenv("OPENBLAS_CORETYPE", "Prescott", 1);
    char err[256] = "";
    char *argv[] = {"test_nn_blas", NULL};
    cr_expect_eq(nn_blas_rerun(argv, err, sizeof err), 0);
    cr_expect_str_eq(err, "");
    cr_expect_str_eq(getenv("OPENBLAS_CORETYPE"), "Prescott");
    cr_expect_null(nn_blas_fallback());
}

Test(blas, the_kernels_in_use_have_a_name)
{
    const char *c = nn_blas_core();
    cr_assert_not_null(c);
    cr_expect_gt(strlen(c), 0);
}

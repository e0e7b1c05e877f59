/* tests/integration/failexec.c: an LD_PRELOAD shim for test_blas.py. Every
 * execv fails with EACCES, as when the program's file can no longer be run
 * (replaced by an upgrade, or on a mount made noexec), so that the path where
 * nn_blas_rerun cannot run the program again is taken for real. */
#include <errno.h>
#include <unistd.h>

int execv(const char *path, char *const argv[])
{
    (void)path;
    (void)argv;
    errno = EACCES;
    return -1;
}

/* tests/integration/nofsync.c: an LD_PRELOAD shim for test_fsync_order.py.
 * fsync and fdatasync return success without reaching the kernel, as a
 * program that forgot them would: the order checker must then find every
 * instance answered before it was on disk (the test of the test). */
#include <unistd.h>

int fsync(int fd)
{
    (void)fd;
    return 0;
}

int fdatasync(int fd)
{
    (void)fd;
    return 0;
}

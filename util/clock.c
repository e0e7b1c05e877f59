/* util/clock.c: see clock.h. */
#include "clock.h"

#include <time.h>

double util_clock_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

double util_clock_ms(void)
{
    return util_clock_s() * 1e3;
}

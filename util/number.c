/* util/number.c: see number.h. */
#include "number.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>

int util_number_long(const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

int util_number_u64(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    /* strtoull takes "-1" as 2^64 - 1: a sign is refused before it */
    const char *p = s;
    while (*p == ' ' || (*p >= '\t' && *p <= '\r'))
        p++;
    if (*p == '-' || *p == '+') return -1;
    unsigned long long v = strtoull(s, &end, 10);
    if (end == s || *end || errno) return -1;
    *out = (uint64_t)v;
    return 0;
}

int util_number_double(const char *s, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || errno || !isfinite(v)) return -1;
    *out = v;
    return 0;
}

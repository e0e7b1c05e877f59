/* util/number.h: numbers read from text a person or a client wrote (command
 * line options, URL parameters): the whole string must be the number, in
 * range, or it is refused. atoi and atof read "abc" as 0 and "3x" as 3. */
#pragma once

#include <stdint.h>

/* A decimal integer in [lo, hi]. Returns 0, or -1 (out unchanged). */
int util_number_long(const char *s, long lo, long hi, long *out);
/* A decimal integer >= 0 up to 2^64 - 1, no sign. Returns 0, or -1. */
int util_number_u64(const char *s, uint64_t *out);
/* A finite floating-point number (strtod's syntax). Returns 0, or -1. */
int util_number_double(const char *s, double *out);

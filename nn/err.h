/* nn/err.h: the one way nn/ writes an error message into a caller's buffer. */
#ifndef NN_ERR_H
#define NN_ERR_H

#include <stddef.h>

/* printf into err (errlen bytes, always terminated); a NULL err is ignored. */
void nn_errf(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif

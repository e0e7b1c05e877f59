/* util/io.h: writing a whole buffer to a file descriptor. write(2) may write
 * less than asked (a disk filling up, a signal); each caller had its own loop,
 * and some reported a short write with whatever errno was left over. */
#pragma once

#include <stddef.h>

/* Writes the n bytes at buf to fd, going on after a short write or EINTR. A
 * write that writes nothing is a full disk. Returns 0, or -1 with errno set
 * (ENOSPC for a disk that filled up). */
int util_write_all(int fd, const void *buf, size_t n);

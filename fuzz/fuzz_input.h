/* fuzz/fuzz_input.h: every parser under fuzzing reads a path, so each input
 * is written to one memfd per process and handed over as /proc/self/fd/N
 * (no disk traffic, nothing left behind). */
#ifndef FUZZ_INPUT_H
#define FUZZ_INPUT_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

/* Replaces the memfd's contents with data and returns its path (static
 * storage, valid until the next call). Aborts if the memfd cannot be made:
 * a fuzzer that silently tests nothing would be worse. */
static inline const char *fuzz_input_path(const uint8_t *data, size_t size)
{
    static int fd = -1;
    static char path[64];
    if (fd < 0) {
        fd = memfd_create("fuzz-input", 0);
        if (fd < 0) {
            perror("memfd_create");
            abort();
        }
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    }
    if (ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != (ssize_t)size) {
        perror("fuzz input");
        abort();
    }
    return path;
}

#endif

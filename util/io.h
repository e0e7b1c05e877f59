/* util/io.h: writing a whole buffer to a file descriptor. write(2) may write
 * less than asked (a disk filling up, a signal); each caller had its own loop,
 * and some reported a short write with whatever errno was left over. And
 * giving what an admin's command makes as root the owner of the store, and
 * keeping a library's descriptors from the programs the node starts. */
#pragma once

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Writes the n bytes at buf to fd, going on after a short write or EINTR. A
 * write that writes nothing is a full disk. Returns 0, or -1 with errno set
 * (ENOSPC for a disk that filled up). */
int util_write_all(int fd, const void *buf, size_t n);

/* Run as root (`sudo ichtriage model promote`, `sudo ichtriage pacs list`
 * migrating the index), what is made in a folder takes that folder's owner,
 * as `ichtriage restore` does: the node (its own user, no capabilities)
 * must be able to read, replace or remove it. fd, or path when fd < 0. Does
 * nothing when not root or the folder is root's. Returns 0, or -1 with
 * errno. */
int util_own_like_folder(int fd, const char *path);

/* Marks fd close-on-exec, for a descriptor a library opened without it
 * (dcmtk's sockets): a program the node starts (the webhook's curl) would
 * keep it open after the node is gone. Returns 0, or -1 with errno. */
int util_set_cloexec(int fd);

#ifdef __cplusplus
}
#endif

/* util/child.h: starting another program from a threaded process with
 * nothing of ours but what it is given. A descriptor a library opened
 * without close-on-exec (dcmtk's listening socket, a PACS connection) would
 * otherwise live on in the child: a node killed while its child ran could
 * not listen on its port again until the child ended. */
#pragma once

#include <sys/types.h>

/* Starts file (looked up in PATH when it has no slash) with argv and envp
 * (NULL: this process's environment). The child gets in as its stdin and out
 * as its stdout (-1: /dev/null), this process's stderr, no other descriptor,
 * every signal at its default and none blocked; it runs with the calling
 * thread's scheduling. posix_spawn (vfork and exec): safe from any thread,
 * unlike fork without exec. Returns 0 with *pid (the caller reaps it), or an
 * errno value (ENOENT: no such program). in and out stay the caller's. */
int util_spawn(pid_t *pid, const char *file, char *const argv[], char *const envp[], int in,
               int out);

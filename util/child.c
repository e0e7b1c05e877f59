/* util/child.c: see child.h. */
#include "child.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>

extern char **environ;

/* Makes fd (or /dev/null when fd < 0) the child's target descriptor. */
static int give(posix_spawn_file_actions_t *fa, int fd, int target, int mode)
{
    if (fd < 0) return posix_spawn_file_actions_addopen(fa, target, "/dev/null", mode, 0);
    return posix_spawn_file_actions_adddup2(fa, fd, target);
}

int util_spawn(pid_t *pid, const char *file, char *const argv[], char *const envp[], int in,
               int out)
{
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t at;
    int rc = posix_spawn_file_actions_init(&fa);
    if (rc != 0) return rc;
    rc = posix_spawnattr_init(&at);
    if (rc != 0) {
        posix_spawn_file_actions_destroy(&fa);
        return rc;
    }
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    if (!(rc = give(&fa, in, 0, O_RDONLY)) && !(rc = give(&fa, out, 1, O_WRONLY)) &&
        !(rc = posix_spawn_file_actions_addclosefrom_np(&fa, 3)) &&
        !(rc = posix_spawnattr_setsigmask(&at, &none)) &&
        !(rc = posix_spawnattr_setsigdefault(&at, &all)) &&
        !(rc = posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF)))
        rc = posix_spawnp(pid, file, &fa, &at, argv, envp ? envp : environ);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    return rc;
}

/* Unit tests of util/progress: the line a terminal sees (stderr on a
 * pseudo-terminal) and the log lines otherwise. */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <pty.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "progress.h"

/* Runs the same steps with stderr on fd, and returns what fd's other end
 * (read_fd) got, in out (n bytes). */
static void steps_into(int fd, int read_fd, char *out, size_t n)
{
    fflush(stderr);
    int saved = dup(2);
    cr_assert_geq(saved, 0);
    dup2(fd, 2);
    struct util_progress p;
    util_progress_begin(&p, "test_progress", "counting", "what=test", "items", 10, 2, 0.2);
    util_progress_step(&p, 3); /* too soon: nothing */
    usleep(300000);
    util_progress_step(&p, 5);
    usleep(300000);
    util_progress_step(&p, 10); /* the end: nothing, the caller says the rest */
    util_progress_end(&p);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    size_t k = 0;
    ssize_t r;
    while (k + 1 < n && (r = read(read_fd, out + k, n - 1 - k)) > 0)
        k += (size_t)r;
    out[k] = 0;
}

Test(progress, a_terminal_gets_one_line_redrawn_and_cleared)
{
    int master, slave;
    cr_assert_eq(openpty(&master, &slave, NULL, NULL, NULL), 0);
    fcntl(master, F_SETFL, O_NONBLOCK);
    char out[1024];
    steps_into(slave, master, out, sizeof out);
    /* 3 of the 8 left in 0.3 s: about 10 items/s, 5 to go. */
    cr_assert(strstr(out, "\rcounting: 5/10 items, "), "%s", out);
    cr_assert(strstr(out, " items/s, ETA 0m0"), "%s", out);
    cr_assert(!strstr(out, "3/10") && !strstr(out, "10/10"), "%s", out);
    cr_assert(strstr(out, "\r\033[K"), "the line was not cleared: %s", out);
    cr_assert(!strstr(out, "event="), "a log line on a terminal: %s", out);
    close(master);
    close(slave);
}

Test(progress, elsewhere_a_log_line_every_so_often)
{
    int fds[2];
    cr_assert_eq(pipe(fds), 0);
    fcntl(fds[0], F_SETFL, O_NONBLOCK);
    char out[2048];
    steps_into(fds[1], fds[0], out, sizeof out);
    cr_assert(strstr(out, "event=test_progress what=test done=5 total=10 unit=items per_s="), "%s",
              out);
    cr_assert(!strstr(out, "done=3") && !strstr(out, "done=10"), "%s", out);
    cr_assert(!strstr(out, "\r"), "a terminal's line in the log: %s", out);
    close(fds[0]);
    close(fds[1]);
}

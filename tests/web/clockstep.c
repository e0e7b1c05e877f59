/* tests/web/clockstep.c: an LD_PRELOAD shim for the web and triage tests.
 * The wall clock (gettimeofday, clock_gettime of CLOCK_REALTIME) is moved by
 * the seconds written in the file named by ICHTRIAGE_CLOCKSTEP_FILE, read at
 * each call, as when NTP or an administrator steps the clock. Monotonic
 * clocks are left as they are, and so is the kernel's wall clock, against
 * which a wait until a wall-clock time ends. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static long long step_s(void)
{
    const char *path = getenv("ICHTRIAGE_CLOCKSTEP_FILE");
    FILE *f = path ? fopen(path, "r") : NULL;
    long long s = 0;
    if (f) {
        if (fscanf(f, "%lld", &s) != 1) s = 0;
        fclose(f);
    }
    return s;
}

int clock_gettime(clockid_t id, struct timespec *ts)
{
    int (*real)(clockid_t, struct timespec *) =
        (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    int rc = real(id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE))
        ts->tv_sec += (time_t)step_s();
    return rc;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz)
{
    int (*real)(struct timeval *, void *) =
        (int (*)(struct timeval *, void *))dlsym(RTLD_NEXT, "gettimeofday");
    int rc = real(tv, tz);
    if (rc == 0) tv->tv_sec += (time_t)step_s();
    return rc;
}

/* util/clock.h: the monotonic clock, for durations and deadlines (a wall
 * clock stepped by NTP or by hand must not stretch or cut them). */
#pragma once

#include <pthread.h>
#include <stdint.h>
#include <time.h>

/* Seconds and milliseconds since an arbitrary start (CLOCK_MONOTONIC). */
double util_clock_s(void);
double util_clock_ms(void);

/* A condition variable whose timed waits are measured on the monotonic
 * clock: with the default (CLOCK_REALTIME) a wall clock stepped back by an
 * hour stretches a one-second wait by the hour. */
void util_clock_cond_init(pthread_cond_t *cv);

/* The monotonic time ms from now: the deadline pthread_cond_timedwait takes
 * on such a condition variable. */
struct timespec util_clock_after_ms(int64_t ms);

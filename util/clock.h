/* util/clock.h: the monotonic clock, for durations and deadlines (a wall
 * clock stepped by NTP or by hand must not stretch or cut them). */
#pragma once

/* Seconds and milliseconds since an arbitrary start (CLOCK_MONOTONIC). */
double util_clock_s(void);
double util_clock_ms(void);

/* util/progress.h: the progress of long work that is not a training epoch
 * (decoding a folder, computing features): on a terminal one line redrawn in
 * place, otherwise a log line every so often. */
#pragma once

#include <stddef.h>

struct util_progress {
    const char *event; /* the log event, e.g. "train_decode_progress" */
    char what[320];    /* its key=value fields in the log, and the terminal line's label */
    const char *unit;  /* "files", "slices" */
    size_t total, first;
    int tty, shown;
    double every, t0, last;
};

/* Starts showing the progress of total units, of which first are done
 * already (an earlier run's). label: the terminal line's start; fields: the
 * log line's key=value pairs before done=.. total=.. (may be ""); every_s: seconds
 * between log lines when stderr is not a terminal (a terminal's line is
 * redrawn every 0.25 s); $ICHTRIAGE_PROGRESS_EVERY_S, a number of seconds,
 * overrides it (tests, or a closer watch on a long run). */
void util_progress_begin(struct util_progress *p, const char *event, const char *label,
                         const char *fields, const char *unit, size_t total, size_t first,
                         double every_s);
/* done of total: shown when it is time (never the end itself). */
void util_progress_step(struct util_progress *p, size_t done);
/* Clears the terminal's line, if one was shown. */
void util_progress_end(struct util_progress *p);

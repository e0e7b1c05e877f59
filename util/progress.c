/* util/progress.c: see progress.h. */
#include "progress.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "log.h"

void util_progress_begin(struct util_progress *p, const char *event, const char *label,
                         const char *fields, const char *unit, size_t total, size_t first,
                         double every_s)
{
    memset(p, 0, sizeof *p);
    p->event = event, p->unit = unit, p->total = total, p->first = first;
    p->tty = isatty(2);
    snprintf(p->what, sizeof p->what, "%s", p->tty ? label : fields);
    p->every = p->tty ? 0.25 : every_s;
    const char *env = getenv("ICHTRIAGE_PROGRESS_EVERY_S");
    char *end;
    double v = env ? strtod(env, &end) : -1;
    if (!p->tty && env && end != env && *end == '\0' && v >= 0) p->every = v;
    p->t0 = p->last = util_clock_s();
}

void util_progress_step(struct util_progress *p, size_t done)
{
    double t = util_clock_s();
    if (t - p->last < p->every || done >= p->total) return;
    p->last = t;
    double rate = t > p->t0 ? (double)(done - p->first) / (t - p->t0) : 0;
    double eta = rate > 0 ? (double)(p->total - done) / rate : 0;
    if (p->tty) {
        fprintf(stderr, "\r%s: %zu/%zu %s, %.*f %s/s, ETA %dm%02ds ", p->what, done, p->total,
                p->unit, rate < 10 ? 1 : 0, rate, p->unit, (int)eta / 60, (int)eta % 60);
        p->shown = 1;
    } else {
        util_log(UTIL_LOG_INFO, p->event, "%s%sdone=%zu total=%zu unit=%s per_s=%.0f eta_s=%.0f",
                 p->what, p->what[0] ? " " : "", done, p->total, p->unit, rate, eta);
    }
}

void util_progress_end(struct util_progress *p)
{
    if (p->shown) fputs("\r\033[K", stderr); /* the line goes; the log says the rest */
    p->shown = 0;
}

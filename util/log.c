/* One-line key=value logs to stderr (see log.h). A whole line goes out in one
 * write(2) so lines from several threads never interleave. */
#include "log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* The only process-wide setting: the level is read by every thread that logs
 * and changed by main() on start and reload, so it is an atomic, not a context. */
static atomic_int log_level = UTIL_LOG_INFO;

static const char *const level_names[] = {"error", "warn", "info", "debug"};

void util_log_set_level(enum util_log_level level)
{
    atomic_store(&log_level, (int)level);
}

enum util_log_level util_log_get_level(void)
{
    return (enum util_log_level)atomic_load(&log_level);
}

int util_log_level_parse(const char *name)
{
    for (int i = 0; i < 4; i++)
        if (strcmp(name, level_names[i]) == 0) return i;
    return -1;
}

void util_log(enum util_log_level level, const char *event, const char *fmt, ...)
{
    if ((int)level > atomic_load(&log_level)) return;
    char line[2048];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof line, "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s event=%s",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     ts.tv_nsec / 1000000, level_names[level], event);
    if (fmt && fmt[0] && n < (int)sizeof line - 2) {
        line[n++] = ' ';
        va_list ap;
        va_start(ap, fmt);
        int m = vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
        va_end(ap);
        n = m < 0 ? n : n + m;
    }
    if (n > (int)sizeof line - 2) n = (int)sizeof line - 2;
    line[n++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, (size_t)n);
    (void)w;
}

const char *util_log_safe(char *out, unsigned long n, const char *s)
{
    unsigned long j = 0;
    if (n == 0) return out;
    for (; s && *s && j + 1 < n; s++) {
        unsigned char c = (unsigned char)*s;
        out[j++] = (c <= ' ' || c == '"' || c == '=' || c >= 0x7f) ? '_' : (char)c;
    }
    out[j] = 0;
    return out;
}

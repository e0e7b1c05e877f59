/* One-line key=value logging to stderr, the form journald keeps.
 *
 *   util_log(UTIL_LOG_INFO, "instance_stored", "sop=%s bytes=%zu", sop, n);
 * prints
 *   level=info event=instance_stored sop=1.2.3 bytes=524288
 *
 * Never pass patient names or other PHI; UIDs are fine. */
#ifndef UTIL_LOG_H
#define UTIL_LOG_H

#ifdef __cplusplus
extern "C" {
#endif

enum util_log_level {
    UTIL_LOG_ERROR = 0,
    UTIL_LOG_WARN = 1,
    UTIL_LOG_INFO = 2,
    UTIL_LOG_DEBUG = 3,
};

/* The level below which lines are printed; set once by main() and on reload. */
void util_log_set_level(enum util_log_level level);
enum util_log_level util_log_get_level(void);
/* Parses "error", "warn", "info", "debug"; returns -1 on anything else. */
int util_log_level_parse(const char *name);

/* fmt carries the event's own key=value pairs, without a trailing newline. */
void util_log(enum util_log_level level, const char *event, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Copies s into out (size n) so that it is safe as a log value: no spaces,
 * quotes, control bytes or '=' survive, and it is cut at n-1 bytes. */
const char *util_log_safe(char *out, unsigned long n, const char *s);

#ifdef __cplusplus
}
#endif

#endif

/* Whether stores are failing now: the node's own refusals (its disk, its
 * folders' modes, its index; never the peer's malformed data) kept for
 * /healthz, the page's banner, /metrics and `ichtriage status`. The state
 * is "failing" while the latest store was refused, or a refusal is younger
 * than store.failure_window_seconds; it clears by itself once stores
 * succeed again. The node also writes it to <store.dir>/store-health.json
 * (a file it opened at start and rewrites in place, so that a read-only
 * spool or a full disk does not stop it) for `ichtriage status`, which
 * reads the store from the outside. */
#ifndef TRIAGE_STORE_HEALTH_H
#define TRIAGE_STORE_HEALTH_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "scp.h"

#define TRIAGE_STORE_HEALTH_RECENT 32 /* outcomes kept for "N of the last M" */
#define TRIAGE_STORE_HEALTH_FILE "store-health.json"

struct triage_store_health {
    pthread_mutex_t mu;
    int64_t window_ms;
    struct {
        int64_t at_ms;
        bool failed;
    } recent[TRIAGE_STORE_HEALTH_RECENT];
    int next, count;
    int64_t last_failure_ms, last_success_ms;
    long long since_success; /* refusals since the last success */
    enum scp_refusal last_why;
    char last_reason[300];
    int fd; /* the state file; -1 when it could not be opened */
};

/* What the state says at a moment. */
struct triage_store_verdict {
    bool failing;
    int recent_failed, recent_total; /* within the window, of the last 32 */
    long long since_success;
    int64_t last_failure_ms, last_success_ms, window_ms;
    char why[32];     /* the last refusal's kind (scp_refusal_name) */
    char reason[300]; /* and its logged reason */
};

/* Starts with a clean state and (re)writes <store_dir>/store-health.json.
 * A file that cannot be written is logged, never fatal. */
void triage_store_health_init(struct triage_store_health *h, const char *store_dir,
                              int64_t window_seconds);
void triage_store_health_free(struct triage_store_health *h);

/* One answered store: refusals that are not the node's own trouble are
 * ignored. Any thread. Returns true when the state changed to or from
 * failing (the caller tells the web page). */
bool triage_store_health_record(struct triage_store_health *h, int64_t now_ms, unsigned status,
                                enum scp_refusal why, const char *reason);

/* The state at now_ms. Any thread. */
void triage_store_health_verdict(struct triage_store_health *h, int64_t now_ms,
                                 struct triage_store_verdict *out);

/* "stores failing: 3 of the last 3 stores refused (A700) in the last 60 s,
 * last at 2025-01-01T10:00:00Z: permission: cannot create temp file: ..." */
void triage_store_verdict_text(const struct triage_store_verdict *v, char *out, size_t n);

/* For `ichtriage status`: the verdict the running (or last) node wrote in
 * store_dir, evaluated at now_ms. Returns 0, or -1 when there is no
 * readable file (a node that never ran here, or an older one). */
int triage_store_health_read(const char *store_dir, int64_t now_ms,
                             struct triage_store_verdict *out);

#endif

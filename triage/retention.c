/* triage/retention.c: removing what may go (see retention.h). The rows go
 * first, in one commit; then the files. A crash in between leaves files no
 * row points to, which the start-up sweep of triage/store.c removes. */
#include "retention.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "db_retention.h"
#include "log.h"

struct removal {
    const char *store_dir;
    long files, failed;
};

static void remove_file(void *ud, const char *rel)
{
    struct removal *r = ud;
    char path[2048];
    snprintf(path, sizeof path, "%s/%s", r->store_dir, rel);
    if (unlink(path) == 0 || errno == ENOENT)
        r->files++;
    else
        r->failed++;
    /* The series and study folders go once empty (rmdir refuses otherwise). */
    for (int up = 0; up < 2; up++) {
        char *slash = strrchr(path, '/');
        if (!slash) break;
        *slash = 0;
        if (rmdir(path) != 0) break;
    }
}

/* A flagged study nobody has read keeps its images past retention: the
 * log says how many, when that changes. */
static void log_held(struct triage_retention *r, int64_t now_ms)
{
    int64_t flagged, reading;
    if (db_retention_held(r->db, now_ms, r->keep_ms, r->keep_reviewed_ms, r->claim_ms, &flagged,
                          &reading) != 0) {
        util_log(UTIL_LOG_ERROR, "retention_failed", "error=\"cannot count studies kept\"");
        return;
    }
    if (r->held_logged && flagged == r->held_flagged && reading == r->held_reading) return;
    if (r->held_logged || flagged || reading)
        util_log(flagged ? UTIL_LOG_WARN : UTIL_LOG_INFO, "retention_held",
                 "flagged_not_reviewed=%lld being_read=%lld reason=\"kept past"
                 " store.retention_days until reviewed or no longer being read\"",
                 (long long)flagged, (long long)reading);
    r->held_flagged = flagged;
    r->held_reading = reading;
    r->held_logged = true;
}

int triage_retention_run(struct triage_retention *r, int64_t now_ms)
{
    if (r->keep_ms <= 0) return 0;
    int64_t ids[TRIAGE_RETENTION_BATCH];
    int n;
    if (db_retention_due(r->db, now_ms, r->keep_ms, r->keep_reviewed_ms, r->claim_ms, ids,
                         TRIAGE_RETENTION_BATCH, &n) != 0) {
        util_log(UTIL_LOG_ERROR, "retention_failed", "error=\"cannot read studies\"");
        return -1;
    }
    for (int i = 0; i < n; i++) {
        struct removal rm = {r->store_dir, 0, 0};
        int rows = db_retention_purge(r->db, ids[i], now_ms, r->keep_ms, r->keep_reviewed_ms,
                                      r->claim_ms, remove_file, &rm);
        if (rows == DB_RETENTION_NOT_DUE) {
            util_log(UTIL_LOG_INFO, "study_kept",
                     "study_id=%lld reason=\"changed since it was found due\"", (long long)ids[i]);
            continue;
        }
        if (rows < 0) {
            util_log(UTIL_LOG_ERROR, "retention_failed", "study_id=%lld error=\"database\"",
                     (long long)ids[i]);
            return -1;
        }
        util_log(rm.failed ? UTIL_LOG_WARN : UTIL_LOG_INFO, "study_purged",
                 "study_id=%lld instances=%d files_removed=%ld files_failed=%ld", (long long)ids[i],
                 rows, rm.files, rm.failed);
    }
    if (n < TRIAGE_RETENTION_BATCH) log_held(r, now_ms);
    return n;
}

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

int triage_retention_run(struct triage_retention *r, int64_t now_ms)
{
    if (r->keep_ms <= 0) return 0;
    int64_t ids[TRIAGE_RETENTION_BATCH];
    int n;
    if (db_retention_due(r->db, now_ms, r->keep_ms, r->keep_reviewed_ms, ids,
                         TRIAGE_RETENTION_BATCH, &n) != 0) {
        util_log(UTIL_LOG_ERROR, "retention_failed", "error=\"cannot read studies\"");
        return -1;
    }
    for (int i = 0; i < n; i++) {
        struct removal rm = {r->store_dir, 0, 0};
        int rows = db_retention_purge(r->db, ids[i], now_ms, r->keep_ms, r->keep_reviewed_ms,
                                      remove_file, &rm);
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
    return n;
}

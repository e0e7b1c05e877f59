/* db/: what the web worklist reads and writes besides the worklist itself
 * (db_triage.h) and reviews (db_reviews.h): one study's details, its series
 * and per-slice probabilities, claims ("being read by"), the audit table
 * and the numbers behind /metrics. The loop thread's connection. */
#ifndef DB_WEB_H
#define DB_WEB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "db.h"
#include "db_reviews.h"
#include "db_triage.h"

/* One study in detail; strings borrowed for the callback only. row has the
 * worklist's fields for the study. */
struct db_study_view {
    struct db_worklist_row row;
    const char *specific_charset, *birth_date, *sex, *study_id;
    const char *key_sop; /* "" until triaged */
    int key_index;
    const char *note;
    double ms_total;
    /* "" when nobody; a claim that may have lapsed (db_claim_live) */
    const char *claimed_by;
    int64_t claimed_at_ms;
    struct db_review_seen seen; /* what a reader shown this view has seen */
};
typedef int (*db_study_view_fn)(void *ud, const struct db_study_view *v);
/* Calls fn once for study_uid. Returns 0, 1 when no such study, -1 on error. */
int db_study_view(struct db *db, const char *study_uid, db_study_view_fn fn, void *ud);

struct db_series_row {
    const char *series_uid, *modality, *series_desc, *state, *state_reason;
    int instance_count;
    bool has_number; /* Series Number, when the series had one */
    int number;
    bool has_result;
};
typedef int (*db_series_row_fn)(void *ud, const struct db_series_row *s);
/* The series of study_uid in series-number order. */
int db_study_series(struct db *db, const char *study_uid, db_series_row_fn fn, void *ud);

/* One slice of a result: its position idx (0-based, from the feet), its
 * frame (0-based) in instance sop_uid (borrowed for the callback) of
 * frames frames, that instance's InstanceNumber (-1 when it has none or is
 * no longer indexed) and the slice's probabilities. */
struct db_slice {
    int idx;
    const char *sop_uid;
    int frame, frames, instance_number;
    float p[DB_LABELS];
};
/* Per-slice probabilities of the series that set the study's result, in
 * slice order (along the normal, from the feet to the head). */
typedef int (*db_slice_fn)(void *ud, const struct db_slice *s);
int db_study_slices(struct db *db, const char *study_uid, db_slice_fn fn, void *ud);

/* The file (relative to store.dir) of instance sop_uid when it belongs to
 * study_uid. Returns 0, 1 when not found, -1 on error. */
int db_study_instance_file(struct db *db, const char *study_uid, const char *sop_uid, char *path,
                           size_t pathlen);
/* Whether frame of instance sop_uid has a per-slice result computed from
 * its current file: triage has read these pixels (in the decoder child)
 * without harm. Returns 0 yes, 1 no result, 2 a result of an earlier copy
 * (the instance was received again after its triage started), -1 error. */
int db_slice_has_result(struct db *db, const char *sop_uid, int frame);

/* Claims: one reader per study, for claim_ms from when it was made or last
 * renewed (claimed_at); then it has lapsed (the reader closed the tab, or
 * went home) and counts as no claim. db_claim_set claims for reader at
 * now_ms. Returns 0 claimed (holder: the reader whose live claim force
 * took over, else ""), 3 reader's own live claim renewed, 4 another
 * reader's lapsed claim taken over (holder: that reader), 2 held by another
 * reader (live; taken over only with force; holder copied), 1 no such
 * study, -1 error. db_claim_release drops reader's live claim: 0, 1 when no
 * such study or not held by reader, -1 on error. */
int db_claim_set(struct db *db, const char *study_uid, const char *reader, bool force,
                 int64_t now_ms, int64_t claim_ms, char *holder, size_t holderlen);
int db_claim_release(struct db *db, const char *study_uid, const char *reader, int64_t now_ms,
                     int64_t claim_ms);
/* Whether a claim made or renewed at claimed_at_ms is live at now_ms. */
static inline bool db_claim_live(int64_t claimed_at_ms, int64_t now_ms, int64_t claim_ms)
{
    return claimed_at_ms > now_ms - claim_ms;
}
/* The live claims of all studies: fn per claim. */
typedef int (*db_claim_fn)(void *ud, const char *study_uid, const char *reader, int64_t at_ms);
int db_claims(struct db *db, int64_t now_ms, int64_t claim_ms, db_claim_fn fn, void *ud);

/* Appends one audit line: who did what (opened, reviewed, claimed, ...) to
 * which study ("" for none). Returns 0 or -1. */
int db_audit_add(struct db *db, int64_t now_ms, const char *user, const char *action,
                 const char *study_uid, const char *detail);
/* Appends "user opened study_uid", unless the same person's last opening
 * of it is less than window_ms old (the page reloads an open study on each
 * update of it). Returns 0 or -1. */
int db_audit_opened(struct db *db, int64_t now_ms, const char *user, const char *study_uid,
                    int64_t window_ms);

#define DB_LATENCY_BUCKETS 10
/* Upper bounds in seconds of the triage latency histogram (job queued to
 * result), the last being +Inf. */
extern const double db_latency_bounds[DB_LATENCY_BUCKETS];

struct db_metrics {
    int64_t instances, series, series_completed, studies;
    int64_t jobs_queued, jobs_running, jobs_done, jobs_failed;
    int64_t latency_count;
    double latency_sum;                     /* seconds */
    int64_t latency_le[DB_LATENCY_BUCKETS]; /* cumulative */
    int64_t studies_by_status[8];           /* see db_metrics_status_names */
    /* Latest review of each study against the study's flag. */
    int64_t review_tp, review_fp, review_fn, review_tn;
    int64_t reviews;
};
extern const char *const db_metrics_status_names[8];
/* Jobs failed at or after since_ms (the degraded banner). Returns 0 or -1. */
int db_jobs_failed_since(struct db *db, int64_t since_ms, int64_t *n);
/* Fills m. Returns 0 or -1. */
int db_metrics_read(struct db *db, struct db_metrics *m);

#endif

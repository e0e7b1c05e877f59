/* db/: the radiologists' reviews. A review is a finding on a whole study
 * (hemorrhage yes/no, the subtypes seen, a comment) with who and when; the
 * latest review of a study is its label for retraining. Storing one takes
 * the study off the worklist (status reviewed). Loop thread's connection
 * (or any single-threaded caller's own, db_open). */
#ifndef DB_REVIEWS_H
#define DB_REVIEWS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "db.h"

/* One review; strings borrowed for the callback only. */
struct db_review_row {
    int64_t id;
    const char *study_uid;
    bool hemorrhage;
    const char *subtypes; /* comma-separated names, "" when none */
    const char *slices;   /* slices marked as showing the bleed: "sop/frame" entries,
                             comma-separated, "" when none */
    const char *comment, *reviewer;
    int64_t created_at_ms;
};
typedef int (*db_review_fn)(void *ud, const struct db_review_row *r);

/* What a reader was shown of a study: its latest review (reviews.id, 0 for
 * none) and the time its newest result was stored (results.created_at, 0
 * for none). */
struct db_review_seen {
    int64_t review_id;
    int64_t result_at_ms; /* -1 in what a reader saw: not compared */
};

/* Stores a review of study_uid, sets the study's reviewed time and status
 * and drops its claim, in one transaction. slices: the slices the reviewer
 * marked as showing the bleed ("sop/frame" entries, comma-separated; NULL or
 * "" for none), each an instance of this study. saw: what the reviewer was
 * shown; when another review or another result has come since, nothing is
 * stored (two readers must not replace each other's finding unknowingly).
 * NULL: not compared. now (may be NULL): the study's latest review and
 * result when that was compared. Returns 0, 1 when no such study, 2 when a
 * marked slice is not one of the study's instances (err says which), 3 when
 * the study is not as saw says (err says what changed), -1 with err on
 * failure. */
int db_review_add(struct db *db, const char *study_uid, bool hemorrhage, const char *subtypes,
                  const char *slices, const char *comment, const char *reviewer, int64_t now_ms,
                  const struct db_review_seen *saw, struct db_review_seen *now, char *err,
                  size_t errlen);

/* Every review of study_uid, oldest first. Returns 0, -1 on a database
 * error, or what fn returned when that was non-zero (which stops: a
 * callback that fails, e.g. out of memory, is not a shorter list). */
int db_reviews_of_study(struct db *db, const char *study_uid, db_review_fn fn, void *ud);

/* The latest review of each reviewed study, oldest study first: the
 * retraining labels. Returns as db_reviews_of_study. */
int db_reviews_latest(struct db *db, db_review_fn fn, void *ud);

#endif

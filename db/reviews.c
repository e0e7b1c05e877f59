/* db/reviews.c: the radiologists' reviews (see db_reviews.h). */
#include "db_internal.h"
#include "db_reviews.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int study_id_of(sqlite3 *c, const char *uid, int64_t *id)
{
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(c, "SELECT id FROM studies WHERE study_uid = ?1", -1, &st, NULL) !=
        SQLITE_OK)
        return -1;
    sqlite3_bind_text(st, 1, uid, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) *id = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : rc == SQLITE_DONE ? 1 : -1;
}

static int step_done(sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : -1;
}

/* Checks that every "sop/frame" entry of slices is a frame of an instance of
 * study sid. Returns 0, 2 with err naming the first that is not, -1. */
static int slices_of_study(sqlite3 *c, int64_t sid, const char *slices, char *err, size_t errlen)
{
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(c,
                           "SELECT i.frames FROM instances i JOIN series s ON s.id = i.series_id"
                           " WHERE i.sop_uid = ?1 AND s.study_ref = ?2",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    int rc = 0;
    for (const char *p = slices; *p && rc == 0;) {
        size_t n = strcspn(p, ",");
        char e[96];
        snprintf(e, sizeof e, "%.*s", (int)(n < sizeof e - 1 ? n : sizeof e - 1), p);
        char *slash = strchr(e, '/'), *end = NULL;
        long frame = slash ? strtol(slash + 1, &end, 10) : -1;
        if (!slash || !end || *end || frame < 0) {
            rc = 2;
        } else {
            *slash = '\0';
            sqlite3_reset(st);
            sqlite3_bind_text(st, 1, e, -1, SQLITE_TRANSIENT);
            sqlite3_bind_int64(st, 2, sid);
            int s = sqlite3_step(st);
            if (s == SQLITE_ROW)
                rc = frame < sqlite3_column_int64(st, 0) ? 0 : 2;
            else
                rc = s == SQLITE_DONE ? 2 : -1;
            *slash = '/';
        }
        if (rc == 2 && err) snprintf(err, errlen, "%s is not a slice of this study", e);
        p += n;
        if (*p == ',') p++;
    }
    sqlite3_finalize(st);
    return rc;
}

/* Whether study sid is still as saw says: 0 yes, 3 no (err says what
 * changed), -1 on error; *now is what it is. */
static int seen_still(sqlite3 *c, int64_t sid, const struct db_review_seen *saw,
                      struct db_review_seen *now, char *err, size_t errlen)
{
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(c, "SELECT" DB_STUDY_SEEN_COLUMNS("?1"), -1, &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_int64(st, 1, sid);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        *now = (struct db_review_seen){sqlite3_column_int64(st, 0), sqlite3_column_int64(st, 1)};
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW) return -1;
    if (now->review_id != saw->review_id) {
        if (err) snprintf(err, errlen, "another review since");
        return 3;
    }
    if (saw->result_at_ms >= 0 && now->result_at_ms != saw->result_at_ms) {
        if (err) snprintf(err, errlen, "another result since");
        return 3;
    }
    return 0;
}

int db_review_add(struct db *db, const char *study_uid, bool hemorrhage, const char *subtypes,
                  const char *slices, const char *comment, const char *reviewer, int64_t now_ms,
                  const struct db_review_seen *saw, struct db_review_seen *now, char *err,
                  size_t errlen)
{
    sqlite3 *c = db_conn(db);
    sqlite3_stmt *st;
    if (sqlite3_exec(c, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) goto fail;
    int64_t sid = 0;
    int found = study_id_of(c, study_uid, &sid);
    if (found != 0) {
        sqlite3_exec(c, "ROLLBACK", NULL, NULL, NULL);
        if (found < 0) goto fail;
        return 1;
    }
    struct db_review_seen is;
    int same = saw ? seen_still(c, sid, saw, &is, err, errlen) : 0;
    if (saw && now && same >= 0) *now = is;
    if (same != 0) {
        if (same < 0) goto rollback;
        sqlite3_exec(c, "ROLLBACK", NULL, NULL, NULL);
        return 3;
    }
    int marked = slices && slices[0] ? slices_of_study(c, sid, slices, err, errlen) : 0;
    if (marked != 0) {
        if (marked < 0) goto rollback;
        sqlite3_exec(c, "ROLLBACK", NULL, NULL, NULL);
        return 2;
    }
    if (sqlite3_prepare_v2(c,
                           "INSERT INTO reviews (study_ref, hemorrhage, subtypes, comment,"
                           " reviewer, created_at, slices) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                           -1, &st, NULL) != SQLITE_OK)
        goto rollback;
    sqlite3_bind_int64(st, 1, sid);
    sqlite3_bind_int(st, 2, hemorrhage);
    sqlite3_bind_text(st, 3, subtypes ? subtypes : "", -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, comment ? comment : "", -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, reviewer, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 6, now_ms);
    sqlite3_bind_text(st, 7, slices ? slices : "", -1, SQLITE_STATIC);
    if (step_done(st) != 0) goto rollback;
    if (sqlite3_prepare_v2(c, "UPDATE studies SET reviewed_at = ?2, updated_at = ?2 WHERE id = ?1",
                           -1, &st, NULL) != SQLITE_OK)
        goto rollback;
    sqlite3_bind_int64(st, 1, sid);
    sqlite3_bind_int64(st, 2, now_ms);
    if (step_done(st) != 0) goto rollback;
    if (sqlite3_prepare_v2(c, DB_STUDY_REFRESH_SQL, -1, &st, NULL) != SQLITE_OK) goto rollback;
    sqlite3_bind_int64(st, 1, sid);
    if (step_done(st) != 0) goto rollback;
    if (sqlite3_prepare_v2(c, "DELETE FROM claims WHERE study_ref = ?1", -1, &st, NULL) !=
        SQLITE_OK)
        goto rollback;
    sqlite3_bind_int64(st, 1, sid);
    if (step_done(st) != 0) goto rollback;
    /* Its audit line in the same commit: no review without it, nor a line
     * for a review not stored; the finding is in it, not only the subtypes. */
    char detail[300];
    snprintf(detail, sizeof detail, "hemorrhage=%d subtypes=%s", hemorrhage ? 1 : 0,
             subtypes && subtypes[0] ? subtypes : "-");
    if (db_exec_bound(c,
                      "INSERT INTO audit (at, user, action, study_uid, detail)"
                      " VALUES (?1, ?2, 'reviewed', ?3, ?4)",
                      "isss", now_ms, reviewer, study_uid, detail) != 0)
        goto rollback;
    if (sqlite3_exec(c, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) goto rollback;
    return 0;
rollback:
    if (err) snprintf(err, errlen, "review: %s", sqlite3_errmsg(c));
    sqlite3_exec(c, "ROLLBACK", NULL, NULL, NULL);
    return -1;
fail:
    if (err) snprintf(err, errlen, "review: %s", sqlite3_errmsg(c));
    return -1;
}

static int each_review(sqlite3 *c, const char *sql, const char *uid, db_review_fn fn, void *ud)
{
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(c, sql, -1, &st, NULL) != SQLITE_OK) return -1;
    if (uid) sqlite3_bind_text(st, 1, uid, -1, SQLITE_STATIC);
    int rc, stopped = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        struct db_review_row r = {
            .id = sqlite3_column_int64(st, 0),
            .study_uid = (const char *)sqlite3_column_text(st, 1),
            .hemorrhage = sqlite3_column_int(st, 2) != 0,
            .subtypes = (const char *)sqlite3_column_text(st, 3),
            .comment = (const char *)sqlite3_column_text(st, 4),
            .reviewer = (const char *)sqlite3_column_text(st, 5),
            .created_at_ms = sqlite3_column_int64(st, 6),
            .slices = (const char *)sqlite3_column_text(st, 7),
        };
        if ((stopped = fn(ud, &r)) != 0) break;
    }
    sqlite3_finalize(st);
    return stopped ? stopped : rc == SQLITE_DONE ? 0 : -1;
}

#define REVIEW_COLUMNS                                                                             \
    "SELECT r.id, s.study_uid, r.hemorrhage, r.subtypes, r.comment, r.reviewer, r.created_at,"     \
    " r.slices FROM reviews r JOIN studies s ON s.id = r.study_ref"

int db_reviews_of_study(struct db *db, const char *study_uid, db_review_fn fn, void *ud)
{
    return each_review(db_conn(db), REVIEW_COLUMNS " WHERE s.study_uid = ?1 ORDER BY r.id",
                       study_uid, fn, ud);
}

int db_reviews_latest(struct db *db, db_review_fn fn, void *ud)
{
    return each_review(db_conn(db),
                       REVIEW_COLUMNS " WHERE r.id = (SELECT max(id) FROM reviews x"
                                      " WHERE x.study_ref = r.study_ref) ORDER BY s.id",
                       NULL, fn, ud);
}

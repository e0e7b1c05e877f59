/* db/reviews.c: the radiologists' reviews (see db_reviews.h). */
#include "db_internal.h"
#include "db_reviews.h"

#include <stdio.h>

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

int db_review_add(struct db *db, const char *study_uid, bool hemorrhage, const char *subtypes,
                  const char *comment, const char *reviewer, int64_t now_ms, char *err,
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
    if (sqlite3_prepare_v2(c,
                           "INSERT INTO reviews (study_ref, hemorrhage, subtypes, comment,"
                           " reviewer, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                           -1, &st, NULL) != SQLITE_OK)
        goto rollback;
    sqlite3_bind_int64(st, 1, sid);
    sqlite3_bind_int(st, 2, hemorrhage);
    sqlite3_bind_text(st, 3, subtypes ? subtypes : "", -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, comment ? comment : "", -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, reviewer, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 6, now_ms);
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
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        struct db_review_row r = {
            .id = sqlite3_column_int64(st, 0),
            .study_uid = (const char *)sqlite3_column_text(st, 1),
            .hemorrhage = sqlite3_column_int(st, 2) != 0,
            .subtypes = (const char *)sqlite3_column_text(st, 3),
            .comment = (const char *)sqlite3_column_text(st, 4),
            .reviewer = (const char *)sqlite3_column_text(st, 5),
            .created_at_ms = sqlite3_column_int64(st, 6),
        };
        if (fn(ud, &r) != 0) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : -1;
}

#define REVIEW_COLUMNS                                                                             \
    "SELECT r.id, s.study_uid, r.hemorrhage, r.subtypes, r.comment, r.reviewer, r.created_at"      \
    " FROM reviews r JOIN studies s ON s.id = r.study_ref"

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

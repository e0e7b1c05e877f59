/* db/retention.c: which studies' files may go, and removing their rows. */
#include "db_internal.h"
#include "db_retention.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* When study st may go (db_retention.h), in three parts: old, done with
 * and delivered or dismissed (?1: updated before, ?2: reviewed before; a
 * revision or delivery an admin dismissed is done with); not flagged and
 * unread; not being read (?5: opened after, ?6: a live claim's made or
 * renewed after). One text for the listing, the
 * check again at purge time and the count of those held. */
#define OLD_AND_DONE                                                                               \
    "st.purged_at IS NULL AND st.updated_at < ?1"                                                  \
    " AND NOT EXISTS (SELECT 1 FROM series s WHERE s.study_ref = st.id"                            \
    "   AND s.state NOT IN ('triaged', 'not_applicable'))"                                         \
    " AND NOT EXISTS (SELECT 1 FROM pacs_revisions pr WHERE pr.study_ref = st.id"                  \
    "   AND pr.state IN ('pending', 'ready', 'failed') AND (pr.state != 'ready' OR"                \
    "   EXISTS (SELECT 1 FROM pacs_deliveries d WHERE d.revision_ref = pr.id"                      \
    "     AND d.state NOT IN ('sent', 'dismissed'))))"                                             \
    " AND (st.reviewed_at IS NULL OR st.reviewed_at < ?2)"
/* A flagged study back on the list after a review (a later series) is
 * unread again: status, not reviewed_at. */
#define NOT_FLAGGED_UNREAD "(st.flagged = 0 OR st.status = 'reviewed')"
#define NOT_BEING_READ                                                                             \
    "(NOT EXISTS (SELECT 1 FROM claims cl WHERE cl.study_ref = st.id AND cl.claimed_at > ?6)"      \
    " AND NOT EXISTS (SELECT 1 FROM audit a WHERE a.study_uid = st.study_uid AND a.at > ?5"        \
    "   AND a.action = 'opened'))"
static const char due_where[] = OLD_AND_DONE " AND " NOT_FLAGGED_UNREAD " AND " NOT_BEING_READ;

/* The parameters of due_where but ?3 and ?4. */
static void bind_rule(sqlite3_stmt *st, int64_t now_ms, int64_t keep_ms, int64_t keep_reviewed_ms,
                      int64_t claim_ms)
{
    sqlite3_bind_int64(st, 1, now_ms - keep_ms);
    sqlite3_bind_int64(st, 2, now_ms - keep_reviewed_ms);
    sqlite3_bind_int64(st, 5, now_ms - DB_RETENTION_OPENED_MS);
    sqlite3_bind_int64(st, 6, now_ms - claim_ms);
}

void db_retention_due_sql(char *sql, size_t n)
{
    /* st.purged_at IS NULL in due_where lets it go by studies_retention
     * (schema 14), which is in this order already. */
    snprintf(sql, n, "SELECT st.id FROM studies st WHERE %s ORDER BY st.updated_at LIMIT ?3",
             due_where);
}

int db_retention_due(struct db *db, int64_t now_ms, int64_t keep_ms, int64_t keep_reviewed_ms,
                     int64_t claim_ms, int64_t *study_ids, int max, int *n)
{
    sqlite3 *c = db_conn(db);
    sqlite3_stmt *st;
    *n = 0;
    char sql[2048];
    db_retention_due_sql(sql, sizeof sql);
    if (sqlite3_prepare_v2(c, sql, -1, &st, NULL) != SQLITE_OK) return -1;
    bind_rule(st, now_ms, keep_ms, keep_reviewed_ms, claim_ms);
    sqlite3_bind_int(st, 3, max);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW)
        study_ids[(*n)++] = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : -1;
}

int db_retention_purge(struct db *db, int64_t study_id, int64_t now_ms, int64_t keep_ms,
                       int64_t keep_reviewed_ms, int64_t claim_ms,
                       void (*fn)(void *ud, const char *file_path), void *ud)
{
    sqlite3 *c = db_conn(db);
    sqlite3_stmt *st = NULL;
    char **paths = NULL;
    int n = 0, cap = 0;
    char sql[2048];
    if (sqlite3_exec(c, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) return -1;
    /* Still due now that no one else can write: an instance received since
     * the listing (and acknowledged to its sender) keeps the study. */
    snprintf(sql, sizeof sql, "UPDATE studies AS st SET purged_at = ?3 WHERE st.id = ?4 AND %s",
             due_where);
    if (sqlite3_prepare_v2(c, sql, -1, &st, NULL) != SQLITE_OK) goto bad;
    bind_rule(st, now_ms, keep_ms, keep_reviewed_ms, claim_ms);
    sqlite3_bind_int64(st, 3, now_ms);
    sqlite3_bind_int64(st, 4, study_id);
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    st = NULL;
    if (rc != SQLITE_DONE) goto bad;
    if (sqlite3_changes(c) != 1) {
        sqlite3_exec(c, "ROLLBACK", NULL, NULL, NULL);
        return DB_RETENTION_NOT_DUE;
    }
    if (sqlite3_prepare_v2(c,
                           "DELETE FROM instances WHERE series_id IN"
                           " (SELECT id FROM series WHERE study_ref = ?1) RETURNING file_path",
                           -1, &st, NULL) != SQLITE_OK)
        goto bad;
    sqlite3_bind_int64(st, 1, study_id);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            char **grown = realloc(paths, sizeof *paths * (size_t)cap);
            if (!grown) goto bad;
            paths = grown;
        }
        if (!(paths[n] = strdup((const char *)sqlite3_column_text(st, 0)))) goto bad;
        n++;
    }
    sqlite3_finalize(st);
    st = NULL;
    if (rc != SQLITE_DONE || sqlite3_exec(c, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) goto bad;
    for (int i = 0; i < n; i++) {
        fn(ud, paths[i]);
        free(paths[i]);
    }
    free(paths);
    return n;
bad:
    sqlite3_finalize(st);
    sqlite3_exec(c, "ROLLBACK", NULL, NULL, NULL);
    for (int i = 0; i < n; i++)
        free(paths[i]);
    free(paths);
    return -1;
}

int db_retention_held(struct db *db, int64_t now_ms, int64_t keep_ms, int64_t keep_reviewed_ms,
                      int64_t claim_ms, int64_t *flagged_unread, int64_t *being_read)
{
    sqlite3 *c = db_conn(db);
    sqlite3_stmt *st;
    *flagged_unread = *being_read = 0;
    if (sqlite3_prepare_v2(c,
                           "SELECT coalesce(sum(NOT " NOT_FLAGGED_UNREAD "), 0),"
                           " coalesce(sum(" NOT_FLAGGED_UNREAD " AND NOT " NOT_BEING_READ "), 0)"
                           " FROM studies st WHERE " OLD_AND_DONE,
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    bind_rule(st, now_ms, keep_ms, keep_reviewed_ms, claim_ms);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        *flagged_unread = sqlite3_column_int64(st, 0);
        *being_read = sqlite3_column_int64(st, 1);
    }
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : -1;
}

/* db/web.c: study details, claims, audit and metrics for the web worklist
 * (see db_web.h). */
#include "db_internal.h"
#include "db_web.h"

#include <stdio.h>
#include <string.h>

const double db_latency_bounds[DB_LATENCY_BUCKETS] = {0.5, 1, 2, 5, 10, 30, 60, 120, 300, -1};
const char *const db_metrics_status_names[8] = {"received",       "waiting", "triaging", "triaged",
                                                "not_applicable", "failed",  "reviewed", "other"};

static const char *text(sqlite3_stmt *st, int i)
{
    const unsigned char *t = sqlite3_column_text(st, i);
    return t ? (const char *)t : "";
}

int db_study_view(struct db *db, const char *study_uid, db_study_view_fn fn, void *ud)
{
    sqlite3 *c = db_conn(db);
    sqlite3_stmt *st;
    const char *sql = "SELECT " DB_ROW_COLUMNS ","
                      " p.birth_date, p.sex, st.study_id,"
                      " coalesce(r.key_sop, ''), coalesce(r.key_index, -1), coalesce(r.note, ''),"
                      " coalesce(r.ms_total, 0), coalesce(cl.reader, ''),"
                      " coalesce(cl.claimed_at, 0)," DB_STUDY_SEEN_COLUMNS("st.id") DB_ROW_JOINS
        " LEFT JOIN claims cl ON cl.study_ref = st.id"
        " WHERE st.study_uid = ?1";
    if (sqlite3_prepare_v2(c, sql, -1, &st, NULL) != SQLITE_OK) return -1;
    sqlite3_bind_text(st, 1, study_uid, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        /* the view's own columns come after the row's */
        const int k = DB_ROW_NCOLS;
        struct db_study_view v = {
            .specific_charset = text(st, 20),
            .birth_date = text(st, k),
            .sex = text(st, k + 1),
            .study_id = text(st, k + 2),
            .key_sop = text(st, k + 3),
            .key_index = sqlite3_column_int(st, k + 4),
            .note = text(st, k + 5),
            .ms_total = sqlite3_column_double(st, k + 6),
            .claimed_by = text(st, k + 7),
            .claimed_at_ms = sqlite3_column_int64(st, k + 8),
            .seen = {sqlite3_column_int64(st, k + 9), sqlite3_column_int64(st, k + 10)},
        };
        db_row_fill(st, &v.row);
        fn(ud, &v);
    }
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : rc == SQLITE_DONE ? 1 : -1;
}

int db_study_series(struct db *db, const char *study_uid, db_series_row_fn fn, void *ud)
{
    sqlite3 *c = db_conn(db);
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(c,
                           "SELECT s.series_uid, s.modality, s.series_desc, s.state,"
                           " s.state_reason, s.instance_count,"
                           " EXISTS (SELECT 1 FROM results r WHERE r.series_ref = s.id),"
                           " s.series_number FROM series s JOIN studies st ON st.id = s.study_ref"
                           " WHERE st.study_uid = ?1 ORDER BY s.series_number, s.id",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_text(st, 1, study_uid, -1, SQLITE_STATIC);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        struct db_series_row s = {
            .series_uid = text(st, 0),
            .modality = text(st, 1),
            .series_desc = text(st, 2),
            .state = text(st, 3),
            .state_reason = text(st, 4),
            .instance_count = sqlite3_column_int(st, 5),
            .has_result = sqlite3_column_int(st, 6) != 0,
            .has_number = sqlite3_column_type(st, 7) != SQLITE_NULL,
            .number = sqlite3_column_int(st, 7),
        };
        if (fn(ud, &s) != 0) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : -1;
}

int db_study_slices(struct db *db, const char *study_uid, db_slice_fn fn, void *ud)
{
    sqlite3 *c = db_conn(db);
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(c,
                           "SELECT sr.idx, sr.sop_uid, sr.frame, sr.p_any, sr.p_epidural,"
                           " sr.p_intraparenchymal, sr.p_intraventricular, sr.p_subarachnoid,"
                           " sr.p_subdural, coalesce(i.instance_number, -1), coalesce(i.frames, 1)"
                           " FROM slice_results sr"
                           " JOIN studies st ON st.result_series_ref = sr.series_ref"
                           " LEFT JOIN instances i ON i.sop_uid = sr.sop_uid"
                           "  AND i.series_id = sr.series_ref"
                           " WHERE st.study_uid = ?1 ORDER BY sr.idx",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_text(st, 1, study_uid, -1, SQLITE_STATIC);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        struct db_slice s = {.idx = sqlite3_column_int(st, 0),
                             .sop_uid = text(st, 1),
                             .frame = sqlite3_column_int(st, 2),
                             .instance_number = sqlite3_column_int(st, 9),
                             .frames = sqlite3_column_int(st, 10)};
        for (int l = 0; l < DB_LABELS; l++)
            s.p[l] = (float)sqlite3_column_double(st, 3 + l);
        if (fn(ud, &s) != 0) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : -1;
}

int db_study_instance_file(struct db *db, const char *study_uid, const char *sop_uid, char *path,
                           size_t pathlen)
{
    sqlite3 *c = db_conn(db);
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(c,
                           "SELECT i.file_path FROM instances i JOIN series s ON s.id = i.series_id"
                           " JOIN studies st ON st.id = s.study_ref"
                           " WHERE i.sop_uid = ?1 AND st.study_uid = ?2",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_text(st, 1, sop_uid, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, study_uid, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) snprintf(path, pathlen, "%s", text(st, 0));
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : rc == SQLITE_DONE ? 1 : -1;
}

int db_slice_has_result(struct db *db, const char *sop_uid, int frame)
{
    sqlite3 *c = db_conn(db);
    /* The result's pixels were read after its job started: a file received
     * since then (a re-sent instance replaces the file in place and keeps
     * the old slice_results) is not the one the decoder child read. A copy
     * re-sent with the same bytes keeps its received_at (db/instances.c). */
    int rc = db_row_exists(c,
                           "SELECT 1 FROM slice_results sr JOIN results r"
                           " ON r.series_ref = sr.series_ref JOIN instances i"
                           " ON i.sop_uid = sr.sop_uid AND i.series_id = sr.series_ref"
                           " WHERE sr.sop_uid = ?1 AND sr.frame = ?2 AND i.received_at <"
                           " (SELECT max(j.started_at) FROM jobs j WHERE j.series_ref ="
                           " r.series_ref AND j.content_key = r.content_key AND j.state = 'done')"
                           " LIMIT 1",
                           "si", sop_uid, (int64_t)frame);
    if (rc != 1) return rc;
    rc = db_row_exists(c, "SELECT 1 FROM slice_results WHERE sop_uid = ?1 AND frame = ?2 LIMIT 1",
                       "si", sop_uid, (int64_t)frame);
    return rc == 0 ? 2 : rc;
}

static int run_changes(sqlite3 *c, sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) return -1;
    return sqlite3_changes(c) > 0 ? 0 : 1;
}

int db_claim_set(struct db *db, const char *study_uid, const char *reader, bool force,
                 int64_t now_ms, int64_t claim_ms, char *holder, size_t holderlen)
{
    sqlite3 *c = db_conn(db);
    sqlite3_stmt *st;
    if (holderlen) holder[0] = '\0';
    if (sqlite3_prepare_v2(c,
                           "SELECT cl.reader, cl.claimed_at FROM claims cl JOIN studies st"
                           " ON st.id = cl.study_ref WHERE st.study_uid = ?1",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_text(st, 1, study_uid, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    bool live = false;
    if (rc == SQLITE_ROW) {
        snprintf(holder, holderlen, "%s", text(st, 0));
        live = db_claim_live(sqlite3_column_int64(st, 1), now_ms, claim_ms);
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) return -1;
    bool mine = rc == SQLITE_ROW && strcmp(holder, reader) == 0;
    if (live && !mine && !force) return 2;
    if (sqlite3_prepare_v2(c,
                           "INSERT OR REPLACE INTO claims (study_ref, reader, claimed_at)"
                           " SELECT id, ?2, ?3 FROM studies WHERE study_uid = ?1",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_text(st, 1, study_uid, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, reader, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, now_ms);
    int done = run_changes(c, st);
    if (done != 0) return done;
    /* The reader's own claim, live: renewed; lapsed: claimed anew. */
    if (mine) {
        if (holderlen) holder[0] = '\0';
        return live ? 3 : 0;
    }
    return rc == SQLITE_ROW && !live ? 4 : 0;
}

int db_claim_release(struct db *db, const char *study_uid, const char *reader, int64_t now_ms,
                     int64_t claim_ms)
{
    sqlite3 *c = db_conn(db);
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(
            c,
            "DELETE FROM claims WHERE reader = ?2 AND claimed_at > ?3 AND study_ref ="
            " (SELECT id FROM studies WHERE study_uid = ?1)",
            -1, &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_text(st, 1, study_uid, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, reader, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, now_ms - claim_ms);
    return run_changes(c, st);
}

int db_claims(struct db *db, int64_t now_ms, int64_t claim_ms, db_claim_fn fn, void *ud)
{
    sqlite3 *c = db_conn(db);
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(c,
                           "SELECT st.study_uid, cl.reader, cl.claimed_at FROM claims cl"
                           " JOIN studies st ON st.id = cl.study_ref WHERE cl.claimed_at > ?1",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_int64(st, 1, now_ms - claim_ms);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW)
        if (fn(ud, text(st, 0), text(st, 1), sqlite3_column_int64(st, 2)) != 0) {
            rc = SQLITE_DONE;
            break;
        }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : -1;
}

int db_audit_add(struct db *db, int64_t now_ms, const char *user, const char *action,
                 const char *study_uid, const char *detail)
{
    sqlite3 *c = db_conn(db);
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(c,
                           "INSERT INTO audit (at, user, action, study_uid, detail)"
                           " VALUES (?1, ?2, ?3, ?4, ?5)",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_int64(st, 1, now_ms);
    sqlite3_bind_text(st, 2, user, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, action, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, study_uid ? study_uid : "", -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, detail ? detail : "", -1, SQLITE_STATIC);
    return run_changes(c, st) == 0 ? 0 : -1;
}

int db_audit_opened(struct db *db, int64_t now_ms, const char *user, const char *study_uid,
                    int64_t window_ms)
{
    return db_exec_bound(db_conn(db),
                         "INSERT INTO audit (at, user, action, study_uid)"
                         " SELECT ?1, ?2, 'opened', ?3 WHERE NOT EXISTS (SELECT 1 FROM audit"
                         "  WHERE study_uid = ?3 AND at > ?1 - ?4 AND user = ?2"
                         "  AND action = 'opened')",
                         "issi", now_ms, user, study_uid, window_ms);
}

int db_metrics_read(struct db *db, struct db_metrics *m)
{
    sqlite3 *c = db_conn(db);
    memset(m, 0, sizeof *m);
    if (db_scalar(c, &m->instances, "SELECT count(*) FROM instances", "") ||
        db_scalar(c, &m->series, "SELECT count(*) FROM series", "") ||
        db_scalar(c, &m->series_completed,
                  "SELECT count(*) FROM series WHERE completed_at IS NOT NULL", "") ||
        db_scalar(c, &m->studies, "SELECT count(*) FROM studies", "") ||
        db_scalar(c, &m->jobs_queued, "SELECT count(*) FROM jobs WHERE state = 'queued'", "") ||
        db_scalar(c, &m->jobs_running, "SELECT count(*) FROM jobs WHERE state = 'running'", "") ||
        db_scalar(c, &m->jobs_done, "SELECT count(*) FROM jobs WHERE state = 'done'", "") ||
        db_scalar(c, &m->jobs_failed, "SELECT count(*) FROM jobs WHERE state = 'failed'", ""))
        return -1;

    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(c,
                           "SELECT finished_at - created_at FROM jobs"
                           " WHERE state = 'done' AND finished_at IS NOT NULL",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    while (sqlite3_step(st) == SQLITE_ROW) {
        double s = (double)sqlite3_column_int64(st, 0) / 1000.0;
        m->latency_count++;
        m->latency_sum += s;
        for (int b = 0; b < DB_LATENCY_BUCKETS; b++)
            if (db_latency_bounds[b] < 0 || s <= db_latency_bounds[b]) m->latency_le[b]++;
    }
    sqlite3_finalize(st);

    if (sqlite3_prepare_v2(c, "SELECT status, count(*) FROM studies GROUP BY status", -1, &st,
                           NULL) != SQLITE_OK)
        return -1;
    while (sqlite3_step(st) == SQLITE_ROW) {
        const char *s = text(st, 0);
        int k = 7;
        for (int i = 0; i < 7; i++)
            if (strcmp(s, db_metrics_status_names[i]) == 0) k = i;
        m->studies_by_status[k] += sqlite3_column_int64(st, 1);
    }
    sqlite3_finalize(st);

    if (sqlite3_prepare_v2(c,
                           "SELECT st.flagged, r.hemorrhage FROM reviews r"
                           " JOIN studies st ON st.id = r.study_ref"
                           " WHERE r.id = (SELECT max(id) FROM reviews x"
                           "  WHERE x.study_ref = r.study_ref)",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    while (sqlite3_step(st) == SQLITE_ROW) {
        bool flagged = sqlite3_column_int(st, 0) != 0, bleed = sqlite3_column_int(st, 1) != 0;
        m->reviews++;
        if (flagged && bleed) m->review_tp++;
        if (flagged && !bleed) m->review_fp++;
        if (!flagged && bleed) m->review_fn++;
        if (!flagged && !bleed) m->review_tn++;
    }
    sqlite3_finalize(st);
    return 0;
}

int db_jobs_failed_since(struct db *db, int64_t since_ms, int64_t *n)
{
    *n = 0;
    return db_scalar(db_conn(db), n,
                     "SELECT count(*) FROM jobs WHERE state = 'failed' AND finished_at >= ?1", "i",
                     since_ms);
}

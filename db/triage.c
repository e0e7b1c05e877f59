/* db/triage.c: series completion, jobs, results and the worklist. */
#include "db_internal.h"
#include "db_triage.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(sqlite3 *c, char *err, size_t errlen, const char *what)
{
    if (err) snprintf(err, errlen, "%s: %s", what, sqlite3_errmsg(c));
    return -1;
}

int db_series_due(struct db *db, int64_t now_ms, int64_t quiet_ms, int64_t *ids, int max, int *n)
{
    sqlite3 *c = db_conn(db);
    sqlite3_stmt *st;
    *n = 0;
    if (sqlite3_prepare_v2(c,
                           "SELECT id FROM series WHERE state = 'receiving' AND"
                           " (last_instance_at <= ?1 OR last_instance_at > ?3 OR"
                           "  (expected_count > 0 AND instance_count = expected_count"
                           "   AND NOT past_expected))"
                           " ORDER BY last_instance_at LIMIT ?2",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_int64(st, 1, now_ms - quiet_ms);
    sqlite3_bind_int(st, 2, max);
    /* A last instance more than the quiet period in the future: the wall
     * clock went back since (NTP, a restored VM), and the series has been
     * quiet at least that long; it had waited until the clock caught up,
     * an hour for a step of an hour. */
    sqlite3_bind_int64(st, 3, now_ms + quiet_ms);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW)
        ids[(*n)++] = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : -1;
}

int db_series_info(struct db *db, int64_t series_id, struct db_series_info *out)
{
    sqlite3 *c = db_conn(db);
    sqlite3_stmt *st;
    memset(out, 0, sizeof *out);
    if (sqlite3_prepare_v2(c,
                           "SELECT s.id, s.study_ref, s.series_uid, st.study_uid, s.modality,"
                           " s.body_part, s.series_desc, st.study_desc, s.state, s.content_key,"
                           " s.instance_count, r.content_key, s.last_instance_at"
                           " FROM series s JOIN studies st ON st.id = s.study_ref"
                           " LEFT JOIN results r ON r.series_ref = s.id WHERE s.id = ?1",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_int64(st, 1, series_id);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        out->id = sqlite3_column_int64(st, 0);
        out->study_id = sqlite3_column_int64(st, 1);
        db_col_copy(st, 2, out->series_uid, sizeof out->series_uid);
        db_col_copy(st, 3, out->study_uid, sizeof out->study_uid);
        db_col_copy(st, 4, out->modality, sizeof out->modality);
        db_col_copy(st, 5, out->body_part, sizeof out->body_part);
        db_col_copy(st, 6, out->series_desc, sizeof out->series_desc);
        db_col_copy(st, 7, out->study_desc, sizeof out->study_desc);
        db_col_copy(st, 8, out->state, sizeof out->state);
        db_col_copy(st, 9, out->content_key, sizeof out->content_key);
        out->instance_count = sqlite3_column_int(st, 10);
        out->has_result = sqlite3_column_type(st, 11) != SQLITE_NULL;
        db_col_copy(st, 11, out->result_key, sizeof out->result_key);
        out->last_instance_at_ms = sqlite3_column_int64(st, 12);
    }
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : -1;
}

int db_series_instances(struct db *db, int64_t series_id, struct db_instance_brief **out, int *n)
{
    sqlite3 *c = db_conn(db);
    sqlite3_stmt *st;
    *out = NULL;
    *n = 0;
    if (sqlite3_prepare_v2(c,
                           "SELECT sop_uid, sop_class, image_type, file_path, file_size,"
                           " orientation, frames, content_digest FROM instances"
                           " WHERE series_id = ?1"
                           " ORDER BY sop_uid",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_int64(st, 1, series_id);
    int cap = 0, rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (*n == cap) {
            cap = cap ? cap * 2 : 64;
            struct db_instance_brief *grown = realloc(*out, sizeof **out * (size_t)cap);
            if (!grown) {
                rc = SQLITE_NOMEM;
                break;
            }
            *out = grown;
        }
        struct db_instance_brief *b = &(*out)[(*n)++];
        memset(b, 0, sizeof *b);
        db_col_copy(st, 0, b->sop_uid, sizeof b->sop_uid);
        db_col_copy(st, 1, b->sop_class, sizeof b->sop_class);
        db_col_copy(st, 2, b->image_type, sizeof b->image_type);
        db_col_copy(st, 3, b->file_path, sizeof b->file_path);
        b->file_size = sqlite3_column_int64(st, 4);
        b->frames = sqlite3_column_int(st, 6);
        db_col_copy(st, 7, b->content_digest, sizeof b->content_digest);
        const char *o = (const char *)sqlite3_column_text(st, 5);
        if (o && o[0]) {
            b->has_orientation = sscanf(o, "%lf\\%lf\\%lf\\%lf\\%lf\\%lf", &b->orientation[0],
                                        &b->orientation[1], &b->orientation[2], &b->orientation[3],
                                        &b->orientation[4], &b->orientation[5]) == 6;
        }
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) {
        free(*out);
        *out = NULL;
        *n = 0;
        return -1;
    }
    return 0;
}

static int refresh_study(sqlite3 *c, int64_t study_id)
{
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(c, DB_STUDY_REFRESH_SQL, -1, &st, NULL) != SQLITE_OK) return -1;
    sqlite3_bind_int64(st, 1, study_id);
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : -1;
}

int db_series_decide(struct db *db, const struct db_series_info *seen, const char *state,
                     const char *reason, const char *content_key, int64_t now_ms, char *err,
                     size_t errlen)
{
    sqlite3 *c = db_conn(db);
    int64_t series_id = seen->id;
    if (sqlite3_exec(c, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK)
        return fail(c, err, errlen, "begin");
    sqlite3_stmt *st;
    int64_t study = 0;
    if (sqlite3_prepare_v2(c,
                           "UPDATE series SET state = ?2, state_reason = ?3, content_key = ?4,"
                           " completed_at = ?5 WHERE id = ?1 AND state = 'receiving'"
                           " AND instance_count = ?6 AND last_instance_at = ?7"
                           " RETURNING study_ref",
                           -1, &st, NULL) != SQLITE_OK)
        goto bad;
    sqlite3_bind_int64(st, 1, series_id);
    sqlite3_bind_text(st, 2, state, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, reason ? reason : "", -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, content_key, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, now_ms);
    sqlite3_bind_int(st, 6, seen->instance_count);
    sqlite3_bind_int64(st, 7, seen->last_instance_at_ms);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) study = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW) {
        /* An instance stored since the caller looked: its decision is for
         * other content; the series, still receiving, is decided again. */
        sqlite3_exec(c, "ROLLBACK", NULL, NULL, NULL);
        return 1;
    }
    /* Queued jobs for other content of this series are stale: running them
     * would triage a partial series and delay everyone queued behind. */
    if (db_exec_bound(c,
                      "UPDATE jobs SET state = 'superseded', finished_at = ?3"
                      " WHERE series_ref = ?1 AND state = 'queued'"
                      " AND (?4 != 'waiting' OR content_key != ?2)",
                      "isis", series_id, content_key, now_ms, state) != 0)
        goto bad;
    if (strcmp(state, "waiting") == 0) {
        /* The same content may complete again before its job ran (sent
         * again while the job waited, or a crash before it ran): one job
         * per content, not a second triage (tests/robust/test_crashloop.py). */
        if (sqlite3_prepare_v2(c,
                               "INSERT INTO jobs (series_ref, content_key, created_at)"
                               " SELECT ?1, ?2, ?3 WHERE NOT EXISTS (SELECT 1 FROM jobs"
                               " WHERE series_ref = ?1 AND content_key = ?2"
                               " AND state IN ('queued', 'running'))",
                               -1, &st, NULL) != SQLITE_OK)
            goto bad;
        sqlite3_bind_int64(st, 1, series_id);
        sqlite3_bind_text(st, 2, content_key, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 3, now_ms);
        rc = sqlite3_step(st);
        sqlite3_finalize(st);
        if (rc != SQLITE_DONE) goto bad;
        /* That job already running: the series is being triaged, so that
         * its end (db_job_finish, which needs 'triaging') settles it. */
        if (db_exec_bound(c,
                          "UPDATE series SET state = 'triaging' WHERE id = ?1 AND EXISTS"
                          " (SELECT 1 FROM jobs WHERE series_ref = ?1 AND content_key = ?2"
                          " AND state = 'running')",
                          "is", series_id, content_key) != 0)
            goto bad;
    }
    if (refresh_study(c, study) != 0) goto bad;
    if (sqlite3_exec(c, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) goto bad;
    return 0;
bad:
    fail(c, err, errlen, "deciding series");
    sqlite3_exec(c, "ROLLBACK", NULL, NULL, NULL);
    return -1;
}

int db_jobs_requeue(struct db *db, int max_stops, int64_t now_ms, int *count, int *failed)
{
    sqlite3 *c = db_conn(db);
    char why[64];
    snprintf(why, sizeof why, "the node stopped %d times while triaging it", max_stops);
    *count = *failed = 0;
    if (sqlite3_exec(c, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) return -1;
    if (max_stops > 0) {
        if (db_exec_bound(c, "UPDATE jobs SET stops = stops + 1 WHERE state = 'running'", "") !=
                0 ||
            db_exec_bound(c,
                          "UPDATE series SET state = 'failed', state_reason = ?2"
                          " WHERE state = 'triaging' AND id IN (SELECT series_ref FROM jobs"
                          " WHERE state = 'running' AND stops >= ?1)",
                          "is", (int64_t)max_stops, why) != 0 ||
            db_exec_bound(c,
                          "UPDATE jobs SET state = 'failed', finished_at = ?2, error = ?3"
                          " WHERE state = 'running' AND stops >= ?1",
                          "iis", (int64_t)max_stops, now_ms, why) != 0)
            goto bad;
        *failed = sqlite3_changes(c);
    }
    if (sqlite3_exec(c,
                     "UPDATE jobs SET state = 'queued', started_at = NULL WHERE state = 'running'",
                     NULL, NULL, NULL) != SQLITE_OK)
        goto bad;
    *count = sqlite3_changes(c);
    if (sqlite3_exec(c,
                     "UPDATE series SET state = 'waiting' WHERE state = 'triaging';"
                     "UPDATE studies SET status = 'waiting' WHERE status = 'triaging';",
                     NULL, NULL, NULL) != SQLITE_OK)
        goto bad;
    /* Their studies show the failure, one by one in id order. */
    int64_t study = 0;
    while (*failed) {
        if (db_scalar(c, &study,
                      "SELECT min(s.study_ref) FROM jobs j JOIN series s ON s.id = j.series_ref"
                      " WHERE j.state = 'failed' AND j.finished_at = ?1 AND j.error = ?2"
                      " AND s.study_ref > ?3",
                      "isi", now_ms, why, study) != 0)
            goto bad;
        if (!study) break;
        if (refresh_study(c, study) != 0) goto bad;
    }
    if (sqlite3_exec(c, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) goto bad;
    return 0;
bad:
    sqlite3_exec(c, "ROLLBACK", NULL, NULL, NULL);
    return -1;
}

int db_job_claim(struct db *db, int64_t now_ms, struct db_job *job)
{
    sqlite3 *c = db_conn(db);
    if (sqlite3_exec(c, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) return -1;
    sqlite3_stmt *st;
    int got = 0;
    int64_t study = 0;
    /* A job for content its series no longer has (queued before
     * db_series_decide superseded such jobs) never runs. */
    if (db_exec_bound(c,
                      "UPDATE jobs SET state = 'superseded', finished_at = ?1"
                      " WHERE state = 'queued' AND content_key !="
                      " (SELECT s.content_key FROM series s WHERE s.id = jobs.series_ref)",
                      "i", now_ms) != 0)
        goto bad;
    if (sqlite3_prepare_v2(c,
                           "UPDATE jobs SET state = 'running', started_at = ?1 WHERE id ="
                           " (SELECT j.id FROM jobs j JOIN series s ON s.id = j.series_ref"
                           "  WHERE j.state = 'queued' AND j.content_key = s.content_key"
                           "  AND s.state != 'receiving' ORDER BY j.id LIMIT 1)"
                           " RETURNING id, series_ref, content_key",
                           -1, &st, NULL) != SQLITE_OK)
        goto bad;
    sqlite3_bind_int64(st, 1, now_ms);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        job->id = sqlite3_column_int64(st, 0);
        job->series_id = sqlite3_column_int64(st, 1);
        db_col_copy(st, 2, job->content_key, sizeof job->content_key);
        got = 1;
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) goto bad;
    if (got) {
        if (sqlite3_prepare_v2(c,
                               "UPDATE series SET state = 'triaging' WHERE id = ?1"
                               " AND state = 'waiting' RETURNING study_ref",
                               -1, &st, NULL) != SQLITE_OK)
            goto bad;
        sqlite3_bind_int64(st, 1, job->series_id);
        if (sqlite3_step(st) == SQLITE_ROW) study = sqlite3_column_int64(st, 0);
        sqlite3_finalize(st);
        if (study && refresh_study(c, study) != 0) goto bad;
    }
    if (sqlite3_exec(c, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) goto bad;
    return got;
bad:
    sqlite3_exec(c, "ROLLBACK", NULL, NULL, NULL);
    return -1;
}

int db_series_files(struct db *db, int64_t series_id, char ***paths, int *n)
{
    struct db_instance_brief *b;
    int count;
    *paths = NULL;
    *n = 0;
    if (db_series_instances(db, series_id, &b, &count) != 0) return -1;
    size_t bytes = sizeof(char *) * (size_t)count;
    for (int i = 0; i < count; i++)
        bytes += strlen(b[i].file_path) + 1;
    char **p = malloc(bytes ? bytes : 1);
    if (!p) {
        free(b);
        return -1;
    }
    char *text = (char *)(p + count);
    for (int i = 0; i < count; i++) {
        size_t len = strlen(b[i].file_path) + 1;
        memcpy(text, b[i].file_path, len);
        p[i] = text;
        text += len;
    }
    free(b);
    *paths = p;
    *n = count;
    return 0;
}

static int store_result(sqlite3 *c, const struct db_job *job, const struct db_result *r,
                        const char *content_key, int64_t now_ms)
{
    if (db_exec_bound(
            c,
            "INSERT OR REPLACE INTO results (series_ref, content_key, model_version, p_any,"
            " p_epidural, p_intraparenchymal, p_intraventricular, p_subarachnoid,"
            " p_subdural, flagged, slices, key_index, key_sop, note, ms_pixels, ms_model,"
            " ms_total, created_at)"
            " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15,"
            " ?16, ?17, ?18)",
            "issddddddiiissdddi", job->series_id, content_key, r->model_version, (double)r->p[0],
            (double)r->p[1], (double)r->p[2], (double)r->p[3], (double)r->p[4], (double)r->p[5],
            (int64_t)r->flagged, (int64_t)r->slices, (int64_t)r->key_index, r->key_sop,
            r->note ? r->note : "", r->ms_pixels, r->ms_model, r->ms_total, now_ms) != 0)
        return -1;
    if (db_exec_bound(c, "DELETE FROM slice_results WHERE series_ref = ?1", "i", job->series_id) !=
        0)
        return -1;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(c,
                           "INSERT INTO slice_results (series_ref, idx, sop_uid, frame, p_any,"
                           " p_epidural, p_intraparenchymal, p_intraventricular,"
                           " p_subarachnoid, p_subdural) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7,"
                           " ?8, ?9, ?10)",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    int rc = SQLITE_DONE;
    for (int i = 0; i < r->slices && rc == SQLITE_DONE; i++) {
        const struct db_slice_result *s = &r->per_slice[i];
        sqlite3_bind_int64(st, 1, job->series_id);
        sqlite3_bind_int(st, 2, i);
        sqlite3_bind_text(st, 3, s->sop_uid, -1, SQLITE_STATIC);
        sqlite3_bind_int(st, 4, s->frame);
        for (int l = 0; l < DB_LABELS; l++)
            sqlite3_bind_double(st, 5 + l, s->p[l]);
        rc = sqlite3_step(st);
        sqlite3_reset(st);
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : -1;
}

int db_job_finish(struct db *db, const struct db_job *job, const struct db_result *res,
                  const char *error, bool not_applicable, int64_t now_ms, char *err, size_t errlen)
{
    sqlite3 *c = db_conn(db);
    if (sqlite3_exec(c, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK)
        return fail(c, err, errlen, "begin");
    int had_result = 0;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(c, "SELECT count(*) FROM results WHERE series_ref = ?1", -1, &st,
                           NULL) == SQLITE_OK) {
        sqlite3_bind_int64(st, 1, job->series_id);
        if (sqlite3_step(st) == SQLITE_ROW) had_result = sqlite3_column_int(st, 0);
        sqlite3_finalize(st);
    }
    /* Other bytes received for the series since the job started (a new
     * instance, or a copy with other content: the same bytes again keep
     * their received_at): the model may have read some of them, so what it
     * saw is no content of the series. The result is kept for the worklist
     * under no content key, and the series is decided again (it was taken
     * for its content when a copy A, replaced by B, came back as A).
     * Times after now are from before the wall clock went back: not "since
     * the job started" (every job had been taken for changed, and its series
     * triaged again and again until the clock caught up). */
    int later = db_row_exists(c,
                              "SELECT 1 FROM instances i, jobs j WHERE j.id = ?2"
                              " AND i.series_id = ?1 AND i.received_at > j.started_at"
                              " AND i.received_at <= ?3 LIMIT 1",
                              "iii", job->series_id, job->id, now_ms);
    if (later < 0) goto bad;
    bool changed = later == 0;
    if (changed &&
        db_exec_bound(c,
                      "UPDATE series SET state = 'receiving' WHERE id = ?1 AND state = 'triaging'",
                      "i", job->series_id) != 0)
        goto bad;
    if (res) {
        const char *key = changed ? "" : job->content_key;
        if (store_result(c, job, res, key, now_ms) != 0) goto bad;
        /* Only if nothing re-opened the series while the model ran. */
        if (db_exec_bound(c,
                          "UPDATE series SET state = 'triaged', state_reason = ?2,"
                          " triage_count = triage_count + 1 WHERE id = ?1 AND state = 'triaging'",
                          "is", job->series_id, res->note ? res->note : "") != 0 ||
            db_exec_bound(c, "UPDATE jobs SET state = 'done', finished_at = ?2 WHERE id = ?1", "ii",
                          job->id, now_ms) != 0)
            goto bad;
        /* A series decided meanwhile to keep its result (its content came
         * back to the one triaged before) kept the result this one just
         * replaced: it is decided again, never left with a result of other
         * content. */
        if (db_exec_bound(c,
                          "UPDATE series SET state = 'receiving', state_reason = ''"
                          " WHERE id = ?1 AND state = 'triaged' AND content_key != ?2",
                          "is", job->series_id, key) != 0)
            goto bad;
    } else {
        const char *series_state = not_applicable ? "not_applicable" : "failed";
        if (db_exec_bound(c,
                          "UPDATE series SET state = ?3, state_reason = ?2"
                          " WHERE id = ?1 AND state = 'triaging'",
                          "iss", job->series_id, error ? error : "failed", series_state) != 0 ||
            db_exec_bound(c,
                          "UPDATE jobs SET state = ?4, finished_at = ?2, error = ?3"
                          " WHERE id = ?1",
                          "iiss", job->id, now_ms, error ? error : "failed",
                          not_applicable ? "done" : "failed") != 0)
            goto bad;
    }
    int64_t study = 0;
    if (sqlite3_prepare_v2(c, "SELECT study_ref FROM series WHERE id = ?1", -1, &st, NULL) ==
        SQLITE_OK) {
        sqlite3_bind_int64(st, 1, job->series_id);
        if (sqlite3_step(st) == SQLITE_ROW) study = sqlite3_column_int64(st, 0);
        sqlite3_finalize(st);
    }
    if (res && had_result &&
        db_exec_bound(c, "UPDATE studies SET result_updates = result_updates + 1 WHERE id = ?1",
                      "i", study) != 0)
        goto bad;
    if (db_exec_bound(c, "UPDATE studies SET updated_at = ?2 WHERE id = ?1", "ii", study, now_ms) !=
            0 ||
        refresh_study(c, study) != 0)
        goto bad;
    if (sqlite3_exec(c, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) goto bad;
    return 0;
bad:
    fail(c, err, errlen, "finishing job");
    sqlite3_exec(c, "ROLLBACK", NULL, NULL, NULL);
    return -1;
}

void db_row_fill(sqlite3_stmt *st, struct db_worklist_row *row)
{
    *row = (struct db_worklist_row){
        .study_uid = (const char *)sqlite3_column_text(st, 0),
        .series_uid = (const char *)sqlite3_column_text(st, 1),
        .accession = (const char *)sqlite3_column_text(st, 2),
        .patient_id = (const char *)sqlite3_column_text(st, 3),
        .patient_name = (const char *)sqlite3_column_text(st, 4),
        .study_desc = (const char *)sqlite3_column_text(st, 5),
        .status = (const char *)sqlite3_column_text(st, 6),
        .status_reason = (const char *)sqlite3_column_text(st, 7),
        .model_version = (const char *)sqlite3_column_text(st, 8),
        .received_at_ms = sqlite3_column_int64(st, 9),
        .updated_at_ms = sqlite3_column_int64(st, 10),
        .slices = sqlite3_column_int(st, 11),
        .has_probability = sqlite3_column_type(st, 12) != SQLITE_NULL,
        .probability = sqlite3_column_double(st, 12),
        .flagged = sqlite3_column_int(st, 18) != 0,
        .result_updates = sqlite3_column_int(st, 19),
        .specific_charset = (const char *)sqlite3_column_text(st, 20),
        .purged_at_ms = sqlite3_column_int64(st, 21),
        .study_date = (const char *)sqlite3_column_text(st, 22),
        .study_time = (const char *)sqlite3_column_text(st, 23),
    };
    for (int l = 0; l < DB_LABELS - 1; l++)
        row->subtypes[l] = sqlite3_column_double(st, 13 + l);
}

/* The studies that need no action, which the open list's age window leaves
 * out once nothing has changed in them for a while (updated_at: the last
 * instance received or result stored): triaged and not flagged, not
 * applicable. Never a flagged study, nor one not yet known (received,
 * waiting, triaging, failed) or of a status this code does not know. By
 * the last change, not the arrival: an old study that gets a late series
 * and a new result is back on the list with it, marked as changed. */
#define DB_NO_ACTION "(st.flagged = 0 AND st.status IN ('triaged', 'not_applicable'))"

int db_worklist(struct db *db, const char *status, int64_t since_ms, db_worklist_fn fn, void *ud)
{
    sqlite3 *c = db_conn(db);
    sqlite3_stmt *st;
    const char *sql =
        "SELECT " DB_ROW_COLUMNS DB_ROW_JOINS " WHERE (?1 IS NULL AND st.status != 'reviewed'"
        "   AND NOT (" DB_NO_ACTION " AND st.updated_at < ?2))"
        "  OR st.status = ?1"
        " ORDER BY"
        "  CASE WHEN st.flagged AND st.status != 'reviewed' THEN 0"
        "   WHEN st.status IN ('received', 'waiting', 'triaging', 'failed') THEN 1"
        "   WHEN st.status = 'triaged' THEN 2 ELSE 3 END,"
        "  CASE WHEN st.flagged OR st.status = 'triaged' THEN -st.probability ELSE 0 END,"
        "  st.received_at, st.id";
    if (sqlite3_prepare_v2(c, sql, -1, &st, NULL) != SQLITE_OK) return -1;
    if (status)
        sqlite3_bind_text(st, 1, status, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(st, 1);
    sqlite3_bind_int64(st, 2, since_ms > 0 ? since_ms : INT64_MIN);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        struct db_worklist_row row;
        db_row_fill(st, &row);
        if (fn(ud, &row) != 0) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : -1;
}

int db_worklist_hidden(struct db *db, int64_t since_ms, struct db_worklist_hidden *out)
{
    sqlite3 *c = db_conn(db);
    *out = (struct db_worklist_hidden){0};
    if (since_ms <= 0) return 0;
    /* Counted by status (the page offers each), on the index by status,
     * flag and last change (schema 15). */
    int64_t *counts[] = {&out->triaged, &out->not_applicable};
    const char *names[] = {"triaged", "not_applicable"};
    for (int i = 0; i < 2; i++)
        if (db_scalar(c, counts[i],
                      "SELECT count(*) FROM studies st WHERE " DB_NO_ACTION
                      " AND st.status = ?2 AND st.updated_at < ?1",
                      "is", since_ms, names[i]) != 0)
            return -1;
    if (db_scalar(c, &out->next_ms,
                  "SELECT coalesce(min(st.updated_at), 0) FROM studies st"
                  " WHERE " DB_NO_ACTION " AND st.updated_at >= ?1",
                  "i", since_ms) != 0)
        return -1;
    return 0;
}

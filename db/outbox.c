/* db/outbox.c: the durable outbound queue of results to PACS (db_outbox.h). */
#include "db_internal.h"
#include "db_outbox.h"
#include "db_status.h"
#include "db_web.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int db_outbox_scan(struct db *db, struct db_outbox_new *out, int max, int *n)
{
    *n = 0;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db_conn(db),
                           "SELECT st.id, r.series_ref, r.created_at, r.flagged,"
                           " EXISTS (SELECT 1 FROM pacs_revisions pr WHERE pr.study_ref = st.id"
                           "  AND pr.state IN ('pending', 'ready'))"
                           " FROM studies st JOIN results r ON r.series_ref = st.result_series_ref"
                           " JOIN series s ON s.id = r.series_ref"
                           " LEFT JOIN pacs_revisions last ON last.id = (SELECT max(pr.id)"
                           "  FROM pacs_revisions pr WHERE pr.study_ref = st.id)"
                           " WHERE s.state = 'triaged' AND (last.id IS NULL"
                           "  OR last.series_ref != r.series_ref OR last.result_at != r.created_at)"
                           " ORDER BY r.created_at LIMIT ?1",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_int(st, 1, max);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW && *n < max) {
        struct db_outbox_new *o = &out[(*n)++];
        o->study_id = sqlite3_column_int64(st, 0);
        o->series_id = sqlite3_column_int64(st, 1);
        o->result_at = sqlite3_column_int64(st, 2);
        o->flagged = sqlite3_column_int(st, 3) != 0;
        o->sent_before = sqlite3_column_int(st, 4) != 0;
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE || rc == SQLITE_ROW ? 0 : -1;
}

int db_outbox_revision_add(struct db *db, const struct db_outbox_new *r, const char *state,
                           const char *reason, int64_t now_ms, int64_t *id, int *revision)
{
    sqlite3 *c = db_conn(db);
    if (sqlite3_exec(c, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) return -1;
    sqlite3_stmt *st;
    int rev = 1;
    if (sqlite3_prepare_v2(c,
                           "SELECT coalesce(max(revision), 0) + 1 FROM pacs_revisions"
                           " WHERE study_ref = ?1",
                           -1, &st, NULL) != SQLITE_OK)
        goto bad;
    sqlite3_bind_int64(st, 1, r->study_id);
    if (sqlite3_step(st) == SQLITE_ROW) rev = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    if (strcmp(state, "skipped") == 0) rev = 0; /* only sent revisions count */
    if (db_exec_bound(
            c,
            "INSERT INTO pacs_revisions (study_ref, series_ref, result_at, revision, state,"
            " reason, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            "iiiissi", r->study_id, r->series_id, r->result_at, (int64_t)rev, state,
            reason ? reason : "", now_ms) != 0)
        goto bad;
    *id = sqlite3_last_insert_rowid(c);
    *revision = rev;
    if (sqlite3_exec(c, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) goto bad;
    return 0;
bad:
    sqlite3_exec(c, "ROLLBACK", NULL, NULL, NULL);
    return -1;
}

/* A query of a list of at most max rows: sql with ?1 bound to arg (the
 * limit, or a key), *n set to 0. NULL on error. */
static sqlite3_stmt *list_query(struct db *db, const char *sql, int64_t arg, int *n)
{
    *n = 0;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db_conn(db), sql, -1, &st, NULL) != SQLITE_OK) return NULL;
    sqlite3_bind_int64(st, 1, arg);
    return st;
}

/* Ends a list query whose last step returned rc: 0 when its rows were read
 * (all, or as many as fit), else -1. */
static int list_done(sqlite3_stmt *st, int rc)
{
    sqlite3_finalize(st);
    return rc == SQLITE_DONE || rc == SQLITE_ROW ? 0 : -1;
}

int db_outbox_pending(struct db *db, int64_t *ids, int max, int *n)
{
    sqlite3_stmt *st = list_query(
        db, "SELECT id FROM pacs_revisions WHERE state = 'pending' ORDER BY id LIMIT ?1", max, n);
    if (!st) return -1;
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW && *n < max)
        ids[(*n)++] = sqlite3_column_int64(st, 0);
    return list_done(st, rc);
}

void db_outbox_source_free(struct db_outbox_source *s)
{
    if (!s) return;
    free(s->p_any);
    free(s->sop);
    free(s->sop_class);
    free(s->frame);
    free(s->frames);
    s->p_any = NULL;
    s->sop = s->sop_class = NULL;
    s->frame = s->frames = NULL;
    s->slices = 0;
}

/* db_outbox_source's reads, inside its transaction. */
static int source_read(sqlite3 *c, int64_t revision_id, struct db_outbox_source *out)
{
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(
            c,
            "SELECT pr.id, pr.study_ref, pr.series_ref, pr.revision, st.study_uid, s.series_uid,"
            " r.model_version, r.p_any, r.p_epidural, r.p_intraparenchymal,"
            " r.p_intraventricular, r.p_subarachnoid, r.p_subdural, r.flagged, r.key_index,"
            " r.key_sop, i.sop_class, i.file_path,"
            " coalesce((SELECT frame FROM slice_results sr WHERE sr.series_ref = r.series_ref"
            "  AND sr.idx = r.key_index), 0), r.slices,"
            " coalesce(prev.sr_series_uid, ''), coalesce(prev.sr_sop_uid, ''),"
            " coalesce(i.pixel_spacing_row, 0), coalesce(i.pixel_spacing_col, 0),"
            " coalesce(i.frames, 1)"
            " FROM pacs_revisions pr JOIN studies st ON st.id = pr.study_ref"
            " JOIN series s ON s.id = pr.series_ref"
            " JOIN results r ON r.series_ref = pr.series_ref AND r.created_at = pr.result_at"
            " LEFT JOIN instances i ON i.sop_uid = r.key_sop"
            " LEFT JOIN pacs_revisions prev ON prev.id = (SELECT max(p2.id) FROM pacs_revisions p2"
            "  WHERE p2.study_ref = pr.study_ref AND p2.id < pr.id AND p2.sr_sop_uid != '')"
            " WHERE pr.id = ?1"
            /* a newer revision of the study (its result moved to another
             * series) supersedes it too: PACS would get it before that */
            " AND NOT EXISTS (SELECT 1 FROM pacs_revisions p3"
            "  WHERE p3.study_ref = pr.study_ref AND p3.id > pr.id)",
            -1, &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_int64(st, 1, revision_id);
    int rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        sqlite3_finalize(st);
        return rc == SQLITE_DONE ? DB_OUTBOX_SUPERSEDED : -1;
    }
    if (sqlite3_column_type(st, 17) == SQLITE_NULL) {
        sqlite3_finalize(st);
        return DB_OUTBOX_KEY_GONE;
    }
    out->revision_id = sqlite3_column_int64(st, 0);
    out->study_id = sqlite3_column_int64(st, 1);
    out->series_id = sqlite3_column_int64(st, 2);
    out->revision = sqlite3_column_int(st, 3);
    db_col_copy(st, 4, out->study_uid, sizeof out->study_uid);
    db_col_copy(st, 5, out->series_uid, sizeof out->series_uid);
    db_col_copy(st, 6, out->model_version, sizeof out->model_version);
    for (int l = 0; l < DB_LABELS; l++)
        out->p[l] = (float)sqlite3_column_double(st, 7 + l);
    out->flagged = sqlite3_column_int(st, 13) != 0;
    out->key_index = sqlite3_column_int(st, 14);
    db_col_copy(st, 15, out->key_sop, sizeof out->key_sop);
    db_col_copy(st, 16, out->key_sop_class, sizeof out->key_sop_class);
    db_col_copy(st, 17, out->key_path, sizeof out->key_path);
    out->key_frame = sqlite3_column_int(st, 18);
    int slices = sqlite3_column_int(st, 19);
    db_col_copy(st, 20, out->prev_sr_series_uid, sizeof out->prev_sr_series_uid);
    db_col_copy(st, 21, out->prev_sr_sop_uid, sizeof out->prev_sr_sop_uid);
    out->key_spacing[0] = sqlite3_column_double(st, 22);
    out->key_spacing[1] = sqlite3_column_double(st, 23);
    out->key_frames = sqlite3_column_int(st, 24);
    sqlite3_finalize(st);
    if (slices < 0 || slices > 100000) return -1;
    if (slices == 0) return 0;
    out->p_any = calloc((size_t)slices, sizeof *out->p_any);
    out->sop = calloc((size_t)slices, sizeof *out->sop);
    out->sop_class = calloc((size_t)slices, sizeof *out->sop_class);
    out->frame = calloc((size_t)slices, sizeof *out->frame);
    out->frames = calloc((size_t)slices, sizeof *out->frames);
    if (!out->p_any || !out->sop || !out->sop_class || !out->frame || !out->frames) goto bad;
    if (sqlite3_prepare_v2(c,
                           "SELECT sr.idx, sr.p_any, sr.sop_uid, coalesce(i.sop_class, ''),"
                           " sr.frame, coalesce(i.frames, 1) FROM slice_results sr"
                           " LEFT JOIN instances i ON i.sop_uid = sr.sop_uid"
                           " WHERE sr.series_ref = ?1 ORDER BY sr.idx",
                           -1, &st, NULL) != SQLITE_OK)
        goto bad;
    sqlite3_bind_int64(st, 1, out->series_id);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        int i = sqlite3_column_int(st, 0);
        if (i < 0 || i >= slices) continue;
        out->p_any[i] = (float)sqlite3_column_double(st, 1);
        db_col_copy(st, 2, out->sop[i], sizeof out->sop[i]);
        db_col_copy(st, 3, out->sop_class[i], sizeof out->sop_class[i]);
        out->frame[i] = sqlite3_column_int(st, 4);
        out->frames[i] = sqlite3_column_int(st, 5);
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) goto bad;
    out->slices = slices;
    return 0;
bad:
    db_outbox_source_free(out);
    return -1;
}

int db_outbox_source(struct db *db, int64_t revision_id, struct db_outbox_source *out)
{
    memset(out, 0, sizeof *out);
    sqlite3 *c = db_conn(db);
    /* One snapshot: a re-triage committing between the result and its
     * per-slice rows would otherwise mix two results in one object. */
    if (sqlite3_exec(c, "BEGIN", NULL, NULL, NULL) != SQLITE_OK) return -1;
    int rc = source_read(c, revision_id, out);
    if (sqlite3_exec(c, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
        sqlite3_exec(c, "ROLLBACK", NULL, NULL, NULL);
        db_outbox_source_free(out);
        return -1;
    }
    return rc;
}

/* A transaction on c that failed: SQLite's message into err, read before
 * the rollback replaces it, then rolled back. Returns -1. */
static int rolled_back(sqlite3 *c, char *err, size_t errlen)
{
    snprintf(err, errlen, "%s", sqlite3_errmsg(c));
    sqlite3_exec(c, "ROLLBACK", NULL, NULL, NULL);
    return -1;
}

int db_outbox_revision_ready(struct db *db, int64_t revision_id, const char *sr_series_uid,
                             const char *sr_sop_uid, const struct db_outbox_object *o, int n,
                             int64_t now_ms, char *err, size_t errlen)
{
    sqlite3 *c = db_conn(db);
    if (sqlite3_exec(c, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK)
        return rolled_back(c, err, errlen);
    for (int i = 0; i < n; i++)
        if (db_exec_bound(
                c,
                "INSERT INTO pacs_deliveries (revision_ref, destination, object, file_path,"
                " sop_uid, next_attempt_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                "issssi", revision_id, o[i].destination, o[i].object, o[i].file_path, o[i].sop_uid,
                now_ms) != 0)
            goto bad;
    if (db_exec_bound(
            c,
            "UPDATE pacs_revisions SET state = 'ready', sr_series_uid = ?2, sr_sop_uid = ?3"
            " WHERE id = ?1",
            "iss", revision_id, sr_series_uid, sr_sop_uid) != 0)
        goto bad;
    if (sqlite3_exec(c, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) goto bad;
    return 0;
bad:
    return rolled_back(c, err, errlen);
}

int db_outbox_revision_failed(struct db *db, int64_t revision_id, const char *reason,
                              int64_t now_ms)
{
    return db_exec_bound(db_conn(db),
                         "UPDATE pacs_revisions SET state = 'failed', reason = ?2, failed_at = ?3"
                         " WHERE id = ?1",
                         "isi", revision_id, reason ? reason : "", now_ms);
}

int db_outbox_revision_superseded(struct db *db, int64_t revision_id)
{
    return db_exec_bound(db_conn(db),
                         "UPDATE pacs_revisions SET state = 'skipped', revision = 0,"
                         " reason = 'superseded by a newer result before it was built'"
                         " WHERE id = ?1 AND state = 'pending'",
                         "i", revision_id);
}

int db_outbox_due(struct db *db, const char *destination, int64_t now_ms, int64_t horizon_ms,
                  struct db_outbox_delivery *out, int max, int *n)
{
    *n = 0;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db_conn(db),
                           "SELECT d.id, d.revision_ref, d.destination, d.object, d.file_path,"
                           " d.sop_uid, st.study_uid, d.attempts FROM pacs_deliveries d"
                           " JOIN pacs_revisions pr ON pr.id = d.revision_ref"
                           " JOIN studies st ON st.id = pr.study_ref"
                           " WHERE d.state = 'pending' AND d.destination = ?4"
                           " AND (d.next_attempt_at <= ?1 OR d.next_attempt_at > ?1 + ?3)"
                           /* an object that failed goes after those that
                            * did not: one the peer aborts on would end
                            * the association before them every time */
                           " ORDER BY d.attempts, d.id LIMIT ?2",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_int64(st, 1, now_ms);
    sqlite3_bind_int(st, 2, max);
    sqlite3_bind_int64(st, 3, horizon_ms);
    sqlite3_bind_text(st, 4, destination, -1, SQLITE_STATIC);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW && *n < max) {
        struct db_outbox_delivery *d = &out[(*n)++];
        d->id = sqlite3_column_int64(st, 0);
        d->revision_id = sqlite3_column_int64(st, 1);
        db_col_copy(st, 2, d->destination, sizeof d->destination);
        db_col_copy(st, 3, d->object, sizeof d->object);
        db_col_copy(st, 4, d->file_path, sizeof d->file_path);
        db_col_copy(st, 5, d->sop_uid, sizeof d->sop_uid);
        db_col_copy(st, 6, d->study_uid, sizeof d->study_uid);
        d->attempts = sqlite3_column_int(st, 7);
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE || rc == SQLITE_ROW ? 0 : -1;
}

int db_outbox_next_due(struct db *db, const char *destination, int64_t *at_ms, bool *found)
{
    *found = false;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db_conn(db),
                           "SELECT min(next_attempt_at) FROM pacs_deliveries"
                           " WHERE state = 'pending' AND destination = ?1",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_text(st, 1, destination, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL) {
        *at_ms = sqlite3_column_int64(st, 0);
        *found = true;
    }
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : -1;
}

int db_outbox_sent(struct db *db, int64_t id, int64_t now_ms)
{
    return db_exec_bound(
        db_conn(db),
        "UPDATE pacs_deliveries SET state = 'sent', sent_at = ?2, last_attempt_at = ?2,"
        " attempts = attempts + 1, last_error = '' WHERE id = ?1",
        "ii", id, now_ms);
}

int db_outbox_revision_files_done(struct db *db, int64_t revision_id, char (*paths)[512], int max,
                                  int *n)
{
    sqlite3_stmt *st =
        list_query(db,
                   "SELECT DISTINCT file_path FROM pacs_deliveries WHERE revision_ref = ?1"
                   " AND NOT EXISTS (SELECT 1 FROM pacs_deliveries"
                   "  WHERE revision_ref = ?1 AND state NOT IN ('sent', 'dismissed'))",
                   revision_id, n);
    if (!st) return -1;
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW && *n < max)
        db_col_copy(st, 0, paths[(*n)++], sizeof paths[0]);
    return list_done(st, rc);
}

int db_outbox_attempt_failed(struct db *db, int64_t id, const char *error, int64_t now_ms,
                             int64_t next_at_ms, bool give_up)
{
    return db_exec_bound(db_conn(db),
                         "UPDATE pacs_deliveries SET attempts = attempts + 1, last_attempt_at = ?2,"
                         " last_error = ?3, next_attempt_at = ?4, state = ?5 WHERE id = ?1",
                         "iisis", id, now_ms, error ? error : "", next_at_ms,
                         give_up ? "failed" : "pending");
}

int db_outbox_fail_unlisted(struct db *db, const char *const *dests, int ndests, int64_t now_ms,
                            int *count)
{
    *count = 0;
    sqlite3 *c = db_conn(db);
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(c,
                           "SELECT DISTINCT destination FROM pacs_deliveries"
                           " WHERE state = 'pending'",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    char gone[16][160];
    int ngone = 0, rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *d = (const char *)sqlite3_column_text(st, 0);
        bool listed = false;
        for (int i = 0; i < ndests && d; i++)
            listed = listed || strcmp(d, dests[i]) == 0;
        if (d && !listed && ngone < 16) snprintf(gone[ngone++], sizeof gone[0], "%s", d);
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) return -1;
    for (int i = 0; i < ngone; i++) {
        if (db_exec_bound(c,
                          "UPDATE pacs_deliveries SET state = 'failed', last_attempt_at = ?2,"
                          " last_error = 'destination no longer configured'"
                          " WHERE state = 'pending' AND destination = ?1",
                          "si", gone[i], now_ms) != 0)
            return -1;
        *count += sqlite3_changes(c);
    }
    return 0;
}

int db_outbox_failed(struct db *db, int limit, db_outbox_failure_fn fn, void *ud)
{
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db_conn(db),
                           "SELECT st.study_uid, d.destination, d.object, d.sop_uid, d.last_error,"
                           " pr.revision, d.attempts, coalesce(d.last_attempt_at, 0)"
                           " FROM pacs_deliveries d JOIN pacs_revisions pr"
                           " ON pr.id = d.revision_ref JOIN studies st ON st.id = pr.study_ref"
                           " WHERE d.state = 'failed'"
                           " UNION ALL SELECT st.study_uid, '', 'build', '', pr.reason,"
                           " pr.revision, 0, pr.created_at FROM pacs_revisions pr"
                           " JOIN studies st ON st.id = pr.study_ref WHERE pr.state = 'failed'"
                           " ORDER BY 8 DESC LIMIT ?1",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_int(st, 1, limit);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        struct db_outbox_failure f = {
            .study_uid = (const char *)sqlite3_column_text(st, 0),
            .destination = (const char *)sqlite3_column_text(st, 1),
            .object = (const char *)sqlite3_column_text(st, 2),
            .sop_uid = (const char *)sqlite3_column_text(st, 3),
            .error = (const char *)sqlite3_column_text(st, 4),
            .revision = sqlite3_column_int(st, 5),
            .attempts = sqlite3_column_int(st, 6),
            .last_attempt_ms = sqlite3_column_int64(st, 7),
        };
        if (fn(ud, &f) != 0) {
            rc = SQLITE_DONE;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : -1;
}

static int counts_on(sqlite3 *c, struct db_outbox_counts *out)
{
    memset(out, 0, sizeof *out);
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(c, "SELECT state, count(*) FROM pacs_deliveries GROUP BY state", -1, &st,
                           NULL) != SQLITE_OK)
        return -1;
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *s = (const char *)sqlite3_column_text(st, 0);
        int64_t n = sqlite3_column_int64(st, 1);
        if (!s) continue;
        if (strcmp(s, "pending") == 0) out->pending = n;
        if (strcmp(s, "sent") == 0) out->sent = n;
        if (strcmp(s, "failed") == 0) out->failed = n;
        if (strcmp(s, "dismissed") == 0) out->dismissed = n;
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE ||
        sqlite3_prepare_v2(c,
                           "SELECT coalesce(sum(state = 'failed'), 0),"
                           " coalesce(sum(state = 'pending'), 0),"
                           " coalesce(sum(state = 'dismissed'), 0) FROM pacs_revisions",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        out->revisions_failed = sqlite3_column_int64(st, 0);
        out->revisions_pending = sqlite3_column_int64(st, 1);
        out->revisions_dismissed = sqlite3_column_int64(st, 2);
    }
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : -1;
}

int db_outbox_counts(struct db *db, struct db_outbox_counts *out)
{
    return counts_on(db_conn(db), out);
}

int db_outbox_counts_read(const char *path, struct db_outbox_counts *out, bool *present, char *err,
                          size_t errlen)
{
    memset(out, 0, sizeof *out);
    *present = false;
    sqlite3 *c;
    if (db_conn_open_flags(&c, path, SQLITE_OPEN_READONLY, err, errlen) != 0) return -1;
    sqlite3_stmt *st;
    int rc = 0;
    if (sqlite3_prepare_v2(c, "SELECT 1 FROM sqlite_master WHERE name = 'pacs_deliveries'", -1, &st,
                           NULL) != SQLITE_OK) {
        rc = -1;
    } else {
        *present = sqlite3_step(st) == SQLITE_ROW;
        sqlite3_finalize(st);
    }
    if (rc == 0 && *present) rc = counts_on(c, out);
    if (rc != 0) snprintf(err, errlen, "outbox: %s", sqlite3_errmsg(c));
    sqlite3_close(c);
    return rc;
}

int db_outbox_failed_since(struct db *db, int64_t since_ms, int64_t *deliveries, int64_t *revisions)
{
    *deliveries = *revisions = 0;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db_conn(db),
                           "SELECT (SELECT count(*) FROM pacs_deliveries WHERE state = 'failed'"
                           "  AND last_attempt_at >= ?1),"
                           " (SELECT count(*) FROM pacs_revisions WHERE state = 'failed'"
                           "  AND failed_at >= ?1)",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_int64(st, 1, since_ms);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        *deliveries = sqlite3_column_int64(st, 0);
        *revisions = sqlite3_column_int64(st, 1);
    }
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : -1;
}

int db_outbox_by_destination(struct db *db, struct db_outbox_destination *out, int max, int *n)
{
    sqlite3_stmt *st = list_query(db,
                                  "SELECT destination, sum(state = 'pending'), sum(state = 'sent'),"
                                  " sum(state = 'failed'), sum(state = 'dismissed')"
                                  " FROM pacs_deliveries GROUP BY destination"
                                  " ORDER BY destination LIMIT ?1",
                                  max, n);
    if (!st) return -1;
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW && *n < max) {
        struct db_outbox_destination *d = &out[(*n)++];
        db_col_copy(st, 0, d->destination, sizeof d->destination);
        d->pending = sqlite3_column_int64(st, 1);
        d->sent = sqlite3_column_int64(st, 2);
        d->failed = sqlite3_column_int64(st, 3);
        d->dismissed = sqlite3_column_int64(st, 4);
    }
    return list_done(st, rc);
}

/* What was given up, of one study (?1) or of all (?1 NULL): what retry
 * puts back in the queue and dismiss lets go of. */
#define GIVEN_UP_DELIVERIES                                                                        \
    " FROM pacs_deliveries d JOIN pacs_revisions pr ON pr.id = d.revision_ref"                     \
    " JOIN studies st ON st.id = pr.study_ref"                                                     \
    " WHERE d.state = 'failed' AND (?1 IS NULL OR st.study_uid = ?1)"
#define GIVEN_UP_REVISIONS                                                                         \
    " FROM pacs_revisions pr JOIN studies st ON st.id = pr.study_ref"                              \
    " WHERE pr.state = 'failed' AND (?1 IS NULL OR st.study_uid = ?1)"

int db_outbox_retry(struct db *db, const char *study_uid, int64_t now_ms, int *deliveries,
                    int *revisions, char *err, size_t errlen)
{
    *deliveries = *revisions = 0;
    sqlite3 *c = db_conn(db);
    if (sqlite3_exec(c, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) goto bad;
    /* Fresh attempts, due now; the last error stays until the next one. */
    if (db_exec_bound(c,
                      "UPDATE pacs_deliveries SET state = 'pending', attempts = 0,"
                      " next_attempt_at = ?2 WHERE id IN (SELECT d.id" GIVEN_UP_DELIVERIES ")",
                      "si", study_uid, now_ms) != 0)
        goto bad;
    *deliveries = sqlite3_changes(c);
    /* Built again from the start; one whose study has a newer revision by
     * now is skipped by the sender (superseded), which lets it go too. */
    if (db_exec_bound(c,
                      "UPDATE pacs_revisions SET state = 'pending', reason = '', failed_at = NULL"
                      " WHERE id IN (SELECT pr.id" GIVEN_UP_REVISIONS ")",
                      "s", study_uid) != 0)
        goto bad;
    *revisions = sqlite3_changes(c);
    if (sqlite3_exec(c, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) goto bad;
    return 0;
bad:
    *deliveries = *revisions = 0;
    return rolled_back(c, err, errlen);
}

/* The objects and the results given up, of the study ?1 (all when NULL):
 * one text for db_outbox_dismiss's listing and its changes. */
/* db_outbox_dismiss's listing, inside its transaction: *out grown as it
 * goes (freed by the caller, also on error). Returns 0, -1 on an SQLite
 * error, -2 out of memory. */
static int dismissed_read(sqlite3 *c, const char *study_uid, struct db_outbox_dismissed **out,
                          int *n)
{
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(
            c,
            "SELECT st.study_uid, pr.id, d.destination, d.object, pr.revision,"
            " d.sop_uid" GIVEN_UP_DELIVERIES
            " UNION ALL SELECT st.study_uid, pr.id, '', 'build', pr.revision, ''" GIVEN_UP_REVISIONS
            " ORDER BY 2, 3, 4",
            -1, &st, NULL) != SQLITE_OK)
        return -1;
    if (study_uid) sqlite3_bind_text(st, 1, study_uid, -1, SQLITE_STATIC);
    int rc, cap = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (*n == cap) {
            cap = cap ? cap * 2 : 16;
            struct db_outbox_dismissed *grown = realloc(*out, sizeof **out * (size_t)cap);
            if (!grown) {
                sqlite3_finalize(st);
                return -2;
            }
            *out = grown;
        }
        struct db_outbox_dismissed *d = &(*out)[(*n)++];
        db_col_copy(st, 0, d->study_uid, sizeof d->study_uid);
        d->revision_id = sqlite3_column_int64(st, 1);
        db_col_copy(st, 2, d->destination, sizeof d->destination);
        db_col_copy(st, 3, d->object, sizeof d->object);
        d->revision = sqlite3_column_int(st, 4);
        db_col_copy(st, 5, d->sop_uid, sizeof d->sop_uid);
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : -1;
}

int db_outbox_dismiss(struct db *db, const char *study_uid, const char *user, int64_t now_ms,
                      struct db_outbox_dismissed **out, int *n, char *err, size_t errlen)
{
    *out = NULL;
    *n = 0;
    sqlite3 *c = db_conn(db);
    int rc = 0;
    if (sqlite3_exec(c, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK ||
        (rc = dismissed_read(c, study_uid, out, n)) != 0)
        goto bad;
    for (int i = 0; i < *n; i++) {
        const struct db_outbox_dismissed *d = &(*out)[i];
        char detail[300];
        snprintf(detail, sizeof detail, "revision=%d destination=%s object=%s", d->revision,
                 d->destination[0] ? d->destination : "-", d->object);
        if (db_audit_add(db, now_ms, user, "pacs_dismissed", d->study_uid, detail) != 0) goto bad;
    }
    if (db_exec_bound(c,
                      "UPDATE pacs_deliveries SET state = 'dismissed'"
                      " WHERE id IN (SELECT d.id" GIVEN_UP_DELIVERIES ")",
                      "s", study_uid) != 0 ||
        db_exec_bound(c,
                      "UPDATE pacs_revisions SET state = 'dismissed'"
                      " WHERE id IN (SELECT pr.id" GIVEN_UP_REVISIONS ")",
                      "s", study_uid) != 0 ||
        sqlite3_exec(c, "COMMIT", NULL, NULL, NULL) != SQLITE_OK)
        goto bad;
    return 0;
bad:
    free(*out);
    *out = NULL;
    *n = 0;
    rolled_back(c, err, errlen);
    if (rc == -2) snprintf(err, errlen, "out of memory");
    return -1;
}

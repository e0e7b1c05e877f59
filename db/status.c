/* db/status.c: the read-only queries behind `ichtriage status`. */
#include "db_internal.h"
#include "db_status.h"

#include <sqlite3.h>
#include <stdio.h>
#include <string.h>

/* db_scalar with its error in err. */
static int scalar(sqlite3 *c, const char *sql, int64_t *out, char *err, size_t errlen)
{
    if (db_scalar(c, out, sql, "") == 0) return 0;
    snprintf(err, errlen, "%s", sqlite3_errmsg(c));
    return -1;
}

/* Runs "SELECT name, count ... GROUP BY name" into out (at most
 * DB_STATUS_MAX_STATES rows). */
static int read_counts(sqlite3 *c, const char *sql, struct db_status_count *out, int *n, char *err,
                       size_t errlen)
{
    sqlite3_stmt *st;
    *n = 0;
    if (sqlite3_prepare_v2(c, sql, -1, &st, NULL) != SQLITE_OK) {
        snprintf(err, errlen, "%s", sqlite3_errmsg(c));
        return -1;
    }
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW && *n < DB_STATUS_MAX_STATES) {
        const char *s = (const char *)sqlite3_column_text(st, 0);
        snprintf(out[*n].name, sizeof out[*n].name, "%s", s ? s : "");
        out[*n].count = sqlite3_column_int64(st, 1);
        (*n)++;
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
        snprintf(err, errlen, "%s", sqlite3_errmsg(c));
        return -1;
    }
    return 0;
}

/* The triage tables arrive with schema 2 (issue 6); an older database, or
 * one whose tables differ from these queries, simply has no triage part. */
static void read_triage(sqlite3 *c, struct db_status *out)
{
    char err[256];
    out->has_triage =
        read_counts(c, "SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state",
                    out->job_states, &out->n_job_states, err, sizeof err) == 0 &&
        read_counts(c, "SELECT status, count(*) FROM studies GROUP BY status ORDER BY status",
                    out->study_statuses, &out->n_study_statuses, err, sizeof err) == 0 &&
        scalar(c, "SELECT coalesce(max(created_at), 0) FROM results", &out->last_triage_ms, err,
               sizeof err) == 0;
    if (!out->has_triage) out->n_job_states = out->n_study_statuses = 0;
}

static void run_quick_check(sqlite3 *c, struct db_status *out)
{
    sqlite3_stmt *st;
    out->quick_check_ok = false;
    if (sqlite3_prepare_v2(c, "PRAGMA quick_check(1)", -1, &st, NULL) != SQLITE_OK) {
        snprintf(out->quick_check, sizeof out->quick_check, "%s", sqlite3_errmsg(c));
        return;
    }
    if (sqlite3_step(st) == SQLITE_ROW) {
        const char *r = (const char *)sqlite3_column_text(st, 0);
        snprintf(out->quick_check, sizeof out->quick_check, "%s", r ? r : "?");
        out->quick_check_ok = r && strcmp(r, "ok") == 0;
    } else {
        snprintf(out->quick_check, sizeof out->quick_check, "%s", sqlite3_errmsg(c));
    }
    sqlite3_finalize(st);
}

int db_conn_open_flags(sqlite3 **out, const char *path, int flags, char *err, size_t errlen)
{
    if (sqlite3_open_v2(path, out, flags | SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK) {
        snprintf(err, errlen, "cannot open database %s: %s", path,
                 *out ? sqlite3_errmsg(*out) : "out of memory");
        sqlite3_close(*out);
        *out = NULL;
        return -1;
    }
    sqlite3_busy_timeout(*out, 10000);
    return 0;
}

int db_status_read(const char *path, bool quick_check, struct db_status *out, char *err,
                   size_t errlen)
{
    memset(out, 0, sizeof *out);
    sqlite3 *c;
    if (db_conn_open_flags(&c, path, SQLITE_OPEN_READONLY, err, errlen) != 0) return -1;
    int64_t version = 0;
    int rc = -1;
    /* One read transaction: the counts are one consistent snapshot. */
    if (sqlite3_exec(c, "BEGIN", NULL, NULL, NULL) != SQLITE_OK ||
        scalar(c, "PRAGMA user_version", &version, err, errlen) != 0)
        goto done;
    out->schema_version = (int)version;
    if (version == 0) {
        snprintf(err, errlen, "%s is not an ichtriage database (schema version 0)", path);
        goto done;
    }
    if (scalar(c, "SELECT count(*) FROM patients", &out->patients, err, errlen) ||
        scalar(c, "SELECT count(*) FROM studies", &out->studies, err, errlen) ||
        scalar(c, "SELECT count(*) FROM series", &out->series, err, errlen) ||
        scalar(c, "SELECT count(*) FROM instances", &out->instances, err, errlen) ||
        scalar(c, "SELECT coalesce(sum(file_size), 0) FROM instances", &out->spool_bytes, err,
               errlen) ||
        scalar(c, "SELECT max(received_at) FROM instances", &out->last_received_ms, err, errlen) ||
        read_counts(c, "SELECT state, count(*) FROM series GROUP BY state ORDER BY state",
                    out->series_states, &out->n_series_states, err, errlen))
        goto done;
    read_triage(c, out);
    if (quick_check) run_quick_check(c, out);
    rc = 0;
done:
    sqlite3_exec(c, "COMMIT", NULL, NULL, NULL);
    sqlite3_close(c);
    return rc;
}

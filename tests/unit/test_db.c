/* Unit tests of db/: schema, recording and replacing instances, group
 * commit under many threads, integrity. Real SQLite files in a temp dir. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "db.h"

static char dir[256], path[300];

static void setup(void)
{
    snprintf(dir, sizeof dir, "/tmp/ichtriage-test-db-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/test.db", dir);
}

static void teardown(void)
{
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}

static struct db_instance row(const char *sop, const char *series, const char *file)
{
    struct db_instance in = {
        .patient_id = "P1",
        .patient_name = "Doe^Jane",
        .study_uid = "1.2.3",
        .series_uid = series,
        .modality = "CT",
        .series_number = 2,
        .sop_uid = sop,
        .sop_class = "1.2.840.10008.5.1.4.1.1.2",
        .transfer_syntax = "1.2.840.10008.1.2.1",
        .instance_number = 1,
        .rows = 512,
        .columns = 512,
        .number_of_frames = 1,
        .has_position = true,
        .position = {1, 2, 3},
        .rescale_slope = 1,
        .rescale_intercept = -1024,
        .file_path = file,
        .file_size = 1000,
        .calling_ae = "CT1",
        .received_at_ms = 1700000000000,
    };
    return in;
}

static long long scalar(const char *sql)
{
    sqlite3 *c;
    cr_assert_eq(sqlite3_open(path, &c), SQLITE_OK);
    sqlite3_stmt *st;
    cr_assert_eq(sqlite3_prepare_v2(c, sql, -1, &st, NULL), SQLITE_OK, "%s", sqlite3_errmsg(c));
    cr_assert_eq(sqlite3_step(st), SQLITE_ROW);
    long long v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    sqlite3_close(c);
    return v;
}

TestSuite(db, .init = setup, .fini = teardown);

Test(db, creates_schema_and_reopens)
{
    struct db *db;
    char err[256];
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    db_close(db);
    cr_assert_eq(scalar("PRAGMA user_version"), db_schema_version());
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    cr_assert_eq(db_integrity_check(db, err, sizeof err), 0, "%s", err);
    db_close(db);
    db_close(NULL);
}

Test(db, refuses_newer_schema)
{
    struct db *db;
    char err[256];
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    db_close(db);
    sqlite3 *c;
    sqlite3_open(path, &c);
    sqlite3_exec(c, "PRAGMA user_version = 999", NULL, NULL, NULL);
    sqlite3_close(c);
    cr_assert_eq(db_open(&db, path, err, sizeof err), -1);
    cr_assert(strstr(err, "newer") != NULL, "%s", err);
}

/* Schema 13: per-slice results by instance (the slice image's lookup had
 * read every row), also for a database made at 12. */
Test(db, slice_results_are_indexed_by_instance_also_after_an_upgrade)
{
    struct db *db;
    char err[256];
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    db_close(db);
    cr_assert_eq(scalar("SELECT count(*) FROM sqlite_master WHERE name = 'slice_results_sop'"), 1);
    sqlite3 *c;
    cr_assert_eq(sqlite3_open(path, &c), SQLITE_OK);
    /* as at 12: without 14's and 15's indexes either */
    cr_assert_eq(sqlite3_exec(c,
                              "DROP INDEX slice_results_sop; DROP INDEX studies_retention;"
                              " DROP INDEX studies_open; PRAGMA user_version = 12",
                              NULL, NULL, NULL),
                 SQLITE_OK);
    sqlite3_close(c);
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    db_close(db);
    cr_assert_eq(scalar("PRAGMA user_version"), db_schema_version());
    cr_assert_eq(scalar("SELECT count(*) FROM sqlite_master WHERE name = 'slice_results_sop'"), 1);
    /* What db_slice_has_result asks goes by it. */
    cr_assert_eq(sqlite3_open(path, &c), SQLITE_OK);
    sqlite3_stmt *st;
    cr_assert_eq(sqlite3_prepare_v2(c,
                                    "EXPLAIN QUERY PLAN SELECT 1 FROM slice_results"
                                    " WHERE sop_uid = 'x' AND frame = 0",
                                    -1, &st, NULL),
                 SQLITE_OK);
    cr_assert_eq(sqlite3_step(st), SQLITE_ROW);
    const char *plan = (const char *)sqlite3_column_text(st, 3);
    cr_assert(strstr(plan, "USING COVERING INDEX slice_results_sop") != NULL, "%s", plan);
    sqlite3_finalize(st);
    sqlite3_close(c);
}

Test(db, records_instance_with_study_and_series)
{
    struct db *db;
    char err[256], old[256];
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    struct db_instance a = row("1.2.3.4.1", "1.2.3.4", "spool/a.dcm");
    struct db_instance b = row("1.2.3.4.2", "1.2.3.4", "spool/b.dcm");
    cr_assert_eq(db_instance_put(db, &a, old, sizeof old, err, sizeof err), 0, "%s", err);
    cr_assert_str_eq(old, "");
    cr_assert_eq(db_instance_put(db, &b, old, sizeof old, err, sizeof err), 0, "%s", err);
    int64_t n;
    cr_assert_eq(db_count_instances(db, &n), 0);
    cr_assert_eq(n, 2);
    bool indexed;
    cr_assert_eq(db_file_is_indexed(db, "spool/b.dcm", &indexed), 0);
    cr_assert(indexed);
    cr_assert_eq(db_file_is_indexed(db, "spool/c.dcm", &indexed), 0);
    cr_assert_not(indexed);
    db_close(db);
    cr_assert_eq(scalar("SELECT count(*) FROM studies"), 1);
    cr_assert_eq(scalar("SELECT count(*) FROM patients"), 1);
    cr_assert_eq(scalar("SELECT instance_count FROM series WHERE series_uid = '1.2.3.4'"), 2);
    cr_assert_eq(scalar("SELECT rescale_intercept FROM instances WHERE sop_uid = '1.2.3.4.1'"),
                 -1024);
}

Test(db, resent_instance_replaces_row_and_reports_old_file)
{
    struct db *db;
    char err[256], old[256];
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    struct db_instance a = row("1.2.3.4.1", "1.2.3.4", "spool/a.dcm");
    cr_assert_eq(db_instance_put(db, &a, old, sizeof old, err, sizeof err), 0, "%s", err);
    a.file_path = "spool/a~1.dcm";
    cr_assert_eq(db_instance_put(db, &a, old, sizeof old, err, sizeof err), 0, "%s", err);
    cr_assert_str_eq(old, "spool/a.dcm");
    db_close(db);
    cr_assert_eq(scalar("SELECT count(*) FROM instances"), 1);
    cr_assert_eq(scalar("SELECT instance_count FROM series WHERE series_uid = '1.2.3.4'"), 1);
}

/* A study sent again with its patient's name or ID corrected (an unknown
 * trauma patient reconciled) shows the correction: the first name had
 * stayed for good. */
Test(db, resent_study_takes_the_corrected_patient)
{
    struct db *db;
    char err[256], old[256];
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    struct db_instance a = row("1.2.3.4.1", "1.2.3.4", "spool/a.dcm");
    a.patient_id = "TRAUMA-7";
    a.patient_name = "Unknown^Trauma";
    cr_assert_eq(db_instance_put(db, &a, old, sizeof old, err, sizeof err), 0, "%s", err);
    struct db_instance b = row("1.2.3.4.2", "1.2.3.4", "spool/b.dcm");
    cr_assert_eq(db_instance_put(db, &b, old, sizeof old, err, sizeof err), 0, "%s", err);
    db_close(db);
    cr_assert_eq(scalar("SELECT count(*) FROM studies st JOIN patients p ON p.id = st.patient_ref"
                        " WHERE p.patient_id = 'P1' AND p.patient_name = 'Doe^Jane'"),
                 1);
    cr_assert_eq(scalar("SELECT count(*) FROM studies"), 1);
}

/* UIDs are unique. A SOP instance sent again in another series, or a series
 * sent again in another study (another patient's, say), is refused (1) and
 * changes nothing: it had been moved, taking an acknowledged slice from the
 * first study (whose result stayed), or counted and triaged in the first
 * study. */
Test(db, instance_or_series_in_another_parent_is_refused)
{
    struct db *db;
    char err[256], old[256];
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    struct db_instance a = row("1.2.3.4.1", "1.2.3.4", "spool/a.dcm");
    cr_assert_eq(db_instance_put(db, &a, old, sizeof old, err, sizeof err), 0, "%s", err);
    struct db_instance moved = row("1.2.3.4.1", "1.2.3.5", "spool/b.dcm");
    cr_assert_eq(db_instance_put(db, &moved, old, sizeof old, err, sizeof err), 1, "%s", err);
    cr_assert(strstr(err, "already stored in another series"), "%s", err);
    cr_assert_str_eq(old, "", "the first copy's file reported for removal");
    struct db_instance other = row("1.2.3.4.2", "1.2.3.4", "spool/c.dcm");
    other.study_uid = "1.2.9";
    other.patient_id = "P2";
    other.patient_name = "Roe^Richard";
    cr_assert_eq(db_instance_put(db, &other, old, sizeof old, err, sizeof err), 1, "%s", err);
    cr_assert(strstr(err, "already stored in another study"), "%s", err);
    db_close(db);
    cr_assert_eq(scalar("SELECT count(*) FROM instances"), 1);
    cr_assert_eq(scalar("SELECT count(*) FROM series"), 1, "nothing of the refused is written");
    cr_assert_eq(scalar("SELECT count(*) FROM studies"), 1);
    cr_assert_eq(scalar("SELECT count(*) FROM patients"), 1);
    cr_assert_eq(scalar("SELECT instance_count FROM series WHERE series_uid = '1.2.3.4'"), 1);
    cr_assert_eq(scalar("SELECT count(*) FROM instances i JOIN series s ON s.id = i.series_id"
                        " WHERE i.sop_uid = '1.2.3.4.1' AND s.series_uid = '1.2.3.4'"),
                 1);
}

/* received_at is when the content arrived: a copy re-sent with the same
 * bytes keeps it (its triage result still describes the file), one with
 * other bytes of the same size does not. Rows without a digest (stored before
 * schema 8) are always new content. */
Test(db, resent_same_bytes_keep_received_at)
{
    struct db *db;
    char err[256], old[256];
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    struct db_instance a = row("1.2.3.4.1", "1.2.3.4", "spool/a.dcm");
    a.content_digest = "aa";
    cr_assert_eq(db_instance_put(db, &a, old, sizeof old, err, sizeof err), 0, "%s", err);
    a.file_path = "spool/a~1.dcm";
    a.received_at_ms += 1000;
    cr_assert_eq(db_instance_put(db, &a, old, sizeof old, err, sizeof err), 0, "%s", err);
    const char *q = "SELECT received_at FROM instances WHERE sop_uid = '1.2.3.4.1'";
    cr_assert_eq(scalar(q), 1700000000000);
    a.file_path = "spool/a.dcm";
    a.received_at_ms += 1000;
    a.content_digest = "bb"; /* same file_size, other bytes */
    cr_assert_eq(db_instance_put(db, &a, old, sizeof old, err, sizeof err), 0, "%s", err);
    cr_assert_eq(scalar(q), 1700000002000);
    a.file_path = "spool/a~1.dcm";
    a.received_at_ms += 1000;
    a.content_digest = NULL;
    cr_assert_eq(db_instance_put(db, &a, old, sizeof old, err, sizeof err), 0, "%s", err);
    cr_assert_eq(scalar(q), 1700000003000);
    a.file_path = "spool/a.dcm";
    a.received_at_ms += 1000;
    cr_assert_eq(db_instance_put(db, &a, old, sizeof old, err, sizeof err), 0, "%s", err);
    cr_assert_eq(scalar(q), 1700000004000, "an unknown digest matched another unknown one");
    db_close(db);
}

Test(db, failing_row_fails_alone)
{
    struct db *db;
    char err[256], old[256];
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    struct db_instance a = row("1.2.3.4.1", "1.2.3.4", "spool/a.dcm");
    cr_assert_eq(db_instance_put(db, &a, old, sizeof old, err, sizeof err), 0, "%s", err);
    /* Another SOP instance claiming the same file: the UNIQUE constraint refuses it. */
    struct db_instance b = row("1.2.3.4.2", "1.2.3.4", "spool/a.dcm");
    cr_assert_eq(db_instance_put(db, &b, old, sizeof old, err, sizeof err), -1);
    cr_assert(strlen(err) > 0);
    db_close(db);
    cr_assert_eq(scalar("SELECT count(*) FROM instances"), 1);
    cr_assert_eq(scalar("SELECT instance_count FROM series"), 1);
}

#define THREADS 8
#define PER_THREAD 50

struct worker {
    struct db *db;
    int id;
    int failures;
};

static void *put_many(void *arg)
{
    struct worker *w = arg;
    for (int i = 0; i < PER_THREAD; i++) {
        char sop[64], series[64], file[64], err[256], old[256];
        snprintf(sop, sizeof sop, "1.2.3.%d.%d", w->id, i);
        snprintf(series, sizeof series, "1.2.3.%d", w->id);
        snprintf(file, sizeof file, "spool/%d/%d.dcm", w->id, i);
        struct db_instance in = row(sop, series, file);
        if (db_instance_put(w->db, &in, old, sizeof old, err, sizeof err) != 0) w->failures++;
    }
    return NULL;
}

Test(db, group_commit_from_many_threads_loses_nothing)
{
    struct db *db;
    char err[256];
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    pthread_t t[THREADS];
    struct worker w[THREADS];
    for (int i = 0; i < THREADS; i++) {
        w[i] = (struct worker){db, i, 0};
        pthread_create(&t[i], NULL, put_many, &w[i]);
    }
    for (int i = 0; i < THREADS; i++) {
        pthread_join(t[i], NULL);
        cr_assert_eq(w[i].failures, 0);
    }
    cr_assert_eq(db_integrity_check(db, err, sizeof err), 0, "%s", err);
    db_close(db);
    cr_assert_eq(scalar("SELECT count(*) FROM instances"), THREADS * PER_THREAD);
    cr_assert_eq(scalar("SELECT sum(instance_count) FROM series"), THREADS * PER_THREAD);
    cr_assert_eq(scalar("SELECT count(*) FROM series"), THREADS);
}

Test(db, unwritable_location_is_an_error)
{
    struct db *db;
    char err[256];
    cr_assert_eq(db_open(&db, "/nonexistent-dir/x.db", err, sizeof err), -1);
    cr_assert_null(db);
    cr_assert(strstr(err, "/nonexistent-dir/x.db") != NULL, "%s", err);
}

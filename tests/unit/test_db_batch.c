/* Unit test of db/'s group commit when SQLite rolls a whole batch back (as
 * it does itself after SQLITE_FULL, SQLITE_IOERR or SQLITE_NOMEM): each
 * request must be told exactly what was committed. A real SQLite file; a
 * trigger that raises ROLLBACK for one SOP instance stands in for the disk
 * error, deterministically. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "db.h"

struct putter {
    struct db *db;
    char sop[32];
    int rc;
    char err[256];
};

static void *put(void *arg)
{
    struct putter *p = arg;
    struct db_instance in = {.patient_id = "P9",
                             .study_uid = "1.9",
                             .series_uid = "1.9.1",
                             .modality = "CT",
                             .sop_uid = p->sop,
                             .sop_class = "1.2.840.10008.5.1.4.1.1.2",
                             .transfer_syntax = "1.2.840.10008.1.2.1",
                             .file_path = p->sop,
                             .received_at_ms = 1};
    char old[256];
    p->rc = db_instance_put(p->db, &in, old, sizeof old, p->err, sizeof p->err);
    return NULL;
}

static void exec_ok(sqlite3 *c, const char *sql)
{
    cr_assert_eq(sqlite3_exec(c, sql, NULL, NULL, NULL), SQLITE_OK, "%s: %s", sql,
                 sqlite3_errmsg(c));
}

static void pause_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

Test(db_batch, rows_after_a_batch_rollback_are_reported_as_they_were_committed)
{
    char dir[] = "/tmp/ichtriage-test-batch-XXXXXX", path[64], err[256];
    cr_assert_not_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/test.db", dir);
    struct db *db;
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    sqlite3 *c;
    cr_assert_eq(sqlite3_open(path, &c), SQLITE_OK);
    exec_ok(c, "CREATE TRIGGER boom BEFORE INSERT ON instances WHEN new.sop_uid = '1.9.1.2'"
               " BEGIN SELECT RAISE(ROLLBACK, 'simulated disk error'); END");
    /* Hold the write lock: request 0's commit waits in BEGIN IMMEDIATE while
     * requests 1, 2 and 3 queue behind it, in that order, and then go as one
     * batch with 2 in the middle. */
    exec_ok(c, "BEGIN IMMEDIATE");
    struct putter p[4];
    pthread_t t[4];
    for (int i = 0; i < 4; i++) {
        p[i] = (struct putter){.db = db};
        snprintf(p[i].sop, sizeof p[i].sop, "1.9.1.%d", i);
        cr_assert_eq(pthread_create(&t[i], NULL, put, &p[i]), 0);
        pause_ms(150);
    }
    exec_ok(c, "COMMIT");
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    for (int i = 0; i < 4; i++) {
        sqlite3_stmt *st;
        cr_assert_eq(sqlite3_prepare_v2(c, "SELECT count(*) FROM instances WHERE sop_uid = ?1", -1,
                                        &st, NULL),
                     SQLITE_OK);
        sqlite3_bind_text(st, 1, p[i].sop, -1, SQLITE_STATIC);
        cr_assert_eq(sqlite3_step(st), SQLITE_ROW);
        int rows = sqlite3_column_int(st, 0);
        sqlite3_finalize(st);
        cr_expect_eq(rows, p[i].rc == 0, "%s: rc %d (%s) but %d rows committed", p[i].sop, p[i].rc,
                     p[i].err, rows);
        /* The failing row's neighbours are written again, alone. */
        cr_expect_eq(p[i].rc, i == 2 ? -1 : 0, "%s: rc %d (%s)", p[i].sop, p[i].rc, p[i].err);
    }
    sqlite3_close(c);
    db_close(db);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}

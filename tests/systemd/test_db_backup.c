/* The database copies of db/backup.c: the copy taken before a schema
 * migration (never overwriting an earlier one), the online copy, and the
 * list of files a copy refers to. Real SQLite files in a temp dir. */
#include <criterion/criterion.h>
#include <dirent.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "db.h"
#include "db_backup.h"
#include "db_status.h"

static char dir[256], path[300];

static void setup(void)
{
    snprintf(dir, sizeof dir, "/tmp/ichtriage-test-dbbackup-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/ichtriage.db", dir);
}

static void teardown(void)
{
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}

/* A WAL database at user_version 1 with one row in a table t. */
static sqlite3 *old_db(void)
{
    sqlite3 *c;
    cr_assert_eq(sqlite3_open(path, &c), SQLITE_OK);
    cr_assert_eq(sqlite3_exec(c,
                              "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t "
                              "VALUES ('kept'); PRAGMA user_version=1;",
                              NULL, NULL, NULL),
                 SQLITE_OK);
    return c;
}

/* Names in dir that start with prefix; the first goes to first. */
static int count_prefixed(const char *prefix, char *first, size_t n)
{
    DIR *d = opendir(dir);
    cr_assert_not_null(d);
    int count = 0;
    for (struct dirent *e; (e = readdir(d));)
        if (strncmp(e->d_name, prefix, strlen(prefix)) == 0) {
            if (!count++ && first) snprintf(first, n, "%s/%s", dir, e->d_name);
        }
    closedir(d);
    return count;
}

static void assert_holds_kept(const char *file)
{
    sqlite3 *c;
    sqlite3_stmt *st;
    cr_assert_eq(sqlite3_open_v2(file, &c, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    cr_assert_eq(sqlite3_prepare_v2(c, "SELECT x FROM t", -1, &st, NULL), SQLITE_OK);
    cr_assert_eq(sqlite3_step(st), SQLITE_ROW);
    cr_assert_str_eq((const char *)sqlite3_column_text(st, 0), "kept");
    sqlite3_finalize(st);
    sqlite3_close(c);
}

TestSuite(db_backup, .init = setup, .fini = teardown);

Test(db_backup, before_migration_keeps_every_copy)
{
    sqlite3 *c = old_db();
    char err[512] = "", first[600];
    cr_assert_eq(db_backup_before_migration(c, 1, err, sizeof err), 0, "%s", err);
    cr_assert_eq(db_backup_before_migration(c, 1, err, sizeof err), 0, "%s", err);
    cr_assert_eq(count_prefixed("ichtriage.db.v1-", first, sizeof first), 2,
                 "two migrations in the same second must leave two copies");
    cr_assert_eq(count_prefixed("ichtriage.db.v1-", NULL, 0), 2);
    cr_assert(strstr(first, ".bak") != NULL, "%s", first);
    sqlite3_close(c);
    assert_holds_kept(first);
    /* A self-contained file: no -wal beside it, header says rollback journal. */
    char wal[700];
    snprintf(wal, sizeof wal, "%s-wal", first);
    struct stat st;
    cr_assert_neq(stat(wal, &st), 0);
    cr_assert_eq(count_prefixed("ichtriage.db.v1-", NULL, 0), 2, "no .part left behind");
}

Test(db_backup, before_migration_skips_memory)
{
    sqlite3 *c;
    char err[512] = "";
    cr_assert_eq(sqlite3_open(":memory:", &c), SQLITE_OK);
    cr_assert_eq(db_backup_before_migration(c, 1, err, sizeof err), 0, "%s", err);
    sqlite3_close(c);
}

Test(db_backup, copy_refuses_to_overwrite)
{
    sqlite3 *c = old_db();
    char err[512] = "", dst[400];
    snprintf(dst, sizeof dst, "%s/copy.db", dir);
    cr_assert_eq(db_backup_copy(path, dst, err, sizeof err), 0, "%s", err);
    assert_holds_kept(dst);
    cr_assert_eq(db_backup_copy(path, dst, err, sizeof err), -1);
    cr_assert(strstr(err, "exists") != NULL, "%s", err);
    snprintf(dst, sizeof dst, "%s/missing.db", dir);
    cr_assert_eq(db_backup_copy(dst, path, err, sizeof err), -1, "copy of a missing file");
    sqlite3_close(c);
}

static int collect(void *ud, const struct db_backup_file *f)
{
    char *out = ud;
    char line[300];
    snprintf(line, sizeof line, "%s:%lld:%s%s%s;", f->file_path, (long long)f->file_size,
             f->sop_uid, f->digest[0] ? ":" : "", f->digest);
    strcat(out, line);
    return 0;
}

Test(db_backup, files_of_a_copy_and_status)
{
    struct db *db;
    char err[512] = "";
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    db_close(db);
    sqlite3 *c;
    cr_assert_eq(sqlite3_open(path, &c), SQLITE_OK);
    /* Rows straight in SQL: only file_path and file_size matter here. */
    cr_assert_eq(
        sqlite3_exec(c,
                     "INSERT INTO patients(id, patient_id) VALUES (1, 'P');"
                     "INSERT INTO studies(id, study_uid, patient_ref, received_at, "
                     "updated_at) VALUES (1, '1.2', 1, 0, 0);"
                     "INSERT INTO series(id, series_uid, study_ref, first_instance_at, "
                     "last_instance_at) VALUES (1, '1.2.3', 1, 0, 0);"
                     "INSERT INTO instances(sop_uid, series_id, sop_class, "
                     "transfer_syntax, file_path, file_size, received_at, content_digest) VALUES "
                     "('1', 1, 'c', 't', 'spool/b', 20, 5000, 'bb'),"
                     "('2', 1, 'c', 't', 'spool/a', 10, 7000, '');",
                     NULL, NULL, NULL),
        SQLITE_OK, "%s", sqlite3_errmsg(c));
    sqlite3_close(c);
    char got[1000] = "";
    cr_assert_eq(db_backup_files(path, collect, got, err, sizeof err), 0, "%s", err);
    cr_assert_str_eq(got, "spool/a:10:2;spool/b:20:1:bb;");
    struct db_status s;
    cr_assert_eq(db_status_read(path, true, &s, err, sizeof err), 0, "%s", err);
    cr_assert_eq(s.instances, 2);
    cr_assert_eq(s.spool_bytes, 30);
    cr_assert_eq(s.last_received_ms, 7000);
    cr_assert_eq(s.series, 1);
    cr_assert_eq(s.n_series_states, 1);
    cr_assert_str_eq(s.series_states[0].name, "receiving");
    cr_assert(s.quick_check_ok);
    cr_assert_eq(s.schema_version, db_schema_version());
    /* status never creates a database */
    char missing[400];
    snprintf(missing, sizeof missing, "%s/none.db", dir);
    cr_assert_eq(db_status_read(missing, false, &s, err, sizeof err), -1);
    struct stat st;
    cr_assert_neq(stat(missing, &st), 0);
}

/* db_open() copies an existing, older database before it migrates it. A
 * database at the current version, set back one version, makes db_open()
 * run the last migration again, which fails (its tables exist); the copy
 * must be there all the same, taken before the migration started. */
Test(db_backup, db_open_copies_before_migrating)
{
    if (db_schema_version() < 2) cr_skip_test("one schema version only: nothing to migrate from");
    struct db *db;
    char err[512] = "";
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    db_close(db);
    cr_assert_eq(count_prefixed("ichtriage.db.v", NULL, 0), 0, "a new database was copied");
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    db_close(db);
    cr_assert_eq(count_prefixed("ichtriage.db.v", NULL, 0), 0, "an up-to-date database was copied");
    sqlite3 *c;
    char pragma[64], prefix[64];
    snprintf(pragma, sizeof pragma, "PRAGMA user_version = %d", db_schema_version() - 1);
    cr_assert_eq(sqlite3_open(path, &c), SQLITE_OK);
    cr_assert_eq(sqlite3_exec(c, pragma, NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(c);
    db_open(&db, path, err, sizeof err);
    db_close(db);
    snprintf(prefix, sizeof prefix, "ichtriage.db.v%d-", db_schema_version() - 1);
    cr_assert_eq(count_prefixed(prefix, NULL, 0), 1,
                 "no copy of the database before migrating it from version %d (db_migrate "
                 "must call db_backup_before_migration)",
                 db_schema_version() - 1);
}

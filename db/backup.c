/* db/backup.c: copies of the index through SQLite's online backup API, and
 * the list of spool files a copy refers to. */
#include "db_backup.h"
#include "db_status.h"

#include <errno.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "io.h"
#include "log.h"

static int fsync_parent(const char *path)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash == dir)
        dir[1] = 0;
    else if (slash)
        *slash = 0;
    else
        snprintf(dir, sizeof dir, ".");
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

/* Copies database "main" of src into a new file dst_path (via .part). */
static int backup_from(sqlite3 *src, const char *dst_path, char *err, size_t errlen)
{
    char part[4096];
    if ((size_t)snprintf(part, sizeof part, "%s.part", dst_path) >= sizeof part) {
        snprintf(err, errlen, "path too long: %s", dst_path);
        return -1;
    }
    struct stat st;
    if (lstat(dst_path, &st) == 0) {
        snprintf(err, errlen, "%s already exists", dst_path);
        return -1;
    }
    unlink(part); /* a leftover of an interrupted copy: never a complete one */
    sqlite3 *dst;
    if (db_conn_open_flags(&dst, part, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, err, errlen) !=
        0)
        return -1;
    /* A rollback journal in the copy: it is one self-contained file. */
    sqlite3_exec(dst, "PRAGMA journal_mode=DELETE; PRAGMA synchronous=FULL;", NULL, NULL, NULL);
    sqlite3_backup *b = sqlite3_backup_init(dst, "main", src, "main");
    if (!b) {
        snprintf(err, errlen, "backup of the database failed: %s", sqlite3_errmsg(dst));
        sqlite3_close(dst);
        unlink(part);
        return -1;
    }
    /* All pages in one step: one read transaction, so one snapshot. Under
     * WAL the node's writers go on meanwhile. */
    int rc = sqlite3_backup_step(b, -1);
    sqlite3_backup_finish(b);
    if (rc != SQLITE_DONE) {
        snprintf(err, errlen, "backup of the database failed: %s", sqlite3_errstr(rc));
        sqlite3_close(dst);
        unlink(part);
        return -1;
    }
    /* The copied header says WAL when the source is; the copy is read
     * alone, so make it a plain file. */
    sqlite3_exec(dst, "PRAGMA journal_mode=DELETE", NULL, NULL, NULL);
    if (sqlite3_close(dst) != SQLITE_OK) {
        snprintf(err, errlen, "cannot close %s", part);
        unlink(part);
        return -1;
    }
    int fd = open(part, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || fsync(fd) != 0) {
        snprintf(err, errlen, "cannot sync %s: %s", part, strerror(errno));
        if (fd >= 0) close(fd);
        unlink(part);
        return -1;
    }
    close(fd);
    if (rename(part, dst_path) != 0 || fsync_parent(dst_path) != 0) {
        snprintf(err, errlen, "cannot rename %s to %s: %s", part, dst_path, strerror(errno));
        unlink(part);
        return -1;
    }
    return 0;
}

int db_backup_copy(const char *src_path, const char *dst_path, char *err, size_t errlen)
{
    sqlite3 *src;
    if (db_conn_open_flags(&src, src_path, SQLITE_OPEN_READONLY, err, errlen) != 0) return -1;
    int rc = backup_from(src, dst_path, err, errlen);
    sqlite3_close(src);
    return rc;
}

int db_backup_files(const char *db_path, int (*fn)(void *ud, const struct db_backup_file *file),
                    void *ud, char *err, size_t errlen)
{
    sqlite3 *c;
    if (db_conn_open_flags(&c, db_path, SQLITE_OPEN_READONLY, err, errlen) != 0) return -1;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(c,
                           "SELECT file_path, file_size, content_digest, sop_uid FROM instances"
                           " ORDER BY file_path",
                           -1, &st, NULL) != SQLITE_OK) {
        snprintf(err, errlen, "%s: %s", db_path, sqlite3_errmsg(c));
        sqlite3_close(c);
        return -1;
    }
    int rc, ret = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *p = (const char *)sqlite3_column_text(st, 0);
        const char *d = (const char *)sqlite3_column_text(st, 2);
        const char *sop = (const char *)sqlite3_column_text(st, 3);
        struct db_backup_file f = {.file_path = p ? p : "",
                                   .file_size = sqlite3_column_int64(st, 1),
                                   .digest = d ? d : "",
                                   .sop_uid = sop ? sop : ""};
        ret = fn(ud, &f);
        if (ret != 0) break;
    }
    if (ret == 0 && rc != SQLITE_DONE) {
        snprintf(err, errlen, "%s: %s", db_path, sqlite3_errmsg(c));
        ret = -1;
    }
    sqlite3_finalize(st);
    sqlite3_close(c);
    return ret;
}

/* Ends the write transaction of a copy's connection c: commits when rc is
 * SQLITE_OK, else rolls back with the error in err; closes c. */
static int end_write(sqlite3 *c, int rc, const char *db_path, char *err, size_t errlen)
{
    if (rc == SQLITE_OK) rc = sqlite3_exec(c, "COMMIT", NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        snprintf(err, errlen, "%s: %s", db_path, sqlite3_errmsg(c));
        sqlite3_exec(c, "ROLLBACK", NULL, NULL, NULL);
    }
    sqlite3_close(c);
    return rc == SQLITE_OK ? 0 : -1;
}

int db_backup_outbox_settle(const char *db_path, const char *root, const char *live_db,
                            int *settled, int *missing, char *err, size_t errlen)
{
    *settled = *missing = 0;
    sqlite3 *c, *live;
    if (db_conn_open_flags(&c, db_path, SQLITE_OPEN_READWRITE, err, errlen) != 0) return -1;
    if (db_conn_open_flags(&live, live_db, SQLITE_OPEN_READONLY, err, errlen) != 0) {
        sqlite3_close(c);
        return -1;
    }
    sqlite3_stmt *st = NULL, *up = NULL, *ask = NULL;
    int rc = sqlite3_exec(c, "BEGIN IMMEDIATE", NULL, NULL, NULL);
    /* An index older than the PACS queue (schema 4) has nothing to settle. */
    bool queue = false;
    if (rc == SQLITE_OK &&
        (rc = sqlite3_prepare_v2(c, "SELECT 1 FROM sqlite_master WHERE name = 'pacs_deliveries'",
                                 -1, &st, NULL)) == SQLITE_OK) {
        queue = sqlite3_step(st) == SQLITE_ROW;
        sqlite3_finalize(st);
        st = NULL;
    }
    if (rc == SQLITE_OK && !queue) {
        sqlite3_close(live);
        return end_write(c, SQLITE_OK, db_path, err, errlen);
    }
    if (rc == SQLITE_OK)
        rc = sqlite3_prepare_v2(
            c, "SELECT id, file_path FROM pacs_deliveries WHERE state IN ('pending', 'failed')", -1,
            &st, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_prepare_v2(c,
                                "UPDATE pacs_deliveries SET state = ?3,"
                                " sent_at = CASE ?3 WHEN 'sent' THEN ?2 ELSE sent_at END,"
                                " last_error = CASE ?3 WHEN 'sent' THEN '' ELSE last_error END"
                                " WHERE id = ?1",
                                -1, &up, NULL);
    if (rc == SQLITE_OK &&
        sqlite3_prepare_v2(live,
                           "SELECT state, coalesce(sent_at, 0) FROM pacs_deliveries"
                           " WHERE id = ?1 AND file_path = ?2",
                           -1, &ask, NULL) != SQLITE_OK) {
        snprintf(err, errlen, "%s: %s", live_db, sqlite3_errmsg(live));
        rc = SQLITE_ABORT;
    }
    while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        int64_t id = sqlite3_column_int64(st, 0);
        const char *rel = (const char *)sqlite3_column_text(st, 1);
        char path[4200];
        struct stat sb;
        snprintf(path, sizeof path, "%s/%s", root, rel ? rel : "");
        rc = SQLITE_OK;
        if (!rel || strstr(rel, "..") || lstat(path, &sb) == 0 || errno != ENOENT) continue;
        sqlite3_bind_int64(ask, 1, id);
        sqlite3_bind_text(ask, 2, rel, -1, SQLITE_TRANSIENT);
        int found = sqlite3_step(ask);
        int64_t sent_at = found == SQLITE_ROW ? sqlite3_column_int64(ask, 1) : 0;
        char state[16];
        snprintf(state, sizeof state, "%s",
                 found == SQLITE_ROW ? (const char *)sqlite3_column_text(ask, 0) : "none");
        sqlite3_reset(ask);
        /* the node removes a revision's files once each of its deliveries
         * is one or the other, and neither changes again */
        bool done = !strcmp(state, "sent") || !strcmp(state, "dismissed");
        if (found != SQLITE_ROW && found != SQLITE_DONE) {
            snprintf(err, errlen, "%s: %s", live_db, sqlite3_errmsg(live));
            rc = SQLITE_ABORT;
            break;
        }
        if (!done) {
            util_log(UTIL_LOG_WARN, "backup_outbox_file_missing",
                     "delivery=%lld path=%s live_state=%s reason=\"not delivered, and its file "
                     "is not in the node's outbox/ either\"",
                     (long long)id, rel, state);
            (*missing)++;
            continue;
        }
        sqlite3_bind_int64(up, 1, id);
        sqlite3_bind_int64(up, 2, sent_at);
        sqlite3_bind_text(up, 3, state, -1, SQLITE_TRANSIENT);
        rc = sqlite3_step(up) == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
        sqlite3_reset(up);
        (*settled)++;
    }
    sqlite3_finalize(st);
    sqlite3_finalize(up);
    sqlite3_finalize(ask);
    sqlite3_close(live);
    if (rc == SQLITE_ABORT) {
        sqlite3_exec(c, "ROLLBACK", NULL, NULL, NULL);
        sqlite3_close(c);
        return -1;
    }
    return end_write(c, rc == SQLITE_DONE ? SQLITE_OK : rc, db_path, err, errlen);
}

struct db_live {
    sqlite3 *c;
    sqlite3_stmt *file, *sop;
    char path[1024]; /* for messages */
};

int db_live_open(struct db_live **out, const char *db_path, char *err, size_t errlen)
{
    *out = NULL;
    struct db_live *l = calloc(1, sizeof *l);
    if (!l) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    snprintf(l->path, sizeof l->path, "%s", db_path);
    if (db_conn_open_flags(&l->c, db_path, SQLITE_OPEN_READONLY, err, errlen) != 0) {
        free(l);
        return -1;
    }
    if (sqlite3_prepare_v2(l->c,
                           "SELECT 1 FROM instances WHERE file_path = ?1"
                           " AND (?2 = '' OR content_digest = ?2)",
                           -1, &l->file, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(
            l->c, "SELECT file_path, file_size, content_digest FROM instances WHERE sop_uid = ?1",
            -1, &l->sop, NULL) != SQLITE_OK) {
        snprintf(err, errlen, "%s: %s", db_path, sqlite3_errmsg(l->c));
        db_live_close(l);
        return -1;
    }
    *out = l;
    return 0;
}

void db_live_close(struct db_live *l)
{
    if (!l) return;
    sqlite3_finalize(l->file);
    sqlite3_finalize(l->sop);
    sqlite3_close(l->c);
    free(l);
}

/* Ends a question on st: rc its last step's result. */
static int live_done(struct db_live *l, sqlite3_stmt *st, int rc, char *err, size_t errlen)
{
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        snprintf(err, errlen, "%s: %s", l->path, sqlite3_errmsg(l->c));
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? 0 : -1;
}

int db_live_file_indexed(struct db_live *l, const char *file_path, const char *digest,
                         bool *indexed, char *err, size_t errlen)
{
    sqlite3_bind_text(l->file, 1, file_path, -1, SQLITE_STATIC);
    sqlite3_bind_text(l->file, 2, digest ? digest : "", -1, SQLITE_STATIC);
    int rc = sqlite3_step(l->file);
    *indexed = rc == SQLITE_ROW;
    return live_done(l, l->file, rc, err, errlen);
}

int db_live_instance(struct db_live *l, const char *sop_uid, bool *found, char *path, size_t n,
                     int64_t *size, char digest[65], char *err, size_t errlen)
{
    *found = false;
    sqlite3_bind_text(l->sop, 1, sop_uid, -1, SQLITE_STATIC);
    int rc = sqlite3_step(l->sop);
    if (rc == SQLITE_ROW) {
        const char *p = (const char *)sqlite3_column_text(l->sop, 0);
        const char *d = (const char *)sqlite3_column_text(l->sop, 2);
        snprintf(path, n, "%s", p ? p : "");
        *size = sqlite3_column_int64(l->sop, 1);
        snprintf(digest, 65, "%s", d ? d : "");
        *found = true;
    }
    return live_done(l, l->sop, rc, err, errlen);
}

int db_backup_amend_files(const char *db_path, const struct db_backup_change *changes, int n,
                          int64_t now_ms, char *err, size_t errlen)
{
    sqlite3 *c;
    if (db_conn_open_flags(&c, db_path, SQLITE_OPEN_READWRITE, err, errlen) != 0) return -1;
    sqlite3_stmt *del = NULL, *mark = NULL, *count = NULL, *move = NULL;
    const char *sql[] = {
        "DELETE FROM instances WHERE file_path = ?1 RETURNING series_id,"
        " (SELECT study_ref FROM series WHERE id = series_id)",
        "UPDATE studies SET purged_at = ?2 WHERE id = ?1 AND purged_at IS NULL AND NOT EXISTS"
        " (SELECT 1 FROM instances i JOIN series s ON s.id = i.series_id WHERE s.study_ref = ?1)",
        /* A study purged keeps its series' counts, as retention leaves them. */
        "UPDATE series SET instance_count = (SELECT count(*) FROM instances WHERE series_id = ?1)"
        " WHERE id = ?1 AND EXISTS (SELECT 1 FROM instances i JOIN series s ON s.id ="
        " i.series_id WHERE s.study_ref = series.study_ref)",
        "UPDATE instances SET file_path = ?2, file_size = ?3 WHERE file_path = ?1"};
    sqlite3_stmt **st[] = {&del, &mark, &count, &move};
    int rc = sqlite3_exec(c, "BEGIN IMMEDIATE", NULL, NULL, NULL);
    for (size_t i = 0; rc == SQLITE_OK && i < sizeof sql / sizeof sql[0]; i++)
        rc = sqlite3_prepare_v2(c, sql[i], -1, st[i], NULL);
    /* A series is recounted, and its study looked at, once after a run of
     * its rows (the changes come ordered by path, a series' files
     * together), not after each row: a count per row was quadratic in the
     * series' size. */
    int64_t series = -1, study = -1;
    for (int i = 0; rc == SQLITE_OK && i <= n; i++) {
        const struct db_backup_change *ch = i < n ? &changes[i] : NULL;
        if (ch && ch->new_path) {
            sqlite3_bind_text(move, 1, ch->file_path, -1, SQLITE_STATIC);
            sqlite3_bind_text(move, 2, ch->new_path, -1, SQLITE_STATIC);
            sqlite3_bind_int64(move, 3, ch->new_size);
            rc = sqlite3_step(move) == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
            sqlite3_reset(move);
            continue;
        }
        int64_t row_series = -1, row_study = -1;
        if (ch) {
            sqlite3_bind_text(del, 1, ch->file_path, -1, SQLITE_STATIC);
            while ((rc = sqlite3_step(del)) == SQLITE_ROW) {
                row_series = sqlite3_column_int64(del, 0);
                row_study = sqlite3_column_int64(del, 1);
            }
            sqlite3_reset(del);
            if (rc != SQLITE_DONE) break;
            rc = SQLITE_OK;
            if (row_study < 0 || row_series == series) continue;
        }
        if (study >= 0) {
            sqlite3_bind_int64(mark, 1, study);
            sqlite3_bind_int64(mark, 2, now_ms);
            rc = sqlite3_step(mark) == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
            sqlite3_reset(mark);
            if (rc != SQLITE_OK) break;
            sqlite3_bind_int64(count, 1, series);
            rc = sqlite3_step(count) == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
            sqlite3_reset(count);
        }
        series = row_series;
        study = row_study;
    }
    sqlite3_finalize(del);
    sqlite3_finalize(mark);
    sqlite3_finalize(count);
    sqlite3_finalize(move);
    return end_write(c, rc, db_path, err, errlen);
}

int db_backup_before_migration(struct sqlite3 *conn, int from_version, char *err, size_t errlen)
{
    const char *path = sqlite3_db_filename(conn, "main");
    if (!path || !path[0]) return 0; /* in-memory or temporary: nothing to keep */
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    char stamp[32], dst[4096];
    strftime(stamp, sizeof stamp, "%Y%m%dT%H%M%SZ", &tm);
    for (int n = 0; n < 100; n++) {
        int len = n ? snprintf(dst, sizeof dst, "%s.v%d-%s-%d.bak", path, from_version, stamp, n)
                    : snprintf(dst, sizeof dst, "%s.v%d-%s.bak", path, from_version, stamp);
        if (len < 0 || (size_t)len >= sizeof dst) {
            snprintf(err, errlen, "path too long: %s", path);
            return -1;
        }
        struct stat st;
        if (lstat(dst, &st) != 0) break;
    }
    if (backup_from(conn, dst, err, errlen) != 0) return -1;
    /* Made as root (`sudo ichtriage pacs list` on an index the node has not
     * migrated yet, after an upgrade), the copy is the store owner's, as
     * the index is (SQLite gives its -wal and -shm files the index's owner
     * itself). */
    if (util_own_like_folder(-1, dst) != 0) {
        snprintf(err, errlen, "cannot chown %s: %s", dst, strerror(errno));
        return -1;
    }
    util_log(UTIL_LOG_INFO, "db_backup_before_migration", "from_version=%d backup=%s", from_version,
             dst);
    return 0;
}

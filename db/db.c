/* db/db.c: opening the database, and the group commit that lets many
 * receiving threads share one fsync.
 *
 * Group commit: a thread that wants a row committed queues its request. If
 * no commit is running, it becomes the leader: it takes every queued request,
 * writes them in one transaction (a savepoint each, so one bad row fails
 * alone), commits once, and wakes the others. An error that makes SQLite roll
 * the whole transaction back (disk full, I/O error) has each request written
 * again alone, so each is told what was committed. Otherwise it waits; when the
 * running commit ends, the next leader takes its request along. */
#include "db_internal.h"
#include "db_put.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

struct put_req {
    const struct db_instance *in;
    char *old_path;
    size_t old_path_len;
    char *err;
    size_t errlen;
    int rc;
    bool done;
    struct put_req *next;
};

struct db {
    sqlite3 *conn;  /* the owner thread's connection */
    sqlite3 *wconn; /* used only by the group-commit leader */
    struct db_put_stmts put;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct put_req *head, *tail;
    bool committing;
};

static int conn_open(sqlite3 **out, const char *path, char *err, size_t errlen)
{
    int rc = sqlite3_open_v2(
        path, out, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK) {
        snprintf(err, errlen, "cannot open database %s: %s", path,
                 *out ? sqlite3_errmsg(*out) : sqlite3_errstr(rc));
        sqlite3_close(*out);
        *out = NULL;
        return -1;
    }
    sqlite3_busy_timeout(*out, 10000);
    /* WAL: readers never block the writer; synchronous=FULL: a commit is on
     * disk when COMMIT returns, which is what "success" promises a scanner. */
    const char *setup = "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"
                        "PRAGMA foreign_keys=ON;";
    char *msg = NULL;
    if (sqlite3_exec(*out, setup, NULL, NULL, &msg) != SQLITE_OK) {
        snprintf(err, errlen, "cannot set up database %s: %s", path, msg ? msg : "?");
        sqlite3_free(msg);
        sqlite3_close(*out);
        *out = NULL;
        return -1;
    }
    return 0;
}

/* The busy handler of the receiving threads' connection. SQLite's own
 * sleeps 1, 2, 5, 10, 15, 20, 25 ms... between tries, so a store that meets
 * another writer's commit (the inference thread's results, which runs at
 * idle priority and fsyncs) waits up to 25 ms past its end. This one tries
 * every quarter millisecond for the first 50 ms, then every millisecond, and
 * gives up after 10 s as before. */
static int busy_poll(void *arg, int count)
{
    (void)arg;
    long waited_us = count < 200 ? count * 250L : 50000L + (count - 200) * 1000L;
    if (waited_us >= 10000000L) return 0;
    struct timespec ts = {0, count < 200 ? 250000L : 1000000L};
    nanosleep(&ts, NULL);
    return 1;
}

/* The schema version of the database at path, read without writing: -1
 * when it cannot be opened or read. */
static int64_t index_version(const char *path)
{
    sqlite3 *c = NULL;
    int64_t version = -1;
    if (sqlite3_open_v2(path, &c, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL) == SQLITE_OK) {
        sqlite3_busy_timeout(c, 10000);
        if (db_scalar(c, &version, "PRAGMA user_version", "") != 0) version = -1;
    }
    sqlite3_close(c);
    return version;
}

bool db_index_is_new(const char *path)
{
    int64_t version = index_version(path);
    if (version == 0) return true; /* empty, or a file no node wrote */
    /* Missing: the read-only open fails. Otherwise db_open says why. */
    return version < 0 && access(path, F_OK) != 0 && errno == ENOENT;
}

int db_open_existing(struct db **out, const char *path, char *err, size_t errlen)
{
    *out = NULL;
    if (db_index_is_new(path)) {
        snprintf(err, errlen, "%s holds no index of the node's (missing, empty or not its schema)",
                 path);
        return -1;
    }
    /* An upgrade installs the new binary while the node of the release
     * before still runs on the index: an admin command run then must not
     * migrate the schema under it (that node checked the version once, at
     * its start). The node holds the store's lock (triage_store_lock) next
     * to the index for as long as it runs; a restore holds it too. */
    int64_t version = index_version(path);
    if (version > 0 && version < db_schema_version()) {
        char lock[1200];
        const char *slash = strrchr(path, '/');
        snprintf(lock, sizeof lock, "%.*s/ichtriage.lock", slash ? (int)(slash - path) : 1,
                 slash ? path : ".");
        int fd = open(lock, O_RDONLY | O_CLOEXEC);
        bool held = fd >= 0 && flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
        if (fd >= 0) close(fd); /* closing lets go of a lock it took */
        if (held) {
            snprintf(
                err, errlen,
                "%s is at schema version %lld and this ichtriage upgrades it to %d, but a node "
                "of an older release still runs on it (it holds %s): restart the node with "
                "this release first (it upgrades the index), then run this again",
                path, (long long)version, db_schema_version(), lock);
            return -1;
        }
    }
    return db_open(out, path, err, errlen);
}

int db_open(struct db **out, const char *path, char *err, size_t errlen)
{
    *out = NULL;
    struct db *db = calloc(1, sizeof *db);
    if (!db) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    pthread_mutex_init(&db->mu, NULL);
    pthread_cond_init(&db->cv, NULL);
    if (conn_open(&db->conn, path, err, errlen) != 0 || db_migrate(db->conn, err, errlen) != 0 ||
        conn_open(&db->wconn, path, err, errlen) != 0 ||
        db_put_prepare(&db->put, db->wconn, err, errlen) != 0) {
        db_close(db);
        return -1;
    }
    sqlite3_busy_handler(db->wconn, busy_poll, NULL);
    *out = db;
    return 0;
}

/* Prepares sql, binds ap as fmt says, steps once: the step's result code.
 * With out, a row's first column goes there (NULL or no row: 0). */
static int step_bound(sqlite3 *c, int64_t *out, const char *sql, const char *fmt, va_list ap)
{
    if (out) *out = 0;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(c, sql, -1, &st, NULL) != SQLITE_OK) return SQLITE_ERROR;
    for (int i = 0; fmt[i]; i++) {
        if (fmt[i] == 'i')
            sqlite3_bind_int64(st, i + 1, va_arg(ap, int64_t));
        else if (fmt[i] == 'd')
            sqlite3_bind_double(st, i + 1, va_arg(ap, double));
        else
            sqlite3_bind_text(st, i + 1, va_arg(ap, const char *), -1, SQLITE_TRANSIENT);
    }
    int rc = sqlite3_step(st);
    if (out && rc == SQLITE_ROW) *out = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return rc;
}

int db_exec_bound(sqlite3 *c, const char *sql, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = step_bound(c, NULL, sql, fmt, ap);
    va_end(ap);
    return rc == SQLITE_DONE || rc == SQLITE_ROW ? 0 : -1;
}

int db_row_exists(sqlite3 *c, const char *sql, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = step_bound(c, NULL, sql, fmt, ap);
    va_end(ap);
    return rc == SQLITE_ROW ? 0 : rc == SQLITE_DONE ? 1 : -1;
}

int db_scalar(sqlite3 *c, int64_t *out, const char *sql, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = step_bound(c, out, sql, fmt, ap);
    va_end(ap);
    return rc == SQLITE_DONE || rc == SQLITE_ROW ? 0 : -1;
}

void db_col_copy(sqlite3_stmt *st, int i, char *out, size_t n)
{
    const unsigned char *t = sqlite3_column_text(st, i);
    snprintf(out, n, "%s", t ? (const char *)t : "");
}

void db_set_busy_timeout(struct db *db, int ms)
{
    sqlite3_busy_timeout(db->conn, ms);
}

sqlite3 *db_conn(struct db *db)
{
    return db->conn;
}

void db_close(struct db *db)
{
    if (!db) return;
    db_put_finalize(&db->put);
    sqlite3_close(db->wconn);
    sqlite3_close(db->conn);
    pthread_cond_destroy(&db->cv);
    pthread_mutex_destroy(&db->mu);
    free(db);
}

static void put_failed(struct put_req *r, const char *what, sqlite3 *c)
{
    r->rc = -1;
    snprintf(r->err, r->errlen, "%s: %s", what, sqlite3_errmsg(c));
}

/* Ends the transaction unless SQLite already did: after SQLITE_FULL,
 * SQLITE_IOERR or SQLITE_NOMEM it rolls the whole transaction back itself. */
static void rollback_open(sqlite3 *c)
{
    if (!sqlite3_get_autocommit(c)) sqlite3_exec(c, "ROLLBACK", NULL, NULL, NULL);
}

/* One request in a transaction of its own. */
static void commit_one(struct db *db, struct put_req *r)
{
    sqlite3 *c = db->wconn;
    if (r->old_path_len) r->old_path[0] = 0;
    if (sqlite3_exec(c, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
        put_failed(r, "database busy or unavailable", c);
        return;
    }
    r->rc = db_put_one(&db->put, r->in, r->old_path, r->old_path_len, r->err, r->errlen);
    if (r->rc == 0 && sqlite3_exec(c, "COMMIT", NULL, NULL, NULL) != SQLITE_OK)
        put_failed(r, "commit failed", c);
    if (r->rc != 0) rollback_open(c);
}

/* Writes one batch in one transaction, a savepoint per request so that a
 * bad row fails alone. An error after which SQLite rolled the whole
 * transaction back (or a savepoint that cannot be set, rolled back to or
 * released) loses every row written so far: going on would have committed
 * the rest one by one, outside the transaction, and reported them failed.
 * Then each request is written again in a transaction of its own, so each
 * one's result is what is committed. Called by the leader without the mutex
 * held; only the leader touches wconn. */
static void commit_batch(struct db *db, struct put_req *batch)
{
    sqlite3 *c = db->wconn;
    if (sqlite3_exec(c, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
        for (struct put_req *r = batch; r; r = r->next)
            put_failed(r, "database busy or unavailable", c);
        return;
    }
    bool lost = false;
    for (struct put_req *r = batch; r && !lost; r = r->next) {
        if (sqlite3_exec(c, "SAVEPOINT one", NULL, NULL, NULL) != SQLITE_OK) {
            lost = true;
            continue;
        }
        r->rc = db_put_one(&db->put, r->in, r->old_path, r->old_path_len, r->err, r->errlen);
        if (r->rc != 0 && (sqlite3_get_autocommit(c) ||
                           sqlite3_exec(c, "ROLLBACK TO one", NULL, NULL, NULL) != SQLITE_OK))
            lost = true;
        else if (sqlite3_exec(c, "RELEASE one", NULL, NULL, NULL) != SQLITE_OK)
            lost = true;
    }
    if (lost) {
        int n = 0;
        for (struct put_req *r = batch; r; r = r->next)
            n++;
        util_log(UTIL_LOG_WARN, "db_batch_rolled_back", "rows=%d reason=\"%s\"", n,
                 sqlite3_errmsg(c));
        rollback_open(c);
        for (struct put_req *r = batch; r; r = r->next)
            commit_one(db, r);
        return;
    }
    if (sqlite3_exec(c, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
        const char *msg = sqlite3_errmsg(c);
        for (struct put_req *r = batch; r; r = r->next) {
            if (r->rc == 0) snprintf(r->err, r->errlen, "commit failed: %s", msg);
            r->rc = -1;
        }
        rollback_open(c);
    }
}

int db_instance_put(struct db *db, const struct db_instance *in, char *old_path,
                    size_t old_path_len, char *err, size_t errlen)
{
    struct put_req req = {
        .in = in, .old_path = old_path, .old_path_len = old_path_len, .err = err, .errlen = errlen};
    if (old_path_len) old_path[0] = 0;
    pthread_mutex_lock(&db->mu);
    if (db->tail)
        db->tail->next = &req;
    else
        db->head = &req;
    db->tail = &req;
    while (!req.done) {
        if (db->committing) {
            pthread_cond_wait(&db->cv, &db->mu);
            continue;
        }
        struct put_req *batch = db->head;
        db->head = db->tail = NULL;
        db->committing = true;
        pthread_mutex_unlock(&db->mu);
        commit_batch(db, batch);
        pthread_mutex_lock(&db->mu);
        for (struct put_req *r = batch, *next; r; r = next) {
            next = r->next; /* r lives on another thread's stack: read before done */
            r->done = true;
        }
        db->committing = false;
        pthread_cond_broadcast(&db->cv);
    }
    pthread_mutex_unlock(&db->mu);
    return req.rc;
}

int db_file_is_indexed(struct db *db, const char *file_path, bool *out)
{
    int rc =
        db_row_exists(db->conn, "SELECT 1 FROM instances WHERE file_path = ?1", "s", file_path);
    *out = rc == 0;
    return rc < 0 ? -1 : 0;
}

int db_count_instances(struct db *db, int64_t *out)
{
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db->conn, "SELECT count(*) FROM instances", -1, &st, NULL) != SQLITE_OK)
        return -1;
    int rc = sqlite3_step(st);
    *out = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : -1;
}

int db_integrity_check(struct db *db, char *err, size_t errlen)
{
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db->conn, "PRAGMA integrity_check", -1, &st, NULL) != SQLITE_OK) {
        snprintf(err, errlen, "%s", sqlite3_errmsg(db->conn));
        return -1;
    }
    int rc = sqlite3_step(st);
    const char *res = rc == SQLITE_ROW ? (const char *)sqlite3_column_text(st, 0) : "no answer";
    int ok = res && strcmp(res, "ok") == 0;
    if (!ok) snprintf(err, errlen, "integrity_check: %s", res ? res : "?");
    sqlite3_finalize(st);
    return ok ? 0 : -1;
}

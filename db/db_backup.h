/* db/: copies of the index. `ichtriage backup` and `restore` use all but
 * the last; db_open() calls the last before it migrates an existing
 * database, so a failed or regretted migration can be undone by hand. */
#ifndef DB_BACKUP_H
#define DB_BACKUP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct sqlite3;

/* Copies the database at src_path to dst_path with SQLite's online backup
 * API: one consistent snapshot, taken while a node may be writing (WAL
 * readers do not block it). The copy is written to dst_path.part, synced,
 * then renamed to dst_path, so dst_path is either absent or complete; it is
 * a self-contained file (no -wal). dst_path must not exist. Returns 0, or
 * -1 with a message in err. */
int db_backup_copy(const char *src_path, const char *dst_path, char *err, size_t errlen);

/* One indexed instance as db_backup_files hands it to its callback; the
 * strings live until the callback returns. */
struct db_backup_file {
    const char *file_path; /* relative to the store directory */
    int64_t file_size;
    const char *digest; /* content_digest, "" for rows older than schema 8 */
    const char *sop_uid;
};

/* Calls fn(ud, file) for every instance the database at db_path indexes,
 * ordered by file_path, reading through its own read-only connection.
 * Stops at the first non-zero return of fn and returns it. Returns 0, fn's
 * value, or -1 with a message in err. */
int db_backup_files(const char *db_path, int (*fn)(void *ud, const struct db_backup_file *file),
                    void *ud, char *err, size_t errlen);

/* For a backup whose outbox/ was copied (to root) after its database
 * (db_path): a PACS delivery pending or given up whose file is not there is
 * looked up in the live index (live_db, read-only). Sent or dismissed there
 * (`ichtriage pacs dismiss`), its revision was done with between the two
 * (the node removes a revision's files only once each of its deliveries is
 * one or the other): it takes that state in the copy, with the live
 * sent_at when sent; *settled counts them. Still pending or given up
 * there, its file is missing from the node's outbox/ too: it stays as it
 * is, logged (event=backup_outbox_file_missing); *missing counts them.
 * Returns 0, or -1 with a message in err. */
int db_backup_outbox_settle(const char *db_path, const char *root, const char *live_db,
                            int *settled, int *missing, char *err, size_t errlen);

/* The live index, opened read-only once for a walk that asks about many
 * files (a backup, `ichtriage status`): a store that lost its spool asks
 * once per indexed file, and a connection opened per question made that
 * minutes per 100,000 files. Each question reads the index as it is then
 * (no transaction is held between them). */
struct db_live;

/* Opens the live index at db_path. Returns 0, or -1 with a message in
 * err. */
int db_live_open(struct db_live **out, const char *db_path, char *err, size_t errlen);
void db_live_close(struct db_live *live);

/* Whether the live index still has a row for file_path with that content
 * digest ("": any). Returns 0, or -1 with a message in err. */
int db_live_file_indexed(struct db_live *live, const char *file_path, const char *digest,
                         bool *indexed, char *err, size_t errlen);

/* The live index's row of the instance sop_uid: *found, and then its
 * file_path (into path, n bytes), file_size and content_digest (digest, 65
 * bytes). Returns 0, or -1 with a message in err. */
int db_live_instance(struct db_live *live, const char *sop_uid, bool *found, char *path, size_t n,
                     int64_t *size, char digest[65], char *err, size_t errlen);

/* A change to a copy's instance rows (db_backup_amend_files): the row of
 * file_path is moved to new_path with new_size (the node stored the same
 * bytes again under another name while the backup ran), or, new_path
 * NULL, removed (a file the live node no longer indexes: purged by
 * retention or replaced with other bytes). */
struct db_backup_change {
    char *file_path, *new_path;
    int64_t new_size;
};

/* In the copy at db_path, in one transaction: applies the n changes; a
 * study left with no instance is marked purged at now_ms, as retention
 * does, and a series that keeps instances gets its instance_count
 * recounted. Returns 0, or -1 with a message in err. */
int db_backup_amend_files(const char *db_path, const struct db_backup_change *changes, int n,
                          int64_t now_ms, char *err, size_t errlen);

/* Called by the migration, on the connection it is about to migrate and
 * outside any transaction, when an existing database (from_version > 0) is
 * older than this build: copies it to
 *   <database>.v<from_version>-<UTC yyyymmddThhmmssZ>.bak
 * beside it (an earlier copy is never overwritten) and logs the name. An
 * in-memory or temporary database is not copied. Returns 0, or -1 with a
 * message in err: then the migration must not run. */
int db_backup_before_migration(struct sqlite3 *conn, int from_version, char *err, size_t errlen);

#endif

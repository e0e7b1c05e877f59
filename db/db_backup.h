/* db/: copies of the index. `ichtriage backup` and `restore` use the first
 * two; db_open() calls the third before it migrates an existing database,
 * so a failed or regretted migration can be undone by hand. */
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

/* Calls fn(ud, file_path, file_size, digest) for every instance the
 * database at db_path indexes (digest: its content_digest, "" for rows
 * older than schema 8), ordered by file_path (relative to the store
 * directory), reading through its own read-only connection. Stops at the first non-zero
 * return of fn and returns it. Returns 0, fn's value, or -1 with a message
 * in err. */
int db_backup_files(const char *db_path,
                    int (*fn)(void *ud, const char *file_path, int64_t file_size,
                              const char *digest),
                    void *ud, char *err, size_t errlen);

/* For a backup whose outbox/ was copied (to root) after its database
 * (db_path): a pending PACS delivery whose file is not there was delivered
 * everywhere between the two (the node removes a revision's files only
 * then), so it is marked sent in the copy; *settled counts them. Returns 0,
 * or -1 with a message in err. */
int db_backup_outbox_settle(const char *db_path, const char *root, int64_t now_ms, int *settled,
                            char *err, size_t errlen);

/* Whether the database at db_path (the live index, read-only) still has a
 * row for file_path with that content digest ("": any). Returns 0, or -1
 * with a message in err. */
int db_backup_file_indexed(const char *db_path, const char *file_path, const char *digest,
                           bool *indexed, char *err, size_t errlen);

/* In the copy at db_path: removes the instance rows of the n file paths (a
 * file the live node no longer indexes: purged by retention or replaced
 * while the backup ran) and marks a study left with no instance purged at
 * now_ms, as retention does. Returns 0, or -1 with a message in err. */
int db_backup_forget_files(const char *db_path, char *const *file_paths, int n, int64_t now_ms,
                           char *err, size_t errlen);

/* Called by the migration, on the connection it is about to migrate and
 * outside any transaction, when an existing database (from_version > 0) is
 * older than this build: copies it to
 *   <database>.v<from_version>-<UTC yyyymmddThhmmssZ>.bak
 * beside it (an earlier copy is never overwritten) and logs the name. An
 * in-memory or temporary database is not copied. Returns 0, or -1 with a
 * message in err: then the migration must not run. */
int db_backup_before_migration(struct sqlite3 *conn, int from_version, char *err, size_t errlen);

#endif

/* db/: what `ichtriage status` reads from the index. It opens the database
 * read-only with its own connection, so it runs beside a live node (WAL)
 * and never creates, migrates or writes a database. */
#ifndef DB_STATUS_H
#define DB_STATUS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define DB_STATUS_MAX_STATES 16

/* How many rows have one value of a state column. */
struct db_status_count {
    char name[32];
    int64_t count;
};

struct db_status {
    int schema_version; /* PRAGMA user_version of the file */
    int64_t patients, studies, series, instances;
    int64_t spool_bytes;      /* sum of the indexed files' sizes */
    int64_t last_received_ms; /* newest instance, ms since the epoch; 0: none */
    struct db_status_count series_states[DB_STATUS_MAX_STATES]; /* by name */
    int n_series_states;
    /* Triage, once the database has its tables (schema 2 on): jobs per
     * state (the queue), studies per status, the newest result. */
    bool has_triage;
    struct db_status_count job_states[DB_STATUS_MAX_STATES];
    int n_job_states;
    struct db_status_count study_statuses[DB_STATUS_MAX_STATES];
    int n_study_statuses;
    int64_t last_triage_ms; /* 0: none */
    bool quick_check_ok;
    char quick_check[256]; /* "ok", or the first problem PRAGMA quick_check found */
};

/* Fills *out from the database at path. quick_check: also run PRAGMA
 * quick_check (reads every page: seconds on a large index). out is the
 * caller's. Returns 0, or -1 with a message in err (for example when the
 * file does not exist or is not a database). */
int db_status_read(const char *path, bool quick_check, struct db_status *out, char *err,
                   size_t errlen);

/* For db/'s readers (status, backup): opens path with the given
 * sqlite3_open_v2 flags and a 10 s busy timeout. The caller owns *out
 * (sqlite3_close). Returns 0, or -1 with a message in err and *out NULL. */
struct sqlite3;
int db_conn_open_flags(struct sqlite3 **out, const char *path, int flags, char *err, size_t errlen);

#endif

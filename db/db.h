/* db/: the SQLite index of the node. Every SQL statement of the project
 * lives in this module. One database file, WAL journal, synchronous=FULL.
 *
 * Threads: db_instance_put() may be called from any number of receiving
 * threads at once; their rows are committed together (group commit), so a
 * thread waits for at most the commit in progress plus its own. The other
 * functions use the caller's own connection (db_open) and are for one
 * thread at a time (the libuv loop). */
#ifndef DB_H
#define DB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct db;

/* One received instance, as the index records it. Strings are borrowed for
 * the duration of the call; NULL and "" both mean "absent". */
struct db_instance {
    const char *patient_id, *patient_name, *specific_charset, *patient_birth_date, *patient_sex;
    const char *study_uid, *accession, *study_id, *study_date, *study_time, *study_desc;
    const char *series_uid, *modality, *body_part, *series_desc, *frame_of_ref_uid,
        *convolution_kernel, *manufacturer, *station_name;
    int series_number; /* -1: absent */
    const char *sop_uid, *sop_class, *transfer_syntax, *image_type;
    int instance_number; /* -1: absent */
    int rows, columns, number_of_frames, images_in_acquisition;
    bool has_pixel_spacing, has_position, has_orientation;
    double pixel_spacing[2], slice_thickness, position[3], orientation[6];
    double rescale_slope, rescale_intercept;
    const char *file_path; /* relative to the store directory */
    int64_t file_size;
    const char *content_digest; /* SHA-256 of the dataset as sent; "" or NULL: unknown */
    const char *calling_ae, *peer_addr;
    int64_t received_at_ms; /* Unix time in milliseconds */
};

/* True when the database at path holds no index of the node's yet: the file
 * is missing, empty (a truncated copy, "> ichtriage.db"), or a database whose
 * schema version is 0. db_open would make a fresh one, in which every
 * stored instance looks unindexed. */
bool db_index_is_new(const char *path);
/* db_open for the node's other commands (worklist, training from reviews):
 * refuses, opening nothing, a database db_index_is_new calls new. Making
 * its schema there would hide a lost index from the node's next start,
 * which would then remove every stored instance as unindexed. It refuses
 * too an index of an older schema while another process holds the store's
 * lock (ichtriage.lock next to it): a node of the release before, which
 * must not find its schema changed under it. */
int db_open_existing(struct db **out, const char *path, char *err, size_t errlen);
/* Opens (creating if needed) the database at path and brings its schema to
 * the current version. The caller owns *out and frees it with db_close().
 * Returns 0, or -1 with a message in err. */
int db_open(struct db **out, const char *path, char *err, size_t errlen);
/* How long calls on the caller's connection (all but db_instance_put) wait
 * for another process's lock before they fail as busy; 10 s after db_open.
 * The libuv loop sets it short: while it waits, nothing else on the loop
 * runs, /healthz included. */
void db_set_busy_timeout(struct db *db, int ms);
void db_close(struct db *db);

/* The schema version this build writes. */
int db_schema_version(void);

/* Records one instance durably: returns only after its row is committed.
 * When the SOP Instance UID was already indexed, the row is replaced in the
 * same commit and the file path it used to point to is copied to old_path
 * (size old_path_len; "" when the instance is new) so the caller can remove
 * that file afterwards. Returns 0; 1 when the instance is refused, nothing
 * written, because its UIDs conflict with what is stored (its series is in
 * another study, or its SOP instance in another series); -1 on a database
 * error. Both with a message in err. */
int db_instance_put(struct db *db, const struct db_instance *in, char *old_path,
                    size_t old_path_len, char *err, size_t errlen);

/* True when some row points to file_path (relative to the store directory). */
int db_file_is_indexed(struct db *db, const char *file_path, bool *out);

/* Counts, for status and tests. */
int db_count_instances(struct db *db, int64_t *out);

/* Runs PRAGMA integrity_check; 0 when it answers "ok". */
int db_integrity_check(struct db *db, char *err, size_t errlen);

#endif

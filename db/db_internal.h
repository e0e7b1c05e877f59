/* db/: what the module's files share and nobody else sees. */
#ifndef DB_INTERNAL_H
#define DB_INTERNAL_H

#include "db.h"

#include <sqlite3.h>

int db_migrate(sqlite3 *conn, char *err, size_t errlen);

struct db_worklist_row;

/* The worklist row of a study, shared by the worklist and the study view:
 * DB_ROW_COLUMNS (DB_ROW_NCOLS columns, from 0) selected FROM DB_ROW_JOINS,
 * read by db_row_fill (strings borrowed from the statement until its next
 * step). */
#define DB_ROW_NCOLS 24
#define DB_ROW_COLUMNS                                                                             \
    "st.study_uid, coalesce(rs.series_uid, ''), st.accession, p.patient_id,"                       \
    " p.patient_name, st.study_desc, st.status, st.status_reason,"                                 \
    " coalesce(r.model_version, ''), st.received_at, st.updated_at,"                               \
    " coalesce(r.slices, (SELECT sum(s.instance_count) FROM series s"                              \
    "   WHERE s.study_ref = st.id)),"                                                              \
    " st.probability, r.p_epidural, r.p_intraparenchymal, r.p_intraventricular,"                   \
    " r.p_subarachnoid, r.p_subdural, st.flagged, st.result_updates, p.specific_charset,"          \
    " coalesce(st.purged_at, 0), st.study_date, st.study_time"
#define DB_ROW_JOINS                                                                               \
    " FROM studies st JOIN patients p ON p.id = st.patient_ref"                                    \
    " LEFT JOIN series rs ON rs.id = st.result_series_ref"                                         \
    " LEFT JOIN results r ON r.series_ref = st.result_series_ref"
void db_row_fill(sqlite3_stmt *st, struct db_worklist_row *row);

/* What a reader is shown of a study (struct db_review_seen), as two
 * columns, for the study whose id is the SQL expression sid: its latest
 * review's id and its newest result's time, 0 when none. */
#define DB_STUDY_SEEN_COLUMNS(sid)                                                                 \
    " coalesce((SELECT max(sx.id) FROM reviews sx WHERE sx.study_ref = " sid "), 0),"              \
    " coalesce((SELECT max(sr.created_at) FROM results sr JOIN series ss"                          \
    "  ON ss.id = sr.series_ref WHERE ss.study_ref = " sid "), 0)"

/* The text of db_retention_due's listing (?1 updated before, ?2 reviewed
 * before, ?3 how many), for its query plan to be checked. */
void db_retention_due_sql(char *sql, size_t n);

/* Runs one statement whose parameters ?1, ?2, ... are given by fmt, one
 * character each: 'i' int64_t, 'd' double, 's' text (copied). Returns 0
 * when it ran (done or a row), -1 otherwise. */
int db_exec_bound(sqlite3 *c, const char *sql, const char *fmt, ...);
/* The same for a query: 0 when it gives a row, 1 when none, -1 on error. */
int db_row_exists(sqlite3 *c, const char *sql, const char *fmt, ...);
/* The same for a one-value query: its value in *out (0 when NULL or no
 * row). Returns 0, or -1 on error (sqlite3_errmsg(c) says which). */
int db_scalar(sqlite3 *c, int64_t *out, const char *sql, const char *fmt, ...);
/* Copies text column i into out (size n); NULL gives "". */
void db_col_copy(sqlite3_stmt *st, int i, char *out, size_t n);

/* The owner thread's connection of db. */
sqlite3 *db_conn(struct db *db);

/* Recomputes a study's status and result from its series (?1 = study id).
 * Order of precedence: reviewed, triaging, waiting, received (a series still
 * receiving), failed, triaged, not_applicable. A failed series outranks a
 * triaged one: a study with one series unread is not yet known, and unknown
 * is never listed as low (its probability, from the triaged series, stays).
 * Not reviewed once a series has a result stored after the review, or
 * failed after it, whenever its instances came: nobody has read that
 * result (a series still receiving, waiting or triaging when the review was
 * saved is as unread as a late one). The review stays, in reviews and
 * reviewed_at. The reason names each series it comes from, by its
 * description, or its number where the description is empty or not
 * printable ASCII (the index keeps descriptions in the study's character
 * set, and the reason is the node's own UTF-8 text). */
#define DB_STUDY_REFRESH_SQL                                                                       \
    "UPDATE studies SET status = CASE"                                                             \
    "  WHEN reviewed_at IS NOT NULL AND NOT EXISTS (SELECT 1 FROM series s"                        \
    "    LEFT JOIN results r ON r.series_ref = s.id WHERE s.study_ref = studies.id"                \
    "    AND (r.created_at > studies.reviewed_at OR (s.state = 'failed' AND EXISTS"                \
    "      (SELECT 1 FROM jobs j WHERE j.series_ref = s.id AND j.state = 'failed'"                 \
    "       AND j.finished_at > studies.reviewed_at))))"                                           \
    "    THEN 'reviewed'"                                                                          \
    "  WHEN EXISTS (SELECT 1 FROM series s WHERE s.study_ref = studies.id"                         \
    "    AND s.state = 'triaging') THEN 'triaging'"                                                \
    "  WHEN EXISTS (SELECT 1 FROM series s WHERE s.study_ref = studies.id"                         \
    "    AND s.state = 'waiting') THEN 'waiting'"                                                  \
    "  WHEN EXISTS (SELECT 1 FROM series s WHERE s.study_ref = studies.id"                         \
    "    AND s.state = 'receiving') THEN 'received'"                                               \
    "  WHEN EXISTS (SELECT 1 FROM series s WHERE s.study_ref = studies.id"                         \
    "    AND s.state = 'failed') THEN 'failed'"                                                    \
    "  WHEN EXISTS (SELECT 1 FROM series s WHERE s.study_ref = studies.id"                         \
    "    AND s.state = 'triaged') THEN 'triaged'"                                                  \
    "  ELSE 'not_applicable' END,"                                                                 \
    " probability = (SELECT max(r.p_any) FROM results r JOIN series s ON s.id = r.series_ref"      \
    "  WHERE s.study_ref = studies.id),"                                                           \
    " flagged = coalesce((SELECT max(r.flagged) FROM results r JOIN series s"                      \
    "  ON s.id = r.series_ref WHERE s.study_ref = studies.id), 0),"                                \
    " result_series_ref = (SELECT r.series_ref FROM results r JOIN series s"                       \
    "  ON s.id = r.series_ref WHERE s.study_ref = studies.id ORDER BY r.p_any DESC LIMIT 1),"      \
    " status_reason = coalesce((SELECT group_concat(named, '; ') FROM (SELECT"                     \
    "  CASE WHEN s.series_desc != '' AND s.series_desc NOT GLOB '*[^ -~]*' THEN s.series_desc"     \
    "  WHEN s.series_number IS NOT NULL THEN 'series ' || s.series_number"                         \
    "  ELSE 'series without number' END || ': ' || s.state_reason AS named FROM series s"          \
    "  WHERE s.study_ref = studies.id AND s.state_reason != ''"                                    \
    "  ORDER BY s.series_number, s.id)), '')"                                                      \
    " WHERE id = ?1"

#endif

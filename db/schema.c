/* db/schema.c: the schema and its versioned migrations. A database is at
 * version N when PRAGMA user_version = N; migrations[i] brings it from i to
 * i+1, each in one transaction. Never edit a released migration: add one.
 * Tests make older databases by undoing the latest migrations (test_db.c,
 * tests/pacs/test_queue_db.c, tests/pacs/test_pacs.py): a new migration
 * is undone there too. */
#include "db_backup.h"
#include "db_internal.h"

#include <stdio.h>

static const char *const migrations[] = {
    /* 0 -> 1: patients, studies, series, instances. */
    "CREATE TABLE patients ("
    "  id INTEGER PRIMARY KEY,"
    "  patient_id TEXT NOT NULL,"
    "  patient_name TEXT NOT NULL DEFAULT ''," /* as stored, see specific_charset */
    "  specific_charset TEXT NOT NULL DEFAULT '',"
    "  birth_date TEXT NOT NULL DEFAULT '',"
    "  sex TEXT NOT NULL DEFAULT '',"
    "  UNIQUE (patient_id, patient_name));"
    "CREATE TABLE studies ("
    "  id INTEGER PRIMARY KEY,"
    "  study_uid TEXT NOT NULL UNIQUE,"
    "  patient_ref INTEGER NOT NULL REFERENCES patients(id),"
    "  accession TEXT NOT NULL DEFAULT '',"
    "  study_id TEXT NOT NULL DEFAULT '',"
    "  study_date TEXT NOT NULL DEFAULT '',"
    "  study_time TEXT NOT NULL DEFAULT '',"
    "  study_desc TEXT NOT NULL DEFAULT '',"
    "  received_at INTEGER NOT NULL," /* ms since the epoch, first instance */
    "  updated_at INTEGER NOT NULL);"
    "CREATE TABLE series ("
    "  id INTEGER PRIMARY KEY,"
    "  series_uid TEXT NOT NULL UNIQUE,"
    "  study_ref INTEGER NOT NULL REFERENCES studies(id),"
    "  modality TEXT NOT NULL DEFAULT '',"
    "  body_part TEXT NOT NULL DEFAULT '',"
    "  series_number INTEGER,"
    "  series_desc TEXT NOT NULL DEFAULT '',"
    "  frame_of_ref_uid TEXT NOT NULL DEFAULT '',"
    "  convolution_kernel TEXT NOT NULL DEFAULT '',"
    "  manufacturer TEXT NOT NULL DEFAULT '',"
    "  station_name TEXT NOT NULL DEFAULT '',"
    "  instance_count INTEGER NOT NULL DEFAULT 0,"
    "  expected_count INTEGER NOT NULL DEFAULT 0," /* Images in Acquisition, 0 unknown */
    "  first_instance_at INTEGER NOT NULL,"
    "  last_instance_at INTEGER NOT NULL,"
    /* receiving: instances arriving; later states belong to triage. */
    "  state TEXT NOT NULL DEFAULT 'receiving',"
    "  state_reason TEXT NOT NULL DEFAULT '');"
    "CREATE INDEX series_study ON series(study_ref);"
    "CREATE INDEX series_state ON series(state, last_instance_at);"
    "CREATE TABLE instances ("
    "  id INTEGER PRIMARY KEY,"
    "  sop_uid TEXT NOT NULL UNIQUE,"
    "  series_id INTEGER NOT NULL REFERENCES series(id),"
    "  sop_class TEXT NOT NULL,"
    "  transfer_syntax TEXT NOT NULL,"
    "  image_type TEXT NOT NULL DEFAULT '',"
    "  instance_number INTEGER,"
    "  rows INTEGER NOT NULL DEFAULT 0,"
    "  columns INTEGER NOT NULL DEFAULT 0,"
    "  frames INTEGER NOT NULL DEFAULT 1,"
    "  pixel_spacing_row REAL, pixel_spacing_col REAL,"
    "  slice_thickness REAL,"
    "  position_x REAL, position_y REAL, position_z REAL,"
    "  orientation TEXT NOT NULL DEFAULT ''," /* six values, backslash-separated */
    "  rescale_slope REAL NOT NULL DEFAULT 1,"
    "  rescale_intercept REAL NOT NULL DEFAULT 0,"
    "  file_path TEXT NOT NULL UNIQUE," /* relative to store.dir */
    "  file_size INTEGER NOT NULL,"
    "  calling_ae TEXT NOT NULL DEFAULT '',"
    "  peer_addr TEXT NOT NULL DEFAULT '',"
    "  received_at INTEGER NOT NULL);"
    "CREATE INDEX instances_series ON instances(series_id);",

    /* 1 -> 2: triage. Series states: receiving, waiting, triaging, triaged,
     * not_applicable, failed. content_key names the instances a decision
     * was made on, so the same content is never triaged twice. */
    "ALTER TABLE series ADD COLUMN content_key TEXT NOT NULL DEFAULT '';"
    "ALTER TABLE series ADD COLUMN completed_at INTEGER;"
    "ALTER TABLE series ADD COLUMN triage_count INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE studies ADD COLUMN status TEXT NOT NULL DEFAULT 'received';"
    "ALTER TABLE studies ADD COLUMN status_reason TEXT NOT NULL DEFAULT '';"
    "ALTER TABLE studies ADD COLUMN probability REAL;"
    "ALTER TABLE studies ADD COLUMN flagged INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE studies ADD COLUMN result_series_ref INTEGER;"
    "ALTER TABLE studies ADD COLUMN result_updates INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE studies ADD COLUMN reviewed_at INTEGER;"
    "CREATE INDEX studies_status ON studies(status);"
    "CREATE TABLE jobs ("
    "  id INTEGER PRIMARY KEY,"
    "  series_ref INTEGER NOT NULL REFERENCES series(id),"
    "  content_key TEXT NOT NULL,"
    "  state TEXT NOT NULL DEFAULT 'queued'," /* queued, running, done, failed, superseded */
    "  created_at INTEGER NOT NULL,"
    "  started_at INTEGER,"
    "  finished_at INTEGER,"
    "  error TEXT NOT NULL DEFAULT '');"
    "CREATE INDEX jobs_state ON jobs(state, id);"
    "CREATE TABLE results ("
    "  series_ref INTEGER PRIMARY KEY REFERENCES series(id),"
    "  content_key TEXT NOT NULL,"
    "  model_version TEXT NOT NULL,"
    "  p_any REAL NOT NULL, p_epidural REAL NOT NULL, p_intraparenchymal REAL NOT NULL,"
    "  p_intraventricular REAL NOT NULL, p_subarachnoid REAL NOT NULL,"
    "  p_subdural REAL NOT NULL,"
    "  flagged INTEGER NOT NULL,"
    "  slices INTEGER NOT NULL,"
    "  key_index INTEGER NOT NULL,"
    "  key_sop TEXT NOT NULL,"
    "  note TEXT NOT NULL DEFAULT '',"
    "  ms_pixels REAL, ms_model REAL, ms_total REAL,"
    "  created_at INTEGER NOT NULL);"
    "CREATE TABLE slice_results ("
    "  series_ref INTEGER NOT NULL REFERENCES series(id),"
    "  idx INTEGER NOT NULL,"
    "  sop_uid TEXT NOT NULL,"
    "  frame INTEGER NOT NULL,"
    "  p_any REAL NOT NULL, p_epidural REAL NOT NULL, p_intraparenchymal REAL NOT NULL,"
    "  p_intraventricular REAL NOT NULL, p_subarachnoid REAL NOT NULL,"
    "  p_subdural REAL NOT NULL,"
    "  PRIMARY KEY (series_ref, idx));",

    /* 2 -> 3: the web worklist. reviews: the radiologists' findings (the
     * retraining labels), subtypes comma-separated names; claims: who is
     * reading a study now; audit: who opened and who reviewed which study. */
    "CREATE TABLE reviews ("
    "  id INTEGER PRIMARY KEY,"
    "  study_ref INTEGER NOT NULL REFERENCES studies(id),"
    "  hemorrhage INTEGER NOT NULL,"
    "  subtypes TEXT NOT NULL DEFAULT '',"
    "  comment TEXT NOT NULL DEFAULT '',"
    "  reviewer TEXT NOT NULL,"
    "  created_at INTEGER NOT NULL);"
    "CREATE INDEX reviews_study ON reviews(study_ref, created_at);"
    "CREATE TABLE claims ("
    "  study_ref INTEGER PRIMARY KEY REFERENCES studies(id),"
    "  reader TEXT NOT NULL,"
    "  claimed_at INTEGER NOT NULL);"
    "CREATE TABLE audit ("
    "  id INTEGER PRIMARY KEY,"
    "  at INTEGER NOT NULL,"
    "  user TEXT NOT NULL,"
    "  action TEXT NOT NULL," /* docs/web.md lists them: opened, reviewed, claimed, ... */
    "  study_uid TEXT NOT NULL DEFAULT '',"
    "  detail TEXT NOT NULL DEFAULT '');",

    /* 3 -> 4: results to PACS (db/outbox.c). A revision is one study result to
     * report; its deliveries are its SR and SC files, one row per
     * destination. Results that existed before are marked skipped: the node
     * does not send old results the day it is upgraded. */
    "CREATE TABLE pacs_revisions ("
    "  id INTEGER PRIMARY KEY,"
    "  study_ref INTEGER NOT NULL REFERENCES studies(id),"
    "  series_ref INTEGER NOT NULL REFERENCES series(id),"
    "  result_at INTEGER NOT NULL," /* results.created_at of the result reported */
    "  revision INTEGER NOT NULL,"  /* 1, 2, ... per study; 0 for skipped old results */
    "  state TEXT NOT NULL,"        /* pending, ready, skipped, failed */
    "  reason TEXT NOT NULL DEFAULT '',"
    "  created_at INTEGER NOT NULL,"
    "  UNIQUE (series_ref, result_at));"
    "CREATE TABLE pacs_deliveries ("
    "  id INTEGER PRIMARY KEY,"
    "  revision_ref INTEGER NOT NULL REFERENCES pacs_revisions(id),"
    "  destination TEXT NOT NULL," /* as configured: [tls:]AET@host:port */
    "  object TEXT NOT NULL,"      /* sr, sc */
    "  file_path TEXT NOT NULL,"   /* relative to store.dir */
    "  sop_uid TEXT NOT NULL,"
    "  state TEXT NOT NULL DEFAULT 'pending'," /* pending, sent, failed */
    "  attempts INTEGER NOT NULL DEFAULT 0,"
    "  next_attempt_at INTEGER NOT NULL,"
    "  last_attempt_at INTEGER,"
    "  last_error TEXT NOT NULL DEFAULT '',"
    "  sent_at INTEGER,"
    "  UNIQUE (revision_ref, destination, object));"
    "CREATE INDEX pacs_deliveries_due ON pacs_deliveries(state, next_attempt_at);"
    "INSERT INTO pacs_revisions (study_ref, series_ref, result_at, revision, state, reason,"
    "  created_at) SELECT s.study_ref, r.series_ref, r.created_at, 0, 'skipped',"
    "  'result older than PACS delivery', r.created_at FROM results r"
    "  JOIN series s ON s.id = r.series_ref;",

    /* 4 -> 5: retention. purged_at: when the study's spool files and
     * instance rows were removed (its worklist row, results and reviews stay). */
    "ALTER TABLE studies ADD COLUMN purged_at INTEGER;",

    /* 5 -> 6: results to PACS: the SR each revision sent, so that the next
     * revision's SR names it in its Predecessor Documents Sequence. */
    "ALTER TABLE pacs_revisions ADD COLUMN sr_series_uid TEXT NOT NULL DEFAULT '';"
    "ALTER TABLE pacs_revisions ADD COLUMN sr_sop_uid TEXT NOT NULL DEFAULT '';",

    /* 6 -> 7: the slices a reviewer marked as showing the bleed ("sop/frame"
     * entries, comma-separated): certain slice labels for retraining. */
    "ALTER TABLE reviews ADD COLUMN slices TEXT NOT NULL DEFAULT '';",

    /* 7 -> 8: the SHA-256 of each instance's dataset as it was sent. A copy
     * re-sent with the same bytes keeps its received_at (its triage result
     * and slice images stay valid) and its series' content key; one with
     * other bytes, even of the same size, changes both. '' for instances
     * stored before: their size stands in. */
    "ALTER TABLE instances ADD COLUMN content_digest TEXT NOT NULL DEFAULT '';",

    /* 8 -> 9: when a revision that could not be built was given up (the
     * page's banner and /healthz say so for a day, as for deliveries). NULL
     * for revisions failed before. */
    "ALTER TABLE pacs_revisions ADD COLUMN failed_at INTEGER;"
    /* and the audit by study: an opening is recorded once per person in a
     * window (db_audit_opened), which looks for the last one. */
    "CREATE INDEX audit_study ON audit(study_uid, at);",

    /* 9 -> 10: results to PACS: a result may be reported again in a later
     * revision (a re-triage moved the study's result back to a series
     * whose result an earlier revision sent), so one revision per result
     * (UNIQUE (series_ref, result_at)) no more. SQLite cannot drop a
     * constraint: both outbox tables are copied anew, ids kept (deliveries
     * refer to revisions, so they move with them). The sender looks for a
     * study's newest revision: indexed by study. */
    "CREATE TABLE pacs_revisions_new ("
    "  id INTEGER PRIMARY KEY,"
    "  study_ref INTEGER NOT NULL REFERENCES studies(id),"
    "  series_ref INTEGER NOT NULL REFERENCES series(id),"
    "  result_at INTEGER NOT NULL," /* results.created_at of the result reported */
    "  revision INTEGER NOT NULL,"  /* 1, 2, ... per study; 0 for skipped ones */
    "  state TEXT NOT NULL,"        /* pending, ready, skipped, failed */
    "  reason TEXT NOT NULL DEFAULT '',"
    "  created_at INTEGER NOT NULL,"
    "  sr_series_uid TEXT NOT NULL DEFAULT '',"
    "  sr_sop_uid TEXT NOT NULL DEFAULT '',"
    "  failed_at INTEGER);"
    "INSERT INTO pacs_revisions_new (id, study_ref, series_ref, result_at, revision, state,"
    "  reason, created_at, sr_series_uid, sr_sop_uid, failed_at)"
    "  SELECT id, study_ref, series_ref, result_at, revision, state, reason, created_at,"
    "  sr_series_uid, sr_sop_uid, failed_at FROM pacs_revisions;"
    "CREATE TABLE pacs_deliveries_new ("
    "  id INTEGER PRIMARY KEY,"
    "  revision_ref INTEGER NOT NULL REFERENCES pacs_revisions_new(id),"
    "  destination TEXT NOT NULL,"
    "  object TEXT NOT NULL,"
    "  file_path TEXT NOT NULL,"
    "  sop_uid TEXT NOT NULL,"
    "  state TEXT NOT NULL DEFAULT 'pending',"
    "  attempts INTEGER NOT NULL DEFAULT 0,"
    "  next_attempt_at INTEGER NOT NULL,"
    "  last_attempt_at INTEGER,"
    "  last_error TEXT NOT NULL DEFAULT '',"
    "  sent_at INTEGER,"
    "  UNIQUE (revision_ref, destination, object));"
    "INSERT INTO pacs_deliveries_new SELECT id, revision_ref, destination, object, file_path,"
    "  sop_uid, state, attempts, next_attempt_at, last_attempt_at, last_error, sent_at"
    "  FROM pacs_deliveries;"
    "DROP TABLE pacs_deliveries;"
    "DROP TABLE pacs_revisions;"
    /* renames the deliveries' reference with it */
    "ALTER TABLE pacs_revisions_new RENAME TO pacs_revisions;"
    "ALTER TABLE pacs_deliveries_new RENAME TO pacs_deliveries;"
    "CREATE INDEX pacs_deliveries_due ON pacs_deliveries(state, next_attempt_at);"
    "CREATE INDEX pacs_revisions_study ON pacs_revisions(study_ref, id);",

    /* 10 -> 11: a series that held more instances than its expected count
     * (Images in Acquisition) at some time is complete only after the
     * quiet period (db_series_due): with several acquisitions the count
     * passes through the next one's larger expected count part-way. */
    "ALTER TABLE series ADD COLUMN past_expected INTEGER NOT NULL DEFAULT 0;"
    "UPDATE series SET past_expected = 1 WHERE expected_count > 0"
    "  AND instance_count > expected_count;",

    /* 11 -> 12: how many times the node stopped (a crash, a kill) while a
     * job ran: one that brings the node down fails after a few, instead of
     * being claimed first after every restart (db_jobs_requeue). */
    "ALTER TABLE jobs ADD COLUMN stops INTEGER NOT NULL DEFAULT 0;",

    /* 12 -> 13: per-slice results by instance. The slice image asks
     * whether a slice has a result (db_slice_has_result) by its SOP
     * Instance UID; without this each request for a slice without one read
     * every row (0.37 s on the loop at 3 million). They are kept after
     * retention with their study's result (the study page shows them). */
    "CREATE INDEX slice_results_sop ON slice_results(sop_uid, frame);",

    /* 13 -> 14: the studies retention may purge (db_retention_due) by when
     * they last changed, oldest first, among those not yet purged. Without
     * it each batch of a few studies read and sorted every study not yet
     * purged, correlated subqueries and all (0.7 s on the loop at 300,000,
     * per batch of 4). */
    "CREATE INDEX studies_retention ON studies(updated_at) WHERE purged_at IS NULL;",

    /* 14 -> 15: the open worklist's age window (db_worklist_hidden) counts
     * the studies that need no action by status, flag and last change (a
     * new instance or result); without it each count read every triaged
     * study's row, and the window leaves more of them out each day. */
    "CREATE INDEX studies_open ON studies(status, flagged, updated_at);",
};

int db_schema_version(void)
{
    return (int)(sizeof migrations / sizeof migrations[0]);
}

static int user_version(sqlite3 *conn, int *version)
{
    sqlite3_stmt *st = NULL;
    *version = 0;
    if (sqlite3_prepare_v2(conn, "PRAGMA user_version", -1, &st, NULL) != SQLITE_OK) return -1;
    if (sqlite3_step(st) == SQLITE_ROW) *version = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    return 0;
}

int db_migrate(sqlite3 *conn, char *err, size_t errlen)
{
    int version = 0;
    if (user_version(conn, &version) != 0) goto fail;
    if (version > db_schema_version()) {
        snprintf(err, errlen, "database schema version %d is newer than this build (%d)", version,
                 db_schema_version());
        return -1;
    }
    /* An existing database is copied before it changes, so a failed or
     * regretted migration can be undone by hand. */
    if (version > 0 && version < db_schema_version() &&
        db_backup_before_migration(conn, version, err, errlen) != 0)
        return -1;
    for (int v = version; v < db_schema_version(); v++) {
        char pragma[64];
        snprintf(pragma, sizeof pragma, "PRAGMA user_version = %d", v + 1);
        if (sqlite3_exec(conn, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) goto fail;
        /* Read again under the write lock: another process (a train run
         * and a newly upgraded node, say) may have migrated meanwhile, and
         * a step applied twice fails ("duplicate column"). */
        int now = v;
        if (user_version(conn, &now) != 0 || now != v) {
            sqlite3_exec(conn, "COMMIT", NULL, NULL, NULL);
            if (now == v) goto fail;
            if (now > db_schema_version()) {
                snprintf(err, errlen, "database schema version %d is newer than this build (%d)",
                         now, db_schema_version());
                return -1;
            }
            v = now - 1; /* on from where it is */
            continue;
        }
        if (sqlite3_exec(conn, migrations[v], NULL, NULL, NULL) != SQLITE_OK ||
            sqlite3_exec(conn, pragma, NULL, NULL, NULL) != SQLITE_OK) {
            snprintf(err, errlen, "migration %d -> %d failed: %s", v, v + 1, sqlite3_errmsg(conn));
            sqlite3_exec(conn, "ROLLBACK", NULL, NULL, NULL);
            return -1;
        }
        if (sqlite3_exec(conn, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) goto fail;
    }
    return 0;
fail:
    snprintf(err, errlen, "schema: %s", sqlite3_errmsg(conn));
    return -1;
}

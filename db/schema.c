/* db/schema.c: the schema and its versioned migrations. A database is at
 * version N when PRAGMA user_version = N; migrations[i] brings it from i to
 * i+1, each in one transaction. Never edit a released migration: add one. */
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
};

int db_schema_version(void)
{
    return (int)(sizeof migrations / sizeof migrations[0]);
}

int db_migrate(sqlite3 *conn, char *err, size_t errlen)
{
    sqlite3_stmt *st = NULL;
    int version = 0;
    if (sqlite3_prepare_v2(conn, "PRAGMA user_version", -1, &st, NULL) != SQLITE_OK) goto fail;
    if (sqlite3_step(st) == SQLITE_ROW) version = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    if (version > db_schema_version()) {
        snprintf(err, errlen, "database schema version %d is newer than this build (%d)", version,
                 db_schema_version());
        return -1;
    }
    for (int v = version; v < db_schema_version(); v++) {
        char pragma[64];
        snprintf(pragma, sizeof pragma, "PRAGMA user_version = %d", v + 1);
        if (sqlite3_exec(conn, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) goto fail;
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

/* db/instances.c: recording a received instance with its patient, study and
 * series, replacing an earlier copy of the same SOP instance in place. */
#include "db_put.h"

#include <stdio.h>
#include <string.h>

static const char *sql_patient =
    "INSERT INTO patients (patient_id, patient_name, specific_charset, birth_date, sex)"
    " VALUES (?1, ?2, ?3, ?4, ?5)"
    " ON CONFLICT (patient_id, patient_name) DO UPDATE SET"
    "  specific_charset = excluded.specific_charset,"
    "  birth_date = excluded.birth_date, sex = excluded.sex"
    " RETURNING id";

static const char *sql_study =
    "INSERT INTO studies (study_uid, patient_ref, accession, study_id, study_date, study_time,"
    "  study_desc, received_at, updated_at)"
    " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)"
    " ON CONFLICT (study_uid) DO UPDATE SET updated_at = excluded.updated_at,"
    /* The patient as the newest instance names it: a re-send with a
     * corrected name or ID (an unknown trauma patient reconciled) shows
     * the correction; it had kept the first name for good. */
    "  patient_ref = excluded.patient_ref,"
    /* Sent again after retention purged it: its new files are kept, and
     * go, by the same rule as any others. */
    "  purged_at = NULL"
    " RETURNING id";

/* A new instance re-opens its series: completion is decided again. Its
 * Images in Acquisition raises the expected count in sql_recount, which
 * needs the count it had before. */
static const char *sql_series =
    "INSERT INTO series (series_uid, study_ref, modality, body_part, series_number,"
    "  series_desc, frame_of_ref_uid, convolution_kernel, manufacturer, station_name,"
    "  expected_count, first_instance_at, last_instance_at)"
    " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12)"
    " ON CONFLICT (series_uid) DO UPDATE SET"
    /* the latest arrival's time, not the largest: after the wall clock
     * went back, a value from before the step would stay ahead of every
     * later instance (and the quiet period be judged from it) */
    "  last_instance_at = excluded.last_instance_at,"
    "  state = 'receiving', state_reason = ''"
    " RETURNING id, study_ref";

static const char *sql_old = "SELECT file_path, series_id FROM instances WHERE sop_uid = ?1";

static const char *sql_instance =
    "INSERT INTO instances (sop_uid, series_id, sop_class, transfer_syntax, image_type,"
    "  instance_number, rows, columns, frames, pixel_spacing_row, pixel_spacing_col,"
    "  slice_thickness, position_x, position_y, position_z, orientation, rescale_slope,"
    "  rescale_intercept, file_path, file_size, calling_ae, peer_addr, received_at,"
    "  content_digest)"
    " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,"
    "  ?18, ?19, ?20, ?21, ?22, ?23, ?24)"
    " ON CONFLICT (sop_uid) DO UPDATE SET"
    "  series_id = excluded.series_id, sop_class = excluded.sop_class,"
    "  transfer_syntax = excluded.transfer_syntax, image_type = excluded.image_type,"
    "  instance_number = excluded.instance_number, rows = excluded.rows,"
    "  columns = excluded.columns, frames = excluded.frames,"
    "  pixel_spacing_row = excluded.pixel_spacing_row,"
    "  pixel_spacing_col = excluded.pixel_spacing_col,"
    "  slice_thickness = excluded.slice_thickness, position_x = excluded.position_x,"
    "  position_y = excluded.position_y, position_z = excluded.position_z,"
    "  orientation = excluded.orientation, rescale_slope = excluded.rescale_slope,"
    "  rescale_intercept = excluded.rescale_intercept, file_path = excluded.file_path,"
    "  file_size = excluded.file_size, calling_ae = excluded.calling_ae,"
    "  peer_addr = excluded.peer_addr,"
    /* The same bytes again: still the copy that was triaged (SET reads the
     * old row's values). */
    "  received_at = CASE WHEN content_digest != '' AND"
    "   content_digest = excluded.content_digest THEN received_at"
    "   ELSE excluded.received_at END,"
    "  content_digest = excluded.content_digest";

/* A series holding more instances than its expected count (several
 * acquisitions) is marked past_expected before ?2, this instance's Images in
 * Acquisition, raises that count: a later acquisition's larger count is
 * reached part-way, and must not complete it (db_series_due). SET reads
 * the row as it was. */
static const char *sql_recount =
    "UPDATE series SET instance_count = c.n,"
    " past_expected = past_expected OR (expected_count > 0 AND c.n > expected_count),"
    " expected_count = max(expected_count, ?2)"
    " FROM (SELECT count(*) AS n FROM instances WHERE series_id = ?1) AS c"
    " WHERE series.id = ?1";

int db_put_prepare(struct db_put_stmts *s, sqlite3 *conn, char *err, size_t errlen)
{
    memset(s, 0, sizeof *s);
    const char *sql[] = {sql_patient,  sql_study,   sql_series,          sql_old,
                         sql_instance, sql_recount, DB_STUDY_REFRESH_SQL};
    sqlite3_stmt **st[] = {&s->patient,  &s->study,   &s->series, &s->old,
                           &s->instance, &s->recount, &s->refresh};
    for (size_t i = 0; i < sizeof sql / sizeof sql[0]; i++) {
        if (sqlite3_prepare_v3(conn, sql[i], -1, SQLITE_PREPARE_PERSISTENT, st[i], NULL) !=
            SQLITE_OK) {
            snprintf(err, errlen, "prepare: %s", sqlite3_errmsg(conn));
            db_put_finalize(s);
            return -1;
        }
    }
    return 0;
}

void db_put_finalize(struct db_put_stmts *s)
{
    sqlite3_finalize(s->patient);
    sqlite3_finalize(s->study);
    sqlite3_finalize(s->series);
    sqlite3_finalize(s->old);
    sqlite3_finalize(s->instance);
    sqlite3_finalize(s->recount);
    sqlite3_finalize(s->refresh);
    memset(s, 0, sizeof *s);
}

static void bind_str(sqlite3_stmt *st, int i, const char *v)
{
    sqlite3_bind_text(st, i, v ? v : "", -1, SQLITE_STATIC);
}

static void bind_opt_int(sqlite3_stmt *st, int i, int v)
{
    if (v < 0)
        sqlite3_bind_null(st, i);
    else
        sqlite3_bind_int(st, i, v);
}

static void bind_opt_double(sqlite3_stmt *st, int i, bool has, double v)
{
    if (has)
        sqlite3_bind_double(st, i, v);
    else
        sqlite3_bind_null(st, i);
}

/* Steps a statement that returns one id (and, with id2, a second one). */
static int step_ids(sqlite3_stmt *st, int64_t *id, int64_t *id2)
{
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) *id = sqlite3_column_int64(st, 0);
    if (rc == SQLITE_ROW && id2) *id2 = sqlite3_column_int64(st, 1);
    int done = rc == SQLITE_ROW ? sqlite3_step(st) : rc;
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc == SQLITE_ROW && done == SQLITE_DONE ? 0 : -1;
}

static int step_id(sqlite3_stmt *st, int64_t *id)
{
    return step_ids(st, id, NULL);
}

static int step_done(sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc == SQLITE_DONE ? 0 : -1;
}

/* expected: the Images in Acquisition of the instance just stored, 0 when
 * none (or for the series an instance left). */
static int recount(struct db_put_stmts *s, int64_t series_id, int expected)
{
    sqlite3_bind_int64(s->recount, 1, series_id);
    sqlite3_bind_int(s->recount, 2, expected);
    return step_done(s->recount);
}

int db_put_one(struct db_put_stmts *s, const struct db_instance *in, char *old_path,
               size_t old_path_len, char *err, size_t errlen)
{
    sqlite3 *conn = sqlite3_db_handle(s->patient);
    int64_t patient = 0, study = 0, series = 0, old_series = 0;

    sqlite3_stmt *st = s->patient;
    bind_str(st, 1, in->patient_id);
    bind_str(st, 2, in->patient_name);
    bind_str(st, 3, in->specific_charset);
    bind_str(st, 4, in->patient_birth_date);
    bind_str(st, 5, in->patient_sex);
    if (step_id(st, &patient) != 0) goto fail;

    st = s->study;
    bind_str(st, 1, in->study_uid);
    sqlite3_bind_int64(st, 2, patient);
    bind_str(st, 3, in->accession);
    bind_str(st, 4, in->study_id);
    bind_str(st, 5, in->study_date);
    bind_str(st, 6, in->study_time);
    bind_str(st, 7, in->study_desc);
    sqlite3_bind_int64(st, 8, in->received_at_ms);
    if (step_id(st, &study) != 0) goto fail;

    st = s->series;
    bind_str(st, 1, in->series_uid);
    sqlite3_bind_int64(st, 2, study);
    bind_str(st, 3, in->modality);
    bind_str(st, 4, in->body_part);
    bind_opt_int(st, 5, in->series_number);
    bind_str(st, 6, in->series_desc);
    bind_str(st, 7, in->frame_of_ref_uid);
    bind_str(st, 8, in->convolution_kernel);
    bind_str(st, 9, in->manufacturer);
    bind_str(st, 10, in->station_name);
    int expected = in->images_in_acquisition > 0 ? in->images_in_acquisition : 0;
    sqlite3_bind_int(st, 11, expected);
    sqlite3_bind_int64(st, 12, in->received_at_ms);
    int64_t series_study = 0;
    if (step_ids(st, &series, &series_study) != 0) goto fail;
    /* UIDs are unique: a series already in another study, or an instance
     * already in another series, is a sender's error, refused (rolled back
     * by the caller). Merged, one patient's slices were counted, triaged
     * and shown in another's study, or taken from it. */
    if (series_study != study) {
        snprintf(err, errlen, "series %s is already stored in another study", in->series_uid);
        return 1;
    }

    st = s->old;
    bind_str(st, 1, in->sop_uid);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        snprintf(old_path, old_path_len, "%s", (const char *)sqlite3_column_text(st, 0));
        old_series = sqlite3_column_int64(st, 1);
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) goto fail;
    if (old_series && old_series != series) {
        snprintf(err, errlen, "SOP instance %s is already stored in another series", in->sop_uid);
        if (old_path_len) old_path[0] = 0;
        return 1;
    }

    char orient[160] = "";
    if (in->has_orientation)
        snprintf(orient, sizeof orient, "%.9g\\%.9g\\%.9g\\%.9g\\%.9g\\%.9g", in->orientation[0],
                 in->orientation[1], in->orientation[2], in->orientation[3], in->orientation[4],
                 in->orientation[5]);
    st = s->instance;
    bind_str(st, 1, in->sop_uid);
    sqlite3_bind_int64(st, 2, series);
    bind_str(st, 3, in->sop_class);
    bind_str(st, 4, in->transfer_syntax);
    bind_str(st, 5, in->image_type);
    bind_opt_int(st, 6, in->instance_number);
    sqlite3_bind_int(st, 7, in->rows);
    sqlite3_bind_int(st, 8, in->columns);
    sqlite3_bind_int(st, 9, in->number_of_frames > 0 ? in->number_of_frames : 1);
    bind_opt_double(st, 10, in->has_pixel_spacing, in->pixel_spacing[0]);
    bind_opt_double(st, 11, in->has_pixel_spacing, in->pixel_spacing[1]);
    bind_opt_double(st, 12, in->slice_thickness > 0, in->slice_thickness);
    bind_opt_double(st, 13, in->has_position, in->position[0]);
    bind_opt_double(st, 14, in->has_position, in->position[1]);
    bind_opt_double(st, 15, in->has_position, in->position[2]);
    bind_str(st, 16, orient);
    sqlite3_bind_double(st, 17, in->rescale_slope);
    sqlite3_bind_double(st, 18, in->rescale_intercept);
    bind_str(st, 19, in->file_path);
    sqlite3_bind_int64(st, 20, in->file_size);
    bind_str(st, 21, in->calling_ae);
    bind_str(st, 22, in->peer_addr);
    sqlite3_bind_int64(st, 23, in->received_at_ms);
    bind_str(st, 24, in->content_digest);
    if (step_done(st) != 0) goto fail;

    if (recount(s, series, expected) != 0) goto fail;
    /* A new instance may re-open a triaged series: the study shows it. */
    sqlite3_bind_int64(s->refresh, 1, study);
    if (step_done(s->refresh) != 0) goto fail;
    return 0;
fail:
    snprintf(err, errlen, "index: %s", sqlite3_errmsg(conn));
    if (old_path_len) old_path[0] = 0;
    return -1;
}

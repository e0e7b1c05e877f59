/* Worklist rows as JSON and text, one shape for `ichtriage worklist`,
 * `ichtriage predict` and the HTTP API: the field names of design.md
 * (study_uid, series_uid, accession, patient_id, patient_name, received_at,
 * updated_at, slices, probability, subtypes, flagged, status, model_version),
 * and the study's date (study_date, study_time, study_datetime, prior). */
#ifndef TRIAGE_ROWS_H
#define TRIAGE_ROWS_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "db_triage.h"

/* A new JSON object for row; the caller owns it (cJSON_Delete). NULL when
 * out of memory. Names and descriptions come out in UTF-8, converted from
 * the row's Specific Character Set. */
cJSON *triage_row_json(const struct db_worklist_row *row);

/* Adds key with value (a DICOM string as stored) converted from charset,
 * the study's Specific Character Set, to UTF-8; bytes that are not UTF-8
 * after that (a value not in its declared set) become '?'. */
void triage_json_add_text(cJSON *o, const char *key, const char *value, const char *charset,
                          int person_name);
/* Adds key with value, text of the node's own (reasons, notes, user names,
 * model versions), with every byte that is not well-formed UTF-8 as '?'. */
void triage_json_add_utf8(cJSON *o, const char *key, const char *value);

/* A study is a prior (an old study sent again, not a new one) when its
 * date is more than this many days before its arrival. */
#define TRIAGE_PRIOR_DAYS 2

/* The study's StudyDate and StudyTime (DA, TM as stored) as ISO-8601
 * without a zone, the scanner's local time: "2020-12-12T11:23:41", or
 * "2020-12-12" when the time is missing or not a time; *at_s the same in
 * seconds since the epoch, read as UTC (the day's last second without a
 * time). Returns 0, or -1 (iso "") when date is not a date. */
int triage_study_when(const char *date, const char *time, char *iso, size_t n, int64_t *at_s);
/* Whether row's study is a prior: its date more than TRIAGE_PRIOR_DAYS
 * before it arrived, whatever the scanner's time zone. */
bool triage_row_prior(const struct db_worklist_row *row);

/* The open list's age window (http.worklist_days): the studies that need
 * no action (triaged and not flagged, not applicable) that last changed
 * before the time returned, days before now_ms, leave the open list
 * (db_worklist's since_ms). 0, no window, when days is 0. */
int64_t triage_worklist_since(int64_t now_ms, int64_t days);

/* ISO-8601 UTC ("2026-11-29T20:06:52Z") of Unix milliseconds into out. */
void triage_iso_time(int64_t ms, char *out, size_t n);

/* One line for a terminal: rank, a FLAG marker (not only colour), the
 * probability, status, age and identifiers. Patient names are not printed:
 * terminals end up in logs. */
void triage_row_print(FILE *f, int rank, const struct db_worklist_row *row, int64_t now_ms);
void triage_row_print_header(FILE *f);

#endif

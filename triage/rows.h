/* Worklist rows as JSON and text, one shape for `ichtriage worklist`,
 * `ichtriage predict` and the HTTP API: the field names of design.md
 * (study_uid, series_uid, accession, patient_id, patient_name, received_at,
 * updated_at, slices, probability, subtypes, flagged, status, model_version). */
#ifndef TRIAGE_ROWS_H
#define TRIAGE_ROWS_H

#include <cjson/cJSON.h>
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

/* ISO-8601 UTC ("2026-11-29T20:06:52Z") of Unix milliseconds into out. */
void triage_iso_time(int64_t ms, char *out, size_t n);

/* One line for a terminal: rank, a FLAG marker (not only colour), the
 * probability, status, age and identifiers. Patient names are not printed:
 * terminals end up in logs. */
void triage_row_print(FILE *f, int rank, const struct db_worklist_row *row, int64_t now_ms);
void triage_row_print_header(FILE *f);

#endif

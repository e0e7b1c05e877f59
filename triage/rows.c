/* triage/rows.c: worklist rows as JSON (cJSON) and as text. */
#include "rows.h"

#include <string.h>
#include <time.h>

#include "scp_charset.h"

static const char *const subtype_names[DB_LABELS - 1] = {
    "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"};

void triage_iso_time(int64_t ms, char *out, size_t n)
{
    time_t s = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&s, &tm);
    strftime(out, n, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* Adds key with value converted from the study's Specific Character Set
 * to UTF-8 (plain ASCII needs nothing). */
static void add_text(cJSON *o, const char *key, const char *value, const char *charset,
                     int person_name)
{
    const char *v = value ? value : "";
    const char *p = v;
    while (*p && (unsigned char)*p < 0x80 && *p != 0x1B)
        p++;
    if (!*p) {
        cJSON_AddStringToObject(o, key, v);
        return;
    }
    char utf8[1024];
    scp_charset_to_utf8(charset ? charset : "", v, person_name, utf8, sizeof utf8);
    cJSON_AddStringToObject(o, key, utf8);
}

cJSON *triage_row_json(const struct db_worklist_row *r)
{
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    char when[32];
    cJSON_AddStringToObject(o, "study_uid", r->study_uid ? r->study_uid : "");
    cJSON_AddStringToObject(o, "series_uid", r->series_uid ? r->series_uid : "");
    cJSON_AddStringToObject(o, "accession", r->accession ? r->accession : "");
    cJSON_AddStringToObject(o, "patient_id", r->patient_id ? r->patient_id : "");
    add_text(o, "patient_name", r->patient_name, r->specific_charset, 1);
    add_text(o, "study_description", r->study_desc, r->specific_charset, 0);
    triage_iso_time(r->received_at_ms, when, sizeof when);
    cJSON_AddStringToObject(o, "received_at", when);
    triage_iso_time(r->updated_at_ms, when, sizeof when);
    cJSON_AddStringToObject(o, "updated_at", when);
    cJSON_AddNumberToObject(o, "slices", r->slices);
    if (r->has_probability) {
        cJSON_AddNumberToObject(o, "probability", r->probability);
        cJSON *sub = cJSON_AddObjectToObject(o, "subtypes");
        for (int l = 0; sub && l < DB_LABELS - 1; l++)
            cJSON_AddNumberToObject(sub, subtype_names[l], r->subtypes[l]);
    } else {
        cJSON_AddNullToObject(o, "probability");
        cJSON_AddNullToObject(o, "subtypes");
    }
    cJSON_AddBoolToObject(o, "flagged", r->flagged);
    cJSON_AddStringToObject(o, "status", r->status ? r->status : "");
    cJSON_AddStringToObject(o, "status_reason", r->status_reason ? r->status_reason : "");
    cJSON_AddStringToObject(o, "model_version", r->model_version ? r->model_version : "");
    cJSON_AddNumberToObject(o, "result_updates", r->result_updates);
    cJSON_AddStringToObject(o, "notice", "decision support, not a diagnosis");
    return o;
}

void triage_row_print_header(FILE *f)
{
    fprintf(f, "%-4s %-4s %-6s %-15s %-8s %-16s %-16s %s\n", "#", "flag", "p(ICH)", "status", "age",
            "patient_id", "accession", "study_uid");
}

void triage_row_print(FILE *f, int rank, const struct db_worklist_row *r, int64_t now_ms)
{
    char p[16] = "-";
    if (r->has_probability) snprintf(p, sizeof p, "%.3f", r->probability);
    int64_t age = (now_ms - r->received_at_ms) / 1000;
    char when[48];
    if (age < 3600)
        snprintf(when, sizeof when, "%lldm", (long long)(age / 60));
    else if (age < 86400 * 2)
        snprintf(when, sizeof when, "%lldh%02lldm", (long long)(age / 3600),
                 (long long)(age % 3600 / 60));
    else
        snprintf(when, sizeof when, "%lldd", (long long)(age / 86400));
    fprintf(f, "%-4d %-4s %-6s %-15s %-8s %-16.16s %-16.16s %s\n", rank, r->flagged ? "FLAG" : "",
            p, r->status, when, r->patient_id, r->accession, r->study_uid);
}

/* triage/rows.c: worklist rows as JSON (cJSON) and as text. */
#include "rows.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "scp_charset.h"

static const char *const subtype_names[DB_LABELS - 1] = {
    "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"};

int64_t triage_worklist_since(int64_t now_ms, int64_t days)
{
    return days > 0 ? now_ms - days * 86400 * INT64_C(1000) : 0;
}

void triage_iso_time(int64_t ms, char *out, size_t n)
{
    time_t s = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&s, &tm);
    strftime(out, n, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* Length of the well-formed UTF-8 sequence at s (no overlong forms,
 * surrogates or code points above U+10FFFF), 0 when it is not one. */
static size_t utf8_seq(const unsigned char *s)
{
    if (s[0] < 0x80) return 1;
    size_t n = s[0] >= 0xC2 && s[0] <= 0xDF   ? 2
               : s[0] >= 0xE0 && s[0] <= 0xEF ? 3
               : s[0] >= 0xF0 && s[0] <= 0xF4 ? 4
                                              : 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (s[0] == 0xE0) lo = 0xA0;
    if (s[0] == 0xED) hi = 0x9F;
    if (s[0] == 0xF0) lo = 0x90;
    if (s[0] == 0xF4) hi = 0x8F;
    if (n == 0 || s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < n; i++)
        if ((s[i] & 0xC0) != 0x80) return 0;
    return n;
}

/* Every byte of s that is not part of well-formed UTF-8 becomes '?'. */
static void utf8_repair(char *s)
{
    unsigned char *p = (unsigned char *)s;
    while (*p) {
        size_t n = utf8_seq(p);
        if (n == 0) {
            *p++ = '?';
        } else {
            p += n;
        }
    }
}

void triage_json_add_text(cJSON *o, const char *key, const char *value, const char *charset,
                          int person_name)
{
    char utf8[1024];
    scp_charset_to_utf8(charset ? charset : "", value ? value : "", person_name, utf8, sizeof utf8);
    utf8_repair(utf8); /* a value not in its declared character set */
    cJSON_AddStringToObject(o, key, utf8);
}

void triage_json_add_utf8(cJSON *o, const char *key, const char *value)
{
    char *copy = strdup(value ? value : "");
    if (!copy) return;
    utf8_repair(copy);
    cJSON_AddStringToObject(o, key, copy);
    free(copy);
}

/* The digits of s, at most max of them, into out (size max + 1); other
 * characters (the separators of ACR-NEMA dates and times, spaces) are
 * skipped, and with fraction a '.' ends a time (a fraction of a second).
 * Returns how many, max + 1 when there are more. */
static int digits_of(const char *s, bool fraction, char *out, int max)
{
    int n = 0;
    for (; s && *s && !(fraction && *s == '.'); s++) {
        if (*s < '0' || *s > '9') continue;
        if (n == max) return max + 1;
        out[n++] = *s;
    }
    out[n] = '\0';
    return n;
}

/* The number written by the len digits at s. */
static int number_at(const char *s, int len)
{
    int v = 0;
    for (int i = 0; i < len; i++)
        v = v * 10 + (s[i] - '0');
    return v;
}

int triage_study_when(const char *date, const char *time, char *iso, size_t n, int64_t *at_s)
{
    if (n) iso[0] = '\0';
    char d[9], t[7];
    if (digits_of(date, false, d, 8) != 8) return -1;
    struct tm tm = {.tm_year = number_at(d, 4) - 1900,
                    .tm_mon = number_at(d + 4, 2) - 1,
                    .tm_mday = number_at(d + 6, 2)};
    struct tm check = tm;
    time_t day = timegm(&check);
    /* timegm carries a 31st of February into March: not a date */
    if (day == (time_t)-1 || check.tm_mday != tm.tm_mday || check.tm_mon != tm.tm_mon) return -1;
    int nt = digits_of(time, true, t, 6);
    int hh = nt >= 2 ? number_at(t, 2) : 0, mm = nt >= 4 ? number_at(t + 2, 2) : 0,
        ss = nt == 6 ? number_at(t + 4, 2) : 0;
    if ((nt == 2 || nt == 4 || nt == 6) && hh < 24 && mm < 60 && ss <= 60) { /* 60: leap */
        snprintf(iso, n, "%.4s-%.2s-%.2sT%02d:%02d:%02d", d, d + 4, d + 6, hh, mm,
                 ss > 59 ? 59 : ss);
        *at_s = (int64_t)day + hh * 3600 + mm * 60 + ss;
    } else {
        snprintf(iso, n, "%.4s-%.2s-%.2s", d, d + 4, d + 6);
        *at_s = (int64_t)day + 86399; /* the day's end: never older than it may be */
    }
    return 0;
}

bool triage_row_prior(const struct db_worklist_row *r)
{
    char iso[32];
    int64_t at_s;
    if (triage_study_when(r->study_date, r->study_time, iso, sizeof iso, &at_s) != 0) return false;
    /* The scanner's clock is in its own zone (UTC-12 to UTC+14), arrival in
     * UTC: the study counts from the latest instant it may have been. */
    return r->received_at_ms / 1000 - (at_s + 12 * 3600) > TRIAGE_PRIOR_DAYS * 86400;
}

cJSON *triage_row_json(const struct db_worklist_row *r)
{
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    char when[32];
    cJSON_AddStringToObject(o, "study_uid", r->study_uid ? r->study_uid : "");
    cJSON_AddStringToObject(o, "series_uid", r->series_uid ? r->series_uid : "");
    triage_json_add_text(o, "accession", r->accession, r->specific_charset, 0);
    triage_json_add_text(o, "patient_id", r->patient_id, r->specific_charset, 0);
    triage_json_add_text(o, "patient_name", r->patient_name, r->specific_charset, 1);
    triage_json_add_text(o, "study_description", r->study_desc, r->specific_charset, 0);
    triage_json_add_text(o, "study_date", r->study_date, r->specific_charset, 0);
    triage_json_add_text(o, "study_time", r->study_time, r->specific_charset, 0);
    int64_t study_s;
    if (triage_study_when(r->study_date, r->study_time, when, sizeof when, &study_s) == 0)
        cJSON_AddStringToObject(o, "study_datetime", when);
    else
        cJSON_AddNullToObject(o, "study_datetime");
    cJSON_AddBoolToObject(o, "prior", triage_row_prior(r));
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
    triage_json_add_utf8(o, "status_reason", r->status_reason);
    triage_json_add_utf8(o, "model_version", r->model_version);
    cJSON_AddNumberToObject(o, "result_updates", r->result_updates);
    /* Retention removed the files: the result stays, the images do not. */
    cJSON_AddBoolToObject(o, "images_removed", r->purged_at_ms != 0);
    if (r->purged_at_ms) {
        triage_iso_time(r->purged_at_ms, when, sizeof when);
        cJSON_AddStringToObject(o, "purged_at", when);
    } else {
        cJSON_AddNullToObject(o, "purged_at");
    }
    cJSON_AddStringToObject(o, "notice", "decision support, not a diagnosis");
    return o;
}

void triage_row_print_header(FILE *f)
{
    fprintf(f, "%-4s %-4s %-6s %-15s %-8s %-16s %-16s %-16s %s\n", "#", "flag", "p(ICH)", "status",
            "age", "study_date", "patient_id", "accession", "study_uid");
}

/* value for a terminal in out: converted to UTF-8, no control character
 * (C0, DEL, C1: escape sequences a peer could plant) and at most width
 * characters, padded to width when pad. */
static void term_text(const char *value, const char *charset, size_t width, int pad, char *out,
                      size_t outlen)
{
    char utf8[1024];
    scp_charset_to_utf8(charset ? charset : "", value ? value : "", 0, utf8, sizeof utf8);
    utf8_repair(utf8);
    size_t o = 0, chars = 0;
    for (const unsigned char *p = (const unsigned char *)utf8; *p && chars < width;) {
        size_t n = utf8_seq(p);
        int control = *p < 0x20 || *p == 0x7F || (p[0] == 0xC2 && p[1] < 0xA0);
        if (o + (control ? 1 : n) >= outlen) break;
        if (control) {
            out[o++] = '?';
        } else {
            memcpy(out + o, p, n);
            o += n;
        }
        p += n;
        chars++;
    }
    for (; pad && chars < width && o + 1 < outlen; chars++)
        out[o++] = ' ';
    out[o] = '\0';
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
    char id[80], acc[80], uid[256];
    term_text(r->patient_id, r->specific_charset, 16, 1, id, sizeof id);
    term_text(r->accession, r->specific_charset, 16, 1, acc, sizeof acc);
    term_text(r->study_uid, "", sizeof uid, 0, uid, sizeof uid);
    /* The study's date beside its arrival: "prior" for an earlier study
     * sent again. */
    char study[32] = "-", iso[32];
    int64_t study_s;
    if (triage_study_when(r->study_date, r->study_time, iso, sizeof iso, &study_s) == 0)
        snprintf(study, sizeof study, "%.10s%s", iso, triage_row_prior(r) ? " prior" : "");
    char purged[64] = "";
    if (r->purged_at_ms) {
        char day[32];
        triage_iso_time(r->purged_at_ms, day, sizeof day);
        snprintf(purged, sizeof purged, "  images removed by retention on %.10s", day);
    }
    fprintf(f, "%-4d %-4s %-6s %-15s %-8s %-16s %s %s %s%s\n", rank, r->flagged ? "FLAG" : "", p,
            r->status, when, study, id, acc, uid, purged);
}

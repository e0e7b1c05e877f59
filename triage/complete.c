/* triage/complete.c: when a series is complete, and whether it is for us. */
#include "complete.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "db_triage.h"
#include "log.h"
#include "scp_info.h"
#include "volume.h"

void triage_content_key(const char *const *sops, const char *const *digests, const int64_t *sizes,
                        int n, char out[33])
{
    /* FNV-1a over "sop:digest;" in SOP order: a resent identical instance
     * keeps the key; anything added, removed or changed in its bytes does
     * not. An instance stored before digests (schema 8) counts by size. */
    uint64_t h = 1469598103934665603ULL;
    for (int i = 0; i < n; i++) {
        char buf[160];
        int len = digests && digests[i] && digests[i][0]
                      ? snprintf(buf, sizeof buf, "%s:%s;", sops[i], digests[i])
                      : snprintf(buf, sizeof buf, "%s:%lld;", sops[i], (long long)sizes[i]);
        for (int k = 0; k < len; k++) {
            h ^= (unsigned char)buf[k];
            h *= 1099511628211ULL;
        }
    }
    snprintf(out, 33, "%d-%016llx", n, (unsigned long long)h);
}

static void upper(char *s)
{
    for (; *s; s++)
        *s = (char)toupper((unsigned char)*s);
}

bool triage_patterns_match(const char *patterns, const char *text)
{
    char t[160];
    snprintf(t, sizeof t, "%s", text);
    upper(t);
    const char *p = patterns;
    while (*p) {
        size_t len = strcspn(p, ",");
        const char *start = p, *end = p + len;
        while (start < end && isspace((unsigned char)*start))
            start++;
        while (end > start && isspace((unsigned char)end[-1]))
            end--;
        char pat[64];
        size_t n = (size_t)(end - start) < sizeof pat ? (size_t)(end - start) : sizeof pat - 1;
        snprintf(pat, sizeof pat, "%.*s", (int)n, start);
        if (pat[0] && strstr(t, pat)) return true;
        p += len;
        if (*p == ',') p++;
    }
    return false;
}

/* Decides one due series; returns 1 when decided (*queued set when that
 * queued a job), 0 when it changed meanwhile, -1 on a database error. */
static int decide(struct triage_completion *c, int64_t id, int64_t now_ms, bool *queued)
{
    struct db_series_info info;
    struct db_instance_brief *inst = NULL;
    int n = 0;
    if (db_series_info(c->db, id, &info) != 0 || db_series_instances(c->db, id, &inst, &n) != 0)
        return -1;
    const char **sops = malloc(sizeof *sops * (size_t)(n ? n : 1));
    const char **digests = malloc(sizeof *digests * (size_t)(n ? n : 1));
    int64_t *sizes = malloc(sizeof *sizes * (size_t)(n ? n : 1));
    if (!sops || !digests || !sizes) {
        free(sops);
        free(digests);
        free(sizes);
        free(inst);
        return -1;
    }
    int ct = 0, localizers = 0, usable = 0;
    for (int i = 0; i < n; i++) {
        sops[i] = inst[i].sop_uid;
        digests[i] = inst[i].content_digest;
        sizes[i] = inst[i].file_size;
        if (!scp_sop_class_is_ct(inst[i].sop_class)) continue;
        ct++;
        if (triage_image_type_is_localizer(inst[i].image_type)) {
            localizers++;
        } else if (inst[i].frames > 1 && !inst[i].has_orientation) {
            usable += inst[i].frames; /* enhanced CT: geometry per frame, checked at triage */
        } else if (inst[i].has_orientation &&
                   triage_orientation_axial(inst[i].orientation, c->max_tilt_deg)) {
            usable += inst[i].frames > 0 ? inst[i].frames : 1;
        }
    }
    char key[33];
    triage_content_key(sops, digests, sizes, n, key);
    free(sops);
    free(digests);
    free(sizes);
    free(inst);

    char reason[512] = "";
    const char *state = "waiting";
    char modality[17];
    snprintf(modality, sizeof modality, "%s", info.modality);
    upper(modality);
    if (info.has_result && strcmp(info.result_key, key) == 0) {
        state = "triaged"; /* this very content was triaged: keep its result */
    } else if (strcmp(modality, "CT") != 0) {
        state = "not_applicable";
        snprintf(reason, sizeof reason, "modality %s, not CT", modality[0] ? modality : "missing");
    } else if (ct == 0) {
        state = "not_applicable";
        snprintf(reason, sizeof reason, "no CT image storage objects");
    } else if (!triage_patterns_match(c->head_patterns, info.body_part) &&
               !triage_patterns_match(c->head_patterns, info.study_desc) &&
               !triage_patterns_match(c->head_patterns, info.series_desc)) {
        state = "not_applicable";
        snprintf(
            reason, sizeof reason,
            "not a head study (body part and descriptions match none of triage.head_patterns)");
    } else if (localizers == ct) {
        state = "not_applicable";
        snprintf(reason, sizeof reason, "localizer series");
    } else if (usable < c->min_slices) {
        state = "not_applicable";
        snprintf(reason, sizeof reason, "%d axial slices, fewer than triage.min_slices=%d", usable,
                 c->min_slices);
    }
    char err[512];
    /* info was read before the instances: one stored in between makes them
     * differ, one stored after makes db_series_decide refuse. */
    int decided = n == info.instance_count
                      ? db_series_decide(c->db, &info, state, reason, key, now_ms, err, sizeof err)
                      : 1;
    if (decided < 0) {
        util_log(UTIL_LOG_ERROR, "series_decide_failed", "series=%s error=\"%s\"", info.series_uid,
                 err);
        return -1;
    }
    if (decided > 0) {
        util_log(UTIL_LOG_DEBUG, "series_changed", "study=%s series=%s instances=%d",
                 info.study_uid, info.series_uid, n);
        return 0;
    }
    util_log(UTIL_LOG_INFO, "series_complete", "study=%s series=%s instances=%d state=%s%s%s%s",
             info.study_uid, info.series_uid, n, state, reason[0] ? " reason=\"" : "", reason,
             reason[0] ? "\"" : "");
    *queued = strcmp(state, "waiting") == 0;
    return 1;
}

int triage_completion_tick(struct triage_completion *c, int64_t now_ms, int *queued)
{
    int64_t ids[64];
    int n, decided = 0;
    *queued = 0;
    if (db_series_due(c->db, now_ms, c->quiet_ms, ids, 64, &n) != 0) {
        util_log(UTIL_LOG_ERROR, "completion_failed", "error=\"cannot read series\"");
        return -1;
    }
    for (int i = 0; i < n; i++) {
        bool job = false;
        int r = decide(c, ids[i], now_ms, &job);
        if (r < 0) return -1;
        decided += r;
        *queued += job;
    }
    return decided;
}

/* triage/http_api.c: the JSON API under /api/: the session, the worklist,
 * one study (with per-slice probabilities), reviews, claims and key-slice
 * images. Every response is built with cJSON; every string from a DICOM
 * dataset reaches the page as JSON text, never as markup. */
#include "http_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "db_reviews.h"
#include "db_web.h"
#include "log.h"
#include "rows.h"
#include "scp_info.h"

/* A review marks at most this many slices (a thin-slice head CT has ~600). */
#define HTTP_MAX_MARKED_SLICES 2000
#define HTTP_MAX_MARKED_SLICES_STR "2000"

static const char *const label_names[DB_LABELS] = {
    "any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"};
static const char *const statuses[] = {"received", "waiting",        "triaging", "triaged",
                                       "failed",   "not_applicable", "reviewed"};

struct list_ctx {
    struct triage_http *h;
    cJSON *arr, *claims; /* claims: study_uid -> reader, of live claims */
    int64_t now_ms, lapses_at_ms;
    bool oom;
};

static int claim_cb(void *ud, const char *uid, const char *reader, int64_t at)
{
    struct list_ctx *c = ud;
    cJSON_AddStringToObject(c->claims, uid, reader);
    int64_t lapses = at + c->h->claim_ms;
    if (!c->lapses_at_ms || lapses < c->lapses_at_ms) c->lapses_at_ms = lapses;
    return 0;
}

static int list_row(void *ud, const struct db_worklist_row *row)
{
    struct list_ctx *c = ud;
    cJSON *o = triage_row_json(row);
    if (!o) {
        c->oom = true;
        return 1;
    }
    const char *reader = cJSON_GetStringValue(cJSON_GetObjectItem(c->claims, row->study_uid));
    cJSON_AddStringToObject(o, "claimed_by", reader ? reader : "");
    cJSON_AddItemToArray(c->arr, o);
    return 0;
}

cJSON *http_worklist_json(struct triage_http *h, const char *status, int64_t since_ms)
{
    struct list_ctx c = {.h = h,
                         .arr = cJSON_CreateArray(),
                         .claims = cJSON_CreateObject(),
                         .now_ms = http_now_ms()};
    if (!c.arr || !c.claims || db_claims(h->db, c.now_ms, h->claim_ms, claim_cb, &c) != 0 ||
        db_worklist(h->db, status, since_ms, list_row, &c) != 0 || c.oom) {
        cJSON_Delete(c.arr);
        cJSON_Delete(c.claims);
        return NULL;
    }
    cJSON_Delete(c.claims);
    h->claim_lapses_at_ms = c.lapses_at_ms;
    return c.arr;
}

cJSON *http_worklist_hidden_json(struct triage_http *h, int64_t since_ms)
{
    if (db_worklist_hidden(h->db, since_ms, &h->hidden) != 0) return NULL;
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    char before[40];
    triage_iso_time(since_ms, before, sizeof before);
    cJSON_AddNumberToObject(o, "days", (double)h->worklist_days);
    if (since_ms > 0)
        cJSON_AddStringToObject(o, "before", before);
    else
        cJSON_AddNullToObject(o, "before");
    cJSON_AddNumberToObject(o, "triaged", (double)h->hidden.triaged);
    cJSON_AddNumberToObject(o, "not_applicable", (double)h->hidden.not_applicable);
    return o;
}

static bool valid_uid(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 64) return false;
    for (; *s; s++)
        if (!((*s >= '0' && *s <= '9') || *s == '.')) return false;
    return true;
}

static int api_worklist(struct triage_http *h, h2o_req_t *req)
{
    char status[32];
    const char *want = NULL;
    if (req->query_at != SIZE_MAX) {
        const char *q = req->path.base + req->query_at + 1;
        size_t ql = req->path.len - req->query_at - 1;
        /* Too long, without a value or with a NUL: not one (400). */
        if (http_param(q, ql, "status", status, sizeof status) != 0) {
            bool known = false;
            for (size_t i = 0; i < sizeof statuses / sizeof statuses[0]; i++)
                known = known || strcmp(status, statuses[i]) == 0;
            if (!known)
                return http_send_error(req, 400,
                                       "status must be received, waiting, triaging, triaged, "
                                       "failed, not_applicable or reviewed");
            want = status;
        }
    }
    int64_t since = want ? 0 : triage_worklist_since(http_now_ms(), h->worklist_days);
    cJSON *arr = http_worklist_json(h, want, since);
    /* What the age window left out, for clients of the API as the events
     * and the page say it (a structured-field dictionary, RFC 8941); not
     * kept in h->hidden, which is what the streams last heard. A ?status=
     * list leaves nothing out. */
    struct db_worklist_hidden hidden;
    if (!arr || (!want && db_worklist_hidden(h->db, since, &hidden) != 0)) {
        cJSON_Delete(arr);
        return http_send_error(req, 500, "cannot read the worklist");
    }
    if (!want) {
        char v[128];
        snprintf(v, sizeof v, "triaged=%lld, not_applicable=%lld, days=%lld",
                 (long long)hidden.triaged, (long long)hidden.not_applicable,
                 (long long)h->worklist_days);
        http_add_header(req, "x-worklist-hidden", h2o_strdup(&req->pool, v, SIZE_MAX).base);
    }
    return http_send_json(req, 200, arr);
}

struct study_ctx {
    cJSON *o;
    struct triage_http *h;
    char charset[256]; /* the study's Specific Character Set, for its series */
};

static int study_cb(void *ud, const struct db_study_view *v)
{
    struct study_ctx *c = ud;
    cJSON *o = triage_row_json(&v->row);
    if (!o) return 1;
    const char *cs = v->specific_charset;
    snprintf(c->charset, sizeof c->charset, "%s", cs ? cs : "");
    triage_json_add_utf8(o, "specific_charset", cs);
    triage_json_add_text(o, "patient_birth_date", v->birth_date, cs, 0);
    triage_json_add_text(o, "patient_sex", v->sex, cs, 0);
    triage_json_add_text(o, "study_id", v->study_id, cs, 0);
    triage_json_add_utf8(o, "key_sop_uid", v->key_sop);
    cJSON_AddNumberToObject(o, "key_index", v->key_index);
    triage_json_add_utf8(o, "note", v->note);
    cJSON_AddNumberToObject(o, "triage_ms", v->ms_total);
    bool live = db_claim_live(v->claimed_at_ms, http_now_ms(), c->h->claim_ms);
    triage_json_add_utf8(o, "claimed_by", live ? v->claimed_by : "");
    /* What a review from this view says it saw (seen_review, seen_result). */
    cJSON_AddNumberToObject(o, "review_id", (double)v->seen.review_id);
    cJSON_AddNumberToObject(o, "result_version", (double)v->seen.result_at_ms);
    c->o = o;
    return 0;
}

struct series_ctx {
    cJSON *arr;
    const char *charset;
};

static int series_cb(void *ud, const struct db_series_row *s)
{
    const struct series_ctx *c = ud;
    cJSON *o = cJSON_CreateObject();
    triage_json_add_utf8(o, "series_uid", s->series_uid);
    triage_json_add_text(o, "modality", s->modality, c->charset, 0);
    triage_json_add_text(o, "description", s->series_desc, c->charset, 0);
    cJSON_AddStringToObject(o, "state", s->state);
    triage_json_add_utf8(o, "reason", s->state_reason);
    if (s->has_number)
        cJSON_AddNumberToObject(o, "number", s->number);
    else
        cJSON_AddNullToObject(o, "number");
    cJSON_AddNumberToObject(o, "instances", s->instance_count);
    cJSON_AddBoolToObject(o, "has_result", s->has_result);
    cJSON_AddItemToArray(c->arr, o);
    return 0;
}

static int slice_cb(void *ud, const struct db_slice *s)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "index", s->idx);
    cJSON_AddStringToObject(o, "sop_uid", s->sop_uid);
    cJSON_AddNumberToObject(o, "frame", s->frame);
    cJSON_AddNumberToObject(o, "frames", s->frames);
    if (s->instance_number >= 0)
        cJSON_AddNumberToObject(o, "instance_number", s->instance_number);
    else
        cJSON_AddNullToObject(o, "instance_number");
    for (int l = 0; l < DB_LABELS; l++)
        cJSON_AddNumberToObject(o, label_names[l], s->p[l]);
    cJSON_AddItemToArray(ud, o);
    return 0;
}

static int review_cb(void *ud, const struct db_review_row *r)
{
    cJSON *o = cJSON_CreateObject();
    char when[32];
    cJSON_AddNumberToObject(o, "id", (double)r->id);
    cJSON_AddBoolToObject(o, "hemorrhage", r->hemorrhage);
    cJSON *subs = cJSON_AddArrayToObject(o, "subtypes");
    char buf[256];
    snprintf(buf, sizeof buf, "%s", r->subtypes);
    for (char *save, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save))
        cJSON_AddItemToArray(subs, cJSON_CreateString(t));
    cJSON *marked = cJSON_AddArrayToObject(o, "slices");
    for (const char *s = r->slices ? r->slices : ""; *s;) {
        size_t n = strcspn(s, ",");
        const char *slash = memchr(s, '/', n);
        if (slash) {
            char sop[SCP_UID_MAX];
            snprintf(sop, sizeof sop, "%.*s", (int)(slash - s), s);
            cJSON *m = cJSON_CreateObject();
            cJSON_AddStringToObject(m, "sop_uid", sop);
            cJSON_AddNumberToObject(m, "frame", atoi(slash + 1));
            cJSON_AddItemToArray(marked, m);
        }
        s += n;
        if (*s == ',') s++;
    }
    triage_json_add_utf8(o, "comment", r->comment);
    triage_json_add_utf8(o, "reviewer", r->reviewer);
    triage_iso_time(r->created_at_ms, when, sizeof when);
    cJSON_AddStringToObject(o, "created_at", when);
    cJSON_AddItemToArray(ud, o);
    return 0;
}

static int api_study(struct triage_http *h, h2o_req_t *req, const struct http_who *who,
                     const char *uid)
{
    struct study_ctx c = {.h = h};
    int rc = db_study_view(h->db, uid, study_cb, &c);
    if (rc == 1) return http_send_error(req, 404, "no such study");
    if (rc != 0 || !c.o) return http_send_error(req, 500, "cannot read the study");
    struct series_ctx series = {cJSON_AddArrayToObject(c.o, "series"), c.charset};
    cJSON *slices = cJSON_AddArrayToObject(c.o, "slice_probabilities");
    cJSON *reviews = cJSON_AddArrayToObject(c.o, "reviews");
    if (db_study_series(h->db, uid, series_cb, &series) != 0 ||
        db_study_slices(h->db, uid, slice_cb, slices) != 0 ||
        db_reviews_of_study(h->db, uid, review_cb, reviews) != 0) {
        cJSON_Delete(c.o);
        return http_send_error(req, 500, "cannot read the study");
    }
    /* The page reloads an open study on each update of it: the audit
     * records a person opening it, once in HTTP_AUDIT_OPENED_MS, not each
     * reload (nor can a request's parameters keep it out of the audit). */
    if (db_audit_opened(h->db, http_now_ms(), who->user, uid, HTTP_AUDIT_OPENED_MS) != 0)
        util_log(UTIL_LOG_ERROR, "audit_failed", "study=%s", uid);
    return http_send_json(req, 200, c.o);
}

/* Characters, as the page's form counts them (at most as many as its
 * UTF-16 units), not bytes: 4000 accented letters are 8000 bytes. */
static size_t utf8_chars(const char *s)
{
    size_t n = 0;
    for (; *s; s++)
        n += ((unsigned char)*s & 0xC0) != 0x80;
    return n;
}

/* A version the review's body names: absent or null gives absent; else a
 * whole number from 0. Returns 0, or -1 when it is something else. */
static int seen_version(const cJSON *v, int64_t absent, int64_t *out)
{
    *out = absent;
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 9007199254740992.0 ||
        v->valuedouble != (double)(int64_t)v->valuedouble)
        return -1;
    *out = (int64_t)v->valuedouble;
    return 0;
}

static const char *text_of(const cJSON *o, const char *name)
{
    const char *v = cJSON_GetStringValue(cJSON_GetObjectItem(o, name));
    return v ? v : "?";
}

/* 409 for a review whose reader had not seen the study as it is now: the
 * latest review (who, when, finding) or the newer result, and the versions
 * to send once the reader has looked again. */
static int review_conflict(struct triage_http *h, h2o_req_t *req, const char *uid,
                           const struct db_review_seen *saw, const struct db_review_seen *now)
{
    cJSON *o = cJSON_CreateObject(), *all = cJSON_CreateArray();
    db_reviews_of_study(h->db, uid, review_cb, all);
    int n = cJSON_GetArraySize(all);
    cJSON *latest = n > 0 ? cJSON_DetachItemFromArray(all, n - 1) : NULL;
    cJSON_Delete(all);
    char msg[400];
    if (now->review_id != saw->review_id && latest) {
        bool hem = cJSON_IsTrue(cJSON_GetObjectItem(latest, "hemorrhage"));
        char finding[200];
        snprintf(finding, sizeof finding, "%s", hem ? "hemorrhage" : "no hemorrhage");
        const char *sep = ": ";
        const cJSON *sub;
        cJSON_ArrayForEach(sub, cJSON_GetObjectItem(latest, "subtypes"))
        {
            size_t used = strlen(finding);
            snprintf(finding + used, sizeof finding - used, "%s%s", sep, sub->valuestring);
            sep = ", ";
        }
        snprintf(msg, sizeof msg,
                 "%s reviewed this study at %s (%s) after the view you saved from; look at it "
                 "again, then save again to add your review",
                 text_of(latest, "reviewer"), text_of(latest, "created_at"), finding);
    } else if (now->review_id != saw->review_id) {
        snprintf(msg, sizeof msg,
                 "this study has no review %lld; look at it again, then save again to add your "
                 "review",
                 (long long)saw->review_id);
    } else {
        snprintf(msg, sizeof msg,
                 "a newer result came after the view you saved from; look at it again, then save "
                 "again to add your review");
    }
    cJSON_AddStringToObject(o, "error", msg);
    if (latest) cJSON_AddItemToObject(o, "review", latest);
    cJSON_AddNumberToObject(o, "review_id", (double)now->review_id);
    cJSON_AddNumberToObject(o, "result_version", (double)now->result_at_ms);
    util_log(UTIL_LOG_WARN, "review_conflict",
             "study=%s seen_review=%lld review=%lld seen_result=%lld result=%lld", uid,
             (long long)saw->review_id, (long long)now->review_id, (long long)saw->result_at_ms,
             (long long)now->result_at_ms);
    return http_send_json(req, 409, o);
}

static int api_review(struct triage_http *h, h2o_req_t *req, const struct http_who *who,
                      const char *uid)
{
    cJSON *body =
        req->entity.base ? cJSON_ParseWithLength(req->entity.base, req->entity.len) : NULL;
    if (!body || !cJSON_IsObject(body)) {
        cJSON_Delete(body);
        return http_send_error(req, 400, "body must be a JSON object");
    }
    cJSON *hem = cJSON_GetObjectItem(body, "hemorrhage");
    cJSON *subs = cJSON_GetObjectItem(body, "subtypes");
    cJSON *comment = cJSON_GetObjectItem(body, "comment");
    const char *msg = NULL;
    if (!cJSON_IsBool(hem))
        msg = "\"hemorrhage\" must be true or false";
    else if (subs && !cJSON_IsArray(subs) && !cJSON_IsNull(subs))
        msg = "\"subtypes\" must be an array of names";
    else if (comment && !cJSON_IsString(comment) && !cJSON_IsNull(comment))
        msg = "\"comment\" must be a string";
    else if (cJSON_IsString(comment) && utf8_chars(comment->valuestring) > 4000)
        msg = "\"comment\" is longer than 4000 characters";
    char list[256] = "";
    for (cJSON *s = subs && cJSON_IsArray(subs) ? subs->child : NULL; s && !msg; s = s->next) {
        bool known = false;
        for (int l = 1; l < DB_LABELS && cJSON_IsString(s); l++)
            known = known || strcmp(s->valuestring, label_names[l]) == 0;
        if (!known) {
            msg = "\"subtypes\" names: epidural, intraparenchymal, intraventricular, "
                  "subarachnoid, subdural";
            break;
        }
        if (!strstr(list, s->valuestring)) {
            if (list[0]) strcat(list, ",");
            strcat(list, s->valuestring);
        }
    }
    if (!msg && cJSON_IsFalse(hem) && list[0]) msg = "subtypes given but \"hemorrhage\" is false";
    /* What the reader saw: the latest review shown (absent: none, so that a
     * client that does not say replaces no one's review unknowingly), and
     * the study's result_version (absent: not compared). */
    struct db_review_seen saw, now = {0, 0};
    if (!msg && seen_version(cJSON_GetObjectItem(body, "seen_review"), 0, &saw.review_id) != 0)
        msg = "\"seen_review\" must be the id of the latest review shown, or null";
    if (!msg && seen_version(cJSON_GetObjectItem(body, "seen_result"), -1, &saw.result_at_ms) != 0)
        msg = "\"seen_result\" must be the study's result_version as shown, or null";
    /* The slices the reviewer marked as showing the bleed: [{"sop_uid": UID,
     * "frame": N}] (frame 0 when absent), stored as "sop/frame,...". */
    cJSON *slices = cJSON_GetObjectItem(body, "slices");
    char *marks = NULL;
    if (!msg && slices && !cJSON_IsNull(slices)) {
        int n = cJSON_IsArray(slices) ? cJSON_GetArraySize(slices) : -1;
        if (n < 0 || n > HTTP_MAX_MARKED_SLICES)
            msg = "\"slices\" must be an array of at most " HTTP_MAX_MARKED_SLICES_STR
                  " {\"sop_uid\", \"frame\"} objects";
        else if (n > 0 && cJSON_IsFalse(hem))
            msg = "slices marked but \"hemorrhage\" is false";
        else if (n > 0 && !(marks = malloc((size_t)n * (SCP_UID_MAX + 12))))
            msg = "out of memory";
        size_t off = 0;
        for (cJSON *s = n > 0 && marks ? slices->child : NULL; s && !msg; s = s->next) {
            cJSON *sop = cJSON_GetObjectItem(s, "sop_uid"), *fr = cJSON_GetObjectItem(s, "frame");
            if (!cJSON_IsString(sop) || !scp_uid_valid(sop->valuestring) ||
                (fr && (!cJSON_IsNumber(fr) || fr->valuedouble < 0 || fr->valuedouble > 1e6 ||
                        fr->valuedouble != (double)(int)fr->valuedouble))) {
                msg = "\"slices\" entries: {\"sop_uid\": a UID, \"frame\": a frame number}";
                break;
            }
            off += (size_t)sprintf(marks + off, "%s%s/%d", off ? "," : "", sop->valuestring,
                                   fr ? (int)fr->valuedouble : 0);
        }
    }
    if (msg) {
        free(marks);
        cJSON_Delete(body);
        return http_send_error(req, 400, msg);
    }
    char err[256];
    int rc = db_review_add(h->db, uid, cJSON_IsTrue(hem), list, marks,
                           cJSON_IsString(comment) ? comment->valuestring : "", who->user,
                           http_now_ms(), &saw, &now, err, sizeof err);
    free(marks);
    int nmarked = cJSON_IsArray(slices) ? cJSON_GetArraySize(slices) : 0;
    bool hemorrhage = cJSON_IsTrue(hem);
    cJSON_Delete(body);
    if (rc == 1) return http_send_error(req, 404, "no such study");
    if (rc == 2) return http_send_error(req, 400, err);
    if (rc == 3) return review_conflict(h, req, uid, &saw, &now);
    if (rc != 0) {
        util_log(UTIL_LOG_ERROR, "review_failed", "study=%s reason=\"%s\"", uid, err);
        return http_send_error(req, 500, "cannot store the review");
    }
    util_log(UTIL_LOG_INFO, "reviewed", "study=%s hemorrhage=%d subtypes=%s marked_slices=%d", uid,
             hemorrhage, list[0] ? list : "-", nmarked);
    triage_http_changed(h);
    cJSON *o = cJSON_CreateObject();
    cJSON *reviews = cJSON_AddArrayToObject(o, "reviews");
    db_reviews_of_study(h->db, uid, review_cb, reviews);
    cJSON_AddStringToObject(o, "study_uid", uid);
    cJSON_AddStringToObject(o, "status", "reviewed");
    return http_send_json(req, 201, o);
}

static int api_claim(struct triage_http *h, h2o_req_t *req, const struct http_who *who,
                     const char *uid, bool claim)
{
    bool force = false;
    if (claim && req->entity.base) {
        cJSON *body = cJSON_ParseWithLength(req->entity.base, req->entity.len);
        if (!body || !cJSON_IsObject(body)) {
            cJSON_Delete(body);
            return http_send_error(req, 400, "body must be a JSON object");
        }
        force = cJSON_IsTrue(cJSON_GetObjectItem(body, "force"));
        cJSON_Delete(body);
    }
    char holder[HTTP_USER_MAX] = "";
    int64_t now = http_now_ms();
    int rc =
        claim ? db_claim_set(h->db, uid, who->user, force, now, h->claim_ms, holder, sizeof holder)
              : db_claim_release(h->db, uid, who->user, now, h->claim_ms);
    if (rc < 0) return http_send_error(req, 500, "cannot store the claim");
    if (rc == 2) {
        cJSON *o = cJSON_CreateObject();
        char msg[160];
        snprintf(msg, sizeof msg, "being read by %s; send {\"force\": true} to take it over",
                 holder);
        cJSON_AddStringToObject(o, "error", msg);
        cJSON_AddStringToObject(o, "claimed_by", holder);
        return http_send_json(req, 409, o);
    }
    if (rc == 1)
        return http_send_error(req, claim ? 404 : 409,
                               claim ? "no such study" : "not claimed by you");
    /* A renewal (the page repeats the claim while the study is open) is
     * not another claim: no audit line, no row changed. */
    if (rc != 3) {
        char detail[HTTP_USER_MAX + 16];
        snprintf(detail, sizeof detail, rc == 4 ? "%s (lapsed)" : "%s", holder);
        http_audit(h, who->user, claim ? "claimed" : "released", uid, detail);
        triage_http_changed(h);
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "study_uid", uid);
    cJSON_AddStringToObject(o, "claimed_by", claim ? who->user : "");
    return http_send_json(req, 200, o);
}

static int api_session(struct triage_http *h, h2o_req_t *req, const struct http_who *who)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "user", who->user);
    cJSON_AddStringToObject(o, "csrf", who->csrf);
    cJSON_AddBoolToObject(o, "login", !h->loopback);
    /* The page renews the claim of an open study well within this. */
    cJSON_AddNumberToObject(o, "claim_seconds", (double)(h->claim_ms / 1000));
    cJSON_AddStringToObject(o, "notice", "decision support, not a diagnosis");
    return http_send_json(req, 200, o);
}

int http_api(struct triage_http *h, h2o_req_t *req, const struct http_who *who, const char *path)
{
    bool get = http_method_is(req, "GET") || http_method_is(req, "HEAD");
    bool post = http_method_is(req, "POST");
    if (strcmp(path, "/api/session") == 0)
        return get ? api_session(h, req, who) : http_send_405(req, "GET, HEAD");
    if (strcmp(path, "/api/worklist") == 0)
        return get ? api_worklist(h, req) : http_send_405(req, "GET, HEAD");
    if (strcmp(path, "/api/pacs/failures") == 0)
        return get ? http_pacs_failures(h, req) : http_send_405(req, "GET, HEAD");
    if (strncmp(path, "/api/studies/", 13) == 0) {
        char uid[128], rest[160] = "";
        const char *p = path + 13, *slash = strchr(p, '/');
        size_t n = slash ? (size_t)(slash - p) : strlen(p);
        if (n >= sizeof uid) return http_send_error(req, 404, "no such study");
        memcpy(uid, p, n);
        uid[n] = '\0';
        if (slash) snprintf(rest, sizeof rest, "%s", slash);
        if (!valid_uid(uid)) return http_send_error(req, 404, "no such study");
        if (!rest[0]) return get ? api_study(h, req, who, uid) : http_send_405(req, "GET, HEAD");
        if (strcmp(rest, "/review") == 0)
            return post ? api_review(h, req, who, uid) : http_send_405(req, "POST");
        if (strcmp(rest, "/claim") == 0)
            return post ? api_claim(h, req, who, uid, true) : http_send_405(req, "POST");
        if (strcmp(rest, "/release") == 0)
            return post ? api_claim(h, req, who, uid, false) : http_send_405(req, "POST");
        if (strncmp(rest, "/slices/", 8) == 0) {
            char sop[sizeof rest];
            snprintf(sop, sizeof sop, "%s", rest + 8);
            size_t sl = strlen(sop);
            if (sl < 5 || strcmp(sop + sl - 4, ".png") != 0)
                return http_send_error(req, 404, "no such slice");
            sop[sl - 4] = '\0';
            if (!valid_uid(sop)) return http_send_error(req, 404, "no such slice");
            return get ? http_slice_png(h, req, uid, sop) : http_send_405(req, "GET, HEAD");
        }
    }
    return http_send_error(req, 404, "no such API");
}

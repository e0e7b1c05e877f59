/* triage/http_pacs.c: GET /api/pacs/failures, the result objects given up
 * for a PACS destination (triage/pacs.c), newest first, for the page and for
 * whoever watches deliveries. No patient names: UIDs and reasons only. */
#include "http_internal.h"

#include "db_outbox.h"
#include "rows.h"

#define FAILURES_MAX 200

static int failure_cb(void *ud, const struct db_outbox_failure *f)
{
    cJSON *o = cJSON_CreateObject();
    if (!o) return -1;
    char when[40];
    triage_iso_time(f->last_attempt_ms, when, sizeof when);
    cJSON_AddStringToObject(o, "study_uid", f->study_uid ? f->study_uid : "");
    cJSON_AddStringToObject(o, "destination", f->destination ? f->destination : "");
    cJSON_AddStringToObject(o, "object", f->object ? f->object : "");
    cJSON_AddStringToObject(o, "sop_uid", f->sop_uid ? f->sop_uid : "");
    cJSON_AddNumberToObject(o, "revision", f->revision);
    cJSON_AddNumberToObject(o, "attempts", f->attempts);
    cJSON_AddStringToObject(o, "last_attempt_at", when);
    cJSON_AddStringToObject(o, "error", f->error ? f->error : "");
    cJSON_AddItemToArray(ud, o);
    return 0;
}

int http_pacs_failures(struct triage_http *h, h2o_req_t *req)
{
    cJSON *a = cJSON_CreateArray();
    if (!a || db_outbox_failed(h->db, FAILURES_MAX, failure_cb, a) != 0) {
        cJSON_Delete(a);
        return http_send_error(req, 500, "cannot read the database");
    }
    return http_send_json(req, 200, a);
}

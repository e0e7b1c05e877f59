/* triage/http_metrics.c: GET /metrics in the Prometheus text format, and
 * the degraded states behind the page's banner and /healthz. Counters come
 * from the store's atomics (since start) and from SQLite (all time). */
#include "http_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>

#include "db_outbox.h"
#include "db_web.h"
#include "scp.h"

cJSON *http_degraded(struct triage_http *h)
{
    cJSON *a = cJSON_CreateArray();
    char version[160] = "", why[1200] = "";
    if (h->infer && !triage_infer_model(h->infer, version, sizeof version, why, sizeof why)) {
        char msg[1300];
        snprintf(msg, sizeof msg, "model not loaded: %s", why[0] ? why : "unknown reason");
        cJSON_AddItemToArray(a, cJSON_CreateString(msg));
    }
    if (h->store && atomic_load(&h->store->low_space))
        cJSON_AddItemToArray(a, cJSON_CreateString("disk low: new instances are refused (A700)"));
    struct triage_store_verdict v;
    if (h->store) {
        triage_store_health_verdict(&h->store->health, http_now_ms(), &v);
        if (v.failing) {
            char msg[800];
            triage_store_verdict_text(&v, msg, sizeof msg);
            cJSON_AddItemToArray(a, cJSON_CreateString(msg));
        }
    }
    int64_t failed = 0;
    if (db_jobs_failed_since(h->db, http_now_ms() - 3600 * 1000, &failed) == 0 && failed > 0) {
        char msg[160];
        snprintf(msg, sizeof msg, "triage jobs failing: %lld failed in the last hour",
                 (long long)failed);
        cJSON_AddItemToArray(a, cJSON_CreateString(msg));
    }
    /* results to PACS given up (triage/pacs.c) */
    int64_t given_up[2] = {0, 0};
    static const char *const what[2] = {
        "results not delivered to PACS: %lld objects given up in the last day"
        " (log event pacs_delivery_failed)",
        "results not built for PACS: %lld given up in the last day"
        " (log event pacs_revision_failed, /api/pacs/failures)"};
    if (db_outbox_failed_since(h->db, http_now_ms() - 86400 * 1000, &given_up[0], &given_up[1]) !=
        0)
        given_up[0] = given_up[1] = 0;
    for (int i = 0; i < 2; i++) {
        if (given_up[i] == 0) continue;
        char msg[200];
        snprintf(msg, sizeof msg, what[i], (long long)given_up[i]);
        cJSON_AddItemToArray(a, cJSON_CreateString(msg));
    }
    return a;
}

/* A growing text buffer, capped (curl's habit): metrics are small. */
struct text {
    char *p;
    size_t len, cap;
};

static void add(struct text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add(struct text *t, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(t->p ? t->p + t->len : NULL, t->p ? t->cap - t->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) return;
        if (t->p && t->len + (size_t)n < t->cap) {
            t->len += (size_t)n;
            return;
        }
        size_t cap = t->cap ? t->cap * 2 : 8192;
        while (cap < t->len + (size_t)n + 1)
            cap *= 2;
        if (cap > (1 << 20)) return;
        char *grown = realloc(t->p, cap);
        if (!grown) return;
        t->p = grown;
        t->cap = cap;
    }
}

static void metric(struct text *t, const char *name, const char *type, const char *help)
{
    add(t, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Label values: backslash, quote and newline escaped. */
static void label_value(char *out, size_t n, const char *in)
{
    size_t o = 0;
    for (; *in && o + 3 < n; in++) {
        if (*in == '\\' || *in == '"') out[o++] = '\\';
        if (*in == '\n') {
            out[o++] = '\\';
            out[o++] = 'n';
            continue;
        }
        out[o++] = *in;
    }
    out[o] = '\0';
}

int http_metrics(struct triage_http *h, h2o_req_t *req)
{
    struct db_metrics m;
    if (db_metrics_read(h->db, &m) != 0)
        return http_send(req, 500, "text/plain", "cannot read the database\n", 25);
    struct text t = {0};
    long long stored = h->store ? (long long)atomic_load(&h->store->stored) : 0;
    metric(&t, "ichtriage_instances_received_total", "counter",
           "Instances stored and acknowledged since the node started.");
    add(&t, "ichtriage_instances_received_total %lld\n", stored);
    struct scp_counters sc = {0};
    if (h->scp) scp_server_counters(h->scp, &sc);
    metric(&t, "ichtriage_instances_rejected_total", "counter",
           "Instances refused since the node started, by reason: A700 for the node's own trouble "
           "(low_space, disk_full, permission, io_error, database) or a dataset too large, A900, "
           "C000, 0122 (SOP class not supported on its context), and incomplete (association "
           "broken mid-dataset).");
    for (int r = SCP_REFUSED_NONE + 1; r < SCP_REFUSED_NKINDS; r++)
        add(&t, "ichtriage_instances_rejected_total{reason=\"%s\"} %llu\n",
            scp_refusal_name((enum scp_refusal)r), (unsigned long long)sc.refused[r]);
    add(&t, "ichtriage_instances_rejected_total{reason=\"incomplete\"} %llu\n",
        (unsigned long long)sc.incomplete);
    if (h->store) {
        struct triage_store_verdict v;
        triage_store_health_verdict(&h->store->health, http_now_ms(), &v);
        metric(&t, "ichtriage_stores_failing", "gauge",
               "1 while the node refuses stores for its own trouble (see /healthz).");
        add(&t, "ichtriage_stores_failing %d\n", v.failing ? 1 : 0);
        metric(&t, "ichtriage_store_last_failure_timestamp_seconds", "gauge",
               "When the node last refused a store for its own trouble; 0: not since start.");
        add(&t, "ichtriage_store_last_failure_timestamp_seconds %.3f\n",
            (double)v.last_failure_ms / 1000.0);
    }
    metric(&t, "ichtriage_associations_total", "counter",
           "DICOM associations since the node started: accepted, rejected by reason, and "
           "connections that never made a usable request.");
    add(&t, "ichtriage_associations_total{result=\"accepted\"} %llu\n",
        (unsigned long long)sc.associations_accepted);
    add(&t, "ichtriage_associations_total{result=\"rejected_called_ae\"} %llu\n",
        (unsigned long long)sc.rejected_called_ae);
    add(&t, "ichtriage_associations_total{result=\"rejected_calling_peer\"} %llu\n",
        (unsigned long long)sc.rejected_calling_peer);
    add(&t, "ichtriage_associations_total{result=\"rejected_limit\"} %llu\n",
        (unsigned long long)sc.rejected_limit);
    add(&t, "ichtriage_associations_total{result=\"rejected_no_context\"} %llu\n",
        (unsigned long long)sc.rejected_no_context);
    add(&t, "ichtriage_associations_total{result=\"no_request\"} %llu\n",
        (unsigned long long)sc.connections_failed);
    metric(&t, "ichtriage_instances_indexed", "gauge", "Instances in the index.");
    add(&t, "ichtriage_instances_indexed %lld\n", (long long)m.instances);
    metric(&t, "ichtriage_associations_active", "gauge", "DICOM associations open now.");
    add(&t, "ichtriage_associations_active %d\n", h->scp ? scp_server_active(h->scp) : 0);
    metric(&t, "ichtriage_series_completed_total", "counter",
           "Series found complete (quiet period or expected count).");
    add(&t, "ichtriage_series_completed_total %lld\n", (long long)m.series_completed);
    metric(&t, "ichtriage_studies", "gauge", "Studies by status.");
    for (int i = 0; i < 8; i++)
        add(&t, "ichtriage_studies{status=\"%s\"} %lld\n", db_metrics_status_names[i],
            (long long)m.studies_by_status[i]);
    metric(&t, "ichtriage_queue_depth", "gauge", "Triage jobs waiting or running.");
    add(&t, "ichtriage_queue_depth{state=\"queued\"} %lld\n", (long long)m.jobs_queued);
    add(&t, "ichtriage_queue_depth{state=\"running\"} %lld\n", (long long)m.jobs_running);
    metric(&t, "ichtriage_jobs_done_total", "counter", "Triage jobs that produced a result.");
    add(&t, "ichtriage_jobs_done_total %lld\n", (long long)m.jobs_done);
    metric(&t, "ichtriage_jobs_failed_total", "counter", "Triage jobs that failed.");
    add(&t, "ichtriage_jobs_failed_total %lld\n", (long long)m.jobs_failed);
    struct db_outbox_counts oc;
    if (db_outbox_counts(h->db, &oc) == 0) {
        metric(&t, "ichtriage_pacs_deliveries", "gauge",
               "Result objects (SR, SC) to PACS destinations, by state; failed: given up;"
               " dismissed: given up, then let go by an admin.");
        add(&t, "ichtriage_pacs_deliveries{state=\"pending\"} %lld\n", (long long)oc.pending);
        add(&t, "ichtriage_pacs_deliveries{state=\"sent\"} %lld\n", (long long)oc.sent);
        add(&t, "ichtriage_pacs_deliveries{state=\"failed\"} %lld\n", (long long)oc.failed);
        add(&t, "ichtriage_pacs_deliveries{state=\"dismissed\"} %lld\n", (long long)oc.dismissed);
        metric(&t, "ichtriage_pacs_results_not_built", "gauge",
               "Results whose objects for PACS could not be built (given up).");
        add(&t, "ichtriage_pacs_results_not_built %lld\n", (long long)oc.revisions_failed);
    }
    metric(&t, "ichtriage_triage_latency_seconds", "histogram",
           "From a series' job being queued to its result.");
    for (int b = 0; b < DB_LATENCY_BUCKETS; b++) {
        if (db_latency_bounds[b] < 0)
            add(&t, "ichtriage_triage_latency_seconds_bucket{le=\"+Inf\"} %lld\n",
                (long long)m.latency_le[b]);
        else
            add(&t, "ichtriage_triage_latency_seconds_bucket{le=\"%g\"} %lld\n",
                db_latency_bounds[b], (long long)m.latency_le[b]);
    }
    add(&t, "ichtriage_triage_latency_seconds_sum %.3f\n", m.latency_sum);
    add(&t, "ichtriage_triage_latency_seconds_count %lld\n", (long long)m.latency_count);

    char version[160] = "", why[1200] = "", lv[400];
    bool loaded =
        h->infer && triage_infer_model(h->infer, version, sizeof version, why, sizeof why);
    label_value(lv, sizeof lv, version);
    metric(&t, "ichtriage_model_loaded", "gauge", "1 when a model is loaded, with its version.");
    add(&t, "ichtriage_model_loaded{version=\"%s\"} %d\n", lv, loaded ? 1 : 0);

    struct statvfs vfs;
    if (h->store && statvfs(h->store->spool, &vfs) == 0) {
        metric(&t, "ichtriage_spool_free_bytes", "gauge",
               "Free bytes (for the node's user) in the spool's file system.");
        add(&t, "ichtriage_spool_free_bytes %llu\n",
            (unsigned long long)vfs.f_bavail * (unsigned long long)vfs.f_frsize);
    }

    metric(&t, "ichtriage_reviews", "gauge",
           "Reviewed studies by the model's flag and the radiologist's finding.");
    add(&t, "ichtriage_reviews{flagged=\"true\",hemorrhage=\"true\"} %lld\n",
        (long long)m.review_tp);
    add(&t, "ichtriage_reviews{flagged=\"true\",hemorrhage=\"false\"} %lld\n",
        (long long)m.review_fp);
    add(&t, "ichtriage_reviews{flagged=\"false\",hemorrhage=\"true\"} %lld\n",
        (long long)m.review_fn);
    add(&t, "ichtriage_reviews{flagged=\"false\",hemorrhage=\"false\"} %lld\n",
        (long long)m.review_tn);
    if (m.review_tp + m.review_fn > 0) {
        metric(&t, "ichtriage_live_sensitivity", "gauge",
               "Flagged among reviewed studies with hemorrhage.");
        add(&t, "ichtriage_live_sensitivity %.4f\n",
            (double)m.review_tp / (double)(m.review_tp + m.review_fn));
    }
    if (m.review_tp + m.review_fp > 0) {
        metric(&t, "ichtriage_live_ppv", "gauge",
               "Hemorrhage among reviewed flagged studies (positive predictive value).");
        add(&t, "ichtriage_live_ppv %.4f\n",
            (double)m.review_tp / (double)(m.review_tp + m.review_fp));
    }
    metric(&t, "ichtriage_event_streams", "gauge", "Web pages listening for events.");
    add(&t, "ichtriage_event_streams %d\n", h->nsse);
    int rc = t.p ? http_send(req, 200, "text/plain; version=0.0.4; charset=utf-8", t.p, t.len)
                 : http_send(req, 500, "text/plain", "out of memory\n", 14);
    free(t.p);
    return rc;
}

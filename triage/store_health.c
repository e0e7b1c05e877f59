/* triage/store_health.c: whether stores are failing now (see store_health.h). */
#include "store_health.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

/* The file's fixed size: rewritten in place, it never needs a new block. */
#define STATE_BYTES 4096

struct facts {
    int64_t window_ms, last_failure_ms, last_success_ms;
    long long since_success;
    int count;
    int64_t at[TRIAGE_STORE_HEALTH_RECENT];
    bool failed[TRIAGE_STORE_HEALTH_RECENT];
    const char *why, *reason;
};

static void judge(const struct facts *f, int64_t now_ms, struct triage_store_verdict *v)
{
    memset(v, 0, sizeof *v);
    v->window_ms = f->window_ms;
    v->last_failure_ms = f->last_failure_ms;
    v->last_success_ms = f->last_success_ms;
    v->since_success = f->since_success;
    v->failing = f->last_failure_ms > 0 && (f->last_failure_ms >= f->last_success_ms ||
                                            now_ms - f->last_failure_ms < f->window_ms);
    for (int i = 0; i < f->count; i++) {
        if (now_ms - f->at[i] >= f->window_ms) continue;
        v->recent_total++;
        v->recent_failed += f->failed[i];
    }
    snprintf(v->why, sizeof v->why, "%s", f->why ? f->why : "");
    snprintf(v->reason, sizeof v->reason, "%s", f->reason ? f->reason : "");
}

static void facts_of(struct triage_store_health *h, struct facts *f)
{
    *f = (struct facts){.window_ms = h->window_ms,
                        .last_failure_ms = h->last_failure_ms,
                        .last_success_ms = h->last_success_ms,
                        .since_success = h->since_success,
                        .count = h->count,
                        .why = h->last_failure_ms ? scp_refusal_name(h->last_why) : "",
                        .reason = h->last_reason};
    for (int i = 0; i < h->count; i++) {
        f->at[i] = h->recent[i].at_ms;
        f->failed[i] = h->recent[i].failed;
    }
}

/* Writes the facts over the file's fixed-size content; under h->mu. */
static void write_state(struct triage_store_health *h)
{
    if (h->fd < 0) return;
    struct facts f;
    facts_of(h, &f);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "pid", (double)getpid());
    cJSON_AddNumberToObject(o, "window_ms", (double)f.window_ms);
    cJSON_AddNumberToObject(o, "last_failure_ms", (double)f.last_failure_ms);
    cJSON_AddNumberToObject(o, "last_success_ms", (double)f.last_success_ms);
    cJSON_AddNumberToObject(o, "since_success", (double)f.since_success);
    cJSON_AddStringToObject(o, "why", f.why);
    cJSON_AddStringToObject(o, "reason", f.reason);
    cJSON *recent = cJSON_AddArrayToObject(o, "recent");
    for (int i = 0; recent && i < f.count; i++)
        cJSON_AddItemToArray(recent,
                             cJSON_CreateNumber(f.failed[i] ? -(double)f.at[i] : (double)f.at[i]));
    char *text = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    char buf[STATE_BYTES];
    memset(buf, ' ', sizeof buf);
    buf[sizeof buf - 1] = '\n';
    size_t len = text ? strlen(text) : 0;
    if (text && len < sizeof buf - 1) memcpy(buf, text, len);
    free(text);
    if (pwrite(h->fd, buf, sizeof buf, 0) != (ssize_t)sizeof buf) {
        /* Said once: the state in memory (healthz, metrics) is still right. */
        util_log(UTIL_LOG_WARN, "store_health_unwritten", "error=\"%s\"", strerror(errno));
        close(h->fd);
        h->fd = -1;
    }
}

void triage_store_health_init(struct triage_store_health *h, const char *store_dir,
                              int64_t window_seconds)
{
    memset(h, 0, sizeof *h);
    pthread_mutex_init(&h->mu, NULL);
    h->window_ms = window_seconds * 1000;
    char path[1200];
    snprintf(path, sizeof path, "%s/%s", store_dir, TRIAGE_STORE_HEALTH_FILE);
    h->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (h->fd < 0 || ftruncate(h->fd, STATE_BYTES) != 0 ||
        posix_fallocate(h->fd, 0, STATE_BYTES) != 0) {
        util_log(UTIL_LOG_WARN, "store_health_unwritten", "path=%s error=\"%s\"", path,
                 strerror(errno));
        if (h->fd >= 0) close(h->fd);
        h->fd = -1;
    }
    write_state(h);
}

void triage_store_health_free(struct triage_store_health *h)
{
    if (!h) return;
    if (h->fd >= 0) close(h->fd);
    h->fd = -1;
    pthread_mutex_destroy(&h->mu);
}

bool triage_store_health_record(struct triage_store_health *h, int64_t now_ms, unsigned status,
                                enum scp_refusal why, const char *reason)
{
    bool failed = status != SCP_STATUS_SUCCESS;
    if (failed && !scp_refusal_is_local(why)) return false;
    pthread_mutex_lock(&h->mu);
    struct facts f;
    struct triage_store_verdict before, after;
    facts_of(h, &f);
    judge(&f, now_ms, &before);
    bool was_failing_last = h->since_success > 0;
    h->recent[h->next].at_ms = now_ms;
    h->recent[h->next].failed = failed;
    h->next = (h->next + 1) % TRIAGE_STORE_HEALTH_RECENT;
    if (h->count < TRIAGE_STORE_HEALTH_RECENT) h->count++;
    long long refused = h->since_success;
    if (failed) {
        h->last_failure_ms = now_ms;
        h->since_success++;
        h->last_why = why;
        snprintf(h->last_reason, sizeof h->last_reason, "%s", reason ? reason : "");
    } else {
        h->last_success_ms = now_ms;
        h->since_success = 0;
    }
    facts_of(h, &f);
    judge(&f, now_ms, &after);
    /* The file follows every refusal and the success that ends a run of
     * them; later successes change nothing a reader would conclude. */
    if (failed || was_failing_last) write_state(h);
    pthread_mutex_unlock(&h->mu);
    if (failed && !was_failing_last)
        util_log(UTIL_LOG_ERROR, "stores_failing", "why=%s reason=\"%s\"", scp_refusal_name(why),
                 reason ? reason : "");
    else if (!failed && was_failing_last)
        util_log(UTIL_LOG_INFO, "stores_succeeding", "refused_before=%lld", refused);
    return before.failing != after.failing;
}

void triage_store_health_verdict(struct triage_store_health *h, int64_t now_ms,
                                 struct triage_store_verdict *out)
{
    pthread_mutex_lock(&h->mu);
    struct facts f;
    facts_of(h, &f);
    judge(&f, now_ms, out);
    pthread_mutex_unlock(&h->mu);
}

static void iso8601(int64_t ms, char *out, size_t n)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(out, n, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

void triage_store_verdict_text(const struct triage_store_verdict *v, char *out, size_t n)
{
    char when[32];
    iso8601(v->last_failure_ms, when, sizeof when);
    if (v->recent_failed > 0)
        snprintf(out, n,
                 "stores failing: %d of the last %d stores refused (A700) in the last %lld s, "
                 "last at %s: %s: %s",
                 v->recent_failed, v->recent_total, (long long)(v->window_ms / 1000), when, v->why,
                 v->reason);
    else
        snprintf(out, n,
                 "stores failing: %lld refused (A700) since the last success, last at %s: "
                 "%s: %s",
                 v->since_success, when, v->why, v->reason);
}

static int64_t num(const cJSON *o, const char *key)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(x) ? (int64_t)x->valuedouble : 0;
}

int triage_store_health_read(const char *store_dir, int64_t now_ms,
                             struct triage_store_verdict *out)
{
    char path[1200], buf[STATE_BYTES + 1];
    snprintf(path, sizeof path, "%s/%s", store_dir, TRIAGE_STORE_HEALTH_FILE);
    /* The node rewrites the file in place: a torn read does not parse, and
     * is read again. */
    for (int attempt = 0; attempt < 3; attempt++) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) return -1;
        ssize_t got = pread(fd, buf, STATE_BYTES, 0);
        close(fd);
        if (got <= 0) return -1;
        buf[got] = 0;
        cJSON *o = cJSON_Parse(buf);
        if (!o) continue;
        struct facts f = {.window_ms = num(o, "window_ms"),
                          .last_failure_ms = num(o, "last_failure_ms"),
                          .last_success_ms = num(o, "last_success_ms"),
                          .since_success = (long long)num(o, "since_success")};
        const cJSON *why = cJSON_GetObjectItemCaseSensitive(o, "why");
        const cJSON *reason = cJSON_GetObjectItemCaseSensitive(o, "reason");
        f.why = cJSON_IsString(why) ? why->valuestring : "";
        f.reason = cJSON_IsString(reason) ? reason->valuestring : "";
        const cJSON *e;
        cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(o, "recent"))
        {
            if (f.count >= TRIAGE_STORE_HEALTH_RECENT || !cJSON_IsNumber(e)) break;
            f.failed[f.count] = e->valuedouble < 0;
            f.at[f.count++] = (int64_t)(e->valuedouble < 0 ? -e->valuedouble : e->valuedouble);
        }
        judge(&f, now_ms, out);
        cJSON_Delete(o);
        return 0;
    }
    return -1;
}

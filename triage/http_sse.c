/* triage/http_sse.c: server-sent events (GET /api/events) and what is
 * pushed on them. Each event "worklist" carries the rows that are new or
 * changed, the uids of rows that left, the order of the open list when it
 * changed, the uids of studies newly flagged (for the page's sound and
 * notification, and the webhook), and how many studies the open list's
 * age window leaves out; a stream's first event carries all.
 * An event "ping" every SSE_PING_MS keeps proxies and the page's watchdog
 * content. The server owns each stream (struct http_sse) until h2o stops it
 * or the server ends it. */
#include "http_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/pidfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include "child.h"
#include "log.h"
#include "rows.h"

#define SSE_PENDING_MAX (1 << 20) /* backlog per slow client (one event may be bigger) */
#define SSE_PING_MS 15000
/* Streams of one user, all their sessions together (on loopback, one
 * client address), of HTTP_MAX_SSE: well above a reader's open tabs. A stream whose client went
 * away stays until a write to it fails (the next ping): one client opening
 * streams in a loop must not take every slot from the other readers. */
#define SSE_PER_CLIENT_MAX 16
/* While streams are open, the degraded states are read again this often:
 * some start or end with no worklist change (a delivery to PACS given up on
 * its own thread, a window of the last hour or day ending); and so is
 * whether a study grew old enough for the age window to leave it out. */
#define SSE_CHECK_MS 5000

struct http_sse {
    h2o_generator_t super; /* first: h2o hands it back */
    struct triage_http *h;
    h2o_req_t *req;
    char *inflight; /* owned; being written until proceed() */
    char *pending;  /* owned; what waits for the write in progress */
    size_t pending_len;
    bool ending;      /* send the final chunk once the write in progress ends */
    char session[65]; /* the login session it belongs to; "" on loopback */
    char client[65];  /* whose streams count together: the user, else the address */
};

static void sse_remove(struct http_sse *s)
{
    struct triage_http *h = s->h;
    for (int i = 0; i < h->nsse; i++)
        if (h->sse[i] == s) {
            h->sse[i] = h->sse[--h->nsse];
            break;
        }
    free(s->inflight);
    free(s->pending);
    free(s);
}

static void sse_flush(struct http_sse *s)
{
    if (s->inflight) return;
    if (s->pending_len) {
        s->inflight = s->pending;
        h2o_iovec_t buf = h2o_iovec_init(s->inflight, s->pending_len);
        s->pending = NULL;
        s->pending_len = 0;
        h2o_send(s->req, &buf, 1, H2O_SEND_STATE_IN_PROGRESS);
    } else if (s->ending) {
        s->req->http1_is_persistent = 0;
        h2o_send(s->req, NULL, 0, H2O_SEND_STATE_FINAL);
        sse_remove(s); /* h2o no longer calls back after the final send */
    }
}

static void sse_proceed(h2o_generator_t *g, h2o_req_t *req)
{
    (void)req;
    struct http_sse *s = (struct http_sse *)g;
    free(s->inflight);
    s->inflight = NULL;
    sse_flush(s);
}

static void sse_stop(h2o_generator_t *g, h2o_req_t *req)
{
    (void)req;
    sse_remove((struct http_sse *)g);
}

static void sse_queue(struct http_sse *s, const char *text, size_t len)
{
    if (s->ending) return;
    if (s->pending_len > 0 && s->pending_len + len > SSE_PENDING_MAX) {
        /* Too far behind: the stream ends after the write in progress (a
         * write is in progress, or nothing would be pending) and the page
         * reconnects (EventSource does), starting again from a full event. */
        free(s->pending);
        s->pending = NULL;
        s->pending_len = 0;
        s->ending = true;
        return;
    }
    char *grown = realloc(s->pending, s->pending_len + len);
    if (!grown) return;
    memcpy(grown + s->pending_len, text, len);
    s->pending = grown;
    s->pending_len += len;
    sse_flush(s);
}

static char *format_event(struct triage_http *h, const char *event, const char *data, size_t *len)
{
    size_t n = strlen(data) + strlen(event) + 64;
    char *text = malloc(n);
    if (!text) return NULL;
    /* data is one line (cJSON unformatted): one data: field. */
    *len = (size_t)snprintf(text, n, "id: %lld\nevent: %s\ndata: %s\n\n", (long long)++h->event_id,
                            event, data);
    return text;
}

void http_sse_broadcast(struct triage_http *h, const char *event, const char *data)
{
    size_t len;
    char *text = format_event(h, event, data, &len);
    if (!text) return;
    for (int i = 0; i < h->nsse; i++)
        sse_queue(h->sse[i], text, len);
    free(text);
}

void http_sse_end_dead_sessions(struct triage_http *h)
{
    /* sse_flush may remove a stream from the array: walk a copy. */
    struct http_sse *all[HTTP_MAX_SSE];
    int n = h->nsse;
    memcpy(all, h->sse, sizeof all);
    for (int i = 0; i < n; i++)
        if (!http_auth_session_live(h, all[i]->session)) {
            all[i]->ending = true;
            sse_flush(all[i]);
        }
}

/* FNV-1a of the degraded list's text: what pages last heard, in short. */
static uint64_t degraded_hash(const cJSON *degraded)
{
    char *text = cJSON_PrintUnformatted(degraded);
    uint64_t hash = 1469598103934665603ULL;
    for (const char *p = text ? text : ""; *p; p++)
        hash = (hash ^ (unsigned char)*p) * 1099511628211ULL;
    free(text);
    return hash;
}

static void on_ping(uv_timer_t *t)
{
    struct triage_http *h = t->data;
    if (h->nsse > 0) {
        cJSON *degraded = http_degraded(h);
        /* A claim that lapsed (its reader left) changes its row with no
         * event of its own; a study the age window kept grew old enough to
         * leave: no study changed, but the list did. */
        bool lapsed = h->claim_lapses_at_ms && http_now_ms() >= h->claim_lapses_at_ms;
        bool aged = h->hidden.next_ms &&
                    triage_worklist_since(http_now_ms(), h->worklist_days) > h->hidden.next_ms;
        if (lapsed || aged || (degraded && degraded_hash(degraded) != h->degraded_pushed))
            http_push_now(h);
        cJSON_Delete(degraded);
    }
    if (++h->ping_ticks % (SSE_PING_MS / SSE_CHECK_MS) != 0) return;
    http_sse_end_dead_sessions(h); /* logged out or expired */
    /* An event, not a comment: EventSource hands comments to nobody, and the
     * page needs to hear that the stream is alive (its watchdog: a
     * connection that died without FIN or RST stays open for ever). */
    static const char ping[] = "event: ping\ndata: {}\n\n";
    for (int i = 0; i < h->nsse; i++)
        if (!h->sse[i]->pending_len) sse_queue(h->sse[i], ping, sizeof ping - 1);
}

static int snap_cmp(const void *a, const void *b)
{
    return strcmp(((const struct http_snapshot_row *)a)->uid,
                  ((const struct http_snapshot_row *)b)->uid);
}

static const struct http_snapshot_row *snap_find(const struct http_snapshot_row *snap, int n,
                                                 const char *uid)
{
    struct http_snapshot_row key;
    snprintf(key.uid, sizeof key.uid, "%s", uid);
    return n ? bsearch(&key, snap, (size_t)n, sizeof *snap, snap_cmp) : NULL;
}

/* The event's fields that every worklist event has. */
static void add_tail(struct triage_http *h, cJSON *ev, cJSON *flagged, cJSON *hidden)
{
    cJSON_AddItemToObject(ev, "new_flagged", flagged);
    cJSON_AddItemToObject(ev, "hidden", hidden);
    cJSON_AddItemToObject(ev, "degraded", http_degraded(h));
}

/* The worklist event against the last snapshot, which it replaces: "rows"
 * that are new or changed, "removed" uids, "order" (every uid in list
 * order) when the order changed, "new_flagged" uids. With full_ev, also
 * *full_ev, from the same read of the list: every row and the order (a new
 * stream's first event, "full": true), to which later events relate. Also
 * hands the newly flagged rows to *new_flagged_rows. NULL on error. */
static cJSON *worklist_event(struct triage_http *h, cJSON **full_ev, cJSON **new_flagged_rows)
{
    *new_flagged_rows = NULL;
    if (full_ev) *full_ev = NULL;
    int64_t since = triage_worklist_since(http_now_ms(), h->worklist_days);
    cJSON *list = http_worklist_json(h, NULL, since);
    cJSON *hidden = list ? http_worklist_hidden_json(h, since) : NULL;
    if (!hidden) {
        cJSON_Delete(list);
        return NULL;
    }
    int n = cJSON_GetArraySize(list);
    struct http_snapshot_row *snap = calloc((size_t)(n ? n : 1), sizeof *snap);
    cJSON *ev = cJSON_CreateObject();
    cJSON *rows = cJSON_CreateArray(), *removed = cJSON_CreateArray(),
          *flagged = cJSON_CreateArray(), *order = cJSON_CreateArray();
    *new_flagged_rows = cJSON_CreateArray();
    if (!snap || !ev || !rows || !removed || !flagged || !order || !*new_flagged_rows) {
        free(snap);
        cJSON_Delete(list);
        cJSON_Delete(hidden);
        cJSON_Delete(ev);
        cJSON_Delete(rows);
        cJSON_Delete(removed);
        cJSON_Delete(flagged);
        cJSON_Delete(order);
        cJSON_Delete(*new_flagged_rows);
        *new_flagged_rows = NULL;
        return NULL;
    }
    bool order_changed = n != h->nsnap;
    int i = 0;
    for (cJSON *r = list->child; r; r = r->next, i++) {
        const char *uid = cJSON_GetStringValue(cJSON_GetObjectItem(r, "study_uid"));
        snprintf(snap[i].uid, sizeof snap[i].uid, "%s", uid ? uid : "");
        snap[i].json = cJSON_PrintUnformatted(r);
        snap[i].flagged = cJSON_IsTrue(cJSON_GetObjectItem(r, "flagged"));
        snap[i].rank = i;
        cJSON_AddItemToArray(order, cJSON_CreateString(snap[i].uid));
        const struct http_snapshot_row *old = snap_find(h->snap, h->nsnap, snap[i].uid);
        if (!old || old->rank != i) order_changed = true;
        if (!old || !old->json || !snap[i].json || strcmp(old->json, snap[i].json) != 0)
            cJSON_AddItemToArray(rows, cJSON_Duplicate(r, true));
        if (h->snap_ready && snap[i].flagged && (!old || !old->flagged)) {
            cJSON_AddItemToArray(flagged, cJSON_CreateString(snap[i].uid));
            cJSON_AddItemToArray(*new_flagged_rows, cJSON_Duplicate(r, true));
        }
    }
    qsort(snap, (size_t)n, sizeof *snap, snap_cmp);
    for (int k = 0; k < h->nsnap; k++)
        if (!snap_find(snap, n, h->snap[k].uid))
            cJSON_AddItemToArray(removed, cJSON_CreateString(h->snap[k].uid));
    for (int k = 0; k < h->nsnap; k++)
        free(h->snap[k].json);
    free(h->snap);
    h->snap = snap;
    h->nsnap = n;
    h->snap_ready = true;
    if (full_ev && (*full_ev = cJSON_CreateObject()) != NULL) {
        /* The list itself becomes its rows: no copy of a long list. */
        cJSON_AddBoolToObject(*full_ev, "full", true);
        cJSON_AddItemToObject(*full_ev, "rows", list);
        cJSON_AddItemToObject(*full_ev, "removed", cJSON_CreateArray());
        cJSON_AddItemToObject(*full_ev, "order", cJSON_Duplicate(order, true));
        add_tail(h, *full_ev, cJSON_CreateArray(), cJSON_Duplicate(hidden, true));
    } else {
        cJSON_Delete(list);
    }
    cJSON_AddBoolToObject(ev, "full", false);
    cJSON_AddItemToObject(ev, "rows", rows);
    cJSON_AddItemToObject(ev, "removed", removed);
    if (order_changed)
        cJSON_AddItemToObject(ev, "order", order);
    else
        cJSON_Delete(order);
    add_tail(h, ev, flagged, hidden);
    return ev;
}

/* The webhook: curl posts a small JSON (no patient name) to http.webhook.
 * It gets nothing of the node's but the body on its stdin and the log on
 * stderr (util_spawn): a listening socket it held would keep a node started
 * again from listening until it ended (up to its 10 s). Its end is seen on
 * a pidfd, which libuv polls like any descriptor. */
struct webhook_run {
    uv_poll_t ended; /* on pidfd: readable once curl has exited */
    uv_pipe_t in;
    uv_write_t wr;
    pid_t pid;
    int pidfd;
    char *body;
    int open; /* handles still to close */
};

static void webhook_closed(uv_handle_t *hd)
{
    struct webhook_run *w = hd->data;
    if (--w->open == 0) {
        close(w->pidfd);
        free(w->body);
        free(w);
    }
}

/* A curl that cannot be watched is ended and reaped at once, so that no
 * zombie is left behind; it is killed, so the wait is short. */
static int webhook_reap(pid_t pid, int *st, bool kill_it)
{
    if (kill_it) kill(pid, SIGKILL);
    pid_t got;
    while ((got = waitpid(pid, st, kill_it ? 0 : WNOHANG)) < 0 && errno == EINTR) {
    }
    return got;
}

static void webhook_exit(uv_poll_t *p, int status, int events)
{
    (void)events;
    struct webhook_run *w = p->data;
    int st = 0;
    pid_t got = webhook_reap(w->pid, &st, status < 0);
    if (got == 0) return; /* not ended yet */
    if (got < 0)
        util_log(UTIL_LOG_WARN, "webhook_failed", "reason=\"cannot wait for curl: %s\"",
                 strerror(errno));
    else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        util_log(UTIL_LOG_WARN, "webhook_failed", "exit=%d signal=%d",
                 WIFEXITED(st) ? WEXITSTATUS(st) : 0, WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    uv_close((uv_handle_t *)p, webhook_closed);
}

static void webhook_written(uv_write_t *wr, int status)
{
    (void)status;
    struct webhook_run *w = wr->data;
    uv_close((uv_handle_t *)&w->in, webhook_closed);
}

static void webhook_send(struct triage_http *h, const cJSON *row)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "event", "flagged");
    const char *keep[] = {"study_uid",   "accession",  "probability",   "subtypes",
                          "received_at", "updated_at", "model_version", "notice"};
    for (size_t i = 0; i < sizeof keep / sizeof keep[0]; i++) {
        cJSON *v = cJSON_GetObjectItem(row, keep[i]);
        if (v) cJSON_AddItemToObject(o, keep[i], cJSON_Duplicate(v, true));
    }
    struct webhook_run *w = calloc(1, sizeof *w);
    char *body = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!w || !body) {
        free(w);
        free(body);
        return;
    }
    w->body = body;
    char *args[] = {"curl",
                    "-sS",
                    "-m",
                    "10",
                    "--fail",
                    "-X",
                    "POST",
                    "-H",
                    "Content-Type: application/json",
                    "--data-binary",
                    "@-",
                    h->webhook,
                    NULL};
    int body_pipe[2], rc = 0;
    const char *what = "cannot start curl";
    if (pipe2(body_pipe, O_CLOEXEC) != 0) {
        rc = errno;
    } else {
        rc = util_spawn(&w->pid, "curl", args, NULL, body_pipe[0], -1);
        close(body_pipe[0]);
        if (rc != 0) close(body_pipe[1]);
    }
    w->pidfd = -1;
    if (rc == 0) {
        what = "cannot watch curl";
        w->pidfd = pidfd_open(w->pid, 0);
        rc = w->pidfd < 0 ? -errno : uv_poll_init(h->loop, &w->ended, w->pidfd);
        if (rc != 0) {
            webhook_reap(w->pid, NULL, true);
            close(body_pipe[1]);
            if (w->pidfd >= 0) close(w->pidfd);
        }
    }
    if (rc != 0) {
        util_log(UTIL_LOG_WARN, "webhook_failed", "reason=\"%s: %s\"", what,
                 rc > 0 ? strerror(rc) : uv_strerror(rc));
        free(w->body);
        free(w);
        return;
    }
    /* From here both handles are closed, and w is freed by the last close. */
    w->open = 2;
    uv_pipe_init(h->loop, &w->in, 0);
    w->in.data = w->ended.data = w->wr.data = w;
    uv_poll_start(&w->ended, UV_READABLE, webhook_exit);
    uv_buf_t buf = uv_buf_init(w->body, (unsigned)strlen(w->body));
    rc = uv_pipe_open(&w->in, body_pipe[1]);
    if (rc != 0) close(body_pipe[1]);
    if (rc != 0 || uv_write(&w->wr, (uv_stream_t *)&w->in, &buf, 1, webhook_written) != 0) {
        /* No body to send: curl must not post an empty one. */
        kill(w->pid, SIGKILL);
        uv_close((uv_handle_t *)&w->in, webhook_closed);
    }
}

/* Pushes what changed since the last push to the streams and the webhook;
 * with full_ev, also makes a new stream's first event, from the same read
 * of the list (NULL on error). */
static void push_now(struct triage_http *h, cJSON **full_ev)
{
    if (h->push_ready) uv_timer_stop(&h->push);
    if (h->nsse == 0 && !h->webhook[0] && !full_ev) {
        /* Nobody to tell: no work on the loop. The next push starts a new
         * snapshot, without calling what is already flagged new. */
        h->snap_ready = false;
        return;
    }
    uint64_t t0 = uv_hrtime();
    struct db_worklist_hidden hidden = h->hidden;
    cJSON *flagged_rows = NULL;
    cJSON *ev = worklist_event(h, full_ev, &flagged_rows);
    /* A long list makes a push cost tens of milliseconds: pushes then come
     * less often, so that they take at most a fifth of the loop. */
    uint64_t cost_ms = (uv_hrtime() - t0) / 1000000;
    h->push_delay_ms = cost_ms * 4 < HTTP_PUSH_DELAY_MS       ? HTTP_PUSH_DELAY_MS
                       : cost_ms * 4 > HTTP_PUSH_DELAY_MAX_MS ? HTTP_PUSH_DELAY_MAX_MS
                                                              : cost_ms * 4;
    if (!ev) return;
    /* A degraded state that starts or ends (stores failing, a model that
     * loads) changes no row, yet the page's banner must follow it. */
    uint64_t hash = degraded_hash(cJSON_GetObjectItem(ev, "degraded"));
    bool any = cJSON_GetArraySize(cJSON_GetObjectItem(ev, "rows")) > 0 ||
               cJSON_GetArraySize(cJSON_GetObjectItem(ev, "removed")) > 0 ||
               cJSON_GetObjectItem(ev, "order") || hash != h->degraded_pushed ||
               hidden.triaged != h->hidden.triaged ||
               hidden.not_applicable != h->hidden.not_applicable;
    h->degraded_pushed = hash;
    if (any && h->nsse > 0) {
        char *text = cJSON_PrintUnformatted(ev);
        if (text) http_sse_broadcast(h, "worklist", text);
        free(text);
    }
    for (cJSON *r = flagged_rows ? flagged_rows->child : NULL; r; r = r->next) {
        util_log(UTIL_LOG_INFO, "flagged_new", "study=%s",
                 cJSON_GetStringValue(cJSON_GetObjectItem(r, "study_uid")));
        if (h->webhook[0]) webhook_send(h, r);
    }
    cJSON_Delete(flagged_rows);
    cJSON_Delete(ev);
}

void http_push_now(struct triage_http *h)
{
    push_now(h, NULL);
}

static void on_push(uv_timer_t *t)
{
    http_push_now(t->data);
}

void triage_http_changed(struct triage_http *h)
{
    /* Bursts (hundreds of instances a second) make one push. */
    if (!h || !h->push_ready || uv_is_active((uv_handle_t *)&h->push)) return;
    uv_timer_start(&h->push, on_push, h->push_delay_ms ? h->push_delay_ms : HTTP_PUSH_DELAY_MS, 0);
}

/* A stream that cannot start with the whole list is refused: the page
 * would have nothing for later events to apply to. */
static int sse_refuse(struct http_sse *s, h2o_req_t *req)
{
    free(s);
    util_log(UTIL_LOG_WARN, "events_refused", "reason=\"cannot read the worklist\"");
    return http_send_error(req, 503, "cannot read the worklist; try again");
}

int http_sse_open(struct triage_http *h, h2o_req_t *req, const struct http_who *who)
{
    if (h->nsse >= HTTP_MAX_SSE) return http_send_error(req, 503, "too many event streams");
    char client[sizeof((struct http_sse *)0)->client], peer[64];
    http_peer(h, req, peer, sizeof peer);
    /* Per user, not per session: one user may hold HTTP_USER_SESSIONS. */
    snprintf(client, sizeof client, "%s", who->session[0] ? who->user : peer);
    int mine = 0;
    for (int i = 0; i < h->nsse; i++)
        mine += strcmp(h->sse[i]->client, client) == 0;
    if (mine >= SSE_PER_CLIENT_MAX) {
        util_log(UTIL_LOG_WARN, "events_refused",
                 "reason=\"too many streams from one client\" user=%s peer=%s streams=%d",
                 who->user, peer, mine);
        return http_send_error(req, 503, "too many event streams from this client");
    }
    struct http_sse *s = calloc(1, sizeof *s);
    if (!s) return http_send_error(req, 503, "out of memory");
    s->super.proceed = sse_proceed;
    s->super.stop = sse_stop;
    s->h = h;
    s->req = req;
    snprintf(s->session, sizeof s->session, "%s", who->session);
    memcpy(s->client, client, sizeof client);
    /* Changes not pushed yet go to the other streams (and the webhook) now:
     * this one's later events are then relative to the full state it starts
     * with, every row and the order, so a page needs nothing else. One read
     * of the list makes both (it had been read twice: most of a first
     * event's time on a long list). */
    cJSON *ev = NULL;
    push_now(h, &ev);
    if (ev) h->degraded_pushed = degraded_hash(cJSON_GetObjectItem(ev, "degraded"));
    char *text = ev ? cJSON_PrintUnformatted(ev) : NULL;
    cJSON_Delete(ev);
    size_t len;
    char *msg = text ? format_event(h, "worklist", text, &len) : NULL;
    free(text);
    if (!msg) return sse_refuse(s, req);
    h->sse[h->nsse++] = s;
    req->res.status = 200;
    req->res.reason = "OK";
    http_add_header(req, "content-type", "text/event-stream; charset=utf-8");
    http_add_header(req, "cache-control", "no-store");
    http_add_header(req, "x-accel-buffering", "no");
    h2o_start_response(req, &s->super);
    static const char hello[] = "retry: 3000\n\n";
    sse_queue(s, hello, sizeof hello - 1);
    sse_queue(s, msg, len);
    free(msg);
    if (!uv_is_active((uv_handle_t *)&h->ping)) {
        h->ping.data = h;
        uv_timer_start(&h->ping, on_ping, SSE_CHECK_MS, SSE_CHECK_MS);
    }
    return 0;
}

void http_sse_stop(struct triage_http *h)
{
    /* sse_flush may remove the stream from the array: walk a copy. */
    struct http_sse *all[HTTP_MAX_SSE];
    int n = h->nsse;
    memcpy(all, h->sse, sizeof all);
    for (int i = 0; i < n; i++) {
        all[i]->ending = true;
        sse_flush(all[i]);
    }
}

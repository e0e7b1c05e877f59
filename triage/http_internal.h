/* triage/http*.c: what the server's files share. One struct triage_http per
 * server, owned by serve.c's node through triage_http_start/stop; all of it
 * is touched on the loop thread only. */
#ifndef TRIAGE_HTTP_INTERNAL_H
#define TRIAGE_HTTP_INTERNAL_H

#include <cjson/cJSON.h>
#include <h2o.h>
#include <stdbool.h>
#include <stdint.h>

#include "db_triage.h"
#include "http.h"

#define HTTP_MAX_BODY (64 * 1024) /* largest request body accepted */
/* An opening of a study is audited once per person in this window. */
#define HTTP_AUDIT_OPENED_MS (10 * 60 * 1000)
#define HTTP_MAX_SSE 64         /* event streams at once */
#define HTTP_MAX_SESSIONS 256   /* logged-in sessions at once */
#define HTTP_SESSION_COOKIES 16 /* session cookies of one request tried */
#define HTTP_USER_SESSIONS 16   /* of one user at once: a new one ends their oldest */
#define HTTP_MAX_USERS 256      /* users file lines */
#define HTTP_SESSION_MS (12 * 3600 * 1000LL)
#define HTTP_FAIL_MAX 5 /* failed logins per address per window */
#define HTTP_FAIL_WINDOW_MS (15 * 60 * 1000LL)
/* Failed logins per user name (from all addresses but the one it last
 * logged in from) per window: bounds guessing at one account from many
 * addresses, and lets the lock end soon after the guessing does. */
#define HTTP_NAME_FAIL_MAX 10
#define HTTP_NAME_FAIL_WINDOW_MS (5 * 60 * 1000LL)
#define HTTP_FAIL_BUCKETS 4096 /* hash chains of a failure table */
#define HTTP_HASH_KEY 32       /* bytes of a random hash key (hex text) */
/* Password checks (about 20 ms of the loop each for yescrypt), from all
 * addresses together: a burst of this many, then this many a second. */
#define HTTP_LOGIN_BURST 20
#define HTTP_LOGIN_PER_S 10
/* The most password checks, so failures, in window_ms: what a failure
 * table must hold so that it never has to forget a live entry. */
#define HTTP_FAILS_IN(window_ms) (HTTP_LOGIN_BURST + HTTP_LOGIN_PER_S * (window_ms) / 1000 + 1)
#define HTTP_USER_MAX 64
#define HTTP_PUSH_DELAY_MS 250      /* least time between pushes */
#define HTTP_PUSH_DELAY_MAX_MS 5000 /* most, however long a push takes */

struct http_sse;   /* one event stream, http_sse.c */
struct http_login; /* a login waiting for its password check, http_auth.c */
/* Logins waiting for their turn at most; more are refused (503). */
#define HTTP_LOGIN_QUEUE 64

struct http_user {
    char name[HTTP_USER_MAX];
    char hash[256];
    char last_addr[64]; /* where it last logged in from ("" not since start) */
};
struct http_session {
    char token[65], csrf[65];
    char user[HTTP_USER_MAX];
    int64_t expires_ms; /* http_clock_ms() */
};
/* Failed logins of one key (a client address, or a user name). */
struct http_fail {
    char key[HTTP_USER_MAX];
    int count;
    int next;         /* the next entry (index + 1) in its hash chain; 0 none */
    int64_t first_ms; /* http_clock_ms() of the first failure */
};
/* Failures by key, each counted for window_ms from its first. The entries
 * sit in a ring in the order they were made, which is the order they
 * expire; cap is HTTP_FAILS_IN(window_ms), so the ring is never full of
 * live entries and none is forgotten to make room for another (rotating
 * through many addresses or names resets nothing). */
struct http_fails {
    struct http_fail *ring; /* cap entries, owned */
    int cap, head, n;       /* entries held: ring[head], ... n of them */
    int64_t window_ms;
    char secret[HTTP_HASH_KEY + 1]; /* random hex: nobody can pick keys of one chain */
    int chain[HTTP_FAIL_BUCKETS];   /* first entry (index + 1) per hash; 0 none */
};

/* A snapshot of the worklist as last pushed: study uid -> the row's JSON
 * text, to push only what changed and to notice a newly flagged study.
 * Kept sorted by uid; rank is the row's place in the list. */
struct http_snapshot_row {
    char uid[65];
    char *json; /* owned */
    bool flagged;
    int rank;
};

struct triage_http {
    uv_loop_t *loop;
    struct db *db;
    struct triage_store *store;
    struct triage_infer *infer;
    struct scp_server *scp;
    char webhook[1024];
    char trusted_proxies[512]; /* ",a,b," (each address between commas), "" none */
    bool loopback;             /* no login: actions are the local user's */
    int64_t claim_ms;          /* a claim lapses this long after it was made or renewed */
    /* When the first live claim the worklist last showed lapses (wall ms;
     * 0 none): the event streams are then told, as no row changed. */
    int64_t claim_lapses_at_ms;
    bool tls;

    h2o_globalconf_t globalconf;
    h2o_context_t ctx;
    h2o_accept_ctx_t accept_ctx;
    bool ctx_ready;
    uv_tcp_t listener;
    bool listening;
    SSL_CTX *ssl;

    char local_csrf[65]; /* loopback: the CSRF token of the local user */
    struct http_user *users;
    int nusers;
    struct http_session sessions[HTTP_MAX_SESSIONS];
    struct http_fails addr_fails, name_fails;
    char probe_key[HTTP_HASH_KEY + 1]; /* random hex: http_auth_probe */
    double login_tokens;               /* password checks that may run now (HTTP_LOGIN_*) */
    int64_t login_tokens_ms;           /* http_clock_ms() of the last refill; 0 before the first */
    /* Logins in the order they came, the first one's password being
     * checked off the loop when login_running (http_auth.c). */
    struct http_login *login_head, *login_tail;
    int nlogins;
    bool login_running;

    struct http_sse *sse[HTTP_MAX_SSE];
    int nsse;
    uv_timer_t ping; /* event streams: degraded states, keep-alive comments */
    bool ping_ready;
    unsigned ping_ticks;
    uv_timer_t push; /* coalesces triage_http_changed() calls */
    bool push_ready;
    uint64_t push_delay_ms; /* 4x the last push's cost, at least HTTP_PUSH_DELAY_MS */
    int64_t event_id;
    struct http_snapshot_row *snap;
    int nsnap;
    bool snap_ready;
    uint64_t degraded_pushed; /* hash of the degraded list pages last heard */
    /* The open list's age window (http.worklist_days, 0 none), what it
     * left out when last read, and when a study it keeps leaves by age
     * alone (hidden.next_ms, 0 none): the list then changes with no study
     * changing. */
    int64_t worklist_days;
    struct db_worklist_hidden hidden;
};

/* The person behind a request: user name and CSRF token to check against. */
struct http_who {
    char user[HTTP_USER_MAX];
    const char *csrf;
    const char *session; /* the session's token; "" on loopback */
};

/* Wall-clock time (Unix ms): for what is shown or stored. */
int64_t http_now_ms(void);
/* Monotonic ms (since boot): for rate limits and session lifetimes, which a
 * step of the wall clock (NTP, an administrator) must not move. */
int64_t http_clock_ms(void);
void http_random_hex(char *out, size_t bytes); /* out: 2*bytes+1 chars */
/* Appends an audit line (db_audit_add, now); one that cannot be written is
 * logged (event=audit_failed), not lost without a word. */
void http_audit(struct triage_http *h, const char *user, const char *action, const char *study_uid,
                const char *detail);

/* Responses. Each sends and returns 0 (h2o's "handled"). */
int http_send(h2o_req_t *req, int status, const char *type, const char *body, size_t len);
int http_send_json(h2o_req_t *req, int status, cJSON *json); /* takes json */
int http_send_error(h2o_req_t *req, int status, const char *message);
/* 405 with the Allow header RFC 9110 asks for ("GET, HEAD", "GET" or
 * "POST"). */
int http_send_405(h2o_req_t *req, const char *allow);
void http_add_header(h2o_req_t *req, const char *name, const char *value);
bool http_method_is(h2o_req_t *req, const char *m);
/* Value of a header (lower-case name) into out; false when absent or longer
 * than out holds. */
bool http_header(h2o_req_t *req, const char *name, char *out, size_t n);
/* Value of the nth (from 0) cookie called name into out: 1; 0 when there
 * are not that many; -1 when that one is longer than out holds (out is then
 * unchanged, never a cut value). A browser sends several of one name when
 * they were set for other paths or by a parent domain. */
int http_cookie(h2o_req_t *req, const char *name, int nth, char *out, size_t n);
/* Decoded value of a query parameter (or form field in body) into out: 1;
 * 0 when absent; -1 when longer than out holds, named without "=" or with a
 * NUL in its value (out is then "", never a truncated value: a cut password
 * must not be checked as if whole). */
int http_param(const char *query, size_t len, const char *name, char *out, size_t n);
/* The client's address into out: the peer's, or, from an address in
 * http.trusted_proxies, the last one of its X-Forwarded-For. */
void http_peer(struct triage_http *h, h2o_req_t *req, char *out, size_t n);

/* http_auth.c */
/* A failure table counting for window_ms (http_fails_free frees it): 0, or
 * -1 out of memory. */
int http_fails_init(struct http_fails *t, int64_t window_ms);
void http_fails_free(struct http_fails *t);
/* key's failures within the window at now (http_clock_ms()); INT_MAX
 * when key has none and there is no room to count one (never, by cap,
 * while login_take holds), so that it is held rather than forgotten. */
int http_fails_count(struct http_fails *t, const char *key, int64_t now);
/* Counts one failure of key at now (not without room: see above). */
void http_fails_add(struct http_fails *t, const char *key, int64_t now);
int http_auth_load(struct triage_http *h, const char *users_file, char *err, size_t errlen);
/* The user whose hash a login as name is checked against: name's own; for
 * a name that does not exist, one picked by a keyed hash of the name, the
 * same for that name each time. So a name that does not exist costs what
 * one that does costs, whatever mix of hash kinds and costs the users file
 * holds (one fixed user's hash, when it is the only slow or fast kind,
 * told the names apart by time). NULL when there are no users. */
const struct http_user *http_auth_probe(struct triage_http *h, const char *name);
/* Who is asking: 1 with *who set, 0 not logged in (a response was NOT sent). */
int http_auth_who(struct triage_http *h, h2o_req_t *req, struct http_who *who);
/* True when the request carries who's CSRF token. */
bool http_auth_csrf_ok(h2o_req_t *req, const struct http_who *who);
/* POST /login: answered later, once its password is checked off the loop
 * (one login at a time, in order); returns 0 then. */
int http_auth_login(struct triage_http *h, h2o_req_t *req);
/* At stop: logins still waiting their turn are answered 503 (one being
 * checked finishes; h->login_running until then). */
void http_auth_login_stop(struct triage_http *h);
int http_auth_logout(struct triage_http *h, h2o_req_t *req);
/* True while the session with this token is logged in ("" : loopback). */
bool http_auth_session_live(struct triage_http *h, const char *token);
void http_auth_free(struct triage_http *h);

/* http_api.c: routes under /api/ once who is known. */
int http_api(struct triage_http *h, h2o_req_t *req, const struct http_who *who, const char *path);
/* The worklist as a JSON array: status NULL, the open list less what its
 * age window leaves out (since_ms, triage_worklist_since; 0 none); else
 * every study of that status. NULL on error. */
cJSON *http_worklist_json(struct triage_http *h, const char *status, int64_t since_ms);
/* What the open list's age window leaves out at since_ms, as the events
 * carry it: {"days", "before" (ISO-8601, null without a window), "triaged",
 * "not_applicable"}; also kept in h->hidden. NULL on error. */
cJSON *http_worklist_hidden_json(struct triage_http *h, int64_t since_ms);

/* http_sse.c */
int http_sse_open(struct triage_http *h, h2o_req_t *req, const struct http_who *who);
/* Ends the event streams of sessions no longer logged in. */
void http_sse_end_dead_sessions(struct triage_http *h);
void http_sse_broadcast(struct triage_http *h, const char *event, const char *data);
void http_sse_stop(struct triage_http *h);
/* Pushes the worklist's changes now. */
void http_push_now(struct triage_http *h);

/* http_pacs.c: GET /api/pacs/failures (deliveries to PACS given up). */
int http_pacs_failures(struct triage_http *h, h2o_req_t *req);

/* http_metrics.c */
int http_metrics(struct triage_http *h, h2o_req_t *req);
/* Degraded states for the banner and /healthz: a JSON array of reasons. */
cJSON *http_degraded(struct triage_http *h);

/* http_png.c: a slice in the brain window as PNG. */
int http_slice_png(struct triage_http *h, h2o_req_t *req, const char *study_uid,
                   const char *sop_uid);

/* web_assets.c (generated from triage/web/ at build time). */
struct triage_web_asset {
    const char *path, *type;
    const unsigned char *data;
    size_t len;
};
extern const struct triage_web_asset triage_web_assets[];

#endif

/* triage/http_auth.c: who is asking. On a loopback bind nobody logs in and
 * actions are the local user's ("local"). Elsewhere: users and crypt(3)
 * hashes (yescrypt, sha512-crypt) from http.users, a session cookie
 * (HttpOnly, Secure, SameSite=Strict) after POST /login, a CSRF token per
 * session that every POST must carry in X-CSRF-Token, at most
 * HTTP_FAIL_MAX failed logins per address per HTTP_FAIL_WINDOW_MS and
 * HTTP_NAME_FAIL_MAX per user name per HTTP_NAME_FAIL_WINDOW_MS. */
#include "http_internal.h"

#include <crypt.h>
#include <limits.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "db_web.h"
#include "log.h"

/* __Host-: a browser keeps it only from a secure origin, for Path=/ and
 * without Domain, so neither a neighbouring host of a parent domain nor a
 * plain-HTTP answer can set one beside ours. */
#define COOKIE "__Host-ichtriage_session"

/* A hash of key under secret (random), so that nobody can pick names or
 * addresses that all hash alike. */
static uint32_t keyed_hash(const char secret[HTTP_HASH_KEY], const char *key)
{
    unsigned char in[HTTP_HASH_KEY + HTTP_USER_MAX], md[SHA256_DIGEST_LENGTH];
    size_t kl = strnlen(key, HTTP_USER_MAX);
    memcpy(in, secret, HTTP_HASH_KEY);
    memcpy(in + HTTP_HASH_KEY, key, kl);
    SHA256(in, HTTP_HASH_KEY + kl, md);
    return (uint32_t)md[0] << 24 | (uint32_t)md[1] << 16 | (uint32_t)md[2] << 8 | md[3];
}

int http_fails_init(struct http_fails *t, int64_t window_ms)
{
    memset(t, 0, sizeof *t);
    t->window_ms = window_ms;
    t->cap = (int)HTTP_FAILS_IN(window_ms);
    http_random_hex(t->secret, HTTP_HASH_KEY / 2);
    t->ring = calloc((size_t)t->cap, sizeof *t->ring);
    return t->ring ? 0 : -1;
}

void http_fails_free(struct http_fails *t)
{
    /* Names tried may be passwords typed into the wrong field. */
    if (t->ring) explicit_bzero(t->ring, (size_t)t->cap * sizeof *t->ring);
    free(t->ring);
    t->ring = NULL;
    t->n = 0;
}

static int *fails_chain(struct http_fails *t, const char *key)
{
    return &t->chain[keyed_hash(t->secret, key) % HTTP_FAIL_BUCKETS];
}

/* Drops the entries whose window has passed at now (oldest first). */
static void fails_expire(struct http_fails *t, int64_t now)
{
    while (t->n > 0 && now - t->ring[t->head].first_ms > t->window_ms) {
        struct http_fail *old = &t->ring[t->head];
        int *link = fails_chain(t, old->key);
        while (*link != t->head + 1)
            link = &t->ring[*link - 1].next;
        *link = old->next;
        explicit_bzero(old, sizeof *old);
        t->head = (t->head + 1) % t->cap;
        t->n--;
    }
}

static struct http_fail *fails_find(struct http_fails *t, const char *key, int64_t now)
{
    fails_expire(t, now);
    for (int e = *fails_chain(t, key); e; e = t->ring[e - 1].next)
        if (strcmp(t->ring[e - 1].key, key) == 0) return &t->ring[e - 1];
    return NULL;
}

int http_fails_count(struct http_fails *t, const char *key, int64_t now)
{
    struct http_fail *f = fails_find(t, key, now);
    return f ? f->count : t->n == t->cap ? INT_MAX : 0;
}

void http_fails_add(struct http_fails *t, const char *key, int64_t now)
{
    struct http_fail *f = fails_find(t, key, now);
    if (!f && t->n < t->cap) {
        int at = (t->head + t->n) % t->cap;
        f = &t->ring[at];
        snprintf(f->key, sizeof f->key, "%s", key);
        f->first_ms = now;
        int *chain = fails_chain(t, key);
        f->next = *chain;
        *chain = at + 1;
        t->n++;
    }
    if (f) f->count++;
}

int http_auth_load(struct triage_http *h, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "http.users %s: cannot open", path);
        return -1;
    }
    h->users = calloc(HTTP_MAX_USERS, sizeof *h->users);
    if (!h->users) {
        fclose(f);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    char line[512];
    int lineno = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        line[strcspn(line, "\r\n")] = '\0';
        if (!line[0] || line[0] == '#') continue;
        char *colon = strchr(line, ':');
        const char *hash = colon ? colon + 1 : "";
        if (!colon || colon == line || (size_t)(colon - line) >= HTTP_USER_MAX ||
            strlen(hash) >= sizeof h->users[0].hash ||
            !(strncmp(hash, "$y$", 3) == 0 || strncmp(hash, "$6$", 3) == 0 ||
              strncmp(hash, "$gy$", 4) == 0 || strncmp(hash, "$7$", 3) == 0)) {
            snprintf(err, errlen,
                     "http.users %s line %d: want name:hash with a yescrypt ($y$) or "
                     "sha512-crypt ($6$) hash",
                     path, lineno);
            fclose(f);
            return -1;
        }
        if (h->nusers == HTTP_MAX_USERS) {
            snprintf(err, errlen, "http.users %s: more than %d users", path, HTTP_MAX_USERS);
            fclose(f);
            return -1;
        }
        memcpy(h->users[h->nusers].name, line, (size_t)(colon - line));
        snprintf(h->users[h->nusers].hash, sizeof h->users[0].hash, "%s", hash);
        h->nusers++;
    }
    fclose(f);
    if (h->nusers == 0) {
        snprintf(err, errlen, "http.users %s: no users", path);
        return -1;
    }
    http_random_hex(h->probe_key, HTTP_HASH_KEY / 2);
    if (http_fails_init(&h->addr_fails, HTTP_FAIL_WINDOW_MS) != 0 ||
        http_fails_init(&h->name_fails, HTTP_NAME_FAIL_WINDOW_MS) != 0) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    return 0;
}

void http_auth_free(struct triage_http *h)
{
    if (h->users) explicit_bzero(h->users, HTTP_MAX_USERS * sizeof *h->users);
    free(h->users);
    h->users = NULL;
    http_fails_free(&h->addr_fails);
    http_fails_free(&h->name_fails);
}

/* Constant-time comparison of two NUL-terminated tokens. */
static bool same_token(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    unsigned char d = la != lb;
    for (size_t i = 0; i < la && i < lb; i++)
        d |= (unsigned char)(a[i] ^ b[i]);
    return d == 0 && la > 0;
}

static struct http_session *live_session(struct triage_http *h, const char *token)
{
    int64_t now = http_clock_ms();
    for (int i = 0; i < HTTP_MAX_SESSIONS; i++) {
        struct http_session *s = &h->sessions[i];
        if (s->token[0] && s->expires_ms > now && same_token(s->token, token)) return s;
    }
    return NULL;
}

/* The live session of one of the request's session cookies: each is tried
 * (up to HTTP_SESSION_COOKIES), since a stale or planted one may come
 * before the reader's own. */
static struct http_session *find_session(struct triage_http *h, h2o_req_t *req)
{
    char token[80];
    for (int c = 0; c < HTTP_SESSION_COOKIES; c++) {
        int got = http_cookie(req, COOKIE, c, token, sizeof token);
        if (got == 0) break;
        struct http_session *s = got > 0 ? live_session(h, token) : NULL;
        if (s) return s;
    }
    return NULL;
}

int http_auth_who(struct triage_http *h, h2o_req_t *req, struct http_who *who)
{
    if (h->loopback) {
        snprintf(who->user, sizeof who->user, "local");
        who->csrf = h->local_csrf;
        who->session = "";
        return 1;
    }
    struct http_session *s = find_session(h, req);
    if (!s) return 0;
    snprintf(who->user, sizeof who->user, "%s", s->user);
    who->csrf = s->csrf;
    who->session = s->token;
    return 1;
}

bool http_auth_session_live(struct triage_http *h, const char *token)
{
    if (!token[0]) return h->loopback;
    return live_session(h, token) != NULL;
}

bool http_auth_csrf_ok(h2o_req_t *req, const struct http_who *who)
{
    char got[80];
    return http_header(req, "x-csrf-token", got, sizeof got) && same_token(who->csrf, got);
}

/* The user called name (the last line of that name), NULL none. */
static struct http_user *find_user(struct triage_http *h, const char *name)
{
    struct http_user *u = NULL;
    for (int i = 0; i < h->nusers; i++)
        if (strcmp(h->users[i].name, name) == 0) u = &h->users[i];
    return u;
}

const struct http_user *http_auth_probe(struct triage_http *h, const char *name)
{
    const struct http_user *u = find_user(h, name);
    if (u) return u;
    return h->nusers > 0 ? &h->users[keyed_hash(h->probe_key, name) % (unsigned)h->nusers] : NULL;
}

static bool check_password(const char *hash, const char *password)
{
    struct crypt_data cd;
    memset(&cd, 0, sizeof cd);
    /* crypt_rn: libxcrypt's variant that returns NULL on failure (no "*"
     * string to mistake for a hash). */
    const char *out = crypt_rn(password, hash, &cd, (int)sizeof cd);
    bool ok = out && out[0] != '*' && same_token(out, hash);
    explicit_bzero(&cd, sizeof cd);
    return ok;
}

/* Login CSRF: a page of another site must not log the reader's browser in
 * under an account of that site's choosing (the browser keeps a cookie set
 * by the answer to a cross-site form). Browsers say where a POST comes from
 * (Origin, and Sec-Fetch-Site); only this node's own pages may log in. A
 * client that sends neither (curl, a script) is not a page of another site. */
static bool login_from_here(h2o_req_t *req)
{
    char site[32], origin[300];
    if (h2o_find_header_by_str(&req->headers, "sec-fetch-site", 14, -1) >= 0 &&
        (!http_header(req, "sec-fetch-site", site, sizeof site) ||
         (strcmp(site, "same-origin") != 0 && strcmp(site, "none") != 0)))
        return false;
    if (h2o_find_header_by_str(&req->headers, "origin", 6, -1) < 0) return true;
    if (!http_header(req, "origin", origin, sizeof origin)) return false;
    const char *host = strstr(origin, "://"); /* "null" (a sandboxed page) has none */
    if (!host) return false;
    host += 3;
    h2o_iovec_t a = req->input.authority;
    return strlen(host) == a.len && strncasecmp(host, a.base, a.len) == 0;
}

/* Takes one password check from the allowance of all addresses together
 * (HTTP_LOGIN_*) at now (http_clock_ms()); false when none is left. */
static bool login_take(struct triage_http *h, int64_t now)
{
    h->login_tokens += (double)(now - h->login_tokens_ms) * HTTP_LOGIN_PER_S / 1000.0;
    if (h->login_tokens > HTTP_LOGIN_BURST || h->login_tokens_ms == 0)
        h->login_tokens = HTTP_LOGIN_BURST;
    h->login_tokens_ms = now;
    if (h->login_tokens < 1) return false;
    h->login_tokens -= 1;
    return true;
}

/* A login, from its request to its answer. The password check (yescrypt,
 * tens of milliseconds) runs on libuv's thread pool, one login at a time
 * in the order they came: on the loop, a burst of guesses held the pages'
 * events, series completion and /healthz for the length of all their
 * checks. One at a time, each login's limits are read when its turn
 * comes, after every earlier check has counted, as when they ran on the
 * loop. */
struct http_login {
    struct http_login *next;
    struct triage_http *h;
    h2o_req_t *req;            /* NULL once h2o has let go of it (the client left) */
    struct http_login **watch; /* in req's pool: points back here while both live */
    char user[HTTP_USER_MAX];
    char addr[64];
    char password[256];
    char hash[256]; /* the probe's (http_auth_probe) */
    bool ok;
    uv_work_t work;
};

static void login_req_gone(void *p)
{
    struct http_login **w = p;
    if (*w) (*w)->req = NULL, (*w)->watch = NULL;
}

/* The login's request, to answer now (NULL: its client left); the login no
 * longer watches it. */
static h2o_req_t *login_req(struct http_login *l)
{
    if (l->watch) *l->watch = NULL;
    l->watch = NULL;
    h2o_req_t *req = l->req;
    l->req = NULL;
    return req;
}

static void login_free(struct http_login *l)
{
    login_req(l);
    explicit_bzero(l->password, sizeof l->password);
    free(l);
}

static void login_next(struct triage_http *h);

static void login_work(uv_work_t *w)
{
    struct http_login *l = w->data;
    l->ok = check_password(l->hash, l->password);
    explicit_bzero(l->password, sizeof l->password);
}

/* The check done: counted, audited, answered. */
static void login_finish(struct http_login *l)
{
    struct triage_http *h = l->h;
    const char *user = l->user, *addr = l->addr;
    int64_t now = http_clock_ms();
    struct http_user *u = find_user(h, user);
    bool ok = l->ok && u;
    h2o_req_t *req = login_req(l);
    if (!ok) {
        http_fails_add(&h->addr_fails, addr, now);
        http_fails_add(&h->name_fails, user, now);
        util_log(UTIL_LOG_WARN, "login_failed", "peer=%s", addr);
        http_audit(h, user, "login_failed", "", addr);
        if (http_fails_count(&h->name_fails, user, now) == HTTP_NAME_FAIL_MAX)
            http_audit(h, user, "login_throttled", "", addr); /* the name is held from now */
        if (req) http_send_error(req, 401, "wrong user or password");
        return;
    }
    if (!req) return; /* right, but nobody to give the session to */
    /* A new session in a free place. One who holds HTTP_USER_SESSIONS
     * gives up their own oldest; a table full of other readers' live
     * sessions refuses the login, rather than log another reader out. */
    struct http_session *s = NULL, *own_oldest = NULL;
    int own = 0;
    for (int i = 0; i < HTTP_MAX_SESSIONS; i++) {
        struct http_session *x = &h->sessions[i];
        if (!x->token[0] || x->expires_ms <= now) {
            if (!s) s = x;
        } else if (strcmp(x->user, user) == 0) {
            own++;
            if (!own_oldest || x->expires_ms < own_oldest->expires_ms) own_oldest = x;
        }
    }
    /* A full table takes the user's own oldest too, where they have one. */
    bool replaced = own >= HTTP_USER_SESSIONS || (!s && own > 0);
    if (replaced) {
        s = own_oldest;
    } else if (!s) {
        util_log(UTIL_LOG_WARN, "login_refused", "peer=%s reason=\"sessions full\" sessions=%d",
                 addr, HTTP_MAX_SESSIONS);
        http_send_error(req, 503, "too many readers logged in; try again when one logs out");
        return;
    }
    http_random_hex(s->token, 32);
    http_random_hex(s->csrf, 32);
    snprintf(s->user, sizeof s->user, "%s", user);
    s->expires_ms = now + HTTP_SESSION_MS;
    snprintf(u->last_addr, sizeof u->last_addr, "%s", addr);
    if (replaced) http_sse_end_dead_sessions(h); /* the old session's pages stop hearing */
    /* No reset of the address's failures on success: one known password
     * must not buy more guesses at the others. */
    util_log(UTIL_LOG_INFO, "login", "peer=%s", addr);
    http_audit(h, user, "login", "", addr);
    char cookie[256];
    snprintf(cookie, sizeof cookie,
             COOKIE "=%s; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=%lld", s->token,
             (long long)(HTTP_SESSION_MS / 1000));
    http_add_header(req, "set-cookie", h2o_strdup(&req->pool, cookie, SIZE_MAX).base);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "user", s->user);
    cJSON_AddStringToObject(o, "csrf", s->csrf);
    http_send_json(req, 200, o);
}

static void login_done(uv_work_t *w, int status)
{
    (void)status;
    struct http_login *l = w->data;
    struct triage_http *h = l->h;
    h->login_running = false;
    login_finish(l);
    login_free(l);
    login_next(h);
}

/* Its limits, now that its turn has come: 0 and the check started, or -1
 * (answered, or its client gone). */
static int login_start(struct http_login *l)
{
    struct triage_http *h = l->h;
    const char *user = l->user, *addr = l->addr;
    if (!l->req) return -1;
    if (http_fails_count(&h->addr_fails, addr, http_clock_ms()) >= HTTP_FAIL_MAX) {
        util_log(UTIL_LOG_WARN, "login_throttled", "peer=%s", addr);
        http_send_error(login_req(l), 429, "too many failed logins; try again later");
        return -1;
    }
    int64_t now = http_clock_ms();
    struct http_user *u = find_user(h, user);
    /* The per-address limit does not bound checks from many addresses;
     * each takes a thread for the hash's time. Taken before the per-name
     * check too, so that its refusals (a log line each) cost the sender as
     * much as a guess. */
    if (!login_take(h, now)) {
        util_log(UTIL_LOG_WARN, "login_throttled", "peer=%s reason=\"logins from all addresses\"",
                 addr);
        http_send_error(login_req(l), 429, "too many logins at once; try again in a few seconds");
        return -1;
    }
    /* Guesses at one name from many addresses. Names that do not exist are
     * counted alike, so the limit does not tell which do; the address a
     * name last logged in from is not held, so guessing at a name does not
     * lock its reader out at their own desk. The audit has the hold once,
     * when it begins (login_finish), not each refusal. */
    if (!(u && strcmp(u->last_addr, addr) == 0) &&
        http_fails_count(&h->name_fails, user, now) >= HTTP_NAME_FAIL_MAX) {
        util_log(UTIL_LOG_WARN, "login_throttled", "peer=%s reason=\"failed logins of the name\"",
                 addr);
        http_send_error(login_req(l), 429, "too many failed logins for this user; try again later");
        return -1;
    }
    const struct http_user *probe = http_auth_probe(h, user);
    if (!probe) { /* no users at all: nothing to check against */
        l->ok = false;
        login_finish(l);
        return -1;
    }
    snprintf(l->hash, sizeof l->hash, "%s", probe->hash);
    l->work.data = l;
    if (uv_queue_work(h->loop, &l->work, login_work, login_done) != 0) {
        http_send_error(login_req(l), 503, "cannot check the password now");
        return -1;
    }
    h->login_running = true;
    return 0;
}

/* Starts the next login's check, if none runs. */
static void login_next(struct triage_http *h)
{
    while (!h->login_running && h->login_head) {
        struct http_login *l = h->login_head;
        h->login_head = l->next;
        if (!h->login_head) h->login_tail = NULL;
        h->nlogins--;
        if (login_start(l) != 0) login_free(l);
    }
}

int http_auth_login(struct triage_http *h, h2o_req_t *req)
{
    if (h->loopback) return http_send_error(req, 400, "no login on a loopback address");
    char addr[64];
    http_peer(h, req, addr, sizeof addr);
    if (!login_from_here(req)) {
        util_log(UTIL_LOG_WARN, "login_refused", "peer=%s reason=\"from another site\"", addr);
        return http_send_error(req, 403, "login only from this node's own page");
    }
    if (http_fails_count(&h->addr_fails, addr, http_clock_ms()) >= HTTP_FAIL_MAX) {
        util_log(UTIL_LOG_WARN, "login_throttled", "peer=%s", addr);
        return http_send_error(req, 429, "too many failed logins; try again later");
    }
    if (h->nlogins >= HTTP_LOGIN_QUEUE) {
        util_log(UTIL_LOG_WARN, "login_throttled", "peer=%s reason=\"logins waiting\"", addr);
        return http_send_error(req, 429, "too many logins at once; try again in a few seconds");
    }
    struct http_login *l = calloc(1, sizeof *l);
    struct http_login **watch =
        l ? h2o_mem_alloc_shared(&req->pool, sizeof *watch, login_req_gone) : NULL;
    if (!l || !watch) {
        free(l);
        return http_send_error(req, 503, "out of memory");
    }
    *watch = l;
    *l = (struct http_login){.h = h, .req = req, .watch = watch};
    snprintf(l->addr, sizeof l->addr, "%s", addr);
    cJSON *body =
        req->entity.base ? cJSON_ParseWithLength(req->entity.base, req->entity.len) : NULL;
    if (body) {
        const char *u = cJSON_GetStringValue(cJSON_GetObjectItem(body, "user"));
        const char *p = cJSON_GetStringValue(cJSON_GetObjectItem(body, "password"));
        if (u && strlen(u) < sizeof l->user) snprintf(l->user, sizeof l->user, "%s", u);
        if (p && strlen(p) < sizeof l->password) snprintf(l->password, sizeof l->password, "%s", p);
        cJSON_Delete(body);
    } else if (req->entity.base) {
        http_param(req->entity.base, req->entity.len, "user", l->user, sizeof l->user);
        http_param(req->entity.base, req->entity.len, "password", l->password, sizeof l->password);
    }
    if (!l->user[0] || !l->password[0]) {
        login_free(l);
        return http_send_error(req, 400, "user and password required");
    }
    if (h->login_tail)
        h->login_tail->next = l;
    else
        h->login_head = l;
    h->login_tail = l;
    h->nlogins++;
    login_next(h); /* at once when none runs; answered later */
    return 0;
}

void http_auth_login_stop(struct triage_http *h)
{
    while (h->login_head) {
        struct http_login *l = h->login_head;
        h->login_head = l->next;
        h2o_req_t *req = login_req(l);
        if (req) http_send_error(req, 503, "the node is stopping");
        login_free(l);
    }
    h->login_tail = NULL;
    h->nlogins = 0;
}

int http_auth_logout(struct triage_http *h, h2o_req_t *req)
{
    struct http_session *s = h->loopback ? NULL : find_session(h, req);
    if (s) {
        struct http_who who = {.csrf = s->csrf};
        if (!http_auth_csrf_ok(req, &who))
            return http_send_error(req, 403, "missing or wrong X-CSRF-Token header");
        http_audit(h, s->user, "logout", "", "");
        memset(s, 0, sizeof *s);
        http_sse_end_dead_sessions(h); /* its pages stop hearing events now */
    }
    http_add_header(req, "set-cookie",
                    COOKIE "=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0");
    cJSON *o = cJSON_CreateObject();
    cJSON_AddBoolToObject(o, "logged_out", true);
    return http_send_json(req, 200, o);
}

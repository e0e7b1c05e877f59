/* triage/http.c: the HTTP server on the node's loop (h2o's libuv build):
 * listening, accepting, TLS off loopback, routing, response helpers. The
 * API, events, metrics, images and logins are in the other http_*.c. */
#include "http_internal.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>

#include "clock.h"
#include "db_web.h"
#include "log.h"
#include "number.h"

/* The one h2o handler: it carries the server. */
struct route_handler {
    h2o_handler_t super;
    struct triage_http *h;
};

/* An accepted connection; freed by libuv's close callback via h2o. */
static void free_conn(uv_handle_t *handle)
{
    free(handle);
}

int64_t http_now_ms(void)
{
    uv_timeval64_t tv;
    uv_gettimeofday(&tv);
    return tv.tv_sec * 1000 + tv.tv_usec / 1000;
}

int64_t http_clock_ms(void)
{
    return (int64_t)util_clock_ms();
}

void http_random_hex(char *out, size_t bytes)
{
    unsigned char buf[64];
    if (bytes > sizeof buf) bytes = sizeof buf;
    size_t got = 0;
    while (got < bytes) {
        ssize_t r = getrandom(buf + got, bytes - got, 0);
        if (r > 0) got += (size_t)r;
    }
    for (size_t i = 0; i < bytes; i++)
        snprintf(out + 2 * i, 3, "%02x", buf[i]);
}

void http_audit(struct triage_http *h, const char *user, const char *action, const char *study_uid,
                const char *detail)
{
    if (db_audit_add(h->db, http_now_ms(), user, action, study_uid, detail) != 0)
        util_log(UTIL_LOG_ERROR, "audit_failed", "action=%s study=%s", action,
                 study_uid[0] ? study_uid : "-");
}

void http_add_header(h2o_req_t *req, const char *name, const char *value)
{
    h2o_add_header_by_str(&req->pool, &req->res.headers, name, strlen(name), 1, NULL, value,
                          strlen(value));
}

int http_send(h2o_req_t *req, int status, const char *type, const char *body, size_t len)
{
    req->res.status = status;
    req->res.reason = status == 200   ? "OK"
                      : status == 201 ? "Created"
                      : status == 400 ? "Bad Request"
                      : status == 401 ? "Unauthorized"
                      : status == 403 ? "Forbidden"
                      : status == 404 ? "Not Found"
                      : status == 405 ? "Method Not Allowed"
                      : status == 409 ? "Conflict"
                      : status == 410 ? "Gone"
                      : status == 413 ? "Payload Too Large"
                      : status == 429 ? "Too Many Requests"
                      : status == 503 ? "Service Unavailable"
                                      : "Error";
    req->res.content_length = len;
    http_add_header(req, "content-type", type);
    http_add_header(req, "cache-control", "no-store");
    http_add_header(req, "x-content-type-options", "nosniff");
    http_add_header(req, "x-frame-options", "DENY");
    http_add_header(req, "referrer-policy", "no-referrer");
    if (req->scheme == &H2O_URL_SCHEME_HTTPS)
        http_add_header(req, "strict-transport-security", "max-age=31536000");
    http_add_header(req, "content-security-policy",
                    "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'");
    h2o_send_inline(req, body, len);
    return 0;
}

int http_send_json(h2o_req_t *req, int status, cJSON *json)
{
    char *text = json ? cJSON_PrintUnformatted(json) : NULL;
    cJSON_Delete(json);
    if (!text) return http_send(req, 500, "text/plain", "out of memory\n", 14);
    int rc = http_send(req, status, "application/json; charset=utf-8", text, strlen(text));
    free(text);
    return rc;
}

int http_send_405(h2o_req_t *req, const char *allow)
{
    http_add_header(req, "allow", allow);
    return http_send_error(req, 405, strncmp(allow, "GET", 3) == 0 ? "GET only" : "POST only");
}

int http_send_error(h2o_req_t *req, int status, const char *message)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "error", message);
    return http_send_json(req, status, o);
}

bool http_method_is(h2o_req_t *req, const char *m)
{
    return req->method.len == strlen(m) && memcmp(req->method.base, m, req->method.len) == 0;
}

bool http_header(h2o_req_t *req, const char *name, char *out, size_t n)
{
    ssize_t i = h2o_find_header_by_str(&req->headers, name, strlen(name), -1);
    if (i < 0) return false;
    h2o_iovec_t v = req->headers.entries[i].value;
    if (v.len >= n) return false; /* never a cut value */
    memcpy(out, v.base, v.len);
    out[v.len] = '\0';
    return true;
}

int http_cookie(h2o_req_t *req, const char *name, int nth, char *out, size_t n)
{
    size_t nl = strlen(name);
    for (ssize_t i = -1; (i = h2o_find_header(&req->headers, H2O_TOKEN_COOKIE, i)) >= 0;) {
        h2o_iovec_t v = req->headers.entries[i].value;
        const char *p = v.base, *end = v.base + v.len;
        while (p < end) {
            while (p < end && (*p == ' ' || *p == ';'))
                p++;
            const char *semi = memchr(p, ';', (size_t)(end - p));
            const char *stop = semi ? semi : end;
            if ((size_t)(stop - p) > nl && memcmp(p, name, nl) == 0 && p[nl] == '=' && nth-- == 0) {
                size_t len = (size_t)(stop - p) - nl - 1;
                if (len >= n) return -1;
                memcpy(out, p + nl + 1, len);
                out[len] = '\0';
                return 1;
            }
            p = stop;
        }
    }
    return 0;
}

static int hexval(int c)
{
    return isdigit(c) ? c - '0' : isxdigit(c) ? tolower(c) - 'a' + 10 : -1;
}

int http_param(const char *q, size_t len, const char *name, char *out, size_t n)
{
    size_t nl = strlen(name);
    const char *p = q, *end = q + len;
    if (n) out[0] = '\0';
    while (p < end) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *stop = amp ? amp : end;
        /* "?status" is a filter given without its value, not none. */
        if ((size_t)(stop - p) == nl && memcmp(p, name, nl) == 0) return -1;
        if ((size_t)(stop - p) >= nl + 1 && memcmp(p, name, nl) == 0 && p[nl] == '=') {
            size_t o = 0;
            for (const char *s = p + nl + 1; s < stop; s++) {
                int ch = (unsigned char)*s;
                if (ch == '+')
                    ch = ' ';
                else if (ch == '%' && stop - s >= 3 && hexval(s[1]) >= 0 && hexval(s[2]) >= 0) {
                    ch = hexval(s[1]) * 16 + hexval(s[2]);
                    s += 2;
                }
                /* A NUL would end the value early: "reviewed%00x" is not
                 * "reviewed", nor "pw%00x" the password "pw". */
                if (ch == 0 || o + 1 >= n) {
                    if (n) out[0] = '\0';
                    return -1;
                }
                out[o++] = (char)ch;
            }
            out[o] = '\0';
            return 1;
        }
        p = stop + 1;
    }
    return 0;
}

/* An address as it is compared, logged and counted: s (n bytes) as
 * inet_pton reads it, written back in inet_ntop's form into out[outn]; an
 * IPv4 address in IPv6's mapped form (::ffff:a.b.c.d, how a dual-stack
 * listener such as [::]:port sees IPv4 peers) as plain IPv4. False when s is
 * not an address (out is then unchanged). */
static bool canon_address(const char *s, size_t n, char *out, size_t outn)
{
    char a[INET6_ADDRSTRLEN], text[INET6_ADDRSTRLEN];
    struct in6_addr bin;
    if (n == 0 || n >= sizeof a) return false;
    memcpy(a, s, n);
    a[n] = 0;
    if (inet_pton(AF_INET, a, &bin) == 1) {
        inet_ntop(AF_INET, &bin, text, sizeof text);
    } else if (inet_pton(AF_INET6, a, &bin) != 1) {
        return false;
    } else if (IN6_IS_ADDR_V4MAPPED(&bin)) {
        inet_ntop(AF_INET, &bin.s6_addr[12], text, sizeof text);
    } else {
        inet_ntop(AF_INET6, &bin, text, sizeof text);
    }
    if (strlen(text) >= outn) return false;
    snprintf(out, outn, "%s", text);
    return true;
}

void http_peer(struct triage_http *h, h2o_req_t *req, char *out, size_t n)
{
    struct sockaddr_storage ss;
    char text[INET6_ADDRSTRLEN] = "";
    snprintf(out, n, "?");
    socklen_t len = req->conn->callbacks->get_peername(req->conn, (struct sockaddr *)&ss);
    if (len == 0) return;
    if (ss.ss_family == AF_INET)
        inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, text, sizeof text);
    else if (ss.ss_family == AF_INET6)
        inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, text, sizeof text);
    if (!canon_address(text, strlen(text), out, n)) return;
    /* From a trusted proxy: the client is the address it appended last to
     * X-Forwarded-For (what the client itself wrote before it is not
     * believed). From anyone else the header is ignored. */
    char key[80], xff[1024];
    snprintf(key, sizeof key, ",%s,", out);
    if (!h->trusted_proxies[0] || !strstr(h->trusted_proxies, key) ||
        !http_header(req, "x-forwarded-for", xff, sizeof xff))
        return;
    char *last = strrchr(xff, ',');
    last = last ? last + 1 : xff;
    while (*last == ' ' || *last == '\t')
        last++;
    canon_address(last, strcspn(last, " \t"), out, n);
}

/* http.trusted_proxies ("a, b") into ",a,b," in out[n]; each must be an
 * address. */
static int parse_proxies(const char *list, char *out, size_t n, char *err, size_t errlen)
{
    size_t at = 0;
    out[0] = 0;
    for (const char *p = list ? list : ""; *p;) {
        p += strspn(p, " \t,");
        size_t k = strcspn(p, " \t,");
        if (k == 0) break;
        char addr[INET6_ADDRSTRLEN];
        if (!canon_address(p, k, addr, sizeof addr)) {
            snprintf(err, errlen, "http.trusted_proxies: '%.*s' is not an IP address", (int)k, p);
            return -1;
        }
        size_t al = strlen(addr);
        if (at + al + 2 >= n) {
            snprintf(err, errlen, "http.trusted_proxies: more than %zu characters", n - 2);
            return -1;
        }
        at += (size_t)snprintf(out + at, n - at, ",%s", addr);
        p += k;
    }
    if (at) snprintf(out + at, n - at, ",");
    return 0;
}

static const struct triage_web_asset *find_asset(const char *path)
{
    for (const struct triage_web_asset *a = triage_web_assets; a->path; a++)
        if (strcmp(a->path, path) == 0) return a;
    return NULL;
}

static int send_asset(h2o_req_t *req, const struct triage_web_asset *a)
{
    return http_send(req, 200, a->type, (const char *)a->data, a->len);
}

static int healthz(struct triage_http *h, h2o_req_t *req)
{
    cJSON *o = cJSON_CreateObject();
    cJSON *why = http_degraded(h);
    bool ok = cJSON_GetArraySize(why) == 0;
    cJSON_AddStringToObject(o, "status", ok ? "ok" : "degraded");
    cJSON_AddItemToObject(o, "degraded", why);
    /* 200 while the node serves at all: degraded is for the banner and
     * alerts, not for a load balancer to take the node away. */
    return http_send_json(req, 200, o);
}

/* Without logins (loopback), a page from another site could still reach
 * the node by pointing its own host name at 127.0.0.1 (DNS rebinding): only
 * loopback host names are accepted in the Host header. */
static bool loopback_host(h2o_iovec_t authority)
{
    char host[128];
    size_t n = authority.len < sizeof host - 1 ? authority.len : sizeof host - 1;
    memcpy(host, authority.base, n);
    host[n] = '\0';
    if (host[0] == '[') {
        char *end = strchr(host, ']');
        if (!end) return false;
        end[1] = '\0';
        return strcmp(host, "[::1]") == 0;
    }
    char *colon = strchr(host, ':');
    if (colon) *colon = '\0';
    if (strcasecmp(host, "localhost") == 0) return true;
    struct in_addr a;
    return inet_pton(AF_INET, host, &a) == 1 && (ntohl(a.s_addr) >> 24) == 127;
}

static int on_req(h2o_handler_t *self, h2o_req_t *req)
{
    struct triage_http *h = ((struct route_handler *)self)->h;
    if (h->loopback && !loopback_host(req->input.authority))
        return http_send_error(req, 403, "Host must be a loopback name or address");
    char path[512];
    if (req->path_normalized.len >= sizeof path) return http_send_error(req, 404, "no such page");
    memcpy(path, req->path_normalized.base, req->path_normalized.len);
    path[req->path_normalized.len] = '\0';
    bool get = http_method_is(req, "GET") || http_method_is(req, "HEAD");
    bool post = http_method_is(req, "POST");
    if (req->entity.base && req->entity.len > HTTP_MAX_BODY)
        return http_send_error(req, 413, "request body too large");

    if (strcmp(path, "/healthz") == 0)
        return get ? healthz(h, req) : http_send_405(req, "GET, HEAD");
    if (strcmp(path, "/metrics") == 0)
        return get ? http_metrics(h, req) : http_send_405(req, "GET, HEAD");
    if (strcmp(path, "/login") == 0)
        return post ? http_auth_login(h, req) : http_send_405(req, "POST");
    if (strcmp(path, "/logout") == 0)
        return post ? http_auth_logout(h, req) : http_send_405(req, "POST");
    if (strcmp(path, "/") == 0 || strcmp(path, "/index.html") == 0) {
        if (!get) return http_send_405(req, "GET, HEAD");
        return send_asset(req, find_asset("index.html"));
    }
    if (strncmp(path, "/static/", 8) == 0) {
        const struct triage_web_asset *a = find_asset(path + 8);
        if (!a || !get) return http_send_error(req, 404, "no such page");
        return send_asset(req, a);
    }
    if (strncmp(path, "/api/", 5) == 0) {
        struct http_who who;
        if (!http_auth_who(h, req, &who)) return http_send_error(req, 401, "login required");
        if (strcmp(path, "/api/events") == 0) {
            /* Not HEAD: it would open a stream, and hold its slot, too. */
            if (http_method_is(req, "GET")) return http_sse_open(h, req, &who);
            return http_send_405(req, "GET");
        }
        if (post && !http_auth_csrf_ok(req, &who))
            return http_send_error(req, 403, "missing or wrong X-CSRF-Token header");
        return http_api(h, req, &who, path);
    }
    return http_send_error(req, 404, "no such page");
}

static void on_accept(uv_stream_t *listener, int status)
{
    struct triage_http *h = listener->data;
    if (status != 0) return;
    uv_tcp_t *conn = malloc(sizeof *conn);
    if (!conn) return;
    uv_tcp_init(listener->loop, conn);
    if (uv_accept(listener, (uv_stream_t *)conn) != 0) {
        uv_close((uv_handle_t *)conn, free_conn);
        return;
    }
    uv_tcp_nodelay(conn, 1);
    h2o_socket_t *sock = h2o_uv_socket_create((uv_stream_t *)conn, free_conn);
    h2o_accept(&h->accept_ctx, sock);
}

static bool is_loopback(const struct sockaddr_storage *ss)
{
    if (ss->ss_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)ss)->sin_addr.s_addr) >> 24) == 127;
    if (ss->ss_family == AF_INET6)
        return IN6_IS_ADDR_LOOPBACK(&((const struct sockaddr_in6 *)ss)->sin6_addr);
    return false;
}

static int parse_listen(const char *listen, struct sockaddr_storage *ss, char *err, size_t errlen)
{
    char host[256];
    const char *colon = strrchr(listen, ':');
    if (!colon || colon == listen || strlen(colon + 1) == 0) goto bad;
    size_t hl = (size_t)(colon - listen);
    if (listen[0] == '[' && hl >= 2 && listen[hl - 1] == ']') {
        listen++;
        hl -= 2;
    }
    if (hl >= sizeof host) goto bad;
    memcpy(host, listen, hl);
    host[hl] = '\0';
    long port;
    if (util_number_long(colon + 1, 0, 65535, &port) != 0) goto bad;
    if (strchr(host, ':')) {
        if (uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)ss) != 0) goto bad;
    } else if (uv_ip4_addr(strcmp(host, "localhost") == 0 ? "127.0.0.1" : host, (int)port,
                           (struct sockaddr_in *)ss) != 0)
        goto bad;
    return 0;
bad:
    snprintf(err, errlen, "http.listen '%s' is not ADDRESS:PORT", listen);
    return -1;
}

static int setup_tls(struct triage_http *h, const char *cert, const char *key, char *err,
                     size_t errlen)
{
    h->ssl = SSL_CTX_new(TLS_server_method());
    if (!h->ssl) goto bad;
    SSL_CTX_set_min_proto_version(h->ssl, TLS1_2_VERSION);
    SSL_CTX_set_options(h->ssl, SSL_OP_NO_COMPRESSION);
    if (SSL_CTX_use_certificate_chain_file(h->ssl, cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(h->ssl, key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(h->ssl) != 1)
        goto bad;
    /* HTTP/2 when the browser offers it: each open page holds an event
     * stream, and over HTTP/1.1 a browser keeps six connections per host,
     * so a seventh tab could load nothing; HTTP/2 carries them all on one
     * connection. */
    h2o_ssl_register_alpn_protocols(h->ssl, h2o_http2_alpn_protocols);
    h->accept_ctx.ssl_ctx = h->ssl;
    h->tls = true;
    return 0;
bad:;
    char why[256] = "";
    ERR_error_string_n(ERR_get_error(), why, sizeof why);
    snprintf(err, errlen, "http.tls_cert/http.tls_key: %s", why);
    return -1;
}

/* triage_http_check, giving the parsed address in ss and the trusted
 * proxies in proxies[n]. */
static int check_config(const struct triage_http_config *cfg, struct sockaddr_storage *ss,
                        char *proxies, size_t n, char *err, size_t errlen)
{
    memset(ss, 0, sizeof *ss);
    if (parse_listen(cfg->listen, ss, err, errlen) != 0) return -1;
    if (!is_loopback(ss) && (!cfg->users_file || !cfg->users_file[0] || !cfg->tls_cert ||
                             !cfg->tls_cert[0] || !cfg->tls_key || !cfg->tls_key[0])) {
        snprintf(err, errlen,
                 "http.listen %s is not loopback: http.users, http.tls_cert and "
                 "http.tls_key are required",
                 cfg->listen);
        return -1;
    }
    return parse_proxies(cfg->trusted_proxies, proxies, n, err, errlen);
}

int triage_http_check(const struct triage_http_config *cfg, char *err, size_t errlen)
{
    struct sockaddr_storage ss;
    char proxies[sizeof((struct triage_http *)0)->trusted_proxies];
    return check_config(cfg, &ss, proxies, sizeof proxies, err, errlen);
}

int triage_http_start(struct triage_http **out, const struct triage_http_config *cfg, char *err,
                      size_t errlen)
{
    *out = NULL;
    struct sockaddr_storage ss;
    char proxies[sizeof((struct triage_http *)0)->trusted_proxies];
    if (check_config(cfg, &ss, proxies, sizeof proxies, err, errlen) != 0) return -1;
    struct triage_http *h = calloc(1, sizeof *h);
    if (!h) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    h->loop = cfg->loop;
    h->db = cfg->db;
    h->store = cfg->store;
    h->infer = cfg->infer;
    h->scp = cfg->scp;
    snprintf(h->webhook, sizeof h->webhook, "%s", cfg->webhook ? cfg->webhook : "");
    h->claim_ms = cfg->claim_ms > 0 ? cfg->claim_ms : TRIAGE_HTTP_CLAIM_MS;
    memcpy(h->trusted_proxies, proxies, sizeof proxies);
    h->worklist_days = cfg->worklist_days;
    h->loopback = is_loopback(&ss);
    http_random_hex(h->local_csrf, 32);

    h2o_config_init(&h->globalconf);
    h->globalconf.max_request_entity_size = HTTP_MAX_BODY;
    h->globalconf.server_name = h2o_iovec_init(H2O_STRLIT("ichtriage"));
    h2o_hostconf_t *host =
        h2o_config_register_host(&h->globalconf, h2o_iovec_init(H2O_STRLIT("default")), 65535);
    h2o_pathconf_t *pc = h2o_config_register_path(host, "/", 0);
    struct route_handler *rh = (struct route_handler *)h2o_create_handler(pc, sizeof *rh);
    rh->super.on_req = on_req;
    rh->h = h;

    if (!h->loopback) {
        if (http_auth_load(h, cfg->users_file, err, errlen) != 0) goto fail;
        if (setup_tls(h, cfg->tls_cert, cfg->tls_key, err, errlen) != 0) goto fail;
    }

    h2o_context_init(&h->ctx, h->loop, &h->globalconf);
    h->ctx_ready = true;
    h->accept_ctx.ctx = &h->ctx;
    h->accept_ctx.hosts = h->globalconf.hosts;

    uv_tcp_init(h->loop, &h->listener);
    h->listener.data = h;
    h->listening = true;
    int rc = uv_tcp_bind(&h->listener, (struct sockaddr *)&ss, 0);
    if (rc == 0) rc = uv_listen((uv_stream_t *)&h->listener, 128, on_accept);
    if (rc != 0) {
        snprintf(err, errlen, "http.listen %s: %s", cfg->listen, uv_strerror(rc));
        goto fail;
    }
    uv_timer_init(h->loop, &h->ping);
    h->ping.data = h;
    h->ping_ready = true;
    uv_timer_init(h->loop, &h->push);
    h->push.data = h;
    h->push_ready = true;
    http_push_now(h); /* the first snapshot: what is flagged already is not new */
    util_log(UTIL_LOG_INFO, "http_ready", "listen=%s tls=%d login=%d", cfg->listen, h->tls,
             !h->loopback);
    *out = h;
    return 0;
fail:
    triage_http_stop(h);
    return -1;
}

void triage_http_set_worklist_days(struct triage_http *h, int days)
{
    if (!h || h->worklist_days == days) return;
    h->worklist_days = days;
    triage_http_changed(h);
}

static void after_close(uv_handle_t *handle)
{
    (void)handle;
}

static bool conns_open(struct triage_http *h)
{
    return !h2o_linklist_is_empty(&h->ctx.http1._conns) ||
           !h2o_linklist_is_empty(&h->ctx.http2._conns);
}

/* After the connections are gone, what is left linked in the context's
 * timeouts is the context's own (h2o's graceful-shutdown entry); dispose
 * asserts the lists are empty. */
static void unlink_timeouts(h2o_context_t *ctx)
{
    h2o_timeout_t *all[] = {&ctx->zero_timeout,
                            &ctx->one_sec_timeout,
                            &ctx->hundred_ms_timeout,
                            &ctx->handshake_timeout,
                            &ctx->http1.req_timeout,
                            &ctx->http2.idle_timeout,
                            &ctx->http2.graceful_shutdown_timeout,
                            &ctx->proxy.io_timeout};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        while (!h2o_linklist_is_empty(&all[i]->_entries)) {
            h2o_timeout_entry_t *e =
                H2O_STRUCT_FROM_MEMBER(h2o_timeout_entry_t, _link, all[i]->_entries.next);
            h2o_timeout_unlink(e);
        }
}

/* A client that keeps its connection past the grace below would hold the
 * loop: at that point it no longer counts. */
static void unref_handle(uv_handle_t *handle, void *arg)
{
    (void)arg;
    uv_unref(handle);
}

void triage_http_stop(struct triage_http *h)
{
    if (!h) return;
    http_sse_stop(h);
    http_auth_login_stop(h);
    if (h->ping_ready) uv_close((uv_handle_t *)&h->ping, after_close);
    if (h->push_ready) uv_close((uv_handle_t *)&h->push, after_close);
    if (h->listening) uv_close((uv_handle_t *)&h->listener, after_close);
    bool leak = false;
    if (h->ctx_ready) {
        /* Idle keep-alive connections close now, busy ones after their
         * response; give them a second. */
        h2o_context_request_shutdown(&h->ctx);
        int64_t until = http_clock_ms() + 1000;
        while ((conns_open(h) || h->login_running) && http_clock_ms() < until) {
            uv_run(h->loop, UV_RUN_NOWAIT);
            if (conns_open(h) || h->login_running) uv_sleep(5);
        }
        uv_run(h->loop, UV_RUN_NOWAIT); /* close callbacks of the handles above */
        if (conns_open(h) || h->login_running) {
            /* The connections still point into h: it must outlive them. */
            util_log(UTIL_LOG_WARN, "http_stop_forced", "reason=\"clients kept connections\"");
            uv_walk(h->loop, unref_handle, NULL);
            leak = true;
        } else {
            unlink_timeouts(&h->ctx);
            h2o_context_dispose(&h->ctx);
        }
    } else {
        uv_run(h->loop, UV_RUN_NOWAIT);
    }
    if (leak) return;
    h2o_config_dispose(&h->globalconf);
    if (h->ssl) SSL_CTX_free(h->ssl);
    http_auth_free(h);
    for (int i = 0; i < h->nsnap; i++)
        free(h->snap[i].json);
    free(h->snap);
    free(h);
}

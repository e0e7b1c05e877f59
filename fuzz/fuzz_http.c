/* fuzz/fuzz_http.c: the HTTP request handlers' bodies and parameters, through
 * the real server (triage_http on a libuv loop owned here, loopback, an empty
 * database in a temp dir) and a plain client socket. The first input byte
 * picks the request, the rest is its body or parameter:
 *   0 POST /api/studies/UID/review  (JSON)      1 POST .../claim (JSON)
 *   2 POST .../release                          3 GET /api/worklist?status=...
 *   4 GET /api/studies/...                      5 http_param() directly (the
 *                                                 login form's parser)
 * Checks: the server answers every request with a status line (a crash, a
 * hang past 5 s or a request left unanswered fails). */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "db.h"
#include "http.h"
#include "http_internal.h"

struct harness {
    uv_loop_t loop;
    struct db *db;
    struct triage_http *http;
    int port;
    char csrf[80];
};

static int free_port(void)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) != 0 ||
        getsockname(s, (struct sockaddr *)&a, &len) != 0)
        abort();
    close(s);
    return ntohs(a.sin_port);
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec / 1e9;
}

/* Sends req (n bytes) and runs the loop until the server closes; the reply
 * goes to out (NUL-terminated, truncated to cap). Aborts after 5 s. */
static size_t exchange(struct harness *h, const char *req, size_t n, char *out, size_t cap)
{
    int c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
                            .sin_port = htons((uint16_t)h->port)};
    if (c < 0) abort();
    connect(c, (struct sockaddr *)&a, sizeof a); /* EINPROGRESS */
    size_t sent = 0, got = 0;
    double deadline = now_s() + 5;
    for (;;) {
        uv_run(&h->loop, UV_RUN_NOWAIT);
        if (sent < n) {
            ssize_t w = send(c, req + sent, n - sent, MSG_NOSIGNAL);
            if (w > 0) sent += (size_t)w;
        }
        char buf[4096];
        ssize_t r = recv(c, buf, sizeof buf, 0);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != ENOTCONN))
            break;
        if (r > 0) {
            size_t k = (size_t)r < cap - 1 - got ? (size_t)r : cap - 1 - got;
            memcpy(out + got, buf, k);
            got += k;
            out[got] = 0;
            /* A path may normalise to the event stream (/api/studies/../../
             * api/events), which answers and then stays open: answered once
             * its head is in (waiting out the 5 s for each such input made
             * them libFuzzer timeouts under -timeout=3). */
            const char *end = strstr(out, "\r\n\r\n");
            const char *es = strstr(out, "text/event-stream");
            if (end && es && es < end) break;
        }
        if (now_s() > deadline) {
            if (got >= 12 && strncmp(out, "HTTP/1.1 ", 9) == 0) break; /* answered, still open */
            fprintf(stderr, "no answer within 5 s to:\n%.*s\n", (int)(n < 600 ? n : 600), req);
            abort();
        }
        struct pollfd p = {c, POLLIN, 0};
        poll(&p, 1, 1);
    }
    close(c);
    uv_run(&h->loop, UV_RUN_NOWAIT);
    out[got] = 0;
    return got;
}

static char dir[] = "/tmp/fuzz-http.XXXXXX";

/* The database's folder goes when the fuzzer or the regression run exits. */
static void remove_dir(void)
{
    static const char *const files[] = {"ichtriage.db", "ichtriage.db-wal", "ichtriage.db-shm"};
    char path[64];
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        unlink(path);
    }
    rmdir(dir);
}

static struct harness *harness(void)
{
    static struct harness *h;
    if (h) return h;
    h = calloc(1, sizeof *h);
    signal(SIGPIPE, SIG_IGN); /* as `ichtriage serve` does: a closed peer is EPIPE */
    char path[64], err[512], listen[32];
    if (!h || !mkdtemp(dir) || uv_loop_init(&h->loop) != 0) abort();
    atexit(remove_dir);
    snprintf(path, sizeof path, "%s/ichtriage.db", dir);
    if (db_open(&h->db, path, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        abort();
    }
    h->port = free_port();
    snprintf(listen, sizeof listen, "127.0.0.1:%d", h->port);
    struct triage_http_config cfg = {.loop = &h->loop,
                                     .db = h->db,
                                     .listen = listen,
                                     .users_file = "",
                                     .tls_cert = "",
                                     .tls_key = "",
                                     .webhook = ""};
    if (triage_http_start(&h->http, &cfg, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        abort();
    }
    static char reply[65536];
    const char get[] = "GET /api/session HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    exchange(h, get, sizeof get - 1, reply, sizeof reply);
    const char *p = strstr(reply, "\"csrf\":\"");
    if (!p || sscanf(p + 8, "%64[0-9a-f]", h->csrf) != 1) {
        fprintf(stderr, "no CSRF token in:\n%s\n", reply);
        abort();
    }
    return h;
}

/* Percent-encodes data into out (cap bytes) for a request target. */
static void pct(const uint8_t *data, size_t size, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < size && o + 4 < cap; i++) {
        uint8_t b = data[i];
        if ((b >= '0' && b <= '9') || (b >= 'a' && b <= 'z') || (b >= 'A' && b <= 'Z') ||
            b == '.' || b == '-' || b == '_' || b == '=' || b == '&')
            out[o++] = (char)b;
        else
            o += (size_t)snprintf(out + o, cap - o, "%%%02X", b);
    }
    out[o] = 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    int sel = data[0] % 6;
    data++;
    size--;
    if (sel == 5) {
        char v[256];
        (void)http_param((const char *)data, size, "user", v, sizeof v);
        (void)http_param((const char *)data, size, "password", v, sizeof v);
        return 0;
    }
    struct harness *h = harness();
    static char target[8192], head[9000], reply[65536];
    char *req = NULL;
    size_t n;
    const char *uid = "1.2.826.0.1.3680043.8.498.1";
    if (sel <= 2) {
        snprintf(target, sizeof target, "/api/studies/%s/%s", uid,
                 sel == 0   ? "review"
                 : sel == 1 ? "claim"
                            : "release");
        int hn = snprintf(head, sizeof head,
                          "POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nX-CSRF-Token: %s\r\n"
                          "Content-Type: application/json\r\nContent-Length: %zu\r\n"
                          "Connection: close\r\n\r\n",
                          target, h->csrf, size);
        req = malloc((size_t)hn + size);
        if (!req) return 0;
        memcpy(req, head, (size_t)hn);
        memcpy(req + hn, data, size);
        n = (size_t)hn + size;
    } else {
        char enc[6000];
        pct(data, size < 1500 ? size : 1500, enc, sizeof enc);
        snprintf(target, sizeof target, sel == 3 ? "/api/worklist?status=%s" : "/api/studies/%s",
                 enc);
        int hn =
            snprintf(head, sizeof head,
                     "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", target);
        req = malloc((size_t)hn);
        if (!req) return 0;
        memcpy(req, head, (size_t)hn);
        n = (size_t)hn;
    }
    size_t got = exchange(h, req, n, reply, sizeof reply);
    if (got < 12 || strncmp(reply, "HTTP/1.1 ", 9) != 0) {
        fprintf(stderr, "no status line (%zu bytes back) for:\n%.*s\n", got,
                (int)(n < 600 ? n : 600), req);
        abort();
    }
    free(req);
    return 0;
}

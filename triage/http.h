/* The web worklist, JSON API, server-sent events and /metrics: h2o (its
 * libuv build) serving HTTP on the node's own loop. Everything here runs on
 * the loop thread and uses the loop's database connection. */
#ifndef TRIAGE_HTTP_H
#define TRIAGE_HTTP_H

#include <stddef.h>
#include <uv.h>

#include "db.h"
#include "infer.h"
#include "scp.h"
#include "store.h"

struct triage_http;

struct triage_http_config {
    uv_loop_t *loop;
    struct db *db;               /* the loop thread's connection; borrowed */
    const char *listen;          /* http.listen: host:port, [v6]:port */
    const char *users_file;      /* http.users, "" none */
    const char *tls_cert;        /* http.tls_cert */
    const char *tls_key;         /* http.tls_key */
    const char *webhook;         /* http.webhook, "" none */
    const char *trusted_proxies; /* http.trusted_proxies: addresses, comma-separated */
    int worklist_days;           /* http.worklist_days: the open list's age window, 0 none */
    struct triage_store *store;  /* counters, spool dir, low-space flag; borrowed */
    struct triage_infer *infer;  /* the model's state; borrowed, may be NULL */
    struct scp_server *scp;      /* active associations; borrowed, may be NULL */
    int64_t claim_ms; /* http.claim_minutes: a claim lapses after it; 0: TRIAGE_HTTP_CLAIM_MS */
};

#define TRIAGE_HTTP_CLAIM_MS (30 * 60000) /* http.claim_minutes' default */

/* Listens on cfg->listen. Off loopback it needs users, a certificate and a
 * key, and serves HTTPS with logins. Copies what it needs of cfg; the
 * borrowed pointers must outlive the server. Returns 0, or -1 with a
 * message. The caller owns *out: triage_http_stop(). */
/* What triage_http_start checks before anything, of cfg's strings only:
 * listen parses, off loopback users, certificate and key are all given, and
 * trusted_proxies are addresses. serve calls it first, so that a node that
 * will refuse makes no store. Returns 0, or -1 with a message. */
int triage_http_check(const struct triage_http_config *cfg, char *err, size_t errlen);
int triage_http_start(struct triage_http **out, const struct triage_http_config *cfg, char *err,
                      size_t errlen);

/* The worklist may have changed (a result, a completed series, a review):
 * pushes the changed rows to every event stream, rings the webhook for a
 * newly flagged study. Loop thread. NULL is a no-op. */
void triage_http_changed(struct triage_http *h);

/* The open list's age window (http.worklist_days; 0: none), as at a
 * reload: pages hear the list it gives at once. NULL is a no-op. */
void triage_http_set_worklist_days(struct triage_http *h, int days);

/* Stops listening, ends event streams and frees. Open connections are let
 * go with the loop. NULL is a no-op. Loop thread, before the loop closes. */
void triage_http_stop(struct triage_http *h);

#endif

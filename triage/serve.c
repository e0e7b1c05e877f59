/* triage/serve.c: `ichtriage serve`, the node. The libuv loop runs in the
 * main thread: signals, the wake-ups from receiving threads and (in later
 * issues) series completion, HTTP and result delivery. DICOM associations
 * run on scp/'s own threads. */
#include "serve.h"

#include <ctype.h>
#include <errno.h>
#include <unistd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <uv.h>

#ifdef HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

#include "config.h"
#include "db.h"
#include "db_triage.h"
#include "http.h"
#include "log.h"
#include "scp.h"
#include "complete.h"
#include "infer.h"
#include "retention.h"
#include "pacs.h"
#include "store.h"

/* How long the loop's own database calls wait for a lock held by another
 * process (receiving waits longer, on its own connection). */
#define LOOP_BUSY_TIMEOUT_MS 1000

/* A job running when the node stopped this many times (a crash each time,
 * perhaps its own doing) fails with its series instead of running again. */
#define JOB_MAX_STOPS 3

struct node {
    struct triage_config cfg;
    uv_loop_t *loop;
    uv_signal_t sigterm, sigint, sighup;
    uv_fs_event_t models;     /* <store.dir>/models: a promote or rollback */
    uv_timer_t models_settle; /* the load, once the models/ changes have settled */
    uv_async_t stored_async;
    uv_timer_t heartbeat;    /* watchdog keep-alive, STATUS= refresh, free space */
    uv_timer_t completion;   /* series completion */
    uv_timer_t retention;    /* removing old, triaged, delivered studies' files */
    uv_async_t result_async; /* the inference thread finished a job */
    struct triage_store store;
    struct triage_completion complete;
    struct triage_retention retain;
    struct triage_infer *infer;
    struct triage_decoder decoder; /* triage.pixel_decoder, for the inference thread */
    struct scp_server *scp;
    struct triage_http *http; /* web worklist, API, events, metrics */
    struct triage_pacs *pacs; /* results to PACS: its own thread */
    int grace;
    bool stores_failing;                                /* as the web page was last told */
    int64_t completion_retry_ms, completion_backoff_ms; /* after a failed tick */
};

static int64_t wall_ms(void)
{
    uv_timeval64_t tv;
    uv_gettimeofday(&tv);
    return tv.tv_sec * 1000 + tv.tv_usec / 1000;
}

/* Decides the series that are due; new jobs wake the inference thread, and
 * every decision (a job, not applicable, a result kept) changes a study's
 * status: the page hears it. */
static void run_completion(struct node *n)
{
    int64_t now = wall_ms();
    if (now < n->completion_retry_ms) return;
    int queued;
    int decided = triage_completion_tick(&n->complete, now, &queued);
    if (decided < 0) {
        /* The index is locked by another process, or failing: each try
         * holds the loop for the busy timeout, so try less and less often. */
        n->completion_backoff_ms =
            n->completion_backoff_ms ? n->completion_backoff_ms * 2 : LOOP_BUSY_TIMEOUT_MS;
        if (n->completion_backoff_ms > 30000) n->completion_backoff_ms = 30000;
        n->completion_retry_ms = now + n->completion_backoff_ms;
        return;
    }
    n->completion_backoff_ms = 0;
    if (queued > 0) triage_infer_kick(n->infer);
    if (decided > 0) triage_http_changed(n->http);
}

static void on_retention_timer(uv_timer_t *h)
{
    struct node *n = h->data;
    /* a full batch: more may be due, the next batch in a second (the loop
     * runs in between); otherwise the next look in 10 minutes */
    int purged = triage_retention_run(&n->retain, wall_ms());
    if (purged == TRIAGE_RETENTION_BATCH) uv_timer_start(h, on_retention_timer, 1000, 600000);
    /* their rows say the images are gone: the page, and a study open on it */
    if (purged > 0) triage_http_changed(n->http);
}

/* A refusal that ages out of store.failure_window_seconds clears the
 * "stores failing" state without any store: the page hears it here. */
static void check_store_health(struct node *n)
{
    struct triage_store_verdict v;
    triage_store_health_verdict(&n->store.health, wall_ms(), &v);
    if (v.failing != n->stores_failing) {
        n->stores_failing = v.failing;
        triage_http_changed(n->http);
    }
}

static void on_completion_timer(uv_timer_t *h)
{
    run_completion(h->data);
    check_store_health(h->data);
}

static void on_stored_async(uv_async_t *h)
{
    /* An expected count may have been reached: decide now, not at the tick. */
    run_completion(h->data);
    triage_http_changed(((struct node *)h->data)->http); /* a new or growing study */
}

static void on_result_async(uv_async_t *h)
{
    struct node *n = h->data;
    triage_http_changed(n->http);
    triage_pacs_kick(n->pacs); /* never blocks: the sender has its own thread */
    util_log(UTIL_LOG_DEBUG, "results_ready", "stored=%lld",
             (long long)atomic_load(&n->store.stored));
}

/* Called on the inference thread after each job. */
static void wake_loop_result(void *ud)
{
    struct node *n = ud;
    uv_async_send(&n->result_async);
}

/* Runs on the loop: if the loop is stuck, systemd's watchdog sees no
 * keep-alive and restarts the node. Free space is measured here too (one
 * statvfs): "disk low" starts and ends with the disk, not only when a
 * C-STORE asks (a node started below the mark said it was fine until a
 * scanner was refused, and kept saying "low" after space was freed). */
static void on_heartbeat(uv_timer_t *h)
{
    struct node *n = h->data;
    bool was_low = atomic_load(&n->store.low_space);
    char why_space[300];
    triage_store_measure_space(&n->store, why_space, sizeof why_space);
    if (atomic_load(&n->store.low_space) != was_low) triage_http_changed(n->http);
#ifdef HAVE_SYSTEMD
    char version[160], why[1200];
    bool model = triage_infer_model(n->infer, version, sizeof version, why, sizeof why);
    sd_notifyf(0, "WATCHDOG=1\nSTATUS=receiving; %lld stored, %d associations; %s%s%s%s",
               (long long)atomic_load(&n->store.stored), scp_server_active(n->scp),
               model ? "model " : "NO MODEL: ", model ? version : why,
               atomic_load(&n->store.low_space) ? "; DISK LOW: refusing instances (A700)" : "",
               n->stores_failing ? "; STORES FAILING (see /healthz)" : "");
#endif
}

/* Called on a receiving thread after each commit. */
static void wake_loop(void *ud)
{
    struct node *n = ud;
    uv_async_send(&n->stored_async);
}

static void on_stop_signal(uv_signal_t *h, int signum)
{
    struct node *n = h->data;
    util_log(UTIL_LOG_INFO, "stopping", "signal=%s active_associations=%d",
             signum == SIGTERM ? "TERM" : "INT", scp_server_active(n->scp));
#ifdef HAVE_SYSTEMD
    sd_notify(0, "STOPPING=1");
#endif
    uv_stop(n->loop);
}

/* The HTTP side's settings in c (its strings; triage_http_start takes the
 * rest from the node). */
static struct triage_http_config http_settings(const struct triage_config *c)
{
    return (struct triage_http_config){
        .listen = triage_config_str(c, CFG_HTTP_LISTEN),
        .users_file = triage_config_str(c, CFG_HTTP_USERS),
        .tls_cert = triage_config_str(c, CFG_HTTP_TLS_CERT),
        .tls_key = triage_config_str(c, CFG_HTTP_TLS_KEY),
        .webhook = triage_config_str(c, CFG_HTTP_WEBHOOK),
        .trusted_proxies = triage_config_str(c, CFG_HTTP_TRUSTED_PROXIES),
    };
}

/* What a start refuses before it touches the store, and a reload while the
 * node still runs on the old file: else "reloaded" would hide a node that
 * cannot start. Returns 0, or -1 with a message. */
static int check_startable(const struct triage_config *c, char *err, size_t errlen)
{
    struct triage_http_config hc = http_settings(c);
    struct triage_pacs_dest dests[TRIAGE_PACS_MAX_DESTS];
    int ndests;
    int64_t tls_port;
    if (triage_config_check(c, err, errlen) != 0 || triage_http_check(&hc, err, errlen) != 0 ||
        triage_pacs_parse_destinations(triage_config_str(c, CFG_PACS_DESTINATIONS), dests,
                                       TRIAGE_PACS_MAX_DESTS, &ndests, err, errlen) != 0 ||
        triage_config_get(c, CFG_DICOM_TLS_PORT, &tls_port, err, errlen) != 0)
        return -1;
    if (tls_port && (!triage_config_str(c, CFG_DICOM_TLS_CERT)[0] ||
                     !triage_config_str(c, CFG_DICOM_TLS_KEY)[0])) {
        snprintf(err, errlen, "dicom.tls_port is set: dicom.tls_cert and dicom.tls_key are needed");
        return -1;
    }
    return 0;
}

static void on_reload_signal(uv_signal_t *h, int signum)
{
    (void)signum;
    struct node *n = h->data;
    struct triage_config fresh;
    char err[512];
    if (triage_config_reload(&n->cfg, &fresh, err, sizeof err) != 0) {
        util_log(UTIL_LOG_ERROR, "reload_refused", "reason=\"%s\"", err);
        return;
    }
    if (check_startable(&fresh, err, sizeof err) != 0) {
        util_log(UTIL_LOG_ERROR, "reload_refused", "reason=\"%s\"", err);
        triage_config_free(&fresh);
        return;
    }
    int level = util_log_level_parse(triage_config_str(&fresh, CFG_LOG_LEVEL));
    if (scp_server_set_allowed_peers(n->scp, triage_config_str(&fresh, CFG_DICOM_ALLOWED_PEERS),
                                     err, sizeof err) != 0) {
        util_log(UTIL_LOG_ERROR, "reload_refused", "reason=\"%s\"", err);
        triage_config_free(&fresh);
        return;
    }
    util_log_set_level((enum util_log_level)level);
    triage_infer_reload(n->infer, triage_config_str(&fresh, CFG_TRIAGE_MODEL));
    int64_t worklist_days = 0;
    triage_config_get(&fresh, CFG_HTTP_WORKLIST_DAYS, &worklist_days, err, sizeof err);
    triage_http_set_worklist_days(n->http, (int)worklist_days);
    /* The rest is read once, at start. */
    for (int k = 0; k < CFG_NKEYS; k++)
        if (k != CFG_LOG_LEVEL && k != CFG_DICOM_ALLOWED_PEERS && k != CFG_TRIAGE_MODEL &&
            k != CFG_HTTP_WORKLIST_DAYS &&
            k != CFG_TRAIN_AUTO_PROMOTE /* read by each training run, not the node */ &&
            strcmp(triage_config_str(&fresh, k), triage_config_str(&n->cfg, k)) != 0)
            util_log(UTIL_LOG_WARN, "reload_needs_restart", "key=%s",
                     triage_config_name((enum triage_config_key)k));
    util_log(UTIL_LOG_INFO, "reloaded", "config=%s", fresh.source);
    triage_config_free(&fresh);
}

#define MODELS_SETTLE_MS 500

static void on_models_settled(uv_timer_t *h)
{
    struct node *n = h->data;
    util_log(UTIL_LOG_INFO, "model_active_changed", "path=%s/models/active.safetensors",
             n->store.dir);
    triage_infer_reload(n->infer, NULL);
}

/* A promote or rollback renames a new active.safetensors into the
 * registry (train/registry.c): the node loads it then, as at SIGHUP. The
 * retraining timer's auto-promote had waited for the next restart. The
 * load waits until the file has been quiet for MODELS_SETTLE_MS: a copy
 * written in place (cp over it, by hand) changes it once per write, and
 * each change had asked for a load, of a file still half written
 * ("model_reload_refused", an error, until the copy ended). */
static void on_models_changed(uv_fs_event_t *h, const char *name, int events, int status)
{
    (void)events;
    struct node *n = h->data;
    if (status < 0 || !name || strcmp(name, "active.safetensors") != 0) return;
    uv_timer_start(&n->models_settle, on_models_settled, MODELS_SETTLE_MS, 0);
}

/* Watches <store.dir>/models (made here if need be, as the registry makes
 * it). Without the watch the node still starts: SIGHUP loads a model. */
static void watch_models(struct node *n)
{
    char dir[1100];
    snprintf(dir, sizeof dir, "%s/models", n->store.dir);
    uv_fs_event_init(n->loop, &n->models);
    n->models.data = n;
    uv_timer_init(n->loop, &n->models_settle);
    n->models_settle.data = n;
    int rc = mkdir(dir, 0700) == 0 || errno == EEXIST ? 0 : -errno;
    if (rc == 0) rc = uv_fs_event_start(&n->models, on_models_changed, dir, 0);
    if (rc != 0)
        util_log(UTIL_LOG_WARN, "models_watch_failed", "path=%s error=\"%s\"", dir,
                 uv_strerror(rc));
}

static int get_int(struct node *n, enum triage_config_key k, int64_t *out)
{
    char err[512];
    if (triage_config_get(&n->cfg, k, out, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage: %s\n", err);
        return -1;
    }
    return 0;
}

/* The sender of results to PACS, from the [pacs] keys. */
static int start_pacs(struct node *n, const char *dbpath, char *err, size_t errlen)
{
    int64_t timeout, attempts, retry, max_retry;
    if (get_int(n, CFG_PACS_TIMEOUT, &timeout) || get_int(n, CFG_PACS_MAX_ATTEMPTS, &attempts) ||
        get_int(n, CFG_PACS_RETRY_SECONDS, &retry) ||
        get_int(n, CFG_PACS_MAX_RETRY_SECONDS, &max_retry)) {
        snprintf(err, errlen, "bad [pacs] value");
        return -1;
    }
    const char *send = triage_config_str(&n->cfg, CFG_PACS_SEND);
    const char *calling = triage_config_str(&n->cfg, CFG_PACS_CALLING_AETITLE);
    struct triage_pacs_config pc = {
        .db_path = dbpath,
        .store_dir = n->store.dir,
        .destinations = triage_config_str(&n->cfg, CFG_PACS_DESTINATIONS),
        .send_all = strcmp(send, "all") == 0,
        .calling_aet = calling[0] ? calling : triage_config_str(&n->cfg, CFG_DICOM_AETITLE),
        .timeout_s = (int)timeout,
        .max_attempts = (int)attempts,
        .retry_ms = retry * 1000,
        .max_retry_ms = max_retry * 1000,
        .tls_ca = triage_config_str(&n->cfg, CFG_PACS_TLS_CA),
        .tls_cert = triage_config_str(&n->cfg, CFG_PACS_TLS_CERT),
        .tls_key = triage_config_str(&n->cfg, CFG_PACS_TLS_KEY),
        .software_version = "ichtriage " ICHTRIAGE_VERSION,
    };
    return triage_pacs_start(&n->pacs, &pc, err, errlen);
}

static void usage(FILE *f)
{
    fprintf(f, "usage: ichtriage serve [-c FILE] [--set section.key=value]...\n"
               "\n"
               "Runs the node: the DICOM Storage SCP (C-ECHO, C-STORE) that stores every\n"
               "instance durably in <store.dir>/spool and indexes it in <store.dir>/ichtriage.db.\n"
               "SIGTERM or SIGINT: stop accepting, let associations in progress finish\n"
               "(dicom.shutdown_grace seconds), exit. SIGHUP: read the configuration again and\n"
               "apply dicom.allowed_peers, log.level, http.worklist_days and the model; other\n"
               "keys that changed need a restart (logged as reload_needs_restart).\n");
}

int triage_serve_main(int argc, char **argv)
{
    static struct node n; /* lives for the whole process: signal handles point into it */
    char err[1024];
    /* A peer that goes away while the node writes to it (a browser closing
     * the event stream, a DICOM peer, the pixel-decoder child's socket) is
     * an EPIPE for that connection, never a signal that ends the node. */
    signal(SIGPIPE, SIG_IGN);
    /* dcmtk disables Nagle only when this is set before its network starts;
     * scanners rarely do, and without it each small response waits ~40 ms.
     * Set before the node starts a thread: getenv in one (the inference
     * thread's nn_blas_fallback) is not safe against setenv in another. */
    setenv("TCP_NODELAY", "1", 1);
    if (triage_config_from_args(&n.cfg, &argc, argv, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage serve: %s\n", err);
        util_log(UTIL_LOG_ERROR, "start_failed", "reason=\"%s\"", err);
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        }
        fprintf(stderr, "ichtriage serve: unexpected argument '%s'\n", argv[i]);
        usage(stderr);
        return 2;
    }
    /* A configuration the node refuses exits 2, which the unit does not
     * restart (RestartPreventExitStatus): it would fail the same way. */
    if (check_startable(&n.cfg, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage serve: %s\n", err);
        util_log(UTIL_LOG_ERROR, "start_failed", "reason=\"%s\"", err);
        return 2;
    }
    int level = util_log_level_parse(triage_config_str(&n.cfg, CFG_LOG_LEVEL));
    util_log_set_level((enum util_log_level)level);
    scp_log_init(level >= UTIL_LOG_DEBUG);

    int64_t port, max_assoc, max_pdu, acse, dimse, deadline, min_free, max_inst, grace, window;
    if (get_int(&n, CFG_DICOM_PORT, &port) || get_int(&n, CFG_DICOM_MAX_ASSOCIATIONS, &max_assoc) ||
        get_int(&n, CFG_DICOM_MAX_PDU, &max_pdu) || get_int(&n, CFG_DICOM_ACSE_TIMEOUT, &acse) ||
        get_int(&n, CFG_DICOM_DIMSE_TIMEOUT, &dimse) ||
        get_int(&n, CFG_DICOM_ASSOCIATION_DEADLINE, &deadline) ||
        get_int(&n, CFG_STORE_MIN_FREE_MB, &min_free) ||
        get_int(&n, CFG_STORE_MAX_INSTANCE_MB, &max_inst) ||
        get_int(&n, CFG_STORE_FAILURE_WINDOW_SECONDS, &window) ||
        get_int(&n, CFG_DICOM_SHUTDOWN_GRACE, &grace))
        return 2;
    const char *aet = triage_config_str(&n.cfg, CFG_DICOM_AETITLE);
    /* Each association holds a socket and a temp file, and the index,
     * decoder and HTTP want theirs: systemd's soft limit of 1024 runs out
     * below dicom.max_associations' 1000. The hard limit is ours to take. */
    struct rlimit nofile;
    if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
        nofile.rlim_cur = nofile.rlim_max;
        setrlimit(RLIMIT_NOFILE, &nofile);
    }
    if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < (rlim_t)(4 * max_assoc + 256))
        util_log(UTIL_LOG_WARN, "open_files_limit_low",
                 "limit=%llu max_associations=%lld want=%lld", (unsigned long long)nofile.rlim_cur,
                 (long long)max_assoc, (long long)(4 * max_assoc + 256));
    int64_t tls_port;
    if (get_int(&n, CFG_DICOM_TLS_PORT, &tls_port)) return 2;
    n.grace = (int)grace;

    /* Everything the node writes is for its own user only. */
    umask(077);
    n.store.min_free_bytes = min_free << 20;
    if (triage_store_prepare(&n.store, triage_config_str(&n.cfg, CFG_STORE_DIR), window, err,
                             sizeof err) != 0) {
        util_log(UTIL_LOG_ERROR, "start_failed", "reason=\"%s\"", err);
        return 1;
    }
    if (triage_store_lock(n.store.dir, err, sizeof err) != 0) {
        util_log(UTIL_LOG_ERROR, "start_failed", "reason=\"%s\"", err);
        return 1;
    }
    char dbpath[1200];
    snprintf(dbpath, sizeof dbpath, "%s/ichtriage.db", n.store.dir);
    /* Checked before db_open makes the index: a refused start must leave
     * it as it is, or the next start would take the instances for
     * unindexed ones and remove them. */
    if (db_index_is_new(dbpath) && triage_store_check_lost_index(&n.store, err, sizeof err) != 0) {
        util_log(UTIL_LOG_ERROR, "start_failed", "reason=\"%s\"", err);
        return 1;
    }
    if (db_open(&n.store.db, dbpath, err, sizeof err) != 0) {
        util_log(UTIL_LOG_ERROR, "start_failed", "reason=\"%s\"", err);
        return 1;
    }
    if (triage_store_recover(&n.store, err, sizeof err) != 0) {
        util_log(UTIL_LOG_ERROR, "start_failed", "reason=\"%s\"", err);
        db_close(n.store.db);
        return 1;
    }

    int requeued = 0, given_up = 0;
    if (db_jobs_requeue(n.store.db, JOB_MAX_STOPS, wall_ms(), &requeued, &given_up) != 0) {
        util_log(UTIL_LOG_ERROR, "start_failed", "reason=\"cannot requeue jobs\"");
        db_close(n.store.db);
        return 1;
    }
    if (requeued) util_log(UTIL_LOG_WARN, "jobs_requeued", "count=%d", requeued);
    if (given_up)
        util_log(UTIL_LOG_ERROR, "jobs_failed_after_stops", "count=%d stops=%d", given_up,
                 JOB_MAX_STOPS);
    /* From here on the connection is the loop's: start-up could wait. */
    db_set_busy_timeout(n.store.db, LOOP_BUSY_TIMEOUT_MS);
    int64_t quiet, min_slices, max_tilt, keep_days, keep_reviewed_days, claim_minutes,
        worklist_days;
    if (get_int(&n, CFG_TRIAGE_QUIET_SECONDS, &quiet) ||
        get_int(&n, CFG_HTTP_WORKLIST_DAYS, &worklist_days) ||
        get_int(&n, CFG_TRIAGE_MIN_SLICES, &min_slices) ||
        get_int(&n, CFG_TRIAGE_MAX_TILT, &max_tilt) ||
        get_int(&n, CFG_STORE_RETENTION_DAYS, &keep_days) ||
        get_int(&n, CFG_STORE_KEEP_REVIEWED_DAYS, &keep_reviewed_days) ||
        get_int(&n, CFG_HTTP_CLAIM_MINUTES, &claim_minutes)) {
        db_close(n.store.db);
        return 2;
    }
    n.retain = (struct triage_retention){.db = n.store.db,
                                         .store_dir = n.store.dir,
                                         .keep_ms = keep_days * 86400000,
                                         .keep_reviewed_ms = keep_reviewed_days * 86400000,
                                         .claim_ms = claim_minutes * 60000};
    n.complete = (struct triage_completion){.db = n.store.db,
                                            .quiet_ms = quiet * 1000,
                                            .min_slices = (int)min_slices,
                                            .max_tilt_deg = (double)max_tilt};
    snprintf(n.complete.head_patterns, sizeof n.complete.head_patterns, "%s",
             triage_config_str(&n.cfg, CFG_TRIAGE_HEAD_PATTERNS));
    for (char *p = n.complete.head_patterns; *p; p++)
        *p = (char)toupper((unsigned char)*p);

    int64_t decoder_mb, decoder_cpu;
    const char *decoder = triage_config_str(&n.cfg, CFG_TRIAGE_PIXEL_DECODER);
    if (get_int(&n, CFG_TRIAGE_DECODER_MAX_MB, &decoder_mb) ||
        get_int(&n, CFG_TRIAGE_DECODER_CPU_SECONDS, &decoder_cpu)) {
        db_close(n.store.db);
        return 2;
    }
    if (triage_decoder_init(&n.decoder, strcmp(decoder, "child") == 0, decoder_mb, (int)decoder_cpu,
                            err, sizeof err) != 0) {
        util_log(UTIL_LOG_ERROR, "start_failed", "reason=\"%s\"", err);
        db_close(n.store.db);
        return 1;
    }

    n.loop = uv_default_loop();
    uv_async_init(n.loop, &n.result_async, on_result_async);
    n.result_async.data = &n;
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    struct triage_infer_config ic = {
        .store_dir = n.store.dir,
        .db_path = dbpath,
        .model = triage_config_str(&n.cfg, CFG_TRIAGE_MODEL),
        .max_tilt_deg = (double)max_tilt,
        .min_slices = (int)min_slices,
        .threads = cores > 0 ? (int)cores : 1,
        .device = triage_config_str(&n.cfg, CFG_NN_DEVICE),
        .decoder = &n.decoder,
        .on_done = wake_loop_result,
        .ud = &n,
    };
    if (triage_infer_start(&n.infer, &ic, err, sizeof err) != 0) {
        util_log(UTIL_LOG_ERROR, "start_failed", "reason=\"%s\"", err);
        db_close(n.store.db);
        return 1;
    }
    uv_async_init(n.loop, &n.stored_async, on_stored_async);
    n.stored_async.data = &n;
    n.store.on_stored = wake_loop;
    n.store.on_health = wake_loop;
    n.store.ud = &n;
    uv_signal_init(n.loop, &n.sigterm);
    uv_signal_init(n.loop, &n.sigint);
    uv_signal_init(n.loop, &n.sighup);
    n.sigterm.data = n.sigint.data = n.sighup.data = &n;
    uv_signal_start(&n.sigterm, on_stop_signal, SIGTERM);
    uv_signal_start(&n.sigint, on_stop_signal, SIGINT);
    uv_signal_start(&n.sighup, on_reload_signal, SIGHUP);
    watch_models(&n);

    struct scp_server_config sc = {
        .port = (int)port,
        .aetitle = aet,
        .max_associations = (int)max_assoc,
        .max_pdu = (int)max_pdu,
        .acse_timeout = (int)acse,
        .dimse_timeout = (int)dimse,
        .association_deadline = (int)deadline,
        .max_instance_bytes = max_inst << 20,
        .allowed_peers = triage_config_str(&n.cfg, CFG_DICOM_ALLOWED_PEERS),
        .tmp_dir = n.store.tmp,
        .tls_port = (int)tls_port,
        .tls_cert = triage_config_str(&n.cfg, CFG_DICOM_TLS_CERT),
        .tls_key = triage_config_str(&n.cfg, CFG_DICOM_TLS_KEY),
        .tls_ca = triage_config_str(&n.cfg, CFG_DICOM_TLS_CA),
        .store = triage_store_instance,
        .space = triage_store_check_space,
        .outcome = triage_store_outcome,
        .ud = &n.store,
    };
    if (scp_server_start(&n.scp, &sc, err, sizeof err) != 0) {
        util_log(UTIL_LOG_ERROR, "start_failed", "reason=\"%s\"", err);
        triage_infer_stop(n.infer);
        db_close(n.store.db);
        return 1;
    }
    struct triage_http_config hc = http_settings(&n.cfg);
    hc.loop = n.loop;
    hc.db = n.store.db;
    hc.store = &n.store;
    hc.infer = n.infer;
    hc.scp = n.scp;
    hc.claim_ms = n.retain.claim_ms;
    hc.worklist_days = (int)worklist_days;
    if (triage_http_start(&n.http, &hc, err, sizeof err) != 0) {
        util_log(UTIL_LOG_ERROR, "start_failed", "reason=\"%s\"", err);
        scp_server_stop(n.scp, 0);
        triage_infer_stop(n.infer);
        db_close(n.store.db);
        return 1;
    }
    if (start_pacs(&n, dbpath, err, sizeof err) != 0) {
        util_log(UTIL_LOG_ERROR, "start_failed", "reason=\"%s\"", err);
        triage_http_stop(n.http);
        scp_server_stop(n.scp, 0);
        triage_infer_stop(n.infer);
        db_close(n.store.db);
        return 1;
    }
    int64_t count = 0;
    db_count_instances(n.store.db, &count);
    util_log(UTIL_LOG_INFO, "ready",
             "port=%d tls_port=%d aetitle=%s store=%s instances=%lld config=\"%s\"", (int)port,
             (int)tls_port, aet, n.store.dir, (long long)count, n.cfg.source);
    uint64_t beat_ms = 5000;
#ifdef HAVE_SYSTEMD
    uint64_t wd_usec = 0;
    if (sd_watchdog_enabled(0, &wd_usec) > 0 && wd_usec / 2000 < beat_ms) beat_ms = wd_usec / 2000;
    if (beat_ms == 0) beat_ms = 1;
    sd_notify(0, "READY=1\nSTATUS=receiving; loading model");
#endif
    uv_timer_init(n.loop, &n.heartbeat);
    n.heartbeat.data = &n;
    uv_timer_start(&n.heartbeat, on_heartbeat, 0, beat_ms);
    uv_timer_init(n.loop, &n.completion);
    n.completion.data = &n;
    /* The quiet period ends at most one tick late; a tick is one index range
     * scan, so it can be short. */
    uv_timer_start(&n.completion, on_completion_timer, 0, 50);
    uv_timer_init(n.loop, &n.retention);
    n.retention.data = &n;
    if (n.retain.keep_ms > 0) uv_timer_start(&n.retention, on_retention_timer, 2000, 600000);

    uv_run(n.loop, UV_RUN_DEFAULT);

    triage_http_stop(n.http); /* before the handles it shares the loop with close */
    n.http = NULL;
    /* The job and the PACS association in progress finish while the
     * associations in progress do, not after them: the stop takes the
     * longest of the three, not their sum (systemd's TimeoutStopSec). */
    triage_infer_request_stop(n.infer);
    triage_pacs_request_stop(n.pacs);
    /* Stop accepting, let associations in progress finish, then close. */
    scp_server_stop(n.scp, n.grace);
    n.scp = NULL;
    triage_infer_stop(n.infer); /* a job in progress finishes first */
    n.infer = NULL;
    /* An association in progress is cut; a sender in a TCP connect is left. */
    int pacs_left = triage_pacs_stop(n.pacs);
    n.pacs = NULL;
    uv_close((uv_handle_t *)&n.sigterm, NULL);
    uv_close((uv_handle_t *)&n.sigint, NULL);
    uv_close((uv_handle_t *)&n.sighup, NULL);
    uv_close((uv_handle_t *)&n.models, NULL);
    uv_close((uv_handle_t *)&n.models_settle, NULL);
    uv_close((uv_handle_t *)&n.stored_async, NULL);
    uv_close((uv_handle_t *)&n.heartbeat, NULL);
    uv_close((uv_handle_t *)&n.completion, NULL);
    uv_close((uv_handle_t *)&n.retention, NULL);
    uv_close((uv_handle_t *)&n.result_async, NULL);
    uv_run(n.loop, UV_RUN_DEFAULT);
    uv_loop_close(n.loop);
    db_close(n.store.db);
    triage_store_mark_clean(&n.store);
    triage_store_finish(&n.store);
    triage_decoder_free(&n.decoder);
    util_log(UTIL_LOG_INFO, "stopped", "stored=%lld refused_low_space=%lld",
             (long long)atomic_load(&n.store.stored), (long long)atomic_load(&n.store.refused));
    triage_config_free(&n.cfg);
    if (pacs_left) {
        /* Its thread may still wake (its connect ending) while exit() runs
         * the libraries' static destructors, dcmtk's dictionary among them. */
        fflush(NULL);
        _exit(0);
    }
    return 0;
}

/* triage/pacs.c: the sender of results to PACS (pacs.h). A builder thread
 * makes each result's objects and queues their deliveries; each destination
 * has a sender thread of its own, so that one that hangs (a connect, an
 * acceptance or an answer waiting out pacs.timeout) holds back only its own
 * deliveries. Each thread has its own database connection; the loop only
 * calls triage_pacs_kick(). */
#include "pacs.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "db.h"
#include "db_outbox.h"
#include "log.h"
#include "number.h"
#include "pacs_render.h"
#include "scp_info.h"
#include "scp_pixels.h"
#include "scp_sc.h"
#include "scp_send.h"
#include "scp_sr.h"

#define SUBTYPE_THRESHOLD 0.5 /* subtypes at or above are listed as suspected */
#define KEY_REFS 3            /* slices referenced by the SR */
#define IDLE_MS 60000         /* longest sleep: the queue is looked at this often anyway */
#define BATCH 64

/* A revision whose building failed (disk full, I/O): tried again at next_at;
 * given up (failed) after max_attempts, as deliveries are. Kept in memory:
 * a restart tries every pending revision again at once. */
struct build_retry {
    int64_t revision_id, next_at;
    int attempts;
};

/* The sender of one destination: its deliveries, one association at a
 * time, and its own backoff (the queue's next attempt times). */
struct dest_sender {
    struct triage_pacs *p;
    const struct triage_pacs_dest *dest;
    struct db *db; /* the thread's own connection */
    pthread_t thread;
    pthread_cond_t cv; /* with p->mu */
    bool kicked;       /* guarded by p->mu */
    /* The stop cuts its association short: a PACS slow to accept or to
     * answer held the stop (and so the node's restart, scanners refused
     * meanwhile) for up to pacs.timeout. */
    struct scp_send_cut cut;
};

struct triage_pacs {
    /* Set at start, read-only afterwards. */
    struct triage_pacs_dest dests[TRIAGE_PACS_MAX_DESTS];
    int ndests;
    bool send_all;
    char calling_aet[17];
    int timeout_s, max_attempts;
    int64_t retry_ms, max_retry_ms;
    char tls_ca[512], tls_cert[512], tls_key[512];
    char software_version[64];
    char store_dir[1024];
    struct db *db; /* the builder's own connection */
    /* The builder's own. */
    struct build_retry retries[BATCH];
    int nretries;
    pthread_t thread;
    struct dest_sender senders[TRIAGE_PACS_MAX_DESTS];
    int nsenders; /* started */
    /* Guarded by mu. */
    pthread_mutex_t mu;
    pthread_cond_t cv; /* the builder's */
    bool kicked, stop;
};

/* The wall clock: the queue's times are kept in the database, across
 * restarts. */
static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Is a retry set for at due at now? Also when at is further ahead than any
 * backoff: the wall clock went back since (NTP, a restored VM), and the
 * retry had waited for as long as the step. */
static bool due_at(const struct triage_pacs *p, int64_t at, int64_t now)
{
    return at <= now || at > now + p->max_retry_ms;
}

int triage_pacs_parse_destinations(const char *list, struct triage_pacs_dest *out, int max, int *n,
                                   char *err, size_t errlen)
{
    *n = 0;
    const char *p = list ? list : "";
    while (*p) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        char item[160];
        while (len && (*p == ' ' || *p == '\t'))
            p++, len--;
        while (len && (p[len - 1] == ' ' || p[len - 1] == '\t'))
            len--;
        if (len >= sizeof item) {
            snprintf(err, errlen, "pacs.destinations: entry too long");
            return -1;
        }
        memcpy(item, p, len);
        item[len] = '\0';
        p = end ? end + 1 : p + strlen(p);
        if (!len) continue;
        if (*n >= max) {
            snprintf(err, errlen, "pacs.destinations: more than %d destinations", max);
            return -1;
        }
        struct triage_pacs_dest *d = &out[*n];
        memset(d, 0, sizeof *d);
        snprintf(d->spec, sizeof d->spec, "%s", item);
        const char *s = item;
        if (strncmp(s, "tls:", 4) == 0) {
            d->tls = true;
            s += 4;
        }
        const char *at = strchr(s, '@'), *colon = strrchr(s, ':');
        long port = 0;
        if (!at || !colon || colon < at || at == s || (size_t)(at - s) > 16 || colon == at + 1 ||
            (size_t)(colon - at - 1) >= sizeof d->host ||
            util_number_long(colon + 1, 1, 65535, &port) != 0) {
            snprintf(err, errlen, "pacs.destinations: '%s' is not [tls:]AET@host:port", item);
            return -1;
        }
        memcpy(d->aet, s, (size_t)(at - s));
        memcpy(d->host, at + 1, (size_t)(colon - at - 1));
        d->port = (int)port;
        /* Twice the same PACS would get every object twice; the same
         * spelling twice made each revision's deliveries collide in the
         * queue, and no result was ever sent. */
        for (int k = 0; k < *n; k++)
            if (strcmp(out[k].aet, d->aet) == 0 && strcasecmp(out[k].host, d->host) == 0 &&
                out[k].port == d->port) {
                if (strcmp(out[k].spec, item) == 0)
                    snprintf(err, errlen, "pacs.destinations: '%s' is listed twice", item);
                else
                    snprintf(err, errlen, "pacs.destinations: '%s' is the same destination as '%s'",
                             item, out[k].spec);
                return -1;
            }
        (*n)++;
    }
    return 0;
}

static int64_t backoff_ms(const struct triage_pacs *p, int attempts);

static struct build_retry *retry_find(struct triage_pacs *p, int64_t revision_id)
{
    for (int i = 0; i < p->nretries; i++)
        if (p->retries[i].revision_id == revision_id) return &p->retries[i];
    return NULL;
}

static void retry_drop(struct triage_pacs *p, int64_t revision_id)
{
    struct build_retry *r = retry_find(p, revision_id);
    if (r) *r = p->retries[--p->nretries];
}

/* Rows further apart than columns are drawn taller; 1 when the spacing is
 * unknown or beyond any scanner's (a tenfold difference). */
static double picture_aspect(const double spacing[2])
{
    double a = spacing[0] > 0 && spacing[1] > 0 ? spacing[0] / spacing[1] : 1.0;
    return a >= 0.1 && a <= 10 ? a : 1.0;
}

/* Building revision_id failed for reason: left pending and tried again
 * later, or, after max_attempts, marked failed (shown with the given-up
 * deliveries). */
static void build_failed(struct triage_pacs *p, int64_t revision_id, const char *study,
                         int revision, const char *reason)
{
    struct build_retry *r = retry_find(p, revision_id);
    int attempts = (r ? r->attempts : 0) + 1;
    if (attempts >= p->max_attempts) {
        /* recorded first: the line says what /healthz already shows */
        if (db_outbox_revision_failed(p->db, revision_id, reason, now_ms()) != 0)
            util_log(UTIL_LOG_ERROR, "pacs_record_failed", "revision_id=%lld",
                     (long long)revision_id);
        util_log(UTIL_LOG_ERROR, "pacs_revision_failed",
                 "study=%s revision=%d attempts=%d reason=\"%s\"", study, revision, attempts,
                 reason);
        retry_drop(p, revision_id);
        return;
    }
    if (!r && p->nretries < BATCH) r = &p->retries[p->nretries++];
    int64_t wait = backoff_ms(p, attempts);
    if (r) /* else (BATCH revisions failing at once) tried again each pass */
        *r = (struct build_retry){revision_id, now_ms() + wait, attempts};
    util_log(UTIL_LOG_WARN, "pacs_revision_retry",
             "study=%s revision=%d attempt=%d next_in_ms=%lld reason=\"%s\"", study, revision,
             attempts, (long long)wait, reason);
}

/* Makes a written file durable under its final name. */
static int commit_file(const char *tmp, const char *final, const char *dir)
{
    int fd = open(tmp, O_RDONLY);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    if (rc != 0 || rename(tmp, final) != 0) return -1;
    fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return -1;
    rc = fsync(fd);
    close(fd);
    return rc;
}

/* The Referenced Frame Number of frame (0-based, as slice_results keeps it)
 * of an instance of frames frames: 1-based in a multi-frame object, 0 (the
 * reference names no frame) in a single-frame one. */
static int ref_frame(int frame, int frames)
{
    return frames > 1 ? frame + 1 : 0;
}

/* Up to KEY_REFS slices: the key slice, then the most probable others. */
static int key_refs(const struct db_outbox_source *s, struct scp_sr_image_ref *refs)
{
    int n = 0;
    refs[n++] = (struct scp_sr_image_ref){s->key_sop_class, s->key_sop,
                                          ref_frame(s->key_frame, s->key_frames)};
    int picked[KEY_REFS] = {s->key_index, -1, -1};
    while (n < KEY_REFS) {
        int best = -1;
        for (int i = 0; i < s->slices; i++) {
            bool taken = false;
            for (int k = 0; k < n; k++)
                taken = taken || picked[k] == i ||
                        (strcmp(s->sop[i], refs[k].sop_uid) == 0 &&
                         ref_frame(s->frame[i], s->frames[i]) == refs[k].frame);
            if (!taken && s->sop_class[i][0] && s->p_any[i] >= SUBTYPE_THRESHOLD &&
                (best < 0 || s->p_any[i] > s->p_any[best]))
                best = i;
        }
        if (best < 0) break;
        picked[n] = best;
        refs[n++] = (struct scp_sr_image_ref){s->sop_class[best], s->sop[best],
                                              ref_frame(s->frame[best], s->frames[best])};
    }
    return n;
}

/* The summary image of s (key slice src) into *rgb (rows x cols, the
 * caller frees). Returns 0, or -1 with the reason. */
static int summary(const struct db_outbox_source *s, const char *src, const double *sub,
                   uint8_t **rgb, int *rows, int *cols, char *err, size_t errlen)
{
    /* Only the key frame: a multi-frame (Enhanced CT) object is not decoded
     * whole for one picture. */
    struct scp_pixels px = {0};
    if (scp_pixels_read_frame(src, s->key_frame, &px, err, errlen) != 0) return -1;
    /* Its InstanceNumber, for the caption: the image PACS shows. */
    struct scp_info info;
    char e[256];
    int instance = scp_info_read(src, &info, e, sizeof e) == 0 ? info.instance_number : -1;
    struct triage_pacs_picture pic = {
        .hu = px.hu,
        .hu_rows = px.rows,
        .hu_cols = px.columns,
        .pixel_aspect = picture_aspect(s->key_spacing),
        .p_any = s->p_any,
        .slices = s->slices,
        .key_index = s->key_index,
        .key_instance_number = instance,
        .key_frame = s->key_frame,
        .key_frames = s->key_frames,
        .suspected = s->flagged,
        .p_study = s->p[0],
        .p_subtype = sub,
        .subtype_threshold = SUBTYPE_THRESHOLD,
        .model_version = s->model_version,
        .revision = s->revision,
    };
    int rc = triage_pacs_render(&pic, rgb, rows, cols, err, errlen);
    scp_pixels_free(&px);
    return rc;
}

static void kick(struct triage_pacs *p, pthread_cond_t *cv, bool *kicked)
{
    pthread_mutex_lock(&p->mu);
    *kicked = true;
    pthread_cond_signal(cv);
    pthread_mutex_unlock(&p->mu);
}

/* New deliveries are queued for every destination. */
static void kick_senders(struct triage_pacs *p)
{
    for (int i = 0; i < p->nsenders; i++)
        kick(p, &p->senders[i].cv, &p->senders[i].kicked);
}

/* Builds a revision's SR and SC files and queues their deliveries. */
static void build(struct triage_pacs *p, int64_t rev_id)
{
    struct build_retry *due = retry_find(p, rev_id);
    if (due && !due_at(p, due->next_at, now_ms())) return;
    struct db_outbox_source s;
    int rc = db_outbox_source(p->db, rev_id, &s);
    if (rc == DB_OUTBOX_SUPERSEDED) {
        util_log(UTIL_LOG_INFO, "pacs_revision_superseded", "revision_id=%lld", (long long)rev_id);
        retry_drop(p, rev_id);
        if (db_outbox_revision_superseded(p->db, rev_id) != 0)
            util_log(UTIL_LOG_ERROR, "pacs_record_failed", "revision_id=%lld", (long long)rev_id);
        return;
    }
    if (rc < 0) {
        build_failed(p, rev_id, "", 0, "database error");
        return;
    }
    if (rc != 0) {
        const char *why = "key slice no longer indexed";
        util_log(UTIL_LOG_WARN, "pacs_revision_not_built", "revision_id=%lld reason=\"%s\"",
                 (long long)rev_id, why);
        db_outbox_revision_failed(p->db, rev_id, why, now_ms());
        retry_drop(p, rev_id);
        return;
    }
    char dir[1100], src[1600], rel_sr[64], rel_sc[64], path_sr[1200], path_sc[1200], tmp[1300];
    char err[2048] = "";
    tmp[0] = '\0';
    snprintf(dir, sizeof dir, "%s/outbox", p->store_dir);
    snprintf(src, sizeof src, "%s/%s", p->store_dir, s.key_path);
    snprintf(rel_sr, sizeof rel_sr, "outbox/%lld-sr.dcm", (long long)rev_id);
    snprintf(rel_sc, sizeof rel_sc, "outbox/%lld-sc.dcm", (long long)rev_id);
    snprintf(path_sr, sizeof path_sr, "%s/%s", p->store_dir, rel_sr);
    snprintf(path_sc, sizeof path_sc, "%s/%s", p->store_dir, rel_sc);
    char sr_series[65], sr_sop[65], sc_series[65], sc_sop[65], desc_sr[64], desc_sc[64];
    scp_uid_new(sr_series, sizeof sr_series);
    scp_uid_new(sr_sop, sizeof sr_sop);
    scp_uid_new(sc_series, sizeof sc_series);
    scp_uid_new(sc_sop, sizeof sc_sop);
    snprintf(desc_sr, sizeof desc_sr, "ICH triage report rev %d (decision support)", s.revision);
    snprintf(desc_sc, sizeof desc_sc, "ICH triage summary rev %d (decision support)", s.revision);
    double sub[SCP_SR_SUBTYPES];
    for (int i = 0; i < SCP_SR_SUBTYPES; i++)
        sub[i] = s.p[i + 1];
    uint8_t *rgb = NULL;
    int rows = 0, cols = 0;
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        snprintf(err, sizeof err, "cannot create %s: %s", dir, strerror(errno));
        goto failed;
    }
    struct scp_sr_image_ref refs[KEY_REFS];
    struct scp_sr_content content = {
        .suspected = s.flagged,
        .p_any = s.p[0],
        .subtype_threshold = SUBTYPE_THRESHOLD,
        .model_name = "ichtriage LRCN (CNN + bidirectional LSTM)",
        .model_version = s.model_version,
        .ref_series_uid = s.series_uid,
        .refs = refs,
        .nrefs = key_refs(&s, refs),
        .revision = s.revision,
        .predecessor_series_uid = s.prev_sr_series_uid,
        .predecessor_sop_uid = s.prev_sr_sop_uid,
    };
    memcpy(content.p_subtype, sub, sizeof sub);
    struct scp_derived d_sr = {
        .source_path = src,
        .series_uid = sr_series,
        .sop_uid = sr_sop,
        .series_number = 9000 + s.revision,
        .instance_number = 1,
        .series_desc = desc_sr,
        .software_version = p->software_version,
    };
    snprintf(tmp, sizeof tmp, "%s.tmp", path_sr);
    if (scp_write_sr(tmp, &d_sr, &content, err, sizeof err) != 0 ||
        commit_file(tmp, path_sr, dir) != 0) {
        if (!err[0]) snprintf(err, sizeof err, "cannot write %s", path_sr);
        goto failed;
    }
    /* The summary image. One that cannot be drawn is tried again, as a
     * file that cannot be written is (the key slice's file may be out of
     * reach for a moment: no memory, too many files open). At the last
     * attempt the SR goes alone, rather than neither: a key slice that does
     * not decode on its own fails the same way every time. */
    char why_no_sc[1024] = "";
    bool sc = summary(&s, src, sub, &rgb, &rows, &cols, why_no_sc, sizeof why_no_sc) == 0;
    if (!sc && (due ? due->attempts : 0) + 1 < p->max_attempts) {
        snprintf(err, sizeof err, "summary image: %s", why_no_sc);
        goto failed;
    }
    if (!sc) {
        util_log(UTIL_LOG_WARN, "pacs_summary_failed",
                 "study=%s revision=%d reason=\"%s\" sent=sr_only", s.study_uid, s.revision,
                 why_no_sc);
    } else {
        struct scp_derived d_sc = d_sr;
        d_sc.series_uid = sc_series;
        d_sc.sop_uid = sc_sop;
        d_sc.series_number = 9500 + s.revision;
        d_sc.series_desc = desc_sc;
        snprintf(tmp, sizeof tmp, "%s.tmp", path_sc);
        if (scp_write_sc(tmp, &d_sc, rgb, rows, cols, &refs[0], err, sizeof err) != 0 ||
            commit_file(tmp, path_sc, dir) != 0) {
            if (!err[0]) snprintf(err, sizeof err, "cannot write %s", path_sc);
            goto failed;
        }
    }
    struct db_outbox_object objs[TRIAGE_PACS_MAX_DESTS * 2];
    int nobjs = 0;
    for (int i = 0; i < p->ndests; i++) {
        objs[nobjs++] = (struct db_outbox_object){p->dests[i].spec, "sr", rel_sr, sr_sop};
        if (sc) objs[nobjs++] = (struct db_outbox_object){p->dests[i].spec, "sc", rel_sc, sc_sop};
    }
    if (db_outbox_revision_ready(p->db, rev_id, sr_series, sr_sop, objs, nobjs, now_ms(), err,
                                 sizeof err) != 0) {
        /* Left pending: built again (new UIDs) next time; nothing was sent. */
        util_log(UTIL_LOG_ERROR, "pacs_queue_failed", "revision_id=%lld reason=\"%s\"",
                 (long long)rev_id, err);
        char why[sizeof err + 64];
        snprintf(why, sizeof why, "cannot queue the deliveries: %s", err);
        build_failed(p, rev_id, s.study_uid, s.revision, why);
    } else {
        retry_drop(p, rev_id);
        kick_senders(p); /* due now */
        util_log(UTIL_LOG_INFO, "pacs_revision_built",
                 "study=%s revision=%d flagged=%d sr=%s sc=%s destinations=%d", s.study_uid,
                 s.revision, s.flagged, sr_sop, sc ? sc_sop : "none", p->ndests);
    }
    free(rgb);
    db_outbox_source_free(&s);
    return;
failed:
    /* Built again from the start (new UIDs) next time: nothing of it stays. */
    if (tmp[0]) unlink(tmp);
    unlink(path_sr);
    unlink(path_sc);
    build_failed(p, rev_id, s.study_uid, s.revision, err);
    free(rgb);
    db_outbox_source_free(&s);
}

/* New results become revisions; pending revisions are built. */
static void intake(struct triage_pacs *p)
{
    struct db_outbox_new fresh[BATCH];
    int n = 0;
    if (db_outbox_scan(p->db, fresh, BATCH, &n) != 0) {
        util_log(UTIL_LOG_ERROR, "pacs_scan_failed", "reason=\"database\"");
        return;
    }
    for (int i = 0; i < n; i++) {
        const struct db_outbox_new *r = &fresh[i];
        const char *state = "pending", *reason = "";
        if (p->ndests == 0) {
            state = "skipped";
            reason = "no pacs.destinations";
        } else if (!p->send_all && !r->flagged && !r->sent_before) {
            state = "skipped";
            reason = "not flagged (pacs.send = flagged)";
        }
        int64_t id;
        int rev;
        if (db_outbox_revision_add(p->db, r, state, reason, now_ms(), &id, &rev) != 0)
            util_log(UTIL_LOG_ERROR, "pacs_scan_failed", "series_id=%lld", (long long)r->series_id);
    }
    int64_t ids[BATCH];
    if (db_outbox_pending(p->db, ids, BATCH, &n) != 0) return;
    for (int i = 0; i < n; i++)
        build(p, ids[i]);
}

static int64_t backoff_ms(const struct triage_pacs *p, int attempts)
{
    int64_t wait = p->retry_ms;
    for (int i = 1; i < attempts && wait < p->max_retry_ms; i++)
        wait *= 2;
    return wait < p->max_retry_ms ? wait : p->max_retry_ms;
}

/* The peer took the delivery (status: its answer, success or a warning). */
static void record_sent(struct dest_sender *s, const struct db_outbox_delivery *x, int status)
{
    if (db_outbox_sent(s->db, x->id, now_ms()) != 0)
        util_log(UTIL_LOG_ERROR, "pacs_record_failed", "delivery=%lld", (long long)x->id);
    util_log(UTIL_LOG_INFO, "pacs_sent", "study=%s object=%s sop=%s destination=%s status=0x%04X",
             x->study_uid, x->object, x->sop_uid, x->destination, (unsigned)status);
}

/* An attempt of the delivery failed for why; it ended at end (that of its
 * association): retried a backoff after that, or given up. */
static void record_failed(struct dest_sender *s, const struct db_outbox_delivery *x,
                          const char *why, int64_t end)
{
    int attempts = x->attempts + 1;
    bool give_up = attempts >= s->p->max_attempts;
    int64_t next = end + backoff_ms(s->p, attempts);
    db_outbox_attempt_failed(s->db, x->id, why, end, next, give_up);
    if (give_up)
        util_log(UTIL_LOG_ERROR, "pacs_delivery_failed",
                 "study=%s object=%s sop=%s destination=%s attempts=%d reason=\"%s\"", x->study_uid,
                 x->object, x->sop_uid, x->destination, attempts, why);
    else
        util_log(UTIL_LOG_WARN, "pacs_retry",
                 "study=%s object=%s destination=%s attempt=%d next_in_ms=%lld reason=\"%s\"",
                 x->study_uid, x->object, x->destination, attempts, (long long)(next - now_ms()),
                 why);
}

int triage_pacs_drop_files(struct db *db, const char *store_dir, int64_t revision_id)
{
    char rel[4][512], path[1600];
    int n = 0, removed = 0;
    if (db_outbox_revision_files_done(db, revision_id, rel, 4, &n) != 0) return -1;
    for (int i = 0; i < n; i++) {
        if ((size_t)snprintf(path, sizeof path, "%s/%s", store_dir, rel[i]) >= sizeof path)
            util_log(UTIL_LOG_WARN, "pacs_cleanup_failed", "file=%s reason=\"path too long\"",
                     rel[i]);
        else if (unlink(path) == 0)
            removed++;
        else if (errno != ENOENT)
            util_log(UTIL_LOG_WARN, "pacs_cleanup_failed", "file=%s reason=\"%s\"", rel[i],
                     strerror(errno));
    }
    return removed;
}

/* One association's deliveries; which of them the peer has answered. */
struct group {
    struct dest_sender *s;
    const struct db_outbox_delivery *g;
};

static bool stopping(struct triage_pacs *p)
{
    pthread_mutex_lock(&p->mu);
    bool s = p->stop;
    pthread_mutex_unlock(&p->mu);
    return s;
}

/* An acknowledgement is committed before the next object goes out, so a
 * crash cannot forget it. */
static void on_answered(void *ud, int i, const struct scp_send_file *f)
{
    struct group *gr = ud;
    if (scp_send_status_ok(f->status)) record_sent(gr->s, &gr->g[i], f->status);
}

/* At stop no object goes out, the first included: a batch to a slow PACS
 * (each answer up to pacs.timeout) had held the stop past systemd's
 * TimeoutStopSec, and a stop while the association was set up still sent
 * (and waited for) its first object. */
static bool go_on(void *ud)
{
    struct group *gr = ud;
    return !stopping(gr->s->p);
}

/* Sends deliveries of the sender's destination (one association). */
static void send_group(struct dest_sender *s, const struct db_outbox_delivery *g, int n)
{
    const struct triage_pacs *p = s->p;
    const struct triage_pacs_dest *d = s->dest;
    struct scp_send_file files[BATCH];
    char paths[BATCH][1600];
    for (int i = 0; i < n; i++) {
        snprintf(paths[i], sizeof paths[i], "%s/%s", p->store_dir, g[i].file_path);
        files[i] = (struct scp_send_file){.path = paths[i]};
    }
    struct group gr = {.s = s, .g = g};
    char err[512] = "";
    struct scp_send_dest sd = {
        .calling_aet = p->calling_aet,
        .called_aet = d->aet,
        .host = d->host,
        .port = d->port,
        .timeout_s = p->timeout_s,
        .tls = d->tls,
        .tls_ca = p->tls_ca,
        .tls_cert = p->tls_cert,
        .tls_key = p->tls_key,
        .cut = &s->cut,
    };
    int rc = scp_send_files(&sd, files, n, go_on, on_answered, &gr, err, sizeof err);
    /* Failures are recorded once the association is over, all at its end:
     * their next attempts are a backoff after it (after its start, a slow
     * attempt was retried at once) and fall due together. A crash before
     * loses only their count. */
    int64_t end = now_ms();
    for (int i = 0; i < n; i++) {
        if (scp_send_status_ok(files[i].status) || files[i].status == SCP_SEND_STOPPED)
            continue; /* not sent because the node stops: no attempt, sent after the start */
        if (files[i].status == SCP_SEND_UNSENT) {
            /* Never on the wire: no attempt used, due still, so the next
             * pass sends it on a new association. Counted, an object the
             * peer aborts on had used up the attempts of all behind it. */
            util_log(UTIL_LOG_INFO, "pacs_requeued",
                     "study=%s object=%s destination=%s reason=\"%s\"", g[i].study_uid, g[i].object,
                     g[i].destination, files[i].error);
            continue;
        }
        record_failed(s, &g[i], rc == 0 ? files[i].error : err, end);
    }
    for (int i = 0; i < n; i++)
        if (i == 0 || g[i].revision_id != g[i - 1].revision_id)
            triage_pacs_drop_files(s->db, p->store_dir, g[i].revision_id);
}

/* The deliveries of the sender's destination that are due, on one
 * association. */
static void deliver(struct dest_sender *s)
{
    static_assert(BATCH >= 2, "a revision has two objects");
    struct db_outbox_delivery *due = malloc(sizeof *due * BATCH);
    if (!due) return;
    int n = 0;
    if (db_outbox_due(s->db, s->dest->spec, now_ms(), s->p->max_retry_ms, due, BATCH, &n) == 0 &&
        n > 0 && !stopping(s->p))
        send_group(s, due, n);
    free(due);
}

/* Sleeps on cv until kicked (*kicked), stopped, or wait_ms passed.
 * Measured on the monotonic clock (the condition variable's): a step of the
 * wall clock back had stretched the sleep by the step. */
static void idle(struct triage_pacs *p, pthread_cond_t *cv, bool *kicked, int64_t wait_ms)
{
    struct timespec until = util_clock_after_ms(wait_ms);
    pthread_mutex_lock(&p->mu);
    while (!p->stop && !*kicked && wait_ms > 0)
        if (pthread_cond_timedwait(cv, &p->mu, &until) == ETIMEDOUT) break;
    *kicked = false;
    pthread_mutex_unlock(&p->mu);
}

static void *sender_main(void *arg)
{
    struct dest_sender *s = arg;
    for (;;) {
        if (stopping(s->p)) break;
        deliver(s);
        int64_t now = now_ms(), wait = IDLE_MS, at;
        bool found;
        if (db_outbox_next_due(s->db, s->dest->spec, &at, &found) == 0 && found && at - now < wait)
            wait = at - now;
        idle(s->p, &s->cv, &s->kicked, wait);
    }
    return NULL;
}

/* Deliveries pending for a destination no longer in pacs.destinations (at
 * start, or put back by `pacs retry`) have no sender: given up. */
static void give_up_unlisted(struct triage_pacs *p)
{
    const char *specs[TRIAGE_PACS_MAX_DESTS];
    for (int i = 0; i < p->ndests; i++)
        specs[i] = p->dests[i].spec;
    int dropped = 0;
    if (db_outbox_fail_unlisted(p->db, specs, p->ndests, now_ms(), &dropped) == 0 && dropped)
        util_log(UTIL_LOG_ERROR, "pacs_delivery_failed",
                 "count=%d reason=\"destination no longer configured\"", dropped);
}

static void *builder_main(void *arg)
{
    struct triage_pacs *p = arg;
    for (;;) {
        if (stopping(p)) break;
        give_up_unlisted(p);
        intake(p);
        int64_t now = now_ms(), wait = IDLE_MS;
        for (int i = 0; i < p->nretries; i++)
            if (p->retries[i].next_at - now < wait) wait = p->retries[i].next_at - now;
        idle(p, &p->cv, &p->kicked, wait);
    }
    return NULL;
}

/* How long the stop waits for a sender (pacs_stop_left_sender). */
#define SENDER_STOP_WAIT_S 5

/* Stops and joins the senders started, and closes their connections. The
 * stop cuts an association's waits at once (scp_send_cut_short), so a
 * sender still at it after SENDER_STOP_WAIT_S is in a TCP connect to a
 * destination that drops packets, which dcmtk makes alone, for up to
 * pacs.timeout: it is left to end with the process (its connection to the
 * index open, nothing of it freed) rather than hold the stop, and with it
 * the restart, past systemd's TimeoutStopSec. Returns how many were left:
 * p must then outlive the call. */
static int senders_stop(struct triage_pacs *p)
{
    triage_pacs_request_stop(p);
    struct timespec until = util_clock_after_ms(SENDER_STOP_WAIT_S * 1000);
    int left = 0;
    for (int i = 0; i < p->nsenders; i++) {
        struct dest_sender *s = &p->senders[i];
        if (pthread_clockjoin_np(s->thread, NULL, CLOCK_MONOTONIC, &until) != 0) {
            util_log(UTIL_LOG_WARN, "pacs_stop_left_sender",
                     "destination=%s reason=\"still connecting after %d s; it ends with the node, "
                     "its objects are sent after the start\"",
                     s->dest->spec, SENDER_STOP_WAIT_S);
            left++;
            continue;
        }
        pthread_cond_destroy(&s->cv);
        scp_send_cut_destroy(&s->cut);
        db_close(s->db);
    }
    p->nsenders = 0;
    return left;
}

/* Opens the sender of each destination and starts it. */
static int senders_start(struct triage_pacs *p, const char *db_path, char *err, size_t errlen)
{
    for (int i = 0; i < p->ndests; i++) {
        struct dest_sender *s = &p->senders[i];
        *s = (struct dest_sender){.p = p, .dest = &p->dests[i]};
        if (db_open(&s->db, db_path, err, errlen) != 0) return -1;
        util_clock_cond_init(&s->cv);
        scp_send_cut_init(&s->cut);
        if (pthread_create(&s->thread, NULL, sender_main, s) != 0) {
            snprintf(err, errlen, "cannot start the PACS sender thread of %s", s->dest->spec);
            pthread_cond_destroy(&s->cv);
            scp_send_cut_destroy(&s->cut);
            db_close(s->db);
            return -1;
        }
        p->nsenders++;
    }
    return 0;
}

int triage_pacs_start(struct triage_pacs **out, const struct triage_pacs_config *c, char *err,
                      size_t errlen)
{
    *out = NULL;
    struct triage_pacs *p = calloc(1, sizeof *p);
    if (!p) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (triage_pacs_parse_destinations(c->destinations, p->dests, TRIAGE_PACS_MAX_DESTS, &p->ndests,
                                       err, errlen) != 0)
        goto fail;
    if (!c->calling_aet || !c->calling_aet[0] || strlen(c->calling_aet) > 16) {
        snprintf(err, errlen, "pacs.calling_aetitle must be 1 to 16 characters");
        goto fail;
    }
    p->send_all = c->send_all;
    snprintf(p->calling_aet, sizeof p->calling_aet, "%s", c->calling_aet);
    p->timeout_s = c->timeout_s;
    p->max_attempts = c->max_attempts > 0 ? c->max_attempts : 1;
    p->retry_ms = c->retry_ms > 0 ? c->retry_ms : 1000;
    p->max_retry_ms = c->max_retry_ms >= p->retry_ms ? c->max_retry_ms : p->retry_ms;
    snprintf(p->tls_ca, sizeof p->tls_ca, "%s", c->tls_ca ? c->tls_ca : "");
    snprintf(p->tls_cert, sizeof p->tls_cert, "%s", c->tls_cert ? c->tls_cert : "");
    snprintf(p->tls_key, sizeof p->tls_key, "%s", c->tls_key ? c->tls_key : "");
    snprintf(p->software_version, sizeof p->software_version, "%s",
             c->software_version ? c->software_version : "");
    snprintf(p->store_dir, sizeof p->store_dir, "%s", c->store_dir);
    if (db_open(&p->db, c->db_path, err, errlen) != 0) goto fail;
    pthread_mutex_init(&p->mu, NULL);
    util_clock_cond_init(&p->cv);
    if (senders_start(p, c->db_path, err, errlen) != 0) goto stop;
    if (pthread_create(&p->thread, NULL, builder_main, p) != 0) {
        snprintf(err, errlen, "cannot start the PACS builder thread");
        goto stop;
    }
    for (int i = 0; i < p->ndests; i++)
        util_log(UTIL_LOG_INFO, "pacs_destination", "aet=%s host=%s port=%d tls=%d",
                 p->dests[i].aet, p->dests[i].host, p->dests[i].port, p->dests[i].tls);
    *out = p;
    return 0;
stop:
    if (senders_stop(p) > 0) return -1; /* p stays for the sender left */
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    db_close(p->db);
fail:
    free(p);
    return -1;
}

void triage_pacs_kick(struct triage_pacs *p)
{
    if (!p) return;
    kick(p, &p->cv, &p->kicked);
}

void triage_pacs_request_stop(struct triage_pacs *p)
{
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = true;
    pthread_cond_signal(&p->cv);
    for (int i = 0; i < p->nsenders; i++) {
        pthread_cond_signal(&p->senders[i].cv);
        scp_send_cut_short(&p->senders[i].cut);
    }
    pthread_mutex_unlock(&p->mu);
}

int triage_pacs_stop(struct triage_pacs *p)
{
    if (!p) return 0;
    triage_pacs_request_stop(p);
    pthread_join(p->thread, NULL);
    db_close(p->db);
    p->db = NULL;
    int left = senders_stop(p);
    if (left > 0) return left; /* p stays for the sender left */
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p);
    return 0;
}

/* triage/infer.c: the inference thread (see infer.h). */
#include "infer.h"

#include <dirent.h>
#include <sched.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "db.h"
#include "db_triage.h"
#include "log.h"
#include "pipeline.h"
#include "volume.h"

struct triage_infer {
    struct triage_infer_config cfg;
    char store_dir[1024], db_path[1100];
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop, kicked, reload;
    char model_cfg[1024];
    char device[16]; /* nn.device */
    /* Guarded by mu: what status and the web page show. */
    bool model_ok;
    char model_version[160], model_error[1200];
};

static int64_t now_ms(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (int64_t)tv.tv_sec * 1000 + tv.tv_usec / 1000;
}

/* Loads the configured model into *m; on failure *m is untouched. */
static void load_model(struct triage_infer *t, struct triage_model *m, bool *have)
{
    char path[1000], err[1200];
    pthread_mutex_lock(&t->mu);
    char cfg[1024];
    snprintf(cfg, sizeof cfg, "%s", t->model_cfg);
    pthread_mutex_unlock(&t->mu);
    struct triage_model fresh;
    int ok = 0;
    if (triage_model_resolve(cfg, t->store_dir, path, sizeof path) != 0) {
        snprintf(err, sizeof err, "no model file: %s", path);
    } else if (triage_model_load(&fresh, path, err, sizeof err) == 0) {
        ok = triage_nn_device(fresh.nn, t->device, err, sizeof err) == 0;
        if (!ok) triage_model_free(&fresh);
    }
    pthread_mutex_lock(&t->mu);
    if (ok) {
        if (*have) triage_model_free(m);
        *m = fresh;
        *have = true;
        t->model_ok = true;
        snprintf(t->model_version, sizeof t->model_version, "%s", m->version);
        t->model_error[0] = 0;
    } else if (!*have) {
        t->model_ok = false;
        snprintf(t->model_error, sizeof t->model_error, "%s", err);
    }
    pthread_mutex_unlock(&t->mu);
    if (ok)
        util_log(UTIL_LOG_INFO, "model_loaded", "version=\"%s\" path=%s", m->version, m->path);
    else
        util_log(UTIL_LOG_ERROR, *have ? "model_reload_refused" : "model_not_loaded",
                 "error=\"%s\"%s", err, *have ? " kept=old" : " jobs=waiting");
}

/* Ends a job, retrying with back-off (1, 2, 4 s) while the database refuses
 * the write (busy past its timeout, disk full, an I/O error). Returns 0, or
 * -1 with e once the retries are spent or at stop; the job is then still
 * running in the database, and infer_main queues it again (it runs again
 * from its files) once the database takes writes. */
static int finish_job(struct triage_infer *t, struct db *db, const struct db_job *job,
                      const struct db_result *res, const char *error, bool not_applicable, char *e,
                      size_t elen)
{
    for (int delay_s = 1;; delay_s *= 2) {
        if (db_job_finish(db, job, res, error, not_applicable, now_ms(), e, elen) == 0) return 0;
        if (delay_s > 4) return -1;
        util_log(UTIL_LOG_WARN, "job_finish_retry", "job=%lld retry_in_s=%d error=\"%s\"",
                 (long long)job->id, delay_s, e);
        struct timespec until = util_clock_after_ms(delay_s * 1000);
        pthread_mutex_lock(&t->mu);
        int rc = 0;
        while (!t->stop && rc != ETIMEDOUT)
            rc = pthread_cond_timedwait(&t->cv, &t->mu, &until);
        bool stop = t->stop;
        pthread_mutex_unlock(&t->mu);
        if (stop) return -1;
    }
}

/* Runs one job; returns the error text (static buffer err) or NULL. Sets
 * *unfinished when its result could not be stored (finish_job), and
 * *not_applicable when the error is that its slices are not axial. */
static const char *run_job(struct triage_infer *t, struct db *db, struct triage_model *m,
                           const struct db_job *job, char *err, size_t errlen, bool *unfinished,
                           bool *not_applicable)
{
    double t0 = util_clock_ms();
    char **rel = NULL;
    int n = 0;
    const char *fail = NULL;
    struct triage_volume v = {0};
    struct triage_result r = {0};
    char **paths = NULL;
    struct db_slice_result *per = NULL;
    if (db_series_files(db, job->series_id, &rel, &n) != 0 || n == 0) {
        snprintf(err, errlen, "cannot list the series' files");
        return err;
    }
    paths = calloc((size_t)n, sizeof *paths);
    for (int i = 0; paths && i < n; i++) {
        size_t len = strlen(t->store_dir) + strlen(rel[i]) + 2;
        paths[i] = malloc(len);
        if (paths[i])
            snprintf(paths[i], len, "%s/%s", t->store_dir, rel[i]);
        else
            fail = "out of memory";
    }
    if (!paths) fail = "out of memory";
    if (fail) {
        snprintf(err, errlen, "%s", fail);
        goto done;
    }
    char e[512];
    if (triage_volume_build((const char *const *)paths, n, &v, e, sizeof e) != 0) {
        snprintf(err, errlen, "%s", e);
        fail = err;
        goto done;
    }
    int check = triage_volume_check(&v, t->cfg.max_tilt_deg, t->cfg.min_slices, err, errlen);
    if (check != 0) {
        *not_applicable = check == 1;
        fail = err;
        goto done;
    }
    if (triage_predict_volume(m, &v, (const char *const *)paths, t->cfg.decoder, &r, e, sizeof e) !=
        0) {
        snprintf(err, errlen, "%s", e);
        fail = err;
        goto done;
    }
    per = calloc((size_t)r.n, sizeof *per);
    if (!per) {
        snprintf(err, errlen, "out of memory");
        fail = err;
        goto done;
    }
    for (int i = 0; i < r.n; i++) {
        per[i].sop_uid = v.slices[i].sop_uid;
        per[i].frame = v.slices[i].frame;
        for (int l = 0; l < DB_LABELS; l++)
            per[i].p[l] = r.probs[(size_t)i * TRIAGE_LABELS + l];
    }
    struct db_result res = {
        .model_version = m->version,
        .flagged = r.flagged,
        .slices = r.n,
        .key_index = r.key_slice,
        .key_sop = v.slices[r.key_slice].sop_uid,
        .note = v.note,
        .ms_pixels = r.ms_pixels,
        .ms_model = r.ms_model,
        .ms_total = util_clock_ms() - t0,
        .per_slice = per,
    };
    for (int l = 0; l < DB_LABELS; l++)
        res.p[l] = r.study[l];
    if (finish_job(t, db, job, &res, NULL, false, e, sizeof e) != 0) {
        *unfinished = true;
        snprintf(err, errlen, "%s", e);
        fail = err;
        goto done;
    }
    char crop[64] = "";
    if (m->crop_head)
        snprintf(crop, sizeof crop, " crop=%d,%d,%dx%d", r.crop.x, r.crop.y, r.crop.w, r.crop.h);
    util_log(UTIL_LOG_INFO, "series_triaged",
             "study=%s series=%s slices=%d p_any=%.4f flagged=%d key_slice=%d model=\"%s\" "
             "ms_pixels=%.0f ms_model=%.0f ms_total=%.0f%s%s%s%s",
             v.study_uid, v.series_uid, r.n, r.study[0], r.flagged, r.key_slice, m->version,
             r.ms_pixels, r.ms_model, res.ms_total, crop, v.note[0] ? " note=\"" : "", v.note,
             v.note[0] ? "\"" : "");
done:
    free(per);
    triage_result_free(&r);
    triage_volume_free(&v);
    for (int i = 0; paths && i < n; i++)
        free(paths[i]);
    free(paths);
    free(rel);
    return fail;
}

/* SCHED_IDLE: the thread runs only on CPU time nothing else wants, so
 * receiving never waits for the model; nice 10 where that is refused. */
static int make_idle(pid_t tid)
{
    struct sched_param p = {0};
    if (sched_setscheduler(tid, SCHED_IDLE, &p) == 0) return 0;
    return setpriority(PRIO_PROCESS, (id_t)tid, 10);
}

static void *infer_main(void *arg)
{
    struct triage_infer *t = arg;
    /* Receiving comes first: this thread yields the CPU to it. */
    make_idle((pid_t)syscall(SYS_gettid));
    nn_set_threads(t->cfg.threads);
    struct db *db = NULL;
    char err[1024];
    if (db_open(&db, t->db_path, err, sizeof err) != 0) {
        util_log(UTIL_LOG_ERROR, "inference_stopped", "error=\"%s\"", err);
        return NULL;
    }
    struct triage_model m;
    bool have = false;
    load_model(t, &m, &have);
    /* A job whose end could not be written: queued again before the next. */
    bool requeue = false;
    for (;;) {
        pthread_mutex_lock(&t->mu);
        bool stop = t->stop, reload = t->reload;
        t->reload = false;
        pthread_mutex_unlock(&t->mu);
        if (stop) break;
        if (reload) load_model(t, &m, &have);
        int count = 0, failed;
        /* No stop counted: the database, not the job, kept its end out. */
        if (requeue && db_jobs_requeue(db, 0, now_ms(), &count, &failed) == 0) {
            requeue = false;
            util_log(UTIL_LOG_INFO, "jobs_requeued", "count=%d", count);
        }
        struct db_job job;
        int got = have && !requeue ? db_job_claim(db, now_ms(), &job) : 0;
        if (got < 0) util_log(UTIL_LOG_ERROR, "job_claim_failed", "error=\"database\"");
        if (got <= 0) {
            pthread_mutex_lock(&t->mu);
            if (!t->kicked && !t->stop && !t->reload) {
                struct timespec until = util_clock_after_ms(1000);
                pthread_cond_timedwait(&t->cv, &t->mu, &until);
            }
            t->kicked = false;
            pthread_mutex_unlock(&t->mu);
            continue;
        }
        util_log(UTIL_LOG_DEBUG, "job_started", "job=%lld series_id=%lld content=%s",
                 (long long)job.id, (long long)job.series_id, job.content_key);
        char why[1024];
        bool unfinished = false, na = false;
        const char *fail = run_job(t, db, &m, &job, why, sizeof why, &unfinished, &na);
        if (!unfinished && fail) {
            if (na)
                util_log(UTIL_LOG_INFO, "series_not_applicable", "job=%lld reason=\"%s\"",
                         (long long)job.id, fail);
            else
                util_log(UTIL_LOG_WARN, "series_failed", "job=%lld error=\"%s\"", (long long)job.id,
                         fail);
            char e[512];
            unfinished = finish_job(t, db, &job, NULL, fail, na, e, sizeof e) != 0;
            if (unfinished) {
                snprintf(why, sizeof why, "%s", e);
                fail = why;
            }
        }
        if (unfinished) {
            /* At stop, the next start queues it again (db_jobs_requeue). */
            util_log(UTIL_LOG_ERROR, "job_unfinished",
                     "job=%lld error=\"%s\" then=\"queued again once the database takes writes,"
                     " or at the next start\"",
                     (long long)job.id, fail);
            requeue = true;
        }
        if (t->cfg.on_done) t->cfg.on_done(t->cfg.ud);
    }
    if (have) triage_model_free(&m);
    db_close(db);
    return NULL;
}

/* OpenBLAS starts its worker threads when the library loads, from the main
 * thread, at its priority. nn/ runs OpenBLAS on one thread (its own worker
 * pool, started from the inference thread, inherits SCHED_IDLE), so they
 * should stay asleep; should they ever run, they yield too. Called before
 * any thread of ours exists, this lowers every thread but the main one,
 * which are then exactly OpenBLAS's workers. Returns how many. */
static int lower_blas_workers(void)
{
    DIR *d = opendir("/proc/self/task");
    if (!d) return 0;
    pid_t self = getpid();
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        pid_t tid = (pid_t)atoi(e->d_name);
        if (tid > 0 && tid != self && make_idle(tid) == 0) n++;
    }
    closedir(d);
    return n;
}

int triage_infer_start(struct triage_infer **out, const struct triage_infer_config *cfg, char *err,
                       size_t errlen)
{
    int lowered = lower_blas_workers();
    util_log(UTIL_LOG_DEBUG, "inference_priority", "sched=idle blas_workers=%d", lowered);
    struct triage_infer *t = calloc(1, sizeof *t);
    if (!t) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    t->cfg = *cfg;
    snprintf(t->store_dir, sizeof t->store_dir, "%s", cfg->store_dir);
    snprintf(t->db_path, sizeof t->db_path, "%s", cfg->db_path);
    snprintf(t->model_cfg, sizeof t->model_cfg, "%s", cfg->model ? cfg->model : "");
    snprintf(t->device, sizeof t->device, "%s", cfg->device ? cfg->device : "auto");
    snprintf(t->model_error, sizeof t->model_error, "loading");
    pthread_mutex_init(&t->mu, NULL);
    util_clock_cond_init(&t->cv); /* a step of the wall clock stretches no wait */
    int rc = pthread_create(&t->thread, NULL, infer_main, t);
    if (rc != 0) {
        snprintf(err, errlen, "cannot start the inference thread: %s", strerror(rc));
        pthread_mutex_destroy(&t->mu);
        pthread_cond_destroy(&t->cv);
        free(t);
        return -1;
    }
    *out = t;
    return 0;
}

void triage_infer_kick(struct triage_infer *t)
{
    pthread_mutex_lock(&t->mu);
    t->kicked = true;
    pthread_cond_signal(&t->cv);
    pthread_mutex_unlock(&t->mu);
}

void triage_infer_reload(struct triage_infer *t, const char *model)
{
    pthread_mutex_lock(&t->mu);
    if (model) snprintf(t->model_cfg, sizeof t->model_cfg, "%s", model);
    t->reload = true;
    pthread_cond_signal(&t->cv);
    pthread_mutex_unlock(&t->mu);
}

bool triage_infer_model(struct triage_infer *t, char *version, size_t vlen, char *why, size_t wlen)
{
    pthread_mutex_lock(&t->mu);
    bool ok = t->model_ok;
    snprintf(version, vlen, "%s", ok ? t->model_version : "");
    snprintf(why, wlen, "%s", ok ? "" : t->model_error);
    pthread_mutex_unlock(&t->mu);
    return ok;
}

void triage_infer_request_stop(struct triage_infer *t)
{
    if (!t) return;
    pthread_mutex_lock(&t->mu);
    t->stop = true;
    pthread_cond_signal(&t->cv);
    pthread_mutex_unlock(&t->mu);
}

void triage_infer_stop(struct triage_infer *t)
{
    if (!t) return;
    triage_infer_request_stop(t);
    pthread_join(t->thread, NULL);
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->cv);
    free(t);
}

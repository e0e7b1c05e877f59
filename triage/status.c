/* triage/status.c: `ichtriage status [--json]`. Everything is read from the
 * outside (the database read-only, the spool, the file system, the kernel's
 * socket table), so it works whether or not the node runs, and it never
 * changes anything: ports, the index, the triage queue, the model file,
 * disk. What the running node itself holds in memory (the model it loaded)
 * is in its sd_notify STATUS= line instead. */
#include "status.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>

#include "config.h"
#include "db.h"
#include "db_backup.h"
#include "db_outbox.h"
#include "db_status.h"
#include "pipeline.h"
#include "store_health.h"

struct status {
    const char *config, *store_dir, *model_configured;
    bool model_found;
    char model[1400]; /* the file the node would load, or what was tried */
    int64_t model_bytes, model_mtime;
    char db_path[1200], spool[1200];
    int64_t port, min_free_mb;
    int listening; /* 1 yes, 0 no, -1 unknown */
    const char *http_listen;
    int http_listening; /* as listening; -1 also when http.listen has no port */
    bool db_ok;
    char db_err[512];
    struct db_status db;
    /* Indexed spool files missing from the store (lost: every backup
     * fails on them); -1 when the spool could not be looked at. */
    int64_t files_missing;
    char first_missing[1100], missing_text[1400];
    bool pacs_present;            /* the database has the outbox (results to PACS) */
    struct db_outbox_counts pacs; /* deliveries by state */
    bool disk_ok;
    int64_t free_mb;   /* -1: unknown */
    int64_t in_flight; /* datasets being received (files in spool/.tmp); -1: unknown */
    bool stores_known; /* the node's store-health file was read */
    struct triage_store_verdict stores;
    char stores_text[900];
    const char *problems[8];
    int n_problems;
};

/* Is a TCP socket in LISTEN state on port, in /proc/net/tcp or tcp6 (this
 * network namespace)? Looking, not connecting: a probe would show in the
 * node's log as a peer. */
static int port_listening(long port)
{
    const char *tables[] = {"/proc/net/tcp", "/proc/net/tcp6"};
    int seen_any = 0;
    for (int t = 0; t < 2; t++) {
        FILE *f = fopen(tables[t], "r");
        if (!f) continue;
        seen_any = 1;
        char line[512];
        int found = 0;
        if (!fgets(line, sizeof line, f)) line[0] = 0; /* header */
        while (!found && fgets(line, sizeof line, f)) {
            char local[128], remote[128];
            unsigned st;
            if (sscanf(line, "%*d: %127s %127s %x", local, remote, &st) != 3) continue;
            const char *colon = strrchr(local, ':');
            if (colon && st == 0x0A && strtol(colon + 1, NULL, 16) == port) found = 1;
        }
        fclose(f);
        if (found) return 1;
    }
    return seen_any ? 0 : -1;
}

static int64_t count_dir(const char *path)
{
    DIR *d = opendir(path);
    if (!d) return errno == ENOENT ? 0 : -1;
    int64_t n = 0;
    for (struct dirent *e; (e = readdir(d));)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    closedir(d);
    return n;
}

static void problem(struct status *s, const char *what)
{
    if (s->n_problems < (int)(sizeof s->problems / sizeof s->problems[0]))
        s->problems[s->n_problems++] = what;
}

/* The names in one spool folder, sorted: count_missing reads each folder
 * once instead of calling stat() for each of its files (millions on a
 * large store, the rows come ordered by path so a folder's are together). */
struct folder {
    char rel[1100]; /* as in file_path, up to the name's slash */
    char *names;    /* NUL-separated */
    size_t len, cap;
    char **sorted;
    size_t n, ncap;
};

struct missing_walk {
    struct status *s;
    struct folder dir;
    bool read;            /* dir holds a folder's names */
    struct db_live *live; /* the index, opened at the first file missing */
};

static int by_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Reads the folder rel (rel_len bytes of it) of the store into f.
 * Returns 0 (a folder that does not exist holds nothing), or -1
 * (unreadable here, out of memory). */
static int folder_read(struct folder *f, const char *store_dir, const char *rel, size_t rel_len)
{
    snprintf(f->rel, sizeof f->rel, "%.*s", (int)rel_len, rel);
    f->len = f->n = 0;
    char path[2400];
    snprintf(path, sizeof path, "%s/%s", store_dir, f->rel);
    DIR *d = opendir(path);
    if (!d) return errno == ENOENT ? 0 : -1;
    int rc = 0;
    for (struct dirent *e; rc == 0 && (e = readdir(d));) {
        size_t need = strlen(e->d_name) + 1;
        if (f->len + need > f->cap) {
            size_t cap = (f->cap + need) * 2;
            char *grown = realloc(f->names, cap);
            if (!grown) {
                rc = -1;
                break;
            }
            f->names = grown;
            f->cap = cap;
        }
        memcpy(f->names + f->len, e->d_name, need);
        f->len += need;
        f->n++;
    }
    closedir(d);
    if (rc == 0 && f->n > f->ncap) {
        char **grown = realloc(f->sorted, sizeof *grown * f->n);
        if (!grown) return -1;
        f->sorted = grown;
        f->ncap = f->n;
    }
    if (rc != 0) return -1;
    for (size_t i = 0, at = 0; i < f->n; at += strlen(f->names + at) + 1)
        f->sorted[i++] = f->names + at;
    qsort(f->sorted, f->n, sizeof *f->sorted, by_name);
    return 0;
}

/* db_backup_files callback: counts an indexed file missing from the
 * spool, once the live index confirms it still lists it (a resend or
 * retention may have moved or removed it since the list was read).
 * Stops (1) where the spool cannot be read (run as another user). */
static int count_missing(void *ud, const struct db_backup_file *f)
{
    struct missing_walk *w = ud;
    const char *slash = strrchr(f->file_path, '/');
    if (!slash) return 0;
    size_t rel_len = (size_t)(slash - f->file_path);
    bool same =
        w->read && strlen(w->dir.rel) == rel_len && strncmp(w->dir.rel, f->file_path, rel_len) == 0;
    if (!same && folder_read(&w->dir, w->s->store_dir, f->file_path, rel_len) != 0) return 1;
    w->read = true;
    const char *name = slash + 1;
    if (bsearch(&name, w->dir.sorted, w->dir.n, sizeof *w->dir.sorted, by_name)) return 0;
    char err[256];
    bool indexed = false;
    if (!w->live && db_live_open(&w->live, w->s->db_path, err, sizeof err) != 0) return 1;
    if (db_live_file_indexed(w->live, f->file_path, "", &indexed, err, sizeof err) != 0) return 1;
    if (indexed && !w->s->files_missing++)
        snprintf(w->s->first_missing, sizeof w->s->first_missing, "%s", f->file_path);
    return 0;
}

static void gather(struct status *s)
{
    snprintf(s->db_path, sizeof s->db_path, "%s/ichtriage.db", s->store_dir);
    snprintf(s->spool, sizeof s->spool, "%s/spool", s->store_dir);
    s->listening = port_listening(s->port);
    if (s->listening == 0) problem(s, "dicom port not listening (is the node running?)");
    const char *colon = strrchr(s->http_listen, ':');
    long http_port = colon ? strtol(colon + 1, NULL, 10) : 0;
    s->http_listening = http_port > 0 && http_port < 65536 ? port_listening(http_port) : -1;
    if (s->http_listening == 0) problem(s, "http (worklist, API) not listening");

    s->db_ok = db_status_read(s->db_path, true, &s->db, s->db_err, sizeof s->db_err) == 0;
    char pacs_err[256];
    if (s->db_ok &&
        db_outbox_counts_read(s->db_path, &s->pacs, &s->pacs_present, pacs_err, sizeof pacs_err))
        s->pacs_present = false;
    if (!s->db_ok)
        problem(s, "database unreadable");
    else if (!s->db.quick_check_ok)
        problem(s, "database quick_check failed");
    else if (s->db.schema_version > db_schema_version())
        problem(s, "database schema newer than this build");
    s->files_missing = -1;
    if (s->db_ok) {
        char err[256];
        struct missing_walk w = {.s = s};
        s->files_missing = 0;
        if (db_backup_files(s->db_path, count_missing, &w, err, sizeof err) != 0)
            s->files_missing = -1;
        free(w.dir.names);
        free(w.dir.sorted);
        db_live_close(w.live);
    }
    if (s->files_missing > 0) {
        snprintf(s->missing_text, sizeof s->missing_text,
                 "%lld indexed spool files missing from the store (first: %s): every backup "
                 "fails on them until 'ichtriage backup --leave-out-missing' leaves them out "
                 "(docs/operations.md, \"Backup and restore\")",
                 (long long)s->files_missing, s->first_missing);
        problem(s, s->missing_text);
    }

    struct statvfs v;
    const char *where = statvfs(s->spool, &v) == 0 ? s->spool : s->store_dir;
    if (where == s->spool || statvfs(where, &v) == 0) {
        s->free_mb = (int64_t)(((unsigned long long)v.f_bavail * v.f_frsize) >> 20);
        s->disk_ok = s->free_mb >= s->min_free_mb;
        if (!s->disk_ok) problem(s, "free space below store.min_free_mb");
    } else {
        s->free_mb = -1;
        problem(s, "store.dir not accessible");
    }
    /* The model the node would load; not loaded here (a VGG19 one is large). */
    s->model_found =
        triage_model_resolve(s->model_configured, s->store_dir, s->model, sizeof s->model) == 0;
    struct stat st;
    if (s->model_found && stat(s->model, &st) == 0) {
        s->model_bytes = st.st_size;
        s->model_mtime = st.st_mtime;
    }
    if (!s->model_found) problem(s, "no model file: triage cannot run");
    char tmp[1300];
    snprintf(tmp, sizeof tmp, "%s/.tmp", s->spool);
    s->in_flight = count_dir(tmp);
    /* Refused stores are known only to the node, which keeps them in a file. */
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    s->stores_known =
        triage_store_health_read(s->store_dir, (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000,
                                 &s->stores) == 0;
    if (s->stores_known && s->stores.failing) {
        triage_store_verdict_text(&s->stores, s->stores_text, sizeof s->stores_text);
        problem(s, s->stores_text);
    }
}

static void iso8601(int64_t ms, char *out, size_t n)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(out, n, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* "label name n, name n" or "label none". */
static void print_counts(const char *label, const struct db_status_count *c, int n)
{
    printf("%s", label);
    for (int i = 0; i < n; i++)
        printf("%s%s %lld", i ? ", " : "", c[i].name, (long long)c[i].count);
    printf("%s\n", n ? "" : "none");
}

static void json_counts(cJSON *parent, const char *key, const struct db_status_count *c, int n)
{
    cJSON *o = cJSON_AddObjectToObject(parent, key);
    for (int i = 0; o && i < n; i++)
        cJSON_AddNumberToObject(o, c[i].name, (double)c[i].count);
}

/* 1 true, 0 false, anything else null (unknown). */
static void json_tristate(cJSON *parent, const char *key, int v)
{
    if (v == 0 || v == 1)
        cJSON_AddBoolToObject(parent, key, v == 1);
    else
        cJSON_AddNullToObject(parent, key);
}

/* An ISO-8601 UTC time, or null for 0 (never). */
static void json_time(cJSON *parent, const char *key, int64_t ms)
{
    char when[32];
    if (ms <= 0) {
        cJSON_AddNullToObject(parent, key);
        return;
    }
    iso8601(ms, when, sizeof when);
    cJSON_AddStringToObject(parent, key, when);
}

static void print_text(const struct status *s)
{
    printf("ichtriage status (decision support, not a diagnosis)\n");
    printf("config        %s\n", s->config);
    printf("store         %s\n", s->store_dir);
    printf("dicom         port %lld %s\n", (long long)s->port,
           s->listening == 1   ? "listening"
           : s->listening == 0 ? "NOT listening"
                               : "(cannot tell)");
    printf("http          %s %s\n", s->http_listen,
           s->http_listening == 1   ? "listening"
           : s->http_listening == 0 ? "not listening"
                                    : "(cannot tell)");
    if (s->db_ok) {
        printf("database      %s, schema %d (this build %d), quick_check %s\n", s->db_path,
               s->db.schema_version, db_schema_version(), s->db.quick_check);
        printf("index         %lld patients, %lld studies, %lld series, %lld instances, %.1f MiB\n",
               (long long)s->db.patients, (long long)s->db.studies, (long long)s->db.series,
               (long long)s->db.instances, (double)s->db.spool_bytes / (1024.0 * 1024.0));
        if (s->db.last_received_ms > 0) {
            char when[32];
            iso8601(s->db.last_received_ms, when, sizeof when);
            long long ago = (long long)(time(NULL) - s->db.last_received_ms / 1000);
            printf("last received %s (%lld s ago)\n", when, ago);
        } else {
            printf("last received never\n");
        }
        if (s->files_missing > 0)
            printf("spool files   %lld MISSING (first: %s)\n", (long long)s->files_missing,
                   s->first_missing);
        else if (s->files_missing == 0)
            printf("spool files   all present\n");
        else
            printf("spool files   (cannot tell: the spool is not readable here)\n");
        print_counts("series        ", s->db.series_states, s->db.n_series_states);
        if (s->db.has_triage) {
            print_counts("triage queue  ", s->db.job_states, s->db.n_job_states);
            print_counts("studies       ", s->db.study_statuses, s->db.n_study_statuses);
            if (s->db.last_triage_ms > 0) {
                char when[32];
                iso8601(s->db.last_triage_ms, when, sizeof when);
                printf("last triage   %s\n", when);
            } else {
                printf("last triage   never\n");
            }
        } else {
            printf("triage        not in this database\n");
        }
        if (s->pacs_present)
            printf("to PACS       %lld pending, %lld sent, %lld given up; %lld results not "
                   "built\n",
                   (long long)s->pacs.pending, (long long)s->pacs.sent, (long long)s->pacs.failed,
                   (long long)s->pacs.revisions_failed);
    } else {
        printf("database      %s\n", s->db_err);
    }
    if (s->model_found) {
        char when[32];
        iso8601(s->model_mtime * 1000, when, sizeof when);
        printf("model         %s (%.1f MiB, %s)\n", s->model, (double)s->model_bytes / 1048576.0,
               when);
    } else {
        printf("model         none: %s\n", s->model);
    }
    if (s->free_mb >= 0)
        printf("disk          %lld MiB free (store.min_free_mb %lld)%s\n", (long long)s->free_mb,
               (long long)s->min_free_mb, s->disk_ok ? "" : " LOW");
    if (s->in_flight >= 0)
        printf("receiving     %lld datasets in flight\n", (long long)s->in_flight);
    if (s->stores_known)
        printf("stores        %s\n", s->stores.failing ? "FAILING (see problem)" : "succeeding");
    if (!s->n_problems) printf("health        ok\n");
    for (int i = 0; i < s->n_problems; i++)
        printf("problem       %s\n", s->problems[i]);
}

/* Returns 0, or -1 when cJSON runs out of memory. */
static int print_json(const struct status *s)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddBoolToObject(o, "healthy", s->n_problems == 0);
    cJSON_AddStringToObject(o, "config", s->config);
    cJSON_AddStringToObject(o, "store_dir", s->store_dir);
    cJSON *problems = cJSON_AddArrayToObject(o, "problems");
    cJSON *dicom = cJSON_AddObjectToObject(o, "dicom");
    cJSON *db = cJSON_AddObjectToObject(o, "database");
    cJSON *disk = cJSON_AddObjectToObject(o, "disk");
    if (!o || !dicom || !db || !disk || !problems) {
        cJSON_Delete(o);
        return -1;
    }
    cJSON_AddNumberToObject(dicom, "port", (double)s->port);
    json_tristate(dicom, "listening", s->listening);
    cJSON *http = cJSON_AddObjectToObject(o, "http");
    if (http) {
        cJSON_AddStringToObject(http, "listen", s->http_listen);
        json_tristate(http, "listening", s->http_listening);
    }
    cJSON_AddStringToObject(db, "path", s->db_path);
    cJSON_AddBoolToObject(db, "readable", s->db_ok);
    if (s->db_ok) {
        cJSON_AddNumberToObject(db, "schema_version", s->db.schema_version);
        cJSON_AddNumberToObject(db, "build_schema_version", db_schema_version());
        cJSON_AddStringToObject(db, "quick_check", s->db.quick_check);
        cJSON_AddNumberToObject(db, "patients", (double)s->db.patients);
        cJSON_AddNumberToObject(db, "studies", (double)s->db.studies);
        cJSON_AddNumberToObject(db, "series", (double)s->db.series);
        cJSON_AddNumberToObject(db, "instances", (double)s->db.instances);
        cJSON_AddNumberToObject(db, "spool_bytes", (double)s->db.spool_bytes);
        json_time(db, "last_received_at", s->db.last_received_ms);
        json_counts(db, "series_by_state", s->db.series_states, s->db.n_series_states);
        if (s->files_missing >= 0)
            cJSON_AddNumberToObject(db, "files_missing", (double)s->files_missing);
        else
            cJSON_AddNullToObject(db, "files_missing");
        if (s->files_missing > 0)
            cJSON_AddStringToObject(db, "first_missing_file", s->first_missing);
        else
            cJSON_AddNullToObject(db, "first_missing_file");
    } else {
        cJSON_AddStringToObject(db, "error", s->db_err);
    }
    cJSON *triage = s->db_ok && s->db.has_triage ? cJSON_AddObjectToObject(o, "triage")
                                                 : cJSON_AddNullToObject(o, "triage");
    if (triage && cJSON_IsObject(triage)) {
        json_counts(triage, "jobs_by_state", s->db.job_states, s->db.n_job_states);
        json_counts(triage, "studies_by_status", s->db.study_statuses, s->db.n_study_statuses);
        json_time(triage, "last_triage_at", s->db.last_triage_ms);
    }
    cJSON *pacs = s->pacs_present ? cJSON_AddObjectToObject(o, "pacs_deliveries")
                                  : cJSON_AddNullToObject(o, "pacs_deliveries");
    if (pacs && cJSON_IsObject(pacs)) {
        cJSON_AddNumberToObject(pacs, "pending", (double)s->pacs.pending);
        cJSON_AddNumberToObject(pacs, "sent", (double)s->pacs.sent);
        cJSON_AddNumberToObject(pacs, "failed", (double)s->pacs.failed);
    }
    /* Results whose SR and SC could not be built (given up): no delivery. */
    if (s->pacs_present)
        cJSON_AddNumberToObject(o, "pacs_results_not_built", (double)s->pacs.revisions_failed);
    else
        cJSON_AddNullToObject(o, "pacs_results_not_built");
    cJSON *model = cJSON_AddObjectToObject(o, "model");
    if (model) {
        cJSON_AddBoolToObject(model, "found", s->model_found);
        cJSON_AddStringToObject(model, s->model_found ? "path" : "tried", s->model);
        if (s->model_found) {
            cJSON_AddNumberToObject(model, "bytes", (double)s->model_bytes);
            json_time(model, "modified_at", s->model_mtime * 1000);
        }
    }
    if (s->free_mb >= 0)
        cJSON_AddNumberToObject(disk, "free_mb", (double)s->free_mb);
    else
        cJSON_AddNullToObject(disk, "free_mb");
    cJSON_AddNumberToObject(disk, "min_free_mb", (double)s->min_free_mb);
    cJSON_AddBoolToObject(disk, "ok", s->disk_ok);
    if (s->in_flight >= 0)
        cJSON_AddNumberToObject(o, "receiving_in_flight", (double)s->in_flight);
    else
        cJSON_AddNullToObject(o, "receiving_in_flight");
    cJSON *stores =
        s->stores_known ? cJSON_AddObjectToObject(o, "stores") : cJSON_AddNullToObject(o, "stores");
    if (stores && cJSON_IsObject(stores)) {
        cJSON_AddBoolToObject(stores, "failing", s->stores.failing);
        json_time(stores, "last_failure_at", s->stores.last_failure_ms);
        json_time(stores, "last_success_at", s->stores.last_success_ms);
        cJSON_AddNumberToObject(stores, "refused_since_success", (double)s->stores.since_success);
        cJSON_AddStringToObject(stores, "why", s->stores.why);
        cJSON_AddStringToObject(stores, "reason", s->stores.reason);
    }
    for (int i = 0; i < s->n_problems; i++)
        cJSON_AddItemToArray(problems, cJSON_CreateString(s->problems[i]));
    char *text = cJSON_Print(o);
    cJSON_Delete(o);
    if (!text) return -1;
    printf("%s\n", text);
    cJSON_free(text);
    return 0;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: ichtriage status [-c FILE] [--set section.key=value]... [--json]\n"
               "\n"
               "Health at a glance, read from the store without disturbing the node: whether\n"
               "the DICOM port listens, the index (counts, last received, series states,\n"
               "PRAGMA quick_check, indexed spool files missing from the store), the triage\n"
               "queue and last triage, the model file the node would load, free disk space\n"
               "against store.min_free_mb, datasets being received, and whether the node is\n"
               "refusing stores for its own trouble (from <store.dir>/store-health.json,\n"
               "which the node keeps). Exit status 0 when healthy, 1 when a problem is\n"
               "listed.\n");
}

int triage_status_main(int argc, char **argv)
{
    struct triage_config cfg;
    char err[1024];
    if (triage_config_from_args(&cfg, &argc, argv, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage status: %s\n", err);
        return 2;
    }
    bool json = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0) {
            json = true;
        } else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            triage_config_free(&cfg);
            return 0;
        } else {
            fprintf(stderr, "ichtriage status: unexpected argument '%s'\n", argv[i]);
            usage(stderr);
            triage_config_free(&cfg);
            return 2;
        }
    }
    struct status s = {.config = cfg.source,
                       .store_dir = triage_config_str(&cfg, CFG_STORE_DIR),
                       .model_configured = triage_config_str(&cfg, CFG_TRIAGE_MODEL),
                       .http_listen = triage_config_str(&cfg, CFG_HTTP_LISTEN)};
    if (triage_config_get(&cfg, CFG_DICOM_PORT, &s.port, err, sizeof err) != 0 ||
        triage_config_get(&cfg, CFG_STORE_MIN_FREE_MB, &s.min_free_mb, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage status: %s\n", err);
        triage_config_free(&cfg);
        return 2;
    }
    gather(&s);
    int rc = 0;
    if (json)
        rc = print_json(&s);
    else
        print_text(&s);
    if (rc != 0) fprintf(stderr, "ichtriage status: out of memory\n");
    int healthy = s.n_problems == 0;
    triage_config_free(&cfg);
    return rc != 0 ? 2 : healthy ? 0 : 1;
}

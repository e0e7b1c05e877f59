/* train/registry.c: <store.dir>/models: registered models, the active one,
 * and `ichtriage model list|promote|rollback|register`. */
#include "registry.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "io.h"
#include "log.h"
#include "nn.h"
#include "pipeline.h"
#include "trainer.h"

static int mkdirs(const char *store, char *dir, size_t n, char *err, size_t errlen)
{
    snprintf(dir, n, "%s", store);
    if (mkdir(dir, 0750) != 0 && errno != EEXIST) goto fail;
    snprintf(dir, n, "%s/models", store);
    if (mkdir(dir, 0750) == 0) {
        if (util_own_like_folder(-1, dir) != 0) goto fail;
    } else if (errno != EEXIST) {
        goto fail;
    }
    return 0;
fail:
    snprintf(err, errlen, "%s: %s", dir, strerror(errno));
    return -1;
}

static void reconcile(const char *dir);

/* Makes a rename or a new name in dir durable. */
static void sync_dir(const char *dir)
{
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
}

/* Takes <dir>/.lock exclusively: add, promote and rollback run one at a
 * time, so that two writers (the retraining timer's auto-promote and an
 * admin's rollback) cannot interleave their file switch and log entry.
 * Returns the descriptor to close to release it, or -1 with a message. */
static int registry_lock(const char *dir, char *err, size_t errlen)
{
    char p[1200];
    snprintf(p, sizeof p, "%s/.lock", dir);
    int fd = open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0640);
    if (fd < 0 || util_own_like_folder(fd, p) != 0) {
        snprintf(err, errlen, "%s: %s", p, strerror(errno));
        if (fd >= 0) close(fd);
        return -1;
    }
    int r;
    while ((r = flock(fd, LOCK_EX)) != 0 && errno == EINTR)
        ;
    if (r != 0) {
        snprintf(err, errlen, "%s: %s", p, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

/* A new temporary file beside dst (<dst>.XXXXXX.tmp, a name of its own:
 * the ".tmp" keeps it out of backups) into tmp. Returns its descriptor, or
 * -1 with a message. */
static int temp_beside(const char *dst, char *tmp, size_t n, char *err, size_t errlen)
{
    snprintf(tmp, n, "%s.XXXXXX.tmp", dst);
    int fd = mkostemps(tmp, 4, O_CLOEXEC);
    if (fd < 0 || fchmod(fd, 0640) != 0 || util_own_like_folder(fd, tmp) != 0) {
        snprintf(err, errlen, "%s: %s", tmp, strerror(errno));
        if (fd >= 0) {
            close(fd);
            unlink(tmp);
        }
        return -1;
    }
    return fd;
}

/* Puts the finished temporary file tmp (descriptor fd, closed here) in
 * place as dst in dir: fsync, rename, fsync of dir. Returns 0, or -1 with
 * a message (tmp removed). */
static int replace_with(int fd, const char *tmp, const char *dst, const char *dir, char *err,
                        size_t errlen)
{
    int ok = fsync(fd) == 0;
    if (close(fd) != 0) ok = 0;
    if (!ok || rename(tmp, dst) != 0) {
        snprintf(err, errlen, "%s: %s", dst, strerror(errno));
        unlink(tmp);
        return -1;
    }
    sync_dir(dir);
    return 0;
}

/* Copies src to dst (in dir) through a temporary file + fsync + rename. */
static int copy_file(const char *src, const char *dst, const char *dir, char *err, size_t errlen)
{
    char tmp[1300];
    int in = open(src, O_RDONLY | O_CLOEXEC);
    if (in < 0) {
        snprintf(err, errlen, "%s: %s", src, strerror(errno));
        return -1;
    }
    int out = temp_beside(dst, tmp, sizeof tmp, err, errlen);
    if (out < 0) {
        close(in);
        return -1;
    }
    char buf[1 << 16];
    ssize_t r;
    int ok = 1;
    while (ok && (r = read(in, buf, sizeof buf)) > 0)
        if (util_write_all(out, buf, (size_t)r) != 0) ok = 0;
    if (r < 0) ok = 0;
    int e = errno;
    close(in);
    errno = e;
    if (!ok) {
        snprintf(err, errlen, "%s: %s", tmp, strerror(errno));
        close(out);
        unlink(tmp);
        return -1;
    }
    return replace_with(out, tmp, dst, dir, err, errlen);
}

static int valid_id(const char *id)
{
    if (!id[0] || strlen(id) > 100) return 0;
    for (const char *p = id; *p; p++)
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'z') || *p == '-' || *p == '_'))
            return 0;
    return strcmp(id, "active") != 0;
}

int train_registry_add(const char *store_dir, const char *model_path, char *id, size_t idn,
                       char *err, size_t errlen)
{
    char dir[1100], dst[1200];
    if (mkdirs(store_dir, dir, sizeof dir, err, errlen) != 0) return -1;
    /* Checked as the node checks what it loads (labels, thresholds,
     * windows): a model the node would refuse is no candidate. */
    struct triage_model tm;
    if (triage_model_load(&tm, model_path, err, errlen) != 0) return -1;
    nn_model *m = tm.nn;
    int lock = registry_lock(dir, err, errlen);
    if (lock < 0) {
        triage_model_free(&tm);
        return -1;
    }
    reconcile(dir);
    time_t t = time(NULL);
    char stamp[32];
    strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", gmtime(&t));
    int k = 0, rc = -1;
    for (; k < 100; k++) {
        snprintf(id, idn, k ? "m%s-%d" : "m%s", stamp, k);
        snprintf(dst, sizeof dst, "%s/%s.safetensors", dir, id);
        if (access(dst, F_OK) != 0) break;
    }
    /* Written with the id as its version: each result, the worklist, the
     * SR and the node's status name the model by it (else every promoted
     * model was "active.safetensors"). */
    if (k == 100) {
        snprintf(err, errlen, "%s: 100 models registered in one second already", dir);
    } else if (nn_model_meta_set(m, "version", id) != 0) {
        snprintf(err, errlen, "%s: cannot set its version", model_path);
    } else if (nn_model_save(m, dst, err, errlen) == 0) { /* <dst>.<pid>.tmp, fsync, rename */
        int fd = open(dst, O_RDONLY | O_CLOEXEC);
        if (fd >= 0 && fchmod(fd, 0640) == 0 && util_own_like_folder(fd, dst) == 0) {
            rc = 0;
        } else {
            snprintf(err, errlen, "%s: %s", dst, strerror(errno));
            unlink(dst);
        }
        if (fd >= 0) close(fd);
    }
    triage_model_free(&tm);
    close(lock);
    if (rc == 0) util_log(UTIL_LOG_INFO, "model_registered", "id=%s", id);
    return rc;
}

static int log_append(const char *dir, const char *line)
{
    char p[1200];
    snprintf(p, sizeof p, "%s/active.log", dir);
    FILE *f = fopen(p, "a");
    if (!f) return -1;
    if (util_own_like_folder(fileno(f), p) != 0) {
        fclose(f);
        return -1;
    }
    fprintf(f, "%s\n", line);
    int rc = fflush(f) == 0 && fsync(fileno(f)) == 0 ? 0 : -1;
    if (fclose(f) != 0) rc = -1;
    sync_dir(dir); /* when it was created */
    return rc;
}

/* The promotion history (ids, oldest first); returns the count. */
static int log_read(const char *dir, char ids[][128], int max)
{
    char p[1200];
    snprintf(p, sizeof p, "%s/active.log", dir);
    FILE *f = fopen(p, "r");
    if (!f) return 0;
    int n = 0;
    char line[256];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (!line[0]) continue;
        if (n == max) {
            memmove(ids[0], ids[1], (size_t)(max - 1) * sizeof ids[0]);
            n--;
        }
        snprintf(ids[n++], 128, "%.127s", line);
    }
    fclose(f);
    return n;
}

int train_registry_active(const char *store_dir, char *id, size_t idn)
{
    triage_model_active_id(store_dir, id, idn);
    return 0;
}

static int activate(const char *dir, const char *id, char *err, size_t errlen)
{
    char src[1200], dst[1200];
    snprintf(src, sizeof src, "%s/%s.safetensors", dir, id);
    snprintf(dst, sizeof dst, "%s/active.safetensors", dir);
    if (access(src, R_OK) != 0) {
        snprintf(err, errlen, "no registered model '%s' (see: ichtriage model list)", id);
        return -1;
    }
    struct triage_model tm;
    if (triage_model_load(&tm, src, err, errlen) != 0) return -1;
    triage_model_free(&tm);
    return copy_file(src, dst, dir, err, errlen);
}

/* Whether files a and b hold the same bytes (false when either is
 * missing). */
static bool same_bytes(const char *a, const char *b)
{
    struct stat sa, sb;
    if (stat(a, &sa) != 0 || stat(b, &sb) != 0 || sa.st_size != sb.st_size) return false;
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    bool same = fa && fb;
    char ba[65536], bb[65536];
    while (same) {
        size_t na = fread(ba, 1, sizeof ba, fa), nb = fread(bb, 1, sizeof bb, fb);
        same = na == nb && memcmp(ba, bb, na) == 0;
        if (na < sizeof ba) break;
    }
    if (fa) fclose(fa);
    if (fb) fclose(fb);
    return same;
}

/* Under the lock: active.safetensors back to the model active.log names
 * last, should they differ. A promote or rollback killed between the file
 * switch and its log line left them apart (the command had not finished,
 * so the log's is the model in force), and `model list` and the next
 * rollback went by the log while the node loaded the file. */
static void reconcile(const char *dir)
{
    char last[1][128], p[1200], want[1200], e[256];
    /* the last line only: log_read keeps the newest */
    if (log_read(dir, last, 1) == 0) return;
    snprintf(p, sizeof p, "%s/active.safetensors", dir);
    snprintf(want, sizeof want, "%s/%s.safetensors", dir, last[0]);
    if (access(want, R_OK) != 0 || same_bytes(p, want)) return;
    if (activate(dir, last[0], e, sizeof e) == 0)
        util_log(UTIL_LOG_WARN, "model_active_repaired",
                 "id=%s reason=\"active.safetensors was not the model active.log names last\"",
                 last[0]);
    else
        util_log(UTIL_LOG_ERROR, "model_active_unrepaired", "id=%s error=\"%s\"", last[0], e);
}

/* After the log could not be written: active.safetensors back to what the
 * log names (prev; "": none was active), so that the two agree. */
static void deactivate(const char *dir, const char *prev)
{
    char e[256], p[1200];
    snprintf(p, sizeof p, "%s/active.safetensors", dir);
    if (prev[0] ? activate(dir, prev, e, sizeof e) != 0 : unlink(p) != 0 && errno != ENOENT)
        util_log(UTIL_LOG_ERROR, "model_active_unrestored", "active=%s log=%s", p,
                 prev[0] ? prev : "none");
    else if (!prev[0])
        sync_dir(dir);
}

int train_registry_promote(const char *store_dir, const char *id, char *err, size_t errlen)
{
    return train_registry_promote_over(store_dir, id, NULL, err, errlen);
}

int train_registry_promote_over(const char *store_dir, const char *id, const char *was, char *err,
                                size_t errlen)
{
    char dir[1100];
    if (!valid_id(id)) {
        snprintf(err, errlen, "'%s' is not a model id", id);
        return -1;
    }
    if (mkdirs(store_dir, dir, sizeof dir, err, errlen) != 0) return -1;
    int lock = registry_lock(dir, err, errlen);
    if (lock < 0) return -1;
    reconcile(dir);
    char prev[128];
    train_registry_active(store_dir, prev, sizeof prev);
    if (was && strcmp(prev, was) != 0) {
        snprintf(err, errlen, "the active model is now %s, not %s as compared",
                 prev[0] ? prev : "none", was[0] ? was : "none");
        close(lock);
        return TRAIN_REGISTRY_CHANGED;
    }
    int rc = activate(dir, id, err, errlen);
    if (rc == 0 && log_append(dir, id) != 0) {
        snprintf(err, errlen, "%s/active.log: cannot write; %s stays active", dir,
                 prev[0] ? prev : "no model");
        deactivate(dir, prev);
        rc = -1;
    }
    close(lock);
    if (rc == 0) util_log(UTIL_LOG_INFO, "model_promoted", "id=%s", id);
    return rc;
}

/* Replaces dst (in dir) with the len bytes of text: temporary file, fsync,
 * rename, fsync of dir. Returns 0 or -1 with a message. */
static int write_whole(const char *dir, const char *dst, const char *text, size_t len, char *err,
                       size_t errlen)
{
    char t[1300];
    int fd = temp_beside(dst, t, sizeof t, err, errlen);
    if (fd < 0) return -1;
    if (util_write_all(fd, text, len) != 0) {
        snprintf(err, errlen, "%s: %s", t, strerror(errno));
        close(fd);
        unlink(t);
        return -1;
    }
    return replace_with(fd, t, dst, dir, err, errlen);
}

/* Writes the log as ids[0..n-1]. Returns 0 or -1 with a message. */
static int log_write(const char *dir, char ids[][128], int n, char *err, size_t errlen)
{
    char p[1200];
    snprintf(p, sizeof p, "%s/active.log", dir);
    char *text = malloc((size_t)(n > 0 ? n : 1) * 129);
    if (!text) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    size_t len = 0;
    for (int i = 0; i < n; i++)
        len += (size_t)sprintf(text + len, "%s\n", ids[i]);
    int rc = write_whole(dir, p, text, len, err, errlen);
    free(text);
    return rc;
}

/* Promotions a rollback can go back through (active.log is kept whole up
 * to this many; it had been cut to 64 by each rollback). */
#define LOG_MAX 4096

int train_registry_rollback(const char *store_dir, char *id, size_t idn, char *err, size_t errlen)
{
    char dir[1100];
    char(*ids)[128] = malloc(LOG_MAX * sizeof *ids);
    if (!ids) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (mkdirs(store_dir, dir, sizeof dir, err, errlen) != 0) {
        free(ids);
        return -1;
    }
    int lock = registry_lock(dir, err, errlen);
    if (lock < 0) {
        free(ids);
        return -1;
    }
    reconcile(dir);
    int n = log_read(dir, ids, LOG_MAX), rc = -1;
    /* Back to the last model other than the current one: the same id
     * promoted twice in a row is one step (the rollback had "restored" the
     * current model). */
    int k = n - 2;
    while (k >= 0 && strcmp(ids[k], ids[n - 1]) == 0)
        k--;
    if (k < 0) {
        snprintf(err, errlen, "no earlier active model to roll back to");
    } else if (activate(dir, ids[k], err, errlen) == 0) {
        /* the log up to it, so a second rollback goes further back */
        rc = log_write(dir, ids, k + 1, err, errlen);
        if (rc != 0) deactivate(dir, ids[n - 1]);
    }
    close(lock);
    if (rc == 0) {
        snprintf(id, idn, "%s", ids[k]);
        util_log(UTIL_LOG_INFO, "model_rolled_back", "id=%s from=%s", ids[k], ids[n - 1]);
    }
    free(ids);
    return rc == 0 ? 0 : -1;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int list(const char *store_dir)
{
    char dir[1100], active[128];
    snprintf(dir, sizeof dir, "%s/models", store_dir);
    train_registry_active(store_dir, active, sizeof active);
    DIR *dd = opendir(dir);
    printf("%-2s %-22s %-22s %s\n", "", "ID", "DATE", "METRICS");
    if (!dd && errno != ENOENT) {
        fprintf(stderr, "ichtriage model: %s: %s\n", dir, strerror(errno));
        return 1;
    }
    if (!dd) return 0;
    char *names[1024];
    int n = 0;
    struct dirent *de;
    while ((de = readdir(dd)) && n < 1024) {
        size_t l = strlen(de->d_name);
        if (l < 13 || strcmp(de->d_name + l - 12, ".safetensors") != 0) continue;
        if (strcmp(de->d_name, "active.safetensors") == 0) continue;
        names[n++] = strndup(de->d_name, l - 12);
    }
    closedir(dd);
    qsort(names, (size_t)n, sizeof *names, cmp_str);
    for (int i = 0; i < n; i++) {
        char p[1300], err[256];
        snprintf(p, sizeof p, "%s/%s.safetensors", dir, names[i]);
        nn_model *m = nn_model_load(p, err, sizeof err);
        const char *date = m ? nn_model_meta_get(m, "date") : NULL;
        const char *met = m ? nn_model_meta_get(m, "metrics") : NULL;
        printf("%-2s %-22s %-22s %s\n", strcmp(names[i], active) == 0 ? "*" : "", names[i],
               date ? date : "-", m ? (met ? met : "-") : err);
        nn_model_free(m);
        free(names[i]);
    }
    return 0;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: ichtriage model list | promote ID | rollback | register FILE\n"
               "The model registry under <store.dir>/models. The node loads\n"
               "<store.dir>/models/active.safetensors (at start, on SIGHUP, and when a promote\n"
               "or rollback replaces it); promotion is a\n"
               "person's decision. '*' marks the active model.\n"
               "  -c FILE, --set K=V   configuration (store.dir)\n");
}

int train_model_main(int argc, char **argv)
{
    struct triage_config cfg;
    char err[1024];
    if (triage_config_from_args(&cfg, &argc, argv, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage model: %s\n", err);
        return 2;
    }
    const char *store = triage_config_str(&cfg, CFG_STORE_DIR);
    int rc = 2;
    char id[128];
    if (argc >= 2 && (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0)) {
        usage(stdout);
        rc = 0;
    } else if (argc == 2 && strcmp(argv[1], "list") == 0) {
        rc = list(store);
    } else if (argc == 3 && strcmp(argv[1], "promote") == 0) {
        rc = train_registry_promote(store, argv[2], err, sizeof err) == 0 ? 0 : 1;
        if (rc)
            fprintf(stderr, "ichtriage model: %s\n", err);
        else
            printf("active: %s (a running node loads it now)\n", argv[2]);
    } else if (argc == 2 && strcmp(argv[1], "rollback") == 0) {
        rc = train_registry_rollback(store, id, sizeof id, err, sizeof err) == 0 ? 0 : 1;
        if (rc)
            fprintf(stderr, "ichtriage model: %s\n", err);
        else
            printf("active: %s (a running node loads it now)\n", id);
    } else if (argc == 3 && strcmp(argv[1], "register") == 0) {
        rc = train_registry_add(store, argv[2], id, sizeof id, err, sizeof err) == 0 ? 0 : 1;
        if (rc)
            fprintf(stderr, "ichtriage model: %s\n", err);
        else
            printf("%s\n", id);
    } else {
        usage(stderr);
    }
    const char *configured = triage_config_str(&cfg, CFG_TRIAGE_MODEL);
    if (rc == 0 && configured[0] && argc >= 2 &&
        (strcmp(argv[1], "promote") == 0 || strcmp(argv[1], "rollback") == 0))
        fprintf(stderr,
                "ichtriage model: note: triage.model is set (%s): the node loads that file, "
                "not the registry's active model\n",
                configured);
    triage_config_free(&cfg);
    return rc;
}

/* ---- the frozen test split --------------------------------------------------- */

int train_registry_split(struct train_dataset *d, const char *store_dir, uint64_t seed,
                         double val_frac, double test_frac, char *err, size_t errlen)
{
    train_dataset_split(d, seed, val_frac, test_frac);
    char **tp;
    int ntp;
    int frozen = train_registry_test_patients(store_dir, &tp, &ntp, err, errlen);
    if (frozen <= 0) return frozen;
    int held = train_dataset_hold_out(d, tp, ntp);
    util_log(UTIL_LOG_INFO, "test_split", "frozen_patients=%d series_held_out=%d", ntp, held);
    train_registry_free_ids(tp, ntp);
    return ntp;
}

int train_registry_test_patients(const char *store_dir, char ***ids, int *n, char *err,
                                 size_t errlen)
{
    char p[1200];
    snprintf(p, sizeof p, "%s/models/test-patients.txt", store_dir);
    *ids = NULL;
    *n = 0;
    FILE *f = fopen(p, "r");
    if (!f) {
        if (errno == ENOENT) return 0;
        snprintf(err, errlen, "%s: %s", p, strerror(errno));
        return -1;
    }
    char line[256];
    int cap = 0;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (!line[0] || line[0] == '#') continue;
        /* an ID written with a backslash before it (see freeze): the rest */
        const char *pid = line[0] == '\\' ? line + 1 : line;
        if (*n == cap) {
            cap = cap ? 2 * cap : 64;
            char **grown = realloc(*ids, (size_t)cap * sizeof *grown);
            if (!grown) break;
            *ids = grown;
        }
        if (!((*ids)[*n] = strdup(pid))) break;
        (*n)++;
    }
    int bad = ferror(f) || !feof(f);
    fclose(f);
    if (bad) {
        snprintf(err, errlen, "%s: could not read it", p);
        train_registry_free_ids(*ids, *n);
        *ids = NULL, *n = 0;
        return -1;
    }
    return 1;
}

int train_registry_freeze_test(const char *store_dir, char *const *ids, int n, char *err,
                               size_t errlen)
{
    char dir[1100], p[1200];
    if (mkdirs(store_dir, dir, sizeof dir, err, errlen) != 0) return -1;
    snprintf(p, sizeof p, "%s/test-patients.txt", dir);
    int lock = registry_lock(dir, err, errlen); /* two runs: the first one's */
    if (lock < 0) return -1;
    if (access(p, F_OK) == 0) {
        close(lock);
        return 0;
    }
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    int rc = -1;
    if (f) {
        time_t t = time(NULL);
        char stamp[32];
        strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ", gmtime(&t));
        fprintf(f,
                "# ichtriage: the frozen test split, written %s by the first registered "
                "training\n# run. Registered runs never train on these patients and compare "
                "models on them.\n",
                stamp);
        /* an ID that starts with '#' would read as a comment: a backslash
         * goes before it (a PatientID, LO, holds none; and before one that
         * starts with a backslash all the same) */
        for (int i = 0; i < n; i++)
            fprintf(f, "%s%s\n", ids[i][0] == '#' || ids[i][0] == '\\' ? "\\" : "", ids[i]);
        if (fclose(f) == 0)
            rc = write_whole(dir, p, text, len, err, errlen);
        else
            f = NULL;
    }
    if (!f) snprintf(err, errlen, "out of memory");
    free(text);
    close(lock);
    if (rc == 0) util_log(UTIL_LOG_INFO, "test_split_frozen", "patients=%d file=%s", n, p);
    return rc;
}

void train_registry_free_ids(char **ids, int n)
{
    for (int i = 0; i < n; i++)
        free(ids[i]);
    free(ids);
}

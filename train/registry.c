/* train/registry.c: <store.dir>/models: registered models, the active one,
 * and `ichtriage model list|promote|rollback|register`. */
#include "registry.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "log.h"
#include "nn.h"
#include "trainer.h"

static int mkdirs(const char *store, char *dir, size_t n, char *err, size_t errlen)
{
    snprintf(dir, n, "%s", store);
    if (mkdir(dir, 0750) != 0 && errno != EEXIST) goto fail;
    snprintf(dir, n, "%s/models", store);
    if (mkdir(dir, 0750) != 0 && errno != EEXIST) goto fail;
    return 0;
fail:
    snprintf(err, errlen, "%s: %s", dir, strerror(errno));
    return -1;
}

/* Copies src to dst through dst.tmp + fsync + rename. */
static int copy_file(const char *src, const char *dst, char *err, size_t errlen)
{
    char tmp[1200];
    snprintf(tmp, sizeof tmp, "%s.tmp", dst);
    int in = open(src, O_RDONLY | O_CLOEXEC);
    if (in < 0) {
        snprintf(err, errlen, "%s: %s", src, strerror(errno));
        return -1;
    }
    int out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
    if (out < 0) {
        snprintf(err, errlen, "%s: %s", tmp, strerror(errno));
        close(in);
        return -1;
    }
    char buf[1 << 16];
    ssize_t r;
    int ok = 1;
    while ((r = read(in, buf, sizeof buf)) > 0)
        if (write(out, buf, (size_t)r) != r) ok = 0;
    if (r < 0 || fsync(out) != 0) ok = 0;
    close(in);
    if (close(out) != 0) ok = 0;
    if (!ok || rename(tmp, dst) != 0) {
        snprintf(err, errlen, "%s: %s", dst, strerror(errno));
        unlink(tmp);
        return -1;
    }
    return 0;
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
    nn_model *m = nn_model_load(model_path, err, errlen);
    if (!m) return -1;
    nn_model_free(m);
    time_t t = time(NULL);
    char stamp[32];
    strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", gmtime(&t));
    for (int k = 0; k < 100; k++) {
        snprintf(id, idn, k ? "m%s-%d" : "m%s", stamp, k);
        snprintf(dst, sizeof dst, "%s/%s.safetensors", dir, id);
        if (access(dst, F_OK) != 0) break;
    }
    if (copy_file(model_path, dst, err, errlen) != 0) return -1;
    util_log(UTIL_LOG_INFO, "model_registered", "id=%s", id);
    return 0;
}

static int log_append(const char *dir, const char *line)
{
    char p[1200];
    snprintf(p, sizeof p, "%s/active.log", dir);
    FILE *f = fopen(p, "a");
    if (!f) return -1;
    fprintf(f, "%s\n", line);
    int rc = fflush(f) == 0 && fsync(fileno(f)) == 0 ? 0 : -1;
    fclose(f);
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
    char dir[1100], ids[64][128];
    snprintf(dir, sizeof dir, "%s/models", store_dir);
    int n = log_read(dir, ids, 64);
    snprintf(id, idn, "%s", n ? ids[n - 1] : "");
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
    nn_model *m = nn_model_load(src, err, errlen);
    if (!m) return -1;
    nn_model_free(m);
    return copy_file(src, dst, err, errlen);
}

int train_registry_promote(const char *store_dir, const char *id, char *err, size_t errlen)
{
    char dir[1100];
    if (!valid_id(id)) {
        snprintf(err, errlen, "'%s' is not a model id", id);
        return -1;
    }
    if (mkdirs(store_dir, dir, sizeof dir, err, errlen) != 0) return -1;
    if (activate(dir, id, err, errlen) != 0) return -1;
    if (log_append(dir, id) != 0) {
        snprintf(err, errlen, "%s/active.log: cannot write", dir);
        return -1;
    }
    util_log(UTIL_LOG_INFO, "model_promoted", "id=%s", id);
    return 0;
}

int train_registry_rollback(const char *store_dir, char *id, size_t idn, char *err, size_t errlen)
{
    char dir[1100], ids[64][128];
    if (mkdirs(store_dir, dir, sizeof dir, err, errlen) != 0) return -1;
    int n = log_read(dir, ids, 64);
    if (n < 2) {
        snprintf(err, errlen, "no earlier active model to roll back to");
        return -1;
    }
    if (activate(dir, ids[n - 2], err, errlen) != 0) return -1;
    /* Rewrite the log without the current one, so a second rollback goes
     * further back. */
    char p[1200], t[1210];
    snprintf(p, sizeof p, "%s/active.log", dir);
    snprintf(t, sizeof t, "%s.tmp", p);
    FILE *f = fopen(t, "w");
    if (!f) {
        snprintf(err, errlen, "%s: %s", t, strerror(errno));
        return -1;
    }
    for (int i = 0; i < n - 1; i++)
        fprintf(f, "%s\n", ids[i]);
    if (fclose(f) != 0 || rename(t, p) != 0) {
        snprintf(err, errlen, "%s: cannot write", p);
        return -1;
    }
    snprintf(id, idn, "%s", ids[n - 2]);
    util_log(UTIL_LOG_INFO, "model_rolled_back", "id=%s from=%s", ids[n - 2], ids[n - 1]);
    return 0;
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
               "<store.dir>/models/active.safetensors (on start and on SIGHUP); promotion is a\n"
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
            printf("active: %s (send SIGHUP to a running node to load it)\n", argv[2]);
    } else if (argc == 2 && strcmp(argv[1], "rollback") == 0) {
        rc = train_registry_rollback(store, id, sizeof id, err, sizeof err) == 0 ? 0 : 1;
        if (rc)
            fprintf(stderr, "ichtriage model: %s\n", err);
        else
            printf("active: %s\n", id);
    } else if (argc == 3 && strcmp(argv[1], "register") == 0) {
        rc = train_registry_add(store, argv[2], id, sizeof id, err, sizeof err) == 0 ? 0 : 1;
        if (rc)
            fprintf(stderr, "ichtriage model: %s\n", err);
        else
            printf("%s\n", id);
    } else {
        usage(stderr);
    }
    triage_config_free(&cfg);
    return rc;
}

/* ---- the frozen test split --------------------------------------------------- */

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
        if (*n == cap) {
            cap = cap ? 2 * cap : 64;
            char **grown = realloc(*ids, (size_t)cap * sizeof *grown);
            if (!grown) break;
            *ids = grown;
        }
        if (!((*ids)[*n] = strdup(line))) break;
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
    char dir[1100], p[1200], tmp[1300];
    if (mkdirs(store_dir, dir, sizeof dir, err, errlen) != 0) return -1;
    snprintf(p, sizeof p, "%s/test-patients.txt", dir);
    if (access(p, F_OK) == 0) return 0;
    snprintf(tmp, sizeof tmp, "%s.tmp", p);
    FILE *f = fopen(tmp, "w");
    if (!f) {
        snprintf(err, errlen, "%s: %s", tmp, strerror(errno));
        return -1;
    }
    time_t t = time(NULL);
    char stamp[32];
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ", gmtime(&t));
    fprintf(f,
            "# ichtriage: the frozen test split, written %s by the first registered training\n"
            "# run. Registered runs never train on these patients and compare models on them.\n",
            stamp);
    for (int i = 0; i < n; i++)
        fprintf(f, "%s\n", ids[i]);
    int ok = fflush(f) == 0 && fsync(fileno(f)) == 0;
    if (fclose(f) != 0) ok = 0;
    if (!ok || rename(tmp, p) != 0) {
        snprintf(err, errlen, "%s: %s", p, strerror(errno));
        unlink(tmp);
        return -1;
    }
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    util_log(UTIL_LOG_INFO, "test_split_frozen", "patients=%d file=%s", n, p);
    return 0;
}

void train_registry_free_ids(char **ids, int n)
{
    for (int i = 0; i < n; i++)
        free(ids[i]);
    free(ids);
}

/* triage/config.c: the INI configuration (inih) with --set overrides. */
#include "config.h"

#include <errno.h>
#include <ini.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#ifndef ICHTRIAGE_SYSCONFDIR
#define ICHTRIAGE_SYSCONFDIR "/etc/ichtriage"
#endif

/* The names and defaults; etc/ichtriage.conf documents each one. */
static const struct {
    const char *name;
    const char *dflt;
} keys[CFG_NKEYS] = {
    [CFG_DICOM_PORT] = {"dicom.port", "11112"},
    [CFG_DICOM_AETITLE] = {"dicom.aetitle", "ICHTRIAGE"},
    [CFG_DICOM_MAX_ASSOCIATIONS] = {"dicom.max_associations", "16"},
    [CFG_DICOM_MAX_PDU] = {"dicom.max_pdu", "131072"},
    [CFG_DICOM_ACSE_TIMEOUT] = {"dicom.acse_timeout", "30"},
    [CFG_DICOM_DIMSE_TIMEOUT] = {"dicom.dimse_timeout", "60"},
    [CFG_DICOM_ASSOCIATION_DEADLINE] = {"dicom.association_deadline", "1800"},
    [CFG_DICOM_ALLOWED_PEERS] = {"dicom.allowed_peers", ""},
    [CFG_DICOM_TLS_PORT] = {"dicom.tls_port", "0"},
    [CFG_DICOM_TLS_CERT] = {"dicom.tls_cert", ""},
    [CFG_DICOM_TLS_KEY] = {"dicom.tls_key", ""},
    [CFG_DICOM_TLS_CA] = {"dicom.tls_ca", ""},
    [CFG_DICOM_SHUTDOWN_GRACE] = {"dicom.shutdown_grace", "20"},
    [CFG_STORE_DIR] = {"store.dir", "./var"},
    [CFG_STORE_MIN_FREE_MB] = {"store.min_free_mb", "512"},
    [CFG_STORE_MAX_INSTANCE_MB] = {"store.max_instance_mb", "1024"},
    [CFG_STORE_RETENTION_DAYS] = {"store.retention_days", "0"},
    [CFG_STORE_KEEP_REVIEWED_DAYS] = {"store.keep_reviewed_days", "365"},
    [CFG_STORE_FAILURE_WINDOW_SECONDS] = {"store.failure_window_seconds", "60"},
    [CFG_HTTP_LISTEN] = {"http.listen", "127.0.0.1:8080"},
    [CFG_HTTP_USERS] = {"http.users", ""},
    [CFG_HTTP_TLS_CERT] = {"http.tls_cert", ""},
    [CFG_HTTP_TLS_KEY] = {"http.tls_key", ""},
    [CFG_HTTP_WEBHOOK] = {"http.webhook", ""},
    [CFG_HTTP_TRUSTED_PROXIES] = {"http.trusted_proxies", ""},
    [CFG_HTTP_CLAIM_MINUTES] = {"http.claim_minutes", "30"},
    [CFG_HTTP_WORKLIST_DAYS] = {"http.worklist_days", "7"},
    [CFG_TRIAGE_QUIET_SECONDS] = {"triage.quiet_seconds", "5"},
    [CFG_TRIAGE_MODEL] = {"triage.model", ""},
    [CFG_TRIAGE_HEAD_PATTERNS] =
        {"triage.head_patterns", "HEAD,BRAIN,SKULL,CRAN,CEREB,NEURO,STROKE,HIRN,KOPF,SCHAEDEL,CCT"},
    [CFG_TRIAGE_MIN_SLICES] = {"triage.min_slices", "10"},
    [CFG_TRIAGE_PIXEL_DECODER] = {"triage.pixel_decoder", "child"},
    [CFG_TRIAGE_DECODER_MAX_MB] = {"triage.decoder_max_mb", "4096"},
    [CFG_TRIAGE_DECODER_CPU_SECONDS] = {"triage.decoder_cpu_seconds", "120"},
    [CFG_TRIAGE_MAX_TILT] = {"triage.max_tilt", "35"},
    [CFG_NN_DEVICE] = {"nn.device", "auto"},
    [CFG_TRAIN_AUTO_PROMOTE] = {"train.auto_promote", "no"},
    [CFG_PACS_DESTINATIONS] = {"pacs.destinations", ""},
    [CFG_PACS_SEND] = {"pacs.send", "flagged"},
    [CFG_PACS_CALLING_AETITLE] = {"pacs.calling_aetitle", ""},
    [CFG_PACS_TIMEOUT] = {"pacs.timeout", "30"},
    [CFG_PACS_MAX_ATTEMPTS] = {"pacs.max_attempts", "10"},
    [CFG_PACS_RETRY_SECONDS] = {"pacs.retry_seconds", "30"},
    [CFG_PACS_MAX_RETRY_SECONDS] = {"pacs.max_retry_seconds", "3600"},
    [CFG_PACS_TLS_CA] = {"pacs.tls_ca", ""},
    [CFG_PACS_TLS_CERT] = {"pacs.tls_cert", ""},
    [CFG_PACS_TLS_KEY] = {"pacs.tls_key", ""},
    [CFG_LOG_LEVEL] = {"log.level", "info"},
};

/* The range of every integer key and the choices of every enumerated one:
 * what triage_config_check() enforces, at start and on reload alike. */
static const struct {
    int64_t min, max;
} ranges[CFG_NKEYS] = {
    [CFG_DICOM_PORT] = {1, 65535},
    [CFG_DICOM_MAX_ASSOCIATIONS] = {1, 1000},
    [CFG_DICOM_MAX_PDU] = {4096, 131072},
    [CFG_DICOM_ACSE_TIMEOUT] = {1, 3600},
    [CFG_DICOM_DIMSE_TIMEOUT] = {1, 3600},
    [CFG_DICOM_ASSOCIATION_DEADLINE] = {1, 7 * 86400},
    [CFG_DICOM_TLS_PORT] = {0, 65535},
    [CFG_DICOM_SHUTDOWN_GRACE] = {0, 3600},
    [CFG_STORE_MIN_FREE_MB] = {0, INT64_C(1) << 30},
    [CFG_STORE_MAX_INSTANCE_MB] = {1, 1 << 20},
    [CFG_STORE_RETENTION_DAYS] = {0, 100000},
    [CFG_STORE_KEEP_REVIEWED_DAYS] = {0, 100000},
    [CFG_STORE_FAILURE_WINDOW_SECONDS] = {0, 86400},
    [CFG_HTTP_CLAIM_MINUTES] = {1, 24 * 60},
    [CFG_HTTP_WORKLIST_DAYS] = {0, 100000},
    [CFG_TRIAGE_QUIET_SECONDS] = {0, 86400},
    [CFG_TRIAGE_MIN_SLICES] = {1, 1000},
    [CFG_TRIAGE_DECODER_MAX_MB] = {256, INT64_C(1) << 20},
    [CFG_TRIAGE_DECODER_CPU_SECONDS] = {1, 86400},
    [CFG_TRIAGE_MAX_TILT] = {0, 89},
    [CFG_PACS_TIMEOUT] = {1, 3600},
    [CFG_PACS_MAX_ATTEMPTS] = {1, 1000},
    [CFG_PACS_RETRY_SECONDS] = {1, 86400},
    [CFG_PACS_MAX_RETRY_SECONDS] = {1, 7 * 86400},
};

static const char *const choices[CFG_NKEYS] = {
    [CFG_TRIAGE_PIXEL_DECODER] = "child|inline",
    [CFG_NN_DEVICE] = "auto|cpu|cuda",
    [CFG_PACS_SEND] = "all|flagged",
    [CFG_LOG_LEVEL] = "error|warn|info|debug",
};

/* Files the node reads at start: a reload checks that they are still there. */
static const enum triage_config_key files[] = {
    CFG_DICOM_TLS_CERT, CFG_DICOM_TLS_KEY, CFG_DICOM_TLS_CA,  CFG_HTTP_USERS,   CFG_HTTP_TLS_CERT,
    CFG_HTTP_TLS_KEY,   CFG_PACS_TLS_CA,   CFG_PACS_TLS_CERT, CFG_PACS_TLS_KEY,
};

static bool one_of(const char *list, const char *s)
{
    size_t n = strlen(s);
    for (const char *p = list;; p++) {
        if (n && strncmp(p, s, n) == 0 && (p[n] == '|' || p[n] == 0)) return true;
        if (!(p = strchr(p, '|'))) return false;
    }
}

const char *triage_config_name(enum triage_config_key k)
{
    return keys[k].name;
}

const char *triage_config_str(const struct triage_config *c, enum triage_config_key k)
{
    return c->values[k];
}

static int find_key(const char *section, size_t section_len, const char *key)
{
    for (int i = 0; i < CFG_NKEYS; i++) {
        const char *dot = strchr(keys[i].name, '.');
        if ((size_t)(dot - keys[i].name) == section_len &&
            strncmp(keys[i].name, section, section_len) == 0 && strcmp(dot + 1, key) == 0)
            return i;
    }
    return -1;
}

static int put(struct triage_config *c, int k, const char *value)
{
    char *v = strdup(value);
    if (!v) return -1;
    free(c->values[k]);
    c->values[k] = v;
    return 0;
}

struct parse_ctx {
    struct triage_config *c;
    char *err;
    size_t errlen;
    int failed;
    bool seen[CFG_NKEYS];
};

static int on_ini(void *user, const char *section, const char *name, const char *value)
{
    struct parse_ctx *p = user;
    int k = find_key(section, strlen(section), name);
    if (k < 0) {
        if (!p->failed)
            snprintf(p->err, p->errlen, "unknown key [%s] %s in %s", section, name, p->c->source);
        p->failed = 1;
        return 0;
    }
    /* A key given twice would keep only its last value, silently. */
    if (p->seen[k]) {
        if (!p->failed)
            snprintf(p->err, p->errlen, "[%s] %s is given twice in %s", section, name,
                     p->c->source);
        p->failed = 1;
        return 0;
    }
    p->seen[k] = true;
    return put(p->c, k, value) == 0;
}

int triage_config_load(struct triage_config *c, const char *path, char *err, size_t errlen)
{
    memset(c, 0, sizeof *c);
    for (int i = 0; i < CFG_NKEYS; i++)
        if (put(c, i, keys[i].dflt) != 0) goto oom;
    const char *file = path;
    if (!file && access(ICHTRIAGE_SYSCONFDIR "/ichtriage.conf", R_OK) == 0)
        file = ICHTRIAGE_SYSCONFDIR "/ichtriage.conf";
    if (!file) {
        snprintf(c->source, sizeof c->source, "built-in defaults");
        return 0;
    }
    snprintf(c->source, sizeof c->source, "%s", file);
    FILE *f = fopen(file, "r");
    if (!f) {
        snprintf(err, errlen, "cannot read config %s: %s", file, strerror(errno));
        triage_config_free(c);
        return -1;
    }
    struct parse_ctx p = {c, err, errlen, 0, {false}};
    /* Debian's inih takes an indented line for the continuation of the key
     * before it and hands it over as a new value of that key; and it cuts
     * lines at 200 bytes. Either would replace a list (destinations, head
     * patterns) by its last part without a word. So: one value, one line, of
     * any length; an indented line is a syntax error. */
    ini_allow_multiline = false;
    ini_use_stack = false;
    ini_allow_realloc = true;
    ini_max_line = 1 << 20;
    int rc = ini_parse_file(f, on_ini, &p);
    fclose(f);
    if (rc != 0 || p.failed) {
        if (!p.failed)
            snprintf(err, errlen,
                     "config %s: syntax error on line %d (each key = value on one line; "
                     "an indented line does not continue the one before)",
                     file, rc);
        triage_config_free(c);
        return -1;
    }
    return 0;
oom:
    snprintf(err, errlen, "out of memory");
    triage_config_free(c);
    return -1;
}

int triage_config_set(struct triage_config *c, const char *assignment, char *err, size_t errlen)
{
    const char *dot = strchr(assignment, '.');
    const char *eq = strchr(assignment, '=');
    if (!dot || !eq || dot > eq) {
        snprintf(err, errlen, "--set wants section.key=value, got '%s'", assignment);
        return -1;
    }
    char key[128];
    size_t klen = (size_t)(eq - dot - 1);
    if (klen >= sizeof key) klen = sizeof key - 1;
    memcpy(key, dot + 1, klen);
    key[klen] = 0;
    int k = find_key(assignment, (size_t)(dot - assignment), key);
    if (k < 0) {
        snprintf(err, errlen, "--set: unknown key '%.*s'", (int)(eq - assignment), assignment);
        return -1;
    }
    if (put(c, k, eq + 1) != 0) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (c->nsets == TRIAGE_CONFIG_MAX_SETS) {
        snprintf(err, errlen, "more than %d --set options", TRIAGE_CONFIG_MAX_SETS);
        return -1;
    }
    if (!(c->sets[c->nsets] = strdup(assignment))) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    c->nsets++;
    return 0;
}

int triage_config_reload(const struct triage_config *old, struct triage_config *fresh, char *err,
                         size_t errlen)
{
    const char *path = strcmp(old->source, "built-in defaults") == 0 ? NULL : old->source;
    /* Without a file, load() would look for the installed one: "/dev/null"
     * gives the built-in defaults whatever is installed. */
    if (triage_config_load(fresh, path ? path : "/dev/null", err, errlen) != 0) return -1;
    if (!path) snprintf(fresh->source, sizeof fresh->source, "built-in defaults");
    for (int i = 0; i < old->nsets; i++) {
        if (triage_config_set(fresh, old->sets[i], err, errlen) != 0) {
            triage_config_free(fresh);
            return -1;
        }
    }
    return 0;
}

void triage_config_free(struct triage_config *c)
{
    for (int i = 0; i < CFG_NKEYS; i++) {
        free(c->values[i]);
        c->values[i] = NULL;
    }
    for (int i = 0; i < c->nsets; i++)
        free(c->sets[i]);
    c->nsets = 0;
}

int triage_config_bool(const struct triage_config *c, enum triage_config_key k, int *out, char *err,
                       size_t errlen)
{
    static const char *const yes[] = {"yes", "true", "on", "1"}, *const no[] = {"no", "false",
                                                                                "off", "0"};
    const char *s = c->values[k];
    for (size_t i = 0; i < sizeof yes / sizeof yes[0]; i++) {
        if (strcasecmp(s, yes[i]) == 0) return *out = 1, 0;
        if (strcasecmp(s, no[i]) == 0) return *out = 0, 0;
    }
    snprintf(err, errlen, "%s = '%s': want yes or no", keys[k].name, s);
    return -1;
}

int triage_config_int(const struct triage_config *c, enum triage_config_key k, int64_t min,
                      int64_t max, int64_t *out, char *err, size_t errlen)
{
    const char *s = c->values[k];
    char *end = NULL;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    while (end && (*end == ' ' || *end == '\t'))
        end++;
    if (errno || end == s || *end || v < min || v > max) {
        snprintf(err, errlen, "%s = '%s': want an integer from %lld to %lld", keys[k].name, s,
                 (long long)min, (long long)max);
        return -1;
    }
    *out = v;
    return 0;
}

int triage_config_get(const struct triage_config *c, enum triage_config_key k, int64_t *out,
                      char *err, size_t errlen)
{
    return triage_config_int(c, k, ranges[k].min, ranges[k].max, out, err, errlen);
}

int triage_config_check(const struct triage_config *c, char *err, size_t errlen)
{
    for (int k = 0; k < CFG_NKEYS; k++) {
        int64_t v;
        if (ranges[k].max != 0 && triage_config_get(c, k, &v, err, errlen) != 0) return -1;
        if (choices[k] && !one_of(choices[k], c->values[k])) {
            char want[64];
            snprintf(want, sizeof want, "%s", choices[k]);
            for (char *p = want; *p; p++)
                if (*p == '|') *p = ',';
            snprintf(err, errlen, "%s = '%s': want one of %s", keys[k].name, c->values[k], want);
            return -1;
        }
    }
    int yes;
    if (triage_config_bool(c, CFG_TRAIN_AUTO_PROMOTE, &yes, err, errlen) != 0) return -1;
    /* PS3.5: up to 16 characters, no backslash or control character, and
     * leading and trailing spaces are not significant: a title configured
     * with them would never match the trimmed one a peer calls. */
    for (int k = 0; k < 2; k++) {
        enum triage_config_key key = k ? CFG_PACS_CALLING_AETITLE : CFG_DICOM_AETITLE;
        const char *t = c->values[key];
        size_t n = strlen(t);
        bool bad = n > 16 || (k == 0 && n < 1) || (n && (t[0] == ' ' || t[n - 1] == ' '));
        for (size_t i = 0; i < n; i++)
            if ((unsigned char)t[i] < ' ' || t[i] == '\\' || t[i] == 0x7f) bad = true;
        if (bad) {
            snprintf(err, errlen,
                     "%s must be %s16 characters, without a backslash, a control character or "
                     "spaces at either end",
                     keys[key].name, k ? "at most " : "1 to ");
            return -1;
        }
    }
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        const char *path = c->values[files[i]];
        if (path[0] && access(path, R_OK) != 0) {
            snprintf(err, errlen, "%s = '%s': cannot read it: %s", keys[files[i]].name, path,
                     strerror(errno));
            return -1;
        }
    }
    return 0;
}

int triage_config_from_args(struct triage_config *c, int *argc, char **argv, char *err,
                            size_t errlen)
{
    const char *path = NULL;
    int n = *argc, out = 1;
    /* First pass: find -c so that --set applies on top of the file. */
    for (int i = 1; i < n; i++) {
        if (strcmp(argv[i], "-c") == 0 || strcmp(argv[i], "--config") == 0) {
            if (i + 1 >= n) {
                snprintf(err, errlen, "%s needs a file name", argv[i]);
                return -1;
            }
            path = argv[++i];
        } else if (strcmp(argv[i], "--set") == 0 || strcmp(argv[i], "--device") == 0) {
            i++;
        }
    }
    if (triage_config_load(c, path, err, errlen) != 0) return -1;
    for (int i = 1; i < n; i++) {
        if (strcmp(argv[i], "-c") == 0 || strcmp(argv[i], "--config") == 0) {
            i++;
        } else if (strcmp(argv[i], "--set") == 0) {
            if (i + 1 >= n) {
                snprintf(err, errlen, "--set needs section.key=value");
                triage_config_free(c);
                return -1;
            }
            if (triage_config_set(c, argv[++i], err, errlen) != 0) {
                triage_config_free(c);
                return -1;
            }
        } else if (strcmp(argv[i], "--device") == 0) {
            /* every subcommand: the same as --set nn.device=X */
            char kv[64];
            if (i + 1 >= n) {
                snprintf(err, errlen, "--device needs auto, cpu or cuda");
                triage_config_free(c);
                return -1;
            }
            snprintf(kv, sizeof kv, "nn.device=%.40s", argv[++i]);
            if (triage_config_set(c, kv, err, errlen) != 0) {
                triage_config_free(c);
                return -1;
            }
        } else {
            argv[out++] = argv[i];
        }
    }
    argv[out] = NULL;
    *argc = out;
    return 0;
}

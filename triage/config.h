/* The node's configuration: one INI file (etc/ichtriage.conf documents every
 * key), then --set section.key=value overrides, then typed getters that say
 * what is wrong with a value. */
#ifndef TRIAGE_CONFIG_H
#define TRIAGE_CONFIG_H

#include <stddef.h>
#include <stdint.h>

enum triage_config_key {
    CFG_DICOM_PORT,
    CFG_DICOM_AETITLE,
    CFG_DICOM_MAX_ASSOCIATIONS,
    CFG_DICOM_MAX_PDU,
    CFG_DICOM_ACSE_TIMEOUT,
    CFG_DICOM_DIMSE_TIMEOUT,
    CFG_DICOM_ASSOCIATION_DEADLINE,
    CFG_DICOM_ALLOWED_PEERS,
    CFG_DICOM_TLS_PORT,
    CFG_DICOM_TLS_CERT,
    CFG_DICOM_TLS_KEY,
    CFG_DICOM_TLS_CA,
    CFG_DICOM_SHUTDOWN_GRACE,
    CFG_STORE_DIR,
    CFG_STORE_MIN_FREE_MB,
    CFG_STORE_MAX_INSTANCE_MB,
    CFG_STORE_RETENTION_DAYS,
    CFG_STORE_KEEP_REVIEWED_DAYS,
    CFG_STORE_FAILURE_WINDOW_SECONDS,
    CFG_HTTP_LISTEN,
    CFG_HTTP_USERS,
    CFG_HTTP_TLS_CERT,
    CFG_HTTP_TLS_KEY,
    CFG_HTTP_WEBHOOK,
    CFG_HTTP_TRUSTED_PROXIES,
    CFG_HTTP_CLAIM_MINUTES,
    CFG_HTTP_WORKLIST_DAYS,
    CFG_TRIAGE_QUIET_SECONDS,
    CFG_TRIAGE_MODEL,
    CFG_TRIAGE_HEAD_PATTERNS,
    CFG_TRIAGE_MIN_SLICES,
    CFG_TRIAGE_PIXEL_DECODER,
    CFG_TRIAGE_DECODER_MAX_MB,
    CFG_TRIAGE_DECODER_CPU_SECONDS,
    CFG_TRIAGE_MAX_TILT,
    CFG_NN_DEVICE,
    CFG_TRAIN_AUTO_PROMOTE,
    CFG_PACS_DESTINATIONS,
    CFG_PACS_SEND,
    CFG_PACS_CALLING_AETITLE,
    CFG_PACS_TIMEOUT,
    CFG_PACS_MAX_ATTEMPTS,
    CFG_PACS_RETRY_SECONDS,
    CFG_PACS_MAX_RETRY_SECONDS,
    CFG_PACS_TLS_CA,
    CFG_PACS_TLS_CERT,
    CFG_PACS_TLS_KEY,
    CFG_LOG_LEVEL,
    CFG_NKEYS
};

#define TRIAGE_CONFIG_MAX_SETS 64

struct triage_config {
    char *values[CFG_NKEYS];
    char source[512]; /* the file read, or "built-in defaults" */
    /* The --set assignments, in order, so that a reload applies them again. */
    char *sets[TRIAGE_CONFIG_MAX_SETS];
    int nsets;
};

/* Fills c with the built-in defaults, then reads path (NULL: the installed
 * default file if it exists). Unknown sections or keys are errors. The caller
 * frees c with triage_config_free(). Returns 0, or -1 with a message. */
int triage_config_load(struct triage_config *c, const char *path, char *err, size_t errlen);
/* Applies "section.key=value". Returns 0, or -1 with a message. */
int triage_config_set(struct triage_config *c, const char *assignment, char *err, size_t errlen);
void triage_config_free(struct triage_config *c);

/* Reads the file of old again (or the built-in defaults, if old had none)
 * and applies old's --set assignments on top, into fresh. Returns 0, or -1
 * with a message; fresh owns nothing then. */
int triage_config_reload(const struct triage_config *old, struct triage_config *fresh, char *err,
                         size_t errlen);

const char *triage_config_str(const struct triage_config *c, enum triage_config_key k);
const char *triage_config_name(enum triage_config_key k);
/* Parses a yes/no key (yes, no, true, false, on, off, 1, 0) into *out.
 * Returns 0, or -1 with a message. */
int triage_config_bool(const struct triage_config *c, enum triage_config_key k, int *out, char *err,
                       size_t errlen);
/* Parses an integer key within [min, max]. Returns 0, or -1 with a message. */
int triage_config_int(const struct triage_config *c, enum triage_config_key k, int64_t min,
                      int64_t max, int64_t *out, char *err, size_t errlen);

/* Parses an integer key within the range the node allows for it (the table
 * in config.c). Returns 0, or -1 with a message. */
int triage_config_get(const struct triage_config *c, enum triage_config_key k, int64_t *out,
                      char *err, size_t errlen);
/* Checks every key the node reads: integers in range, enumerated values
 * among their choices, yes/no keys, AE title lengths, and that the files
 * named (TLS keys and certificates, http.users) can be read. Start and
 * reload both run it, so a reload never accepts what a restart would
 * refuse. Returns 0, or -1 with a message naming the key. */
int triage_config_check(const struct triage_config *c, char *err, size_t errlen);

/* Parses the common options of every subcommand, -c FILE and --set K=V
 * (repeatable), removing them from argv; the rest stays in order. Loads the
 * configuration into c. Returns 0, or -1 with a message. */
int triage_config_from_args(struct triage_config *c, int *argc, char **argv, char *err,
                            size_t errlen);

#endif

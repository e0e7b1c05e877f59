/* The Storage SCP: accepts associations, answers C-ECHO, receives C-STORE
 * datasets bit for bit into temporary files and hands each one, fsynced and
 * parsed, to the caller's store callback, whose answer becomes the DIMSE
 * status. C API over dcmtk; runs its own threads (one listener, one per
 * association), never the caller's loop. */
#ifndef SCP_H
#define SCP_H

#include <stddef.h>
#include <stdint.h>

#include "scp_info.h"

#ifdef __cplusplus
extern "C" {
#endif

/* DIMSE statuses of a C-STORE (PS3.4 B.2.3, PS3.7 C); the store callback
 * answers one of the first four. */
enum {
    SCP_STATUS_SUCCESS = 0x0000,
    SCP_STATUS_OUT_OF_RESOURCES = 0xA700,
    SCP_STATUS_DOES_NOT_MATCH_SOP_CLASS = 0xA900,
    SCP_STATUS_CANNOT_UNDERSTAND = 0xC000,
    SCP_STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122,
};

/* Why an instance was refused: for metrics and the node's health, since a
 * DIMSE status alone does not tell a full disk from a locked index. The
 * first five are the node's own trouble (scp_refusal_is_local), the rest
 * the peer's. */
enum scp_refusal {
    SCP_REFUSED_NONE,
    SCP_REFUSED_LOW_SPACE,    /* the space callback said no (store.min_free_mb) */
    SCP_REFUSED_DISK_FULL,    /* ENOSPC or EDQUOT while writing */
    SCP_REFUSED_PERMISSION,   /* EACCES, EPERM or EROFS: modes, a read-only mount */
    SCP_REFUSED_IO,           /* any other file-system error */
    SCP_REFUSED_DATABASE,     /* the index could not be written (busy, locked, ...) */
    SCP_REFUSED_TOO_LARGE,    /* over max_instance_bytes, also once inflated */
    SCP_REFUSED_SOP_CLASS,    /* A900: the dataset does not match its request */
    SCP_REFUSED_UNDERSTAND,   /* C000: not parseable */
    SCP_REFUSED_UID_CONFLICT, /* A900: its series is stored in another study, or its SOP
                                 instance in another series */
    SCP_REFUSED_UNSUPPORTED,  /* 0122: the request's SOP class is not its presentation
                                 context's, or not a storage class */
    SCP_REFUSED_NKINDS
};

/* The metric label of r ("low_space", "disk_full", ...); static storage. */
const char *scp_refusal_name(enum scp_refusal r);
/* The kind of refusal a failed file operation's errno means. */
enum scp_refusal scp_refusal_from_errno(int err);
/* True for refusals that are the node's own trouble, not the peer's. */
int scp_refusal_is_local(enum scp_refusal r);

/* One received instance, valid during the store callback only. */
struct scp_received {
    const char *tmp_path;        /* complete, fsynced file with meta header */
    const struct scp_info *info; /* parsed and checked: UIDs valid, SOP class matches */
    int64_t file_size;
    const char *digest; /* SHA-256 of the dataset bytes as sent (64 hex digits) */
    const char *calling_ae;
    const char *peer_addr;
};

/* Called on an association's thread, possibly on several at once. Makes the
 * instance durable (or not) and returns a DIMSE status; on failure writes a
 * reason for the log and sets *why. The temporary file is removed afterwards
 * if it is still there. */
typedef unsigned (*scp_store_fn)(void *ud, const struct scp_received *r, enum scp_refusal *why,
                                 char *reason, size_t reason_len);
/* Called before a dataset is received; returns 0 when there is room, else
 * non-zero with a reason, and the dataset is read off the wire and answered
 * with A700 without touching the disk. */
typedef int (*scp_space_fn)(void *ud, char *reason, size_t reason_len);
/* Called on an association's thread after each C-STORE is answered (not for
 * a dataset the association lost), with the status, why it was refused
 * (SCP_REFUSED_NONE on success) and the reason that was logged. */
typedef void (*scp_outcome_fn)(void *ud, unsigned status, enum scp_refusal why, const char *reason);

struct scp_server_config {
    int port;
    const char *aetitle;
    int max_associations;
    int max_pdu;
    int acse_timeout;               /* seconds */
    int dimse_timeout;              /* seconds */
    int association_deadline;       /* seconds, whole association */
    int64_t max_instance_bytes;     /* a dataset larger than this is refused (A700) */
    const char *allowed_peers;      /* "AE[@host], ..."; NULL or "" allows anyone */
    const char *tmp_dir;            /* where datasets are received; same file system as the spool */
    int tls_port;                   /* 0: no TLS listener */
    const char *tls_cert, *tls_key; /* PEM files */
    const char *tls_ca;             /* PEM; when set, peers must present a certificate it signed */
    scp_store_fn store;
    scp_space_fn space;
    scp_outcome_fn outcome; /* may be NULL */
    void *ud;
};

struct scp_server;

/* Binds the port and starts accepting. On success the caller owns *out and
 * must call scp_server_stop(). Returns 0, or -1 with a message in err; no
 * thread is left running on failure. */
int scp_server_start(struct scp_server **out, const struct scp_server_config *cfg, char *err,
                     size_t errlen);

/* Replaces the calling-AE allowlist (on reload). Returns 0, or -1 when the
 * list cannot be parsed (the old one stays). */
int scp_server_set_allowed_peers(struct scp_server *s, const char *allowed, char *err,
                                 size_t errlen);

/* What the server has done since it started, for metrics. */
struct scp_counters {
    uint64_t associations_accepted;
    uint64_t rejected_called_ae, rejected_calling_peer, rejected_limit, rejected_no_context;
    uint64_t connections_failed; /* no usable A-ASSOCIATE-RQ (silent, closed, garbage, TLS) */
    uint64_t stored;             /* answered 0000 */
    uint64_t refused[SCP_REFUSED_NKINDS]; /* answered A700, A900, C000 or 0122, by why */
    uint64_t incomplete;                  /* the association broke while a dataset arrived */
};
void scp_server_counters(struct scp_server *s, struct scp_counters *out);

/* Number of associations in progress. */
int scp_server_active(struct scp_server *s);

/* Stops accepting at once, lets associations in progress finish for up to
 * grace_seconds, then aborts the rest, joins every thread and frees s.
 * NULL is a no-op. */
void scp_server_stop(struct scp_server *s, int grace_seconds);

#ifdef __cplusplus
}
#endif

#endif

/* Sending DICOM files to a peer with C-STORE (the SCU that delivers results
 * to PACS), with dcmtk behind a C API. One call opens one association,
 * stores the files in order and releases it; nothing is kept between calls.
 * Thread-safe: calls may run on any thread, one association each. */
#ifndef SCP_SEND_H
#define SCP_SEND_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Lets another thread cut sends short (the node's stop): scp_send_cut_short
 * shuts down the connection of the send in progress, if any, and that of
 * every later send as soon as it is made, so a wait on the peer (for the
 * association's acceptance, the TLS handshake, an answer) ends at once;
 * the files not answered are then SCP_SEND_STOPPED. The TCP connect itself
 * is dcmtk's alone and still waits up to timeout_s. Init before the first
 * send, destroy after the last. */
struct scp_send_cut {
    pthread_mutex_t mu;
    int guard; /* a copy of the connection's socket while a send has one, else -1 */
    bool cut;
};
void scp_send_cut_init(struct scp_send_cut *c);
void scp_send_cut_destroy(struct scp_send_cut *c);
void scp_send_cut_short(struct scp_send_cut *c);

/* Where to send. Strings are borrowed for the duration of the call. */
struct scp_send_dest {
    const char *calling_aet; /* our AE title */
    const char *called_aet;  /* the peer's */
    const char *host;
    int port;
    int timeout_s;        /* connect, ACSE and DIMSE timeouts */
    bool tls;             /* DICOM TLS (BCP 195 profile) */
    const char *tls_ca;   /* PEM file of trusted CAs; "" or NULL: the peer is not verified */
    const char *tls_cert; /* our client certificate (PEM), "" or NULL: none */
    const char *tls_key;
    struct scp_send_cut *cut; /* NULL: none */
};

/* What happened to one file. status is the C-STORE response status when
 * answered (0x0000 success, warnings as scp_send_status_ok, others failures),
 * else -1 with why in error (not sent: no association, no accepted
 * presentation context, unreadable file, network failure), or
 * SCP_SEND_STOPPED when the caller stopped the sending before it (or cut
 * it while the file waited for its answer: it may have reached the peer), or
 * SCP_SEND_UNSENT when the association ended (aborted, or an earlier
 * file's answer did not come in time) before it went out: nothing of it
 * reached the peer, and a new association may carry it. */
#define SCP_SEND_STOPPED (-2)
#define SCP_SEND_UNSENT (-3)
struct scp_send_file {
    const char *path; /* in: the file */
    int status;       /* out */
    char error[256];  /* out: "" on success */
};

/* Status 0x0000 and the warning statuses (PS3.7 C.1.2: 0001, 0107, 0116
 * and any Bxxx) mean the peer took the object. */
bool scp_send_status_ok(int status);

/* Called (on the calling thread) before each file goes out, the first
 * included, once the association is established. Returns false to send
 * nothing more (the node is stopping): that file and those after it are
 * not sent (status SCP_SEND_STOPPED), and the association is released. */
typedef bool (*scp_send_go_on_fn)(void *ud);

/* Called (on the calling thread) as soon as the peer answered files[i], so
 * that the caller can record the acknowledgement before the next file. */
typedef void (*scp_send_answered_fn)(void *ud, int i, const struct scp_send_file *f);

/* Opens an association to dest proposing each file's SOP class (its own
 * transfer syntax, then the uncompressed ones), stores files[0..n) in
 * order and releases. Returns 0 when the association was established (each
 * file's outcome is in files[i]; answered, if not NULL, was called for each
 * file the peer answered), -1 when it was not (rejected, refused, timed
 * out, TLS failure: why in err, every file's status -1). go_on and answered
 * may be NULL; ud is passed to both. Never throws. */
int scp_send_files(const struct scp_send_dest *dest, struct scp_send_file *files, int n,
                   scp_send_go_on_fn go_on, scp_send_answered_fn answered, void *ud, char *err,
                   size_t errlen);

#ifdef __cplusplus
}
#endif

#endif

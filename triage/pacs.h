/* Results to PACS: threads of its own (never the loop, never libuv's pool).
 * A builder turns each new study result into a Comprehensive SR and a
 * Secondary Capture (scp_sr.h, scp_sc.h) and queues one delivery per object
 * and destination in SQLite (db_outbox.h); one sender per destination sends
 * that destination's with C-STORE (scp_send.h), retrying with exponential
 * backoff up to a bound, so that a destination down or hanging delays no
 * other. The loop only kicks the builder when results are written. */
#ifndef TRIAGE_PACS_H
#define TRIAGE_PACS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TRIAGE_PACS_MAX_DESTS 16

/* One destination of pacs.destinations: [tls:]AET@host:port. */
struct triage_pacs_dest {
    char spec[160]; /* as written, the key of its deliveries */
    char aet[17], host[128];
    int port;
    bool tls;
};

/* Parses a comma-separated pacs.destinations value. Returns 0, or -1 with a
 * message naming the bad entry. */
int triage_pacs_parse_destinations(const char *list, struct triage_pacs_dest *out, int max, int *n,
                                   char *err, size_t errlen);

struct triage_pacs_config {
    const char *db_path, *store_dir; /* borrowed for triage_pacs_start only */
    const char *destinations;        /* pacs.destinations */
    bool send_all;                   /* pacs.send = all */
    const char *calling_aet;
    int timeout_s, max_attempts;
    int64_t retry_ms, max_retry_ms;
    const char *tls_ca, *tls_cert, *tls_key;
    const char *software_version;
};

struct triage_pacs;

/* Checks the configuration and starts the sender thread. The caller owns
 * *out and ends it with triage_pacs_stop(). Returns 0, or -1 with err. */
int triage_pacs_start(struct triage_pacs **out, const struct triage_pacs_config *c, char *err,
                      size_t errlen);
/* New results may be in the database (any thread; never blocks). NULL: no-op. */
void triage_pacs_kick(struct triage_pacs *p);
/* Asks the threads to stop after the associations in progress (one per
 * destination at most), without waiting. NULL: no-op. */
void triage_pacs_request_stop(struct triage_pacs *p);
/* Cuts the associations in progress short (the objects not answered wait
 * for the next start, no attempt used), joins the threads and frees p.
 * NULL: no-op. Returns how many senders it left in a TCP connect (pacs_stop_left_sender):
 * the process must then end without running static destructors (dcmtk's
 * dictionary), which such a thread may still use, i.e. with _exit. */
int triage_pacs_stop(struct triage_pacs *p);

struct db;
/* A revision each of whose deliveries is sent or dismissed needs its files
 * in <store_dir>/outbox/ no more: they are removed (those of a revision with
 * a delivery pending or given up stay, for it to be sent, retried or looked
 * at). Nothing makes such a revision's deliveries pending again, so this is
 * safe from any process while the node runs: the sender after an
 * acknowledgement, `ichtriage pacs dismiss` after a dismissal. A file that
 * cannot be removed is logged (event=pacs_cleanup_failed). Returns how many
 * were removed, or -1 when the database cannot be read. */
int triage_pacs_drop_files(struct db *db, const char *store_dir, int64_t revision_id);

#endif

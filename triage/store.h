/* The node's store: how a received instance becomes durable (spool file,
 * then index row) and how a crash's leftovers are cleaned at start-up.
 * Glue between scp/ (which receives) and db/ (which indexes). */
#ifndef TRIAGE_STORE_H
#define TRIAGE_STORE_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "db.h"
#include "scp.h"
#include "store_health.h"

struct triage_store {
    char dir[1024];   /* store.dir */
    char spool[1100]; /* <dir>/spool */
    char tmp[1200];   /* <dir>/spool/.tmp */
    struct db *db;
    int64_t min_free_bytes;
    /* Called after each instance is committed (from a receiving thread). */
    void (*on_stored)(void *ud);
    /* Called when stores start or stop failing (from a receiving thread). */
    void (*on_health)(void *ud);
    void *ud;
    atomic_bool low_space; /* last measure of free space, for status and logs */
    atomic_llong stored, refused;
    struct triage_store_health health; /* set up by triage_store_prepare */
};

/* Creates <dir>, <dir>/spool and <dir>/spool/.tmp (mode 0700, tightening
 * existing ones) and starts the store's health with failures kept for
 * window_seconds. Returns 0, or -1 with a message; on success the caller
 * ends with triage_store_finish(). */
int triage_store_prepare(struct triage_store *s, const char *dir, int64_t window_seconds, char *err,
                         size_t errlen);
void triage_store_finish(struct triage_store *s);

/* Takes <dir>/ichtriage.lock (an exclusive flock, held until the process
 * ends), so that a second node on the same store refuses to start instead
 * of cleaning up the files the first is receiving (and a restore refuses a
 * store a node runs on). The node calls it after triage_store_prepare(),
 * before triage_store_recover(). Returns 0, or -1 with a message. */
int triage_store_lock(const char *dir, char *err, size_t errlen);

/* Before the index is opened, when its file does not exist: refuses (-1
 * with a message) a spool that holds instance files. The index was lost
 * (deleted, moved aside), not the files, and every one of them may have
 * been acknowledged; no index is created, so every later start refuses
 * too. Returns 0 when the spool holds none. */
int triage_store_check_lost_index(struct triage_store *s, char *err, size_t errlen);
/* Start-up clean-up after a crash: removes every file in the temp folder
 * and every spool file that no index row points to (both were never
 * acknowledged); after a clean stop (triage_store_mark_clean) only the
 * temp folder. Counts go to the log. Returns 0, or -1 with a message. */
int triage_store_recover(struct triage_store *s, char *err, size_t errlen);
/* Marks a clean stop (call once every association has ended and the index
 * is closed): the next start then skips the check of every spool file
 * against the index, which only a crash can make necessary. */
void triage_store_mark_clean(struct triage_store *s);

/* Measures the spool's free space against min_free_bytes and sets
 * low_space (logging disk_low / disk_ok when it changes). The node calls it
 * on a timer as well as before each C-STORE, so that /healthz, the page and
 * STATUS= follow the disk both ways without a store arriving. Returns 0, 1
 * when low (why in reason), -1 when it cannot be measured (why in reason;
 * low_space unchanged). Any thread. */
int triage_store_measure_space(struct triage_store *s, char *reason, size_t reason_len);

/* scp_store_fn, scp_space_fn and scp_outcome_fn for scp_server_config
 * (ud = the store). */
unsigned triage_store_instance(void *ud, const struct scp_received *r, enum scp_refusal *why,
                               char *reason, size_t reason_len);
int triage_store_check_space(void *ud, char *reason, size_t reason_len);
void triage_store_outcome(void *ud, unsigned status, enum scp_refusal why, const char *reason);

#endif

/* db/: the durable outbound queue of results to PACS. A revision is one
 * result of a study to report (built once into an SR and an SC file); a
 * delivery is one of those files to one destination, with its attempts,
 * next attempt time and outcome. A delivery is marked sent only after the
 * peer acknowledged it, in its own commit, so a restart re-sends only what
 * was never acknowledged. These functions are for the sender thread's own
 * connection (db_open), except db_outbox_failed, db_outbox_counts,
 * db_outbox_by_destination, db_outbox_retry, db_outbox_dismiss and
 * db_outbox_revision_files_done, which any connection may call (the loop's:
 * web page, metrics, status; `ichtriage pacs`).
 *
 * States. A revision: pending (to be built), ready (built, its deliveries
 * queued), skipped (nothing to send), failed (its building given up),
 * dismissed (given up, then let go by an admin). A delivery: pending, sent,
 * failed (given up), dismissed (given up, then let go by an admin).
 * Dismissed is final: nothing sends, builds or retries it again, and it
 * counts as done for retention and for removing a revision's files. */
#ifndef DB_OUTBOX_H
#define DB_OUTBOX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "db.h"
#include "db_triage.h"

/* A study result to report: the result of the series that sets the study's
 * result, once that series is triaged, when it is not what the study's
 * newest revision (of any state) reports. A re-triage that moves the study's
 * result to another series, even back to one whose result an earlier
 * revision sent, so makes a new revision; an unchanged study none. */
struct db_outbox_new {
    int64_t study_id, series_id, result_at;
    bool flagged;
    /* An earlier revision of this study was built or is to be built: it
     * may reach PACS (or has), so this result must follow it there even
     * when not flagged (pacs.send = flagged). */
    bool sent_before;
};
/* Up to max of them, oldest first; *n is how many. Returns 0 or -1. */
int db_outbox_scan(struct db *db, struct db_outbox_new *out, int max, int *n);

/* Records a revision of the study's result: state "pending" (to be built and
 * sent) or "skipped" with reason. *id and *revision (1, 2, ... per study)
 * are set. Returns 0 or -1. */
int db_outbox_revision_add(struct db *db, const struct db_outbox_new *r, const char *state,
                           const char *reason, int64_t now_ms, int64_t *id, int *revision);

/* Revisions still to be built (state pending), oldest first. */
int db_outbox_pending(struct db *db, int64_t *ids, int max, int *n);

/* What building a revision needs: the result, its series and study, the
 * key slice's file and the per-slice probabilities. */
struct db_outbox_source {
    int64_t revision_id, study_id, series_id;
    int revision;
    char study_uid[65], series_uid[65];
    char model_version[160];
    float p[DB_LABELS];
    bool flagged;
    int key_index;
    char key_sop[65], key_sop_class[65], key_path[512]; /* key_path relative to store.dir */
    /* The key slice's frame in its instance, 0-based (as slice_results keeps
     * it), and that instance's NumberOfFrames (1 for a single-frame one). */
    int key_frame, key_frames;
    /* The key image's Pixel Spacing (row, column; mm), 0 when it has none
     * (an enhanced CT keeps it per frame): its picture's aspect. */
    double key_spacing[2];
    /* The SR of the latest earlier revision of this study that was built,
     * "" when none: the new SR replaces it. */
    char prev_sr_series_uid[65], prev_sr_sop_uid[65];
    int slices;   /* entries of the arrays below */
    float *p_any; /* per slice, in slice order; owned, db_outbox_source_free */
    char (*sop)[65];
    char (*sop_class)[65];
    int *frame;  /* 0-based, as key_frame */
    int *frames; /* NumberOfFrames of the slice's instance, as key_frames */
};
/* Fills *out (caller frees with db_outbox_source_free). Returns 0;
 * DB_OUTBOX_SUPERSEDED when the revision's result was replaced by a newer
 * one (a re-triage), or the study has a newer revision (its result moved to
 * another series); DB_OUTBOX_KEY_GONE when its key slice is no longer
 * indexed; -1 on error. */
#define DB_OUTBOX_SUPERSEDED 1
#define DB_OUTBOX_KEY_GONE 2
int db_outbox_source(struct db *db, int64_t revision_id, struct db_outbox_source *out);
void db_outbox_source_free(struct db_outbox_source *s);

/* One built object to send to one destination. */
struct db_outbox_object {
    const char *destination, *object, *file_path, *sop_uid;
};
/* In one transaction: the revision's deliveries (due now), its SR's UIDs
 * and its state "ready". Returns 0, or -1 with SQLite's message in err. */
int db_outbox_revision_ready(struct db *db, int64_t revision_id, const char *sr_series_uid,
                             const char *sr_sop_uid, const struct db_outbox_object *o, int n,
                             int64_t now_ms, char *err, size_t errlen);
/* The revision could not be built: state "failed" with reason, at now_ms. */
int db_outbox_revision_failed(struct db *db, int64_t revision_id, const char *reason,
                              int64_t now_ms);
/* A pending revision whose result was replaced before it was built: state
 * "skipped" (nothing to send, nothing failed; retention ignores it), and
 * revision 0, as only sent revisions are numbered. */
int db_outbox_revision_superseded(struct db *db, int64_t revision_id);

struct db_outbox_delivery {
    int64_t id, revision_id;
    char destination[160], object[8], file_path[512], sop_uid[65], study_uid[65];
    int attempts;
};
/* Pending deliveries to destination due at now_ms: those with fewer failed
 * attempts first, then oldest first. Those set for more than horizon_ms
 * (the longest backoff) after now_ms are due too: the wall clock went back
 * since they were set. Each destination has its own sender, which asks for
 * its own only. */
int db_outbox_due(struct db *db, const char *destination, int64_t now_ms, int64_t horizon_ms,
                  struct db_outbox_delivery *out, int max, int *n);
/* The earliest next attempt of a delivery pending to destination; 0 with
 * *found false when none is pending. */
int db_outbox_next_due(struct db *db, const char *destination, int64_t *at_ms, bool *found);

/* The peer acknowledged the delivery. */
int db_outbox_sent(struct db *db, int64_t id, int64_t now_ms);
/* When every delivery of the revision is sent or dismissed, its files
 * (relative paths, at most max) are no longer needed: *n of them are
 * written to paths. Once so, it stays so (neither state ever changes). */
int db_outbox_revision_files_done(struct db *db, int64_t revision_id, char (*paths)[512], int max,
                                  int *n);
/* An attempt failed: attempts + 1, the error kept; retried at next_at_ms, or
 * given up (state failed) when give_up. */
int db_outbox_attempt_failed(struct db *db, int64_t id, const char *error, int64_t now_ms,
                             int64_t next_at_ms, bool give_up);
/* Pending deliveries to destinations no longer configured are given up
 * (state failed). dests: the configured ones. *count: how many. */
int db_outbox_fail_unlisted(struct db *db, const char *const *dests, int ndests, int64_t now_ms,
                            int *count);

/* Deliveries given up, newest first (strings borrowed for the callback);
 * with them, revisions that could not be built: object "build", no
 * destination, attempts 0, last_attempt_ms when the result was queued. */
struct db_outbox_failure {
    const char *study_uid, *destination, *object, *sop_uid, *error;
    int revision, attempts;
    int64_t last_attempt_ms;
};
typedef int (*db_outbox_failure_fn)(void *ud, const struct db_outbox_failure *f);
int db_outbox_failed(struct db *db, int limit, db_outbox_failure_fn fn, void *ud);

/* Deliveries, and revisions that could not be built, given up at or after
 * since_ms (the page's banner). */
int db_outbox_failed_since(struct db *db, int64_t since_ms, int64_t *deliveries,
                           int64_t *revisions);

/* Deliveries by state; revisions_failed: results never built (given up);
 * revisions_pending: results waiting to be built; revisions_dismissed:
 * results never built, let go by an admin. */
struct db_outbox_counts {
    int64_t pending, sent, failed, dismissed;
    int64_t revisions_failed, revisions_pending, revisions_dismissed;
};
int db_outbox_counts(struct db *db, struct db_outbox_counts *out);
/* The same from the database file at path, opened read-only (`ichtriage
 * status`, possibly as another user); *present is false when the database
 * predates the outbox. Returns 0, or -1 with err. */
int db_outbox_counts_read(const char *path, struct db_outbox_counts *out, bool *present, char *err,
                          size_t errlen);

/* Deliveries by destination and state, up to max destinations in order
 * (`ichtriage pacs list`); *n is how many. Returns 0 or -1. */
struct db_outbox_destination {
    char destination[160];
    int64_t pending, sent, failed, dismissed;
};
int db_outbox_by_destination(struct db *db, struct db_outbox_destination *out, int max, int *n);

/* `ichtriage pacs retry`, from any connection, the node running or not: in
 * one transaction, deliveries given up go back to pending with no attempts,
 * due at now_ms, and revisions that could not be built back to pending (built
 * again); all of them, or (study_uid not NULL) that study's. Dismissed ones
 * stay dismissed. The sender finds
 * them at its next look at the queue. *deliveries and *revisions: how many.
 * Returns 0, or -1 with err (nothing changed). */
int db_outbox_retry(struct db *db, const char *study_uid, int64_t now_ms, int *deliveries,
                    int *revisions, char *err, size_t errlen);

/* One object or result given up that db_outbox_dismiss let go: object sr or
 * sc for a delivery; "build", destination "", for a result that could not
 * be built. */
struct db_outbox_dismissed {
    int64_t revision_id;
    int revision;
    char study_uid[65], destination[160], object[8], sop_uid[65];
};
/* `ichtriage pacs dismiss`, from any connection, the node running or not:
 * in one transaction, deliveries given up (failed) and revisions whose
 * building was given up become dismissed, each with an audit line (user,
 * action pacs_dismissed, its study, detail "revision=N destination=D
 * object=O"); all of them, or (study_uid not NULL) that study's. Pending
 * and sent rows are never touched: the sender no longer touches the rows
 * it changes. *out (n of them, by revision; the caller frees it with
 * free()) lists what was dismissed. Returns 0, or -1 with err (nothing
 * changed, *out NULL). */
int db_outbox_dismiss(struct db *db, const char *study_uid, const char *user, int64_t now_ms,
                      struct db_outbox_dismissed **out, int *n, char *err, size_t errlen);

#endif

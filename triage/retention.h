/* Retention: removes the spool files (and instance rows) of studies that
 * are old, triaged and delivered; never anything not yet triaged or
 * delivered, flagged and not yet reviewed, or being read; reviewed
 * studies, the retraining labels, stay longer. Runs on
 * the loop, a batch at a time: a few studies, so that a backlog (the first
 * run on an old store: thousands of files) holds the loop (HTTP, series
 * completion, the watchdog's heartbeat) for a few studies' unlinks at a
 * time, not for all of them; a full batch asks for the next soon. Off
 * unless store.retention_days is set. */
#ifndef TRIAGE_RETENTION_H
#define TRIAGE_RETENTION_H

#include <stdbool.h>
#include <stdint.h>

#include "db.h"

struct triage_retention {
    struct db *db; /* the loop's connection */
    const char *store_dir;
    int64_t keep_ms, keep_reviewed_ms; /* keep_ms 0: retention off */
    int64_t claim_ms;                  /* http.claim_minutes: a claim lapses after it */
    /* Studies kept past retention as last logged (retention_held), so
     * that the log says when they change, not every ten minutes. */
    int64_t held_flagged, held_reading;
    bool held_logged;
};

#define TRIAGE_RETENTION_BATCH 4

/* Purges up to TRIAGE_RETENTION_BATCH due studies; returns how many
 * studies, or -1. After the last batch of a backlog, logs
 * retention_held when the number of studies kept past retention (flagged
 * and not reviewed, being read) changed. */
int triage_retention_run(struct triage_retention *r, int64_t now_ms);

#endif

/* db/: retention, which studies' spool files may go and removing their rows. */
#ifndef DB_RETENTION_H
#define DB_RETENTION_H

#include <stdint.h>

#include "db.h"

/* A study opened (audit "opened") less than this long ago is being read:
 * the page records an opening once in 10 minutes, and on each update of
 * the open study. */
#define DB_RETENTION_OPENED_MS (3600 * 1000LL)

/* Up to max studies whose spool files may be removed at now_ms, oldest
 * first: last updated before now_ms - keep_ms; every series triaged or not
 * applicable (nothing waiting, triaging or failed); every PACS delivery of
 * theirs acknowledged or dismissed by an admin (`ichtriage pacs dismiss`;
 * nothing pending or given up); and, when a
 * radiologist reviewed it (its label for retraining), reviewed before
 * now_ms - keep_reviewed_ms. Not yet purged. Never one flagged and not
 * reviewed (it stays until it is read, however old), nor one being read:
 * claimed (a live claim: made or renewed less than claim_ms ago, as
 * db_claim_live), or opened less than DB_RETENTION_OPENED_MS ago. */
int db_retention_due(struct db *db, int64_t now_ms, int64_t keep_ms, int64_t keep_reviewed_ms,
                     int64_t claim_ms, int64_t *study_ids, int max, int *n);

#define DB_RETENTION_NOT_DUE (-2)

/* In one transaction: checks that the study is still due (as above, with
 * the same arguments), deletes its instance rows and marks it purged. Calls
 * fn(ud, file_path) for each removed row's file (relative to store.dir)
 * after the commit, so that the caller removes the files only once no row
 * points to them. Returns the number of rows; DB_RETENTION_NOT_DUE, having
 * changed nothing, when the study is no longer due (an instance arrived
 * since it was listed); or -1. */
int db_retention_purge(struct db *db, int64_t study_id, int64_t now_ms, int64_t keep_ms,
                       int64_t keep_reviewed_ms, int64_t claim_ms,
                       void (*fn)(void *ud, const char *file_path), void *ud);

/* Of the studies old, done with and delivered as above, how many are kept
 * all the same because they are flagged and not reviewed, and how many
 * (of the others) because they are being read. Returns 0 or -1. */
int db_retention_held(struct db *db, int64_t now_ms, int64_t keep_ms, int64_t keep_reviewed_ms,
                      int64_t claim_ms, int64_t *flagged_unread, int64_t *being_read);

#endif

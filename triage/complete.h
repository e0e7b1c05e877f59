/* Series completion and eligibility, on the libuv loop: a series is complete
 * after a quiet period without new instances, or at once when its expected
 * count (Images in Acquisition) is reached. A complete series becomes a job,
 * is marked "not applicable" with the reason, or — when exactly this content
 * was triaged before — keeps its result. All state is in SQLite, so a
 * restart resumes where it stopped. */
#ifndef TRIAGE_COMPLETE_H
#define TRIAGE_COMPLETE_H

#include <stdbool.h>
#include <stdint.h>

#include "db.h"

struct triage_completion {
    struct db *db; /* the loop's connection */
    int64_t quiet_ms;
    char head_patterns[512]; /* comma-separated, upper case */
    int min_slices;
    double max_tilt_deg;
};

/* Decides every series that is due at now_ms. Returns the number of series
 * decided (>= 0: a job, not applicable, or an earlier result kept; each
 * changes its study's status), *queued of them with a job; or -1 when the
 * database failed (logged). */
int triage_completion_tick(struct triage_completion *c, int64_t now_ms, int *queued);

/* True when any pattern of the comma-separated list (upper case; blanks
 * around each are not part of it: "HEAD, BRAIN") occurs in text, in any
 * case. triage.head_patterns against body part and descriptions. */
bool triage_patterns_match(const char *patterns, const char *text);

/* The content key of a series: its instance count and a hash over the SOP
 * Instance UIDs and their datasets' digests (the file size where no digest
 * was recorded), as 33 characters at most. digests may be NULL. */
void triage_content_key(const char *const *sops, const char *const *digests, const int64_t *sizes,
                        int n, char out[33]);

#endif

/* db/: series completion, triage jobs, results and the worklist. The loop
 * thread decides completion and eligibility; the inference thread claims
 * jobs and writes results, each on its own connection (db_open). */
#ifndef DB_TRIAGE_H
#define DB_TRIAGE_H

#include <stdbool.h>
#include <stdint.h>

#include "db.h"

/* any, epidural, intraparenchymal, intraventricular, subarachnoid, subdural */
#define DB_LABELS 6

/* Series still receiving whose quiet period is over (last instance at or
 * before now_ms - quiet_ms) or that hold exactly their expected count (Images
 * in Acquisition) and never held more: once past it (a series of several
 * acquisitions) only the quiet period completes, not every further instance
 * nor a later acquisition's larger count reached part-way. Writes up to max
 * ids; *n is how many. */
int db_series_due(struct db *db, int64_t now_ms, int64_t quiet_ms, int64_t *ids, int max, int *n);

struct db_series_info {
    int64_t id, study_id;
    char series_uid[65], study_uid[65];
    char modality[17], body_part[17], series_desc[65], study_desc[65];
    char state[16], content_key[33];
    int instance_count;
    int64_t last_instance_at_ms;
    bool has_result;
    char result_key[33]; /* content_key of the stored result, "" when none */
};
int db_series_info(struct db *db, int64_t series_id, struct db_series_info *out);

/* What completion needs of each instance of a series. */
struct db_instance_brief {
    char sop_uid[65], sop_class[65], image_type[129];
    char file_path[512];
    int64_t file_size;
    char content_digest[65]; /* "" for instances stored before schema 8 */
    int frames;
    bool has_orientation;
    double orientation[6];
};
/* All instances of a series, ordered by SOP Instance UID. Caller frees *out
 * with free(). Returns 0 or -1. */
int db_series_instances(struct db *db, int64_t series_id, struct db_instance_brief **out, int *n);

/* Records the decision on a complete series in one transaction: its state
 * ("waiting" with a new job, "not_applicable", or "triaged" when this very
 * content was already triaged), the reason shown to users and the content
 * key; queued jobs of other content are superseded; then the study's status.
 * seen is what the decision was made on (db_series_info, read before the
 * instances): when the series got or replaced an instance since, nothing is
 * written and it stays receiving, to be decided again. Returns 0 when
 * decided, 1 when the series changed, -1 with err. */
int db_series_decide(struct db *db, const struct db_series_info *seen, const char *state,
                     const char *reason, const char *content_key, int64_t now_ms, char *err,
                     size_t errlen);

/* Running jobs are queued again: at start-up, those a crash left; during
 * a run, the one whose end the inference thread could not write. With
 * max_stops > 0 (at start-up) each counts one more stop of the node while it
 * ran, and one at max_stops fails with its series (a job that brings the
 * node down would else be claimed first after every restart). *count: jobs
 * queued again; *failed: jobs failed. Returns 0 or -1. */
int db_jobs_requeue(struct db *db, int max_stops, int64_t now_ms, int *count, int *failed);

struct db_job {
    int64_t id, series_id;
    char content_key[33];
};
/* Takes the oldest queued job for its series' current content (state
 * running, series triaging); a job whose series is receiving again waits for
 * the new decision, one for content since replaced is superseded. Returns 1
 * with *job set, 0 when there is none, -1 on error. */
int db_job_claim(struct db *db, int64_t now_ms, struct db_job *job);

/* Relative file paths of a series' instances. *paths is one allocation the
 * caller frees with free(). */
int db_series_files(struct db *db, int64_t series_id, char ***paths, int *n);

struct db_slice_result {
    const char *sop_uid;
    int frame;
    float p[DB_LABELS];
};
struct db_result {
    const char *model_version;
    float p[DB_LABELS]; /* per label, the highest over the slices */
    bool flagged;
    int slices, key_index;
    const char *key_sop;
    const char *note;
    double ms_pixels, ms_model, ms_total;
    const struct db_slice_result *per_slice; /* slices entries */
};
/* Ends a job: with res, stores the result (replacing an earlier one) and
 * marks the series triaged unless new instances re-opened it meanwhile (the
 * result then has no content key, and the series is decided again, even
 * one decided meanwhile to keep the result just replaced); without res, the
 * job and series fail with error, or with not_applicable the job is done
 * and the series not applicable for that reason (its slices turned out not
 * axial: an enhanced CT's orientation is read with its frames). Then the
 * study's status. Returns 0 or -1 with err. */
int db_job_finish(struct db *db, const struct db_job *job, const struct db_result *res,
                  const char *error, bool not_applicable, int64_t now_ms, char *err, size_t errlen);

/* One row of the worklist (strings borrowed for the callback only). */
struct db_worklist_row {
    const char *study_uid, *series_uid, *accession, *patient_id, *patient_name, *study_desc;
    const char *status, *status_reason, *model_version;
    const char *specific_charset; /* of patient_name and study_desc, as stored */
    int64_t received_at_ms, updated_at_ms;
    int slices;           /* of the series that set the result; else of the study */
    bool has_probability; /* false until triaged */
    double probability;
    double subtypes[DB_LABELS - 1];
    bool flagged;
    int result_updates; /* times the result changed after the first */
    /* When retention removed the study's files (its images): 0 while they
     * are kept. The row, results and reviews stay. */
    int64_t purged_at_ms;
    /* StudyDate and StudyTime as stored (DA, TM: the scanner's local time). */
    const char *study_date, *study_time;
};
typedef int (*db_worklist_fn)(void *ud, const struct db_worklist_row *row);
/* Calls fn for each study in worklist order (see design.md): flagged and
 * unreviewed by probability then age; not yet triaged or failed by age;
 * triaged by probability; not applicable. status NULL: the open list, every
 * status but reviewed, less what its age window leaves out: with since_ms
 * > 0, the studies that need no action (triaged and not flagged, not
 * applicable) that last changed (updated_at: an instance received, a result
 * stored) before since_ms. A flagged study, or one not
 * yet known (received, waiting, triaging, failed), stays whatever its age.
 * Else only that status, every study of it (since_ms is ignored). fn
 * returning non-zero stops. */
int db_worklist(struct db *db, const char *status, int64_t since_ms, db_worklist_fn fn, void *ud);

/* What the open list's age window (since_ms, as for db_worklist) leaves out,
 * by status; and next_ms, the earliest last change among the studies it keeps
 * that it would leave out once since_ms passes it (0: none): the list
 * changes then without any study changing. */
struct db_worklist_hidden {
    int64_t triaged, not_applicable;
    int64_t next_ms;
};
/* Fills out (all 0 when since_ms <= 0). Returns 0 or -1. */
int db_worklist_hidden(struct db *db, int64_t since_ms, struct db_worklist_hidden *out);

#endif

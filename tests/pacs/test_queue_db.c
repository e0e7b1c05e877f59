/* The outbox queue and retention at the database level, on a real SQLite
 * file: the interleavings that the node produces only by timing (an
 * instance committed between retention's listing and its purge, a result
 * replaced before its revision is built) are made here in order. */
#include <criterion/criterion.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "db.h"
#include "db_internal.h"
#include "db_outbox.h"
#include "db_retention.h"
#include "pacs.h"

#define DAY 86400000LL
#define CLAIM_MS (30 * 60000LL) /* http.claim_minutes' default */

static char dir[128], path[200];
static struct db *db;

static void setup(void)
{
    char err[256];
    snprintf(dir, sizeof dir, "/tmp/ichtriage-queue-db.XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/t.db", dir);
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
}

static void teardown(void)
{
    db_close(db);
    char cmd[200];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_expect_eq(system(cmd), 0);
}

/* Runs SQL on a second connection to the same file. */
static void sql(const char *q)
{
    sqlite3 *c;
    cr_assert_eq(sqlite3_open(path, &c), SQLITE_OK);
    char *msg = NULL;
    cr_assert_eq(sqlite3_exec(c, q, NULL, NULL, &msg), SQLITE_OK, "%s: %s", q, msg);
    sqlite3_close(c);
}

static int64_t count(const char *q)
{
    sqlite3 *c;
    sqlite3_stmt *st;
    cr_assert_eq(sqlite3_open(path, &c), SQLITE_OK);
    cr_assert_eq(sqlite3_prepare_v2(c, q, -1, &st, NULL), SQLITE_OK, "%s", q);
    cr_assert_eq(sqlite3_step(st), SQLITE_ROW);
    int64_t v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    sqlite3_close(c);
    return v;
}

/* An instance sop of series (of study 1.2.3) received at time at. */
static void put_in(const char *series, const char *sop, int64_t at)
{
    char rel[128], old[512], err[512];
    snprintf(rel, sizeof rel, "spool/1.2.3/%s/%s.dcm", series, sop);
    struct db_instance in = {.patient_id = "P1",
                             .study_uid = "1.2.3",
                             .series_uid = series,
                             .modality = "CT",
                             .series_number = 1,
                             .sop_uid = sop,
                             .sop_class = "1.2.840.10008.5.1.4.1.1.2",
                             .instance_number = 1,
                             .rows = 64,
                             .columns = 64,
                             .number_of_frames = 1,
                             .has_pixel_spacing = true,
                             .pixel_spacing = {0.5, 0.25},
                             .rescale_slope = 1,
                             .file_path = rel,
                             .file_size = 10,
                             .received_at_ms = at};
    cr_assert_eq(db_instance_put(db, &in, old, sizeof old, err, sizeof err), 0, "%s", err);
}

static void put(const char *sop, int64_t at)
{
    put_in("1.2.3.4", sop, at);
}

/* The series' result (one row per series, replaced by a re-triage) at
 * time at, flagged or not, with a key slice 1.2.3.4.1. */
static void result(int64_t at, bool flagged)
{
    char q[700];
    snprintf(q, sizeof q,
             "INSERT OR REPLACE INTO results (series_ref, content_key, model_version, p_any,"
             " p_epidural, p_intraparenchymal, p_intraventricular, p_subarachnoid, p_subdural,"
             " flagged, slices, key_index, key_sop, created_at) VALUES (1, 'k', 'm', 0.9, 0, 0,"
             " 0, 0, 0, %d, 1, 0, '1.2.3.4.1', %lld);"
             "UPDATE series SET state = 'triaged';"
             "UPDATE studies SET result_series_ref = 1, updated_at = %lld;",
             flagged, (long long)at, (long long)at);
    sql(q);
}

/* Runs the real sender thread on the database until the count query done
 * answers non-zero (10 s at most). The destination listens nowhere. */
static void run_sender_until(const char *done, bool send_all, int max_attempts)
{
    struct triage_pacs_config c = {.db_path = path,
                                   .store_dir = dir,
                                   .destinations = "PACS@127.0.0.1:9",
                                   .send_all = send_all,
                                   .calling_aet = "ICHTRIAGE",
                                   .timeout_s = 1,
                                   .max_attempts = max_attempts,
                                   .retry_ms = 60000,
                                   .max_retry_ms = 60000};
    struct triage_pacs *p;
    char err[256];
    cr_assert_eq(triage_pacs_start(&p, &c, err, sizeof err), 0, "%s", err);
    for (int i = 0; i < 100 && count(done) == 0; i++)
        usleep(100000);
    triage_pacs_stop(p);
}

static void record_path(void *ud, const char *file_path)
{
    (void)file_path;
    (*(int *)ud)++;
}

Test(retention, instance_committed_after_listing_keeps_the_study, .init = setup, .fini = teardown)
{
    const int64_t now = 100 * DAY, keep = 30 * DAY, keep_reviewed = 365 * DAY;
    put("1.2.3.4.1", 10 * DAY);
    sql("UPDATE series SET state = 'triaged'");
    sql("UPDATE studies SET updated_at = 864000000");
    int64_t ids[4];
    int n = 0;
    cr_assert_eq(db_retention_due(db, now, keep, keep_reviewed, CLAIM_MS, ids, 4, &n), 0);
    cr_assert_eq(n, 1);
    /* A late instance of the study, committed (and so acknowledged) now. */
    put("1.2.3.4.2", now);
    int removed = 0;
    cr_expect_eq(
        db_retention_purge(db, ids[0], now, keep, keep_reviewed, CLAIM_MS, record_path, &removed),
        DB_RETENTION_NOT_DUE);
    cr_expect_eq(removed, 0);
    cr_expect_eq(count("SELECT count(*) FROM instances"), 2);
    cr_expect_eq(count("SELECT count(*) FROM studies WHERE purged_at IS NOT NULL"), 0);
    /* Once triaged and old again it goes, every instance with it. */
    sql("UPDATE series SET state = 'triaged'");
    cr_expect_eq(db_retention_purge(db, ids[0], now + 40 * DAY, keep, keep_reviewed, CLAIM_MS,
                                    record_path, &removed),
                 2);
    cr_expect_eq(removed, 2);
    cr_expect_eq(count("SELECT count(*) FROM instances"), 0);
    cr_expect_eq(count("SELECT count(*) FROM studies WHERE purged_at IS NOT NULL"), 1);
}

/* A scanner sends a purged study again: its new instances are kept by the
 * same rule as any others, so the study is due again once they are old. */
Test(retention, study_received_again_after_its_purge_is_due_again, .init = setup, .fini = teardown)
{
    const int64_t keep = 30 * DAY, keep_reviewed = 365 * DAY;
    put("1.2.3.4.1", 10 * DAY);
    sql("UPDATE series SET state = 'triaged'");
    sql("UPDATE studies SET updated_at = 864000000");
    int removed = 0;
    cr_assert_eq(
        db_retention_purge(db, 1, 100 * DAY, keep, keep_reviewed, CLAIM_MS, record_path, &removed),
        1);
    put("1.2.3.4.2", 200 * DAY);
    cr_expect_eq(count("SELECT count(*) FROM studies WHERE purged_at IS NOT NULL"), 0);
    sql("UPDATE series SET state = 'triaged'");
    int64_t ids[4];
    int n = 0;
    cr_assert_eq(
        db_retention_due(db, 200 * DAY + keep / 2, keep, keep_reviewed, CLAIM_MS, ids, 4, &n), 0);
    cr_expect_eq(n, 0, "kept for its own window");
    cr_assert_eq(
        db_retention_due(db, 200 * DAY + keep + DAY, keep, keep_reviewed, CLAIM_MS, ids, 4, &n), 0);
    cr_assert_eq(n, 1);
    cr_expect_eq(db_retention_purge(db, ids[0], 200 * DAY + keep + DAY, keep, keep_reviewed,
                                    CLAIM_MS, record_path, &removed),
                 1);
    cr_expect_eq(removed, 2);
    cr_expect_eq(count("SELECT count(*) FROM instances"), 0);
}

static int due_now(int64_t now, int64_t keep, int64_t keep_reviewed)
{
    int64_t ids[4];
    int n = -1;
    cr_assert_eq(db_retention_due(db, now, keep, keep_reviewed, CLAIM_MS, ids, 4, &n), 0);
    return n;
}

/* A flagged study nobody has read keeps its files, however old, also when
 * it is back on the list after a review (a later series); so does a study
 * being read: claimed (a claim not lapsed), or opened in the last hour. db_retention_held
 * counts them. */
Test(retention, flagged_unread_and_being_read_studies_stay, .init = setup, .fini = teardown)
{
    const int64_t now = 100 * DAY, keep = 30 * DAY, keep_reviewed = 0;
    int64_t flagged = -1, reading = -1;
    put("1.2.3.4.1", 10 * DAY);
    sql("UPDATE series SET state = 'triaged';"
        "UPDATE studies SET updated_at = 864000000, status = 'triaged', flagged = 1");
    cr_expect_eq(due_now(now, keep, keep_reviewed), 0, "a flagged, unread study went");
    cr_assert_eq(db_retention_held(db, now, keep, keep_reviewed, CLAIM_MS, &flagged, &reading), 0);
    cr_expect_eq(flagged, 1);
    cr_expect_eq(reading, 0);
    int removed = 0;
    cr_expect_eq(
        db_retention_purge(db, 1, now, keep, keep_reviewed, CLAIM_MS, record_path, &removed),
        DB_RETENTION_NOT_DUE);
    /* reviewed once, then a later series made it unread again */
    sql("UPDATE studies SET reviewed_at = 864000000");
    cr_expect_eq(due_now(now, keep, keep_reviewed), 0);
    sql("UPDATE studies SET status = 'reviewed'");
    cr_expect_eq(due_now(now, keep, keep_reviewed), 1);

    char q[200];
    snprintf(q, sizeof q,
             "INSERT INTO claims (study_ref, reader, claimed_at) VALUES (1, 'alice', %lld)",
             (long long)(now - CLAIM_MS / 2));
    sql(q);
    cr_expect_eq(due_now(now, keep, keep_reviewed), 0, "a claimed study went");
    cr_assert_eq(db_retention_held(db, now, keep, keep_reviewed, CLAIM_MS, &flagged, &reading), 0);
    cr_expect_eq(flagged, 0);
    cr_expect_eq(reading, 1);
    /* A claim lapses (its reader went home): it keeps nothing. */
    cr_expect_eq(due_now(now + CLAIM_MS / 2, keep, keep_reviewed), 1, "a lapsed claim kept it");
    cr_assert_eq(db_retention_held(db, now + CLAIM_MS / 2, keep, keep_reviewed, CLAIM_MS, &flagged,
                                   &reading),
                 0);
    cr_expect_eq(reading, 0);
    sql("DELETE FROM claims");
    snprintf(q, sizeof q,
             "INSERT INTO audit (at, user, action, study_uid) VALUES (%lld, 'bob', 'opened',"
             " '1.2.3')",
             (long long)(now - DB_RETENTION_OPENED_MS / 2));
    sql(q);
    cr_expect_eq(due_now(now, keep, keep_reviewed), 0, "a study opened half an hour ago went");
    cr_expect_eq(due_now(now + DB_RETENTION_OPENED_MS, keep, keep_reviewed), 1);
    cr_expect_eq(db_retention_purge(db, 1, now + DB_RETENTION_OPENED_MS, keep, keep_reviewed,
                                    CLAIM_MS, record_path, &removed),
                 1);
    cr_assert_eq(db_retention_held(db, now, keep, keep_reviewed, CLAIM_MS, &flagged, &reading), 0);
    cr_expect_eq(flagged + reading, 0);
}

/* The plan of the listing, one line per step. */
static void listing_plan(char *plan, size_t n)
{
    char q[2100] = "EXPLAIN QUERY PLAN ";
    db_retention_due_sql(q + strlen(q), sizeof q - strlen(q));
    sqlite3 *c;
    sqlite3_stmt *st;
    cr_assert_eq(sqlite3_open(path, &c), SQLITE_OK);
    cr_assert_eq(sqlite3_prepare_v2(c, q, -1, &st, NULL), SQLITE_OK, "%s", sqlite3_errmsg(c));
    size_t off = 0;
    plan[0] = 0;
    while (sqlite3_step(st) == SQLITE_ROW && off < n)
        off += (size_t)snprintf(plan + off, n - off, "%s\n", sqlite3_column_text(st, 3));
    sqlite3_finalize(st);
    sqlite3_close(c);
}

/* Schema 14: the listing goes by the studies not yet purged in the order it
 * wants (studies_retention), also in a database made at 13, instead of
 * reading and sorting every study not yet purged for each batch of 4. */
Test(retention, listing_goes_by_the_index_of_studies_not_purged, .init = setup, .fini = teardown)
{
    char plan[2000], err[256];
    listing_plan(plan, sizeof plan);
    cr_expect(strstr(plan, "SEARCH st USING INDEX studies_retention (updated_at<?)") != NULL, "%s",
              plan);
    cr_expect(strstr(plan, "TEMP B-TREE") == NULL, "%s", plan);
    db_close(db);
    sql("DROP INDEX studies_retention; DROP INDEX studies_open; PRAGMA user_version = 13");
    listing_plan(plan, sizeof plan);
    cr_assert(strstr(plan, "SCAN st") != NULL, "%s", plan); /* what 13 did */
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    cr_expect_eq(count("PRAGMA user_version"), db_schema_version());
    listing_plan(plan, sizeof plan);
    cr_expect(strstr(plan, "SEARCH st USING INDEX studies_retention (updated_at<?)") != NULL, "%s",
              plan);
    cr_expect(strstr(plan, "TEMP B-TREE") == NULL, "%s", plan);
}

/* A flagged result of the study at time at, queued: a revision pending. */
static int64_t flagged_result_queued(int64_t at)
{
    result(at, true);
    struct db_outbox_new f[4];
    int n = 0, rev;
    int64_t id;
    cr_assert_eq(db_outbox_scan(db, f, 4, &n), 0);
    cr_assert_eq(n, 1);
    cr_assert_eq(db_outbox_revision_add(db, &f[0], "pending", "", at, &id, &rev), 0);
    return id;
}

/* The study's first result (flagged, at 1000) queued: revision 1 pending. */
static int64_t flagged_revision_pending(void)
{
    put("1.2.3.4.1", 1000);
    return flagged_result_queued(1000);
}

Test(outbox, revision_superseded_before_built_is_skipped_not_failed, .init = setup,
     .fini = teardown)
{
    int64_t id1 = flagged_revision_pending();
    result(2000, true); /* re-triaged before the sender built revision 1 */
    char q[200];
    snprintf(q, sizeof q,
             "SELECT count(*) FROM pacs_revisions WHERE id = %lld AND state != 'pending'",
             (long long)id1);
    run_sender_until(q, true, 3);
    snprintf(q, sizeof q,
             "SELECT count(*) FROM pacs_revisions WHERE id = %lld AND state = 'skipped'"
             " AND revision = 0 AND reason LIKE '%%superseded%%'",
             (long long)id1);
    cr_expect_eq(count(q), 1);
    /* Nothing of it keeps the study from retention once the newer result
     * is dealt with (here: the newer revision's rows removed). */
    snprintf(q, sizeof q,
             "DELETE FROM pacs_deliveries; DELETE FROM pacs_revisions WHERE id != %lld",
             (long long)id1);
    sql(q);
    int64_t ids[4];
    int n = 0;
    cr_assert_eq(db_retention_due(db, 1000 * DAY, 30 * DAY, 365 * DAY, CLAIM_MS, ids, 4, &n), 0);
    cr_expect_eq(n, 1);
}

/* An earlier flagged revision that may reach PACS: built, its deliveries
 * waiting (PACS down). */
static int64_t flagged_revision_waiting(void)
{
    int64_t id1 = flagged_revision_pending();
    struct db_outbox_object o[2] = {{"PACS@127.0.0.1:9", "sr", "outbox/1-sr.dcm", "9.1"},
                                    {"PACS@127.0.0.1:9", "sc", "outbox/1-sc.dcm", "9.2"}};
    char err[256];
    cr_assert_eq(db_outbox_revision_ready(db, id1, "9.0", "9.1", o, 2, 1000, err, sizeof err), 0,
                 "%s", err);
    /* retried in 30 s: within the sender's longest backoff (run_sender_until) */
    sql("UPDATE pacs_deliveries SET next_attempt_at = strftime('%s', 'now') * 1000 + 30000");
    return id1;
}

/* Deliveries that cannot be queued (here the same object twice to one
 * destination, as a destination listed twice made them) leave the revision
 * pending with nothing queued, and say why: the log had said only "cannot
 * queue the deliveries". */
Test(outbox, deliveries_that_cannot_be_queued_say_why, .init = setup, .fini = teardown)
{
    int64_t id1 = flagged_revision_pending();
    struct db_outbox_object o[2] = {{"PACS@127.0.0.1:9", "sr", "outbox/1-sr.dcm", "9.1"},
                                    {"PACS@127.0.0.1:9", "sr", "outbox/1-sr.dcm", "9.1"}};
    char err[256] = "";
    cr_assert_eq(db_outbox_revision_ready(db, id1, "9.0", "9.1", o, 2, 1000, err, sizeof err), -1);
    cr_expect(strstr(err, "UNIQUE") != NULL, "%s", err);
    cr_expect_eq(count("SELECT count(*) FROM pacs_deliveries"), 0);
    cr_expect_eq(count("SELECT count(*) FROM pacs_revisions WHERE state = 'pending'"), 1);
}

Test(outbox, send_flagged_sends_the_correction_of_a_waiting_flagged_revision, .init = setup,
     .fini = teardown)
{
    flagged_revision_waiting();
    result(2000, false); /* late images: re-triaged, no longer flagged */
    run_sender_until("SELECT count(*) FROM pacs_revisions WHERE result_at = 2000", false, 3);
    cr_expect_eq(count("SELECT count(*) FROM pacs_revisions WHERE result_at = 2000"
                       " AND state != 'skipped'"),
                 1);
}

Test(outbox, send_flagged_skips_a_not_flagged_result_with_nothing_before, .init = setup,
     .fini = teardown)
{
    put("1.2.3.4.1", 1000);
    result(1000, false);
    run_sender_until("SELECT count(*) FROM pacs_revisions", false, 3);
    cr_expect_eq(count("SELECT count(*) FROM pacs_revisions WHERE state = 'skipped'"), 1);
}

static int list_failure(void *ud, const struct db_outbox_failure *f)
{
    if (strcmp(f->object, "build") == 0 && strstr(f->error, "cannot read")) (*(int *)ud)++;
    return 0;
}

Test(outbox, revision_that_cannot_be_built_is_given_up_and_listed, .init = setup, .fini = teardown)
{
    /* The key slice is indexed but its file is not there: every attempt
     * fails; with pacs.max_attempts = 1 the first one gives up. */
    int64_t id1 = flagged_revision_pending();
    char q[200];
    snprintf(q, sizeof q,
             "SELECT count(*) FROM pacs_revisions WHERE id = %lld AND state = 'failed'",
             (long long)id1);
    run_sender_until(q, true, 1);
    cr_assert_eq(count(q), 1);
    int listed = 0;
    cr_assert_eq(db_outbox_failed(db, 10, list_failure, &listed), 0);
    cr_expect_eq(listed, 1);
    cr_expect_eq(count("SELECT count(*) FROM pacs_deliveries"), 0);
    /* Counted for the banner (a day) and the metrics. */
    int64_t deliveries = -1, revisions = -1;
    cr_assert_eq(db_outbox_failed_since(db, 0, &deliveries, &revisions), 0);
    cr_expect_eq(deliveries, 0);
    cr_expect_eq(revisions, 1);
    struct db_outbox_counts c;
    cr_assert_eq(db_outbox_counts(db, &c), 0);
    cr_expect_eq(c.revisions_failed, 1);
}

/* `ichtriage pacs retry`: what was given up (two deliveries of revision 1,
 * revision 2's build) goes back in the queue with fresh attempts, due now;
 * another study's retry, or a second one, changes nothing. Given up, they
 * had stayed so for ever, and kept their study from retention. */
Test(outbox, retry_puts_back_what_was_given_up, .init = setup, .fini = teardown)
{
    flagged_revision_waiting();
    for (int64_t id = 1; id <= 2; id++)
        cr_assert_eq(db_outbox_attempt_failed(db, id, "C-STORE status 0xA700", 2000, 3000, true),
                     0);
    int64_t id2 = flagged_result_queued(4000);
    cr_assert_eq(db_outbox_revision_failed(db, id2, "cannot write outbox/2-sr.dcm", 5000), 0);

    int deliveries = -1, revisions = -1;
    char err[256] = "";
    cr_assert_eq(db_outbox_retry(db, "9.9.9", 6000, &deliveries, &revisions, err, sizeof err), 0,
                 "%s", err);
    cr_expect_eq(deliveries + revisions, 0);
    cr_assert_eq(db_outbox_retry(db, "1.2.3", 6000, &deliveries, &revisions, err, sizeof err), 0,
                 "%s", err);
    cr_expect_eq(deliveries, 2);
    cr_expect_eq(revisions, 1);
    cr_expect_eq(count("SELECT count(*) FROM pacs_deliveries WHERE state = 'pending'"
                       " AND attempts = 0 AND next_attempt_at = 6000"
                       " AND last_error = 'C-STORE status 0xA700'"),
                 2);
    cr_expect_eq(count("SELECT count(*) FROM pacs_revisions WHERE state = 'pending'"
                       " AND failed_at IS NULL AND reason = ''"),
                 1);
    struct db_outbox_delivery due[4];
    int n = 0;
    cr_assert_eq(db_outbox_due(db, "PACS@127.0.0.1:9", 6000, 60000, due, 4, &n), 0);
    cr_expect_eq(n, 2);
    cr_assert_eq(db_outbox_retry(db, NULL, 7000, &deliveries, &revisions, err, sizeof err), 0);
    cr_expect_eq(deliveries + revisions, 0);
    struct db_outbox_counts c;
    cr_assert_eq(db_outbox_counts(db, &c), 0);
    cr_expect_eq(c.failed + c.revisions_failed, 0);
    cr_expect_eq(c.pending, 2);
    cr_expect_eq(c.revisions_pending, 1);
}

/* What can never be delivered (a destination removed from the config, a
 * key slice no longer indexed) is let go by an admin: only what was given
 * up, each with an audit line; the files of a revision with nothing left to
 * send may go, its study is done with for retention, and retry leaves it
 * dismissed. A given-up row had kept its study and its files for ever. */
Test(outbox, dismiss_lets_go_of_what_was_given_up, .init = setup, .fini = teardown)
{
    const int64_t now = 1000 * DAY, keep = 30 * DAY, keep_reviewed = 365 * DAY;
    int64_t id1 = flagged_revision_pending();
    struct db_outbox_object o[3] = {{"GONE@127.0.0.1:9", "sr", "outbox/1-sr.dcm", "9.1"},
                                    {"GONE@127.0.0.1:9", "sc", "outbox/1-sc.dcm", "9.2"},
                                    {"PACS@127.0.0.1:9", "sr", "outbox/1-sr.dcm", "9.1"}};
    char err[256] = "";
    cr_assert_eq(db_outbox_revision_ready(db, id1, "9.0", "9.1", o, 3, 1000, err, sizeof err), 0,
                 "%s", err);
    /* GONE's SR given up, its SC still being tried; PACS has its SR. */
    cr_assert_eq(
        db_outbox_attempt_failed(db, 1, "destination no longer configured", 2000, 2000, true), 0);
    cr_assert_eq(db_outbox_sent(db, 3, 2000), 0);
    cr_expect_eq(due_now(now, keep, keep_reviewed), 0);

    struct db_outbox_dismissed *d = NULL;
    int n = -1;
    cr_assert_eq(db_outbox_dismiss(db, "1.2.3", "alice", 3000, &d, &n, err, sizeof err), 0, "%s",
                 err);
    cr_assert_eq(n, 1);
    cr_expect_eq(d[0].revision_id, id1);
    cr_expect_eq(d[0].revision, 1);
    cr_expect_str_eq(d[0].study_uid, "1.2.3");
    cr_expect_str_eq(d[0].destination, "GONE@127.0.0.1:9");
    cr_expect_str_eq(d[0].object, "sr");
    free(d);
    cr_expect_eq(count("SELECT count(*) FROM pacs_deliveries WHERE (id = 1 AND state = 'dismissed')"
                       " OR (id = 2 AND state = 'pending') OR (id = 3 AND state = 'sent')"),
                 3, "only what was given up is dismissed");
    char paths[4][512];
    int np = -1;
    cr_assert_eq(db_outbox_revision_files_done(db, id1, paths, 4, &np), 0);
    cr_expect_eq(np, 0, "its SC still pending: the files stay");
    cr_expect_eq(due_now(now, keep, keep_reviewed), 0, "still something pending");

    /* The SC is given up too, and a later result of the study could not be
     * built (its key slice gone). */
    cr_assert_eq(
        db_outbox_attempt_failed(db, 2, "destination no longer configured", 4000, 4000, true), 0);
    int64_t id2 = flagged_result_queued(4000);
    cr_assert_eq(db_outbox_revision_failed(db, id2, "key slice no longer indexed", 5000), 0);
    cr_expect_eq(due_now(now, keep, keep_reviewed), 0, "a given-up study went");
    cr_assert_eq(db_outbox_dismiss(db, NULL, "bob", 6000, &d, &n, err, sizeof err), 0, "%s", err);
    cr_assert_eq(n, 2);
    cr_expect_eq(d[0].revision_id, id1);
    cr_expect_str_eq(d[0].object, "sc");
    cr_expect_eq(d[1].revision_id, id2);
    cr_expect_str_eq(d[1].object, "build");
    cr_expect_str_eq(d[1].destination, "");
    free(d);
    cr_assert_eq(db_outbox_revision_files_done(db, id1, paths, 4, &np), 0);
    cr_expect_eq(np, 2, "nothing left to send: its files may go");
    cr_expect_eq(count("SELECT count(*) FROM audit WHERE action = 'pacs_dismissed'"
                       " AND study_uid = '1.2.3'"),
                 3);
    cr_expect_eq(count("SELECT count(*) FROM audit WHERE action = 'pacs_dismissed'"
                       " AND user = 'alice' AND at = 3000"
                       " AND detail = 'revision=1 destination=GONE@127.0.0.1:9 object=sr'"),
                 1);
    cr_expect_eq(count("SELECT count(*) FROM audit WHERE user = 'bob'"
                       " AND detail = 'revision=2 destination=- object=build'"),
                 1);

    /* Nothing more to dismiss, and retry leaves them dismissed. */
    cr_assert_eq(db_outbox_dismiss(db, "1.2.3", "alice", 7000, &d, &n, err, sizeof err), 0);
    cr_expect_eq(n, 0);
    free(d);
    int deliveries = -1, revisions = -1;
    cr_assert_eq(db_outbox_retry(db, NULL, 7000, &deliveries, &revisions, err, sizeof err), 0);
    cr_expect_eq(deliveries + revisions, 0);
    cr_expect_eq(count("SELECT count(*) FROM pacs_deliveries WHERE state = 'dismissed'"), 2);
    cr_expect_eq(count("SELECT count(*) FROM pacs_revisions WHERE state = 'dismissed'"), 1);
    struct db_outbox_counts c;
    cr_assert_eq(db_outbox_counts(db, &c), 0);
    cr_expect_eq(c.failed + c.revisions_failed + c.pending + c.revisions_pending, 0);
    cr_expect_eq(c.dismissed, 2);
    cr_expect_eq(c.revisions_dismissed, 1);
    cr_expect_eq(c.sent, 1);
    int64_t given_up[2] = {-1, -1};
    cr_assert_eq(db_outbox_failed_since(db, 0, &given_up[0], &given_up[1]), 0);
    cr_expect_eq(given_up[0] + given_up[1], 0, "the banner would still show them");

    /* Done with: retention purges the study. */
    int removed = 0;
    cr_expect_eq(due_now(now, keep, keep_reviewed), 1);
    cr_expect_eq(
        db_retention_purge(db, 1, now, keep, keep_reviewed, CLAIM_MS, record_path, &removed), 1);
    cr_expect_eq(removed, 1);
}

/* A retry set further ahead than the longest backoff (an hour here) was set
 * before the wall clock went back: it is due now, not after the step. */
Test(outbox, retry_beyond_the_longest_backoff_is_due, .init = setup, .fini = teardown)
{
    const int64_t hour = 3600000, now = 10 * DAY;
    flagged_revision_waiting();
    char q[200];
    snprintf(q, sizeof q, "UPDATE pacs_deliveries SET next_attempt_at = %lld WHERE id = 1",
             (long long)(now + hour / 2)); /* a backoff still running */
    sql(q);
    snprintf(q, sizeof q, "UPDATE pacs_deliveries SET next_attempt_at = %lld WHERE id = 2",
             (long long)(now + 2 * hour)); /* the clock went back 1.5 h or more */
    sql(q);
    struct db_outbox_delivery due[4];
    int n = 0;
    cr_assert_eq(db_outbox_due(db, "PACS@127.0.0.1:9", now, hour, due, 4, &n), 0);
    cr_assert_eq(n, 1);
    cr_expect_eq(due[0].id, 2);
    cr_assert_eq(db_outbox_due(db, "PACS@127.0.0.1:9", now + hour / 2, hour, due, 4, &n), 0);
    cr_expect_eq(n, 2);
}

/* Each destination's sender sees its own deliveries only, and waits for its
 * own next attempt: another destination's backoff (or its hang) is none of
 * its business. */
Test(outbox, due_and_next_due_are_per_destination, .init = setup, .fini = teardown)
{
    int64_t id1 = flagged_revision_pending();
    struct db_outbox_object o[4] = {{"A@127.0.0.1:9", "sr", "outbox/1-sr.dcm", "9.1"},
                                    {"A@127.0.0.1:9", "sc", "outbox/1-sc.dcm", "9.2"},
                                    {"B@127.0.0.1:9", "sr", "outbox/1-sr.dcm", "9.1"},
                                    {"B@127.0.0.1:9", "sc", "outbox/1-sc.dcm", "9.2"}};
    char err[256];
    cr_assert_eq(db_outbox_revision_ready(db, id1, "9.0", "9.1", o, 4, 1000, err, sizeof err), 0,
                 "%s", err);
    sql("UPDATE pacs_deliveries SET next_attempt_at = 5000 WHERE destination = 'A@127.0.0.1:9'");
    struct db_outbox_delivery due[4];
    int n = 0;
    cr_assert_eq(db_outbox_due(db, "A@127.0.0.1:9", 2000, 60000, due, 4, &n), 0);
    cr_expect_eq(n, 0);
    cr_assert_eq(db_outbox_due(db, "B@127.0.0.1:9", 2000, 60000, due, 4, &n), 0);
    cr_assert_eq(n, 2);
    cr_expect_str_eq(due[0].destination, "B@127.0.0.1:9");
    cr_expect_str_eq(due[1].destination, "B@127.0.0.1:9");
    int64_t at = 0;
    bool found = false;
    cr_assert_eq(db_outbox_next_due(db, "A@127.0.0.1:9", &at, &found), 0);
    cr_expect(found);
    cr_expect_eq(at, 5000);
    cr_assert_eq(db_outbox_next_due(db, "B@127.0.0.1:9", &at, &found), 0);
    cr_expect_eq(at, 1000);
    cr_assert_eq(db_outbox_next_due(db, "C@127.0.0.1:9", &at, &found), 0);
    cr_expect(!found);
}

/* A re-triage that commits while db_outbox_source runs: just as its
 * per-slice statement starts. */
static int retriage_at_slices(unsigned type, void *ud, void *stmt, void *x)
{
    (void)type, (void)x;
    const char *q = sqlite3_sql(stmt);
    if (*(int *)ud == 0 && q && strstr(q, "SELECT sr.idx")) {
        *(int *)ud = 1;
        sql("UPDATE slice_results SET p_any = 0.75;"
            "UPDATE results SET p_any = 0.75, created_at = 2000;");
    }
    return 0;
}

Test(outbox, source_reads_one_result, .init = setup, .fini = teardown)
{
    int64_t id1 = flagged_revision_pending();
    sql("INSERT INTO slice_results (series_ref, idx, sop_uid, frame, p_any, p_epidural,"
        " p_intraparenchymal, p_intraventricular, p_subarachnoid, p_subdural)"
        " VALUES (1, 0, '1.2.3.4.1', 0, 0.9, 0, 0, 0, 0, 0)");
    int fired = 0;
    sqlite3_trace_v2(db_conn(db), SQLITE_TRACE_STMT, retriage_at_slices, &fired);
    struct db_outbox_source src;
    int rc = db_outbox_source(db, id1, &src);
    sqlite3_trace_v2(db_conn(db), 0, NULL, NULL);
    cr_assert_eq(rc, 0, "%d", rc);
    cr_assert_eq(fired, 1);
    cr_assert_eq(src.slices, 1);
    /* The study's result and its slices are the same result's. */
    cr_expect_float_eq(src.p[0], 0.9f, 1e-6);
    cr_expect_float_eq(src.p_any[0], 0.9f, 1e-6);
    /* The key image's spacing, for its picture's aspect. */
    cr_expect_float_eq(src.key_spacing[0], 0.5, 1e-9);
    cr_expect_float_eq(src.key_spacing[1], 0.25, 1e-9);
    db_outbox_source_free(&src);
}

/* Series series_ref's result at time at with probability p (flagged at 0.5)
 * and key slice key, and the study's result set to series study_result, as
 * a triage of that series leaves them. */
static void series_result(int series_ref, int64_t at, double p, const char *key, int study_result)
{
    char q[800];
    snprintf(q, sizeof q,
             "INSERT OR REPLACE INTO results (series_ref, content_key, model_version, p_any,"
             " p_epidural, p_intraparenchymal, p_intraventricular, p_subarachnoid, p_subdural,"
             " flagged, slices, key_index, key_sop, created_at) VALUES (%d, 'k', 'm', %g, 0, 0,"
             " 0, 0, 0, %d, 1, 0, '%s', %lld);"
             "UPDATE series SET state = 'triaged' WHERE id = %d;"
             "UPDATE studies SET result_series_ref = %d, updated_at = %lld;",
             series_ref, p, p >= 0.5, key, (long long)at, series_ref, study_result, (long long)at);
    sql(q);
}

/* Scans and adds what the scan finds as pending, built at once (ready);
 * returns how many it found, each one's revision in revs. */
static int scan_and_build(int *revs)
{
    struct db_outbox_new f[4];
    int n = 0;
    cr_assert_eq(db_outbox_scan(db, f, 4, &n), 0);
    for (int i = 0; i < n; i++) {
        int64_t id;
        cr_assert_eq(db_outbox_revision_add(db, &f[i], "pending", "", 1000, &id, &revs[i]), 0);
        struct db_outbox_object o[2] = {{"PACS@127.0.0.1:9", "sr", "outbox/x-sr.dcm", "9.1"},
                                        {"PACS@127.0.0.1:9", "sc", "outbox/x-sc.dcm", "9.2"}};
        char err[256];
        cr_assert_eq(db_outbox_revision_ready(db, id, "9.0", "9.1", o, 2, 1000, err, sizeof err), 0,
                     "%s", err);
    }
    return n;
}

/* Series B (flagged) is sent as revision 2 after series A's result went out
 * as revision 1; B is triaged again after late images and drops below A:
 * the study's result is A's again, unchanged since revision 1. PACS's
 * newest result must become A's (revision 3), not stay B's flagged one. */
/* The study's result moves to another series while its revision waits to
 * be built: that revision is superseded (skipped), not built and sent
 * before the newer one (PACS had got a stale revision first). */
Test(outbox, revision_of_a_result_moved_away_before_built_is_superseded, .init = setup,
     .fini = teardown)
{
    put_in("1.2.3.4", "1.2.3.4.1", 1000);
    put_in("1.2.3.5", "1.2.3.5.1", 1500);
    series_result(1, 1000, 0.3, "1.2.3.4.1", 1);
    struct db_outbox_new f[4];
    int n = 0, rev;
    int64_t id1, id2;
    cr_assert_eq(db_outbox_scan(db, f, 4, &n), 0);
    cr_assert_eq(n, 1);
    cr_assert_eq(db_outbox_revision_add(db, &f[0], "pending", "", 1000, &id1, &rev), 0);
    series_result(2, 2000, 0.9, "1.2.3.5.1", 2); /* before revision 1 was built */
    cr_assert_eq(db_outbox_scan(db, f, 4, &n), 0);
    cr_assert_eq(n, 1);
    cr_assert_eq(db_outbox_revision_add(db, &f[0], "pending", "", 2000, &id2, &rev), 0);
    struct db_outbox_source src;
    cr_expect_eq(db_outbox_source(db, id1, &src), DB_OUTBOX_SUPERSEDED);
    cr_assert_eq(db_outbox_source(db, id2, &src), 0);
    cr_expect_eq(src.series_id, 2);
    db_outbox_source_free(&src);
}

Test(outbox, result_moved_back_to_an_older_series_is_sent_again, .init = setup, .fini = teardown)
{
    int revs[4];
    put_in("1.2.3.4", "1.2.3.4.1", 1000);
    put_in("1.2.3.5", "1.2.3.5.1", 1500);
    series_result(1, 1000, 0.3, "1.2.3.4.1", 1);
    cr_assert_eq(scan_and_build(revs), 1);
    cr_expect_eq(revs[0], 1);
    cr_expect_eq(scan_and_build(revs), 0, "an unchanged study sends nothing again");
    series_result(2, 2000, 0.9, "1.2.3.5.1", 2);
    cr_assert_eq(scan_and_build(revs), 1);
    cr_expect_eq(revs[0], 2);
    series_result(2, 3000, 0.02, "1.2.3.5.1", 1);
    cr_assert_eq(scan_and_build(revs), 1, "the study's result moved back to series A");
    cr_expect_eq(revs[0], 3);
    cr_expect_eq(count("SELECT count(*) FROM pacs_revisions WHERE revision = 3"
                       " AND series_ref = 1 AND result_at = 1000"),
                 1);
    cr_expect_eq(scan_and_build(revs), 0, "revision 3 is sent once");
    /* Nor again after a restart: what was sent is in the database. */
    char err[256];
    db_close(db);
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    cr_expect_eq(scan_and_build(revs), 0);
    cr_expect_eq(count("SELECT count(*) FROM pacs_revisions"), 3);
}

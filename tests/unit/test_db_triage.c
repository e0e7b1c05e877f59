/* Unit tests of db/triage.c: jobs of a series whose content changed, and a
 * decision racing a newly stored instance. Real SQLite files in a temp dir. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "complete.h"
#include "db.h"
#include "db_reviews.h"
#include "db_triage.h"

static char dir[256], path[300];
static struct db *db;
static const int64_t t0 = 1700000000000;

static void setup(void)
{
    char err[512];
    snprintf(dir, sizeof dir, "/tmp/ichtriage-test-dbtriage-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/test.db", dir);
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
}

static void teardown(void)
{
    db_close(db);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}

/* Stores slice k of axial CT series series_uid of study study_uid, received
 * at t0 + ms. */
static void put_in(const char *study_uid, const char *series_uid, int k, int64_t ms)
{
    char sop[80], file[100], old[512], err[512];
    snprintf(sop, sizeof sop, "%s.%d", series_uid, k);
    snprintf(file, sizeof file, "s/%s.dcm", sop);
    struct db_instance in = {
        .patient_id = "P1",
        .patient_name = "Doe^Jane",
        .study_uid = study_uid,
        .series_uid = series_uid,
        .modality = "CT",
        .series_number = 2,
        .sop_uid = sop,
        .sop_class = "1.2.840.10008.5.1.4.1.1.2",
        .transfer_syntax = "1.2.840.10008.1.2.1",
        .instance_number = k,
        .rows = 512,
        .columns = 512,
        .number_of_frames = 1,
        .has_position = true,
        .position = {0, 0, k},
        .has_orientation = true,
        .orientation = {1, 0, 0, 0, 1, 0},
        .rescale_slope = 1,
        .rescale_intercept = -1024,
        .file_path = file,
        .file_size = 1000,
        .calling_ae = "CT1",
        .received_at_ms = t0 + ms,
    };
    cr_assert_eq(db_instance_put(db, &in, old, sizeof old, err, sizeof err), 0, "%s", err);
}

/* Stores slice k of the one series of the tests above. */
static void put_at(int k, int64_t ms)
{
    put_in("1.2.3", "1.2.3.4", k, ms);
}

static void put(int k)
{
    put_at(k, k);
}

/* The one series, due after its quiet period. */
static int64_t due(void)
{
    int64_t ids[4];
    int n;
    cr_assert_eq(db_series_due(db, t0 + 100000, 5000, ids, 4, &n), 0);
    cr_assert_eq(n, 1);
    return ids[0];
}

static void decide(int64_t id, const char *state, const char *key)
{
    char err[512];
    struct db_series_info seen;
    cr_assert_eq(db_series_info(db, id, &seen), 0);
    cr_assert_eq(db_series_decide(db, &seen, state, "", key, t0 + 100000, err, sizeof err), 0, "%s",
                 err);
}

TestSuite(db_triage, .init = setup, .fini = teardown);
TestSuite(worklist, .init = setup, .fini = teardown);

/* Five slices decided with a job queued (content "5-a"), then a sixth stored
 * before the job ran: the queued job is for old content. */
static void queued_then_reopened(void)
{
    for (int k = 1; k <= 5; k++)
        put(k);
    decide(due(), "waiting", "5-a");
    put(6);
}

Test(db_triage, stale_queued_job_is_never_claimed)
{
    queued_then_reopened();
    struct db_job job;
    cr_assert_eq(db_job_claim(db, t0 + 100001, &job), 0, "claimed a job of a series receiving");
    decide(due(), "waiting", "6-b");
    cr_assert_eq(db_job_claim(db, t0 + 100002, &job), 1);
    cr_assert_str_eq(job.content_key, "6-b");
    cr_assert_eq(db_job_claim(db, t0 + 100003, &job), 0, "the stale job ran as well");
}

Test(db_triage, no_job_left_when_the_new_content_is_not_triaged)
{
    queued_then_reopened();
    decide(due(), "not_applicable", "6-b");
    struct db_job job;
    cr_assert_eq(db_job_claim(db, t0 + 100001, &job), 0, "a job ran for replaced content");
}

/* Completion read the series, then an instance was stored (or replaced)
 * before its decision: the decision is for other content and is not
 * written; the series stays receiving and becomes due again. */
static void decision_refused_after(void (*change)(void))
{
    char err[512];
    for (int k = 1; k <= 4; k++)
        put(k);
    int64_t id = due();
    struct db_series_info seen, now;
    cr_assert_eq(db_series_info(db, id, &seen), 0);
    change();
    cr_assert_eq(db_series_decide(db, &seen, "not_applicable", "4 axial slices", "4-a", t0 + 100000,
                                  err, sizeof err),
                 1, "decided on stale content: %s", err);
    cr_assert_eq(db_series_info(db, id, &now), 0);
    cr_assert_str_eq(now.state, "receiving");
    cr_assert_str_eq(now.content_key, "");
    cr_assert_eq(due(), id);
}

static void add_fifth(void)
{
    put(5);
}

static void replace_fourth(void)
{
    put_at(4, 50);
}

Test(db_triage, decision_refused_after_a_new_instance)
{
    decision_refused_after(add_fifth);
}

Test(db_triage, decision_refused_after_a_replaced_instance)
{
    decision_refused_after(replace_fourth);
}

/* The content key follows the bytes, not the sizes: the same SOP UIDs with
 * the same digests give the same key, one other digest (a same-size copy
 * with other pixels) another; rows without a digest count by size. */
/* "HEAD, BRAIN" (as the allowlist's example is written) names BRAIN, not
 * " BRAIN": a body part of exactly BRAIN had matched nothing. */
Test(head_patterns, blanks_around_a_pattern_are_not_part_of_it)
{
    cr_expect(triage_patterns_match("HEAD, BRAIN", "brain"));
    cr_expect(triage_patterns_match(" NECK ,\tHEAD ", "HEAD"));
    cr_expect(triage_patterns_match("HEAD,BRAIN", "CT Brain w/o"));
    cr_expect(!triage_patterns_match("HEAD, BRAIN", "CHEST"));
    cr_expect(!triage_patterns_match(" , ,", "ANYTHING"), "blank patterns match nothing");
}

Test(content_key, follows_the_digests)
{
    const char *sops[] = {"1.2.1", "1.2.2"};
    const char *d1[] = {"aa", "bb"}, *d2[] = {"aa", "cc"}, *none[] = {"", ""};
    const int64_t sizes[] = {1000, 1000}, other[] = {1000, 1001};
    char k1[33], k1b[33], k2[33], s1[33], s2[33], n1[33];
    triage_content_key(sops, d1, sizes, 2, k1);
    triage_content_key(sops, d1, other, 2, k1b);
    triage_content_key(sops, d2, sizes, 2, k2);
    triage_content_key(sops, none, sizes, 2, s1);
    triage_content_key(sops, none, other, 2, s2);
    triage_content_key(sops, NULL, sizes, 2, n1);
    cr_assert_str_eq(k1, k1b, "a digest is the content: the size adds nothing");
    cr_assert_str_neq(k1, k2);
    cr_assert_str_neq(s1, s2);
    cr_assert_str_eq(s1, n1);
    cr_assert_str_neq(k1, s1);
    cr_assert_eq(strncmp(k1, "2-", 2), 0, "%s", k1);
}

/* ---- the worklist's order (design.md), on studies brought to each state
 * the way the node does: instances stored, the series decided, its job
 * claimed and ended. ---------------------------------------------------- */

static const int64_t later = t0 + 10000000; /* every series' quiet period over */

/* Stores 4 slices of a new series series_uid of study_uid at t0 + ms and
 * returns the series' id, due. */
static int64_t series_in(const char *study_uid, const char *series_uid, int64_t ms)
{
    for (int k = 1; k <= 4; k++)
        put_in(study_uid, series_uid, k, ms);
    int64_t ids[64];
    int n;
    cr_assert_eq(db_series_due(db, later, 5000, ids, 64, &n), 0);
    for (int i = 0; i < n; i++) {
        struct db_series_info in;
        cr_assert_eq(db_series_info(db, ids[i], &in), 0);
        if (strcmp(in.series_uid, series_uid) == 0) return ids[i];
    }
    cr_assert_fail("series %s is not due", series_uid);
    return -1;
}

/* The series decided for a job, which is claimed (the series triaging). */
static struct db_job claimed(int64_t id)
{
    struct db_job job;
    decide(id, "waiting", "4-x");
    cr_assert_eq(db_job_claim(db, later, &job), 1);
    cr_assert_eq(job.series_id, id, "claimed another series' job");
    return job;
}

/* The series triaged with probability p (flagged or not) at time at;
 * error: failed. */
static void ended_at(int64_t id, double p, bool flagged, const char *error, int64_t at)
{
    char err[512];
    struct db_job job = claimed(id);
    struct db_result res = {.model_version = "m1", .flagged = flagged, .key_sop = ""};
    for (int l = 0; l < DB_LABELS; l++)
        res.p[l] = (float)(l == 0 ? p : p / 2);
    cr_assert_eq(db_job_finish(db, &job, error ? NULL : &res, error, false, at, err, sizeof err), 0,
                 "%s", err);
}

static void ended(int64_t id, double p, bool flagged, const char *error)
{
    ended_at(id, p, flagged, error, later);
}

struct order {
    char uid[16][32];
    char status[16][20];
    int n;
};

static int collect(void *ud, const struct db_worklist_row *row)
{
    struct order *o = ud;
    cr_assert_lt(o->n, 16);
    snprintf(o->uid[o->n], sizeof o->uid[0], "%s", row->study_uid);
    snprintf(o->status[o->n], sizeof o->status[0], "%s", row->status);
    o->n++;
    return 0;
}

/* The list of status (NULL: the open list, with the age window since_ms)
 * is want, in that order. */
static void expect_list(const char *status, int64_t since_ms, const char *const *want, int nwant)
{
    struct order o = {0};
    cr_assert_eq(db_worklist(db, status, since_ms, collect, &o), 0);
    char got[600] = "";
    for (int i = 0; i < o.n; i++)
        snprintf(got + strlen(got), sizeof got - strlen(got), " %s(%s)", o.uid[i], o.status[i]);
    cr_assert_eq(o.n, nwant, "%d rows:%s", o.n, got);
    for (int i = 0; i < nwant; i++)
        cr_assert_str_eq(o.uid[i], want[i], "row %d: order%s", i, got);
}

static void expect_order(const char *status, const char *const *want, int nwant)
{
    expect_list(status, 0, want, nwant);
}

/* Every status, flagged and not, ties in probability and in age, a flagged
 * study whose probability is below an unflagged one's (results of models
 * with other thresholds), a flagged study still receiving a new series,
 * a reviewed one: the order design.md and docs/web.md give. Study uids
 * name the group each belongs in (1 to 4) and its place there. */
Test(worklist, every_status_in_its_group_and_order)
{
    char err[512];
    /* (3) triaged and not flagged, by probability, ties by age */
    ended(series_in("3.c", "3.c.1", 10), 0.30, false, NULL);
    /* (2) not yet known, by age, whatever the reason */
    series_in("2.a", "2.a.1", 20);                       /* received: receiving */
    ended(series_in("2.b", "2.b.1", 30), 0, false, "x"); /* failed */
    /* (1) flagged, by probability, ties by age */
    ended(series_in("1.c", "1.c.1", 40), 0.60, true, NULL);
    /* (4) not applicable */
    decide(series_in("4.a", "4.a.1", 50), "not_applicable", "not a head");
    ended(series_in("1.a", "1.a.1", 60), 0.90, true, NULL);
    ended(series_in("3.b", "3.b.1", 70), 0.80, false, NULL); /* above a flagged 0.60 */
    /* reviewed: off the list, on ?status=reviewed */
    ended(series_in("9.a", "9.a.1", 80), 0.99, true, NULL);
    cr_assert_eq(db_review_add(db, "9.a", true, "subdural", "", "", "dr", later + 1, NULL, NULL,
                               err, sizeof err),
                 0, "%s", err);
    claimed(series_in("2.d", "2.d.1", 100));                 /* triaging */
    ended(series_in("1.d", "1.d.1", 110), 0.60, true, NULL); /* ties 1.c, later */
    ended(series_in("3.a", "3.a.1", 5), 0.80, false, NULL);  /* ties 3.b, earlier */
    /* flagged, and a new series of it arriving: still first */
    ended(series_in("1.b", "1.b.1", 120), 0.70, true, NULL);
    series_in("1.b", "1.b.2", 130);
    /* a study with a series triaged low and one failed is not yet known */
    ended(series_in("2.e", "2.e.1", 140), 0.05, false, NULL);
    ended(series_in("2.e", "2.e.2", 140), 0, false, "y");
    /* waiting (last: the claims above take the oldest queued job) */
    decide(series_in("2.c", "2.c.1", 90), "waiting", "4-x");
    const char *want[] = {"1.a", "1.b", "1.c", "1.d", "2.a", "2.b", "2.c",
                          "2.d", "2.e", "3.a", "3.b", "3.c", "4.a"};
    expect_order(NULL, want, 13);
    const char *reviewed[] = {"9.a"};
    expect_order("reviewed", reviewed, 1);
    const char *failed[] = {"2.b", "2.e"};
    expect_order("failed", failed, 2);
}

/* The open list's age window (http.worklist_days) leaves out the studies
 * that need no action, triaged and not flagged or not applicable, in which
 * nothing has changed (no instance received, no result stored) since
 * before it; old flagged, failed, receiving, waiting and triaging studies
 * stay, in their places. Each status still lists all of its own, and
 * db_worklist_hidden counts what was left out and says when the next study
 * kept leaves by age. The uids say old (o) or new (n) and the group: every
 * study arrived long before the window, the new ones' results (or
 * decisions) came inside it. */
Test(worklist, age_window_leaves_out_only_old_studies_that_need_no_action)
{
    const int64_t since = later + 1000;
    ended(series_in("o.3", "o.3.1", 10), 0.30, false, NULL);
    decide(series_in("o.4", "o.4.1", 20), "not_applicable", "not a head");
    ended(series_in("o.1", "o.1.1", 30), 0.90, true, NULL);
    ended(series_in("o.2f", "o.2f.1", 40), 0, false, "x");
    series_in("o.2r", "o.2r.1", 50); /* received: receiving */
    claimed(series_in("o.2t", "o.2t.1", 60));
    ended_at(series_in("n.3", "n.3.1", 2000), 0.20, false, NULL, later + 2000);
    /* not applicable once its frames were read (the job's end) */
    char err[512];
    struct db_job job = claimed(series_in("n.4", "n.4.1", 3000));
    cr_assert_eq(db_job_finish(db, &job, NULL, "not axial", true, later + 3000, err, sizeof err), 0,
                 "%s", err);
    /* waiting (last: the claims above take the oldest queued job) */
    decide(series_in("o.2w", "o.2w.1", 70), "waiting", "4-x");

    const char *all[] = {"o.1", "o.2f", "o.2r", "o.2t", "o.2w", "o.3", "n.3", "o.4", "n.4"};
    expect_list(NULL, 0, all, 9);
    const char *open[] = {"o.1", "o.2f", "o.2r", "o.2t", "o.2w", "n.3", "n.4"};
    expect_list(NULL, since, open, 7);
    const char *triaged[] = {"o.1", "o.3", "n.3"};
    expect_list("triaged", since, triaged, 3);
    const char *not_applicable[] = {"o.4", "n.4"};
    expect_list("not_applicable", since, not_applicable, 2);

    struct db_worklist_hidden h;
    cr_assert_eq(db_worklist_hidden(db, since, &h), 0);
    cr_expect_eq(h.triaged, 1);
    cr_expect_eq(h.not_applicable, 1);
    cr_expect_eq(h.next_ms, later + 2000, "n.3 leaves next");
    cr_assert_eq(db_worklist_hidden(db, 0, &h), 0);
    cr_expect_eq(h.triaged + h.not_applicable + h.next_ms, 0, "no window, nothing left out");
}

/* A study left out by the age window that then gets a late series, and a
 * new result that does not flag it, is back on the open list (marked as
 * changed, result_updates): the window went by arrival, so it stayed out,
 * its new result unseen, and came and went while it was triaged again. */
Test(worklist, a_late_series_brings_a_study_back_inside_the_age_window)
{
    const int64_t since = later + 1000;
    ended(series_in("o.3", "o.3.1", 10), 0.30, false, NULL);
    const char *none[] = {NULL};
    expect_list(NULL, since, none, 0);
    ended_at(series_in("o.3", "o.3.2", 100), 0.20, false, NULL, later + 2000);
    const char *back[] = {"o.3"};
    expect_list(NULL, since, back, 1);
    struct db_worklist_hidden h;
    cr_assert_eq(db_worklist_hidden(db, since, &h), 0);
    cr_expect_eq(h.triaged + h.not_applicable, 0);
    cr_expect_eq(h.next_ms, later + 2000);
}

/* A reviewed study whose late series then fails is back on the list (it
 * had stayed reviewed, off the list, for good: only a result brought it
 * back). */
Test(worklist, reviewed_study_back_when_a_late_series_fails)
{
    char err[512];
    ended(series_in("5.a", "5.a.1", 10), 0.20, false, NULL);
    cr_assert_eq(
        db_review_add(db, "5.a", false, "", "", "", "dr", later + 1, NULL, NULL, err, sizeof err),
        0, "%s", err);
    const char *none[] = {NULL};
    expect_order(NULL, none, 0);
    /* instances after the review: stored later than it */
    for (int k = 1; k <= 4; k++)
        put_in("5.a", "5.a.2", k, later - t0 + 2);
    int64_t ids[4];
    int n;
    cr_assert_eq(db_series_due(db, later + 100000, 5000, ids, 4, &n), 0);
    cr_assert_eq(n, 1);
    struct db_series_info seen;
    cr_assert_eq(db_series_info(db, ids[0], &seen), 0);
    cr_assert_eq(db_series_decide(db, &seen, "waiting", "", "4-y", later + 100000, err, sizeof err),
                 0, "%s", err);
    struct db_job job;
    cr_assert_eq(db_job_claim(db, later + 100001, &job), 1);
    cr_assert_eq(
        db_job_finish(db, &job, NULL, "undecodable", false, later + 100002, err, sizeof err), 0,
        "%s", err);
    const char *back[] = {"5.a"};
    expect_order(NULL, back, 1);
}

/* A series still waiting or triaging when the review is saved, whose result
 * (or failure) comes after it: the study is back on the list, flagged. It
 * had stayed reviewed, off the list, because only a series with instances
 * after the review counted, and these came before it. */
Test(worklist, reviewed_study_back_when_a_series_triaging_at_the_review_ends)
{
    char err[512];
    struct db_job flagged = claimed(series_in("7.a", "7.a.1", 10)); /* triaging */
    cr_assert_eq(
        db_review_add(db, "7.a", false, "", "", "", "dr", later + 1, NULL, NULL, err, sizeof err),
        0, "%s", err);
    const char *none[] = {NULL};
    expect_order(NULL, none, 0);
    struct db_result res = {.model_version = "m1", .p = {0.997f}, .flagged = true, .key_sop = ""};
    cr_assert_eq(db_job_finish(db, &flagged, &res, NULL, false, later + 2, err, sizeof err), 0,
                 "%s", err);
    const char *back[] = {"7.a"};
    expect_order(NULL, back, 1);
    struct order o = {0};
    cr_assert_eq(db_worklist(db, NULL, 0, collect, &o), 0);
    cr_assert_str_eq(o.status[0], "triaged");

    /* The same for a job that fails after the review. */
    struct db_job failing = claimed(series_in("7.b", "7.b.1", 20));
    cr_assert_eq(
        db_review_add(db, "7.b", false, "", "", "", "dr", later + 3, NULL, NULL, err, sizeof err),
        0, "%s", err);
    cr_assert_eq(
        db_job_finish(db, &failing, NULL, "undecodable", false, later + 4, err, sizeof err), 0,
        "%s", err);
    const char *both[] = {"7.a", "7.b"};
    expect_order(NULL, both, 2);

    /* Reviewed once the results are in: it stays reviewed. */
    cr_assert_eq(
        db_review_add(db, "7.a", true, "", "", "", "dr", later + 5, NULL, NULL, err, sizeof err), 0,
        "%s", err);
    cr_assert_eq(
        db_review_add(db, "7.b", false, "", "", "", "dr", later + 5, NULL, NULL, err, sizeof err),
        0, "%s", err);
    expect_order(NULL, none, 0);
}

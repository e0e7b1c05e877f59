/* Unit tests of db/triage.c: jobs of a series whose content changed, and a
 * decision racing a newly stored instance. Real SQLite files in a temp dir. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "complete.h"
#include "db.h"
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

/* Stores slice k of one axial CT series, received at t0 + ms. */
static void put_at(int k, int64_t ms)
{
    char sop[32], file[64], old[512], err[512];
    snprintf(sop, sizeof sop, "1.2.3.4.%d", k);
    snprintf(file, sizeof file, "s/%s.dcm", sop);
    struct db_instance in = {
        .patient_id = "P1",
        .patient_name = "Doe^Jane",
        .study_uid = "1.2.3",
        .series_uid = "1.2.3.4",
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

/* Unit tests of what the web worklist keeps in db/ (reviews, claims,
 * audit, metrics; db_reviews.h, db_web.h), of the DICOM text to UTF-8
 * conversion (scp_charset.h) and of the login side's tables
 * (http_internal.h). Real SQLite files in a temp dir. */
#include <criterion/criterion.h>
#include <limits.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "db.h"
#include "db_reviews.h"
#include "db_web.h"
#include "http_internal.h"
#include "rows.h"
#include "scp_charset.h"

static char dir[256], path[300];
static struct db *db;

static void setup(void)
{
    snprintf(dir, sizeof dir, "/tmp/ichtriage-test-web-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/test.db", dir);
    char err[256];
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    const char *studies[] = {"1.2.3", "1.2.4"};
    for (int i = 0; i < 2; i++) {
        char sop[32], series[32], file[64];
        snprintf(sop, sizeof sop, "1.9.%d", i);
        snprintf(series, sizeof series, "1.8.%d", i);
        snprintf(file, sizeof file, "spool/%d.dcm", i);
        struct db_instance in = {
            .patient_id = "P1",
            .patient_name = "Doe^Jane",
            .study_uid = studies[i],
            .series_uid = series,
            .modality = "CT",
            .series_number = 1,
            .sop_uid = sop,
            .sop_class = "1.2.840.10008.5.1.4.1.1.2",
            .transfer_syntax = "1.2.840.10008.1.2.1",
            .instance_number = 1,
            .rows = 64,
            .columns = 64,
            .number_of_frames = 1,
            .rescale_slope = 1,
            .file_path = file,
            .file_size = 100,
            .received_at_ms = 1700000000000 + i,
        };
        char old[64];
        cr_assert_eq(db_instance_put(db, &in, old, sizeof old, err, sizeof err), 0, "%s", err);
    }
}

static void teardown(void)
{
    db_close(db);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}

struct seen {
    int n;
    char uid[4][65], subtypes[4][64], reviewer[4][32];
    bool hemorrhage[4];
};

static int collect(void *ud, const struct db_review_row *r)
{
    struct seen *s = ud;
    if (s->n == 4) return 1;
    snprintf(s->uid[s->n], 65, "%s", r->study_uid);
    snprintf(s->subtypes[s->n], 64, "%s", r->subtypes);
    snprintf(s->reviewer[s->n], 32, "%s", r->reviewer);
    s->hemorrhage[s->n++] = r->hemorrhage;
    return 0;
}

static int status_of(void *ud, const struct db_study_view *v)
{
    snprintf(ud, 32, "%s", v->row.status);
    return 0;
}

TestSuite(web_db, .init = setup, .fini = teardown);

Test(web_db, latest_review_is_the_label_and_the_study_leaves_the_list)
{
    char err[256];
    cr_assert_eq(db_review_add(db, "1.2.3", true, "subdural", "", "first", "alice", 10, NULL, NULL,
                               err, sizeof err),
                 0);
    cr_assert_eq(db_review_add(db, "1.2.3", false, "", "", "second look", "bob", 20, NULL, NULL,
                               err, sizeof err),
                 0);
    cr_assert_eq(
        db_review_add(db, "9.9.9", true, "", "", "", "alice", 30, NULL, NULL, err, sizeof err), 1);
    struct seen all = {0}, latest = {0};
    cr_assert_eq(db_reviews_of_study(db, "1.2.3", collect, &all), 0);
    cr_assert_eq(all.n, 2);
    cr_assert_str_eq(all.reviewer[0], "alice");
    cr_assert_eq(db_reviews_latest(db, collect, &latest), 0);
    cr_assert_eq(latest.n, 1);
    cr_assert_str_eq(latest.uid[0], "1.2.3");
    cr_assert_str_eq(latest.reviewer[0], "bob");
    cr_assert_not(latest.hemorrhage[0]);
    char status[32] = "";
    cr_assert_eq(db_study_view(db, "1.2.3", status_of, status), 0);
    cr_assert_str_eq(status, "reviewed");
    cr_assert_eq(db_study_view(db, "1.2.4", status_of, status), 0);
    cr_assert_str_neq(status, "reviewed");
    cr_assert_eq(db_study_view(db, "9.9.9", status_of, status), 1);
    struct db_metrics m;
    cr_assert_eq(db_metrics_read(db, &m), 0);
    cr_assert_eq(m.reviews, 1);
    cr_assert_eq(m.review_tn, 1); /* not flagged, no bleed in the latest review */
    cr_assert_eq(m.instances, 2);
}

static int count_claim(void *ud, const char *uid, const char *reader, int64_t at)
{
    (void)uid, (void)reader, (void)at;
    (*(int *)ud)++;
    return 0;
}

/* Claims last claim_ms (here 10) from when they were made or renewed. */
Test(web_db, claims_need_force_to_take_over_and_end_with_the_review)
{
    char holder[64], err[256];
    const int64_t ms = 10;
    cr_assert_eq(db_claim_set(db, "1.2.3", "alice", false, 1, ms, holder, sizeof holder), 0);
    cr_assert_eq(db_claim_set(db, "1.2.3", "alice", false, 2, ms, holder, sizeof holder), 3);
    cr_assert_eq(db_claim_set(db, "1.2.3", "bob", false, 3, ms, holder, sizeof holder), 2);
    cr_assert_str_eq(holder, "alice");
    cr_assert_eq(db_claim_release(db, "1.2.3", "bob", 3, ms), 1);
    cr_assert_eq(db_claim_set(db, "1.2.3", "bob", true, 4, ms, holder, sizeof holder), 0);
    cr_assert_str_eq(holder, "alice");
    cr_assert_eq(db_claim_set(db, "9.9.9", "bob", false, 4, ms, holder, sizeof holder), 1);
    int n = 0;
    cr_assert_eq(db_claims(db, 13, ms, count_claim, &n), 0);
    cr_assert_eq(n, 1);
    /* bob's claim (4) has lapsed at 14: it counts as none, alice claims
     * without force, bob cannot release it */
    n = 0;
    cr_assert_eq(db_claims(db, 14, ms, count_claim, &n), 0);
    cr_assert_eq(n, 0);
    cr_assert_eq(db_claim_release(db, "1.2.3", "bob", 14, ms), 1);
    cr_assert_eq(db_claim_set(db, "1.2.3", "alice", false, 14, ms, holder, sizeof holder), 4);
    cr_assert_str_eq(holder, "bob");
    /* renewed at 20, alive at 29 though made at 14; her own lapsed claim
     * is claimed anew */
    cr_assert_eq(db_claim_set(db, "1.2.3", "alice", false, 20, ms, holder, sizeof holder), 3);
    cr_assert_eq(db_claim_set(db, "1.2.3", "bob", false, 29, ms, holder, sizeof holder), 2);
    cr_assert_eq(db_claim_set(db, "1.2.3", "alice", false, 31, ms, holder, sizeof holder), 0);
    cr_assert_str_eq(holder, "");
    cr_assert_eq(db_claim_set(db, "1.2.3", "bob", true, 32, ms, holder, sizeof holder), 0);
    cr_assert_eq(
        db_review_add(db, "1.2.3", true, "", "", "", "bob", 35, NULL, NULL, err, sizeof err), 0);
    cr_assert_eq(db_claim_release(db, "1.2.3", "bob", 35, ms), 1); /* the review dropped it */
    cr_assert_eq(db_audit_add(db, 36, "bob", "opened", "1.2.3", ""), 0);
}

/* A slice image asks whether its slice has a result; that the question
 * is answered from an index, not by reading every per-slice row on the
 * node's loop, is unit_db's slice_results_are_indexed_by_instance_also_
 * after_an_upgrade (the query plan: tests check behaviour, not time). */
Test(web_db, slice_without_a_result_is_found_missing)
{
    cr_assert_eq(db_slice_has_result(db, "1.9.0", 0), 1);
}

Test(web_db, instance_file_only_within_its_study)
{
    char file[128];
    cr_assert_eq(db_study_instance_file(db, "1.2.3", "1.9.0", file, sizeof file), 0);
    cr_assert_str_eq(file, "spool/0.dcm");
    cr_assert_eq(db_study_instance_file(db, "1.2.3", "1.9.1", file, sizeof file), 1);
}

Test(charset, converts_to_utf8)
{
    char out[256];
    cr_assert_eq(scp_charset_to_utf8("", "Doe^Jane", 1, out, sizeof out), 0);
    cr_assert_str_eq(out, "Doe^Jane");
    cr_assert_eq(scp_charset_to_utf8("ISO_IR 100", "M\xfcller^J\xfcrgen", 1, out, sizeof out), 0);
    cr_assert_str_eq(out, "M\xc3\xbcller^J\xc3\xbcrgen");
    cr_assert_eq(scp_charset_to_utf8("ISO_IR 192", "\xc3\xa9", 1, out, sizeof out), 0);
    cr_assert_str_eq(out, "\xc3\xa9");
    /* Cyrillic (ISO 8859-5): "Иванов^Иван". */
    cr_assert_eq(scp_charset_to_utf8("ISO_IR 144", "\xb8\xd2\xd0\xdd\xde\xd2^\xb8\xd2\xd0\xdd", 1,
                                     out, sizeof out),
                 0);
    cr_assert_str_eq(out, "\xd0\x98\xd0\xb2\xd0\xb0\xd0\xbd\xd0\xbe\xd0\xb2^"
                          "\xd0\x98\xd0\xb2\xd0\xb0\xd0\xbd");
}

Test(charset, unknown_charset_falls_back_to_ascii_and_truncates_on_boundaries)
{
    char out[8];
    cr_assert_eq(scp_charset_to_utf8("NOT A CHARSET", "M\xfcller", 1, out, sizeof out), -1);
    cr_assert_str_eq(out, "M?ller");
    /* 3 two-byte characters do not fit in 6 bytes + NUL: no half character. */
    char small[6];
    cr_assert_eq(scp_charset_to_utf8("ISO_IR 100", "\xfc\xfc\xfc", 0, small, sizeof small), 0);
    cr_assert_str_eq(small, "\xc3\xbc\xc3\xbc");
}

/* Failed logins were kept for 64 addresses, a new one taking the oldest's
 * place, so rotating through 65 reset every count. The table holds all
 * that the allowance of all addresses lets fail in a window: nothing live
 * is dropped, and it says "held" rather than forget when (never) full. */
/* A row's study date as ISO-8601 (the scanner's local time) and whether it
 * is a prior: an old study sent again had looked like a new one, the list
 * showing only when it arrived. */
Test(rows, study_date_and_prior)
{
    char iso[32];
    int64_t at;
    cr_assert_eq(triage_study_when("20201212", "112341.123", iso, sizeof iso, &at), 0);
    cr_expect_str_eq(iso, "2020-12-12T11:23:41");
    cr_expect_eq(at, 1607772221);
    cr_assert_eq(triage_study_when("2020.12.12", "11:23", iso, sizeof iso, &at), 0);
    cr_expect_str_eq(iso, "2020-12-12T11:23:00"); /* ACR-NEMA separators */
    cr_assert_eq(triage_study_when("20201212", "", iso, sizeof iso, &at), 0);
    cr_expect_str_eq(iso, "2020-12-12"); /* no time: the day's end counts */
    cr_expect_eq(at, 1607817599);
    cr_assert_eq(triage_study_when("20201212", "2561", iso, sizeof iso, &at), 0);
    cr_expect_str_eq(iso, "2020-12-12");
    const char *bad[] = {"", "2020121", "202012121", "20200231", "20201300", "garbage"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cr_expect_eq(triage_study_when(bad[i], "1200", iso, sizeof iso, &at), -1, "%s", bad[i]);
        cr_expect_str_eq(iso, "");
    }
    cr_expect_eq(triage_study_when(NULL, NULL, iso, sizeof iso, &at), -1);

    /* 2020-12-12 11:23:41 read as UTC, arriving 2 days and 12 h later: not
     * yet a prior (the scanner may be at UTC-12); a second more is. */
    struct db_worklist_row r = {.study_date = "20201212", .study_time = "112341"};
    r.received_at_ms = (1607772221LL + 2 * 86400 + 12 * 3600) * 1000;
    cr_expect_not(triage_row_prior(&r));
    r.received_at_ms += 1000;
    cr_expect(triage_row_prior(&r));
    r.study_date = "";
    cr_expect_not(triage_row_prior(&r)); /* no date: unknown, not old */
    r.study_date = "20301212";
    cr_expect_not(triage_row_prior(&r)); /* a date after arrival: a wrong clock */
}

Test(http_fails, keeps_every_live_count_and_drops_only_expired_ones)
{
    struct http_fails *t = calloc(1, sizeof *t);
    cr_assert_eq(http_fails_init(t, 1000), 0);
    cr_assert_eq(t->cap, HTTP_LOGIN_BURST + HTTP_LOGIN_PER_S + 1);
    char key[32];
    for (int i = 0; i < t->cap; i++) {
        snprintf(key, sizeof key, "10.0.0.%d", i);
        http_fails_add(t, key, i);
    }
    http_fails_add(t, "10.0.0.0", 40);
    cr_assert_eq(http_fails_count(t, "10.0.0.0", 40), 2);
    cr_assert_eq(http_fails_count(t, "10.0.0.30", 40), 1);
    cr_assert_eq(http_fails_count(t, "10.9.9.9", 40), INT_MAX, "full: held, none forgotten");
    http_fails_add(t, "10.9.9.9", 40);
    cr_assert_eq(http_fails_count(t, "10.0.0.0", 40), 2);
    /* Past the first failure's window its count goes, the others stay. */
    cr_assert_eq(http_fails_count(t, "10.0.0.0", 1001), 0);
    cr_assert_eq(http_fails_count(t, "10.0.0.1", 1001), 1);
    cr_assert_eq(http_fails_count(t, "10.9.9.9", 1001), 0);
    http_fails_add(t, "10.9.9.9", 1001);
    cr_assert_eq(http_fails_count(t, "10.9.9.9", 1001), 1);
    http_fails_free(t);
    free(t);
}

/* Against a plain list, over many windows: failures at the allowance's
 * rate (10 a second) from 2000 keys, enough live at once (600 in a 60 s
 * window) that hash chains hold several and expiry unlinks from their
 * middle. */
Test(http_fails, counts_as_a_plain_list_does)
{
    enum { KEYS = 2000, STEPS = 8000 };
    struct http_fails *t = calloc(1, sizeof *t);
    cr_assert_eq(http_fails_init(t, 60000), 0);
    static int count[KEYS];
    static int64_t first[KEYS];
    unsigned seed = 7;
    char key[32];
    for (int step = 0; step < STEPS; step++) {
        int64_t now = 100LL * step;
        seed = seed * 1103515245u + 12345u;
        int k = (int)((seed >> 8) % KEYS);
        for (int i = 0; i < KEYS; i++)
            if (count[i] && now - first[i] > 60000) count[i] = 0;
        snprintf(key, sizeof key, "fe80::%d", k);
        cr_assert_eq(http_fails_count(t, key, now), count[k], "step %d key %d", step, k);
        http_fails_add(t, key, now);
        if (count[k]++ == 0) first[k] = now;
        cr_assert_leq(t->n, t->cap);
    }
    int live = 0;
    for (int i = 0; i < KEYS; i++) {
        snprintf(key, sizeof key, "fe80::%d", i);
        bool expired = 100LL * STEPS - first[i] > 60000;
        cr_assert_eq(http_fails_count(t, key, 100LL * STEPS), expired ? 0 : count[i]);
        live += count[i] && !expired;
    }
    cr_assert_eq(t->n, live);
    http_fails_free(t);
    free(t);
}

/* An unknown name was checked against the first user's hash: with
 * yescrypt first and sha512-crypt (several times faster) for bob, every
 * unknown name took yescrypt's time and bob's wrong password far less.
 * Each unknown name is now checked against a user picked by the name: the
 * same each time, and over many names each kind about as often as the
 * file holds it, so no kind of time says "no such name". */
Test(http_auth, unknown_names_are_checked_against_a_hash_picked_by_the_name)
{
    char users[] = "/tmp/ichtriage-test-users-XXXXXX";
    int fd = mkstemp(users);
    cr_assert_geq(fd, 0);
    FILE *f = fdopen(fd, "w");
    fputs("alice:$y$j9T$69Q/pi6PWyV5DSi2QeFS9/$8j6qP0P.pg0wq694bZNPAWmNMq6Xzhe7x74.ekEutL1\n"
          "bob:$6$6WZsH4XUEqNSWHNF$W9q7e4An/aMUix9dJmPc/S1GfCF.le5ziY/bC.8lXGD1TUx44HsnIsTkfgTdF"
          "gW4obWHJOMrpiSvvGeduRPkw1\n",
          f);
    fclose(f);
    struct triage_http *h = calloc(1, sizeof *h);
    char err[256];
    cr_assert_eq(http_auth_load(h, users, err, sizeof err), 0, "%s", err);
    unlink(users);
    cr_assert_str_eq(http_auth_probe(h, "alice")->name, "alice");
    cr_assert_str_eq(http_auth_probe(h, "bob")->name, "bob");
    int bob = 0;
    char name[32];
    for (int i = 0; i < 200; i++) {
        snprintf(name, sizeof name, "nobody%d", i);
        const struct http_user *p = http_auth_probe(h, name);
        cr_assert_eq(http_auth_probe(h, name), p, "%s: the same user each time", name);
        bob += strncmp(p->hash, "$6$", 3) == 0;
    }
    cr_assert(bob > 60 && bob < 140, "sha512-crypt for %d of 200 unknown names", bob);
    http_auth_free(h);
    free(h);
}

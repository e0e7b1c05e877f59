/* Unit tests of the PACS sender's pieces that need no peer: parsing
 * pacs.destinations, drawing the summary picture, and the outbox queue's
 * bookkeeping on a fresh database. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "db.h"
#include "db_outbox.h"
#include "pacs.h"
#include "pacs_render.h"
#include "scp_send.h"

Test(pacs, destinations_parse)
{
    struct triage_pacs_dest d[4];
    int n = -1;
    char err[256];
    cr_assert_eq(
        triage_pacs_parse_destinations(" PACS@10.0.0.2:104 , tls:SECURE@pacs.example:2762,,", d, 4,
                                       &n, err, sizeof err),
        0, "%s", err);
    cr_assert_eq(n, 2);
    cr_expect_str_eq(d[0].aet, "PACS");
    cr_expect_str_eq(d[0].host, "10.0.0.2");
    cr_expect_eq(d[0].port, 104);
    cr_expect(!d[0].tls);
    cr_expect_str_eq(d[0].spec, "PACS@10.0.0.2:104");
    cr_expect_str_eq(d[1].aet, "SECURE");
    cr_expect_str_eq(d[1].host, "pacs.example");
    cr_expect_eq(d[1].port, 2762);
    cr_expect(d[1].tls);
    cr_assert_eq(triage_pacs_parse_destinations("", d, 4, &n, err, sizeof err), 0);
    cr_expect_eq(n, 0);
}

Test(pacs, destinations_refused)
{
    const char *bad[] = {"PACS",
                         "PACS@host",
                         "@host:104",
                         "PACS@:104",
                         "PACS@host:0",
                         "PACS@host:65536",
                         "PACS@host:10x",
                         "AETITLETOOLONG123@h:1",
                         "A@h:1,B@h:2,C@h:3"};
    struct triage_pacs_dest d[2];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int n;
        char err[256] = "";
        cr_expect_eq(triage_pacs_parse_destinations(bad[i], d, 2, &n, err, sizeof err), -1, "%s",
                     bad[i]);
        cr_expect(strstr(err, "pacs.destinations") != NULL, "%s: %s", bad[i], err);
    }
}

/* The same destination twice: each revision's deliveries collided in the
 * queue (one row per revision, destination and object), the revision was
 * never queued, and no result reached any destination. */
Test(pacs, destination_listed_twice_refused)
{
    const char *twice[][2] = {
        {"A@h:1,A@h:1", "'A@h:1' is listed twice"},
        {"A@h:1,A@h:1 ", "'A@h:1' is listed twice"},
        {"A@h:1, B@h:2 ,A@h:1", "'A@h:1' is listed twice"},
        {"A@h:1,B@H:1,A@H:1", "'A@H:1' is the same destination as 'A@h:1'"},
        {"A@h:1,tls:A@h:1", "'tls:A@h:1' is the same destination as 'A@h:1'"}};
    struct triage_pacs_dest d[4];
    for (size_t i = 0; i < sizeof twice / sizeof twice[0]; i++) {
        int n;
        char err[256] = "";
        cr_expect_eq(triage_pacs_parse_destinations(twice[i][0], d, 4, &n, err, sizeof err), -1,
                     "%s", twice[i][0]);
        cr_expect(strstr(err, twice[i][1]) != NULL, "%s: %s", twice[i][0], err);
    }
    /* Another AE title on the same host and port is another destination. */
    int n;
    char err[256] = "";
    cr_expect_eq(triage_pacs_parse_destinations("A@h:1,B@h:1,A@h:2", d, 4, &n, err, sizeof err), 0,
                 "%s", err);
    cr_expect_eq(n, 3);
}

/* PS3.7 C.1.2: warnings (stored) are 0001, 0107, 0116 and any Bxxx; B001
 * and the others had been taken for failures and the object sent again. */
Test(pacs, warning_statuses_mean_stored)
{
    const int stored[] = {0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB001, 0xB006, 0xB007, 0xBFFF};
    const int refused[] = {0xA700, 0xA7FF, 0xA900, 0xC000, 0xCFFF, 0x0110,
                           0x0122, 0x0211, 0xFF00, 0xFE00, -1,     SCP_SEND_STOPPED};
    for (size_t i = 0; i < sizeof stored / sizeof stored[0]; i++)
        cr_expect(scp_send_status_ok(stored[i]), "0x%04X", (unsigned)stored[i]);
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++)
        cr_expect(!scp_send_status_ok(refused[i]), "0x%04X", (unsigned)refused[i]);
}

/* Rows of the slice drawn white in column x of the image area (56..567). */
static int white_rows(const struct triage_pacs_picture *pic, int x)
{
    uint8_t *rgb = NULL;
    int rows = 0, cols = 0, n = 0;
    char err[256];
    cr_assert_eq(triage_pacs_render(pic, &rgb, &rows, &cols, err, sizeof err), 0, "%s", err);
    for (int y = 56; y < 56 + 512; y++)
        n += rgb[((size_t)y * (size_t)cols + (size_t)x) * 3] == 255;
    free(rgb);
    return n;
}

/* A slice whose rows are half as far apart as its columns is drawn half as
 * tall as it is wide, as a viewer would show it. */
Test(pacs, picture_keeps_the_pixel_aspect)
{
    enum { R = 64, C = 64 };
    float *hu = malloc(sizeof *hu * R * C);
    cr_assert_not_null(hu);
    for (int i = 0; i < R * C; i++)
        hu[i] = 80.0f; /* white in the brain window */
    struct triage_pacs_picture pic = {.hu = hu,
                                      .hu_rows = R,
                                      .hu_cols = C,
                                      .pixel_aspect = 1,
                                      .slices = 0,
                                      .model_version = "unit"};
    int square = white_rows(&pic, 400);
    pic.pixel_aspect = 0.5;
    int flat = white_rows(&pic, 400);
    cr_expect_geq(square, 500, "%d", square);
    cr_expect(flat >= 250 && flat <= 262, "%d of %d", flat, square);
    free(hu);
}

Test(pacs, picture_has_the_slice_and_the_text)
{
    enum { R = 64, C = 64, S = 5 };
    float *hu = malloc(sizeof *hu * R * C);
    cr_assert_not_null(hu);
    for (int i = 0; i < R * C; i++)
        hu[i] = (i % C) < C / 2 ? -1000.0f : 80.0f; /* air left, white right */
    float p[S] = {0.1f, 0.2f, 0.9f, 0.3f, 0.05f};
    double sub[5] = {0.1, 0.7, 0.2, 0.1, 0.6};
    struct triage_pacs_picture pic = {.hu = hu,
                                      .hu_rows = R,
                                      .hu_cols = C,
                                      .pixel_aspect = 1,
                                      .p_any = p,
                                      .slices = S,
                                      .key_index = 2,
                                      .key_instance_number = 7,
                                      .key_frames = 1,
                                      .suspected = true,
                                      .p_study = 0.9,
                                      .p_subtype = sub,
                                      .subtype_threshold = 0.5,
                                      .model_version = "unit",
                                      .revision = 1};
    uint8_t *rgb = NULL;
    int rows = 0, cols = 0;
    char err[256];
    cr_assert_eq(triage_pacs_render(&pic, &rgb, &rows, &cols, err, sizeof err), 0, "%s", err);
    cr_assert_eq(rows, TRIAGE_PACS_PICTURE_HEIGHT);
    cr_assert_eq(cols, TRIAGE_PACS_PICTURE_WIDTH);
    /* The image area's middle row: black on the left, white on the right. */
    const uint8_t *mid = rgb + (size_t)(56 + 256) * (size_t)cols * 3;
    cr_expect_eq(mid[(64) * 3], 0);
    cr_expect_eq(mid[(448) * 3], 255);
    /* Text was drawn in the header (some non-black pixel). */
    int lit = 0;
    for (int i = 0; i < 40 * cols * 3; i++)
        lit += rgb[i] > 0;
    cr_expect_gt(lit, 100);
    free(rgb);
    free(hu);
    pic.hu = NULL;
    cr_expect_eq(triage_pacs_render(&pic, &rgb, &rows, &cols, err, sizeof err), -1);
}

/* The key slice's caption names its place from the feet and the image PACS
 * shows, as the web page does: it had said "key slice 3 of 5" by position
 * alone, where PACS numbers images by InstanceNumber. */
Test(pacs, slice_caption_names_the_image)
{
    char c[96];
    triage_slice_caption(c, sizeof c, 2, 5, 10, 0, 1);
    cr_expect_str_eq(c, "slice 3 of 5 (image 10)");
    triage_slice_caption(c, sizeof c, 2, 5, 1, 2, 40);
    cr_expect_str_eq(c, "slice 3 of 5 (image 1, frame 3)");
    triage_slice_caption(c, sizeof c, 0, 5, -1, 0, 1);
    cr_expect_str_eq(c, "slice 1 of 5");
    triage_slice_caption(c, 8, 2, 5, 10, 0, 1);
    cr_expect_str_eq(c, "slice 3");
}

Test(pacs, outbox_counts_on_a_fresh_database)
{
    char dir[] = "/tmp/ichtriage-pacs-unit.XXXXXX", path[128], err[256];
    cr_assert_not_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/t.db", dir);
    struct db *db;
    cr_assert_eq(db_open(&db, path, err, sizeof err), 0, "%s", err);
    struct db_outbox_counts c;
    cr_assert_eq(db_outbox_counts(db, &c), 0);
    cr_expect_eq(c.pending + c.sent + c.failed, 0);
    struct db_outbox_new fresh[4];
    int n = -1;
    cr_assert_eq(db_outbox_scan(db, fresh, 4, &n), 0);
    cr_expect_eq(n, 0);
    bool found = true;
    int64_t at;
    cr_assert_eq(db_outbox_next_due(db, "PACS@127.0.0.1:9", &at, &found), 0);
    cr_expect(!found);
    int64_t failed = -1, unbuilt = -1;
    cr_assert_eq(db_outbox_failed_since(db, 0, &failed, &unbuilt), 0);
    cr_expect_eq(failed, 0);
    cr_expect_eq(unbuilt, 0);
    cr_expect_eq(c.revisions_failed, 0);
    db_close(db);
    char cmd[200];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_expect_eq(system(cmd), 0);
}

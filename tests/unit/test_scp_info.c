/* Unit tests of scp/'s C helpers: UID checks (everything in a spool path
 * passes them), SOP class tables, refusing what is not DICOM, and geometry
 * that is not finite. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "scp_info.h"
#include "scp_write.h"
#include "volume.h"

Test(scp_info, uid_validity)
{
    cr_assert(scp_uid_valid("1.2.840.10008.5.1.4.1.1.2"));
    cr_assert(scp_uid_valid("2.25.123456789"));
    cr_assert_not(scp_uid_valid(""));
    cr_assert_not(scp_uid_valid(NULL));
    cr_assert_not(scp_uid_valid("../../etc"));
    cr_assert_not(scp_uid_valid(".1.2"));
    cr_assert_not(scp_uid_valid("1.2."));
    cr_assert_not(scp_uid_valid("1..2"));
    cr_assert_not(scp_uid_valid("1.2/3"));
    cr_assert_not(scp_uid_valid("1.2.3 "));
    char longuid[80];
    memset(longuid, '1', 65);
    longuid[65] = 0;
    cr_assert_not(scp_uid_valid(longuid));
    longuid[64] = 0;
    cr_assert(scp_uid_valid(longuid));
}

Test(scp_info, sop_classes)
{
    cr_assert(scp_sop_class_is_ct("1.2.840.10008.5.1.4.1.1.2"));
    cr_assert(scp_sop_class_is_ct("1.2.840.10008.5.1.4.1.1.2.1"));
    cr_assert_not(scp_sop_class_is_ct("1.2.840.10008.5.1.4.1.1.4"));
    cr_assert(scp_sop_class_storable("1.2.840.10008.5.1.4.1.1.4")); /* MR */
    cr_assert(scp_sop_class_storable("1.2.840.10008.5.1.4.1.1.7")); /* SC */
    cr_assert_not(scp_sop_class_storable("1.2.840.10008.1.1"));     /* Verification */
}

Test(scp_info, garbage_is_refused_with_a_message)
{
    char path[] = "/tmp/ichtriage-garbage-XXXXXX";
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    const char junk[] = "this is not a DICOM file at all, just text\n";
    cr_assert_eq(write(fd, junk, sizeof junk), (ssize_t)sizeof junk);
    close(fd);
    struct scp_info info;
    char err[256] = "";
    int rc = scp_info_read(path, &info, err, sizeof err);
    /* dcmtk may read text as a (meaningless) dataset; either way no UIDs come out. */
    if (rc == 0)
        cr_assert_not(scp_uid_valid(info.sop_uid));
    else
        cr_assert(strlen(err) > 0);
    cr_assert_eq(scp_info_read("/nonexistent/file.dcm", &info, err, sizeof err), -1);
    cr_assert(strstr(err, "cannot") != NULL, "%s", err);
    unlink(path);
}

/* Writes a size x size axial CT slice at position pos (instance number i)
 * into dir as NN.dcm; path receives its name. */
static void write_slice_of(const char *dir, int i, int size, const double pos[3],
                           const double orient[6], char *path, size_t len)
{
    /* Only what the geometry needs: empty strings for the rest. */
    static const struct scp_ct_study st = {.study_uid = "2.25.7001"};
    struct scp_ct_series se = {
        .series_uid = "2.25.7002", .frame_of_ref_uid = "2.25.7003", .pixel_spacing = {0.5, 0.5}};
    memcpy(se.orientation, orient, sizeof se.orientation);
    uint16_t *pix = malloc(sizeof *pix * (size_t)size * (size_t)size);
    cr_assert_not_null(pix);
    for (int k = 0; k < size * size; k++)
        pix[k] = (uint16_t)(1000 + k % 1000);
    char sop[32];
    snprintf(sop, sizeof sop, "2.25.71%02d", i);
    struct scp_ct_image im = {.sop_uid = sop,
                              .instance_number = i + 1,
                              .rescale_slope = 1,
                              .rows = size,
                              .columns = size};
    im.pixels = pix;
    memcpy(im.position, pos, sizeof im.position);
    snprintf(path, len, "%s/%02d.dcm", dir, i);
    char err[256];
    cr_assert_eq(scp_write_ct(path, &st, &se, &im, err, sizeof err), 0, "%s", err);
    free(pix);
}

/* The same, of the smallest size the model reads. */
static void write_slice(const char *dir, int i, const double pos[3], const double orient[6],
                        char *path, size_t len)
{
    write_slice_of(dir, i, TRIAGE_MIN_DIM, pos, orient, path, len);
}

/* A NaN (or infinite) position or orientation is no geometry: the slice is
 * dropped and counted, not placed. A NaN position had been read as present,
 * made by_along an inconsistent comparator, and the whole series came out
 * in a scrambled order (16 slices kept, "about 1 slice(s) missing"). */
Test(scp_info, geometry_that_is_not_finite_is_missing)
{
    char dir[] = "/tmp/ichtriage-geometry-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    enum { N = 16, BAD = 5 };
    const double axial[6] = {1, 0, 0, 0, 1, 0};
    char paths[N][300];
    const char *order[N];
    for (int i = 0; i < N; i++) {
        double pos[3] = {-2, -2, 2.5 * i};
        if (i == BAD) pos[0] = NAN;
        write_slice(dir, i, pos, axial, paths[i], sizeof paths[i]);
        order[i] = paths[(i * 7) % N]; /* not in z order */
    }
    struct scp_info in;
    char err[512];
    cr_assert_eq(scp_info_read(paths[BAD], &in, err, sizeof err), 0, "%s", err);
    cr_assert_not(in.has_position);
    cr_assert(in.has_orientation);
    cr_assert_eq(scp_info_read(paths[0], &in, err, sizeof err), 0, "%s", err);
    cr_assert(in.has_position);

    char inf_path[300];
    const double tilted[6] = {1, 0, 0, 0, INFINITY, 0}, pos[3] = {0, 0, 0};
    write_slice(dir, 99, pos, tilted, inf_path, sizeof inf_path);
    cr_assert_eq(scp_info_read(inf_path, &in, err, sizeof err), 0, "%s", err);
    cr_assert_not(in.has_orientation);
    cr_assert(in.has_position);

    struct triage_volume v;
    cr_assert_eq(triage_volume_build(order, N, &v, err, sizeof err), 0, "%s", err);
    cr_assert_eq(v.n, N - 1, "%d slices: %s", v.n, v.note);
    cr_assert_eq(v.dropped_inconsistent, 1, "%s", v.note);
    for (int i = 0; i < v.n; i++) {
        int z = i < BAD ? i : i + 1; /* the slice at BAD is the one left out */
        cr_assert_float_eq(v.slices[i].along, 2.5 * z, 1e-6, "slice %d at %g", i,
                           v.slices[i].along);
    }
    cr_assert_eq(v.missing_slices, 1, "%s", v.note);
    triage_volume_free(&v);

    for (int i = 0; i < N; i++)
        unlink(paths[i]);
    unlink(inf_path);
    rmdir(dir);
}

/* As many sagittal images as axial ones in a series: the axial plane is
 * kept whichever file comes first (the node and predict list files in
 * other orders; the first file's plane had won the tie). */
Test(scp_info, a_tie_of_planes_keeps_the_axial_one)
{
    char dir[] = "/tmp/ichtriage-tie-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    enum { N = 4 };
    const double axial[6] = {1, 0, 0, 0, 1, 0}, sagittal[6] = {0, 1, 0, 0, 0, -1};
    char paths[2 * N][300];
    for (int i = 0; i < N; i++) {
        double a[3] = {-2, -2, 2.5 * i}, g[3] = {2.5 * i, -2, 2};
        write_slice(dir, i, a, axial, paths[i], sizeof paths[i]);
        write_slice(dir, N + i, g, sagittal, paths[N + i], sizeof paths[N + i]);
    }
    for (int first_sagittal = 0; first_sagittal < 2; first_sagittal++) {
        const char *order[2 * N];
        for (int i = 0; i < 2 * N; i++)
            order[i] = paths[first_sagittal ? (i + N) % (2 * N) : i];
        struct triage_volume v;
        char err[512];
        cr_assert_eq(triage_volume_build(order, 2 * N, &v, err, sizeof err), 0, "%s", err);
        cr_expect_eq(v.n, N);
        cr_expect_float_eq(fabs(v.normal[2]), 1.0, 1e-9, "sagittal first: %d, normal %g,%g,%g",
                           first_sagittal, v.normal[0], v.normal[1], v.normal[2]);
        triage_volume_free(&v);
    }
    for (int i = 0; i < 2 * N; i++)
        unlink(paths[i]);
    rmdir(dir);
}

/* Slices go from the feet to the head, whichever way their rows and
 * columns run: with columns running 0,-1,0 the normal of rows x columns
 * points to the feet, and the series had come out head first (the page
 * labels the strip foot to head). */
Test(scp_info, slices_go_from_the_feet_to_the_head)
{
    char dir[] = "/tmp/ichtriage-order-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    enum { N = 4 };
    const double flipped[6] = {1, 0, 0, 0, -1, 0};
    char paths[N][300];
    const char *order[N];
    for (int i = 0; i < N; i++) {
        double pos[3] = {-2, 2, 2.5 * i};
        write_slice(dir, i, pos, flipped, paths[i], sizeof paths[i]);
        order[i] = paths[i];
    }
    struct triage_volume v;
    char err[512];
    cr_assert_eq(triage_volume_build(order, N, &v, err, sizeof err), 0, "%s", err);
    cr_assert_eq(v.n, N);
    cr_expect_float_eq(v.normal[2], 1.0, 1e-9, "normal %g,%g,%g", v.normal[0], v.normal[1],
                       v.normal[2]);
    for (int i = 0; i < N; i++)
        cr_expect_float_eq(v.slices[i].pos[2], 2.5 * i, 1e-9, "slice %d at z %g", i,
                           v.slices[i].pos[2]);
    cr_expect_eq(v.missing_slices + v.duplicate_positions, 0, "%s", v.note);
    triage_volume_free(&v);
    for (int i = 0; i < N; i++)
        unlink(paths[i]);
    rmdir(dir);
}

/* Images smaller than TRIAGE_MIN_DIM are no slices the model can read:
 * left out and counted beside real ones, and a series of nothing else
 * fails with the reason. A series of twelve 1x1 images had been triaged at
 * 0.000. */
Test(scp_info, images_too_small_for_the_model_are_left_out)
{
    char dir[] = "/tmp/ichtriage-small-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    enum { N = 6, TINY = 8 };
    const double axial[6] = {1, 0, 0, 0, 1, 0};
    char paths[N + TINY][300];
    const char *order[N + TINY];
    for (int i = 0; i < N + TINY; i++) {
        double pos[3] = {-2, -2, 2.5 * i};
        write_slice_of(dir, i, i < N ? TRIAGE_MIN_DIM : 1, pos, axial, paths[i], sizeof paths[i]);
        order[i] = paths[i];
    }
    struct triage_volume v;
    char err[512];
    cr_assert_eq(triage_volume_build(order, N + TINY, &v, err, sizeof err), 0, "%s", err);
    cr_assert_eq(v.n, N, "%d slices: %s", v.n, v.note);
    cr_assert_eq(v.dropped_inconsistent, TINY, "%s", v.note);
    triage_volume_free(&v);
    cr_assert_eq(triage_volume_build(order + N, TINY, &v, err, sizeof err), -1);
    cr_assert(strstr(err, "image size 1x1 out of range"), "%s", err);
    for (int i = 0; i < N + TINY; i++)
        unlink(paths[i]);
    rmdir(dir);
}

/* Images whose headers say more rows or columns than the pixel reader
 * decodes (SCP_PIXELS_MAX_DIM) are left out the same way: a series whose
 * headers said 65535x65535 had the node allocate 17 GB for one slice before
 * its pixel decoder refused ("exited with status 5"). */
Test(scp_info, images_larger_than_the_reader_decodes_are_left_out)
{
    char dir[] = "/tmp/ichtriage-huge-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    enum { N = 6 };
    const double axial[6] = {1, 0, 0, 0, 1, 0};
    char paths[N][300], cmd[4000];
    const char *order[N];
    for (int i = 0; i < N; i++) {
        double pos[3] = {-2, -2, 2.5 * i};
        write_slice(dir, i, pos, axial, paths[i], sizeof paths[i]);
        order[i] = paths[i];
    }
    snprintf(cmd, sizeof cmd, "dcmodify -nb -m '(0028,0010)=65535' -m '(0028,0011)=65535' %s/*.dcm",
             dir);
    cr_assert_eq(system(cmd), 0, "%s", cmd);
    struct triage_volume v;
    char err[512];
    cr_assert_eq(triage_volume_build(order, N, &v, err, sizeof err), -1);
    cr_assert(strstr(err, "image size 65535x65535 out of range (64x64 to 8192x8192)"), "%s", err);
    for (int i = 0; i < N; i++)
        unlink(paths[i]);
    rmdir(dir);
}

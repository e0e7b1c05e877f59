/* Tests of the phantom generator and of the DICOM layer under it:
 * reproducibility for a seed, labels and masks that follow the visibility
 * rule (measured on the files through the node's own pixel reader), the CT
 * writer's round trip through scp_info and scp_pixels, and the pixel reader
 * on compressed transfer syntaxes. */
#include <criterion/criterion.h>
#include <dirent.h>
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "phantom.h"
#include "scp_info.h"
#include "scp_pixels.h"
#include "scp_write.h"

static void make_tmpdir(char *out, size_t n)
{
    const char *base = getenv("TMPDIR");
    snprintf(out, n, "%s/ichtriage-phantom-XXXXXX", base && *base ? base : "/tmp");
    cr_assert_not_null(mkdtemp(out));
}

static void remove_tree(const char *dir)
{
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    cr_assert_eq(system(cmd), 0);
}

static unsigned char *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "%s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc((size_t)n + 1);
    cr_assert_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    buf[n] = 0;
    *len = (size_t)n;
    return buf;
}

/* Small, fast studies: 128-256 pixels, about 16 slices. */
static void small_opts(struct train_phantom_opts *o, const char *dir, uint64_t seed)
{
    train_phantom_opts_default(o);
    o->outdir = dir;
    o->seed = seed;
    o->count = 2;
    o->size = 160;
    o->slices_min = 14;
    o->slices_max = 18;
    o->thickness_min = 5;
    o->thickness_max = 5;
}

static void run_ok(const struct train_phantom_opts *o)
{
    char err[512] = "";
    cr_assert_eq(train_phantom_run(o, err, sizeof err), 0, "%s", err);
}

/* Compares every file of subdirectory sub of a and b byte by byte;
 * returns how many files there were. */
static int compare_dirs(const char *a, const char *b, const char *sub)
{
    char da[4200], db[4200];
    snprintf(da, sizeof da, "%s/%s", a, sub);
    snprintf(db, sizeof db, "%s/%s", b, sub);
    DIR *d = opendir(da);
    cr_assert_not_null(d, "%s", da);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char pa[8400], pb[8400];
        snprintf(pa, sizeof pa, "%s/%s", da, e->d_name);
        snprintf(pb, sizeof pb, "%s/%s", db, e->d_name);
        struct stat st;
        cr_assert_eq(stat(pa, &st), 0);
        if (!S_ISREG(st.st_mode)) continue;
        size_t la, lb;
        unsigned char *ba = read_all(pa, &la);
        cr_assert_eq(stat(pb, &st), 0, "%s missing in the second run", e->d_name);
        unsigned char *bb = read_all(pb, &lb);
        cr_assert(la == lb && memcmp(ba, bb, la) == 0, "%s differs between runs", e->d_name);
        free(ba);
        free(bb);
        n++;
    }
    closedir(d);
    return n;
}

Test(phantom, same_seed_same_bytes_other_seed_other_files, .timeout = 120)
{
    char a[256], b[256], c[256];
    make_tmpdir(a, sizeof a);
    make_tmpdir(b, sizeof b);
    make_tmpdir(c, sizeof c);
    struct train_phantom_opts o;
    small_opts(&o, a, 42);
    o.preview = true;
    run_ok(&o);
    small_opts(&o, b, 42);
    o.preview = true;
    run_ok(&o);
    cr_assert_geq(compare_dirs(a, b, "stage_2_train"), 28);
    cr_assert_eq(compare_dirs(a, b, "preview"), 2);
    cr_assert_eq(compare_dirs(a, b, "."), 3); /* the three CSV files */

    /* another seed: other UIDs, so no file name in common */
    small_opts(&o, c, 43);
    run_ok(&o);
    size_t la, lc;
    char pa[300], pc[300];
    snprintf(pa, sizeof pa, "%s/stage_2_train.csv", a);
    snprintf(pc, sizeof pc, "%s/stage_2_train.csv", c);
    unsigned char *ca = read_all(pa, &la), *cc = read_all(pc, &lc);
    const char *first_a = strchr((char *)ca, '\n') + 1, *first_c = strchr((char *)cc, '\n') + 1;
    cr_assert_neq(strncmp(first_a, first_c, 40), 0);
    free(ca);
    free(cc);
    remove_tree(a);
    remove_tree(b);
    remove_tree(c);
}

Test(phantom, a_study_does_not_depend_on_the_ones_before_it, .timeout = 120)
{
    char a[256], b[256];
    make_tmpdir(a, sizeof a);
    make_tmpdir(b, sizeof b);
    struct train_phantom_opts o;
    small_opts(&o, a, 7);
    o.count = 2;
    run_ok(&o);
    small_opts(&o, b, 7);
    o.count = 1;
    o.first_study = 1;
    run_ok(&o);
    /* every file of the second run is the same file in the first */
    cr_assert_geq(compare_dirs(b, a, "stage_2_train"), 14);
    remove_tree(a);
    remove_tree(b);
}

/* ---- labels against the visibility rule ---- */

struct label_row {
    char image[80];
    int value[TRAIN_PHANTOM_NSUBTYPES + 1];
};

/* Reads stage_2_train.csv, checking its layout: the header, then six rows
 * per image in the project's label order. */
static struct label_row *read_labels(const char *dir, int *n)
{
    char path[300];
    snprintf(path, sizeof path, "%s/stage_2_train.csv", dir);
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f);
    char line[256];
    cr_assert_not_null(fgets(line, sizeof line, f));
    cr_assert_str_eq(line, "ID,Label\n");
    int cap = 64, count = 0, k = 0;
    struct label_row *rows = calloc((size_t)cap, sizeof *rows);
    while (fgets(line, sizeof line, f)) {
        char *comma = strrchr(line, ',');
        cr_assert_not_null(comma, "%s", line);
        *comma = 0;
        const char *name = train_phantom_label_names[k];
        size_t ln = strlen(line), lname = strlen(name);
        cr_assert(ln > lname + 1 && line[ln - lname - 1] == '_' &&
                      strcmp(line + ln - lname, name) == 0,
                  "row %s: expected label %s", line, name);
        line[ln - lname - 1] = 0;
        if (k == 0) {
            if (count == cap) rows = realloc(rows, sizeof *rows * (size_t)(cap *= 2));
            memset(&rows[count], 0, sizeof rows[count]);
            snprintf(rows[count].image, sizeof rows[count].image, "%s", line);
            count++;
        } else {
            cr_assert_str_eq(line, rows[count - 1].image);
        }
        cr_assert(comma[1] == '0' || comma[1] == '1');
        rows[count - 1].value[k] = comma[1] - '0';
        k = (k + 1) % (TRAIN_PHANTOM_NSUBTYPES + 1);
    }
    cr_assert_eq(k, 0, "incomplete group of six rows");
    fclose(f);
    *n = count;
    return rows;
}

/* masks/<image>.png of dir as rows x cols bytes (libpng), or NULL when
 * there is no such file. */
static uint8_t *read_mask(const char *dir, const char *image, int rows, int cols)
{
    char path[400];
    snprintf(path, sizeof path, "%s/masks/%s.png", dir, image);
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png_create_info_struct(png);
    cr_assert(png && info);
    cr_assert_eq(setjmp(png_jmpbuf(png)), 0, "%s: not a PNG libpng can read", path);
    png_init_io(png, f);
    png_read_info(png, info);
    cr_assert_eq(png_get_image_width(png, info), (png_uint_32)cols, "%s", path);
    cr_assert_eq(png_get_image_height(png, info), (png_uint_32)rows, "%s", path);
    cr_assert_eq(png_get_color_type(png, info), PNG_COLOR_TYPE_GRAY, "%s", path);
    cr_assert_eq(png_get_bit_depth(png, info), 8, "%s", path);
    uint8_t *m = malloc((size_t)rows * cols);
    for (int y = 0; y < rows; y++)
        png_read_row(png, m + (size_t)y * cols, NULL);
    png_destroy_read_struct(&png, &info, NULL);
    fclose(f);
    return m;
}

static void read_hu(const char *dir, const char *image, struct scp_pixels *px,
                    struct scp_info *info)
{
    char path[400], err[512] = "";
    snprintf(path, sizeof path, "%s/stage_2_train/%s.dcm", dir, image);
    cr_assert_eq(scp_pixels_read(path, px, err, sizeof err), 0, "%s", err);
    cr_assert_eq(scp_info_read(path, info, err, sizeof err), 0, "%s", err);
}

Test(phantom, labels_follow_the_visibility_rule, .timeout = 180)
{
    char full[256], omit[TRAIN_PHANTOM_NSUBTYPES][256];
    make_tmpdir(full, sizeof full);
    struct train_phantom_opts o;
    small_opts(&o, full, 2024);
    o.size = 256;
    o.count = 3;
    o.noise_min = o.noise_max = 0;
    o.prevalence = 1;
    for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++)
        o.subtype_prevalence[k] = 1;
    o.masks = true;
    run_ok(&o);
    for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++) {
        make_tmpdir(omit[k], sizeof omit[k]);
        struct train_phantom_opts ok = o;
        ok.outdir = omit[k];
        ok.masks = false;
        ok.omit_blood_mask = 1u << k;
        run_ok(&ok);
    }
    int n;
    struct label_row *rows = read_labels(full, &n);
    cr_assert_geq(n, 3 * 14);
    int positives[TRAIN_PHANTOM_NSUBTYPES + 1] = {0}, negatives = 0;
    size_t masked[TRAIN_PHANTOM_NSUBTYPES] = {0};
    for (int i = 0; i < n; i++) {
        struct scp_pixels a, b;
        struct scp_info ia, ib;
        read_hu(full, rows[i].image, &a, &ia);
        cr_assert_eq(a.frames, 1);
        double px_area = ia.pixel_spacing[0] * ia.pixel_spacing[1];
        /* --masks: a file for each slice with a positive label, none for the others */
        uint8_t *mask = read_mask(full, rows[i].image, a.rows, a.columns);
        cr_assert_eq(mask != NULL, rows[i].value[0] == 1, "%s: mask file %s", rows[i].image,
                     mask ? "without a positive label" : "missing");
        int any = 0;
        for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++) {
            read_hu(omit[k], rows[i].image, &b, &ib);
            cr_assert_str_eq(ia.sop_uid, ib.sop_uid);
            cr_assert_eq(a.rows * a.columns, b.rows * b.columns);
            /* stored values are rounded, so a true excess of 10 HU reads
             * as at least 9, and a read excess of 11 is at least 10 */
            int label = rows[i].value[k + 1];
            size_t lenient = 0, strict = 0, in_mask = 0;
            for (size_t p = 0; p < (size_t)a.rows * a.columns; p++) {
                float d = a.hu[p] - b.hu[p];
                lenient += d >= TRAIN_PHANTOM_MIN_EXCESS_HU - 1;
                strict += d >= TRAIN_PHANTOM_MIN_EXCESS_HU + 1;
                /* the mask marks exactly the pixels the label counts: all
                 * of them when the label is positive, none otherwise */
                int m = mask && (mask[p] >> k & 1);
                in_mask += m;
                if (m)
                    cr_assert(label && d >= TRAIN_PHANTOM_MIN_EXCESS_HU - 1,
                              "%s: %s mask on a pixel %.1f HU above the blood-free slice%s",
                              rows[i].image, train_phantom_label_names[k + 1], d,
                              label ? "" : " of a negative label");
                else
                    cr_assert(!label || d < TRAIN_PHANTOM_MIN_EXCESS_HU + 1,
                              "%s: %s mask misses a pixel %.1f HU above the blood-free slice",
                              rows[i].image, train_phantom_label_names[k + 1], d);
            }
            masked[k] += in_mask;
            if (label)
                cr_assert_geq(lenient * px_area, TRAIN_PHANTOM_MIN_AREA_MM2,
                              "%s labelled %s but only %.1f mm^2 show the blood", rows[i].image,
                              train_phantom_label_names[k + 1], lenient * px_area);
            else
                cr_assert_lt(strict * px_area, TRAIN_PHANTOM_MIN_AREA_MM2,
                             "%s not labelled %s but %.1f mm^2 show the blood", rows[i].image,
                             train_phantom_label_names[k + 1], strict * px_area);
            positives[k + 1] += label;
            any |= label;
            scp_pixels_free(&b);
        }
        cr_assert_eq(rows[i].value[0], any, "%s: any must be the OR of the subtypes",
                     rows[i].image);
        if (mask)
            for (size_t p = 0; p < (size_t)a.rows * a.columns; p++)
                cr_assert_eq(mask[p] >> TRAIN_PHANTOM_NSUBTYPES, 0, "%s: unknown mask bits",
                             rows[i].image);
        free(mask);
        positives[0] += any;
        negatives += !any;
        scp_pixels_free(&a);
    }
    /* the check above must have had both kinds of slices to look at */
    cr_assert_gt(positives[0], 0);
    cr_assert_gt(negatives, 0);
    int subtypes_seen = 0;
    for (int k = 1; k <= TRAIN_PHANTOM_NSUBTYPES; k++)
        subtypes_seen += positives[k] > 0;
    cr_assert_geq(subtypes_seen, 4, "only %d subtypes visible in three studies", subtypes_seen);
    for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++)
        cr_assert_eq(masked[k] > 0, positives[k + 1] > 0, "%s: %zu mask pixels, %d positive slices",
                     train_phantom_label_names[k + 1], masked[k], positives[k + 1]);
    free(rows);
    remove_tree(full);
    for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++)
        remove_tree(omit[k]);
}

Test(phantom, options_are_checked)
{
    struct train_phantom_opts o;
    char err[256];
    small_opts(&o, "/tmp/unused", 1);
    cr_assert_eq(train_phantom_opts_check(&o, err, sizeof err), 0, "%s", err);
    o.prevalence = 1.5;
    cr_assert_eq(train_phantom_opts_check(&o, err, sizeof err), -1);
    cr_assert(strstr(err, "prevalence") != NULL, "%s", err);
    small_opts(&o, "/tmp/unused", 1);
    o.size = 8;
    cr_assert_eq(train_phantom_opts_check(&o, err, sizeof err), -1);
    cr_assert(strstr(err, "size") != NULL, "%s", err);
    small_opts(&o, NULL, 1);
    cr_assert_eq(train_phantom_opts_check(&o, err, sizeof err), -1);
    cr_assert(strstr(err, "output directory") != NULL, "%s", err);
}

/* ---- the DICOM layer ---- */

static int try_write_test_image(const char *path, int rows, int cols, uint16_t *pix, char *err,
                                size_t errlen)
{
    struct scp_ct_study st = {.patient_name = "TEST^ROUND^TRIP",
                              .patient_id = "RT1",
                              .patient_birth_date = "19700101",
                              .patient_sex = "O",
                              .study_uid = "2.25.1001",
                              .study_date = "20240102",
                              .study_time = "030405",
                              .study_id = "7",
                              .accession = "ACC9",
                              .study_desc = "round trip",
                              .referring_physician = ""};
    struct scp_ct_series se = {.series_uid = "2.25.1002",
                               .frame_of_ref_uid = "2.25.1003",
                               .series_desc = "rt",
                               .manufacturer = "m",
                               .model_name = "x",
                               .convolution_kernel = "K",
                               .body_part = "HEAD",
                               .series_number = 3,
                               .kvp = 120,
                               .slice_thickness = 2.5,
                               .pixel_spacing = {0.5, 0.75},
                               .orientation = {1, 0, 0, 0, 1, 0},
                               .window_center = 40,
                               .window_width = 80};
    for (int i = 0; i < rows * cols; i++)
        pix[i] = (uint16_t)((i * 37) % 4096);
    struct scp_ct_image im = {.sop_uid = "2.25.1004",
                              .instance_number = 12,
                              .position = {-100.5, -90.25, 33.75},
                              .slice_location = 33.75,
                              .rescale_slope = 1,
                              .rescale_intercept = -1024,
                              .rows = rows,
                              .columns = cols,
                              .pixels = pix};
    return scp_write_ct(path, &st, &se, &im, err, errlen);
}

static void write_test_image(const char *path, int rows, int cols, uint16_t *pix)
{
    char err[512] = "";
    cr_assert_eq(try_write_test_image(path, rows, cols, pix, err, sizeof err), 0, "%s", err);
}

/* A write that fails says the system's reason, not only dcmtk's "I/O
 * suspension or premature end of stream", and leaves no file; /dev/full
 * fails every write with ENOSPC, as a full disk does, and is not removed. */
Test(scp_write, a_failed_write_says_why_and_leaves_nothing)
{
    uint16_t pix[64 * 64];
    char err[512] = "";
    cr_assert_eq(try_write_test_image("/dev/full", 64, 64, pix, err, sizeof err), -1);
    cr_assert(strstr(err, "No space left on device") != NULL, "%s", err);
    struct stat st;
    cr_assert(stat("/dev/full", &st) == 0 && S_ISCHR(st.st_mode), "/dev/full is still there");

    char dir[256], path[300];
    make_tmpdir(dir, sizeof dir);
    snprintf(path, sizeof path, "%s/missing/x.dcm", dir);
    cr_assert_eq(try_write_test_image(path, 64, 64, pix, err, sizeof err), -1);
    cr_assert(strstr(err, "No such file or directory") != NULL, "%s", err);
    remove_tree(dir);
}

/* Writes a rows x cols test image called name into a fresh folder (dir and
 * path, 256 and 300 bytes, filled in); returns its stored values, which the
 * caller frees. */
static uint16_t *make_test_file(char *dir, char *path, const char *name, int rows, int cols)
{
    make_tmpdir(dir, 256);
    snprintf(path, 300, "%s/%s", dir, name);
    uint16_t *pix = malloc(sizeof(uint16_t) * rows * cols);
    write_test_image(path, rows, cols, pix);
    return pix;
}

Test(scp_write, ct_round_trip_through_the_readers)
{
    char dir[256], path[300], err[512] = "";
    int rows = 40, cols = 56;
    uint16_t *pix = make_test_file(dir, path, "rt.dcm", rows, cols);

    struct scp_info info;
    cr_assert_eq(scp_info_read(path, &info, err, sizeof err), 0, "%s", err);
    cr_assert_str_eq(info.sop_class, "1.2.840.10008.5.1.4.1.1.2");
    cr_assert_str_eq(info.sop_uid, "2.25.1004");
    cr_assert_str_eq(info.study_uid, "2.25.1001");
    cr_assert_str_eq(info.series_uid, "2.25.1002");
    cr_assert_str_eq(info.frame_of_ref_uid, "2.25.1003");
    cr_assert_str_eq(info.patient_id, "RT1");
    cr_assert_str_eq(info.accession, "ACC9");
    cr_assert_str_eq(info.modality, "CT");
    cr_assert_eq(info.instance_number, 12);
    cr_assert_eq(info.series_number, 3);
    cr_assert_eq(info.rows, rows);
    cr_assert_eq(info.columns, cols);
    cr_assert_float_eq(info.pixel_spacing[1], 0.75, 1e-9);
    cr_assert_float_eq(info.position[2], 33.75, 1e-9);
    cr_assert_float_eq(info.slice_thickness, 2.5, 1e-9);
    cr_assert_float_eq(info.rescale_intercept, -1024, 1e-9);

    struct scp_pixels px;
    cr_assert_eq(scp_pixels_read(path, &px, err, sizeof err), 0, "%s", err);
    cr_assert_eq(px.rows, rows);
    cr_assert_eq(px.columns, cols);
    cr_assert_eq(px.frames, 1);
    for (int i = 0; i < rows * cols; i++)
        cr_assert_float_eq(px.hu[i], (float)pix[i] - 1024.0f, 1e-3, "pixel %d", i);
    scp_pixels_free(&px);
    scp_pixels_free(&px); /* freeing twice is harmless */
    scp_pixels_free(NULL);
    free(pix);
    remove_tree(dir);
}

/* Runs the dcmtk converter tool (with its options) from in to out. */
static void encode(const char *tool, const char *in, const char *out)
{
    char cmd[1000];
    snprintf(cmd, sizeof cmd, "%s '%s' '%s' 2>/dev/null", tool, in, out);
    cr_assert_eq(system(cmd), 0, "%s failed", cmd);
}

/* The reader decodes lossless JPEG, JPEG-LS and RLE to the same HU. */
Test(scp_pixels, compressed_syntaxes_decode_to_the_same_values)
{
    char dir[256], path[300], err[512] = "";
    int rows = 64, cols = 64;
    uint16_t *pix = make_test_file(dir, path, "plain.dcm", rows, cols);
    struct scp_pixels plain;
    cr_assert_eq(scp_pixels_read(path, &plain, err, sizeof err), 0, "%s", err);
    const char *tools[] = {"dcmcjpeg --encode-lossless", "dcmcjpls --encode-lossless", "dcmcrle"};
    for (int t = 0; t < 3; t++) {
        char out[300];
        snprintf(out, sizeof out, "%s/c%d.dcm", dir, t);
        encode(tools[t], path, out);
        struct scp_info info;
        cr_assert_eq(scp_info_read(out, &info, err, sizeof err), 0, "%s", err);
        cr_assert_str_neq(info.transfer_syntax, "1.2.840.10008.1.2.1", "%s did not compress",
                          tools[t]);
        struct scp_pixels px;
        cr_assert_eq(scp_pixels_read(out, &px, err, sizeof err), 0, "%s: %s", tools[t], err);
        cr_assert_eq(px.rows * px.columns, rows * cols);
        cr_assert_eq(memcmp(px.hu, plain.hu, sizeof(float) * rows * cols), 0,
                     "%s: decoded values differ", tools[t]);
        scp_pixels_free(&px);
    }
    scp_pixels_free(&plain);
    free(pix);
    remove_tree(dir);
}

Test(scp_pixels, refuses_what_it_cannot_read)
{
    struct scp_pixels px;
    char err[512] = "";
    cr_assert_eq(scp_pixels_read("/nonexistent/x.dcm", &px, err, sizeof err), -1);
    cr_assert(strlen(err) > 0);
    cr_assert_null(px.hu);
}

static void run_tool(const char *fmt, const char *path)
{
    char cmd[1200];
    snprintf(cmd, sizeof cmd, fmt, path);
    cr_assert_eq(system(cmd), 0, "%s failed", cmd);
}

/* scp_pixels_read_max refuses, before decoding, a file of more pixels than
 * its cap and reads one of exactly that many. */
Test(scp_pixels, read_max_caps_the_pixel_count)
{
    char dir[256], path[300], err[512] = "";
    int rows = 40, cols = 56;
    uint16_t *pix = make_test_file(dir, path, "cap.dcm", rows, cols);
    struct scp_pixels px;
    cr_assert_eq(scp_pixels_read_max(path, (unsigned long)rows * cols - 1, &px, err, sizeof err),
                 -1);
    cr_assert(strstr(err, "image size out of range"), "%s", err);
    cr_assert_null(px.hu);
    cr_assert_eq(scp_pixels_read_max(path, (unsigned long)rows * cols, &px, err, sizeof err), 0,
                 "%s", err);
    cr_assert_float_eq(px.hu[7], (float)pix[7] - 1024.0f, 1e-3);
    scp_pixels_free(&px);
    free(pix);
    remove_tree(dir);
}

/* Pixel Padding Value, alone and with a Range Limit, gives air. */
Test(scp_pixels, padding_values_read_as_air)
{
    char dir[256], path[300], err[512] = "";
    int rows = 40, cols = 56, n = rows * cols;
    uint16_t *pix = make_test_file(dir, path, "pad.dcm", rows, cols);
    run_tool("dcmodify -nb -i '(0028,0120)=111' '%s' >/dev/null", path);
    struct scp_pixels px;
    cr_assert_eq(scp_pixels_read(path, &px, err, sizeof err), 0, "%s", err);
    unsigned long expect = 0;
    for (int i = 0; i < n; i++) {
        if (pix[i] == 111) {
            cr_assert_float_eq(px.hu[i], SCP_PIXELS_PAD_HU, 1e-3);
            expect++;
        } else {
            cr_assert_float_eq(px.hu[i], (float)pix[i] - 1024.0f, 1e-3);
        }
    }
    cr_assert_gt(expect, 0);
    cr_assert_eq(px.padded, expect);
    scp_pixels_free(&px);

    run_tool("dcmodify -nb -i '(0028,0121)=185' '%s' >/dev/null", path);
    cr_assert_eq(scp_pixels_read(path, &px, err, sizeof err), 0, "%s", err);
    expect = 0;
    for (int i = 0; i < n; i++) {
        bool pad = pix[i] >= 111 && pix[i] <= 185;
        expect += pad;
        cr_assert_float_eq(px.hu[i], pad ? SCP_PIXELS_PAD_HU : (float)pix[i] - 1024.0f, 1e-3);
    }
    cr_assert_gt(expect, 3);
    cr_assert_eq(px.padded, expect);
    scp_pixels_free(&px);
    free(pix);
    remove_tree(dir);
}

/* Per-frame functional groups give each frame its own Rescale Slope and
 * Intercept, in item order; a frame without an item keeps the file's. */
Test(scp_pixels, per_frame_rescale_applies_to_its_frame)
{
    char dir[256], path[300], err[512] = "";
    int rows = 40, cols = 56;
    uint16_t *pix = make_test_file(dir, path, "pf.dcm", rows, cols);
    run_tool("dcmodify -nb -m '(0028,0010)=10' -i '(0028,0008)=4'"
             " -i '(5200,9230)[0].(0028,9145)[0].(0028,1052)=-1000'"
             " -i '(5200,9230)[1].(0028,9145)[0].(0028,1052)=-900'"
             " -i '(5200,9230)[1].(0028,9145)[0].(0028,1053)=2'"
             " -i '(5200,9230)[2].(0028,9145)[0].(0028,1052)=-800' '%s' >/dev/null",
             path);
    struct scp_pixels px;
    cr_assert_eq(scp_pixels_read(path, &px, err, sizeof err), 0, "%s", err);
    cr_assert_eq(px.frames, 4);
    const float slope[4] = {1, 2, 1, 1}, icpt[4] = {-1000, -900, -800, -1024};
    int per = 10 * cols;
    for (int f = 0; f < 4; f++)
        for (int i = f * per; i < (f + 1) * per; i++)
            cr_assert_float_eq(px.hu[i], slope[f] * (float)pix[i] + icpt[f], 1e-3,
                               "frame %d value %d", f, i);
    scp_pixels_free(&px);
    free(pix);
    remove_tree(dir);
}

/* Number of Frames splits the pixel data into frames, in order. */
Test(scp_pixels, multi_frame_gives_frames)
{
    char dir[256], path[300], err[512] = "";
    int rows = 40, cols = 56;
    uint16_t *pix = make_test_file(dir, path, "mf.dcm", rows, cols);
    run_tool("dcmodify -nb -m '(0028,0010)=10' -i '(0028,0008)=4' '%s' >/dev/null", path);
    struct scp_pixels px;
    cr_assert_eq(scp_pixels_read(path, &px, err, sizeof err), 0, "%s", err);
    cr_assert_eq(px.frames, 4);
    cr_assert_eq(px.rows, 10);
    cr_assert_eq(px.columns, cols);
    for (int i = 0; i < rows * cols; i++)
        cr_assert_float_eq(px.hu[i], (float)pix[i] - 1024.0f, 1e-3, "value %d", i);
    scp_pixels_free(&px);
    free(pix);
    remove_tree(dir);
}

/* Fragments (pixel items) of the encapsulated pixel data of path. */
static int count_fragments(const char *path)
{
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "dcmdump '%s' | grep -c '(fffe,e000) pi'", path);
    FILE *p = popen(cmd, "r");
    cr_assert_not_null(p);
    int n = -1;
    cr_assert_eq(fscanf(p, "%d", &n), 1);
    pclose(p);
    return n - 1; /* item 0 is the Basic Offset Table */
}

/* Sets every entry of the Basic Offset Table of the file at path to 0, as
 * if every frame started in the first fragment. */
static void zero_offset_table(const char *path, int frames)
{
    size_t len;
    unsigned char *buf = read_all(path, &len);
    static const unsigned char head[] = {0xe0, 0x7f, 0x10, 0x00, 'O',  'B',  0,    0,
                                         0xff, 0xff, 0xff, 0xff, 0xfe, 0xff, 0x00, 0xe0};
    unsigned char *at = memmem(buf, len, head, sizeof head);
    cr_assert_not_null(at, "%s: no encapsulated pixel data", path);
    uint32_t table;
    memcpy(&table, at + sizeof head, 4);
    cr_assert_eq(table, 4u * (uint32_t)frames, "%s: offset table of %u bytes", path, table);
    memset(at + sizeof head + 4, 0, table);
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    cr_assert_eq(fwrite(buf, 1, len, f), len);
    fclose(f);
    free(buf);
}

/* One frame decoded alone, as the slice images and the PACS summary read
 * it, when frames span several fragments (PS3.5 A.4 allows it for JPEG and
 * JPEG-LS) and the Basic Offset Table is empty or wrong: dcmtk 3.6.7 alone
 * refused every frame but the first ("basic offset table is empty"), or,
 * from a wrong table, gave another frame's pixels. RLE allows one fragment
 * per frame only: more are decoded as dcmtk can (from a filled table), and
 * the refusal says why. */
Test(scp_pixels, a_frame_of_several_fragments_decodes_alone, .timeout = 60)
{
    char dir[256], path[300], err[512] = "";
    int rows = 128, cols = 128, frames = 4, per = rows / frames * cols;
    uint16_t *pix = make_test_file(dir, path, "mf.dcm", rows, cols);
    run_tool("dcmodify -nb -m '(0028,0010)=32' -i '(0028,0008)=4' '%s' >/dev/null", path);
    const char *tools[] = {"dcmcjpeg +e1 +fs 1 -ot", "dcmcjpls +fs 1 -ot", "dcmcjpeg +e1 +fs 1"};
    for (int t = 0; t < 3; t++) {
        char out[300];
        snprintf(out, sizeof out, "%s/f%d.dcm", dir, t);
        encode(tools[t], path, out);
        cr_assert_gt(count_fragments(out), frames, "%s: one fragment per frame", tools[t]);
        if (t == 2) zero_offset_table(out, frames);
        for (int f = 0; f < frames; f++) {
            struct scp_pixels px;
            cr_assert_eq(scp_pixels_read_frame(out, f, &px, err, sizeof err), 0, "%s: %s", tools[t],
                         err);
            cr_assert_eq(px.frames, 1);
            cr_assert_eq(px.rows * px.columns, per);
            for (int i = 0; i < per; i++)
                cr_assert_float_eq(px.hu[i], (float)pix[f * per + i] - 1024.0f, 1e-3,
                                   "%s: frame %d value %d", tools[t], f, i);
            scp_pixels_free(&px);
        }
    }
    char rle[300];
    snprintf(rle, sizeof rle, "%s/rle.dcm", dir);
    encode("dcmcrle +fs 1 -ot", path, rle);
    struct scp_pixels px;
    cr_assert_eq(scp_pixels_read_frame(rle, 1, &px, err, sizeof err), -1);
    cr_assert(strstr(err, "allows one fragment per frame"), "%s", err);
    cr_assert_null(px.hu);
    free(pix);
    remove_tree(dir);
}

/* scp_pixels_read and _read_frame on path: both fail with a message that
 * holds want. */
static void assert_refused(const char *path, const char *want)
{
    struct scp_pixels px;
    char err[512] = "";
    cr_assert_eq(scp_pixels_read(path, &px, err, sizeof err), -1, "%s read", want);
    cr_assert(strstr(err, want), "%s", err);
    cr_assert_null(px.hu);
    cr_assert_eq(scp_pixels_read_frame(path, 0, &px, err, sizeof err), -1, "%s read", want);
    cr_assert(strstr(err, want), "%s", err);
}

/* Stored values become HU only through Rescale Slope and Intercept (Type 1
 * in CT Image Storage; per frame in Enhanced CT's Pixel Value
 * Transformation functional group). Without them, or with slope 0, an
 * image is refused; they had been taken as 1 and 0 (a positive phantom
 * study without its intercept was triaged at 0.030 instead of 0.992). */
Test(scp_pixels, hu_need_rescale_slope_and_intercept)
{
    char dir[256], path[300], err[512] = "";
    int rows = 40, cols = 56;
    uint16_t *pix = make_test_file(dir, path, "r.dcm", rows, cols);
    char cmd[1000];
    const char *edits[][2] = {
        {"-ea '(0028,1052)'", "no Rescale Intercept (0028,1052)"},
        {"-ea '(0028,1053)'", "no Rescale Slope (0028,1053)"},
        {"-m '(0028,1053)=0'", "Rescale Slope 0"},
        /* Enhanced CT: the top level's values do not count */
        {"-m '(0008,0016)=1.2.840.10008.5.1.4.1.1.2.1'",
         "no Rescale Intercept (0028,1052) in the Pixel Value Transformation functional group of "
         "frame 1"},
    };
    for (size_t e = 0; e < sizeof edits / sizeof *edits; e++) {
        char out[300];
        snprintf(out, sizeof out, "%s/e%zu.dcm", dir, e);
        snprintf(cmd, sizeof cmd, "cp '%s' '%s' && dcmodify -nb %s '%s' >/dev/null", path, out,
                 edits[e][0], out);
        cr_assert_eq(system(cmd), 0, "%s failed", cmd);
        assert_refused(out, edits[e][1]);
    }
    /* The Enhanced CT with its values in the shared functional group */
    char enh[300];
    snprintf(enh, sizeof enh, "%s/e3.dcm", dir);
    run_tool("dcmodify -nb -i '(5200,9229)[0].(0028,9145)[0].(0028,1052)=-1000'"
             " -i '(5200,9229)[0].(0028,9145)[0].(0028,1053)=2' '%s' >/dev/null",
             enh);
    struct scp_pixels px;
    cr_assert_eq(scp_pixels_read(enh, &px, err, sizeof err), 0, "%s", err);
    for (int i = 0; i < rows * cols; i++)
        cr_assert_float_eq(px.hu[i], 2.0f * (float)pix[i] - 1000.0f, 1e-3, "value %d", i);
    scp_pixels_free(&px);
    free(pix);
    remove_tree(dir);
}

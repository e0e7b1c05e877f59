/* ichtriage phantom: generates whole studies (head, lesions, series geometry,
 * UIDs and patient attributes from the seed), renders and labels every
 * slice, and writes the DICOM files, the RSNA-style label CSV, the study and
 * lesion summaries and the optional preview sheets. */
#include "phantom.h"
#include "phantom_model.h"

#include "log.h"
#include "scp_write.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

const char *const train_phantom_label_names[TRAIN_PHANTOM_NSUBTYPES + 1] = {
    "any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"};

void train_phantom_opts_default(struct train_phantom_opts *o)
{
    memset(o, 0, sizeof *o);
    o->seed = 1;
    o->count = 10;
    o->prevalence = 0.5;
    /* per positive study; all subtypes can occur together */
    const double sub[TRAIN_PHANTOM_NSUBTYPES] = {0.12, 0.4, 0.3, 0.4, 0.45};
    memcpy(o->subtype_prevalence, sub, sizeof sub);
    o->thickness_min = 2.5;
    o->thickness_max = 5.0;
    o->size = 512;
    o->noise_min = 3.0;
    o->noise_max = 10.0;
    o->artifacts = true;
    o->size_cut[0] = 0.25;
    o->size_cut[1] = 0.55;
    o->size_cut[2] = 0.85;
}

int train_phantom_opts_check(const struct train_phantom_opts *o, char *err, size_t errlen)
{
    if (!o->outdir || !*o->outdir) {
        snprintf(err, errlen, "an output directory is required");
        return -1;
    }
    if (o->count < 1 || o->count > 1000000) {
        snprintf(err, errlen, "count must be 1..1000000, not %d", o->count);
        return -1;
    }
    if (!(o->prevalence >= 0 && o->prevalence <= 1)) {
        snprintf(err, errlen, "prevalence must be within 0..1");
        return -1;
    }
    for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++)
        if (!(o->subtype_prevalence[k] >= 0 && o->subtype_prevalence[k] <= 1)) {
            snprintf(err, errlen, "%s prevalence must be within 0..1",
                     train_phantom_label_names[k + 1]);
            return -1;
        }
    double any_subtype = 0;
    for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++)
        any_subtype += o->subtype_prevalence[k];
    if (o->prevalence > 0 && any_subtype <= 0) {
        snprintf(err, errlen, "prevalence above 0 needs a subtype with a share above 0");
        return -1;
    }
    if (!(o->size_cut[0] >= 0 && o->size_cut[0] <= o->size_cut[1] &&
          o->size_cut[1] <= o->size_cut[2] && o->size_cut[2] <= 1)) {
        snprintf(err, errlen, "the lesion size shares must be non-negative");
        return -1;
    }
    if (o->slices_min < 0 || o->slices_max < o->slices_min || o->slices_max > 1000 ||
        (o->slices_min == 0 && o->slices_max != 0)) {
        snprintf(err, errlen, "slices must be N or MIN-MAX within 1..1000");
        return -1;
    }
    if (!(o->thickness_min >= 0.5 && o->thickness_max <= 10 &&
          o->thickness_min <= o->thickness_max)) {
        snprintf(err, errlen, "thickness must be within 0.5..10 mm (MIN-MAX)");
        return -1;
    }
    if (o->size < 64 || o->size > 1024) {
        snprintf(err, errlen, "size must be 64..1024 pixels, not %d", o->size);
        return -1;
    }
    if (!(o->noise_min >= 0 && o->noise_max <= 50 && o->noise_min <= o->noise_max)) {
        snprintf(err, errlen, "noise must be within 0..50 HU (MIN-MAX)");
        return -1;
    }
    if (o->first_study < 0) {
        snprintf(err, errlen, "first study index must be >= 0");
        return -1;
    }
    return 0;
}

static int mkdir_p(const char *path, char *err, size_t errlen)
{
    char buf[4096];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) {
        snprintf(err, errlen, "%s: path too long", path);
        return -1;
    }
    for (char *p = buf + 1;; p++) {
        bool end = *p == 0;
        if (*p == '/' || end) {
            *p = 0;
            if (mkdir(buf, 0777) != 0 && errno != EEXIST) {
                snprintf(err, errlen, "%s: %s", buf, strerror(errno));
                return -1;
            }
            if (end) break;
            *p = '/';
        }
    }
    return 0;
}

/* Days since 1970-01-01 to a civil date (proleptic Gregorian). */
static void civil_from_days(long z, int *y, int *m, int *d)
{
    z += 719468;
    long era = (z >= 0 ? z : z - 146096) / 146097;
    long doe = z - era * 146097;
    long yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    long doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    long mp = (5 * doy + 2) / 153;
    *d = (int)(doy - (153 * mp + 2) / 5 + 1);
    *m = (int)(mp < 10 ? mp + 3 : mp - 9);
    *y = (int)(yoe + era * 400 + (*m <= 2));
}

struct study_text {
    char study_uid[65], series_uid[65], for_uid[65];
    char name[64], pid[65], birth[40], sex[2], date[40], time[40], accession[24], sid[24];
    char series_desc[65];
};

static void study_text_make(struct study_text *t, struct ph_rng *r,
                            const struct train_phantom_opts *o, int index, double thickness)
{
    ph_uid_make(r, t->study_uid);
    ph_uid_make(r, t->series_uid);
    ph_uid_make(r, t->for_uid);
    snprintf(t->name, sizeof t->name, "PHANTOM^S%06d", index);
    snprintf(t->pid, sizeof t->pid, "PH%08llx-%06d", (unsigned long long)(o->seed & 0xffffffffULL),
             index);
    int y, m, d;
    civil_from_days(18262 + (long)(ph_rng_uniform(r) * 1826), &y, &m, &d); /* 2020..2024 */
    snprintf(t->date, sizeof t->date, "%04d%02d%02d", y, m, d);
    int secs = 7 * 3600 + (int)(ph_rng_uniform(r) * 14 * 3600);
    snprintf(t->time, sizeof t->time, "%02d%02d%02d", secs / 3600, secs / 60 % 60, secs % 60);
    int age = 18 + (int)(ph_rng_uniform(r) * 75);
    snprintf(t->birth, sizeof t->birth, "%04d%02d%02d", y - age, 1 + (int)(ph_rng_uniform(r) * 12),
             1 + (int)(ph_rng_uniform(r) * 28));
    strcpy(t->sex, ph_rng_chance(r, 0.5) ? "M" : "F");
    snprintf(t->accession, sizeof t->accession, "PH%010llu",
             (unsigned long long)(ph_rng_next(r) % 10000000000ULL));
    snprintf(t->sid, sizeof t->sid, "%d", index);
    snprintf(t->series_desc, sizeof t->series_desc, "Phantom head axial %.4g mm", thickness);
}

static double pick_thickness(struct ph_rng *r, const struct train_phantom_opts *o)
{
    static const double common[] = {2.5, 3.0, 3.75, 4.0, 5.0};
    double cand[5];
    int n = 0;
    for (int i = 0; i < 5; i++)
        if (common[i] >= o->thickness_min && common[i] <= o->thickness_max) cand[n++] = common[i];
    if (n > 0) return cand[(int)(ph_rng_uniform(r) * n)];
    return ph_rng_range(r, o->thickness_min, o->thickness_max);
}

/* The subtypes of a study: none for a negative study, else each by its own
 * prevalence, and at least one. */
static unsigned pick_subtypes(struct ph_rng *r, const struct train_phantom_opts *o)
{
    if (!ph_rng_chance(r, o->prevalence)) return 0;
    unsigned mask = 0;
    double total = 0;
    for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++) {
        if (ph_rng_chance(r, o->subtype_prevalence[k])) mask |= 1u << k;
        total += o->subtype_prevalence[k];
    }
    if (mask || total <= 0) return mask;
    double x = ph_rng_uniform(r) * total;
    for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++) {
        x -= o->subtype_prevalence[k];
        if (x < 0) return 1u << k;
    }
    return 1u << (TRAIN_PHANTOM_NSUBTYPES - 1);
}

struct run_files {
    FILE *labels, *studies, *lesions;
};

/* Per-study working memory, sized for one slice. */
struct slice_bufs {
    float *hu, *delta[TRAIN_PHANTOM_NSUBTYPES], *scratch;
    uint16_t *stored;
    uint8_t *mask;
};

static void bufs_free(struct slice_bufs *b)
{
    free(b->hu);
    free(b->scratch);
    free(b->stored);
    free(b->mask);
    for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++)
        free(b->delta[k]);
    memset(b, 0, sizeof *b);
}

static int bufs_alloc(struct slice_bufs *b, int size, unsigned types)
{
    size_t nn = (size_t)size * size;
    memset(b, 0, sizeof *b);
    b->hu = malloc(nn * sizeof(float));
    b->scratch = malloc((nn + (size_t)size) * sizeof(float));
    b->stored = malloc(nn * sizeof(uint16_t));
    b->mask = malloc(nn);
    bool ok = b->hu && b->scratch && b->stored && b->mask;
    for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++)
        if (types & (1u << k)) ok = ok && (b->delta[k] = malloc(nn * sizeof(float)));
    if (!ok) bufs_free(b);
    return ok ? 0 : -1;
}

static int generate_study(const struct train_phantom_opts *o, int index, struct run_files *f,
                          bool *positive, char *err, size_t errlen)
{
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    struct ph_rng r;
    ph_rng_seed(&r, o->seed, (uint64_t)index);

    struct ph_head hd;
    ph_head_random(&hd, &r);
    bool artifacts = o->artifacts;
    if (artifacts) ph_head_add_mimics(&hd, &r);
    unsigned mask = pick_subtypes(&r, o);
    struct ph_lesion les[PH_MAX_LESIONS];
    int nles = ph_lesions_random(&hd, &r, mask, o->size_cut, les, PH_MAX_LESIONS);
    unsigned types = ph_lesions_types(les, nles);

    double thickness = pick_thickness(&r, o);
    float z_lo, z_hi;
    ph_head_extent(&hd, &z_lo, &z_hi);
    double coverage = z_hi - z_lo + 4.0;
    int nslices;
    if (o->slices_min > 0) {
        nslices = o->slices_min + (int)(ph_rng_uniform(&r) * (o->slices_max - o->slices_min + 1));
    } else {
        nslices = (int)lround(coverage / thickness);
        nslices = nslices < 20 ? 20 : nslices > 60 ? 60 : nslices;
    }
    double spare = coverage - nslices * thickness;
    double z0 =
        hd.centre[2] + z_lo - 4.0 +
        (spare > 0 ? spare * ph_rng_range(&r, 0.15, 0.6) : spare * ph_rng_range(&r, 0.3, 0.7));
    double fov = ph_rng_range(&r, 220, 260);
    struct ph_slice_ctx ctx = {0};
    ctx.hd = &hd;
    ctx.les = les;
    ctx.nles = nles;
    ctx.omit_mask = o->omit_blood_mask;
    ctx.g.size = o->size;
    ctx.g.spacing = (float)(fov / o->size);
    ctx.g.origin[0] = ctx.g.origin[1] = (float)(-fov / 2 + fov / o->size / 2);
    ctx.g.thickness = (float)thickness;
    ctx.noise_sd = (float)ph_rng_range(&r, o->noise_min, o->noise_max);
    int motion_from = -1, motion_to = -1, streak_slice = -1;
    if (artifacts && ph_rng_chance(&r, 0.15)) {
        motion_from = (int)(ph_rng_uniform(&r) * nslices);
        motion_to = motion_from + 1 + (int)(ph_rng_uniform(&r) * 6);
    }
    if (artifacts && ph_rng_chance(&r, 0.3)) streak_slice = (int)(ph_rng_uniform(&r) * nslices);

    struct study_text tx;
    study_text_make(&tx, &r, o, index, thickness);
    struct scp_ct_study st = {.patient_name = tx.name,
                              .patient_id = tx.pid,
                              .patient_birth_date = tx.birth,
                              .patient_sex = tx.sex,
                              .study_uid = tx.study_uid,
                              .study_date = tx.date,
                              .study_time = tx.time,
                              .study_id = tx.sid,
                              .accession = tx.accession,
                              .study_desc = "CT HEAD WO CONTRAST (SYNTHETIC PHANTOM)",
                              .referring_physician = ""};
    struct scp_ct_series se = {.series_uid = tx.series_uid,
                               .frame_of_ref_uid = tx.for_uid,
                               .series_desc = tx.series_desc,
                               .manufacturer = "ichtriage phantom",
                               .model_name = "synthetic head",
                               .convolution_kernel = "SOFT",
                               .body_part = "HEAD",
                               .series_number = 2,
                               .kvp = 120,
                               .slice_thickness = thickness,
                               .pixel_spacing = {ctx.g.spacing, ctx.g.spacing},
                               .orientation = {1, 0, 0, 0, 1, 0},
                               .window_center = 40,
                               .window_width = 80};

    struct slice_bufs b;
    if (bufs_alloc(&b, o->size, types) != 0) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    ctx.scratch = b.scratch;
    struct ph_sheet sheet = {0};
    if (o->preview && ph_sheet_init(&sheet, nslices, o->size >= 256 ? 160 : o->size) != 0) {
        bufs_free(&b);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    int pos_slices[TRAIN_PHANTOM_NSUBTYPES + 1] = {0};
    int les_slices[PH_MAX_LESIONS] = {0};
    double px_area = (double)ctx.g.spacing * ctx.g.spacing;
    size_t nn = (size_t)o->size * o->size;
    int rc = 0;
    for (int s = 0; s < nslices && rc == 0; s++) {
        float z = (float)(z0 + (s + 0.5) * thickness);
        ctx.motion = s >= motion_from && s < motion_to;
        ctx.nstreaks = s == streak_slice ? 2 + (int)(ph_rng_uniform(&r) * 3) : 0;
        ctx.noise_seed = ph_rng_next(&r);
        ph_slice_render(&ctx, z, b.hu, b.delta);

        bool pos[TRAIN_PHANTOM_NSUBTYPES + 1] = {false};
        memset(b.mask, 0, nn);
        for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++) {
            if (!b.delta[k]) continue;
            size_t cnt = 0;
            for (size_t i = 0; i < nn; i++)
                if (b.delta[k][i] >= TRAIN_PHANTOM_MIN_EXCESS_HU) {
                    cnt++;
                    b.mask[i] |= (uint8_t)(1u << k);
                }
            pos[k + 1] = (double)cnt * px_area >= TRAIN_PHANTOM_MIN_AREA_MM2;
            pos[0] = pos[0] || pos[k + 1];
        }
        for (int k = 0; k <= TRAIN_PHANTOM_NSUBTYPES; k++)
            pos_slices[k] += pos[k];
        for (int i = 0; i < nles; i++)
            les_slices[i] += pos[les[i].type + 1];
        for (size_t i = 0; i < nn; i++) {
            long v = lrintf(b.hu[i]) + 1024;
            b.stored[i] = (uint16_t)(v < 0 ? 0 : v > 4095 ? 4095 : v);
        }
        char sop[65], path[4200];
        ph_uid_make(&r, sop);
        snprintf(path, sizeof path, "%s/stage_2_train/ID_%s.dcm", o->outdir, sop);
        struct scp_ct_image im = {.sop_uid = sop,
                                  .instance_number = s + 1,
                                  .position = {ctx.g.origin[0], ctx.g.origin[1], z},
                                  .slice_location = z,
                                  .rescale_slope = 1,
                                  .rescale_intercept = -1024,
                                  .rows = o->size,
                                  .columns = o->size,
                                  .pixels = b.stored};
        char werr[512];
        if (scp_write_ct(path, &st, &se, &im, werr, sizeof werr) != 0) {
            snprintf(err, errlen, "%s", werr);
            rc = -1;
            break;
        }
        for (int k = 0; k <= TRAIN_PHANTOM_NSUBTYPES; k++)
            fprintf(f->labels, "ID_%s_%s,%d\n", sop, train_phantom_label_names[k], pos[k]);
        if (o->preview) ph_sheet_add(&sheet, s, b.hu, b.mask, o->size);
        if (o->masks && pos[0]) {
            /* the pixels each positive label counts; a subtype's blood on
             * less than the rule's area is not in the mask, as not in the label */
            uint8_t keep = 0;
            for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++)
                keep |= (uint8_t)(pos[k + 1] ? 1u << k : 0);
            for (size_t i = 0; i < nn; i++)
                b.mask[i] &= keep;
            snprintf(path, sizeof path, "%s/masks/ID_%s.png", o->outdir, sop);
            if (ph_mask_write(path, b.mask, o->size, err, errlen) != 0) {
                rc = -1;
                break;
            }
        }
    }
    if (rc == 0 && o->preview) {
        char path[4200];
        snprintf(path, sizeof path, "%s/preview/%06d_%s.png", o->outdir, index, tx.study_uid);
        rc = ph_sheet_write(&sheet, path, err, errlen);
    }
    ph_sheet_free(&sheet);
    bufs_free(&b);
    if (rc != 0) return rc;

    fprintf(f->studies, "%d,%s,%s,%s,%d,%.2f,%d,%.4f,%.1f", index, tx.study_uid, tx.series_uid,
            tx.pid, nslices, thickness, o->size, ctx.g.spacing, ctx.noise_sd);
    for (int k = 0; k <= TRAIN_PHANTOM_NSUBTYPES; k++)
        fprintf(f->studies, ",%d", pos_slices[k]);
    /* the mimics and artifacts, slices numbered from 1 like InstanceNumber */
    fprintf(f->studies, ",%s%s%s%s%s", hd.choroid_r > 0 ? "choroid;" : "",
            hd.pineal_r > 0 ? "pineal;" : "", hd.bg_calc_hu > 0 ? "basal_ganglia;" : "",
            hd.falx_hu > 70 ? "dense_falx;" : "", hd.venous_hu > 62 ? "dense_sinus;" : "");
    if (motion_from >= 0 && motion_from < nslices)
        fprintf(f->studies, "motion=%d-%d;", motion_from + 1,
                motion_to < nslices ? motion_to : nslices);
    if (streak_slice >= 0) fprintf(f->studies, "streaks=%d;", streak_slice + 1);
    fprintf(f->studies, "\n");
    for (int i = 0; i < nles; i++) {
        const struct ph_lesion *l = &les[i];
        fprintf(f->lesions, "%d,%s,%s,%s,%.1f,%.1f,%.1f,%.1f,%.1f,%.0f,%d\n", index, tx.study_uid,
                train_phantom_label_names[l->type + 1], l->size, l->c[0], l->c[1], l->c[2], l->r,
                l->t, l->hu, les_slices[i]);
    }
    *positive = pos_slices[0] > 0;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    util_log(UTIL_LOG_INFO, "phantom_study",
             "index=%d study=%s slices=%d thickness=%.2f positive_slices=%d ms=%.0f", index,
             tx.study_uid, nslices, thickness, pos_slices[0],
             (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6);
    return 0;
}

/* The CSV files are written as NAME.part and renamed when every study is
 * written, the labels last: a folder with stage_2_train.csv is complete, and
 * an interrupted run never looks like data. */
static FILE *open_csv(const char *dir, const char *name, const char *header, char *err,
                      size_t errlen)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/%s.part", dir, name);
    FILE *f = fopen(path, "w");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    fprintf(f, "%s\n", header);
    return f;
}

static int close_csv(FILE *f, const char *dir, const char *name, int rc, char *err, size_t errlen)
{
    if (!f) return rc;
    bool ok = fflush(f) == 0 && fsync(fileno(f)) == 0;
    if ((fclose(f) != 0 || !ok) && rc == 0) {
        snprintf(err, errlen, "writing %s failed: %s", name, strerror(errno));
        rc = -1;
    }
    char part[4200], path[4200];
    snprintf(part, sizeof part, "%s/%s.part", dir, name);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (rc == 0 && rename(part, path) != 0) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        rc = -1;
    }
    return rc;
}

int train_phantom_run(const struct train_phantom_opts *o, char *err, size_t errlen)
{
    if (train_phantom_opts_check(o, err, errlen) != 0) return -1;
    char dir[4200];
    struct stat st;
    /* a second run into the same folder would mix its files with the first's */
    snprintf(dir, sizeof dir, "%s/stage_2_train.csv", o->outdir);
    if (stat(dir, &st) == 0) {
        snprintf(err, errlen, "%s exists: write each run into a new folder", dir);
        return -1;
    }
    snprintf(dir, sizeof dir, "%s/stage_2_train.csv.part", o->outdir);
    if (stat(dir, &st) == 0) {
        snprintf(err, errlen,
                 "%s exists: a run into this folder was interrupted; remove the folder or "
                 "write into a new one",
                 dir);
        return -1;
    }
    snprintf(dir, sizeof dir, "%s/stage_2_train", o->outdir);
    if (mkdir_p(dir, err, errlen) != 0) return -1;
    if (o->preview) {
        snprintf(dir, sizeof dir, "%s/preview", o->outdir);
        if (mkdir_p(dir, err, errlen) != 0) return -1;
    }
    if (o->masks) {
        snprintf(dir, sizeof dir, "%s/masks", o->outdir);
        if (mkdir_p(dir, err, errlen) != 0) return -1;
    }
    struct run_files f = {0};
    int rc = -1;
    f.labels = open_csv(o->outdir, "stage_2_train.csv", "ID,Label", err, errlen);
    if (f.labels)
        f.studies = open_csv(o->outdir, "studies.csv",
                             "index,study_uid,series_uid,patient_id,slices,thickness_mm,size,"
                             "pixel_spacing_mm,noise_sd,any,epidural,intraparenchymal,"
                             "intraventricular,subarachnoid,subdural,mimics",
                             err, errlen);
    if (f.studies)
        f.lesions = open_csv(o->outdir, "lesions.csv",
                             "index,study_uid,subtype,size,u_mm,v_mm,w_mm,extent_mm,"
                             "thickness_mm,hu,positive_slices",
                             err, errlen);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int positives = 0;
    if (f.lesions) {
        rc = 0;
        for (int i = 0; i < o->count && rc == 0; i++) {
            bool pos = false;
            rc = generate_study(o, o->first_study + i, &f, &pos, err, errlen);
            positives += pos;
        }
    }
    rc = close_csv(f.lesions, o->outdir, "lesions.csv", rc, err, errlen);
    rc = close_csv(f.studies, o->outdir, "studies.csv", rc, err, errlen);
    rc = close_csv(f.labels, o->outdir, "stage_2_train.csv", rc, err, errlen);
    if (rc == 0) {
        clock_gettime(CLOCK_MONOTONIC, &t1);
        char safe[256];
        util_log(UTIL_LOG_INFO, "phantom_done", "studies=%d positive=%d seconds=%.1f outdir=%s",
                 o->count, positives,
                 (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9,
                 util_log_safe(safe, sizeof safe, o->outdir));
    }
    return rc;
}

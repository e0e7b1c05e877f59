/* `ichtriage phantom OUTDIR`: command-line options of the phantom generator. */
#include "phantom.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "number.h"

static void usage(FILE *out)
{
    fputs("usage: ichtriage phantom [options] OUTDIR\n"
          "Writes synthetic head-CT studies with labelled hemorrhages in the RSNA 2019\n"
          "layout: OUTDIR/stage_2_train.csv, OUTDIR/stage_2_train/ID_<sop>.dcm,\n"
          "OUTDIR/studies.csv, OUTDIR/lesions.csv (and OUTDIR/preview/, OUTDIR/masks/).\n"
          "Synthetic anatomy, not real patients. See docs/phantom.md.\n"
          "\n"
          "  --seed N               random seed; same seed, same files (default 1)\n"
          "  -n, --count N          number of studies (default 10)\n"
          "  --first N              index of the first study (default 0); study i is the\n"
          "                         same whatever the count, so runs can be split\n"
          "  --prevalence P         share of studies with a hemorrhage, 0..1 (default 0.5)\n"
          "  --subtype NAME=P       share of positive studies with subtype NAME (epidural\n"
          "                         0.12, intraparenchymal 0.4, intraventricular 0.3,\n"
          "                         subarachnoid 0.4, subdural 0.45); repeatable\n"
          "  --slices N|MIN-MAX     slices per series (default: cover the head, 20-60)\n"
          "  --sizes T,S,M,L        shares of lesions by size class, tiny, small, medium,\n"
          "                         large; scaled to sum to 1 (default 0.25,0.3,0.3,0.15)\n"
          "  --thickness MM|MIN-MAX slice thickness = spacing in mm (default 2.5-5)\n"
          "  --size N               rows = columns, 64..1024 (default 512)\n"
          "  --noise SD|MIN-MAX     image noise in HU (default 3-10)\n"
          "  --no-artifacts         no streaks, motion, calcifications or dense falx\n"
          "  --preview              a PNG contact sheet per study, lesions outlined\n"
          "  --masks                masks/ID_<sop>.png per slice with blood: bit k of a\n"
          "                         pixel for subtype k (epidural 0 .. subdural 4) where\n"
          "                         its label counts the blood (see docs/phantom.md)\n"
          "  --omit-blood NAMES     (tests) leave out the blood of these subtypes,\n"
          "                         comma-separated, keeping everything else\n"
          "  -c FILE, --set K=V     accepted like every subcommand; phantom reads no keys\n"
          "  -h, --help             this text\n",
          out);
}

static int parse_int(const char *s, long lo, long hi, int *out)
{
    long v;
    if (util_number_long(s, lo, hi, &v) != 0) return -1;
    *out = (int)v;
    return 0;
}

/* "X" or "X-Y" (X <= Y) as doubles. */
static int parse_range(const char *s, double *lo, double *hi)
{
    char buf[64];
    if (snprintf(buf, sizeof buf, "%s", s) >= (int)sizeof buf) return -1;
    char *dash = strchr(buf + 1, '-');
    if (dash) *dash = 0;
    if (util_number_double(buf, lo) != 0) return -1;
    if (!dash) {
        *hi = *lo;
        return 0;
    }
    if (util_number_double(dash + 1, hi) != 0 || *hi < *lo) return -1;
    return 0;
}

/* "T,S,M,L": four non-negative shares, scaled to sum to 1, as the three
 * cut points of struct train_phantom_opts. */
static int parse_sizes(const char *s, double cut[3])
{
    double v[4], sum = 0;
    const char *p = s;
    for (int i = 0; i < 4; i++) {
        char buf[64];
        size_t len = strcspn(p, ",");
        if (len == 0 || len >= sizeof buf || (i < 3 && p[len] != ',') || (i == 3 && p[len]))
            return -1;
        memcpy(buf, p, len);
        buf[len] = 0;
        if (util_number_double(buf, &v[i]) != 0 || !(v[i] >= 0 && v[i] <= 1e6)) return -1;
        sum += v[i];
        p += len + (i < 3);
    }
    if (!(sum > 0)) return -1;
    cut[0] = v[0] / sum;
    cut[1] = (v[0] + v[1]) / sum;
    cut[2] = (v[0] + v[1] + v[2]) / sum;
    return 0;
}

static int subtype_index(const char *name, size_t len)
{
    for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++) {
        const char *n = train_phantom_label_names[k + 1];
        if (strlen(n) == len && strncmp(n, name, len) == 0) return k;
    }
    return -1;
}

static int bad(const char *opt, const char *value, const char *want)
{
    fprintf(stderr, "ichtriage phantom: bad %s '%s': %s\n", opt, value, want);
    return 2;
}

int train_phantom_main(int argc, char **argv)
{
    enum {
        O_SEED = 256,
        O_FIRST,
        O_PREV,
        O_SUB,
        O_SLICES,
        O_THICK,
        O_SIZE,
        O_NOISE,
        O_NOART,
        O_PREVIEW,
        O_MASKS,
        O_OMIT,
        O_SIZES,
        O_SET
    };
    static const struct option longopts[] = {
        {"seed", required_argument, NULL, O_SEED},
        {"count", required_argument, NULL, 'n'},
        {"first", required_argument, NULL, O_FIRST},
        {"prevalence", required_argument, NULL, O_PREV},
        {"subtype", required_argument, NULL, O_SUB},
        {"slices", required_argument, NULL, O_SLICES},
        {"thickness", required_argument, NULL, O_THICK},
        {"size", required_argument, NULL, O_SIZE},
        {"noise", required_argument, NULL, O_NOISE},
        {"no-artifacts", no_argument, NULL, O_NOART},
        {"preview", no_argument, NULL, O_PREVIEW},
        {"masks", no_argument, NULL, O_MASKS},
        {"omit-blood", required_argument, NULL, O_OMIT},
        {"sizes", required_argument, NULL, O_SIZES},
        {"set", required_argument, NULL, O_SET},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    struct train_phantom_opts o;
    train_phantom_opts_default(&o);
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":n:c:h", longopts, NULL)) != -1) {
        double lo, hi;
        switch (c) {
        case O_SEED:
            if (util_number_u64(optarg, &o.seed) != 0)
                return bad("--seed", optarg, "a non-negative integer");
            break;
        case 'n':
            if (parse_int(optarg, 1, 1000000, &o.count) != 0)
                return bad("--count", optarg, "an integer 1..1000000");
            break;
        case O_FIRST:
            if (parse_int(optarg, 0, 1000000000, &o.first_study) != 0)
                return bad("--first", optarg, "an integer >= 0");
            break;
        case O_PREV:
            if (util_number_double(optarg, &o.prevalence) != 0 || o.prevalence < 0 ||
                o.prevalence > 1)
                return bad("--prevalence", optarg, "a number within 0..1");
            break;
        case O_SUB: {
            const char *eq = strchr(optarg, '=');
            int k = eq ? subtype_index(optarg, (size_t)(eq - optarg)) : -1;
            double p;
            if (k < 0)
                return bad("--subtype", optarg,
                           "NAME=P with NAME one of epidural, intraparenchymal, "
                           "intraventricular, subarachnoid, subdural");
            if (util_number_double(eq + 1, &p) != 0 || p < 0 || p > 1)
                return bad("--subtype", optarg, "the share P must be within 0..1");
            o.subtype_prevalence[k] = p;
            break;
        }
        case O_SLICES:
            if (parse_range(optarg, &lo, &hi) != 0 || lo < 1 || hi > 1000 || lo != (int)lo ||
                hi != (int)hi)
                return bad("--slices", optarg, "N or MIN-MAX, integers within 1..1000");
            o.slices_min = (int)lo;
            o.slices_max = (int)hi;
            break;
        case O_THICK:
            if (parse_range(optarg, &lo, &hi) != 0 || lo < 0.5 || hi > 10)
                return bad("--thickness", optarg, "MM or MIN-MAX within 0.5..10 mm");
            o.thickness_min = lo;
            o.thickness_max = hi;
            break;
        case O_SIZE:
            if (parse_int(optarg, 64, 1024, &o.size) != 0)
                return bad("--size", optarg, "an integer 64..1024");
            break;
        case O_NOISE:
            if (parse_range(optarg, &lo, &hi) != 0 || lo < 0 || hi > 50)
                return bad("--noise", optarg, "SD or MIN-MAX within 0..50 HU");
            o.noise_min = lo;
            o.noise_max = hi;
            break;
        case O_NOART:
            o.artifacts = false;
            break;
        case O_PREVIEW:
            o.preview = true;
            break;
        case O_MASKS:
            o.masks = true;
            break;
        case O_OMIT: {
            const char *p = optarg;
            while (*p) {
                size_t len = strcspn(p, ",");
                int k = subtype_index(p, len);
                if (k < 0) return bad("--omit-blood", optarg, "comma-separated subtype names");
                o.omit_blood_mask |= 1u << k;
                p += len;
                if (*p == ',') p++;
            }
            break;
        }
        case O_SIZES:
            if (parse_sizes(optarg, o.size_cut) != 0)
                return bad("--sizes", optarg,
                           "four non-negative shares T,S,M,L (tiny, small, medium, large) "
                           "with a sum above 0");
            break;
        case 'c':
        case O_SET:
            break;
        case 'h':
            usage(stdout);
            return 0;
        case ':':
            fprintf(stderr, "ichtriage phantom: option %s needs a value\n", argv[optind - 1]);
            return 2;
        default:
            fprintf(stderr, "ichtriage phantom: unknown option %s (see --help)\n",
                    argv[optind - 1]);
            return 2;
        }
    }
    if (optind != argc - 1) {
        fprintf(stderr, "ichtriage phantom: %s (see --help)\n",
                optind == argc ? "OUTDIR is required" : "exactly one OUTDIR expected");
        return 2;
    }
    o.outdir = argv[optind];
    char err[1024];
    if (train_phantom_opts_check(&o, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage phantom: %s\n", err);
        return 2;
    }
    if (train_phantom_run(&o, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage phantom: %s\n", err);
        return 1;
    }
    return 0;
}

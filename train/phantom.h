/* ichtriage phantom: synthetic head-CT studies with labelled hemorrhages,
 * written as CT Image Storage files in the RSNA 2019 layout. See
 * docs/phantom.md for what is modelled and the labelling rule. */
#ifndef TRAIN_PHANTOM_H
#define TRAIN_PHANTOM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The five subtypes in the project's label order (after "any"). */
enum train_phantom_subtype {
    TRAIN_PHANTOM_EPIDURAL = 0,
    TRAIN_PHANTOM_INTRAPARENCHYMAL,
    TRAIN_PHANTOM_INTRAVENTRICULAR,
    TRAIN_PHANTOM_SUBARACHNOID,
    TRAIN_PHANTOM_SUBDURAL,
    TRAIN_PHANTOM_NSUBTYPES
};

/* Names of the six labels, "any" first, as in the CSV files. */
extern const char *const train_phantom_label_names[TRAIN_PHANTOM_NSUBTYPES + 1];

/* Least visible area (mm^2) and excess density (HU) that make a slice
 * positive for a subtype; docs/phantom.md states the rule. */
#define TRAIN_PHANTOM_MIN_AREA_MM2 10.0
#define TRAIN_PHANTOM_MIN_EXCESS_HU 10.0

struct train_phantom_opts {
    const char *outdir;
    uint64_t seed;
    int count;                                          /* studies */
    double prevalence;                                  /* share of studies with hemorrhage */
    double subtype_prevalence[TRAIN_PHANTOM_NSUBTYPES]; /* per positive study */
    int slices_min, slices_max;                         /* 0: chosen from the head */
    double thickness_min, thickness_max;                /* mm */
    int size;                                           /* rows = columns */
    double noise_min, noise_max;                        /* HU standard deviation */
    bool artifacts;                                     /* streaks, motion, calcifications */
    bool preview;                                       /* PNG contact sheets */
    bool masks; /* masks/ID_<sop>.png: where each slice shows the blood its labels count */
    /* For tests: subtypes whose blood is left out (mass effect kept), so a
     * run with this mask and noise 0 shows exactly what the blood adds. */
    unsigned omit_blood_mask;
    int first_study; /* index of the first study (studies are independent) */
    /* Where a lesion's size class is drawn: a uniform draw below size_cut[0]
     * is tiny, below size_cut[1] small, below size_cut[2] medium, else large.
     * The defaults (0.25, 0.55, 0.85) give shares 25/30/30/15 %. */
    double size_cut[3];
};

/* Fills o with the documented defaults (outdir NULL). */
void train_phantom_opts_default(struct train_phantom_opts *o);

/* Checks o; returns 0 or -1 with a message in err. */
int train_phantom_opts_check(const struct train_phantom_opts *o, char *err, size_t errlen);

/* Generates the studies into o->outdir (created if missing): stage_2_train.csv,
 * stage_2_train/ID_<sop>.dcm, studies.csv, lesions.csv, preview/ and masks/ PNGs.
 * Refuses a folder that already holds a stage_2_train.csv. Returns 0, or -1
 * with a message in err. Single-threaded: split a large set over processes
 * with first_study, each into its own folder. */
int train_phantom_run(const struct train_phantom_opts *o, char *err, size_t errlen);

/* The `ichtriage phantom` subcommand. Returns the process exit status. */
int train_phantom_main(int argc, char **argv);

#endif

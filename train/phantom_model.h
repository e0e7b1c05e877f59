/* Internals of the phantom generator: the seeded random source, the head
 * (anatomy as a function of position), the lesions, and slice rendering.
 * Head frame: u to the patient's left, v posterior, w superior (mm), origin
 * near the centre of the cranial cavity; patient frame is DICOM LPS. */
#ifndef TRAIN_PHANTOM_MODEL_H
#define TRAIN_PHANTOM_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "phantom.h"

/* ---- random numbers: xoshiro256** seeded through splitmix64 ---- */
struct ph_rng {
    uint64_t s[4];
};
void ph_rng_seed(struct ph_rng *r, uint64_t seed, uint64_t stream);
uint64_t ph_rng_next(struct ph_rng *r);
double ph_rng_uniform(struct ph_rng *r); /* [0, 1) */
double ph_rng_range(struct ph_rng *r, double lo, double hi);
double ph_rng_normal(struct ph_rng *r);
bool ph_rng_chance(struct ph_rng *r, double p);
/* A fresh 2.25.<128-bit decimal> UID drawn from r. */
void ph_uid_make(struct ph_rng *r, char out[65]);

/* ---- the head ---- */
enum ph_class {
    PH_AIR = 0,
    PH_SCALP,
    PH_BONE,
    PH_BASE, /* skull base soft tissue, sinuses, orbits */
    PH_PARENCHYMA,
    PH_CSF_VENT,  /* ventricles */
    PH_CSF_SPACE, /* sulci, cisterns, fissures, subarachnoid space */
    PH_DURA,      /* falx */
    PH_CALC,      /* physiological calcification */
};

/* An ellipsoid in the head frame: inside when |M (h - c)| < 1. */
struct ph_ellipsoid {
    float c[3];
    float m[9];
    float s[3]; /* semi-axes */
    float r2;   /* squared radius of a bounding sphere */
};

/* A mass effect: tissue near c moves away from it by up to mag mm. */
struct ph_push {
    float c[3];
    float mag, inv_2s2;
};

#define PH_MAX_VENT 12
#define PH_MAX_DEEP 6
#define PH_MAX_PUSH 6

struct ph_head {
    /* pose: h = R^T (p - centre) */
    float rot[9]; /* columns: head axes in patient coordinates */
    float centre[3];
    float grav[3]; /* direction of gravity (patient posterior) in the head frame */
    /* cranium */
    float a, b, c;                        /* inner table semi-axes */
    float egg;                            /* widening towards the back */
    float shape[4];                       /* skew of the skull, see shape_inv2 */
    float skull_t, scalp_t;               /* mm */
    float extra[3], inv_b2[3], inv_c2[3]; /* cavity, skull, head: offsets and 1/axis^2 */
    float floor_ant, floor_mid, tent_w;   /* fossa floors and tentorium height */
    float bone_hu, diploe_hu, scalp_hu, base_hu;
    float grey_hu, white_hu, csf_hu, deep_hu, cereb_hu, stem_hu;
    float csf_space; /* extra-axial CSF width (atrophy) */
    float cortex_t;  /* cortical ribbon */
    float sulc_w, sulc_depth;
    float gyr_k[3][3], gyr_ph[3];
    float fol_k[3], fol_ph;
    float falx_hu, falx_w, fiss_w;
    float sinus_d, venous_hu; /* dural venous sinuses: depth, density */
    struct ph_ellipsoid vent[PH_MAX_VENT];
    int nvent, nvent_lateral; /* the first nvent_lateral are lateral ventricles */
    struct ph_ellipsoid deep[PH_MAX_DEEP];
    int ndeep;
    struct ph_ellipsoid stem, cistern_supra, cistern_amb, petrous[2], orbit[2], sphenoid;
    /* calcifications (radius 0: absent) */
    float pineal[3], pineal_r, pineal_hu;
    float choroid[2][3], choroid_r, choroid_hu;
    float bg_calc_hu; /* basal ganglia calcification (0: none) */
    /* beam hardening between the petrous bones */
    float bh_amp;
    struct ph_push push[PH_MAX_PUSH];
    int npush;
};

/* Draws a random head from r. */
void ph_head_random(struct ph_head *hd, struct ph_rng *r);
/* Adds a mass effect at c: internal anatomy moves away from it by up to mag
 * mm, fading with distance (Gaussian, sigma mm). At most PH_MAX_PUSH. */
void ph_head_add_push(struct ph_head *hd, const float c[3], float mag, float sigma);

/* Calcified choroid plexus, pineal gland and basal ganglia, dense falx,
 * dense venous sinuses, stronger beam hardening: the negatives that look
 * like blood. */
void ph_head_add_mimics(struct ph_head *hd, struct ph_rng *r);

/* The scan range relative to the head's centre along patient z: from the
 * bottom of the posterior fossa to the vertex (inside the skull). */
void ph_head_extent(const struct ph_head *hd, float *z_lo, float *z_hi);

/* What the brain looks like at head-frame point h, and where h is: */
struct ph_point {
    float hu;
    enum ph_class cls;
    float depth;   /* mm below the inner table (brain only) */
    float h[3];    /* the point itself */
    float hs[3];   /* h after mass effect, where internal anatomy was looked up */
    float proj[3]; /* h projected radially onto the inner table */
    bool infra;    /* below the tentorium (posterior fossa) */
};
void ph_head_eval(const struct ph_head *hd, const float h[3], struct ph_point *pt);

/* The inner-table point along the ray from the origin through dir. */
void ph_head_surface(const struct ph_head *hd, const float dir[3], float out[3]);
/* True when h is inside one of the ventricle ellipsoids first..first+n-1. */
bool ph_head_in_vent(const struct ph_head *hd, const float h[3], int first, int n);

/* ---- lesions ---- */
struct ph_lesion {
    enum train_phantom_subtype type;
    float hu;
    float swirl;         /* EDH, IPH: HU less in the unclotted swirls */
    float c[3];          /* centre; EDH/SDH: inner-table point */
    float r;             /* tangential extent, radius */
    float t;             /* EDH/SDH thickness */
    float side;          /* SDH: hemisphere sign */
    bool falx;           /* SDH: along the falx (c: its centre in the midline plane) */
    float rim, rim_drop; /* IPH oedema */
    bool infra;          /* IPH: in the posterior fossa (the tentorium bounds it) */
    float irr[6];
    float dir[3], level; /* IVH: gravity and the fluid level along it; falx SDH: lowest w */
    float frac;          /* SAH: blood share in CSF */
    char size[8];        /* "tiny", "small", "medium", "large" */
};

#define PH_MAX_LESIONS 8

/* Places lesions of the subtypes in mask into hd, their size classes drawn
 * by size_cut (struct train_phantom_opts); adds their mass effect. Returns
 * how many were written to out. */
int ph_lesions_random(struct ph_head *hd, struct ph_rng *r, unsigned mask, const double size_cut[3],
                      struct ph_lesion *out, int max);

/* The subtypes whose blood the lesions can show: their own, and
 * intraventricular for an intraparenchymal bleed that reaches a ventricle. */
unsigned ph_lesions_types(const struct ph_lesion *les, int n);

/* What the lesions do at one point: v += a (oedema, f == 0) or
 * v += f (a - v) (blood; f == 1 replaces the tissue). */
struct ph_hit {
    int type;
    float f, a;
};
/* Fills hits (room for 2 * n) for the lesions covering pt, oedema first;
 * returns their number and ORs their type bits into *types. */
int ph_lesions_hit(const struct ph_lesion *les, int n, const struct ph_point *pt,
                   struct ph_hit *hits, unsigned *types);
/* The HU at the point with the hits applied, except those of types in skip. */
float ph_lesions_compose(float base, const struct ph_hit *hits, int nh, unsigned skip);
/* Extreme of the lateral ventricles along dir (head frame). */
float ph_head_vent_extent(const struct ph_head *hd, const float dir[3]);

/* ---- slices ---- */
struct ph_series_geom {
    int size;
    float spacing;   /* mm per pixel */
    float origin[2]; /* patient x, y of pixel (0, 0) */
    float thickness;
};

struct ph_slice_ctx {
    const struct ph_head *hd;
    const struct ph_lesion *les;
    int nles;
    unsigned omit_mask;
    struct ph_series_geom g;
    float noise_sd;
    bool motion;
    int nstreaks;
    uint64_t noise_seed;
    float *scratch; /* size * (size + 1) floats, owned by the caller */
};

/* Renders the slice centred at patient z into hu (size^2 values). For every
 * subtype in the study, delta[k] (size^2, or NULL when absent) receives what
 * that subtype's blood adds after partial-volume averaging and blur, without
 * noise. */
void ph_slice_render(const struct ph_slice_ctx *ctx, float z, float *hu,
                     float *delta[TRAIN_PHANTOM_NSUBTYPES]);

/* Preview: a contact sheet in the brain window, one tile per slice, the
 * visible part of each lesion outlined in its subtype's colour. */
struct ph_sheet {
    int tile, cols, rows, width, height;
    uint8_t *rgb;
    uint8_t *tile_mask; /* tile^2 scratch */
};
int ph_sheet_init(struct ph_sheet *sh, int nslices, int tile);
/* mask: size^2 bytes, bit k set where subtype k is visible. */
void ph_sheet_add(struct ph_sheet *sh, int index, const float *hu, const uint8_t *mask, int size);
int ph_sheet_write(const struct ph_sheet *sh, const char *path, char *err, size_t errlen);
void ph_sheet_free(struct ph_sheet *sh);
/* --masks: one slice's blood mask (size x size, bit k for subtype k) as an
 * 8-bit grey PNG. Returns 0, or -1 with a message. */
int ph_mask_write(const char *path, const uint8_t *mask, int size, char *err, size_t errlen);

#endif

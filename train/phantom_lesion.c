/* Hemorrhages of the five subtypes: where they go, how big and dense they
 * are, their mass effect, and what they do to the tissue at a point. */
#include "phantom_model.h"

#include <math.h>
#include <string.h>

static float frand(struct ph_rng *r, float lo, float hi)
{
    return (float)ph_rng_range(r, lo, hi);
}

static void normalize(float v[3])
{
    float n = sqrtf(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
    for (int i = 0; i < 3; i++)
        v[i] /= n;
}

/* Sizes: tiny ones are meant to be hard (1-3 slices, faint edges). One
 * uniform draw whatever the shares, so other shares keep every other draw. */
static int pick_size(struct ph_rng *r, const double cut[3], char out[8])
{
    static const char *const names[] = {"tiny", "small", "medium", "large"};
    double x = ph_rng_uniform(r);
    int s = x < cut[0] ? 0 : x < cut[1] ? 1 : x < cut[2] ? 2 : 3;
    strcpy(out, names[s]);
    return s;
}

static float by_size(struct ph_rng *r, int size, const float lo[4], const float hi[4])
{
    return frand(r, lo[size], hi[size]);
}

/* A convexity direction, lateral side sg, not towards the skull base. */
static void convexity_dir(struct ph_rng *r, float sg, float d[3])
{
    d[0] = sg * frand(r, 0.35f, 1.0f);
    d[1] = frand(r, -0.8f, 0.8f);
    d[2] = frand(r, -0.05f, 0.85f);
    normalize(d);
}

static void place_extra_axial(struct ph_head *hd, struct ph_rng *r, struct ph_lesion *l, int size)
{
    float d[3];
    l->side = ph_rng_chance(r, 0.5) ? 1.0f : -1.0f;
    convexity_dir(r, l->side, d);
    ph_head_surface(hd, d, l->c);
    if (l->type == TRAIN_PHANTOM_EPIDURAL) {
        static const float tlo[4] = {1.5f, 4, 8, 15}, thi[4] = {3, 8, 15, 26};
        static const float rlo[4] = {4, 12, 20, 28}, rhi[4] = {7, 20, 30, 42};
        l->t = by_size(r, size, tlo, thi);
        l->r = by_size(r, size, rlo, rhi);
        l->hu = frand(r, 55, 88);
        if (size >= 2 && ph_rng_chance(r, 0.3)) l->swirl = frand(r, 10, 25);
    } else if (ph_rng_chance(r, 0.15)) {
        /* interhemispheric: a thin layer along one side of the falx, above
         * the corpus callosum; it makes the falx look thick and dense */
        static const float rlo[4] = {6, 15, 25, 35}, rhi[4] = {10, 25, 35, 50};
        l->falx = true;
        l->c[0] = 0;
        l->c[1] = frand(r, -0.4f, 0.45f) * hd->b;
        l->c[2] = frand(r, 0.35f, 0.65f) * hd->c;
        l->level = 0.3f * hd->c;
        l->t = frand(r, 1.5f, 2.5f + (float)size);
        l->r = by_size(r, size, rlo, rhi);
        l->hu = frand(r, 52, 78);
        return;
    } else {
        static const float tlo[4] = {1.2f, 3, 6, 11}, thi[4] = {2.5f, 6, 11, 20};
        static const float rlo[4] = {4, 25, 42, 55}, rhi[4] = {7, 45, 65, 85};
        l->t = by_size(r, size, tlo, thi);
        l->r = by_size(r, size, rlo, rhi);
        l->hu = frand(r, 52, 78);
    }
    if (l->t > 5) {
        /* mass effect centred under the lesion, pushing the brain inwards */
        float pc[3];
        for (int i = 0; i < 3; i++)
            pc[i] = l->c[i] * 1.02f;
        ph_head_add_push(hd, pc, 0.55f * l->t, 0.8f * l->r);
    }
}

static void place_iph(struct ph_head *hd, struct ph_rng *r, struct ph_lesion *l, int size)
{
    static const float rlo[4] = {1.8f, 3, 7, 14}, rhi[4] = {3, 7, 14, 26};
    l->r = by_size(r, size, rlo, rhi);
    l->hu = frand(r, 52, 80);
    if (size >= 2 && ph_rng_chance(r, 0.3)) l->swirl = frand(r, 10, 25);
    l->rim = size == 0 ? frand(r, 0, 1) : frand(r, 1.5f, 2 + 0.25f * l->r);
    l->rim_drop = frand(r, 6, 14);
    for (int i = 0; i < 6; i++)
        l->irr[i] = frand(r, -0.35f, 0.35f);
    /* a point in parenchyma, deep enough to hold the lesion: in the basal
     * ganglia or thalami (the hypertensive pattern) or anywhere (lobar) */
    bool deep = ph_rng_chance(r, 0.4);
    for (int tries = 0; tries < 200; tries++) {
        float h[3] = {frand(r, -0.8f, 0.8f) * hd->a, frand(r, -0.8f, 0.8f) * hd->b,
                      frand(r, -0.45f, 0.8f) * hd->c};
        if (deep && tries < 50) {
            const struct ph_ellipsoid *e = &hd->deep[(int)(ph_rng_uniform(r) * hd->ndeep)];
            for (int i = 0; i < 3; i++)
                h[i] = e->c[i] + frand(r, -4, 4);
        }
        struct ph_point pt;
        ph_head_eval(hd, h, &pt);
        if (pt.cls == PH_PARENCHYMA && pt.depth > 0.7f * l->r + 4) {
            memcpy(l->c, h, sizeof l->c);
            l->infra = pt.infra;
            break;
        }
        if (tries == 199) {
            l->c[0] = 0.35f * hd->a;
            l->c[1] = -0.1f * hd->b;
            l->c[2] = 0.2f * hd->c;
        }
    }
    if (l->r > 8) ph_head_add_push(hd, l->c, 0.45f * l->r, 1.8f * l->r);
}

static void place_ivh(struct ph_head *hd, struct ph_rng *r, struct ph_lesion *l, int size)
{
    static const float flo[4] = {2.5f, 4, 7, 12}, fhi[4] = {4, 7, 12, 30};
    float fill = by_size(r, size, flo, fhi);
    memcpy(l->dir, hd->grav, sizeof l->dir);
    l->level = ph_head_vent_extent(hd, hd->grav) - fill;
    l->hu = frand(r, 50, 80);
    l->t = fill;
}

static void place_sah(struct ph_head *hd, struct ph_rng *r, struct ph_lesion *l, int size)
{
    static const float rlo[4] = {6, 10, 18, 30}, rhi[4] = {10, 18, 30, 50};
    l->r = by_size(r, size, rlo, rhi);
    l->hu = frand(r, 60, 78);
    /* acute blood replaces most of the CSF it reaches: the basal cisterns
     * of an aneurysmal bleed turn white; tiny ones are thinner */
    l->frac = size == 0 ? frand(r, 0.4f, 0.8f) : frand(r, 0.7f, 1.0f);
    if (ph_rng_chance(r, 0.45)) {
        /* basal cisterns and Sylvian fissures (aneurysmal pattern) */
        l->c[0] = frand(r, -25, 25);
        l->c[1] = -0.1f * hd->b + frand(r, -10, 10);
        l->c[2] = -0.3f * hd->c + frand(r, -6, 12);
    } else {
        /* convexity sulci (traumatic pattern) */
        float d[3];
        convexity_dir(r, ph_rng_chance(r, 0.5) ? 1.0f : -1.0f, d);
        ph_head_surface(hd, d, l->c);
        for (int i = 0; i < 3; i++)
            l->c[i] *= 0.92f;
    }
}

int ph_lesions_random(struct ph_head *hd, struct ph_rng *r, unsigned mask, const double size_cut[3],
                      struct ph_lesion *out, int max)
{
    int n = 0;
    for (int k = 0; k < TRAIN_PHANTOM_NSUBTYPES; k++) {
        if (!(mask & (1u << k))) continue;
        int count = ph_rng_chance(r, 0.15) ? 2 : 1;
        for (int j = 0; j < count && n < max; j++) {
            struct ph_lesion *l = &out[n++];
            memset(l, 0, sizeof *l);
            l->type = (enum train_phantom_subtype)k;
            int size = pick_size(r, size_cut, l->size);
            switch (l->type) {
            case TRAIN_PHANTOM_EPIDURAL:
            case TRAIN_PHANTOM_SUBDURAL:
                place_extra_axial(hd, r, l, size);
                break;
            case TRAIN_PHANTOM_INTRAPARENCHYMAL:
                place_iph(hd, r, l, size);
                break;
            case TRAIN_PHANTOM_INTRAVENTRICULAR:
                place_ivh(hd, r, l, size);
                break;
            case TRAIN_PHANTOM_SUBARACHNOID:
                place_sah(hd, r, l, size);
                break;
            default:
                break;
            }
        }
    }
    return n;
}

unsigned ph_lesions_types(const struct ph_lesion *les, int n)
{
    unsigned t = 0;
    for (int i = 0; i < n; i++) {
        t |= 1u << les[i].type;
        if (les[i].type == TRAIN_PHANTOM_INTRAPARENCHYMAL)
            t |= 1u << TRAIN_PHANTOM_INTRAVENTRICULAR;
    }
    return t;
}

static bool in_brain(enum ph_class c)
{
    return c == PH_PARENCHYMA || c == PH_CSF_VENT || c == PH_CSF_SPACE || c == PH_DURA ||
           c == PH_CALC;
}

/* Density of a hematoma at h: hyperacute ones have darker, unclotted
 * swirls (swirl HU below the rest). */
static float blood_hu(const struct ph_lesion *l, const float h[3])
{
    if (l->swirl <= 0) return l->hu;
    float b = sinf(0.45f * (h[0] + h[2]) + 9.0f * l->irr[0]) *
              sinf(0.4f * (h[1] - h[2]) + 9.0f * l->irr[1]);
    return b > 0 ? l->hu - l->swirl * b : l->hu;
}

/* True when pt lies in the lesion's compartment: the tentorium and, above
 * it, the falx bound an intraparenchymal bleed. */
static bool iph_compartment(const struct ph_lesion *l, const struct ph_point *pt)
{
    if (pt->infra != l->infra) return false;
    return l->infra || fabsf(l->c[0]) < 4 || pt->hs[0] * l->c[0] > 0;
}

/* Irregular radius of an intraparenchymal lesion along unit vector n. */
static float iph_radius(const struct ph_lesion *l, const float n[3])
{
    float f = l->irr[0] * n[0] * n[1] + l->irr[1] * n[1] * n[2] + l->irr[2] * n[0] * n[2] +
              l->irr[3] * (n[0] * n[0] - n[1] * n[1]) + l->irr[4] * (n[2] * n[2] - 0.33f) +
              l->irr[5] * 3.0f * n[0] * n[1] * n[2];
    return l->r * (1.0f + f);
}

int ph_lesions_hit(const struct ph_lesion *les, int n, const struct ph_point *pt,
                   struct ph_hit *hits, unsigned *types)
{
    if (!in_brain(pt->cls)) return 0;
    int nh = 0;
    /* oedema first, so blood composed after it replaces it */
    for (int i = 0; i < n; i++) {
        const struct ph_lesion *l = &les[i];
        if (l->type != TRAIN_PHANTOM_INTRAPARENCHYMAL || l->rim <= 0 || pt->cls != PH_PARENCHYMA)
            continue;
        float d[3] = {pt->h[0] - l->c[0], pt->h[1] - l->c[1], pt->h[2] - l->c[2]};
        float dd = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
        float rmax = l->r * 1.6f + l->rim;
        if (dd > rmax * rmax) continue;
        float D = sqrtf(dd) + 1e-6f;
        float nv[3] = {d[0] / D, d[1] / D, d[2] / D};
        float re = iph_radius(l, nv);
        if (D >= re && D < re + l->rim && iph_compartment(l, pt)) {
            hits[nh++] = (struct ph_hit){l->type, 0.0f, -l->rim_drop};
        }
    }
    for (int i = 0; i < n; i++) {
        const struct ph_lesion *l = &les[i];
        switch (l->type) {
        case TRAIN_PHANTOM_SUBDURAL:
            if (l->falx) {
                float d = pt->hs[0] * l->side, d1 = pt->hs[1] - l->c[1], d2 = pt->hs[2] - l->c[2];
                float q2 = (d1 * d1 + d2 * d2) / (l->r * l->r);
                if (q2 < 1.0f && d > 0.3f && d < 0.3f + l->t * sqrtf(1.0f - q2) &&
                    pt->hs[2] > l->level && pt->cls != PH_CSF_VENT)
                    hits[nh++] = (struct ph_hit){l->type, 1.0f, l->hu};
                break;
            }
            /* fall through */
        case TRAIN_PHANTOM_EPIDURAL: {
            if (pt->depth > l->t) break;
            float d0 = pt->proj[0] - l->c[0], d1 = pt->proj[1] - l->c[1],
                  d2 = pt->proj[2] - l->c[2];
            float q2 = (d0 * d0 + d1 * d1 + d2 * d2) / (l->r * l->r);
            if (q2 >= 1.0f) break;
            float prof;
            if (l->type == TRAIN_PHANTOM_EPIDURAL) {
                prof = 1.0f - q2; /* biconvex */
            } else {
                if (pt->proj[0] * l->side < 1.0f) break; /* the falx stops it */
                prof = sqrtf(sqrtf(1.0f - q2));          /* crescent, full along its length */
            }
            if (pt->depth < l->t * prof)
                hits[nh++] = (struct ph_hit){l->type, 1.0f, blood_hu(l, pt->hs)};
            break;
        }
        case TRAIN_PHANTOM_INTRAPARENCHYMAL: {
            /* the hematoma is where it is; its mass effect moves the
             * anatomy around it (looked up at hs) away from it */
            float d[3] = {pt->h[0] - l->c[0], pt->h[1] - l->c[1], pt->h[2] - l->c[2]};
            float dd = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
            float rmax = l->r * 1.6f;
            if (dd > rmax * rmax) break;
            float D = sqrtf(dd) + 1e-6f;
            float nv[3] = {d[0] / D, d[1] / D, d[2] / D};
            if (D < iph_radius(l, nv) && iph_compartment(l, pt)) {
                /* blood that reaches a ventricle is intraventricular */
                int type =
                    pt->cls == PH_CSF_VENT ? (int)TRAIN_PHANTOM_INTRAVENTRICULAR : (int)l->type;
                hits[nh++] = (struct ph_hit){type, 1.0f, blood_hu(l, pt->h)};
            }
            break;
        }
        case TRAIN_PHANTOM_INTRAVENTRICULAR: {
            /* blood settles in the dependent part: a fluid level */
            if (pt->cls != PH_CSF_VENT) break;
            float g = pt->hs[0] * l->dir[0] + pt->hs[1] * l->dir[1] + pt->hs[2] * l->dir[2];
            if (g > l->level) hits[nh++] = (struct ph_hit){l->type, 1.0f, l->hu};
            break;
        }
        case TRAIN_PHANTOM_SUBARACHNOID: {
            if (pt->cls != PH_CSF_SPACE) break;
            float d0 = pt->hs[0] - l->c[0], d1 = pt->hs[1] - l->c[1], d2 = pt->hs[2] - l->c[2];
            float q2 = (d0 * d0 + d1 * d1 + d2 * d2) / (l->r * l->r);
            /* near-uniform, thinning only towards its edge */
            if (q2 < 1.0f) hits[nh++] = (struct ph_hit){l->type, l->frac * (1.0f - q2 * q2), l->hu};
            break;
        }
        default:
            break;
        }
    }
    for (int i = 0; i < nh; i++)
        *types |= 1u << hits[i].type;
    return nh;
}

float ph_lesions_compose(float base, const struct ph_hit *hits, int nh, unsigned skip)
{
    float v = base;
    for (int i = 0; i < nh; i++) {
        if (skip & (1u << hits[i].type)) continue;
        if (hits[i].f == 0.0f)
            v += hits[i].a;
        else
            v += hits[i].f * (hits[i].a - v);
    }
    return v;
}

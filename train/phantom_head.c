/* The phantom's head: a random skull, brain and skull base, and the tissue
 * found at any point of it. Evaluated millions of times per study, so it is
 * plain arithmetic on a few ellipsoids and a sulcal pattern. */
#include "phantom_model.h"

#include <math.h>
#include <string.h>

#define DEG (float)(M_PI / 180.0)

static float clampf(float x, float lo, float hi)
{
    return x < lo ? lo : x > hi ? hi : x;
}

static float smoothstep(float e0, float e1, float x)
{
    float t = clampf((x - e0) / (e1 - e0), 0.0f, 1.0f);
    return t * t * (3.0f - 2.0f * t);
}

static float frand(struct ph_rng *r, float lo, float hi)
{
    return (float)ph_rng_range(r, lo, hi);
}

/* An ellipsoid with semi-axes s, turned by yaw about w and pitch about u. */
static void ell_make(struct ph_ellipsoid *e, float cu, float cv, float cw, float su, float sv,
                     float sw, float yaw, float pitch)
{
    float cy = cosf(yaw), sy = sinf(yaw), cp = cosf(pitch), sp = sinf(pitch);
    /* R = Rz(yaw) Rx(pitch); M = diag(1/s) R^T */
    float rt[9] = {cy, sy, 0, -sy * cp, cy * cp, sp, sy * sp, -cy * sp, cp};
    float inv[3] = {1.0f / su, 1.0f / sv, 1.0f / sw};
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++)
            e->m[i * 3 + j] = inv[i] * rt[i * 3 + j];
    e->c[0] = cu;
    e->c[1] = cv;
    e->c[2] = cw;
    e->s[0] = su;
    e->s[1] = sv;
    e->s[2] = sw;
    float r = fmaxf(su, fmaxf(sv, sw)) * 1.8f; /* covers ell_q < 3.24 */
    e->r2 = r * r;
}

/* |M (h - c)|^2, or a value above 1 when h is outside the bounding sphere
 * (the common case, kept cheap). */
static inline float ell_q(const struct ph_ellipsoid *e, const float h[3])
{
    float d0 = h[0] - e->c[0], d1 = h[1] - e->c[1], d2 = h[2] - e->c[2];
    if (d0 * d0 + d1 * d1 + d2 * d2 > e->r2) return 4.0f;
    float x = e->m[0] * d0 + e->m[1] * d1 + e->m[2] * d2;
    float y = e->m[3] * d0 + e->m[4] * d1 + e->m[5] * d2;
    float z = e->m[6] * d0 + e->m[7] * d1 + e->m[8] * d2;
    return x * x + y * y + z * z;
}

static void rand_unit(struct ph_rng *r, float out[3])
{
    float n;
    do {
        for (int i = 0; i < 3; i++)
            out[i] = frand(r, -1, 1);
        n = out[0] * out[0] + out[1] * out[1] + out[2] * out[2];
    } while (n < 0.05f || n > 1.0f);
    n = sqrtf(n);
    for (int i = 0; i < 3; i++)
        out[i] /= n;
}

void ph_head_random(struct ph_head *hd, struct ph_rng *r)
{
    memset(hd, 0, sizeof *hd);
    float yaw = frand(r, -8, 8) * DEG, pitch = frand(r, -15, 12) * DEG,
          roll = frand(r, -6, 6) * DEG;
    /* rot = Rz(yaw) Rx(pitch) Ry(roll), stored row-major */
    float cy = cosf(yaw), sy = sinf(yaw), cp = cosf(pitch), sp = sinf(pitch), cr = cosf(roll),
          sr = sinf(roll);
    float rz[9] = {cy, -sy, 0, sy, cy, 0, 0, 0, 1};
    float rx[9] = {1, 0, 0, 0, cp, -sp, 0, sp, cp};
    float ry[9] = {cr, 0, sr, 0, 1, 0, -sr, 0, cr};
    float t[9];
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++) {
            t[i * 3 + j] = 0;
            for (int k = 0; k < 3; k++)
                t[i * 3 + j] += rz[i * 3 + k] * rx[k * 3 + j];
        }
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++) {
            hd->rot[i * 3 + j] = 0;
            for (int k = 0; k < 3; k++)
                hd->rot[i * 3 + j] += t[i * 3 + k] * ry[k * 3 + j];
        }
    hd->centre[0] = frand(r, -12, 12);
    hd->centre[1] = frand(r, -6, 15); /* resting on the head holder: rather posterior */
    hd->centre[2] = frand(r, -20, 20);
    /* gravity is patient posterior (+y) for a supine patient: R^T e_y */
    for (int i = 0; i < 3; i++)
        hd->grav[i] = hd->rot[3 + i];

    float atrophy = frand(r, 0, 1);
    atrophy *= atrophy;
    hd->a = frand(r, 61, 71);
    hd->b = frand(r, 79, 92);
    hd->c = frand(r, 64, 76);
    hd->egg = frand(r, 0.0f, 0.09f);
    for (int i = 0; i < 4; i++)
        hd->shape[i] = frand(r, -0.08f, 0.08f);
    hd->skull_t = frand(r, 5, 8.5f);
    hd->scalp_t = frand(r, 4, 7.5f);
    hd->floor_ant = -frand(r, 0.27f, 0.35f) * hd->c;
    hd->floor_mid = -frand(r, 0.52f, 0.6f) * hd->c;
    hd->tent_w = -frand(r, 0.2f, 0.28f) * hd->c;
    hd->extra[0] = 0;
    hd->extra[1] = hd->skull_t;
    hd->extra[2] = hd->skull_t + hd->scalp_t;
    for (int i = 0; i < 3; i++) {
        hd->inv_b2[i] = 1.0f / ((hd->b + hd->extra[i]) * (hd->b + hd->extra[i]));
        hd->inv_c2[i] = 1.0f / ((hd->c + hd->extra[i]) * (hd->c + hd->extra[i]));
    }
    hd->bone_hu = frand(r, 1100, 1800);
    hd->diploe_hu = frand(r, 350, 750);
    hd->scalp_hu = frand(r, 25, 55);
    hd->base_hu = frand(r, 40, 60);
    hd->grey_hu = frand(r, 36, 44);
    hd->white_hu = clampf(hd->grey_hu - frand(r, 9, 15), 21, 29);
    hd->csf_hu = frand(r, 3, 12);
    hd->deep_hu = hd->grey_hu - frand(r, 0, 4);
    hd->cereb_hu = hd->grey_hu - frand(r, 1, 5);
    hd->stem_hu = hd->white_hu + frand(r, 2, 6);
    hd->csf_space = 0.6f + 3.0f * atrophy + frand(r, 0, 0.6f);
    hd->cortex_t = frand(r, 2.5f, 3.5f);
    hd->sulc_w = 0.22f + 0.3f * atrophy;
    hd->sulc_depth = frand(r, 13, 20);
    float kg = 2.0f * (float)M_PI / frand(r, 19, 26);
    for (int i = 0; i < 3; i++) {
        float d[3];
        rand_unit(r, d);
        for (int j = 0; j < 3; j++)
            hd->gyr_k[i][j] = kg * d[j];
        hd->gyr_ph[i] = frand(r, 0, 6.2832f);
    }
    float d[3];
    rand_unit(r, d);
    for (int j = 0; j < 3; j++)
        hd->fol_k[j] = 2.0f * (float)M_PI / 6.5f * d[j];
    hd->fol_ph = frand(r, 0, 6.2832f);
    hd->falx_hu = frand(r, 40, 60);
    hd->sinus_d = frand(r, 5, 9);
    hd->venous_hu = frand(r, 40, 62);
    hd->falx_w = frand(r, 0.6f, 1.1f);
    hd->fiss_w = 0.4f + 2.0f * atrophy;

    float a = hd->a, b = hd->b, c = hd->c;
    float vk = frand(r, 0.75f, 1.0f) + 0.7f * atrophy;
    int n = 0;
    for (int s = -1; s <= 1; s += 2) {
        float as = s * frand(r, 0.9f, 1.1f); /* slight asymmetry */
        ell_make(&hd->vent[n++], as * 10.0f, -0.26f * b, 0.12f * c, 5.0f * vk, 16, 9.0f * vk,
                 s * 10 * DEG, 0); /* frontal horn */
        ell_make(&hd->vent[n++], as * 13.0f, 0.02f * b, 0.22f * c, 5.5f * vk, 24, 5.5f * vk, 0,
                 0); /* body */
        ell_make(&hd->vent[n++], as * 21.0f, 0.3f * b, 0.12f * c, 7.0f * vk, 14, 9.0f * vk, 0,
                 0); /* atrium */
        ell_make(&hd->vent[n++], as * 17.0f, 0.47f * b, 0.08f * c, 3.5f * vk, 13, 4.5f * vk,
                 -s * 15 * DEG, 0); /* occipital horn */
        ell_make(&hd->vent[n++], as * 29.0f, -0.04f * b, -0.25f * c, 3.0f * vk, 13, 3.5f * vk,
                 -s * 20 * DEG, 0); /* temporal horn */
    }
    hd->nvent_lateral = n;
    ell_make(&hd->vent[n++], 0, -0.03f * b, -0.08f * c, 2.2f * vk, 15, 10, 0, 0); /* third */
    ell_make(&hd->vent[n++], 0, 0.33f * b, -0.62f * c, 6, 3.5f, 6, 0, 0);         /* fourth */
    hd->nvent = n;

    n = 0;
    for (int s = -1; s <= 1; s += 2) {
        ell_make(&hd->deep[n++], s * 17.0f, -0.18f * b, 0.08f * c, 6, 10, 8, 0, 0); /* caudate */
        ell_make(&hd->deep[n++], s * 25.0f, -0.03f * b, -0.02f * c, 7, 15, 10, 0,
                 0);                                                               /* lentiform */
        ell_make(&hd->deep[n++], s * 11.0f, 0.1f * b, -0.02f * c, 9, 13, 9, 0, 0); /* thalamus */
    }
    hd->ndeep = n;
    ell_make(&hd->stem, 0, 0.16f * b, -0.55f * c, 12, 11, 0.37f * c, 0, -15 * DEG);
    ell_make(&hd->cistern_supra, 0, -0.1f * b, -0.37f * c, 13, 10, 5, 0, 0);
    ell_make(&hd->cistern_amb, 0, 0.15f * b, -0.3f * c, 15, 14, 5, 0, 0);
    for (int s = 0; s < 2; s++) {
        float sg = s ? 1.0f : -1.0f;
        ell_make(&hd->petrous[s], sg * 0.42f * a, 0.21f * a, hd->floor_mid + 9, 7, 30, 8,
                 -sg * 63 * DEG, 0);
        ell_make(&hd->orbit[s], sg * 0.45f * a, -0.93f * b, hd->floor_ant - 18, 12, 12, 12, 0, 0);
    }
    ell_make(&hd->sphenoid, 0, -0.38f * b, hd->floor_mid + 6, 12, 12, 9, 0, 0);
    hd->bh_amp = frand(r, 4, 15);
}

void ph_head_add_mimics(struct ph_head *hd, struct ph_rng *r)
{
    if (ph_rng_chance(r, 0.4)) {
        hd->choroid_r = frand(r, 1.5f, 4.0f);
        hd->choroid_hu = frand(r, 90, 350);
        for (int s = 0; s < 2; s++) {
            const struct ph_ellipsoid *atrium = &hd->vent[s * 5 + 2];
            for (int i = 0; i < 3; i++)
                hd->choroid[s][i] = atrium->c[i] + frand(r, -2, 2);
        }
    }
    if (ph_rng_chance(r, 0.45)) {
        hd->pineal_r = frand(r, 1.5f, 4.0f);
        hd->pineal_hu = frand(r, 80, 300);
        hd->pineal[0] = 0;
        hd->pineal[1] = 0.2f * hd->b;
        hd->pineal[2] = -0.06f * hd->c;
    }
    if (ph_rng_chance(r, 0.2)) {
        hd->falx_hu = frand(r, 80, 220);
        hd->falx_w = frand(r, 1.0f, 2.0f);
    }
    if (ph_rng_chance(r, 0.25)) hd->venous_hu = frand(r, 62, 78); /* high haematocrit */
    if (ph_rng_chance(r, 0.12)) hd->bg_calc_hu = frand(r, 90, 250);
    hd->bh_amp = frand(r, 15, 45);
}

float ph_head_vent_extent(const struct ph_head *hd, const float dir[3])
{
    float best = -1e9f;
    for (int i = 0; i < hd->nvent_lateral; i++) {
        const struct ph_ellipsoid *e = &hd->vent[i];
        float c = e->c[0] * dir[0] + e->c[1] * dir[1] + e->c[2] * dir[2];
        float s2 = 0;
        for (int k = 0; k < 3; k++) {
            /* (R^T dir)_k = s_k (m_k . dir) */
            float rk = e->s[k] *
                       (e->m[k * 3] * dir[0] + e->m[k * 3 + 1] * dir[1] + e->m[k * 3 + 2] * dir[2]);
            s2 += e->s[k] * e->s[k] * rk * rk;
        }
        float ext = c + sqrtf(s2);
        if (ext > best) best = ext;
    }
    return best;
}

void ph_head_add_push(struct ph_head *hd, const float c[3], float mag, float sigma)
{
    if (hd->npush >= PH_MAX_PUSH || mag <= 0) return;
    struct ph_push *p = &hd->push[hd->npush++];
    memcpy(p->c, c, sizeof p->c);
    p->mag = mag;
    p->inv_2s2 = 1.0f / (2.0f * sigma * sigma);
}

void ph_head_extent(const struct ph_head *hd, float *z_lo, float *z_hi)
{
    /* patient z in the head frame is row 2 of rot */
    const float *zr = hd->rot + 6;
    float A = hd->a * (1.0f + hd->egg) + 0.6f * hd->skull_t, B = hd->b + 0.6f * hd->skull_t,
          C = hd->c + 0.6f * hd->skull_t;
    *z_hi = sqrtf(A * A * zr[0] * zr[0] + B * B * zr[1] * zr[1] + C * C * zr[2] * zr[2]);
    /* the bottom of the posterior fossa */
    *z_lo = zr[1] * 0.2f * hd->b + zr[2] * -0.88f * hd->c;
}

/* Half-width of the cranial cavity, wider towards the back. */
static float half_width(const struct ph_head *hd, float v)
{
    return hd->a * (1.0f + hd->egg * clampf(v / hd->b, -1, 1));
}

/* 1/m^2 for the radial shape factor m along h: second-order terms that
 * skew the skull (plagiocephaly, a flatter or fuller side or front). */
static float shape_inv2(const struct ph_head *hd, float u, float v, float w, float n2)
{
    const float *k = hd->shape;
    float m =
        1.0f + (k[0] * u * v + k[1] * u * w + k[2] * v * w + k[3] * (u * u - v * v)) / (n2 + 1e-6f);
    return 1.0f / (m * m);
}

static float inner_rho2(const struct ph_head *hd, const float h[3], float extra)
{
    float au = half_width(hd, h[1]) + extra, bv = hd->b + extra, cw = hd->c + extra;
    float x = h[0] / au, y = h[1] / bv, z = h[2] / cw;
    float n2 = h[0] * h[0] + h[1] * h[1] + h[2] * h[2];
    return (x * x + y * y + z * z) * shape_inv2(hd, h[0], h[1], h[2], n2);
}

void ph_head_surface(const struct ph_head *hd, const float dir[3], float out[3])
{
    float rho = sqrtf(inner_rho2(hd, dir, 0));
    for (int i = 0; i < 3; i++)
        out[i] = dir[i] / rho;
}

/* Floor of the cranial cavity under (u, v): the anterior fossa over the
 * orbits (domed orbital roofs), the bowls of the middle fossae rising to the
 * sella, then the posterior fossa (none: the inner table itself). Curved, so
 * an axial slice cuts it in bands rather than slabs. */
static float floor_w(const struct ph_head *hd, float u, float v)
{
    float au = fabsf(u);
    float t1 = smoothstep(-0.42f * hd->b, -0.26f * hd->b, v);
    /* the petrous ridges make the front of the posterior fossa a V */
    float t2 = smoothstep(-0.06f * hd->b, 0.06f * hd->b, v - 0.5f * au);
    float du = (au - 0.4f * hd->a) / (0.22f * hd->a);
    float ant =
        hd->floor_ant + 7.0f * expf(-du * du) + 10.0f * smoothstep(-0.75f * hd->b, -hd->b, v);
    float mu = (au - 0.58f * hd->a) / (0.3f * hd->a), mv = (v + 0.06f * hd->b) / (0.24f * hd->b);
    float mid = hd->floor_mid + 16.0f * (mu * mu + mv * mv);
    if (mid > hd->floor_ant - 3.0f) mid = hd->floor_ant - 3.0f;
    float f = ant + (mid - ant) * t1;
    return f + (-2.0f * hd->c - f) * t2;
}

/* Tentorium height over v (it slopes down towards the occiput). */
static float tent_w(const struct ph_head *hd, float v)
{
    return hd->tent_w - 0.3f * hd->c * smoothstep(0.05f * hd->b, 0.95f * hd->b, v);
}

bool ph_head_in_vent(const struct ph_head *hd, const float h[3], int first, int n)
{
    for (int i = first; i < first + n; i++)
        if (ell_q(&hd->vent[i], h) < 1.0f) return true;
    return false;
}

/* An air sinus where the squared normalised radius q < 1, its bony wall out
 * to wall; false elsewhere. */
static bool sinus(const struct ph_head *hd, float q, float wall, struct ph_point *pt)
{
    if (q >= wall) return false;
    if (q < 1.0f) {
        pt->hu = -920.0f;
    } else {
        pt->cls = PH_BONE;
        pt->hu = 0.65f * hd->bone_hu;
    }
    return true;
}

/* Tissue below the cranial cavity and in the face: orbits, sinuses, soft
 * tissue. */
static void base_tissue(const struct ph_head *hd, const float h[3], struct ph_point *pt)
{
    pt->cls = PH_BASE;
    pt->hu = hd->base_hu; /* muscle and other soft tissue */
    /* sphenoid body and clivus, the nasopharynx in front of and below them */
    float cu = h[0] / (0.3f * hd->a), cv = (h[1] + 0.17f * hd->b) / (0.2f * hd->b),
          cw = (h[2] - hd->floor_mid + 14.0f) / 16.0f;
    float nu = h[0] / 13.0f, nv = (h[1] + 0.42f * hd->b) / 14.0f,
          nw = (h[2] - hd->floor_mid + 38.0f) / 16.0f;
    if (nu * nu + nv * nv + nw * nw < 1.0f) {
        pt->hu = -900.0f;
        return;
    }
    if (cu * cu + cv * cv + cw * cw < 1.0f) {
        pt->cls = PH_BONE;
        pt->hu = 0.8f * hd->diploe_hu;
        return;
    }
    for (int s = 0; s < 2; s++) {
        float q = ell_q(&hd->orbit[s], h);
        if (q < 1.0f) {
            pt->hu = 12.0f;
            return;
        }
        if (q < 3.0f) {
            pt->hu = -85.0f; /* orbital fat */
            return;
        }
    }
    if (sinus(hd, ell_q(&hd->sphenoid, h), 1.25f, pt)) return;
    float u = h[0], v = h[1], w = h[2];
    /* maxillary sinuses and the nasal cavity with its septum */
    float mu = (fabsf(u) - 0.32f * hd->a) / 13.0f, mv = (v + 0.74f * hd->b) / 15.0f,
          mw = (w - hd->floor_ant + 50.0f) / 17.0f;
    if (sinus(hd, mu * mu + mv * mv + mw * mw, 1.15f, pt)) return;
    if (fabsf(u) < 8 && v < -0.62f * hd->b && w < hd->floor_ant - 34 && w > hd->floor_ant - 70) {
        pt->hu = fabsf(u) < 1.0f ? 300.0f : -900.0f;
        return;
    }
    float eu = u / 13.0f, ev = (v + 0.85f * hd->b) / (0.25f * hd->b),
          ew = (w - hd->floor_ant + 18.0f) / 20.0f;
    if (eu * eu + ev * ev + ew * ew < 1.0f) {
        /* ethmoid air cells: air in a labyrinth of thin bony septa */
        float g = 0;
        for (int i = 0; i < 3; i++)
            g += sinf(3.0f * (hd->gyr_k[i][0] * u + hd->gyr_k[i][1] * v + hd->gyr_k[i][2] * w));
        pt->hu = fabsf(g) < 0.35f ? 350.0f : -800.0f;
    }
}

void ph_head_eval(const struct ph_head *hd, const float h[3], struct ph_point *pt)
{
    float u = h[0], v = h[1], w = h[2];
    pt->depth = 0;
    pt->infra = false;
    memcpy(pt->hs, h, sizeof pt->hs);
    memcpy(pt->h, h, sizeof pt->h);
    float hw = half_width(hd, v);
    float u2 = u * u, v2 = v * v, w2 = w * w;
    /* squared normalised radius for the cavity (0), skull (1) and head (2) */
    float sh = shape_inv2(hd, u, v, w, u2 + v2 + w2);
#define RHO2(i)                                                                                    \
    ((u2 / ((hw + hd->extra[i]) * (hw + hd->extra[i])) + v2 * hd->inv_b2[i] +                      \
      w2 * hd->inv_c2[i]) *                                                                        \
     sh)
    float r_head = RHO2(2);
    bool neck = w < -0.45f * hd->c && (u * u) / (0.72f * 0.72f * hd->a * hd->a) +
                                              ((v - 0.15f * hd->b) * (v - 0.15f * hd->b)) /
                                                  (0.8f * 0.8f * hd->b * hd->b) <
                                          1.0f;
    float fw = (w - (hd->floor_ant - 22)) / 26.0f, fv = (v + 0.72f * hd->b) / (0.35f * hd->b),
          fu = u / (0.78f * hd->a);
    bool face = fw * fw + fv * fv + fu * fu < 1.0f;
    if (r_head >= 1.0f && !neck && !face) {
        pt->cls = PH_AIR;
        pt->hu = -1000.0f;
        return;
    }
    float r_skull = RHO2(1);
    if (r_skull >= 1.0f) {
        if (r_head < 1.0f && w > hd->floor_ant - 10) {
            /* scalp: skin and galea with a layer of subcutaneous fat */
            float n = sqrtf(u * u + v * v + w * w);
            float d = n * (1.0f - 1.0f / sqrtf(r_skull)) / hd->scalp_t;
            pt->cls = PH_SCALP;
            pt->hu = (d > 0.3f && d < 0.6f) ? -70.0f : hd->scalp_hu;
            return;
        }
        base_tissue(hd, h, pt);
        return;
    }
    float r_in = RHO2(0);
#undef RHO2
    if (r_in >= 1.0f) {
        /* vault: inner and outer tables around the diploe */
        float n = sqrtf(u * u + v * v + w * w);
        float d = n * (1.0f - 1.0f / sqrtf(r_in)) / hd->skull_t;
        pt->cls = PH_BONE;
        pt->hu = (d > 0.3f && d < 0.7f) ? hd->diploe_hu : hd->bone_hu;
        return;
    }
    for (int s = 0; s < 2; s++) {
        if (ell_q(&hd->petrous[s], h) < 1.0f) {
            pt->cls = PH_BONE;
            bool mastoid = fabsf(u) > 0.6f * hd->a;
            pt->hu = mastoid ? (sinf(1.3f * v) * sinf(1.1f * w) > 0.3f ? 500.0f : -500.0f)
                             : 1.1f * hd->bone_hu;
            return;
        }
    }
    float fl = floor_w(hd, u, v);
    if (w < fl) {
        if (fl - w < 3.5f) {
            pt->cls = PH_BONE;
            pt->hu = 0.85f * hd->bone_hu;
        } else if (v > -0.3f * hd->b && fabsf(u) > 14.0f && fl - w < 8.0f) {
            /* spongy bone under the middle fossa, air cells towards the back */
            pt->cls = PH_BONE;
            pt->hu = v > 0.1f * hd->b && sinf(1.2f * u) * sinf(1.1f * v) * sinf(w) > 0.2f
                         ? -600.0f
                         : hd->diploe_hu;
        } else {
            base_tissue(hd, h, pt);
        }
        return;
    }

    /* brain */
    float n = sqrtf(u * u + v * v + w * w);
    float rho = sqrtf(r_in);
    float depth = n * (1.0f / rho - 1.0f);
    if (w - fl < depth) depth = w - fl;
    pt->depth = depth;
    float s = 1.0f / rho;
    pt->proj[0] = u * s;
    pt->proj[1] = v * s;
    pt->proj[2] = w * s;
    /* dural venous sinuses: superior sagittal (a triangle at the midline
     * under the vault) and transverse (along the tentorium's outer edge);
     * dense blood in a vessel, a classic mimic of hemorrhage */
    float sss = 0.75f * (hd->sinus_d - depth);
    if ((sss > 0 && fabsf(u) < sss && (w > 0.1f * hd->c || v > 0.3f * hd->b)) ||
        (depth < 0.6f * hd->sinus_d && v > 0.45f * hd->b && fabsf(w - tent_w(hd, v)) < 3.5f)) {
        pt->cls = PH_DURA;
        pt->hu = hd->venous_hu;
        return;
    }
    if (depth < hd->csf_space) {
        pt->cls = PH_CSF_SPACE;
        pt->hu = hd->csf_hu;
        return;
    }

    /* internal anatomy moves with mass effect; the skull does not */
    float hs[3] = {u, v, w}, efface = 0;
    for (int i = 0; i < hd->npush; i++) {
        const struct ph_push *p = &hd->push[i];
        float d0 = u - p->c[0], d1 = v - p->c[1], d2 = w - p->c[2];
        float dd = d0 * d0 + d1 * d1 + d2 * d2;
        float m = p->mag * expf(-dd * p->inv_2s2);
        if (m < 0.05f) continue;
        float k = m / (sqrtf(dd) + 1e-3f);
        hs[0] -= k * d0;
        hs[1] -= k * d1;
        hs[2] -= k * d2;
        efface += m;
    }
    memcpy(pt->hs, hs, sizeof hs);
    float us = hs[0], vs = hs[1], ws = hs[2];
    pt->cls = PH_PARENCHYMA;

    bool infra = vs > 0.04f * hd->b && ws < tent_w(hd, vs);
    pt->infra = infra;
    if (ell_q(&hd->stem, hs) < 1.0f) {
        if (ell_q(&hd->vent[hd->nvent - 1], hs) < 1.0f) {
            pt->cls = PH_CSF_VENT;
            pt->hu = hd->csf_hu;
        } else {
            pt->hu = hd->stem_hu;
        }
    } else if (infra) {
        if (ell_q(&hd->vent[hd->nvent - 1], hs) < 1.0f) {
            pt->cls = PH_CSF_VENT;
            pt->hu = hd->csf_hu;
        } else if (ell_q(&hd->cistern_amb, hs) < 1.0f) {
            pt->cls = PH_CSF_SPACE;
            pt->hu = hd->csf_hu;
        } else {
            /* folia: curved, mostly below the resolution; fissures near the surface */
            float f = sinf(hd->fol_k[0] * us + hd->fol_k[1] * vs + hd->fol_k[2] * ws + hd->fol_ph +
                           1.5f * sinf(0.11f * (us + ws)));
            if (depth < 4.0f && fabsf(f) < 0.5f * hd->sulc_w) {
                pt->cls = PH_CSF_SPACE;
                pt->hu = hd->csf_hu;
            } else {
                pt->hu = hd->cereb_hu + 1.5f * f;
            }
        }
        /* beam hardening: a dark band between the petrous bones */
        float pv = hd->petrous[0].c[1], pw = hd->petrous[0].c[2];
        float dv = (vs - pv - 12.0f) / 9.0f, dw = (ws - pw) / 12.0f;
        float e = dv * dv + dw * dw;
        if (e < 6.0f) pt->hu -= hd->bh_amp * expf(-e) * (0.85f + 0.15f * cosf(0.45f * us));
    } else {
        if (ph_head_in_vent(hd, hs, 0, hd->nvent - 1)) {
            pt->cls = PH_CSF_VENT;
            pt->hu = hd->csf_hu;
            for (int i = 0; i < 2; i++) {
                const float *cc = hd->choroid[i];
                float d0 = us - cc[0], d1 = vs - cc[1], d2 = ws - cc[2];
                if (hd->choroid_r > 0 &&
                    d0 * d0 + d1 * d1 + d2 * d2 < hd->choroid_r * hd->choroid_r) {
                    pt->cls = PH_CALC;
                    pt->hu = hd->choroid_hu;
                }
            }
            return;
        }
        if (ell_q(&hd->cistern_supra, hs) < 1.0f || ell_q(&hd->cistern_amb, hs) < 1.0f) {
            pt->cls = PH_CSF_SPACE;
            pt->hu = hd->csf_hu;
            return;
        }
        if (hd->pineal_r > 0) {
            float d0 = us - hd->pineal[0], d1 = vs - hd->pineal[1], d2 = ws - hd->pineal[2];
            if (d0 * d0 + d1 * d1 + d2 * d2 < hd->pineal_r * hd->pineal_r) {
                pt->cls = PH_CALC;
                pt->hu = hd->pineal_hu;
                return;
            }
        }
        /* interhemispheric fissure with the falx, above the corpus callosum
         * and in front of and behind it */
        float au = fabsf(us);
        if (au < hd->fiss_w + hd->falx_w &&
            (ws > 0.33f * hd->c || vs < -0.42f * hd->b || vs > 0.5f * hd->b)) {
            if (au < 0.5f * hd->falx_w) {
                pt->cls = PH_DURA;
                pt->hu = hd->falx_hu;
            } else {
                pt->cls = PH_CSF_SPACE;
                pt->hu = hd->csf_hu;
            }
            return;
        }
        /* Sylvian fissures */
        if (au > 24.0f && ws > -0.4f * hd->c && ws < -0.02f * hd->c) {
            float sy = vs + 0.1f * hd->b - 0.2f * (au - 24.0f);
            if (fabsf(sy) < 6.0f &&
                fabsf(sy + 4.0f * sinf(0.09f * au + 0.05f * ws)) < 0.5f + 0.5f * hd->fiss_w) {
                pt->cls = PH_CSF_SPACE;
                pt->hu = hd->csf_hu;
                return;
            }
        }
        for (int i = 0; i < hd->ndeep; i++) {
            float q = ell_q(&hd->deep[i], hs);
            if (q < 1.0f) {
                /* speckled calcification in the core of the lentiform nuclei */
                if (hd->bg_calc_hu > 0 && i % 3 == 1 && q < 0.2f &&
                    sinf(1.3f * us) * sinf(1.1f * vs) * sinf(1.2f * ws) > 0.1f) {
                    pt->cls = PH_CALC;
                    pt->hu = hd->bg_calc_hu;
                    return;
                }
                pt->hu = hd->deep_hu;
                return;
            }
        }
        pt->hu = hd->white_hu;
        if (depth < hd->sulc_depth) {
            float g = 0;
            for (int i = 0; i < 3; i++)
                g += sinf(hd->gyr_k[i][0] * us + hd->gyr_k[i][1] * vs + hd->gyr_k[i][2] * ws +
                          hd->gyr_ph[i]);
            g = fabsf(g);
            float sw =
                hd->sulc_w * (1.0f - depth / hd->sulc_depth) * (1.0f - clampf(efface / 4.0f, 0, 1));
            if (g < sw) {
                pt->cls = PH_CSF_SPACE;
                pt->hu = hd->csf_hu;
            } else if (depth < hd->cortex_t || g < sw + 0.55f) {
                pt->hu = hd->grey_hu;
            }
        }
    }
}

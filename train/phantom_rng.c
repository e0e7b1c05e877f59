/* Seeded random numbers for the phantom generator: xoshiro256** with its
 * state filled by splitmix64 from (seed, stream), so each study has its own
 * stream and studies do not depend on how many come before them. */
#include "phantom_model.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void ph_rng_seed(struct ph_rng *r, uint64_t seed, uint64_t stream)
{
    uint64_t x = seed ^ (stream * 0xd1342543de82ef95ULL + 0x2545f4914f6cdd1dULL);
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&x);
}

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

uint64_t ph_rng_next(struct ph_rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double ph_rng_uniform(struct ph_rng *r)
{
    return (double)(ph_rng_next(r) >> 11) * 0x1.0p-53;
}

double ph_rng_range(struct ph_rng *r, double lo, double hi)
{
    return lo + (hi - lo) * ph_rng_uniform(r);
}

double ph_rng_normal(struct ph_rng *r)
{
    double u1 = ph_rng_uniform(r), u2 = ph_rng_uniform(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

bool ph_rng_chance(struct ph_rng *r, double p)
{
    return ph_rng_uniform(r) < p;
}

void ph_uid_make(struct ph_rng *r, char out[65])
{
    unsigned __int128 v = ((unsigned __int128)ph_rng_next(r) << 64) | ph_rng_next(r);
    /* 2.25 UIDs are decimal integers without leading zeros */
    char digits[48];
    int n = 0;
    do {
        digits[n++] = (char)('0' + (int)(v % 10));
        v /= 10;
    } while (v > 0);
    int k = snprintf(out, 65, "2.25.");
    for (int i = n - 1; i >= 0 && k < 64; i--)
        out[k++] = digits[i];
    out[k] = 0;
}

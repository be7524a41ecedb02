/* Counter-based Gaussian sampler of dropup (see gauss.py for the definition and the reasons).
 *
 * Value p of stream `key` is a function of (key, p) alone: pair i = p / 2 hashes the counter
 * key + i * GOLDEN with the SplitMix64 finaliser (Steele, Lea and Flood, "Fast splittable
 * pseudorandom number generators", OOPSLA 2014), and a Box-Muller transform turns the two 32-bit
 * halves into cos (even p) and sin (odd p) values. log, sin and cos are short polynomials
 * (the single-precision Cephes coefficients) so the loop vectorises; every step is one IEEE
 * single-precision operation in a fixed order (build with -ffp-contract=off, never -ffast-math),
 * which is what lets gauss.py reproduce these bits with numpy when no C compiler is available.
 */
#include <stdint.h>
#include <string.h>

#define GOLDEN 0x9e3779b97f4a7c15ULL

static inline uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline float bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t float_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* natural log for x in (0, 1] */
static inline float log_unit(float x) {
    uint32_t b = float_to_bits(x);
    int32_t e = (int32_t)((b >> 23) & 0xffu) - 126;
    float m = bits_to_float((b & 0x007fffffu) | 0x3f000000u); /* x = m * 2^e, m in [0.5, 1) */
    int32_t small = m < 0.707106781186547524f;
    e -= small;
    m = small ? (m + m) - 1.0f : m - 1.0f;
    float z = m * m;
    float y = 7.0376836292e-2f * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = (y * m) * z;
    float fe = (float)e;
    y = y + fe * -2.12194440e-4f;
    y = y - 0.5f * z;
    float r = m + y;
    return r + fe * 0.693359375f;
}

/* One Box-Muller pair: *c = r cos(2 pi u2), *s = r sin(2 pi u2). */
static inline void pair(uint64_t key, uint64_t i, float *c, float *s) {
    uint64_t h = splitmix64(key + i * GOLDEN);
    float u1 = (float)(uint32_t)(h >> 32) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;
    float r = __builtin_sqrtf(-2.0f * log_unit(u1));
    /* 8 * u2 with u2 in [0, 1) on a 2^-24 grid: octant j and the position f inside it */
    float t = (float)((uint32_t)h >> 8) * 4.76837158203125e-07f;
    int32_t j = (int32_t)t;
    float f = t - (float)j;
    float g = (j & 1) ? 1.0f - f : f;
    float a = g * 0.785398163397448309616f; /* angle within [0, pi/4] */
    float a2 = a * a;
    float sp = 8.3321608736e-3f + a2 * -1.9515295891e-4f;
    sp = -1.6666654611e-1f + a2 * sp;
    float sn = a + (a * a2) * sp;
    float cp = -1.388731625493765e-3f + a2 * 2.443315711809948e-5f;
    cp = 4.166664568298827e-2f + a2 * cp;
    float cs = (1.0f - 0.5f * a2) + (a2 * a2) * cp;
    int32_t swap = ((j + 1) & 2) != 0;
    float sv = swap ? cs : sn;
    float cv = swap ? sn : cs;
    sv = (j & 4) ? -sv : sv;
    cv = ((j + 2) & 4) ? -cv : cv;
    *c = r * cv;
    *s = r * sv;
}

static inline uint16_t to_bf16(float x) { /* round to nearest even, as torch does */
    uint32_t u = float_to_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Values first .. first + n - 1 of stream `key`, each mean + std * z, stored as float32 or (bf16
 * set) as bfloat16 bits. Inlined into the two entry points below with a constant `bf16`, so each
 * gets its own branch-free, vectorised loop. */
static inline void store(void *out, int64_t k, float v, int bf16) {
    if (bf16)
        ((uint16_t *)out)[k] = to_bf16(v);
    else
        ((float *)out)[k] = v;
}

static inline void fill(uint64_t key, uint64_t first, int64_t n, float mean, float std, void *out,
                        int bf16) {
    int64_t k = 0;
    if (n > 0 && (first & 1)) {
        float c, s;
        pair(key, first >> 1, &c, &s);
        store(out, k++, mean + std * s, bf16);
    }
    uint64_t base = (first + (uint64_t)k) >> 1;
    int64_t pairs = (n - k) / 2;
    for (int64_t i = 0; i < pairs; i++) {
        float c, s;
        pair(key, base + (uint64_t)i, &c, &s);
        store(out, k + 2 * i, mean + std * c, bf16);
        store(out, k + 2 * i + 1, mean + std * s, bf16);
    }
    k += 2 * pairs;
    if (k < n) {
        float c, s;
        pair(key, base + (uint64_t)pairs, &c, &s);
        store(out, k, mean + std * c, bf16);
    }
}

void dropup_gauss_f32(uint64_t key, uint64_t first, int64_t n, float mean, float std, float *out) {
    fill(key, first, n, mean, std, out, 0);
}

void dropup_gauss_bf16(uint64_t key, uint64_t first, int64_t n, float mean, float std, uint16_t *out) {
    fill(key, first, n, mean, std, out, 1);
}

/* The decode step's small float32 operations on the CPU, one call each instead of a chain of
 * eager PyTorch ops: RMSNorm (+ residual), rotary, silu_mul, the KV cache write and decode
 * attention over the cache. flover/ops/fused.py and attention.py hold the references.
 *
 * Every output row depends on its own input row only, computed in an order fixed by the row's
 * width (and, for attention, its KV length): a request gets the same bits alone and fused.
 * Sums run in 16 lanes over the row in order, then a fixed tree. Products are not contracted
 * into FMAs (-std=c11 sets -ffp-contract=off), so rotary and silu_mul round as PyTorch does.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec16.h"

static inline void store16(float *p, v16f v) { memcpy(p, &v, sizeof v); }
static inline v16f splat(float a) { return (v16f){0} + a; }
static inline v16f pick(v16i m, v16f a, v16f b) { return (v16f)(((v16i)a & m) | ((v16i)b & ~m)); }

/* sum of a[i] * b[i], i < n: 16 lanes in order, the tail in lane order, then the tree */
static inline float dot(const float *a, const float *b, int64_t n) {
    v16f acc = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc += load16(a + i) * load16(b + i);
    float t[16];
    memcpy(t, &acc, 64);
    for (int j = 0; i < n; i++, j++) t[j] += a[i] * b[i];
    memcpy(&acc, t, 64);
    return tree_sum16(acc);
}

/* dot(q, k + j * D, D) for the 16 keys j at k, in dot()'s order, into out[16] */
static inline void dot16(const float *q, const float *k, int64_t D, float *out) {
    v16f a[16] = {0};
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
        const v16f qv = load16(q + d);
        for (int j = 0; j < 16; j++) a[j] += qv * load16(k + j * D + d);
    }
    if (d < D)
        for (int j = 0; j < 16; j++) {
            float t[16];
            memcpy(t, &a[j], 64);
            for (int64_t i = d; i < D; i++) t[i - d] += q[i] * k[j * D + i];
            memcpy(&a[j], t, 64);
        }
    const v16f r = reduce16(a);
    memcpy(out, &r, 64);
}

/* exp(x) for x in [-87.3, 88]: Cephes' expf (2^n * polynomial, ~1 ulp); below: 0, above: exp(88) */
static inline v16f vexp(v16f x) {
    const v16i tiny = x < -87.3f;
    x = pick(tiny, splat(-87.3f), x);
    x = pick(x > 88.0f, splat(88.0f), x);
    v16f t = x * 1.44269504088896341f + 0.5f;
    v16f fx = __builtin_convertvector(__builtin_convertvector(t, v16i), v16f);  /* toward 0 */
    fx -= (v16f)((v16i)splat(1.0f) & (fx > t));                                /* floor */
    x -= fx * 0.693359375f;
    x -= fx * -2.12194440e-4f;
    const v16f z = x * x;
    v16f y = splat(1.9875691500e-4f);
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * z + x + 1.0f;
    const v16i n = __builtin_convertvector(fx, v16i);
    y *= (v16f)((n + 127) << 23);
    return (v16f)((v16i)y & ~tiny);
}

/* out[t] = w * (s * rsqrt(mean(s^2) + eps)), s = x[t] (+ res[t], then stored in sum[t]) */
void flover_rms_norm(const float *x, int64_t xs, const float *res, int64_t rs, const float *w,
                     float eps, int64_t T, int64_t H, float *out, float *sum) {
    for (int64_t r = 0; r < T; r++) {
        const float *s = x + r * xs;
        if (res) {
            float *d = sum + r * H;
            for (int64_t i = 0; i < H; i++) d[i] = s[i] + res[r * rs + i];
            s = d;
        }
        const float inv = 1.0f / sqrtf(dot(s, s, H) / (float)H + eps);
        float *o = out + r * H;
        for (int64_t i = 0; i < H; i++) o[i] = w[i] * (s[i] * inv);
    }
}

/* x [T, heads, D] (strides xt, xh; channels contiguous) rotated over its first `rot` channels
 * by the tables cos, sin [npos, rot/2] at pos[t]; out [T, heads, D] contiguous.
 * Returns 1 (nothing written) if a position is outside the tables. */
int flover_rotary(const float *x, int64_t xt, int64_t xh, const int64_t *pos, const float *cos,
                  const float *sin, int64_t npos, int64_t rot, int interleaved, int64_t T,
                  int64_t heads, int64_t D, float *out) {
    const int64_t half = rot / 2;
    for (int64_t t = 0; t < T; t++)
        if (pos[t] < 0 || pos[t] >= npos) return 1;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + pos[t] * half, *s = sin + pos[t] * half;
        for (int64_t h = 0; h < heads; h++) {
            const float *a = x + t * xt + h * xh;
            float *o = out + (t * heads + h) * D;
            if (interleaved) {
                for (int64_t i = 0; i < half; i++) {
                    const float x1 = a[2 * i], x2 = a[2 * i + 1];
                    o[2 * i] = x1 * c[i] - x2 * s[i];
                    o[2 * i + 1] = x2 * c[i] + x1 * s[i];
                }
            } else {
                for (int64_t i = 0; i < half; i++) {
                    const float x1 = a[i], x2 = a[i + half];
                    o[i] = x1 * c[i] - x2 * s[i];
                    o[i + half] = x2 * c[i] + x1 * s[i];
                }
            }
            for (int64_t i = rot; i < D; i++) o[i] = a[i];
        }
    }
    return 0;
}

/* out[t, i] = silu(g[t, i]) * g[t, I + i], silu(a) = a / (1 + exp(-a)); g's rows `gs` apart */
void flover_silu_mul(const float *g, int64_t gs, int64_t T, int64_t I, float *out) {
    for (int64_t t = 0; t < T; t++) {
        const float *a = g + t * gs, *b = a + I;
        float *o = out + t * I;
        int64_t i = 0;
        for (; i + 16 <= I; i += 16) {
            const v16f x = load16(a + i);
            store16(o + i, x / (1.0f + vexp(-x)) * load16(b + i));
        }
        for (; i < I; i++) o[i] = a[i] / (1.0f + expf(-a[i])) * b[i];
    }
}

/* cache[slot[t], h, pos[t]] = k[t, h] (and v) for T tokens of Hkv heads of D channels;
 * caches [S, Hkv, L, D] contiguous; k, v with strides (kt, kh, 1), (vt, vh, 1).
 * Returns 1 (nothing written) if a slot or position is outside the cache. */
int flover_write_kv(float *kc, float *vc, int64_t S, int64_t L, const float *k, int64_t kt,
                    int64_t kh, const float *v, int64_t vt, int64_t vh, const int64_t *slot,
                    const int64_t *pos, int64_t T, int64_t Hkv, int64_t D) {
    const int64_t ch = L * D, cs = Hkv * ch;
    for (int64_t t = 0; t < T; t++)
        if (slot[t] < 0 || slot[t] >= S || pos[t] < 0 || pos[t] >= L) return 1;
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t at = slot[t] * cs + h * ch + pos[t] * D;
            memcpy(kc + at, k + t * kt + h * kh, D * sizeof(float));
            memcpy(vc + at, v + t * vt + h * vh, D * sizeof(float));
        }
    return 0;
}

/* One row's query heads h0..h0+G-1 (sharing one KV head) against its first `len` keys:
 * softmax(q k^T * scale) v. p: scratch of G * len floats. */
static void attend(const float *q, int64_t qh, const float *k, const float *v, int64_t len,
                   int64_t D, int64_t G, float scale, float *p, float *out) {
    for (int64_t g = 0; g < G; g++) {
        float *pg = p + g * len;
        const float *qg = q + g * qh;
        float mx = -INFINITY;
        int64_t l = 0;
        for (; l + 16 <= len; l += 16) {
            dot16(qg, k + l * D, D, pg + l);
            for (int j = 0; j < 16; j++) pg[l + j] *= scale;
        }
        for (; l < len; l++) pg[l] = dot(qg, k + l * D, D) * scale;
        for (l = 0; l < len; l++) mx = pg[l] > mx ? pg[l] : mx;
        v16f acc = {0};
        for (l = 0; l < len; l += 16) {  /* the last 16 padded with exp(-inf) = 0 */
            const int64_t n = len - l < 16 ? len - l : 16;
            float e[16];
            for (int j = 0; j < 16; j++) e[j] = j < n ? pg[l + j] - mx : -INFINITY;
            const v16f ev = vexp(load16(e));
            memcpy(pg + l, &ev, n * sizeof(float));
            acc += ev;
        }
        const float inv = 1.0f / tree_sum16(acc);
        float *o = out + g * D;
        int64_t d = 0;
        for (; d + 64 <= D; d += 64) {  /* 64 channels at a time in registers */
            v16f o0 = {0}, o1 = {0}, o2 = {0}, o3 = {0};
            for (l = 0; l < len; l++) {
                const float w = pg[l], *vl = v + l * D + d;
                o0 += w * load16(vl);
                o1 += w * load16(vl + 16);
                o2 += w * load16(vl + 32);
                o3 += w * load16(vl + 48);
            }
            store16(o + d, o0 * inv);
            store16(o + d + 16, o1 * inv);
            store16(o + d + 32, o2 * inv);
            store16(o + d + 48, o3 * inv);
        }
        for (int64_t i = d; i < D; i++) o[i] = 0.0f;
        for (l = 0; l < len; l++) {
            const float w = pg[l], *vl = v + l * D;
            int64_t i = d;
            for (; i + 16 <= D; i += 16) store16(o + i, load16(o + i) + w * load16(vl + i));
            for (; i < D; i++) o[i] += w * vl[i];
        }
        for (int64_t i = d; i < D; i++) o[i] *= inv;
    }
}

/* q [B, H, D] (strides qb, qh, 1) against the caches [S, Hkv, L, D] (contiguous): row b
 * reads slot slot[b] (slot == NULL: slot b) up to len[b]; out [B, H, D] contiguous.
 * Work items are (row, KV head); threads share them when there is enough work.
 * Returns 1 (nothing written) if a slot or length is outside the cache, 2 without memory. */
int flover_decode_attention(const float *q, int64_t qb, int64_t qh, const float *kc,
                            const float *vc, int64_t S, int64_t L, const int64_t *slot,
                            const int64_t *len, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                            float scale, float *out, int nthreads) {
    const int64_t G = H / Hkv, ch = L * D, cs = Hkv * ch;
    int64_t max_len = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t s = slot ? slot[b] : b;
        if (s < 0 || s >= S || len[b] < 0 || len[b] > L) return 1;
        max_len = len[b] > max_len ? len[b] : max_len;
    }
    const int threads = B * H * max_len * D >= (1 << 14) ? nthreads : 1;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|: failed)
    {
        float *p = malloc(G * (max_len > 0 ? max_len : 1) * sizeof(float));
        if (!p) failed = 2;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B * Hkv; i++) {
            if (!p) continue;
            const int64_t b = i / Hkv, h = i % Hkv, s = slot ? slot[b] : b;
            attend(q + b * qb + h * G * qh, qh, kc + s * cs + h * ch, vc + s * cs + h * ch,
                   len[b], D, G, scale, p, out + (b * H + h * G) * D);
        }
        free(p);
    }
    return failed;
}

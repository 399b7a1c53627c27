/* What the CPU kernels (quant_cpu.c, fused_cpu.c, layer_cpu.c) share: 16-float vectors
 * (GCC's vector extensions: AVX-512, AVX2 or SSE, whichever -march=native offers), their
 * unaligned load, an explicit FMA, and the fixed summation tree that every reduction of 16
 * lanes ends with (and reduce16, its butterfly for 16 sums at once), so that a row's sum has
 * one order whatever kernel or tile computes it. */
#ifndef FLOVER_VEC16_H
#define FLOVER_VEC16_H
#include <stdint.h>
#include <string.h>

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline v16f load16(const float *p) { v16f v; memcpy(&v, p, sizeof v); return v; }

/* a * b + c in one rounding where the host has FMA units, as an explicit instruction (never
 * left to the compiler's contraction, which may differ between two loops), else two roundings */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline v16f fma16(v16f a, v16f b, v16f c) {
    return (v16f)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
#elif defined(__FMA__)
#include <immintrin.h>
static inline v16f fma16(v16f a, v16f b, v16f c) {
    __m256 h[3][2];
    memcpy(h[0], &a, 64), memcpy(h[1], &b, 64), memcpy(h[2], &c, 64);
    for (int i = 0; i < 2; i++) h[2][i] = _mm256_fmadd_ps(h[0][i], h[1][i], h[2][i]);
    memcpy(&c, h[2], 64);
    return c;
}
#else
static inline v16f fma16(v16f a, v16f b, v16f c) { return a * b + c; }
#endif

static inline float tree_sum16(v16f a) {
    float t[16];
    memcpy(t, &a, 64);
    for (int s = 8; s > 0; s >>= 1)
        for (int j = 0; j < s; j++) t[j] += t[j + s];
    return t[0];
}

/* Two vectors of 8 pairs -> one of their 16 pairwise sums, in tree_sum16's order at step S:
 * lane j of the result sums lanes j' and j' + S of the input its group comes from. */
#if defined(__clang__)
#define HALVES(a, b, ...) (__builtin_shufflevector(a, b, __VA_ARGS__))
#else /* GCC before 12 has only __builtin_shuffle */
#define HALVES(a, b, ...) (__builtin_shuffle(a, b, (v16i){__VA_ARGS__}))
#endif
static inline v16f comb8(v16f a, v16f b) {
    return HALVES(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
         + HALVES(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
static inline v16f comb4(v16f a, v16f b) {
    return HALVES(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
         + HALVES(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}
static inline v16f comb2(v16f a, v16f b) {
    return HALVES(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
         + HALVES(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}
static inline v16f comb1(v16f a, v16f b) {
    return HALVES(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + HALVES(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* 16 sums at once: lane i of the result = tree_sum16(a[i]), bit for bit (a butterfly) */
static inline v16f reduce16(const v16f a[16]) {
    v16f c[8], e[4], g[2];
    for (int i = 0; i < 8; i++) c[i] = comb8(a[2 * i], a[2 * i + 1]);
    for (int i = 0; i < 4; i++) e[i] = comb4(c[2 * i], c[2 * i + 1]);
    for (int i = 0; i < 2; i++) g[i] = comb2(e[2 * i], e[2 * i + 1]);
    return comb1(g[0], g[1]);
}
#endif

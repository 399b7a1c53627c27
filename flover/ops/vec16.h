/* What the CPU kernels (quant_cpu.c, fused_cpu.c) share: 16-float vectors (GCC's vector
 * extensions: AVX-512, AVX2 or SSE, whichever -march=native offers), their unaligned load,
 * and the fixed summation tree that every reduction of 16 lanes ends with, so that a row's
 * sum has one order whatever kernel or tile computes it. */
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
#endif

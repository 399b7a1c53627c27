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

static inline float tree_sum16(v16f a) {
    float t[16];
    memcpy(t, &a, 64);
    for (int s = 8; s > 0; s >>= 1)
        for (int j = 0; j < s; j++) t[j] += t[j + s];
    return t[0];
}
#endif

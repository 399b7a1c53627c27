/* Weight-only int4 / int8 matrix products on the CPU: y[M, N] = x[M, K] @ dequant(W)[N, K]^T.
 *
 * Weights stay in llama.cpp's block layout (flover/ops/quant.py describes it): per output row,
 * blocks of 32 weights; int4 as 16 bytes per block (byte j holds weight j in its low nibble and
 * weight j + 16 in its high one), int8 as 32 signed bytes; one float32 scale (and, for int4, one
 * float32 min) per group of `group` weights: w = q * scale (+ min).
 *
 * Each block is dequantised once into 32 floats and multiplied into up to TM activation rows,
 * so a batch of 8 reads the weights once. A row's reduction order (32 lane accumulators over
 * the blocks in order, then a fixed tree) does not depend on M or on the other rows: a request
 * gets the same bits alone and fused. Threads split the output columns (OpenMP; torch's own
 * runtime when torch is loaded first).
 */
#include <stdint.h>
#include <string.h>

#define TM 8

static inline float tree_sum32(float *a) {
    for (int s = 16; s > 0; s >>= 1)
        for (int j = 0; j < s; j++) a[j] += a[j + s];
    return a[0];
}

/* one column n for rows m0..m0+mt of x; w_block fills 32 floats for block b */
#define ROW_LOOP(...)                                                                 \
    for (int64_t m0 = 0; m0 < M; m0 += TM) {                                          \
        const int64_t mt = M - m0 < TM ? M - m0 : TM;                                 \
        float acc[TM][32];                                                            \
        memset(acc, 0, sizeof acc);                                                   \
        for (int64_t b = 0; b < nb; b++) {                                            \
            float w[32];                                                              \
            const int64_t g = (b * 32) / group;                                       \
            __VA_ARGS__                                                               \
            const float *xb = x + m0 * K + b * 32;                                    \
            if (mt == TM) {                                                           \
                for (int m = 0; m < TM; m++)                                          \
                    for (int j = 0; j < 32; j++) acc[m][j] += w[j] * xb[m * K + j];   \
            } else {                                                                  \
                for (int64_t m = 0; m < mt; m++)                                      \
                    for (int j = 0; j < 32; j++) acc[m][j] += w[j] * xb[m * K + j];   \
            }                                                                         \
        }                                                                             \
        for (int64_t m = 0; m < mt; m++) y[(m0 + m) * N + n] = tree_sum32(acc[m]);    \
    }

void flover_int4_mm(const float *x, int64_t M, int64_t K, const uint8_t *qs,
                    const float *scales, const float *mins, int64_t N, int64_t group,
                    float *y, int nthreads) {
    const int64_t nb = K / 32, ng = K / group;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *q = qs + n * (K / 2);
        const float *s = scales + n * ng, *z = mins + n * ng;
        ROW_LOOP(
            const uint8_t *qb = q + b * 16;
            const float sc = s[g], mn = z[g];
            for (int j = 0; j < 16; j++) {
                w[j] = (float)(qb[j] & 15) * sc + mn;
                w[j + 16] = (float)(qb[j] >> 4) * sc + mn;
            })
    }
}

void flover_int8_mm(const float *x, int64_t M, int64_t K, const int8_t *qs,
                    const float *scales, int64_t N, int64_t group, float *y, int nthreads) {
    const int64_t nb = K / 32, ng = K / group;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *q = qs + n * K;
        const float *s = scales + n * ng;
        ROW_LOOP(
            const int8_t *qb = q + b * 32;
            const float sc = s[g];
            for (int j = 0; j < 32; j++) w[j] = (float)qb[j] * sc;)
    }
}

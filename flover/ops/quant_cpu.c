/* Weight-only int4 / int8 matrix products on the CPU: y[M, N] = x[M, K] @ dequant(W)[N, K]^T.
 *
 * Weights stay in llama.cpp's block layout (flover/ops/quant.py describes it): per output row,
 * blocks of 32 weights; int4 as 16 bytes per block (byte j holds weight j in its low nibble and
 * weight j + 16 in its high one), int8 as 32 signed bytes; one float16 scale (and, for int4, one
 * float16 min) per group of `group` weights, as GGUF stores them: w = q * scale (+ min), in float32.
 *
 * Each block is dequantised once into two vectors of 16 floats and multiplied into up to TM
 * activation rows, two output columns at a time, so a batch of 8 reads the weights once and
 * each activation load serves two columns. An output's reduction order (16 lane accumulators
 * over the half-blocks in order, then a fixed tree) depends neither on M nor on the other rows
 * or columns: a request gets the same bits alone and fused. Threads split the output columns
 * (OpenMP; torch's own runtime when torch is loaded first). GCC's vector extensions compile to
 * AVX-512, AVX2 or SSE, whichever -march=native offers.
 */
#include <stdint.h>
#include <string.h>

#define TM 8
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint8_t v16u8 __attribute__((vector_size(16)));

#if defined(__FLT16_MAX__)
static inline float h2f(const uint16_t *p) { _Float16 h; memcpy(&h, p, 2); return (float)h; }
#else
static inline float h2f(const uint16_t *p) { /* IEEE half -> float, for compilers without _Float16 */
    const uint32_t h = *p, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 31, man = h & 0x3ffu;
    float f;
    if (exp == 0) { f = (float)man * (1.0f / 16777216.0f); return sign ? -f : f; }
    const uint32_t bits = sign | (exp == 31 ? 0x7f800000u | (man << 13) : ((exp + 112) << 23) | (man << 13));
    memcpy(&f, &bits, 4);
    return f;
}
#endif

static inline v16f load16(const float *p) { v16f v; memcpy(&v, p, sizeof v); return v; }

static inline float tree_sum16(v16f a) {
    float t[16];
    memcpy(t, &a, 64);
    for (int s = 8; s > 0; s >>= 1)
        for (int j = 0; j < s; j++) t[j] += t[j + s];
    return t[0];
}

static inline v16f u8_to_f(v16u8 q) { return __builtin_convertvector(__builtin_convertvector(q, v16i), v16f); }

/* int4 block b of row n: weights 0-15 into *w0, 16-31 into *w1 */
static inline void deq4(const uint8_t *qs, const uint16_t *scales, const uint16_t *mins, int64_t K,
                        int shift, int64_t n, int64_t b, v16f *w0, v16f *w1) {
    const int64_t i = n * ((K / 32) >> shift) + (b >> shift);
    v16u8 q;
    memcpy(&q, qs + n * (K / 2) + b * 16, 16);
    const float sc = h2f(scales + i), mn = h2f(mins + i);
    *w0 = u8_to_f(q & 15) * sc + mn;
    *w1 = u8_to_f(q >> 4) * sc + mn;
}

/* int8 through uint8 (q ^ 0x80 = q + 128): GCC vectorises zero extension, not sign extension */
static inline void deq8(const int8_t *qs, const uint16_t *scales, int64_t K, int shift,
                        int64_t n, int64_t b, v16f *w0, v16f *w1) {
    const float sc = h2f(scales + n * ((K / 32) >> shift) + (b >> shift));
    v16u8 q0, q1;
    memcpy(&q0, qs + n * K + b * 32, 16);
    memcpy(&q1, qs + n * K + b * 32 + 16, 16);
    *w0 = __builtin_convertvector(__builtin_convertvector(q0 ^ 0x80, v16i) - 128, v16f) * sc;
    *w1 = __builtin_convertvector(__builtin_convertvector(q1 ^ 0x80, v16i) - 128, v16f) * sc;
}

/* rows m0..m0+MT of x against columns n..n+NC-1; DEQ(c, w0, w1) dequantises column n+c's block b */
#define TILE(MT, NC, DEQ)                                                               \
    {                                                                                   \
        v16f a[NC][TM] = {0};                                                           \
        for (int64_t b = 0; b < nb; b++) {                                              \
            v16f w0[NC], w1[NC];                                                        \
            for (int c = 0; c < (NC); c++) DEQ(c, &w0[c], &w1[c]);                      \
            const float *xb = x + m0 * K + b * 32;                                      \
            for (int64_t m = 0; m < (MT); m++) {                                        \
                const v16f x0 = load16(xb + m * K), x1 = load16(xb + m * K + 16);       \
                for (int c = 0; c < (NC); c++) {                                        \
                    a[c][m] += w0[c] * x0;                                              \
                    a[c][m] += w1[c] * x1;                                              \
                }                                                                       \
            }                                                                           \
        }                                                                               \
        for (int c = 0; c < (NC); c++)                                                  \
            for (int64_t m = 0; m < (MT); m++) y[(m0 + m) * N + n + c] = tree_sum16(a[c][m]); \
    }

#define COLUMNS(NC, DEQ)                                                                \
    for (int64_t m0 = 0; m0 < M; m0 += TM) {                                            \
        const int64_t mt = M - m0 < TM ? M - m0 : TM;                                   \
        if (mt == TM) TILE(TM, NC, DEQ)                                                 \
        else if (mt == 1) TILE(1, NC, DEQ)                                              \
        else TILE(mt, NC, DEQ)                                                          \
    }

/* group = 32 << shift (32, 64, 128, 256): the group of block b is b >> shift, no division */
#define MATMUL(DEQ)                                                                     \
    const int64_t nb = K / 32;                                                          \
    int shift = 0;                                                                      \
    while ((32 << shift) < group) shift++;                                              \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                  \
    for (int64_t pair = 0; pair < (N + 1) / 2; pair++) {                                \
        const int64_t n = 2 * pair;                                                     \
        if (n + 1 < N) COLUMNS(2, DEQ)                                                  \
        else COLUMNS(1, DEQ)                                                            \
    }

void flover_int4_mm(const float *x, int64_t M, int64_t K, const uint8_t *qs,
                    const uint16_t *scales, const uint16_t *mins, int64_t N, int64_t group,
                    float *y, int nthreads) {
#define DEQ4(c, w0, w1) deq4(qs, scales, mins, K, shift, n + (c), b, w0, w1)
    MATMUL(DEQ4)
}

void flover_int8_mm(const float *x, int64_t M, int64_t K, const int8_t *qs,
                    const uint16_t *scales, int64_t N, int64_t group, float *y, int nthreads) {
#define DEQ8(c, w0, w1) deq8(qs, scales, K, shift, n + (c), b, w0, w1)
    MATMUL(DEQ8)
}

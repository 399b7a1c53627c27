/* Weight-only int4 / int8 matrix products on the CPU: y[M, N] = x[M, K] @ dequant(W)[N, K]^T.
 *
 * Weights stay in llama.cpp's block layout (flover/ops/quant.py describes it): per output row,
 * blocks of 32 weights; int4 as 16 bytes per block (byte j holds weight j in its low nibble and
 * weight j + 16 in its high one), int8 as 32 signed bytes; one scale (and for int4, or int8 with
 * `mins`, one min) per group of `group` weights (32 << k; int8 also 16): w = q * scale (+ min),
 * in float32.
 * Scales and mins are float16 as GGUF's Q4_0/Q4_1/Q8_0 store them, or float32 (`wide`) where
 * float16 cannot hold them exactly (a K-quant's super-block scale times a sub-block's).
 *
 * Outputs are computed 16 at a time, as tiles of 8 rows x 2 columns, 4 x 4, 2 x 8 or 1 x 16
 * (whichever the rows left call for): each block is dequantised once per tile into two vectors
 * of 16 floats (q * scale, then + min: two roundings, as quant.dequantize) and multiplied into
 * the tile's rows by explicit fused multiply-adds (vec16.h's fma16), so a batch of 8 reads the
 * weights once; the tile's 16 lane accumulators are then summed together by one butterfly of
 * shuffles. An output's reduction order (16 lanes over the half-blocks in order, then the fixed
 * tree of tree_sum16, which the butterfly reproduces and the columns past the last whole tile
 * use) depends neither on M nor on the other rows or columns: a request gets the same bits
 * alone and fused. The compiler contracts nothing itself (-std=c11 and the pragma below): GCC
 * 13 contracted products differently in the tiles of 8 rows and of 1 row on an Intel Xeon, so
 * a row changed its last bits with the batch (tests/test_quant.py caught it there); the FMAs
 * are instructions written out, the same in every tile (on a host without FMA units, fma16 is
 * a product and a sum, the same everywhere too). Threads split the columns (OpenMP; torch's
 * own runtime when torch is loaded first). GCC's vector extensions compile to AVX-512, AVX2 or
 * SSE, whichever -march=native offers.
 */
#pragma GCC optimize("fp-contract=off")
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec16.h"

#define TM 8
#define AHEAD 2048 /* bytes of weights asked for ahead of a streaming tile's reads */
typedef uint8_t v16u8 __attribute__((vector_size(16)));

#if defined(__F16C__)
#include <immintrin.h>
/* the packed conversion: the scalar one (vcvtsh2ss) merges into its destination's upper
 * lanes, a dependency from one block's scale to the next that halved the batch-1 speed */
static inline float h2f(const uint16_t *p) { return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(*p))); }
#elif defined(__FLT16_MAX__)
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

static inline v16f u8_to_f(v16u8 q) { return __builtin_convertvector(__builtin_convertvector(q, v16i), v16f); }

/* Scale or min i of a row's groups: float16 or float32 (a constant in each instantiation) */
static inline float at(const void *p, int wide, int64_t i) {
    return wide ? ((const float *)p)[i] : h2f((const uint16_t *)p + i);
}

/* int4 block b of row n: weights 0-15 into *w0, 16-31 into *w1 (groups of 32 << shift); its
 * scale and min are in row sn of `scales` and `mins` (n, or n's place in a chunk's copy) */
static inline void deq4(const uint8_t *qs, const void *scales, const void *mins, int wide,
                        int64_t K, int shift, int64_t n, int64_t sn, int64_t b, v16f *w0, v16f *w1) {
    const int64_t g = sn * ((K / 32) >> shift) + (b >> shift);
    v16u8 q;
    memcpy(&q, qs + n * (K / 2) + b * 16, 16);
    const float sc = at(scales, wide, g), mn = at(mins, wide, g);
#if defined(__AVX512F__)
    /* the group's 16 possible weights j * scale + min (the same two roundings), then each
     * nibble picks its own: a permute instead of a conversion, a product and a sum */
    const v16f table = (v16f){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} * sc + mn;
    const __m512i idx = _mm512_cvtepu8_epi32((__m128i)q);  /* a permute reads the low 4 bits */
    *w0 = (v16f)_mm512_permutexvar_ps(idx, (__m512)table);
    *w1 = (v16f)_mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), (__m512)table);
#else
    *w0 = u8_to_f(q & 15) * sc + mn;
    *w1 = u8_to_f(q >> 4) * sc + mn;
#endif
}

/* int8 block b of row n (without AVX-512 through uint8, q ^ 0x80 = q + 128: GCC vectorises
 * zero extension, not sign extension). Groups of 32 << shift, or with `halves` of 16 (block b's halves are groups 2b and 2b + 1);
 * `mins` NULL: w = q * scale, no add. Scales and mins in row sn (as deq4). */
static inline void deq8(const int8_t *qs, const void *scales, const void *mins, int wide,
                        int halves, int64_t K, int shift, int64_t n, int64_t sn, int64_t b,
                        v16f *w0, v16f *w1) {
    const int64_t g0 = halves ? sn * (K / 16) + 2 * b : sn * ((K / 32) >> shift) + (b >> shift);
    const int64_t g1 = halves ? g0 + 1 : g0;
    v16u8 q0, q1;
    memcpy(&q0, qs + n * K + b * 32, 16);
    memcpy(&q1, qs + n * K + b * 32 + 16, 16);
#if defined(__AVX512F__)  /* one sign extension each */
    *w0 = (v16f)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32((__m128i)q0)) * at(scales, wide, g0);
    *w1 = (v16f)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32((__m128i)q1)) * at(scales, wide, g1);
#else
    *w0 = __builtin_convertvector(__builtin_convertvector(q0 ^ 0x80, v16i) - 128, v16f) * at(scales, wide, g0);
    *w1 = __builtin_convertvector(__builtin_convertvector(q1 ^ 0x80, v16i) - 128, v16f) * at(scales, wide, g1);
#endif
    if (mins) {
        *w0 += at(mins, wide, g0);
        *w1 += at(mins, wide, g1);
    }
}

/* 16 outputs: rows m0..m0+MT-1 of x against columns n..n+NC-1 (MT * NC = 16);
 * DEQ(c, w0, w1) dequantises column n+c's block b. With INTERLEAVE (8 rows x 2 columns) the
 * columns advance together, so each activation load serves both; otherwise one column after
 * the other, so the weights stream through memory in order (a chunk of 16 columns is one
 * contiguous run), which the prefetchers follow better than 16 interleaved rows, and asks for
 * the bytes AHEAD of its reads itself (on a 2-core Intel Xeon the hardware's prefetch alone left
 * a batch-1 step at 21 ms, 14.6 ms with it; 1 to 4 KB ahead time alike); the interleaved tile
 * asks for the weights 4 tiles on itself (bstep: bytes per block of a column). */
#define TILE16(MT, NC, INTERLEAVE, DEQ)                                                 \
    {                                                                                   \
        v16f a[16] = {0};                                                               \
        const char *next = (const char *)qs + (n + 4 * (NC)) * nb * bstep;             \
        for (int c0 = 0; c0 < (INTERLEAVE ? 1 : (NC)); c0++)                            \
            for (int64_t b = 0; b < nb; b++) {                                          \
                if (INTERLEAVE) __builtin_prefetch(next + b * (NC) * bstep);             \
                else __builtin_prefetch((const char *)qs + ((n + c0) * nb + b) * bstep + AHEAD); \
                const float *xb = x + m0 * K + b * 32;                                  \
                for (int c = c0; c < (INTERLEAVE ? (NC) : c0 + 1); c++) {               \
                    v16f w0, w1;                                                        \
                    DEQ(c, &w0, &w1);                                                   \
                    for (int m = 0; m < (MT); m++) {                                    \
                        a[m * (NC) + c] = fma16(w0, load16(xb + m * K), a[m * (NC) + c]);       \
                        a[m * (NC) + c] = fma16(w1, load16(xb + m * K + 16), a[m * (NC) + c]);  \
                    }                                                                   \
                }                                                                       \
            }                                                                           \
        float r[16];                                                                    \
        const v16f sums = reduce16(a);                                                  \
        memcpy(r, &sums, sizeof r);                                                     \
        for (int m = 0; m < (MT); m++)                                                  \
            for (int c = 0; c < (NC); c++) y[(m0 + m) * N + n + c] = r[m * (NC) + c];   \
    }

/* One column n, rows m0..m0+MT-1 (the columns past the last group of 16) */
#define TILE1(MT, DEQ)                                                                  \
    {                                                                                   \
        v16f a[TM] = {0};                                                               \
        for (int64_t b = 0; b < nb; b++) {                                              \
            v16f w0, w1;                                                                \
            DEQ(0, &w0, &w1);                                                           \
            const float *xb = x + m0 * K + b * 32;                                      \
            for (int64_t m = 0; m < (MT); m++) {                                        \
                a[m] = fma16(w0, load16(xb + m * K), a[m]);                            \
                a[m] = fma16(w1, load16(xb + m * K + 16), a[m]);                       \
            }                                                                           \
        }                                                                               \
        for (int64_t m = 0; m < (MT); m++) y[(m0 + m) * N + n] = tree_sum16(a[m]);       \
    }

/* Columns n0..n0+15 for every row: row groups of 8, then 4, 2, 1 */
#define CHUNK16(DEQ)                                                                    \
    for (int64_t m0 = 0; m0 < M;) {                                                     \
        const int64_t left = M - m0;                                                    \
        const int mt = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;              \
        for (int64_t n = n0; n < n0 + 16; n += 16 / mt) {                               \
            if (mt == 8) TILE16(8, 2, 1, DEQ)                                           \
            else if (mt == 4) TILE16(4, 4, 0, DEQ)                                      \
            else if (mt == 2) TILE16(2, 8, 0, DEQ)                                      \
            else TILE16(1, 16, 0, DEQ)                                                  \
        }                                                                               \
        m0 += mt;                                                                       \
    }

/* float16 scales or mins -> float32, exactly (the packed conversion where there is one) */
static inline void widen(const uint16_t *src, int64_t n, float *dst) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; i++) dst[i] = h2f(src + i);
}

/* group = 32 << shift (32, 64, 128, 256; int8 also 16): the group of block b is b >> shift.
 * With float16 scales and fewer than 8 rows, each chunk of 16 columns first widens its rows'
 * scales and mins into a buffer of the thread's (float32, exactly the same values), so that its
 * blocks read a float (SC, MN, row n - SR0) instead of converting one: 20-27% faster at batch 1
 * hot in cache; the 8 x 2 tile ran 10-20% slower so, and converts its own. WD says which. */
#define MATMUL(DEQ, BSTEP)                                                              \
    const int64_t nb = K / 32, chunks = N / 16, bstep = (BSTEP), ng = K / group;        \
    int shift = 0;                                                                      \
    while ((32 << shift) < group) shift++;                                              \
    _Pragma("omp parallel num_threads(nthreads)")                                       \
    {                                                                                   \
        float *wbuf = wide || M >= TM ? NULL : malloc(2 * 16 * ng * sizeof(float));     \
        _Pragma("omp for schedule(static)")                                             \
        for (int64_t i = 0; i < chunks + N % 16; i++) {                                 \
            if (i < chunks && wbuf) {                                                   \
                const int64_t n0 = 16 * i, SR0 = n0;                                    \
                const int WD = 1;                                                       \
                const void *const SC = wbuf, *const MN = MINS ? wbuf + 16 * ng : NULL;  \
                widen((const uint16_t *)scales + n0 * ng, 16 * ng, wbuf);               \
                if (MINS) widen((const uint16_t *)MINS + n0 * ng, 16 * ng, wbuf + 16 * ng); \
                CHUNK16(DEQ)                                                            \
            } else if (i < chunks) {                                                    \
                const int64_t n0 = 16 * i, SR0 = 0;                                     \
                const int WD = wide;                                                    \
                const void *const SC = scales, *const MN = MINS;                        \
                CHUNK16(DEQ)                                                            \
            } else {                                                                    \
                const int64_t n = 16 * chunks + (i - chunks), SR0 = 0;                  \
                const int WD = wide;                                                    \
                const void *const SC = scales, *const MN = MINS;                        \
                for (int64_t m0 = 0; m0 < M; m0 += TM) {                                \
                    if (M - m0 >= TM) TILE1(TM, DEQ)                                    \
                    else TILE1(M - m0, DEQ)                                             \
                }                                                                       \
            }                                                                           \
        }                                                                               \
        free(wbuf);                                                                     \
    }

/* One instantiation per scale width (and, for int8, with or without mins, in groups of 16 or
 * not): `wide`, `MINS` and `halves` are constants in each, so the loops carry no test of them. */
typedef void (*mm_fn)(const float *, int64_t, int64_t, const void *, const void *, const void *,
                      int64_t, int64_t, float *, int);
#define DEQ4(c, w0, w1) deq4(qs, SC, MN, WD, K, shift, n + (c), n + (c) - SR0, b, w0, w1)
#define DEQ8(c, w0, w1) deq8(qs, SC, MN, WD, halves, K, shift, n + (c), n + (c) - SR0, b, w0, w1)
#define INT4_MM(NAME, WIDE)                                                             \
    static void NAME(const float *x, int64_t M, int64_t K, const void *qweight,         \
                     const void *scales, const void *mins, int64_t N, int64_t group,    \
                     float *y, int nthreads) {                                          \
        const uint8_t *qs = qweight;                                                    \
        const int wide = (WIDE);                                                        \
        const void *const MINS = mins;                                                  \
        MATMUL(DEQ4, 16)                                                                \
    }
#define INT8_MM(NAME, WIDE, HAS_MINS, HALVES)                                           \
    static void NAME(const float *x, int64_t M, int64_t K, const void *qweight,         \
                     const void *scales, const void *mins, int64_t N, int64_t group,    \
                     float *y, int nthreads) {                                          \
        const int8_t *qs = qweight;                                                     \
        const int wide = (WIDE), halves = (HALVES);                                     \
        const void *const MINS = (HAS_MINS) ? mins : NULL;                              \
        MATMUL(DEQ8, 32)                                                                \
    }
INT4_MM(int4_f16, 0)
INT4_MM(int4_f32, 1)
INT8_MM(int8_f16, 0, 0, 0)
INT8_MM(int8_f32, 1, 0, 0)
INT8_MM(int8_f16_min, 0, 1, 0)
INT8_MM(int8_f32_min, 1, 1, 0)
INT8_MM(int8_f16_g16, 0, 0, 1)
INT8_MM(int8_f32_g16, 1, 0, 1)
INT8_MM(int8_f16_min_g16, 0, 1, 1)
INT8_MM(int8_f32_min_g16, 1, 1, 1)
static const mm_fn INT8[2][2][2] = {  /* [group 16][mins][wide] */
    {{int8_f16, int8_f32}, {int8_f16_min, int8_f32_min}},
    {{int8_f16_g16, int8_f32_g16}, {int8_f16_min_g16, int8_f32_min_g16}},
};

/* scales and mins: float16 (wide = 0) or float32 (wide = 1); group = 32 << k */
void flover_int4_mm(const float *x, int64_t M, int64_t K, const uint8_t *qs, const void *scales,
                    const void *mins, int64_t N, int64_t group, float *y, int nthreads, int wide) {
    (wide ? int4_f32 : int4_f16)(x, M, K, qs, scales, mins, N, group, y, nthreads);
}

/* mins NULL or not; group 16 or 32 << k */
void flover_int8_mm(const float *x, int64_t M, int64_t K, const int8_t *qs, const void *scales,
                    const void *mins, int64_t N, int64_t group, float *y, int nthreads, int wide) {
    INT8[group == 16][mins != NULL][wide != 0](x, M, K, qs, scales, mins, N, group, y, nthreads);
}

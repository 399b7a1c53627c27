/* One LLaMA decoder layer for an iteration of decode rows only, in one call from Python.
 *
 * At batch 1 on 2 cores the layer's own work is a few hundred microseconds, and the Python
 * between its ten compiled calls (module calls, views, tensor allocations, ctypes argument
 * conversions) was about a third as much again. This function makes the same calls, in the
 * same order, with the same arguments, as flover/models/llama.py's layer does through
 * flover/ops/fused.py and attention.py on the CPU (their references there): RMSNorm, the qkv
 * product, rotary of q and of k, the cache write, decode attention, the o product, RMSNorm with
 * the residual, the gate_up product, silu_mul, the down product and the residual add. So the
 * result is the Python path's bit for bit (tests/test_layer_cpu.py holds them equal), and as
 * batch-invariant as the kernels it calls. Only weight-only int4/int8 linears without bias
 * (quant_cpu.c) take this path; flover/ops/layer_cpu.py decides when it applies.
 */
#include "quant_cpu.c"
#include "fused_cpu.c"

/* One QuantLinear: y[M, n] = x[M, k] @ W^T (quant_cpu.c's layouts) */
typedef struct {
    const void *q, *scales, *mins;
    int64_t n, k, group;
    int32_t bits, wide;
} flover_qlinear;

static void qmm(const flover_qlinear *l, const float *x, int64_t M, float *y, int nthreads) {
    if (l->bits == 4)
        flover_int4_mm(x, M, l->k, l->q, l->scales, l->mins, l->n, l->group, y, nthreads, l->wide);
    else
        flover_int8_mm(x, M, l->k, l->q, l->scales, l->mins, l->n, l->group, y, nthreads, l->wide);
}

/* x [T, H] (rows contiguous) -> out [T, H], the layer's output. lin: qkv, o, gate_up, down.
 * Caches [S, Hkv, L, D] contiguous; token t writes slot[t] at pos[t] and attends over its
 * slot's first len[t] keys (row t reads slot t, as the Python path's decode rows do).
 * Returns 0, 1 (a position, slot or length outside its table or cache: nothing after the
 * check that found it is written) or 2 (no memory for the scratch). */
int flover_llama_decode_layer(const float *x, int64_t T, int64_t H, const float *norm1,
                              const float *norm2, float eps, const flover_qlinear *lin,
                              int64_t Hq, int64_t Hkv, int64_t D, int64_t I, const float *cos,
                              const float *sin, int64_t npos, int64_t rot, int interleaved,
                              float *kc, float *vc, int64_t S, int64_t L, const int64_t *slot,
                              const int64_t *pos, const int64_t *len, float scale, float *out,
                              int nthreads) {
    const int64_t QKV = (Hq + 2 * Hkv) * D;
    const int64_t sizes[] = {T * H, T * QKV, T * Hq * D, T * Hkv * D, T * Hq * D, T * H,
                             T * H, T * H, T * 2 * I, T * I, T * H};
    int64_t total = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) total += sizes[i];
    float *scratch = malloc((size_t)total * sizeof(float));
    if (!scratch) return 2;
    float *h = scratch, *qkv = h + sizes[0], *qr = qkv + sizes[1], *kr = qr + sizes[2];
    float *att = kr + sizes[3], *a = att + sizes[4], *h2 = a + sizes[5], *s = h2 + sizes[6];
    float *gu = s + sizes[7], *act = gu + sizes[8], *y = act + sizes[9];
    int err = 0;

    flover_rms_norm(x, H, NULL, 0, norm1, eps, T, H, h, NULL);
    qmm(&lin[0], h, T, qkv, nthreads);
    err = flover_rotary(qkv, QKV, D, pos, cos, sin, npos, rot, interleaved, T, Hq, D, qr);
    if (!err)
        err = flover_rotary(qkv + Hq * D, QKV, D, pos, cos, sin, npos, rot, interleaved, T, Hkv,
                            D, kr);
    if (!err)
        err = flover_write_kv(kc, vc, S, L, kr, Hkv * D, D, qkv + (Hq + Hkv) * D, QKV, D, slot,
                              pos, T, Hkv, D);
    if (!err)
        err = flover_decode_attention(qr, Hq * D, D, kc, vc, S, L, NULL, len, T, Hq, Hkv, D,
                                      scale, att, nthreads);
    if (!err) {
        qmm(&lin[1], att, T, a, nthreads);
        flover_rms_norm(a, H, x, H, norm2, eps, T, H, h2, s);
        qmm(&lin[2], h2, T, gu, nthreads);
        flover_silu_mul(gu, 2 * I, T, I, act);
        qmm(&lin[3], act, T, y, nthreads);
        for (int64_t i = 0; i < T * H; i++) out[i] = s[i] + y[i];
    }
    free(scratch);
    return err;
}

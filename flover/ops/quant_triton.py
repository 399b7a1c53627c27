"""Triton int4 / int8 weight-only products for small M (decode), dequantisation fused.

Layout: flover/ops/quant.py (llama.cpp's blocks of 32; float16 scale, and min for int4, per
group of 32 or more), read as it is. The reference is `F.linear(x, dequantize(W).to(x.dtype))`
with float32 sums.

The product is computed transposed, y^T = W x^T: the dequantised weight tile is the MMA's
left operand (BLOCK_N rows of W) and the activations its right one (16 rows of x). A step of
K is BLOCK_K / 32 blocks of 32 weights, loaded as one [BLOCK_N, blocks, 32] tile, so that a
block's scale (and min) is a broadcast over the last axis, not a gather; an int4 block's bytes
hold weights j (low nibble) and j + 16 (high), which are two products against x's columns j
and j + 16. `prefetch` steps are read ahead into registers (Triton does not pipeline loads
that feed elementwise code), and K may be split into SPLIT parts (programs) whose float32
partial sums a second kernel adds in order: LLaMA-7B's o and down have only 64 tiles of 64
outputs for 132 multiprocessors. That sum also applies the layer's next elementwise step
where asked (`quant_mm`'s residual add and SiLU * up), so those cost no launch of their own.

On Hopper (`launch.tma`; groups of 32, K a multiple of 256, float16 / bfloat16 activations)
the weights are permuted at load into the mma order (flover/ops/quant.py,
`QuantLinear.use_mma_order`) and `_quant_tma_kernel` takes the product: packed weights,
scales, mins and x reach shared memory by TMA, `num_stages` steps deep, so the loads no longer
wait step by step. Read as 32-bit words, each thread's MMA fragments are 16 contiguous bytes
(the K order left Triton two bytes per shared-memory load); the words are dequantised in
registers and put back in K order by joins and a permute that move no data (`_int8_words`,
`_int4_words`), so each step is one product in K order; its K parts are summed by
`_sum_splits` as the pointer form's are (summing them in the product's own launch, the last
part of a tile to arrive adding them, was slower on an H100 in three of four steps and is
gone: docs/PERF.md, "the parts' sum in the product's launch"). LLaMA-7B on an H100: the TMA form on
the K order made a decode step's products 1.43x (int8) and 1.51x (int4) faster than this
kernel's ("TMA forms" in docs/PERF.md); the mma order with its own tiles took the step a
further 9% (int8) and 12% (int4) off at B = 1 ("The mma order").

A part's length KS is a constexpr, so its K loop has a fixed trip count (the last part's steps
past K read zeros by TMA, which add nothing): with a runtime end the loop could run zero times,
the path around it set the accumulators with plain moves, and ptxas then serialised every
warpgroup MMA of the loop (its info C7515: each wgmma waiting for the one before, 16 MMA
latencies a step). tests/test_sm90_codegen.py compiles the kernel for sm_90a and fails on it.
With PDL (`flover.ops.launch`) a program first asks for its part's leading weights in L2, then
waits for the kernel before it; `_sum_splits` waits too.

Batch invariance: the split, the tile sizes, the read-ahead, warps and stages come from N, K
and the bit width alone; each part walks its K range in order into one float32 accumulator
per 16 rows of x, and the parts are summed in a fixed order. A program takes up to four
16-row tiles of x (M_TILES, from M), each its own accumulator fed by the same dequantised
weights, so a row's arithmetic never depends on M.

Dequantisation for float16 activations ("asm"): the magic-number trick of FasterTransformer
and Marlin, 0x6400 | q is the float16 1024 + q, so a byte becomes a weight in a few bit
operations and one packed float16 fma per two weights, instead of int -> float conversions
(a quarter-rate instruction). int8 weights come out bitwise as the reference's (q * s is exact
in float32, then rounded once); int4's fma rounds q * s + m once where the reference rounds
twice (float32, then float16). "bits" is the same trick in plain Triton (the interpreter runs
it; it has no inline assembly); "float" goes through float32 (bfloat16, float32 activations),
where int8's q is made by the same trick in float32 (2^23 + q) in place of an int -> float
conversion ("cvt" keeps it, to compare: the same values, so the same bits; H100, bfloat16,
int8: the llama_7b step 9% faster at B = 1). int4's q stays converted: the trick was no faster.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from flover.ops import launch

BLOCK_M = 16
DEQUANT = ("asm", "bits", "float", "cvt")


@triton.jit
def _mul(w, X, rm, k, M, stride_xm, acc, IEEE: tl.constexpr):
    """acc [BN, 16] + w [BN, len(k)] times x's columns k of rows rm (zero past M): y^T, the
    weights as the MMA's left operand."""
    xt = tl.load(X + rm[None, :] * stride_xm + k[:, None], mask=(rm < M)[None, :], other=0.0)
    if IEEE:  # float32 activations: full-precision products
        return tl.dot(w, xt, acc, input_precision="ieee")
    return tl.dot(w, xt, acc)


@triton.jit
def _int8_weights(q, s, MODE: tl.constexpr, DT: tl.constexpr):
    """int8 [BN, G, 32] and float16 scales [BN, G, 1] -> q * s in DT."""
    if MODE == 0:  # asm: 4 weights per call, bytes biased to unsigned, 0x64 prepended
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 t, a, b, k;
            xor.b32 t, $2, 0x80808080;
            mov.b32 k, 0x64806480;
            prmt.b32 a, t, 0x64646464, 0x5150;
            prmt.b32 b, t, 0x64646464, 0x5352;
            sub.f16x2 a, a, k;
            sub.f16x2 b, b, k;
            mul.rn.f16x2 $0, a, $3;
            mul.rn.f16x2 $1, b, $4;
            }""",
            "=r,=r,r,r,r", [q, tl.broadcast_to(s, q.shape)], dtype=tl.float16,
            is_pure=True, pack=4)
    elif MODE == 1:  # bits: the same in plain Triton
        w = (q.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
        return w * s
    elif MODE == 2:  # float: 2^23 + 128 + q as float32 bits, less 2^23 + 128: q exactly
        w = (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        return (w * s.to(tl.float32)).to(DT)
    else:  # cvt: the same values by int -> float conversions
        return (q.to(tl.float32) * s.to(tl.float32)).to(DT)


@triton.jit
def _int4_weights(b, s, z, MODE: tl.constexpr, DT: tl.constexpr):
    """uint8 [BN, G, 16] (G blocks), scales and mins [BN, G, 1] -> (weights 0..15, weights
    16..31 of each block)."""
    if MODE == 0:
        sb = tl.broadcast_to(s, b.shape)
        zb = tl.broadcast_to(z, b.shape)
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 a0, a1, h0, h1, k;
            mov.b32 k, 0x64006400;
            prmt.b32 a0, $4, 0, 0x4140;
            prmt.b32 a1, $4, 0, 0x4342;
            shr.b32 h0, a0, 4;
            shr.b32 h1, a1, 4;
            lop3.b32 a0, a0, 0x000F000F, 0x64006400, 0xEA;
            lop3.b32 a1, a1, 0x000F000F, 0x64006400, 0xEA;
            lop3.b32 h0, h0, 0x000F000F, 0x64006400, 0xEA;
            lop3.b32 h1, h1, 0x000F000F, 0x64006400, 0xEA;
            sub.f16x2 a0, a0, k;
            sub.f16x2 a1, a1, k;
            sub.f16x2 h0, h0, k;
            sub.f16x2 h1, h1, k;
            fma.rn.f16x2 $0, a0, $5, $7;
            fma.rn.f16x2 $1, a1, $6, $8;
            fma.rn.f16x2 $2, h0, $5, $7;
            fma.rn.f16x2 $3, h1, $6, $8;
            }""",
            "=r,=r,=r,=r,r,r,r,r,r", [b, sb, zb], dtype=(tl.float16, tl.float16),
            is_pure=True, pack=4)
    return _nibble_weights(b & 15, s, z, MODE, DT), _nibble_weights(b >> 4, s, z, MODE, DT)


@triton.jit
def _nibble_weights(q, s, z, MODE: tl.constexpr, DT: tl.constexpr):
    """int4 values q in [0, 15] (any integer type) -> q * s + m in DT: "bits", the float16
    trick and one fma; "float" (and "cvt"), through float32, q converted."""
    if MODE == 1:
        v = (q.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
        return tl.fma(v, s, z)
    else:  # "float" and "cvt" alike: the float32 trick was no faster here (docs/PERF.md)
        return (q.to(tl.float32) * s.to(tl.float32) + z.to(tl.float32)).to(DT)


@triton.jit
def _int8_words(wq, s, MODE: tl.constexpr, DT: tl.constexpr):
    """int8 weights in the mma order (flover/ops/quant.py): int32 words [BN, SP, 4, 4] (span,
    thread column t, word j) and their scales (same shape) -> the tile [BN, SP * 64] in K
    order, each weight q * s as `_int8_weights` makes it."""
    if MODE == 0:  # bytes biased to unsigned, 0x64 prepended: two float16 pairs per word
        e0, e1, e2, e3 = tl.inline_asm_elementwise(
            """{
            .reg .b32 t, a, b, k, ss;
            xor.b32 t, $4, 0x80808080;
            mov.b32 k, 0x64806480;
            mov.b32 ss, {$5, $5};
            prmt.b32 a, t, 0x64646464, 0x5150;
            prmt.b32 b, t, 0x64646464, 0x5352;
            sub.f16x2 a, a, k;
            sub.f16x2 b, b, k;
            mul.rn.f16x2 a, a, ss;
            mul.rn.f16x2 b, b, ss;
            mov.b32 {$0, $1}, a;
            mov.b32 {$2, $3}, b;
            }""",
            "=h,=h,=h,=h,r,h", [wq, s], dtype=(tl.float16,) * 4, is_pure=True, pack=1)
    else:  # byte i, sign-extended
        e0 = _int8_weights(((wq << 24) >> 24).to(tl.int8), s, MODE, DT)
        e1 = _int8_weights(((wq << 16) >> 24).to(tl.int8), s, MODE, DT)
        e2 = _int8_weights(((wq << 8) >> 24).to(tl.int8), s, MODE, DT)
        e3 = _int8_weights((wq >> 24).to(tl.int8), s, MODE, DT)
    # bytes 0, 1: weights 16j + 2t + (0, 1); bytes 2, 3: 16j + 2t + 8 + (0, 1)
    w = tl.join(tl.join(e0, e1), tl.join(e2, e3))  # [BN, SP, t, j, p, h]
    w = tl.permute(w, (0, 1, 3, 5, 2, 4))  # [BN, SP, j, h, t, p]: K = 64 SP + 16j + 8h + 2t + p
    return tl.reshape(w, (w.shape[0], w.shape[1] * 64))


@triton.jit
def _int4_words(wq, s, z, MODE: tl.constexpr, DT: tl.constexpr):
    """int4 weights in the mma order: int32 words [BN, SP, 4, 4] (span, thread column t, word
    j; a word is one group of 32 for one t), scales and mins (same shape) -> the tile
    [BN, SP * 128] in K order, each weight q * s + m as `_int4_weights` makes it."""
    if MODE == 0:  # nibbles i and i + 4 -> one float16 pair, then one fma per pair
        e00, e01, e10, e11, e20, e21, e30, e31 = tl.inline_asm_elementwise(
            """{
            .reg .b32 a0, a1, a2, a3, h, k, ss, zz;
            mov.b32 k, 0x64006400;
            mov.b32 ss, {$9, $9};
            mov.b32 zz, {$10, $10};
            lop3.b32 a0, $8, 0x000F000F, 0x64006400, 0xEA;
            shr.b32 h, $8, 4;
            lop3.b32 a1, h, 0x000F000F, 0x64006400, 0xEA;
            shr.b32 h, $8, 8;
            lop3.b32 a2, h, 0x000F000F, 0x64006400, 0xEA;
            shr.b32 h, $8, 12;
            lop3.b32 a3, h, 0x000F000F, 0x64006400, 0xEA;
            sub.f16x2 a0, a0, k;
            sub.f16x2 a1, a1, k;
            sub.f16x2 a2, a2, k;
            sub.f16x2 a3, a3, k;
            fma.rn.f16x2 a0, a0, ss, zz;
            fma.rn.f16x2 a1, a1, ss, zz;
            fma.rn.f16x2 a2, a2, ss, zz;
            fma.rn.f16x2 a3, a3, ss, zz;
            mov.b32 {$0, $1}, a0;
            mov.b32 {$2, $3}, a1;
            mov.b32 {$4, $5}, a2;
            mov.b32 {$6, $7}, a3;
            }""",
            "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h", [wq, s, z], dtype=(tl.float16,) * 8, is_pure=True,
            pack=1)
    else:
        e00 = _nibble_weights(wq & 15, s, z, MODE, DT)
        e01 = _nibble_weights((wq >> 16) & 15, s, z, MODE, DT)
        e10 = _nibble_weights((wq >> 4) & 15, s, z, MODE, DT)
        e11 = _nibble_weights((wq >> 20) & 15, s, z, MODE, DT)
        e20 = _nibble_weights((wq >> 8) & 15, s, z, MODE, DT)
        e21 = _nibble_weights((wq >> 24) & 15, s, z, MODE, DT)
        e30 = _nibble_weights((wq >> 12) & 15, s, z, MODE, DT)
        e31 = _nibble_weights((wq >> 28) & 15, s, z, MODE, DT)
    # pair i = 2c + h (nibbles i, i + 4): weights 32j + 16c + 8h + 2t + (0, 1)
    w = tl.join(tl.join(tl.join(e00, e01), tl.join(e10, e11)),
                tl.join(tl.join(e20, e21), tl.join(e30, e31)))  # [BN, SP, t, j, p, h, c]
    w = tl.permute(w, (0, 1, 3, 6, 5, 2, 4))  # [BN, SP, j, c, h, t, p]
    return tl.reshape(w, (w.shape[0], w.shape[1] * 128))


@triton.jit
def _load_step(Q, S, Z, rw, kb, K, ng, BITS: tl.constexpr, GROUP: tl.constexpr, G: tl.constexpr):
    """The G blocks of 32 weights from kb on, rows rw: the packed bytes [BN, G, 32 or 16]
    and the scales and mins [BN, G]."""
    g = tl.arange(0, G)
    gi = rw[:, None] * ng + ((kb + 32 * g) // GROUP)[None, :]
    s = tl.load(S + gi)
    if BITS == 8:
        j = tl.arange(0, 32)
        q = tl.load(Q + rw[:, None, None] * K + (kb + 32 * g)[None, :, None] + j[None, None, :])
        z = s
    else:
        j = tl.arange(0, 16)
        q = tl.load(Q + rw[:, None, None] * (K // 2) + (kb // 2 + 16 * g)[None, :, None]
                    + j[None, None, :])
        z = tl.load(Z + gi)
    return q, s, z


@triton.jit
def _step(X, q, s, z, acc0, acc1, acc2, acc3, r0, kb, M, stride_xm,
          BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr,
          M_TILES: tl.constexpr, MODE: tl.constexpr, IEEE: tl.constexpr):
    """Dequantise one step's tile and multiply it into each row tile's accumulator."""
    DT = X.dtype.element_ty
    if BITS == 8:
        w = tl.reshape(_int8_weights(q, s[:, :, None], MODE, DT), (BLOCK_N, G * 32))
        k = kb + tl.arange(0, G * 32)
        acc0 = _mul(w, X, r0, k, M, stride_xm, acc0, IEEE)
        if M_TILES > 1:
            acc1 = _mul(w, X, r0 + BLOCK_M, k, M, stride_xm, acc1, IEEE)
        if M_TILES > 2:
            acc2 = _mul(w, X, r0 + 2 * BLOCK_M, k, M, stride_xm, acc2, IEEE)
        if M_TILES > 3:
            acc3 = _mul(w, X, r0 + 3 * BLOCK_M, k, M, stride_xm, acc3, IEEE)
    else:
        lo, hi = _int4_weights(q, s[:, :, None], z[:, :, None], MODE, DT)
        lo = tl.reshape(lo, (BLOCK_N, G * 16))
        hi = tl.reshape(hi, (BLOCK_N, G * 16))
        i = tl.arange(0, G * 16)
        k = kb + (i // 16) * 32 + i % 16  # byte i of the tile: weights k (low) and k + 16 (high)
        acc0 = _mul(lo, X, r0, k, M, stride_xm, acc0, IEEE)
        acc0 = _mul(hi, X, r0, k + 16, M, stride_xm, acc0, IEEE)
        if M_TILES > 1:
            acc1 = _mul(lo, X, r0 + BLOCK_M, k, M, stride_xm, acc1, IEEE)
            acc1 = _mul(hi, X, r0 + BLOCK_M, k + 16, M, stride_xm, acc1, IEEE)
        if M_TILES > 2:
            acc2 = _mul(lo, X, r0 + 2 * BLOCK_M, k, M, stride_xm, acc2, IEEE)
            acc2 = _mul(hi, X, r0 + 2 * BLOCK_M, k + 16, M, stride_xm, acc2, IEEE)
        if M_TILES > 3:
            acc3 = _mul(lo, X, r0 + 3 * BLOCK_M, k, M, stride_xm, acc3, IEEE)
            acc3 = _mul(hi, X, r0 + 3 * BLOCK_M, k + 16, M, stride_xm, acc3, IEEE)
    return acc0, acc1, acc2, acc3


@triton.jit
def _quant_mm_kernel(X, Q, S, Z, Y, M, N, K, stride_xm, stride_ym,
                     BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                     PREFETCH: tl.constexpr, M_TILES: tl.constexpr, MODE: tl.constexpr,
                     IEEE: tl.constexpr):
    """Program (row tiles, N tile, part of K): up to M_TILES x 16 rows, BLOCK_N outputs, the
    K / SPLIT columns of its part in steps of BLOCK_K. SPLIT > 1 writes float32 partial sums
    [SPLIT, M, N] for _sum_splits."""
    G: tl.constexpr = BLOCK_K // 32
    r0 = tl.program_id(0) * (M_TILES * BLOCK_M) + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = rn % N  # rows past N read row (rn mod N), never stored: no masks on the weight loads
    ng = K // GROUP
    part = K // SPLIT
    k_lo = tl.program_id(2) * part
    acc0 = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T
    acc1, acc2, acc3 = acc0, acc0, acc0
    last = k_lo + part - BLOCK_K
    # PREFETCH steps ahead are in flight (registers) while a step is multiplied: the packed
    # tiles are small, and Triton does not pipeline loads that feed elementwise code
    if PREFETCH >= 1:
        q1, s1, z1 = _load_step(Q, S, Z, rw, k_lo, K, ng, BITS, GROUP, G)
    if PREFETCH >= 2:
        q2, s2, z2 = _load_step(Q, S, Z, rw, tl.minimum(k_lo + BLOCK_K, last), K, ng, BITS, GROUP, G)
    if PREFETCH >= 3:
        q3, s3, z3 = _load_step(Q, S, Z, rw, tl.minimum(k_lo + 2 * BLOCK_K, last), K, ng, BITS,
                                GROUP, G)
    for kb in range(k_lo, k_lo + part, BLOCK_K):
        if PREFETCH == 0:
            qc, sc, zc = _load_step(Q, S, Z, rw, kb, K, ng, BITS, GROUP, G)
        else:
            qc, sc, zc = q1, s1, z1
            if PREFETCH == 1:
                q1, s1, z1 = _load_step(Q, S, Z, rw, tl.minimum(kb + BLOCK_K, last), K, ng, BITS,
                                        GROUP, G)
            elif PREFETCH == 2:
                q1, s1, z1 = q2, s2, z2
                q2, s2, z2 = _load_step(Q, S, Z, rw, tl.minimum(kb + 2 * BLOCK_K, last), K, ng,
                                        BITS, GROUP, G)
            else:
                q1, s1, z1 = q2, s2, z2
                q2, s2, z2 = q3, s3, z3
                q3, s3, z3 = _load_step(Q, S, Z, rw, tl.minimum(kb + 3 * BLOCK_K, last), K, ng,
                                        BITS, GROUP, G)
        acc0, acc1, acc2, acc3 = _step(X, qc, sc, zc, acc0, acc1, acc2, acc3, r0, kb, M,
                                       stride_xm, BITS, BLOCK_M, BLOCK_N, G, M_TILES, MODE, IEEE)
    _store_tiles(Y, acc0, acc1, acc2, acc3, r0, rn, M, N, stride_ym, SPLIT, M_TILES, BLOCK_M)


@triton.jit
def _store_tiles(Y, acc0, acc1, acc2, acc3, r0, rn, M, N, stride_ym, SPLIT: tl.constexpr,
                 M_TILES: tl.constexpr, BLOCK_M: tl.constexpr):
    """Each row tile's y^T; with SPLIT > 1, float32 partials [SPLIT, M, N] for _sum_splits."""
    if SPLIT > 1:
        Y += tl.program_id(2) * M * N
    _store(Y, acc0, r0, rn, M, N, stride_ym)
    if M_TILES > 1:
        _store(Y, acc1, r0 + BLOCK_M, rn, M, N, stride_ym)
    if M_TILES > 2:
        _store(Y, acc2, r0 + 2 * BLOCK_M, rn, M, N, stride_ym)
    if M_TILES > 3:
        _store(Y, acc3, r0 + 3 * BLOCK_M, rn, M, N, stride_ym)


@triton.jit
def _store(Y, acc, rm, rn, M, N, stride_ym):
    """acc is y^T [BLOCK_N, BLOCK_M]."""
    tl.store(Y + rm[None, :] * stride_ym + rn[:, None], acc.to(Y.dtype.element_ty),
             mask=(rm < M)[None, :] & (rn < N)[:, None])


@triton.jit
def _sum_splits(P, Y, R, M, N, NO, stride_ym, stride_rm, SPLIT: tl.constexpr,
                BLOCK: tl.constexpr, HAS_RES: tl.constexpr, GATED: tl.constexpr,
                PDL: tl.constexpr):
    """y = P[0] + P[1] + ... in that order (float32), in y's dtype [M, NO]. Epilogues, each
    rounded as the unfused sequence rounds: HAS_RES: + R (y rounded first, as `r + y` does);
    GATED (N = 2 NO, gate then up): silu(gate) * up, as `fused_triton.silu_mul` computes it."""
    launch.prior(PDL)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < M * NO
    row, col = i // NO, i % NO
    dt = Y.dtype.element_ty
    src = P + row * N + col  # P [SPLIT, M, N], contiguous
    acc = tl.load(src, mask=mask, other=0.0)
    for j in tl.static_range(1, SPLIT):
        acc += tl.load(src + j * M * N, mask=mask, other=0.0)
    y = acc.to(dt)
    if GATED:
        up = tl.load(src + NO, mask=mask, other=0.0)
        for j in tl.static_range(1, SPLIT):
            up += tl.load(src + NO + j * M * N, mask=mask, other=0.0)
        g = y.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dt)
        y = (act.to(tl.float32) * up.to(dt).to(tl.float32)).to(dt)
    if HAS_RES:
        r = tl.load(R + row * stride_rm + col, mask=mask, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(dt)
    tl.store(Y + row * stride_ym + col, y, mask=mask)


@triton.jit
def _quant_tma_kernel(XD, QD, SD, ZD, Q, S, Z, Y, M, N, K, stride_ym, KS: tl.constexpr,
                      BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, M_TILES: tl.constexpr,
                      MODE: tl.constexpr, PDL: tl.constexpr, QLINES: tl.constexpr,
                      SLINES: tl.constexpr):
    """The Hopper form (groups of 32, float16 / bfloat16 activations, weights in the mma
    order): every operand of a K step (packed weights as 32-bit words, scales, mins, x)
    brought into shared memory by TMA, `num_stages` steps deep, where `_quant_mm_kernel`
    waits on each step's loads. Program (row tiles, N tile, part of K): per step one product
    of the dequantised tile [BLOCK_N, BLOCK_K] (K order) with each row tile's x, each into
    its own y^T accumulator.

    PDL: the program first asks for its part's leading packed weights (QLINES lines of 128
    bytes a row; Q, S, Z are the tensors' pointers) and scales and mins (SLINES lines) in
    L2, then waits for the kernel before it (`launch.prior`)."""
    DT = XD.dtype  # x's (Y may be the float32 partial sums)
    m0 = tl.program_id(0) * (M_TILES * BLOCK_M)
    n0 = tl.program_id(1) * BLOCK_N
    k_lo = tl.program_id(2) * KS
    if QLINES > 0:
        rw = n0 + tl.arange(0, BLOCK_N)
        k_hi = tl.minimum(k_lo + KS, K)
        launch.prefetch_l2(Q, rw, K * BITS // 8, rw < N, k_lo * BITS // 8, k_hi * BITS // 8,
                           QLINES, 128)
        launch.prefetch_l2(S, rw, K // 32, rw < N, k_lo // 32, k_hi // 32, SLINES, 64)
        if BITS == 4:
            launch.prefetch_l2(Z, rw, K // 32, rw < N, k_lo // 32, k_hi // 32, SLINES, 64)
    launch.prior(PDL)
    acc0 = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T
    acc1, acc2, acc3 = acc0, acc0, acc0
    for kb in range(k_lo, k_lo + KS, BLOCK_K):  # a fixed trip count: past K, TMA reads zeros
        s = SD.load([n0, kb // 32])
        if BITS == 8:
            wq = tl.reshape(QD.load([n0, kb // 4]), (BLOCK_N, BLOCK_K // 64, 4, 4))
            s = tl.broadcast_to(tl.reshape(s, (BLOCK_N, BLOCK_K // 64, 1, 2, 1)),
                                (BLOCK_N, BLOCK_K // 64, 4, 2, 2))  # word j: group j // 2
            w = _int8_words(wq, tl.reshape(s, wq.shape), MODE, DT)
        else:
            wq = tl.reshape(QD.load([n0, kb // 8]), (BLOCK_N, BLOCK_K // 128, 4, 4))
            z = ZD.load([n0, kb // 32])
            s = tl.broadcast_to(tl.reshape(s, (BLOCK_N, BLOCK_K // 128, 1, 4)), wq.shape)
            z = tl.broadcast_to(tl.reshape(z, (BLOCK_N, BLOCK_K // 128, 1, 4)), wq.shape)
            w = _int4_words(wq, s, z, MODE, DT)
        acc0 = tl.dot(w, tl.trans(XD.load([m0, kb])), acc0)
        if M_TILES > 1:
            acc1 = tl.dot(w, tl.trans(XD.load([m0 + BLOCK_M, kb])), acc1)
        if M_TILES > 2:
            acc2 = tl.dot(w, tl.trans(XD.load([m0 + 2 * BLOCK_M, kb])), acc2)
        if M_TILES > 3:
            acc3 = tl.dot(w, tl.trans(XD.load([m0 + 3 * BLOCK_M, kb])), acc3)
    r0 = m0 + tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    _store_tiles(Y, acc0, acc1, acc2, acc3, r0, rn, M, N, stride_ym, SPLIT, M_TILES, BLOCK_M)


def default_config(n: int, k: int, bits: int = 8) -> dict:
    """Launch parameters from the shape and bit width alone, never from M (that is the
    invariance). Picked on an H200 by `bench/quant_linear.py --sweep`
    (docs/perf/2026-11-26-gpu-quant-kernels.md):
    K is split in four for int4, and for int8 wherever there are at most 192 tiles of 64
    outputs (LLaMA-7B's qkv, o and down); `prefetch` is how many steps are read ahead."""
    if bits == 8:
        return {"block_n": 64, "block_k": 128, "split": 4 if n <= 192 * 64 else 1, "prefetch": 1,
                "num_warps": 4, "num_stages": 3, "max_m_tiles": 4, "dequant": "asm"}
    return {"block_n": 64, "block_k": 512, "split": 4, "prefetch": 0, "num_warps": 4,
            "num_stages": 2, "max_m_tiles": 4, "dequant": "asm"}


def tma_config(n: int, k: int, bits: int = 8, sms: int = 132) -> dict:
    """Launch parameters of the TMA form, from the shape, the bit width and the device's
    multiprocessors alone (never M): steps of 256 weights (a TMA box's last axis spans 16 bytes
    or more: 8 scales), tiles of 64 outputs, 3 stages, two row tiles per program; K in four
    parts where the weight has at most one tile of 64 outputs per multiprocessor, two where it
    has up to two, else one (the parts' float32 sums cost little at M = 1; at M = 32 four
    parts of gate_up write and read again half as many bytes as its int4 weight). Picked on
    an H100 by `bench/quant_linear.py --tma-sweep` over LLaMA-7B's shapes at M = 1 and 32,
    both bit widths (docs/PERF.md, "The mma order", and session 10's per-shape sweep)."""
    block_n = 64
    tiles = triton.cdiv(n, block_n)
    split = 4 if tiles <= sms else 2 if tiles <= 2 * sms else 1
    return {"block_n": block_n, "block_k": 256, "split": split, "num_warps": 4, "num_stages": 3,
            "max_m_tiles": 2, "dequant": "asm", "prefetch": 4}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _mode(cfg: dict, x: torch.Tensor) -> int:
    """The dequantisation (index in DEQUANT) for x's dtype: the float16 tricks make float16
    weights, so other dtypes go through float32; the interpreter runs no inline assembly, and
    "bits" is the same arithmetic."""
    mode = DEQUANT.index(cfg["dequant"])
    if x.dtype != torch.float16:
        return 3 if mode == 3 else 2
    return 1 if mode == 0 and _interpreted() else mode


def _partials(x: torch.Tensor, n: int, split: int) -> torch.Tensor:
    """Where the kernels write: the product [M, N] in x's dtype (one part), or the float32
    partial sums [split, M, N]; row stride N either way."""
    if split == 1:
        return torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    return torch.empty(split, x.shape[0], n, dtype=torch.float32, device=x.device)


def _sum_parts(out: torch.Tensor, dtype: torch.dtype, split: int,
               residual: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    """The product from the kernels' output `out` (`_partials`), in `dtype`, with the epilogues
    (`quant_mm`): one part is the product already; parts are added in order by `_sum_splits`,
    which applies the epilogues as it stores."""
    if split == 1:  # the kernel wrote the product: the epilogues as their own ops
        y = out
        if gated:
            from flover.ops.fused_triton import silu_mul

            y = silu_mul(y)
        return y if residual is None else residual + y
    m, n = out.shape[1:]
    no = n // 2 if gated else n
    y = torch.empty(m, no, dtype=dtype, device=out.device)
    r = residual if residual is not None else y
    pdl = launch.enabled(out)
    _sum_splits[(triton.cdiv(m * no, 1024),)](out, y, r, m, n, no, y.stride(0), r.stride(0),
                                              SPLIT=split, BLOCK=1024, HAS_RES=residual is not None,
                                              GATED=gated, PDL=pdl, **launch.options(pdl))
    return y


def _tma_shape(dtype: torch.dtype | None, k: int, group: int) -> bool:
    """The TMA form's shapes: groups of 32, K a multiple of 256 (every row of the packed
    weights, scales and mins 16-byte aligned), float16 / bfloat16 activations."""
    return group == 32 and k % 256 == 0 and dtype in (torch.float16, torch.bfloat16)


def mma_order_applies(device: torch.device, dtype: torch.dtype | None, k: int, group: int) -> bool:
    """Whether a weight of K columns in groups of `group`, multiplied by activations of
    `dtype` on `device`, goes into the mma order (flover/ops/quant.py) at load: where its
    product takes the TMA form, which reads that order. Fixed by the weight, the dtype and
    the device, never by M."""
    return launch.tma(device) and _tma_shape(dtype, k, group)


def _quant_mm_tma(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  mins: torch.Tensor | None, bits: int, config: dict | None,
                  residual: torch.Tensor | None, gated: bool) -> torch.Tensor:
    from triton.tools.tensor_descriptor import TensorDescriptor as TD

    (m, k), n = x.shape, qweight.shape[0]
    cfg = tma_config(n, k, bits, launch.sm_count(x.device)) | (config or {})
    mode = _mode(cfg, x)
    if x.data_ptr() % 16:
        x = x.clone()
    bm, bn, bk = BLOCK_M, cfg["block_n"], cfg["block_k"]
    steps = triton.cdiv(k, bk)
    ks = triton.cdiv(steps, cfg["split"]) * bk  # K fixes the parts (never M)
    split = triton.cdiv(k, ks)
    xd = TD.from_tensor(x, [bm, bk])
    qd = TD.from_tensor(qweight.view(torch.int32), [bn, bk * bits // 32])  # 32-bit words
    sd = TD.from_tensor(scales, [bn, bk // 32])
    zd = TD.from_tensor(mins, [bn, bk // 32]) if mins is not None else sd
    m_tiles = min(cfg["max_m_tiles"], triton.cdiv(m, bm))
    grid = (triton.cdiv(m, bm * m_tiles), triton.cdiv(n, bn), split)
    out = _partials(x, n, split)
    pdl = launch.enabled(x)
    ahead = min(cfg["prefetch"], ks // bk) if pdl else 0  # steps asked for in L2
    _quant_tma_kernel[grid](xd, qd, sd, zd, qweight, scales, mins if mins is not None else scales,
                            out, m, n, k, n, KS=ks, BITS=bits, BLOCK_M=bm, BLOCK_N=bn,
                            BLOCK_K=bk, SPLIT=split, M_TILES=m_tiles, MODE=mode, PDL=pdl,
                            QLINES=launch.prefetch_lines(ahead * bk * bits // 8) if ahead else 0,
                            SLINES=launch.prefetch_lines(ahead * bk // 16),
                            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                            **launch.options(pdl))
    return _sum_parts(out, x.dtype, split, residual, gated)


def quant_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
             mins: torch.Tensor | None, bits: int, group: int,
             config: dict | None = None, *, residual: torch.Tensor | None = None,
             gated: bool = False, mma_order: bool = False) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequantize(W)^T, in x's dtype (float32 sums). Epilogues, bitwise
    the unfused ops' results: residual [M, N]: residual + y; gated (W is gate then up, N even):
    silu(gate) * up [M, N / 2]. Where K is in parts, the parts' sum applies them (no launch of
    their own); in one part they run after the product. mma_order: qweight's bytes are in
    that order (flover/ops/quant.py), which the TMA form reads (Hopper; forced under the
    interpreter by passing such weights); the K order takes the pointer form."""
    m, k = x.shape
    n = qweight.shape[0]
    assert not gated or (n % 2 == 0 and residual is None)
    x = x.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    if m == 0:
        return torch.empty(0, n // 2 if gated else n, dtype=x.dtype, device=x.device)
    if mma_order:  # the TMA form's order (`mma_order_applies`), fixed by the weight
        tensors = [qweight, scales] + ([mins] if mins is not None else [])
        if not (_tma_shape(x.dtype, k, group)
                and all(t.data_ptr() % 16 == 0 and t.is_contiguous() for t in tensors)):
            raise ValueError(f"weights in the mma order need the TMA form: groups of 32, K a "
                             f"multiple of 256, float16 / bfloat16 x, contiguous 16-byte aligned "
                             f"tensors (group {group}, K {k}, {x.dtype})")
        return _quant_mm_tma(x, qweight, scales, mins, bits, config, residual, gated)
    cfg = default_config(n, k, bits) | (config or {})
    mode = _mode(cfg, x)
    split, block_k = cfg["split"], cfg["block_k"]
    while k % (32 * split):  # K fixes both (never M): each part a whole number of steps
        split //= 2
    while (k // split) % block_k:
        block_k //= 2
    m_tiles = min(cfg["max_m_tiles"], triton.cdiv(m, BLOCK_M))
    grid = (triton.cdiv(m, BLOCK_M * m_tiles), triton.cdiv(n, cfg["block_n"]), split)
    out = _partials(x, n, split)
    _quant_mm_kernel[grid](x, qweight, scales, scales if mins is None else mins, out, m, n, k,
                           x.stride(0), n, BITS=bits, GROUP=group,
                           BLOCK_M=BLOCK_M, BLOCK_N=cfg["block_n"], BLOCK_K=block_k, SPLIT=split,
                           PREFETCH=int(cfg["prefetch"]), M_TILES=m_tiles, MODE=mode,
                           IEEE=x.dtype == torch.float32, num_warps=cfg["num_warps"],
                           num_stages=cfg["num_stages"])
    return _sum_parts(out, x.dtype, split, residual, gated)

"""Triton int4 / int8 weight-only products for small M (decode), dequantisation fused.

Layout: flover/ops/quant.py (llama.cpp's blocks of 32; float16 scale, and min for int4, per
group of 32). The reference is `F.linear(x, dequantize(W).to(x.dtype))` with float32 sums.

A program computes a BLOCK_M x BLOCK_N tile of y over the whole of K, in BLOCK_K steps in
order: no split-K, and the tile sizes depend on N and K only, so a row's reduction order does
not depend on how many rows run (the batch-invariance rule). An int4 tile is unpacked as
bytes -> (low, high) pairs, i.e. weights in the order 0, 16, 1, 17, ... of each block; the
activations are loaded in that same order instead of shuffling the weights.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 16


@triton.jit
def _quant_mm_kernel(X, Q, S, Z, Y, M, N, K, stride_xm, stride_ym,
                     BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    p = tl.arange(0, BLOCK_K)
    mask_m, mask_n = rm < M, rn < N
    ng = K // GROUP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if BITS == 4:
            jb = tl.arange(0, BLOCK_K // 2)
            byte = tl.load(Q + rn[:, None] * (K // 2) + k0 // 2 + jb[None, :],
                           mask=mask_n[:, None], other=0)
            q = tl.reshape(tl.join(byte & 15, byte >> 4), (BLOCK_N, BLOCK_K))
            j = p // 2  # position p holds weight (j // 16) * 32 + j % 16 (+ 16 if p is odd)
            kk = k0 + (j // 16) * 32 + (j % 16) + 16 * (p % 2)
        else:
            kk = k0 + p
            q = tl.load(Q + rn[:, None] * K + kk[None, :], mask=mask_n[:, None], other=0)
        # the groups of this tile: positions [32b, 32b + 32) are block b in both layouts
        gb = tl.arange(0, BLOCK_K // 32)
        gi = rn[:, None] * ng + (k0 + gb[None, :] * 32) // GROUP
        sc = tl.load(S + gi, mask=mask_n[:, None], other=0.0).to(tl.float32)
        w = tl.reshape(q.to(tl.float32), (BLOCK_N, BLOCK_K // 32, 32)) * sc[:, :, None]
        if BITS == 4:
            w += tl.load(Z + gi, mask=mask_n[:, None], other=0.0).to(tl.float32)[:, :, None]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        x = tl.load(X + rm[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None], other=0.0)
        if IEEE:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _blocks(n: int, k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) from the shape alone, never from M."""
    block_k = next(b for b in (256, 128, 64, 32) if k % b == 0)
    return (32 if n >= 8192 else 16), block_k


def quant_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
             mins: torch.Tensor | None, bits: int, group: int) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequantize(W)^T, in x's dtype (float32 sums)."""
    m, k = x.shape
    n = qweight.shape[0]
    x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_n, block_k = _blocks(n, k)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, block_n))
    _quant_mm_kernel[grid](x, qweight, scales, scales if mins is None else mins, y, m, n, k,
                           x.stride(0), y.stride(0), BITS=bits, GROUP=group, BLOCK_M=BLOCK_M,
                           BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32,
                           num_warps=4, num_stages=4)
    return y

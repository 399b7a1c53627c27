"""The batch-invariant matrix product y = x @ W^T (+ b) of `flover.ops.linear`, in Triton.

One launch configuration for every number of rows M: tiles of BLOCK_M rows by BLOCK_N
output features, the K axis walked from 0 in steps of BLOCK_K into one float32 accumulator
per row tile, no split-K. A row's output is therefore the same sequence of the same MMA
instructions whatever M is and whatever the other rows hold: bitwise the same alone or in
any batch. cuBLAS, by contrast, picks another kernel (and split-K) for each M.

Small BLOCK_N gives decode (M = 1..64) enough programs to stream the weight at full
bandwidth. A program takes up to `max_m_tiles` row tiles (M_TILES, from M; at most four),
each with its own accumulator, so that a decode batch reads each weight tile once per
program; M_TILES changes how many tiles share a load, never a tile's arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile(X, rm, rk, k0, M, K, sx_m):
    """Rows rm of x, columns k0 + rk: one BLOCK_M x BLOCK_K tile, zero past the edges."""
    mask = (rm < M)[:, None] & ((k0 + rk) < K)[None, :]
    return tl.load(X + rm.to(tl.int64)[:, None] * sx_m + (k0 + rk)[None, :], mask=mask, other=0.0)


@triton.jit
def _mma(x, w, acc, IEEE: tl.constexpr):
    if IEEE:  # float32 weights: full-precision products, as torch's default matmul
        return tl.dot(x, w, acc, input_precision="ieee")
    return tl.dot(x, w, acc)


@triton.jit
def _store(Y, acc, bias, rm, rn, M, N, sy_m, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += bias[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(Y + rm.to(tl.int64)[:, None] * sy_m + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=mask)


@triton.jit
def _linear_kernel(X, W, B, Y, M, N, K, sx_m, sw_n, sy_m,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, M_TILES: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """M_TILES row tiles per program, each its own accumulator, all fed by one load of the
    weight tile: every row tile runs the same BLOCK_M x BLOCK_N x BLOCK_K products in the
    same K order whatever M_TILES is, so a row's bits do not depend on it."""
    pid_m = tl.program_id(0)  # fastest: the row tiles of one weight tile run side by side
    pid_n = tl.program_id(1)
    r0 = pid_m * (M_TILES * BLOCK_M) + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_n = rn < N
    w_ptr = W + rn.to(tl.int64)[:, None] * sw_n + rk[None, :]
    acc0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = tl.load(w_ptr + k0, mask=mask_n[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
        wt = tl.trans(w)
        acc0 = _mma(_tile(X, r0, rk, k0, M, K, sx_m), wt, acc0, IEEE)
        if M_TILES > 1:
            acc1 = _mma(_tile(X, r0 + BLOCK_M, rk, k0, M, K, sx_m), wt, acc1, IEEE)
        if M_TILES > 2:
            acc2 = _mma(_tile(X, r0 + 2 * BLOCK_M, rk, k0, M, K, sx_m), wt, acc2, IEEE)
        if M_TILES > 3:
            acc3 = _mma(_tile(X, r0 + 3 * BLOCK_M, rk, k0, M, K, sx_m), wt, acc3, IEEE)
    bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(B + rn, mask=mask_n, other=0.0).to(tl.float32)
    _store(Y, acc0, bias, r0, rn, M, N, sy_m, HAS_BIAS)
    if M_TILES > 1:
        _store(Y, acc1, bias, r0 + BLOCK_M, rn, M, N, sy_m, HAS_BIAS)
    if M_TILES > 2:
        _store(Y, acc2, bias, r0 + 2 * BLOCK_M, rn, M, N, sy_m, HAS_BIAS)
    if M_TILES > 3:
        _store(Y, acc3, bias, r0 + 3 * BLOCK_M, rn, M, N, sy_m, HAS_BIAS)


def default_config(element_size: int = 2) -> dict:
    """Launch parameters for every M (never chosen from M: that is the invariance). Picked on
    an H200 by `bench/decode_step.py --linear-configs` (docs/PERF.md, "Batch invariance"); float32
    tiles take half the K depth, so that the staged tiles fit in shared memory."""
    return {"block_m": 16, "block_n": 64, "block_k": 512 // element_size, "num_warps": 4,
            "num_stages": 4, "max_m_tiles": 2}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: dict | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias [N]) -> [..., N] in x's dtype."""
    n, k = weight.shape
    assert x.shape[-1] == k and weight.stride(-1) == 1
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*lead, n)
    cfg = default_config(x.element_size()) | (config or {})
    # up to max_m_tiles row tiles share each load of a weight tile (decode: one program per
    # weight tile up to 64 rows); the row tile itself, and so each row's arithmetic, is fixed
    m_tiles = min(cfg["max_m_tiles"], triton.cdiv(m, cfg["block_m"]))
    grid = (triton.cdiv(m, cfg["block_m"] * m_tiles), triton.cdiv(n, cfg["block_n"]))
    _linear_kernel[grid](x2, weight, bias if bias is not None else weight, y, m, n, k,
                         x2.stride(0), weight.stride(0), y.stride(0),
                         HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, M_TILES=m_tiles,
                         BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
                         num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.view(*lead, n)

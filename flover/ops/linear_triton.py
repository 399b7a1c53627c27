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
def _store(Y, acc, bias, R, rm, rn, M, N, sy_m, sr_m, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    if HAS_BIAS:
        acc += bias[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    y = acc.to(Y.dtype.element_ty)
    if HAS_RES:  # residual + y, y rounded first: the reference's `x + linear(h)`
        r = tl.load(R + rm.to(tl.int64)[:, None] * sr_m + rn[None, :], mask=mask, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(Y.dtype.element_ty)
    tl.store(Y + rm.to(tl.int64)[:, None] * sy_m + rn[None, :], y, mask=mask)


@triton.jit
def _summed(X, R, rm, rk, k0, M, K, sx_m, sr_m, HAS_SUM: tl.constexpr):
    """A tile of x, or of s = x + residual rounded to x's dtype (the reference's sum)."""
    x = _tile(X, rm, rk, k0, M, K, sx_m)
    if HAS_SUM:
        x = (x.to(tl.float32) + _tile(R, rm, rk, k0, M, K, sr_m).to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _rstd(X, R, S, rm, rk, M, K, sx_m, sr_m, eps, S_ROWS, HAS_SUM: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / rms of each row of s (x, or x + residual), summed over K in steps of BLOCK_K in
    order: fixed by K alone. Rows below S_ROWS (M in the first column tile's programs, else 0)
    also store s, so that it is written once. Each step's tile is loaded one step ahead."""
    sq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    nxt = _summed(X, R, rm, rk, 0, M, K, sx_m, sr_m, HAS_SUM)
    for k0 in range(0, K, BLOCK_K):
        s = nxt
        nxt = _summed(X, R, rm, rk, k0 + BLOCK_K, M, K, sx_m, sr_m, HAS_SUM)
        if HAS_SUM:  # s shares x's (contiguous) row stride
            mask = (rm < S_ROWS)[:, None] & ((k0 + rk) < K)[None, :]
            tl.store(S + rm.to(tl.int64)[:, None] * sx_m + (k0 + rk)[None, :], s, mask=mask)
        sf = s.to(tl.float32)
        sq += sf * sf
    return 1.0 / tl.sqrt(tl.sum(sq, axis=1) / K + eps)


@triton.jit
def _raw(X, R, rm, rk, k0, M, K, sx_m, sr_m, PRO: tl.constexpr, HAS_SUM: tl.constexpr):
    """What the prologue reads for columns k0 + rk: (x, residual) for the norm (x twice without
    a residual), (gate, up) for SiLU * up; zeros past K."""
    if PRO == 2:
        return _tile(X, rm, rk, k0, M, K, sx_m), _tile(X + K, rm, rk, k0, M, K, sx_m)
    x = _tile(X, rm, rk, k0, M, K, sx_m)
    if HAS_SUM:
        return x, _tile(R, rm, rk, k0, M, K, sr_m)
    return x, x


@triton.jit
def _operand(a, b, nw, rstd, PRO: tl.constexpr, HAS_SUM: tl.constexpr):
    """The product's left tile from `_raw`'s pair: weight * norm(s), s = a (+ b), the norm
    rounded to the activations' dtype before the weight as `fused.rms_norm` does (PRO 1); or
    silu(a) * b, rounded as `fused.silu_mul` does (PRO 2)."""
    if PRO == 1:
        s = a
        if HAS_SUM:
            s = (a.to(tl.float32) + b.to(tl.float32)).to(a.dtype)
        h = (s.to(tl.float32) * rstd[:, None]).to(s.dtype).to(tl.float32) * nw[None, :]
        return h.to(s.dtype)
    gf = a.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(a.dtype)
    return (act.to(tl.float32) * b.to(tl.float32)).to(a.dtype)


@triton.jit
def _norm_w(NW, rk, k0, K, PRO: tl.constexpr, BLOCK_K: tl.constexpr):
    """The norm's weight for columns k0 + rk, in float32 (zeros unless PRO is the norm)."""
    if PRO == 1:
        return tl.load(NW + k0 + rk, mask=(k0 + rk) < K, other=0.0).to(tl.float32)
    return tl.zeros([BLOCK_K], dtype=tl.float32)


@triton.jit
def _linear_kernel(X, W, B, Y, XR, NW, S, YR, M, N, K, sx_m, sw_n, sy_m, sxr_m, syr_m, eps,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, M_TILES: tl.constexpr,
                   PRO: tl.constexpr, HAS_SUM: tl.constexpr, HAS_RES: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """M_TILES row tiles per program, each its own accumulator, all fed by one load of the
    weight tile: every row tile runs the same BLOCK_M x BLOCK_N x BLOCK_K products in the
    same K order whatever M_TILES is, so a row's bits do not depend on it.

    Optional prologue (PRO): the RMSNorm of x (HAS_SUM: of x + XR, the summed stream stored
    once into S by the programs of the first column tile), or SiLU(gate) * up (`_operand`);
    optional epilogue (HAS_RES): + YR. Each is elementwise per row, or (the norm's 1/rms) a
    per-row sum in a fixed order, so a row's bits still do not depend on the other rows. The
    prologue's tiles go through registers, not the pipeliner's shared-memory stages, so they
    are loaded one K step ahead by hand."""
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
    if PRO == 0:
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
    else:
        rstd0 = tl.zeros([BLOCK_M], dtype=tl.float32)
        rstd1 = tl.zeros([BLOCK_M], dtype=tl.float32)
        rstd2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        rstd3 = tl.zeros([BLOCK_M], dtype=tl.float32)
        if PRO == 1:
            first = (pid_n == 0).to(tl.int32) * M  # the rows of s this program stores
            rstd0 = _rstd(X, XR, S, r0, rk, M, K, sx_m, sxr_m, eps, first, HAS_SUM, BLOCK_M,
                          BLOCK_K)
            if M_TILES > 1:
                rstd1 = _rstd(X, XR, S, r0 + BLOCK_M, rk, M, K, sx_m, sxr_m, eps, first, HAS_SUM,
                              BLOCK_M, BLOCK_K)
            if M_TILES > 2:
                rstd2 = _rstd(X, XR, S, r0 + 2 * BLOCK_M, rk, M, K, sx_m, sxr_m, eps, first,
                              HAS_SUM, BLOCK_M, BLOCK_K)
            if M_TILES > 3:
                rstd3 = _rstd(X, XR, S, r0 + 3 * BLOCK_M, rk, M, K, sx_m, sxr_m, eps, first,
                              HAS_SUM, BLOCK_M, BLOCK_K)
        nw = _norm_w(NW, rk, 0, K, PRO, BLOCK_K)
        a0, b0 = _raw(X, XR, r0, rk, 0, M, K, sx_m, sxr_m, PRO, HAS_SUM)
        a1, b1, a2, b2, a3, b3 = a0, b0, a0, b0, a0, b0
        if M_TILES > 1:
            a1, b1 = _raw(X, XR, r0 + BLOCK_M, rk, 0, M, K, sx_m, sxr_m, PRO, HAS_SUM)
        if M_TILES > 2:
            a2, b2 = _raw(X, XR, r0 + 2 * BLOCK_M, rk, 0, M, K, sx_m, sxr_m, PRO, HAS_SUM)
        if M_TILES > 3:
            a3, b3 = _raw(X, XR, r0 + 3 * BLOCK_M, rk, 0, M, K, sx_m, sxr_m, PRO, HAS_SUM)
        for k0 in range(0, K, BLOCK_K):
            w = tl.load(w_ptr + k0, mask=mask_n[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
            wt = tl.trans(w)
            k1 = k0 + BLOCK_K  # the next step's tiles, loaded before this step's products
            nw_next = _norm_w(NW, rk, k1, K, PRO, BLOCK_K)
            n0, m0 = _raw(X, XR, r0, rk, k1, M, K, sx_m, sxr_m, PRO, HAS_SUM)
            acc0 = _mma(_operand(a0, b0, nw, rstd0, PRO, HAS_SUM), wt, acc0, IEEE)
            a0, b0 = n0, m0
            if M_TILES > 1:
                n1, m1 = _raw(X, XR, r0 + BLOCK_M, rk, k1, M, K, sx_m, sxr_m, PRO, HAS_SUM)
                acc1 = _mma(_operand(a1, b1, nw, rstd1, PRO, HAS_SUM), wt, acc1, IEEE)
                a1, b1 = n1, m1
            if M_TILES > 2:
                n2, m2 = _raw(X, XR, r0 + 2 * BLOCK_M, rk, k1, M, K, sx_m, sxr_m, PRO, HAS_SUM)
                acc2 = _mma(_operand(a2, b2, nw, rstd2, PRO, HAS_SUM), wt, acc2, IEEE)
                a2, b2 = n2, m2
            if M_TILES > 3:
                n3, m3 = _raw(X, XR, r0 + 3 * BLOCK_M, rk, k1, M, K, sx_m, sxr_m, PRO, HAS_SUM)
                acc3 = _mma(_operand(a3, b3, nw, rstd3, PRO, HAS_SUM), wt, acc3, IEEE)
                a3, b3 = n3, m3
            nw = nw_next
    bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(B + rn, mask=mask_n, other=0.0).to(tl.float32)
    _store(Y, acc0, bias, YR, r0, rn, M, N, sy_m, syr_m, HAS_BIAS, HAS_RES)
    if M_TILES > 1:
        _store(Y, acc1, bias, YR, r0 + BLOCK_M, rn, M, N, sy_m, syr_m, HAS_BIAS, HAS_RES)
    if M_TILES > 2:
        _store(Y, acc2, bias, YR, r0 + 2 * BLOCK_M, rn, M, N, sy_m, syr_m, HAS_BIAS, HAS_RES)
    if M_TILES > 3:
        _store(Y, acc3, bias, YR, r0 + 3 * BLOCK_M, rn, M, N, sy_m, syr_m, HAS_BIAS, HAS_RES)


def default_config(element_size: int = 2) -> dict:
    """Launch parameters for every M (never chosen from M: that is the invariance). Picked on
    an H200 by `bench/decode_step.py --linear-configs` (docs/PERF.md, "Batch invariance"); float32
    tiles take half the K depth, so that the staged tiles fit in shared memory."""
    return {"block_m": 16, "block_n": 64, "block_k": 512 // element_size, "num_warps": 4,
            "num_stages": 4, "max_m_tiles": 2}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: dict | None = None, *, norm: tuple[torch.Tensor, float] | None = None,
           x_residual: torch.Tensor | None = None, silu_gate: bool = False,
           residual: torch.Tensor | None = None
           ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] @ weight [N, K]^T (+ bias [N]) -> [..., N] in x's dtype.

    Fused forms (each the same arithmetic as its unfused sequence, see `flover.ops.fused`):
    norm=(w, eps): the product of w * rms_norm(s) with s = x (+ x_residual), returning (y, s);
    silu_gate: x is [..., 2K] (gate then up) and the product is of silu(gate) * up;
    residual [..., N]: y + residual.
    """
    n, k = weight.shape
    assert x.shape[-1] == (2 * k if silu_gate else k) and weight.stride(-1) == 1
    assert norm is not None or x_residual is None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    xr = s = None
    if x_residual is not None:
        xr, x2 = x_residual.reshape(-1, k).contiguous(), x2.contiguous()
        s = torch.empty_like(x2)  # x, x_residual and s: one row stride
    yr = None
    if residual is not None:
        yr = residual.reshape(-1, n)
        if yr.stride(-1) != 1:
            yr = yr.contiguous()
    if m > 0:
        cfg = default_config(x.element_size()) | (config or {})
        # up to max_m_tiles row tiles share each load of a weight tile (decode: one program per
        # weight tile up to 64 rows); the row tile itself, and so each row's arithmetic, is fixed
        m_tiles = min(cfg["max_m_tiles"], triton.cdiv(m, cfg["block_m"]))
        grid = (triton.cdiv(m, cfg["block_m"] * m_tiles), triton.cdiv(n, cfg["block_n"]))
        pro = 1 if norm is not None else 2 if silu_gate else 0
        _linear_kernel[grid](
            x2, weight, bias if bias is not None else weight, y,
            xr if xr is not None else x2, norm[0] if norm is not None else weight,
            s if s is not None else y, yr if yr is not None else y, m, n, k,
            x2.stride(0), weight.stride(0), y.stride(0), xr.stride(0) if xr is not None else 0,
            yr.stride(0) if yr is not None else 0, norm[1] if norm is not None else 0.0,
            HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, M_TILES=m_tiles,
            PRO=pro, HAS_SUM=xr is not None, HAS_RES=yr is not None,
            BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    y = y.view(*lead, n)
    if norm is None:
        return y
    return y, (s.view(x.shape) if s is not None else x)

"""The batch-invariant matrix product y = x @ W^T (+ b) of `flover.ops.linear`, in Triton.

One launch configuration for every number of rows M: tiles of BLOCK_M rows by BLOCK_N
output features, the K axis cut into SPLITS parts fixed by the weight's shape (N, K) and the
device, never by M (`splits`; one part unless SPLIT_K), each part walked from its start in
steps of BLOCK_K into a float32 accumulator of its own, the parts' sums then added in order.
A row's output is therefore the same sequence of the same MMA instructions and float32 adds
whatever M is and whatever the other rows hold: bitwise the same alone or in any batch.
cuBLAS, by contrast, picks another kernel (and split-K) for each M.

Why split: at decode (M = 1..64) the product streams the weight, and a narrow weight (N =
hidden size: o_proj, down_proj) has few column tiles for the multiprocessors (64 programs on
132 SMs for LLaMA-7B). The parts run as programs of their own (SPLIT_GRID) whose float32 sums
go to a workspace; the last program of a tile to arrive (a counter per tile) adds them in
part order and applies the epilogue, so which program arrives last changes nothing. With many
row tiles (prefill) one program walks all the parts itself, in the same order, with the same
bits. Measured on an H100 it did not pay (see SPLIT_K), so it is off by default.

Small BLOCK_N gives decode enough programs. A program takes up to `max_m_tiles` row tiles
(M_TILES, from M; at most four), each with its own accumulator, so that a decode batch reads
each weight tile once per program; M_TILES changes how many tiles share a load, never a
tile's arithmetic.

On Hopper (`launch.tma`; float16 / bfloat16, no prologue, one part, 16-byte aligned rows)
`_linear_tma_kernel` takes the product instead: both operands reach shared memory by TMA,
`num_stages` K steps deep, and the weight tile is the left operand of a warpgroup MMA, where
this kernel's weight tiles go through registers (triton 3.6 does not stage them).

With PDL (`flover.ops.launch`) a program first asks for its part's leading weight tiles in
L2, then waits for the kernel before it: the weight does not depend on it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from flover.ops import launch


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
def _epilogue(Y, B, YR, acc0, acc1, acc2, acc3, r0, rn, M, N, sy_m, syr_m,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, M_TILES: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Each of the M_TILES row tiles' [BLOCK_M, BLOCK_N] sums from row r0: + bias, stored,
    + the residual (`_store`)."""
    bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)
    _store(Y, acc0, bias, YR, r0, rn, M, N, sy_m, syr_m, HAS_BIAS, HAS_RES)
    if M_TILES > 1:
        _store(Y, acc1, bias, YR, r0 + BLOCK_M, rn, M, N, sy_m, syr_m, HAS_BIAS, HAS_RES)
    if M_TILES > 2:
        _store(Y, acc2, bias, YR, r0 + 2 * BLOCK_M, rn, M, N, sy_m, syr_m, HAS_BIAS, HAS_RES)
    if M_TILES > 3:
        _store(Y, acc3, bias, YR, r0 + 3 * BLOCK_M, rn, M, N, sy_m, syr_m, HAS_BIAS, HAS_RES)


@triton.jit
def _products(X, w_ptr, mask_n, r0, rk, k_lo, k_hi, M, K, sx_m, IEEE: tl.constexpr,
              M_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """The float32 sums over columns [k_lo, k_hi) of K, from zero in steps of BLOCK_K, of
    M_TILES row tiles from r0: one load of each weight tile feeds every row tile."""
    acc0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        w = tl.load(w_ptr + k0, mask=mask_n[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
        wt = tl.trans(w)
        acc0 = _mma(_tile(X, r0, rk, k0, M, K, sx_m), wt, acc0, IEEE)
        if M_TILES > 1:
            acc1 = _mma(_tile(X, r0 + BLOCK_M, rk, k0, M, K, sx_m), wt, acc1, IEEE)
        if M_TILES > 2:
            acc2 = _mma(_tile(X, r0 + 2 * BLOCK_M, rk, k0, M, K, sx_m), wt, acc2, IEEE)
        if M_TILES > 3:
            acc3 = _mma(_tile(X, r0 + 3 * BLOCK_M, rk, k0, M, K, sx_m), wt, acc3, IEEE)
    return acc0, acc1, acc2, acc3


@triton.jit
def _part(WS, acc, part, rm, rn, M, N):
    """Store (SPLIT_GRID) one part's float32 sums of a row tile in the workspace [part, M, N]."""
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(WS + (part * M + rm).to(tl.int64)[:, None] * N + rn[None, :], acc, mask=mask)


@triton.jit
def _parts_sum(WS, rm, rn, M, N, SPLITS: tl.constexpr):
    """The parts' sums of a row tile added in part order (read past L1: other SMs wrote them)."""
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    ptr = WS + rm.to(tl.int64)[:, None] * N + rn[None, :]
    acc = tl.load(ptr, mask=mask, other=0.0, cache_modifier=".cg")
    for part in tl.static_range(1, SPLITS):
        acc += tl.load(ptr + part * M * N, mask=mask, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def _linear_kernel(X, W, B, Y, YR, WS, CNT, M, N, K, KS, sx_m, sw_n, sy_m, syr_m,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, M_TILES: tl.constexpr,
                   HAS_RES: tl.constexpr, SPLITS: tl.constexpr, SPLIT_GRID: tl.constexpr,
                   PDL: tl.constexpr, PREFETCH: tl.constexpr, LINE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """M_TILES row tiles per program, each its own accumulator, all fed by one load of the
    weight tile: every row tile runs the same BLOCK_M x BLOCK_N x BLOCK_K products in the
    same K order whatever M_TILES is, so a row's bits do not depend on it.

    K in SPLITS parts of KS columns (a multiple of BLOCK_K): with SPLIT_GRID, part
    program_id(2) of a tile, its sums stored in WS, the last part to arrive (CNT counts them,
    and is put back to 0) adds them in order; without, this program sums every part in turn.
    Optional epilogue (HAS_RES): + YR, elementwise per row."""
    pid_m = tl.program_id(0)  # fastest: the row tiles of one weight tile run side by side
    pid_n = tl.program_id(1)
    r0 = pid_m * (M_TILES * BLOCK_M) + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_n = rn < N
    w_ptr = W + rn.to(tl.int64)[:, None] * sw_n + rk[None, :]
    part = 0
    if SPLIT_GRID:
        part = tl.program_id(2)
    if PREFETCH > 0:
        launch.prefetch_l2(W, rn, sw_n, mask_n, part * KS, tl.minimum(part * KS + KS, K),
                           PREFETCH * BLOCK_K // LINE, LINE)
    launch.prior(PDL)
    store = True
    if SPLIT_GRID:
        acc0, acc1, acc2, acc3 = _products(X, w_ptr, mask_n, r0, rk, part * KS,
                                           tl.minimum(part * KS + KS, K), M, K, sx_m, IEEE,
                                           M_TILES, BLOCK_M, BLOCK_N, BLOCK_K)
        _part(WS, acc0, part, r0, rn, M, N)
        if M_TILES > 1:
            _part(WS, acc1, part, r0 + BLOCK_M, rn, M, N)
        if M_TILES > 2:
            _part(WS, acc2, part, r0 + 2 * BLOCK_M, rn, M, N)
        if M_TILES > 3:
            _part(WS, acc3, part, r0 + 3 * BLOCK_M, rn, M, N)
        tl.debug_barrier()  # every thread's part stored before the count says so
        tile = pid_m * tl.num_programs(1) + pid_n
        store = tl.atomic_add(CNT + tile, 1, sem="acq_rel") == SPLITS - 1
        if store:
            tl.atomic_xchg(CNT + tile, 0)  # ready for the next launch (graph replays too)
            acc0 = _parts_sum(WS, r0, rn, M, N, SPLITS)
            if M_TILES > 1:
                acc1 = _parts_sum(WS, r0 + BLOCK_M, rn, M, N, SPLITS)
            if M_TILES > 2:
                acc2 = _parts_sum(WS, r0 + 2 * BLOCK_M, rn, M, N, SPLITS)
            if M_TILES > 3:
                acc3 = _parts_sum(WS, r0 + 3 * BLOCK_M, rn, M, N, SPLITS)
    else:
        acc0, acc1, acc2, acc3 = _products(X, w_ptr, mask_n, r0, rk, 0, tl.minimum(KS, K), M,
                                           K, sx_m, IEEE, M_TILES, BLOCK_M, BLOCK_N, BLOCK_K)
        for p in tl.static_range(1, SPLITS):
            p0, p1, p2, p3 = _products(X, w_ptr, mask_n, r0, rk, p * KS,
                                       tl.minimum(p * KS + KS, K), M, K, sx_m, IEEE, M_TILES,
                                       BLOCK_M, BLOCK_N, BLOCK_K)
            acc0 += p0
            acc1 += p1
            acc2 += p2
            acc3 += p3
    if store:  # SPLIT_GRID: only the tile's last part to arrive
        _epilogue(Y, B, YR, acc0, acc1, acc2, acc3, r0, rn, M, N, sy_m, syr_m, HAS_BIAS,
                  HAS_RES, M_TILES, BLOCK_M, BLOCK_N)


@triton.jit
def _tma_step(w, wu, x, acc, up, sq, GATED: tl.constexpr, RMS: tl.constexpr):
    """One K step of one row tile x [BLOCK_M, BLOCK_K] in `_linear_tma_kernel`: the weight
    tile's product into acc (y^T), the up tile's into `up` (GATED), and each row's sum of
    squares of x into sq (RMS), in the same K order for every row."""
    xt = tl.trans(x)
    acc = tl.dot(w, xt, acc)
    if GATED:
        up = tl.dot(wu, xt, up)
    if RMS:
        xf = x.to(tl.float32)
        sq += tl.sum(xf * xf, axis=1)
    return acc, up, sq


@triton.jit
def _rms_scaled(acc, sq, K, eps, RMS: tl.constexpr):
    """A row tile's sums [BLOCK_M, BLOCK_N], times each row's 1 / rms (RMS), as `rms_norm`
    computes it: 1 / sqrt(sum of squares / K + eps)."""
    if RMS:
        acc = acc * (1.0 / tl.sqrt(sq / K + eps))[:, None]
    return acc


@triton.jit
def _gated_store(Y, B, acc, up, rm, rn, M, NI, sy_m, HAS_BIAS: tl.constexpr):
    """silu(gate) * up of a row tile, gate and up each rounded to Y's dtype first (the product's
    output), then as `fused_triton.silu_mul` rounds: bitwise the two kernels' result."""
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=rn < NI, other=0.0).to(tl.float32)[None, :]
        up += tl.load(B + NI + rn, mask=rn < NI, other=0.0).to(tl.float32)[None, :]
    dt = Y.dtype.element_ty
    g = acc.to(dt).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt)
    y = (act.to(tl.float32) * up.to(dt).to(tl.float32)).to(dt)
    mask = (rm < M)[:, None] & (rn < NI)[None, :]
    tl.store(Y + rm.to(tl.int64)[:, None] * sy_m + rn[None, :], y, mask=mask)


@triton.jit
def _linear_tma_kernel(XD, WD, W, B, Y, YR, M, N, K, NI, sw_n, sy_m, syr_m, eps,
                       HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RMS: tl.constexpr,
                       GATED: tl.constexpr, M_TILES: tl.constexpr, PDL: tl.constexpr,
                       PREFETCH: tl.constexpr, LINE: tl.constexpr, STEPS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The Hopper form (float16 / bfloat16, one part): y^T = W x^T, the weight
    tile [BLOCK_N, BLOCK_K] the MMA's left operand, both operands brought into shared memory
    by TMA (descriptors XD, WD; zeros past the edges), `num_stages` steps deep, so that the
    weight streams without passing through registers. Each of the M_TILES (at most 2) row
    tiles is its own [BLOCK_N, BLOCK_M] product per K step, in K order, whatever M is: a
    row's bits do not depend on the others. Another MMA instruction than `_linear_kernel`'s
    (wgmma), so its bits are not promised to be that kernel's; on an H100 the two forms'
    LLaMA logits were equal.

    RMS: the weight carries an RMSNorm's weight (`flover.ops.fused.fold_norms`); each row's
    sum of squares is taken from the x tiles the product reads, and its sums are scaled by
    its 1 / rms before the epilogue: the norm costs no launch and no pass of its own.
    GATED: W is [2 NI, K] (gate then up); a program takes the gate tile at n0 and the up tile
    at NI + n0 and stores silu(gate) * up [M, NI]: the activation costs no launch either.

    PDL: the program asks for its first PREFETCH weight tiles in L2 (W, the weight's pointer,
    rows sw_n apart), then waits for the kernel before it (`launch.prior`).

    STEPS = cdiv(K, BLOCK_K), a constexpr: the K loop's trip count fixed at compile time. With
    a runtime bound, ptxas serialised the warpgroup MMAs of the RMS and GATED forms (info
    C7515, triton 3.6; tests/test_sm90_codegen.py) as it did the int8 / int4 kernel's."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m0 = pid_m * (M_TILES * BLOCK_M)
    n0 = pid_n * BLOCK_N
    if PREFETCH > 0:
        rw = n0 + tl.arange(0, BLOCK_N)
        launch.prefetch_l2(W, rw, sw_n, rw < N, 0, K, PREFETCH * BLOCK_K // LINE, LINE)
        if GATED:
            launch.prefetch_l2(W, NI + rw, sw_n, NI + rw < N, 0, K, PREFETCH * BLOCK_K // LINE,
                               LINE)
    launch.prior(PDL)
    acc0 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    up0 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    up1 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    sq0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    sq1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, STEPS * BLOCK_K, BLOCK_K):
        w = WD.load([n0, k0])
        wu = w
        if GATED:
            wu = WD.load([NI + n0, k0])
        acc0, up0, sq0 = _tma_step(w, wu, XD.load([m0, k0]), acc0, up0, sq0, GATED, RMS)
        if M_TILES > 1:
            acc1, up1, sq1 = _tma_step(w, wu, XD.load([m0 + BLOCK_M, k0]), acc1, up1, sq1,
                                       GATED, RMS)
    rm = m0 + tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    acc0 = _rms_scaled(tl.trans(acc0), sq0, K, eps, RMS)
    acc1 = _rms_scaled(tl.trans(acc1), sq1, K, eps, RMS)
    if GATED:
        _gated_store(Y, B, acc0, _rms_scaled(tl.trans(up0), sq0, K, eps, RMS), rm, rn, M, NI,
                     sy_m, HAS_BIAS)
        if M_TILES > 1:
            _gated_store(Y, B, acc1, _rms_scaled(tl.trans(up1), sq1, K, eps, RMS),
                         rm + BLOCK_M, rn, M, NI, sy_m, HAS_BIAS)
    else:
        _epilogue(Y, B, YR, acc0, acc1, acc0, acc0, rm, rn, M, N, sy_m, syr_m, HAS_BIAS,
                  HAS_RES, M_TILES, BLOCK_M, BLOCK_N)


def default_config(element_size: int = 2) -> dict:
    """Launch parameters for every M (never chosen from M: that is the invariance). Picked on
    an H200 by `bench/decode_step.py --linear-configs` (docs/PERF.md, "Batch invariance"); float32
    tiles take half the K depth, so that the staged tiles fit in shared memory. `prefetch`: the
    weight tiles a program asks for in L2 before its PDL wait (with PDL only)."""
    return {"block_m": 16, "block_n": 64, "block_k": 512 // element_size, "num_warps": 4,
            "num_stages": 4, "max_m_tiles": 2, "prefetch": 4}


def tma_config(epilogue: str | None = None) -> dict:
    """Launch parameters of the TMA form (`_linear_tma_kernel`, 16-bit dtypes), for every M:
    a 64-row weight tile is one warpgroup's MMA; `num_stages` K steps of both operands in
    flight (4 x 40 KB).
    The best of `bench/linear.py --tma-sweep` on an H100 but for one shape at M = 32
    (docs/PERF.md, "TMA forms"). With the norm ("rms") or the norm and SiLU * up ("gated") as
    the epilogue, the K steps of `EPILOGUE_TILES`."""
    cfg = {"block_m": 16, "block_n": 64, "block_k": 256, "num_warps": 4, "num_stages": 4,
           "max_m_tiles": 2, "prefetch": 4}
    return cfg | EPILOGUE_TILES[epilogue] if epilogue else cfg


# The epilogue forms' K steps: half as deep and three in flight (114,752 bytes of shared
# memory for the gated product's two weight tiles a step on sm_90, so that two programs share
# an SM). Measured on an H100 (docs/PERF.md, "The fold and the merge measured"): gate_up with
# the norm and SiLU * up 63.5 / 67.5 us at M = 1 / 32 against 70.9 / 98.3 with 4 steps in flight.
EPILOGUE_TILES = {"rms": {"block_k": 128, "num_stages": 3},
                  "gated": {"block_k": 128, "num_stages": 3}}


def _tma_form(x: torch.Tensor, weight: torch.Tensor, cfg: dict, parts: int) -> bool:
    """The TMA form takes a product when asked ("tma": True; by default where `launch.tma`)
    and it can: float16 / bfloat16, one part, 16-byte aligned weight rows and K. All of it
    fixed by the weight, the dtype and the device, never by M."""
    size = weight.element_size()
    return bool(launch.tma(x, cfg.get("tma")) and parts == 1
                and x.dtype in (torch.float16, torch.bfloat16) and weight.data_ptr() % 16 == 0
                and weight.stride(0) * size % 16 == 0 and weight.shape[1] * size % 16 == 0)


def fusable(weight: torch.Tensor, config: dict | None = None) -> bool:
    """Whether `linear` can take products with this weight (and x of its dtype) with `rms_eps`
    or `gated`: where the TMA form takes them. Fixed by the weight and the device, never by M."""
    cfg = default_config(weight.element_size()) | (config or {})
    n, k = weight.shape
    parts = cfg.get("split") or (splits(n, k, cfg, launch.sm_count(weight.device))
                                 if weight.is_cuda else 1)
    return weight.stride(-1) == 1 and _tma_form(weight, weight, cfg, parts)


def _linear_tma(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                y: torch.Tensor, yr: torch.Tensor | None, config: dict | None,
                rms_eps: float | None = None, gated: bool = False) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    epilogue = "gated" if gated else "rms" if rms_eps is not None else None
    cfg = tma_config(epilogue) | (config or {})
    (m, k), n = x2.shape, weight.shape[0]
    if x2.stride(0) != k or x2.data_ptr() % 16:  # a copy has the same values: the same bits
        x2 = x2.clone(memory_format=torch.contiguous_format)
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    m_tiles = min(cfg["max_m_tiles"], 2, triton.cdiv(m, bm))
    grid = (triton.cdiv(m, bm * m_tiles), triton.cdiv(n // 2 if gated else n, bn))
    pdl = launch.enabled(x2)
    _linear_tma_kernel[grid](
        TensorDescriptor.from_tensor(x2, [bm, bk]), TensorDescriptor.from_tensor(weight, [bn, bk]),
        weight, bias if bias is not None else weight, y, yr if yr is not None else y, m, n, k,
        n // 2, weight.stride(0), y.stride(0), yr.stride(0) if yr is not None else 0,
        rms_eps if rms_eps is not None else 0.0,
        HAS_BIAS=bias is not None, HAS_RES=yr is not None, RMS=rms_eps is not None,
        GATED=gated, M_TILES=m_tiles, PDL=pdl, PREFETCH=cfg["prefetch"] if pdl else 0,
        LINE=128 // weight.element_size(), STEPS=triton.cdiv(k, bk), BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch.options(pdl))


def _folded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            config: dict | None, rms_eps: float | None, gated: bool) -> torch.Tensor:
    """`linear` with rms_eps / gated: the TMA form's fused epilogues."""
    if not fusable(weight, config) or x.dtype != weight.dtype:
        raise ValueError("the folded-norm and gated products need the TMA form (`fusable`)")
    n, k = weight.shape
    assert x.shape[-1] == k and (n % 2 == 0 or not gated)
    out = n // 2 if gated else n
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], out), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        _linear_tma(x2, weight, bias, y, None, config, rms_eps, gated)
    return y.view(*x.shape[:-1], out)


# Off by default: measured on an H100 (docs/PERF.md, "Split-K and PDL"), the decode step was no
# faster with the parts (llama_7b) or up to 4.5% slower (llama_13b); one part was the fastest
# for every narrow weight but LLaMA-7B's down_proj. FLOVER_SPLIT_K=1 turns it on (to measure
# on other cards: `bench/decode_step.py --variants nosplit,split`, `bench/linear.py --splits`).
SPLIT_K = os.environ.get("FLOVER_SPLIT_K", "0") == "1"
COUNTER_SLOTS = 4096  # tiles a SPLIT_GRID launch may count at once
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def splits(n: int, k: int, cfg: dict, sms: int) -> int:
    """How many parts the K axis of an [N, K] weight is cut into on a device of `sms`
    multiprocessors (1 unless SPLIT_K): from the shape and the device alone, never from M
    (that is the invariance). The model: a decode product streams its weight in waves of at
    most `sms` programs, and a wave of fewer than about two thirds of them cannot pull the
    copy bandwidth (read off H200 figures: 64 programs streamed o_proj at ~1/1.6 of it); the
    count minimising the waves' time, each extra part charged 3% (its pipeline fill and the
    parts' sum), at least 4 K steps a part. On an H100 the model's picks were slower than one
    part for every shape but LLaMA-7B's down_proj (docs/PERF.md, "Split-K and PDL")."""
    if not SPLIT_K:
        return 1
    tiles, steps = triton.cdiv(n, cfg["block_n"]), triton.cdiv(k, cfg["block_k"])
    full = 2 * sms / 3
    best, best_t = 1, float("inf")
    for parts in range(1, 5):
        if steps < 4 * parts:
            break
        programs, left, t = tiles * parts, tiles * parts, 0.0
        while left > 0:
            wave = min(left, sms)
            left -= wave
            t += wave / programs / min(1.0, wave / full)
        t *= 1 + 0.03 * (parts - 1)
        if t < best_t - 1e-9:
            best, best_t = parts, t
    return best


def _counters(device: torch.device) -> torch.Tensor | None:
    """The per-tile arrival counters of SPLIT_GRID launches on `device`: zeros, and left at
    zero by every launch (the tile's last part puts its count back to 0, graph replays
    included). Made outside graph capture only (a captured memset would not run before the
    first eager launch); None until then, and launches sum the parts themselves."""
    if device not in _COUNTERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _COUNTERS[device] = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
    return _COUNTERS[device]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: dict | None = None, *, residual: torch.Tensor | None = None,
           rms_eps: float | None = None, gated: bool = False) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias [N]) -> [..., N] in x's dtype.

    residual [..., N]: y + residual, y rounded first (the reference's `x + linear(h)`).
    Folded-norm forms (the TMA form only, where `fusable`; see `flover.ops.linear.fold_norms`):
    rms_eps: the product of rms_norm(x) with a unit weight (the weight carries the norm's),
    each row's sums scaled by its 1 / rms; gated: weight is [2 NI, K] (gate then up) and the
    result silu(gate) * up [..., NI]. Either may come with the other, not with a residual.
    `config` may also set "split" (the K parts) and "split_grid" (parts as programs), which
    are otherwise chosen by `splits` and by the launch's size.
    """
    n, k = weight.shape
    assert x.shape[-1] == k and weight.stride(-1) == 1
    if rms_eps is not None or gated:
        assert residual is None
        return _folded(x, weight, bias, config, rms_eps, gated)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
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
        grid_m, grid_n = triton.cdiv(m, cfg["block_m"] * m_tiles), triton.cdiv(n, cfg["block_n"])
        sms = launch.sm_count(x.device)
        parts = cfg.get("split") or (splits(n, k, cfg, sms) if x.is_cuda else 1)
        if _tma_form(x2, weight, cfg, parts):
            _linear_tma(x2, weight, bias, y, yr, config)
            return y.view(*lead, n)
        ks = triton.cdiv(triton.cdiv(k, cfg["block_k"]), parts) * cfg["block_k"]
        want = cfg.get("split_grid")
        if want is None:  # a choice of speed only: both ways give the same bits
            want = grid_m * grid_n < 4 * max(sms, 32)
        cnt = (_counters(x.device)
               if want and parts > 1 and grid_m * grid_n <= COUNTER_SLOTS else None)
        split_grid = cnt is not None
        ws = (torch.empty((parts, m, n), dtype=torch.float32, device=x.device) if split_grid
              else y)
        pdl = launch.enabled(x)
        _linear_kernel[(grid_m, grid_n, parts if split_grid else 1)](
            x2, weight, bias if bias is not None else weight, y, yr if yr is not None else y, ws,
            cnt if split_grid else y, m, n, k, ks,
            x2.stride(0), weight.stride(0), y.stride(0), yr.stride(0) if yr is not None else 0,
            HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, M_TILES=m_tiles,
            HAS_RES=yr is not None, SPLITS=parts, SPLIT_GRID=split_grid, PDL=pdl,
            PREFETCH=cfg["prefetch"] if pdl else 0, LINE=128 // weight.element_size(),
            BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch.options(pdl))
    return y.view(*lead, n)

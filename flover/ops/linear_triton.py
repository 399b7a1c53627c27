"""The batch-invariant matrix product y = x @ W^T (+ b) of `flover.ops.linear`, in Triton.

One launch configuration for every number of rows M: tiles of BLOCK_M rows by BLOCK_N
output features, the K axis walked from 0 in steps of BLOCK_K into one float32 accumulator,
no split-K. A row's output is therefore the same sequence of the same MMA instructions
whatever M is and whatever the other rows hold: bitwise the same alone or in any batch.
cuBLAS, by contrast, picks another kernel (and split-K) for each M.

Small BLOCK_N gives decode (M = 1..64) enough programs to stream the weight at full
bandwidth; the M tiles of one N tile are neighbours in the launch order, so for M > 16 they
read that weight tile from L2 rather than memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _linear_kernel(X, W, B, Y, M, N, K, sx_m, sw_n, sy_m,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)  # fastest: the M tiles of one N tile run side by side
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    x_ptr = X + rm.to(tl.int64)[:, None] * sx_m + rk[None, :]
    w_ptr = W + rn.to(tl.int64)[:, None] * sw_n + rk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + rk) < K
        x = tl.load(x_ptr + k0, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + k0, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if IEEE:  # float32 weights: full-precision products, as torch's default matmul
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptr = Y + rm.to(tl.int64)[:, None] * sy_m + rn[None, :]
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def default_config() -> dict:
    """Launch parameters for every M (never chosen from M: that is the invariance)."""
    return {"block_m": 16, "block_n": 32, "block_k": 256, "num_warps": 4, "num_stages": 4}


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
    cfg = default_config() | (config or {})
    grid = (triton.cdiv(m, cfg["block_m"]), triton.cdiv(n, cfg["block_n"]))
    _linear_kernel[grid](x2, weight, bias if bias is not None else weight, y, m, n, k,
                         x2.stride(0), weight.stride(0), y.stride(0),
                         HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                         BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
                         num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.view(*lead, n)

"""Fused elementwise kernels for the decode step: each replaces a chain of small launches.

References and dispatch live in `flover.fused`; these know nothing about models.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flover.ops import launch


@triton.jit
def _rms_norm_kernel(X, R, W, Y, S, stride_x, stride_r, stride_y, stride_s, n, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    launch.prior(PDL)
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    mask = c < n
    x = tl.load(X + row * stride_x + c, mask=mask, other=0.0)
    if HAS_RES:  # s = x + residual, rounded to the activations' dtype as the reference does
        x = (x.to(tl.float32) + tl.load(R + row * stride_r + c, mask=mask, other=0.0)
             .to(tl.float32)).to(x.dtype)
        tl.store(S + row * stride_s + c, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
    w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
    y = (xf * rstd).to(x.dtype).to(tl.float32) * w
    tl.store(Y + row * stride_y + c, y.to(Y.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, N] -> (weight * norm(s), s) where s = x + residual (or x)."""
    t, n = x.shape
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else x
    r = residual if residual is not None else x
    pdl = launch.enabled(x)
    _rms_norm_kernel[(t,)](x, r, weight, y, s, x.stride(0), r.stride(0), y.stride(0),
                           s.stride(0), n, eps, HAS_RES=residual is not None,
                           BLOCK=triton.next_power_of_2(n), PDL=pdl,
                           num_warps=8 if n >= 4096 else 4, **launch.options(pdl))
    return y, s


@triton.jit
def _silu_mul_kernel(GU, Y, stride_gu, stride_y, inter, BLOCK: tl.constexpr, PDL: tl.constexpr):
    launch.prior(PDL)
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < inter
    g = tl.load(GU + row * stride_gu + c, mask=mask, other=0.0)
    u = tl.load(GU + row * stride_gu + inter + c, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(Y + row * stride_y + c, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype),
             mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate then up) -> silu(gate) * up, [T, I]."""
    t, two_i = gate_up.shape
    inter = two_i // 2
    y = torch.empty((t, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    pdl = launch.enabled(gate_up)
    _silu_mul_kernel[(t, triton.cdiv(inter, block))](gate_up, y, gate_up.stride(0), y.stride(0),
                                                     inter, BLOCK=block, PDL=pdl, num_warps=4,
                                                     **launch.options(pdl))
    return y


@triton.jit
def _rotary_kernel(X, Y, Pos, Cos, Sin, sx_t, sx_h, sy_t, sy_h, s_cos,
                   D: tl.constexpr, ROT: tl.constexpr, INTERLEAVED: tl.constexpr,
                   BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    pos = tl.load(Pos + t)
    i = tl.arange(0, BLOCK_HALF)
    mask = i < ROT // 2
    c = tl.load(Cos + pos * s_cos + i, mask=mask, other=0.0)
    s = tl.load(Sin + pos * s_cos + i, mask=mask, other=0.0)
    x_row = X + t * sx_t + h * sx_h
    y_row = Y + t * sy_t + h * sy_h
    _rotate(x_row, y_row, c, s, i, mask, INTERLEAVED, ROT)
    if ROT < D:  # the channels past rot_dim pass through
        _copy(x_row, y_row, D, ROT, BLOCK_D)


def rotary(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           rot_dim: int, interleaved: bool) -> torch.Tensor:
    """x [T, heads, D] (any row strides) -> rotated copy, contiguous."""
    t, heads, d = x.shape
    assert x.stride(-1) == 1 and cos.stride(-1) == 1
    y = torch.empty((t, heads, d), dtype=x.dtype, device=x.device)
    _rotary_kernel[(t, heads)](x, y, positions, cos, sin, x.stride(0), x.stride(1), y.stride(0),
                               y.stride(1), cos.stride(0), D=d, ROT=rot_dim,
                               INTERLEAVED=interleaved,
                               BLOCK_HALF=triton.next_power_of_2(max(rot_dim // 2, 1)),
                               BLOCK_D=triton.next_power_of_2(max(d - rot_dim, 1)), num_warps=1)
    return y


@triton.jit
def _write_kv_kernel(K, V, KC, VC, Slots, Pos, sk_t, sk_h, sv_t, sv_h,
                     skc_s, skc_h, skc_l, svc_s, svc_h, svc_l,
                     D: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(Slots + t).to(tl.int64)
    pos = tl.load(Pos + t)
    d = tl.arange(0, BLOCK_D)
    mask = d < D
    k = tl.load(K + t * sk_t + h * sk_h + d, mask=mask)
    v = tl.load(V + t * sv_t + h * sv_h + d, mask=mask)
    tl.store(KC + slot * skc_s + h * skc_h + pos * skc_l + d, k.to(KC.dtype.element_ty), mask=mask)
    tl.store(VC + slot * svc_s + h * svc_h + pos * svc_l + d, v.to(VC.dtype.element_ty), mask=mask)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_ids: torch.Tensor, positions: torch.Tensor) -> None:
    """cache[slot_ids[t], :, positions[t]] = k[t] (and v), one launch for both."""
    t, hkv, d = k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1
    _write_kv_kernel[(t, hkv)](k, v, k_cache, v_cache, slot_ids, positions, k.stride(0),
                               k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0),
                               k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
                               v_cache.stride(1), v_cache.stride(2), D=d,
                               BLOCK_D=triton.next_power_of_2(d), num_warps=1)


@triton.jit
def _rotate(x_row, y_row, c, s, i, mask, INTERLEAVED: tl.constexpr, ROT: tl.constexpr):
    """One head's first ROT channels rotated in float32, rounded to x's dtype, stored in y's."""
    if INTERLEAVED:  # GPT-J: channel 2i with 2i+1
        ia, ib = 2 * i, 2 * i + 1
    else:  # LLaMA: channel i with i + ROT/2
        ia, ib = i, i + ROT // 2
    a = tl.load(x_row + ia, mask=mask, other=0.0)
    b = tl.load(x_row + ib, mask=mask, other=0.0)
    af, bf = a.to(tl.float32), b.to(tl.float32)
    out = y_row.dtype.element_ty
    tl.store(y_row + ia, (af * c - bf * s).to(a.dtype).to(out), mask=mask)
    tl.store(y_row + ib, (bf * c + af * s).to(a.dtype).to(out), mask=mask)


@triton.jit
def _copy(x_row, y_row, D, start: tl.constexpr, BLOCK: tl.constexpr):
    r = start + tl.arange(0, BLOCK)
    m = r < D
    tl.store(y_row + r, tl.load(x_row + r, mask=m, other=0.0).to(y_row.dtype.element_ty), mask=m)


@triton.jit
def _rotary_kv_kernel(Q, K, V, QO, KC, VC, Pos, Slots, Offs, Cos, Sin,
                      sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sqo_t, sqo_h,
                      skc_s, skc_h, skc_l, svc_s, svc_h, svc_l, s_cos, H,
                      D: tl.constexpr, ROT: tl.constexpr, INTERLEAVED: tl.constexpr,
                      BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_REST: tl.constexpr,
                      PDL: tl.constexpr):
    """Program (t, j): j < H rotates query head j into QO; j >= H rotates key head j - H and
    writes it, and the value head, to the cache at (Slots[t], head, Offs[t])."""
    launch.prior(PDL)
    t = tl.program_id(0)
    j = tl.program_id(1)
    pos = tl.load(Pos + t)
    i = tl.arange(0, BLOCK_HALF)
    mask = i < ROT // 2
    c = tl.load(Cos + pos * s_cos + i, mask=mask, other=0.0)
    s = tl.load(Sin + pos * s_cos + i, mask=mask, other=0.0)
    if j < H:
        src = Q + t * sq_t + j * sq_h
        dst = QO + t * sqo_t + j * sqo_h
        _rotate(src, dst, c, s, i, mask, INTERLEAVED, ROT)
        if ROT < D:  # the channels past rot_dim pass through
            _copy(src, dst, D, ROT, BLOCK_REST)
    else:
        h = j - H
        slot = tl.load(Slots + t).to(tl.int64)
        off = tl.load(Offs + t).to(tl.int64)
        src = K + t * sk_t + h * sk_h
        dst = KC + slot * skc_s + h * skc_h + off * skc_l
        _rotate(src, dst, c, s, i, mask, INTERLEAVED, ROT)
        if ROT < D:
            _copy(src, dst, D, ROT, BLOCK_REST)
        _copy(V + t * sv_t + h * sv_h, VC + slot * svc_s + h * svc_h + off * svc_l, D, 0, BLOCK_D)


def rotary_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
              cos: torch.Tensor, sin: torch.Tensor, rot_dim: int, interleaved: bool,
              k_cache: torch.Tensor, v_cache: torch.Tensor, slot_ids: torch.Tensor,
              offsets: torch.Tensor) -> torch.Tensor:
    """`rotary` of q and of k, and `write_kv` of the rotated k and of v, in one launch:
    q, k, v [T, heads, D] (any row strides); returns the rotated q, contiguous."""
    t, heads, d = q.shape
    hkv = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert cos.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    qo = torch.empty((t, heads, d), dtype=q.dtype, device=q.device)
    if t == 0:
        return qo
    pdl = launch.enabled(q)
    _rotary_kv_kernel[(t, heads + hkv)](
        q, k, v, qo, k_cache, v_cache, positions, slot_ids, offsets, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        qo.stride(0), qo.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), cos.stride(0), heads,
        D=d, ROT=rot_dim, INTERLEAVED=interleaved,
        BLOCK_HALF=triton.next_power_of_2(max(rot_dim // 2, 1)),
        BLOCK_D=triton.next_power_of_2(d),
        BLOCK_REST=triton.next_power_of_2(max(d - rot_dim, 1)), PDL=pdl, num_warps=1,
        **launch.options(pdl))
    return qo

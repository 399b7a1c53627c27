"""Decode attention over the paged KV cache: one query token per row, GQA-aware, split by position.

Same function as `flover.ops.attention.paged_decode_attention_ref`: row b reads its blocks
`block_tables[b]` of the cache [blocks, Hkv, block_size, D], positions < lengths[b].
Two launches, as `attention_triton`:
1. grid (rows, kv heads, splits): a row of length L is cut into at most MAX_SPLITS splits of
   `split_len(L)` positions (a multiple of BLOCK_N, at least MIN_SPLIT); each program scores
   BLOCK_N positions at a time against every query head of its kv head's group (looking each
   position's block up in the row's table), keeping an online softmax, and writes a partial
   output and its log-sum-exp. Splits past a row's length stop at once.
2. grid (rows, heads): combines the row's splits in split order by their log-sum-exp.
The split length is a function of the row's own length, never of the batch: a row's
reduction order is the same whatever rows run beside it (issue #11's batch invariance), and
short rows still spread over several programs (B=1) while long batches launch at most
MAX_SPLITS programs per row and kv head. `max_len` only bounds the grid, so a CUDA graph
captures max_len = max_seq_len and replays with any lengths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_SPLIT = 128  # positions: a multiple of every BLOCK_N used
MAX_SPLITS = 8


def split_len(length: int, block_n: int = 64, min_split: int = MIN_SPLIT,
              max_splits: int = MAX_SPLITS) -> int:
    """The split length of a row of `length` positions (the kernel computes the same)."""
    per = -(-length // max_splits)
    return max(min_split, -(-per // block_n) * block_n)


@triton.jit
def _paged_split_kernel(Q, K, V, Tables, Lens, OutPart, LsePart,
                        sq_b, sq_h, sk_n, sk_h, sk_l, sv_n, sv_h, sv_l, st_b,
                        so_b, so_h, so_s, sl_b, sl_h, scale,
                        D: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
                        BS: tl.constexpr, MIN_SPLIT: tl.constexpr, MAX_SPLITS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    length = tl.load(Lens + b).to(tl.int32)
    split = tl.maximum(MIN_SPLIT, tl.cdiv(tl.cdiv(length, MAX_SPLITS), BLOCK_N) * BLOCK_N)
    start = sp * split
    end = tl.minimum(start + split, length)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    mask_g = g < G
    mask_d = d < D
    heads = kvh * G + g
    q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    s_exp = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = Tables + b.to(tl.int64) * st_b
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask_n = n < end
        blk = tl.load(table + n // BS, mask=mask_n, other=0).to(tl.int64)
        row_k = blk * sk_n + kvh * sk_h + (n % BS) * sk_l
        row_v = blk * sv_n + kvh * sv_h + (n % BS) * sv_l
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + row_k[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + row_v[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k).to(q.dtype))
        s = tl.where(mask_n[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        s_exp = s_exp * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

    nonempty = s_exp > 0
    out = acc / tl.where(nonempty, s_exp, 1.0)[:, None]
    lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, s_exp, 1.0)), float("-inf"))
    o_ptr = OutPart + b * so_b + heads[:, None] * so_h + sp * so_s + d[None, :]
    tl.store(o_ptr, out, mask=mask_g[:, None] & mask_d[None, :])
    tl.store(LsePart + b * sl_b + heads * sl_h + sp, lse, mask=mask_g)


@triton.jit
def _combine_kernel(OutPart, LsePart, Out, Lens, so_b, so_h, so_s, sl_b, sl_h, sout_b, sout_h,
                    D: tl.constexpr, MIN_SPLIT: tl.constexpr, MAX_SPLITS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Splits folded one by one in split order, only those the row's length reaches: the
    same sequence of operations whatever the number of splits launched."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    mask_d = d < D
    length = tl.load(Lens + b).to(tl.int32)
    split = tl.maximum(MIN_SPLIT, tl.cdiv(tl.cdiv(length, MAX_SPLITS), BLOCK_N) * BLOCK_N)
    used = tl.cdiv(length, split)
    m = tl.load(LsePart + b * sl_b + h * sl_h)  # split 0 is never empty: lengths >= 1
    acc = tl.load(OutPart + b * so_b + h * so_h + d, mask=mask_d, other=0.0)
    w = 1.0
    for s in range(1, used):
        lse = tl.load(LsePart + b * sl_b + h * sl_h + s)
        o = tl.load(OutPart + b * so_b + h * so_h + s * so_s + d, mask=mask_d, other=0.0)
        m_new = tl.maximum(m, lse)
        a, e = tl.exp(m - m_new), tl.exp(lse - m_new)
        acc = acc * a + o * e
        w = w * a + e
        m = m_new
    tl.store(Out + b * sout_b + h * sout_h + d, (acc / w).to(Out.dtype.element_ty), mask=mask_d)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, lengths: torch.Tensor, max_len: int,
                           scale: float, block_n: int = 64, min_split: int = MIN_SPLIT,
                           max_splits: int = MAX_SPLITS) -> torch.Tensor:
    """q [B, H, D]; row b reads blocks block_tables[b] of the cache [N, Hkv, bs, D] up to lengths[b]."""
    b, h, d = q.shape
    _, hkv, bs, _ = k_cache.shape
    assert h % hkv == 0 and k_cache.shape[-1] == d and min_split % block_n == 0
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache rows must be contiguous"
    assert block_tables.stride(-1) == 1
    group = h // hkv
    splits = min(max_splits, triton.cdiv(max_len, min_split))  # the most any row < max_len uses
    block_d = triton.next_power_of_2(d)
    part = torch.empty((b, h, splits, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((b, h, splits), dtype=torch.float32, device=q.device)
    _paged_split_kernel[(b, hkv, splits)](
        q, k_cache, v_cache, block_tables, lengths, part, lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1), scale,
        D=d, G=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BS=bs, MIN_SPLIT=min_split,
        MAX_SPLITS=max_splits, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=2)
    out = torch.empty_like(q)
    _combine_kernel[(b, h)](part, lse, out, lengths, part.stride(0), part.stride(1),
                            part.stride(2), lse.stride(0), lse.stride(1), out.stride(0),
                            out.stride(1), D=d, MIN_SPLIT=min_split, MAX_SPLITS=max_splits,
                            BLOCK_N=block_n, BLOCK_D=block_d, num_warps=1)
    return out

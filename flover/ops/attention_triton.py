"""Decode attention over the slot KV cache: one query token per row, split-K, GQA-aware.

Same function as `flover.ops.attention.decode_attention_ref`: row b attends to slot b of the
cache, positions < lengths[b]. Two launches:
1. grid (rows, kv heads, splits): each program loads one K/V block of its split once and
   scores it against every query head of the kv head's group (GQA: no re-reads), keeping an
   online softmax; it writes a partial output and its log-sum-exp. A program whose split
   starts past its row's length stops at once, so rows cost their own length, not max_len.
2. grid (rows, heads): combines the splits by their log-sum-exp.
`max_len` only sets the number of splits, so a CUDA graph can capture max_len = max_seq_len
and replay with any per-row lengths.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from flover.ops import launch


@triton.jit
def _run(Lens, Slots, b, T, TOKENS: tl.constexpr):
    """The tokens program b does: token b and those after it in its window of TOKENS tokens
    (the window b // TOKENS) that read the same slot at consecutive lengths (a prompt's
    tokens), as (count, token b's length). count is 0 where token b belongs to its
    predecessor's run: that program does its rows. Every token is in exactly one run."""
    i = tl.arange(0, TOKENS)
    tok = b + i
    ok = ((b % TOKENS) + i < TOKENS) & (tok < T)
    slots = tl.load(Slots + tok, mask=ok, other=-1)
    lens = tl.load(Lens + tok, mask=ok, other=0).to(tl.int32)
    slot0 = tl.load(Slots + b)
    len0 = tl.load(Lens + b).to(tl.int32)
    inner = b % TOKENS != 0  # a window's first token always leads
    prev_slot = tl.load(Slots + b - 1, mask=inner, other=-1)
    prev_len = tl.load(Lens + b - 1, mask=inner, other=0).to(tl.int32)
    run = ok & (slots == slot0) & (lens == len0 + i)
    count = tl.min(tl.where(run, TOKENS, i), axis=0)  # the first token past the run
    led = (prev_slot != slot0) | (prev_len + 1 != len0)
    return tl.where(led, count, 0), len0


@triton.jit
def _tile(Q, K, V, OutPart, LsePart, sq_b, sq_h, sk_s, sk_h, sk_l, sv_s, sv_h, sv_l,
          so_b, so_h, so_s, sl_b, sl_h, split_len, scale, b, kvh, sp, slot, len0, count,
          D: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_D: tl.constexpr, TOKENS: tl.constexpr, Table=None, BS: tl.constexpr = 0):
    """Split sp (of split_len positions) of kv head kvh for the `count` tokens from token b
    (their lengths len0, len0 + 1, ...; all of slot `slot`, or with BS > 0 of the paged
    cache's blocks of BS positions listed at Table): a partial output and log-sum-exp per
    row.

    The BLOCK_G rows are TOKENS tokens x BLOCK_G // TOKENS padded heads, so each K/V tile is
    read once for up to TOKENS tokens instead of once per token. A row's bits do not depend
    on the other rows of its tile: each output element of tl.dot is its own row's sum,
    scores past a row's own length are -inf (p = 0), and a block wholly past it leaves the
    row's state as it was (`where`, not arithmetic), so a token's result is the same as when
    it runs alone as a decode row (one token, in this same compiled kernel). What the shorter
    rows of a run do see: the longer rows' keys and values, which this iteration wrote (the
    run's lengths are consecutive), multiplied by an exact 0, which can differ only in the
    sign of an exact zero sum (equal under ==) or, should the model have overflowed there,
    make a NaN of a non-finite value."""
    length = len0 + count - 1  # the run's longest row
    start = sp * split_len
    end = tl.minimum(start + split_len, length)

    GP: tl.constexpr = BLOCK_G // TOKENS  # rows per token
    r = tl.arange(0, BLOCK_G)
    j = r // GP  # the row's token: b + j
    g = r % GP
    d = tl.arange(0, BLOCK_D)
    mask_g = (g < G) & (j < count)
    mask_d = d < D
    heads = kvh * G + g
    row_end = tl.minimum(start + split_len, tl.where(j < count, len0 + j, 0))
    # rows with nothing in this split (padding, or a run's shorter rows) score the whole
    # range, never update (below) and so stay empty, without a NaN from -inf - -inf
    score_end = tl.where(row_end > start, row_end, end)
    q = tl.load(Q + (b + j)[:, None] * sq_b + heads[:, None] * sq_h + d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    s_exp = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base = K + slot * sk_s + kvh * sk_h
    v_base = V + slot * sv_s + kvh * sv_h
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask_n = n < end
        kv_mask = mask_n[:, None] & mask_d[None, :]
        if BS > 0:  # each position's block from the table
            blk = tl.load(Table + n // BS, mask=mask_n, other=0).to(tl.int64)
            row_k = blk * sk_s + kvh * sk_h + (n % BS) * sk_l
            row_v = blk * sv_s + kvh * sv_h + (n % BS) * sv_l
            k = tl.load(K + row_k[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + row_v[:, None] + d[None, :], mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_base + n[:, None] * sk_l + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + n[:, None] * sv_l + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k).to(q.dtype))
        if TOKENS > 1:
            s = tl.where(n[None, :] < score_end[:, None], s * scale, float("-inf"))
        else:
            s = tl.where(mask_n[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        if TOKENS > 1:  # rows whose positions ended before this block keep their state
            on = n0 < row_end
            s_exp = tl.where(on, s_exp * alpha + tl.sum(p, axis=1), s_exp)
            acc = tl.where(on[:, None], acc * alpha[:, None] + tl.dot(p.to(v.dtype), v), acc)
            m = tl.where(on, m_new, m)
        else:
            s_exp = s_exp * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new

    nonempty = s_exp > 0
    out = acc / tl.where(nonempty, s_exp, 1.0)[:, None]
    lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, s_exp, 1.0)), float("-inf"))
    rows = b + j
    o_ptr = OutPart + rows[:, None] * so_b + heads[:, None] * so_h + sp * so_s + d[None, :]
    tl.store(o_ptr, out, mask=mask_g[:, None] & mask_d[None, :])
    tl.store(LsePart + rows * sl_b + heads * sl_h + sp, lse, mask=mask_g)


@triton.jit
def _split_kernel(Q, K, V, Lens, OutPart, LsePart, Slots,
                  sq_b, sq_h, sk_s, sk_h, sk_l, sv_s, sv_h, sv_l,
                  so_b, so_h, so_s, sl_b, sl_h,
                  split_len, scale,
                  D: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SLOTS: tl.constexpr,
                  PDL: tl.constexpr = False, SKIP_EMPTY: tl.constexpr = False,
                  TOKENS: tl.constexpr = 1):
    """Grid (tokens, kv heads, splits): a group of G query heads per program, padded to
    BLOCK_G >= 16 rows for tl.dot (`_tile`). Row b reads slot b, or slot Slots[b] with
    HAS_SLOTS. SKIP_EMPTY: a program whose split starts at or past its row's length writes
    nothing (for a merge that reads only the splits the length reaches: a graph's grid,
    sized by max_seq_len, is mostly such programs). TOKENS > 1 (with HAS_SLOTS): program b
    does the run of a prompt's consecutive tokens that `_run` gives it (none if token b is
    in its predecessor's run)."""
    launch.prior(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    if TOKENS > 1:
        count, len0 = _run(Lens, Slots, b, tl.num_programs(0), TOKENS)
        if count == 0:
            return
    else:
        count = 1
        len0 = tl.load(Lens + b).to(tl.int32)
    if HAS_SLOTS:
        slot = tl.load(Slots + b).to(tl.int64)
    else:
        slot = b.to(tl.int64)
    if SKIP_EMPTY and sp * split_len >= len0 + count - 1:
        return
    _tile(Q, K, V, OutPart, LsePart, sq_b, sq_h, sk_s, sk_h, sk_l, sv_s, sv_h, sv_l,
          so_b, so_h, so_s, sl_b, sl_h, split_len, scale, b, kvh, sp, slot, len0, count,
          D, G, BLOCK_G, BLOCK_N, BLOCK_D, TOKENS)


@triton.jit
def _items_kernel(Slots, Lens, Pos, Items, NumItems, T, split_len, num_splits,
                  TOKENS: tl.constexpr,
                  HAS_POS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
                  PDL: tl.constexpr):
    """One program: the work of `_split_items_kernel`, one item per (run, split) that the
    run's longest row reaches, in token order: [b, split * 32 + count, slot, len0] each, and
    their number. Runs as `_run` forms them; with HAS_POS a token whose length is not its
    position + 1 (a graph's padding token) takes no part. At most num_splits splits a run
    (the partials' size, sized by max_len): a length past max_len cannot write past them."""
    launch.prior(PDL)
    base = tl.full([], 0, tl.int32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = t < T
        slot = tl.load(Slots + t, mask=ok, other=-1)
        len0 = tl.load(Lens + t, mask=ok, other=0).to(tl.int32)
        inner = ok & (t % TOKENS != 0)
        prev_slot = tl.load(Slots + t - 1, mask=inner, other=-1)
        prev_len = tl.load(Lens + t - 1, mask=inner, other=0).to(tl.int32)
        real = ok & (len0 > 0)
        prev_real = inner
        if HAS_POS:
            real = real & (len0 == tl.load(Pos + t, mask=ok, other=-2).to(tl.int32) + 1)
            prev_pos = tl.load(Pos + t - 1, mask=inner, other=-2).to(tl.int32)
            prev_real = prev_real & (prev_len == prev_pos + 1)
        lead = real & (~prev_real | (prev_slot != slot) | (prev_len + 1 != len0))
        i = tl.arange(0, TOKENS)
        tok = t[:, None] + i[None, :]
        in_run = ok[:, None] & ((t % TOKENS)[:, None] + i[None, :] < TOKENS) & (tok < T)
        slots = tl.load(Slots + tok, mask=in_run, other=-1)
        lens = tl.load(Lens + tok, mask=in_run, other=0).to(tl.int32)
        in_run = in_run & (slots == slot[:, None]) & (lens == len0[:, None] + i[None, :])
        if HAS_POS:
            in_run = in_run & (lens == tl.load(Pos + tok, mask=in_run, other=-2).to(tl.int32) + 1)
        count = tl.min(tl.where(in_run, TOKENS, i[None, :]), axis=1)
        splits = tl.where(lead, tl.minimum(tl.cdiv(len0 + count - 1, split_len), num_splits), 0)
        first = base + tl.cumsum(splits, axis=0) - splits
        for s0 in range(0, tl.max(splits, axis=0), BLOCK_S):
            sp = s0 + tl.arange(0, BLOCK_S)
            put = sp[None, :] < splits[:, None]
            at = Items + (first[:, None] + sp[None, :]) * 4
            tl.store(at, tl.broadcast_to(t[:, None], (BLOCK_T, BLOCK_S)), mask=put)
            tl.store(at + 1, sp[None, :] * 32 + count[:, None], mask=put)
            tl.store(at + 2, tl.broadcast_to(slot[:, None].to(tl.int32), (BLOCK_T, BLOCK_S)),
                     mask=put)
            tl.store(at + 3, tl.broadcast_to(len0[:, None], (BLOCK_T, BLOCK_S)), mask=put)
        base += tl.sum(splits, axis=0)
    tl.store(NumItems, base)


@triton.jit
def _split_items_kernel(Q, K, V, Items, NumItems, OutPart, LsePart,
                        sq_b, sq_h, sk_s, sk_h, sk_l, sv_s, sv_h, sv_l,
                        so_b, so_h, so_s, sl_b, sl_h, split_len, scale,
                        D: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TOKENS: tl.constexpr,
                        PDL: tl.constexpr):
    """Grid (programs, kv heads), persistent: program p does items p, p + programs, ... of
    `_items_kernel`'s list, so no program is launched for a split past its row's length or
    for a token that another program's run holds (a graph's grid is otherwise sized by
    max_seq_len and by every token)."""
    launch.prior(PDL)
    kvh = tl.program_id(1)
    f = tl.arange(0, 4)
    for it in range(tl.program_id(0), tl.load(NumItems), tl.num_programs(0)):
        rec = tl.load(Items + it * 4 + f)
        b = tl.sum(tl.where(f == 0, rec, 0), axis=0)
        packed = tl.sum(tl.where(f == 1, rec, 0), axis=0)
        slot = tl.sum(tl.where(f == 2, rec, 0), axis=0).to(tl.int64)
        len0 = tl.sum(tl.where(f == 3, rec, 0), axis=0)
        _tile(Q, K, V, OutPart, LsePart, sq_b, sq_h, sk_s, sk_h, sk_l, sv_s, sv_h, sv_l,
              so_b, so_h, so_s, sl_b, sl_h, split_len, scale, b, kvh, packed // 32, slot,
              len0, packed % 32, D, G, BLOCK_G, BLOCK_N, BLOCK_D, TOKENS)


@triton.jit
def _split_kernel_mha(Q, K, V, Lens, OutPart, LsePart, Slots,
                      sq_b, sq_h, sk_s, sk_h, sk_l, sv_s, sv_h, sv_l,
                      so_b, so_h, so_s, sl_b, sl_h,
                      split_len, scale,
                      D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One query head per KV head (G = 1): plain 2-D tiles, no padding of the head group."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    length = tl.load(Lens + b).to(tl.int32)
    start = sp * split_len
    end = tl.minimum(start + split_len, length)
    d = tl.arange(0, BLOCK_D)
    mask_d = d < D
    q = tl.load(Q + b * sq_b + h * sq_h + d, mask=mask_d, other=0.0).to(tl.float32)
    m = float("-inf")
    s_exp = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    k_base = K + b.to(tl.int64) * sk_s + h * sk_h
    v_base = V + b.to(tl.int64) * sv_s + h * sv_h
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask_n = n < end
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + n[:, None] * sk_l + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + n[:, None] * sv_l + d[None, :], mask=kv_mask, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        s = tl.where(mask_n, s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        s_exp = s_exp * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m = m_new
    nonempty = s_exp > 0
    out = acc / tl.where(nonempty, s_exp, 1.0)
    lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, s_exp, 1.0)), float("-inf"))
    tl.store(OutPart + b * so_b + h * so_h + sp * so_s + d, out, mask=mask_d)
    tl.store(LsePart + b * sl_b + h * sl_h + sp, lse)


@triton.jit
def _combine_kernel(OutPart, LsePart, Out, so_b, so_h, so_s, sl_b, sl_h, sout_b, sout_h,
                    num_splits, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    mask_s = s < num_splits
    lse = tl.load(LsePart + b * sl_b + h * sl_h + s, mask=mask_s, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, axis=0))  # split 0 is never empty: lengths >= 1
    o = tl.load(OutPart + b * so_b + h * so_h + s[:, None] * so_s + d[None, :],
                mask=mask_s[:, None] & (d < D)[None, :], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(Out + b * sout_b + h * sout_h + d, out.to(Out.dtype.element_ty), mask=d < D)


def _num_splits(rows: int, kv_heads: int, max_len: int, block_n: int, target: int) -> int:
    """About `target` programs (a large GPU has ~132 SMs), no split shorter than a block."""
    want = triton.cdiv(target, rows * kv_heads)
    return max(1, min(want, triton.cdiv(max_len, block_n), 64))


def default_config(group: int, head_dim: int) -> dict:
    """Launch parameters picked by `bench/attention.py --sweep` on an H200 (docs/PERF.md):
    the padded tl.dot path beat the 2-D tiles for G = 1 too (74 vs 107 us, LLaMA-7B, B=32)."""
    wide = triton.next_power_of_2(head_dim) >= 256
    return {"mha_2d": False, "block_n": 32 if wide else 64, "num_warps": 4, "num_stages": 2,
            "target": 512}


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     lengths: torch.Tensor, max_len: int, scale: float,
                     config: dict | None = None) -> torch.Tensor:
    """q [B, H, D] against slots 0..B-1 of the cache [S, Hkv, L, D], each row up to its length."""
    b, h, d = q.shape
    hkv = k_cache.shape[1]
    assert h % hkv == 0 and k_cache.shape[-1] == d and b <= k_cache.shape[0]
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache rows must be contiguous"
    group = h // hkv
    cfg = default_config(group, d) | (config or {})
    mha_2d = cfg["mha_2d"] and group == 1
    block_d = triton.next_power_of_2(d)
    block_n = cfg["block_n"]
    splits = _num_splits(b, hkv, max_len, block_n, cfg["target"])
    split_len = triton.cdiv(triton.cdiv(max_len, splits), block_n) * block_n
    splits = triton.cdiv(max_len, split_len)

    part = torch.empty((b, h, splits, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((b, h, splits), dtype=torch.float32, device=q.device)
    args = (q, k_cache, v_cache, lengths, part, lse, lengths,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
            split_len, scale)
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if mha_2d:
        _split_kernel_mha[(b, h, splits)](*args, D=d, BLOCK_N=block_n, BLOCK_D=block_d, **opts)
    else:
        block_g = max(16, triton.next_power_of_2(group))
        _split_kernel[(b, hkv, splits)](*args, D=d, G=group, BLOCK_G=block_g, BLOCK_N=block_n,
                                        BLOCK_D=block_d, HAS_SLOTS=False, **opts)
    out = torch.empty_like(q)
    _combine_kernel[(b, h)](
        part, lse, out, part.stride(0), part.stride(1), part.stride(2), lse.stride(0),
        lse.stride(1), out.stride(0), out.stride(1), splits, D=d,
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d, num_warps=4)
    return out


# --- batch-invariant attention: the KV split fixed by position --------------------------------

SPLIT_LEN = 128  # positions per split: fixed, never chosen from the batch or from max_len
# row_attention's persistent form (a list of the work, walked by a fixed grid): built
# 2026-12-08 without a GPU, so off until measured (FLOVER_ATTN_ITEMS=1 turns it on)
PERSISTENT = os.environ.get("FLOVER_ATTN_ITEMS", "0") == "1"


MERGE_SPLITS = 16  # splits a merge program loads at once (2,048 positions at SPLIT_LEN)


@triton.jit
def _load_splits(lse_row, o_row, s0, n, so_s, sp, d, mask_d):
    """Splits s0 + sp (those < n) of a merge's row: their log-sum-exps and partial outputs,
    in one round trip."""
    live = s0 + sp < n
    lses = tl.load(lse_row + s0 + sp, mask=live, other=float("-inf"))
    parts = tl.load(o_row + (s0 + sp)[:, None] * so_s + d[None, :],
                    mask=live[:, None] & mask_d[None, :], other=0.0)
    return lses, parts


@triton.jit
def _split_at(lses, parts, sp, i):
    """Split i's log-sum-exp and partial output, taken out of the loaded ones exactly (a max
    over -inf)."""
    lse = tl.max(tl.where(sp == i, lses, float("-inf")), axis=0)
    return lse, tl.max(tl.where((sp == i)[:, None], parts, float("-inf")), axis=0)


@triton.jit
def _ordered_combine_kernel(OutPart, LsePart, Lens, Pos, Out, so_b, so_h, so_s, sl_b, sl_h,
                            sout_b, sout_h, split_len, num_splits, D: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                            HAS_POS: tl.constexpr, PDL: tl.constexpr):
    """Row b's own splits (those its length reaches, at most the num_splits there are)
    merged for head h one by one, in position order. With HAS_POS a row whose length is not
    its position + 1 (a graph's padding token, which `_items_kernel` gives no work) gets
    zeros. The splits' log-sum-exps and partial outputs are loaded BLOCK_S at a time (one
    memory round trip where the merge used to wait for two loads per split), then merged
    one by one from registers, each split's values taken out exactly (a max over -inf): the
    same operations in the same order as loading them one by one."""
    launch.prior(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    sp = tl.arange(0, BLOCK_S)
    mask_d = d < D
    length = tl.load(Lens + b).to(tl.int32)
    n = tl.minimum(tl.cdiv(length, split_len), num_splits)
    if HAS_POS:
        n = tl.where(length == tl.load(Pos + b).to(tl.int32) + 1, n, 0)
    lse_row = LsePart + b * sl_b + h * sl_h
    o_row = OutPart + b * so_b + h * so_h
    m = tl.full([], float("-inf"), tl.float32)
    for s0 in range(0, n, BLOCK_S):
        m = tl.maximum(m, tl.max(tl.load(lse_row + s0 + sp, mask=s0 + sp < n,
                                         other=float("-inf")), axis=0))
    acc = tl.zeros([BLOCK_D], tl.float32)
    den = tl.full([], 0.0, tl.float32)
    for s0 in range(0, n, BLOCK_S):
        lses, parts = _load_splits(lse_row, o_row, s0, n, so_s, sp, d, mask_d)
        for i in range(0, tl.minimum(BLOCK_S, n - s0)):
            lse, o = _split_at(lses, parts, sp, i)
            w = tl.exp(lse - m)
            acc += w * o
            den += w
    out = tl.where(n > 0, acc / tl.where(n > 0, den, 1.0), 0.0)
    tl.store(Out + b * sout_b + h * sout_h + d, out.to(Out.dtype.element_ty), mask=mask_d)


def row_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slots: torch.Tensor, lengths: torch.Tensor, max_len: int, scale: float,
                  config: dict | None = None, positions: torch.Tensor | None = None,
                  plan: dict | None = None) -> torch.Tensor:
    """q [T, H, D]: token t attends to slot slots[t] of the cache [S, Hkv, L, D], positions
    < lengths[t]. Batch-invariant: token t's result depends on its query, its slot's cache
    and its length only. The KV range is split every SPLIT_LEN positions from 0 (each split
    walked in BLOCK_N steps from its start) and a second kernel merges the splits in position
    order, so neither the other tokens nor `max_len` (which only sizes the grid) change a bit
    of it.
    A prompt's tokens use it too, each its own row: a token's attention is then the same
    whether its prompt is prefilled whole, in chunks, alone or beside decode rows. Up to
    `tokens` consecutive tokens of a prompt (16 for multi-head attention, 16 // group for
    GQA) share a program's tile, so a long prompt reads each K/V tile once per 16 tokens,
    not once per token; a row's bits do not depend on its tile-mates (`_tile`).

    config "persistent" (`PERSISTENT`): instead of a grid of every (token, kv head, split),
    `_items_kernel` lists the (run, split) pairs that have work and a fixed number of
    programs per kv head walk that list (`_split_items_kernel`); the same `_tile` per item.
    `positions` (each token's): a token whose length is not its position + 1 (a graph's
    padding) then gets no work and zeros. `plan`: a dict kept for one forward (the
    iteration's `AttentionMetadata.row_plan`), where the list is built by the first layer
    and read by the others."""
    t, h, d = q.shape
    hkv = k_cache.shape[1]
    assert h % hkv == 0 and k_cache.shape[-1] == d
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache rows must be contiguous"
    cfg = default_config(h // hkv, d) | (config or {})
    split_len = cfg.get("split_len", SPLIT_LEN)
    block_n = cfg["block_n"]
    assert split_len % block_n == 0
    splits = max(1, triton.cdiv(max_len, split_len))
    group = h // hkv
    block_g = max(16, triton.next_power_of_2(group))
    # a prompt's consecutive tokens share the tile's rows (one K/V read for all of them)
    tokens = cfg.get("tokens", block_g // triton.next_power_of_2(group))
    assert tokens >= 1 and block_g % tokens == 0 and block_g // tokens >= group
    # long prompts: slices of tokens, so that the float32 partials stay under ~256 MB
    step = max(1, cfg.get("max_partials", 64 << 20) // (h * splits * d))
    if t > step:
        plan = {} if plan is None else plan
        return torch.cat([row_attention(q[i:i + step], k_cache, v_cache, slots[i:i + step],
                                        lengths[i:i + step], max_len, scale, config,
                                        None if positions is None else positions[i:i + step],
                                        plan.setdefault(i, {}))
                          for i in range(0, t, step)])
    block_d = triton.next_power_of_2(d)
    part = torch.empty((t, h, splits, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((t, h, splits), dtype=torch.float32, device=q.device)
    pdl = launch.enabled(q)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
               k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
               part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
               split_len, scale)
    tile = {"D": d, "G": group, "BLOCK_G": block_g, "BLOCK_N": block_n, "BLOCK_D": block_d,
            "TOKENS": tokens, "PDL": pdl, "num_warps": cfg["num_warps"],
            "num_stages": cfg["num_stages"]} | launch.options(pdl)
    persistent = cfg.get("persistent", PERSISTENT)
    if persistent:
        plan = {} if plan is None else plan
        if "items" not in plan:  # the first layer of the forward lists the work
            items = torch.empty((t * splits, 4), dtype=torch.int32, device=q.device)
            count = torch.empty(1, dtype=torch.int32, device=q.device)
            _items_kernel[(1,)](slots, lengths, lengths if positions is None else positions,
                                items, count, t, split_len, splits, TOKENS=tokens,
                                HAS_POS=positions is not None, BLOCK_T=128, BLOCK_S=16, PDL=pdl,
                                num_warps=4, **launch.options(pdl))
            plan["items"] = items, count
        items, count = plan["items"]
        programs = cfg.get("programs") or max(1, 4 * launch.sm_count(q.device) // hkv)
        _split_items_kernel[(min(programs, t * splits), hkv)](
            q, k_cache, v_cache, items, count, part, lse, *strides, **tile)
    else:
        _split_kernel[(t, hkv, splits)](
            q, k_cache, v_cache, lengths, part, lse, slots, *strides, HAS_SLOTS=True,
            SKIP_EMPTY=cfg.get("skip_empty", True), **tile)
    out = torch.empty_like(q)
    has_pos = persistent and positions is not None
    _ordered_combine_kernel[(t, h)](
        part, lse, lengths, positions if has_pos else lengths, out, part.stride(0),
        part.stride(1), part.stride(2), lse.stride(0), lse.stride(1), out.stride(0),
        out.stride(1), split_len, splits, D=d, BLOCK_D=block_d,
        BLOCK_S=cfg.get("merge_splits", MERGE_SPLITS),
        HAS_POS=has_pos, PDL=pdl, num_warps=4,
        **launch.options(pdl))
    return out

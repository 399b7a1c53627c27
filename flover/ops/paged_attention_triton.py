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

from flover.ops.attention_triton import _load_splits, _split_at, _tile

MIN_SPLIT = 128  # positions: a multiple of every BLOCK_N used
MAX_SPLITS = 8
# K/V positions per step, and whether a prompt's consecutive tokens share a tile (16 // the
# GQA group of them) or each has its own. Compiled for sm_90a (bench/sm90_codegen.py) the
# kernel spills 472 bytes a thread at blocks of 64 (triton 3.6; 1,020 with the shared tile)
# and none at blocks of 32; until `bench/attention.py --forms` times these on a GPU, the
# layout keeps the configuration it was measured with: blocks of 64, a tile per token.
BLOCK_N = 64
SHARED_TILE = False


def split_len(length: int, block_n: int = BLOCK_N, min_split: int = MIN_SPLIT,
              max_splits: int = MAX_SPLITS) -> int:
    """The split length of a row of `length` positions (the kernel computes the same)."""
    per = -(-length // max_splits)
    return max(min_split, -(-per // block_n) * block_n)


@triton.jit
def _split_of(length, MIN_SPLIT: tl.constexpr, MAX_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """`split_len` in the kernels."""
    return tl.maximum(MIN_SPLIT, tl.cdiv(tl.cdiv(length, MAX_SPLITS), BLOCK_N) * BLOCK_N)


@triton.jit
def _paged_run(Tables, Lens, b, T, st_b, width, BS: tl.constexpr, MIN_SPLIT: tl.constexpr,
               MAX_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, TOKENS: tl.constexpr):
    """As `attention_triton._run` for the paged layout: token b and those after it in its
    window of TOKENS tokens of its request at consecutive lengths and of its split length,
    as (count, token b's length); count 0 where token b is in its predecessor's run. Rows
    have no request id here: a token is of row b's request when the block holding its newest
    position (written this iteration, so the request's own, never a shared prefix block) is
    the block row b's table lists there."""
    i = tl.arange(0, TOKENS)
    tok = b + i
    ok = ((b % TOKENS) + i < TOKENS) & (tok < T)
    len0 = tl.load(Lens + b).to(tl.int32)
    lens = tl.load(Lens + tok, mask=ok, other=0).to(tl.int32)
    at = (lens - 1) // BS
    ok = ok & (lens > 0) & (at < width)
    own = tl.load(Tables + tok.to(tl.int64) * st_b + at, mask=ok, other=-1)
    mine = tl.load(Tables + b.to(tl.int64) * st_b + at, mask=ok, other=-2)
    split0 = _split_of(len0, MIN_SPLIT, MAX_SPLITS, BLOCK_N)
    run = ok & (lens == len0 + i) & (own == mine)
    run = run & (_split_of(lens, MIN_SPLIT, MAX_SPLITS, BLOCK_N) == split0)
    count = tl.min(tl.where(run, TOKENS, i), axis=0)  # the first token past the run
    # token b continues its predecessor's run?
    inner = b % TOKENS != 0
    prev_len = tl.load(Lens + b - 1, mask=inner, other=0).to(tl.int32)
    at0 = (len0 - 1) // BS
    both = inner & (at0 < width)
    own0 = tl.load(Tables + b.to(tl.int64) * st_b + at0, mask=both, other=-1)
    prev = tl.load(Tables + (b - 1).to(tl.int64) * st_b + at0, mask=both, other=-2)
    joined = (both & (prev_len + 1 == len0) & (own0 == prev)
              & (_split_of(prev_len, MIN_SPLIT, MAX_SPLITS, BLOCK_N) == split0))
    return tl.where(joined, 0, count), len0


@triton.jit
def _paged_split_kernel(Q, K, V, Tables, Lens, OutPart, LsePart,
                        sq_b, sq_h, sk_n, sk_h, sk_l, sv_n, sv_h, sv_l, st_b, width,
                        so_b, so_h, so_s, sl_b, sl_h, scale,
                        D: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
                        BS: tl.constexpr, MIN_SPLIT: tl.constexpr, MAX_SPLITS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TOKENS: tl.constexpr):
    """Grid (rows, kv heads, splits): the tile of `attention_triton._tile` over the row's
    blocks; with TOKENS > 1 program b does the run `_paged_run` gives it (a prompt's
    consecutive tokens share the tile: one K/V read for all of them). A split past the run's
    longest row writes nothing (the merge reads only the splits a row's length reaches)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    if TOKENS > 1:
        count, len0 = _paged_run(Tables, Lens, b, tl.num_programs(0), st_b, width, BS,
                                 MIN_SPLIT, MAX_SPLITS, BLOCK_N, TOKENS)
        if count == 0:
            return
    else:
        count = 1
        len0 = tl.load(Lens + b).to(tl.int32)
    split = _split_of(len0, MIN_SPLIT, MAX_SPLITS, BLOCK_N)
    if sp * split >= len0 + count - 1:
        return
    _tile(Q, K, V, OutPart, LsePart, sq_b, sq_h, sk_n, sk_h, sk_l, sv_n, sv_h, sv_l,
          so_b, so_h, so_s, sl_b, sl_h, split, scale, b, kvh, sp, 0, len0, count,
          D, G, BLOCK_G, BLOCK_N, BLOCK_D, TOKENS, Tables + b.to(tl.int64) * st_b, BS)


@triton.jit
def _combine_kernel(OutPart, LsePart, Out, Lens, so_b, so_h, so_s, sl_b, sl_h, sout_b, sout_h,
                    num_splits, D: tl.constexpr, MIN_SPLIT: tl.constexpr,
                    MAX_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_S: tl.constexpr):
    """Splits folded one by one in split order, only those the row's length reaches (and
    the grid had: a length past max_len reads no further): the same sequence of operations
    whatever the number of splits launched. The splits' values are loaded BLOCK_S at a time
    (one memory round trip instead of two per split; 1: as before) and taken out exactly
    (a max over -inf) in that order."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    sp = tl.arange(0, BLOCK_S)
    mask_d = d < D
    length = tl.load(Lens + b).to(tl.int32)
    used = tl.minimum(tl.cdiv(length, _split_of(length, MIN_SPLIT, MAX_SPLITS, BLOCK_N)),
                      num_splits)
    lse_row = LsePart + b * sl_b + h * sl_h
    o_row = OutPart + b * so_b + h * so_h
    m = tl.load(lse_row)  # split 0 is never empty: lengths >= 1
    acc = tl.load(o_row + d, mask=mask_d, other=0.0)
    w = tl.full([], 1.0, tl.float32)
    for s0 in range(1, used, BLOCK_S):
        lses, parts = _load_splits(lse_row, o_row, s0, used, so_s, sp, d, mask_d)
        for i in range(0, tl.minimum(BLOCK_S, used - s0)):
            lse, o = _split_at(lses, parts, sp, i)
            m_new = tl.maximum(m, lse)
            a, e = tl.exp(m - m_new), tl.exp(lse - m_new)
            acc = acc * a + o * e
            w = w * a + e
            m = m_new
    tl.store(Out + b * sout_b + h * sout_h + d, (acc / w).to(Out.dtype.element_ty), mask=mask_d)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, lengths: torch.Tensor, max_len: int,
                           scale: float, block_n: int | None = None,
                           min_split: int = MIN_SPLIT, max_splits: int = MAX_SPLITS,
                           shared_tile: bool | None = None, merge_splits: int | None = None
                           ) -> torch.Tensor:
    """q [B, H, D]; row b reads blocks block_tables[b] of the cache [N, Hkv, bs, D] up to
    lengths[b]. `shared_tile` (None: `SHARED_TILE`): up to 16 // the GQA group consecutive
    rows of one request at consecutive lengths (a prompt's tokens) share a tile; a row's bits
    do not depend on its tile-mates (but the same compiled kernel must serve every row: one
    choice per run).
    `merge_splits`: how many splits the merge loads at once (default all; 1: one by one, as
    before 2026-12-08; the same bits)."""
    b, h, d = q.shape
    _, hkv, bs, _ = k_cache.shape
    assert h % hkv == 0 and k_cache.shape[-1] == d
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache rows must be contiguous"
    assert block_tables.stride(-1) == 1
    group = h // hkv
    block_g = max(16, triton.next_power_of_2(group))
    block_n = block_n or BLOCK_N
    assert min_split % block_n == 0
    shared = SHARED_TILE if shared_tile is None else shared_tile
    tokens = block_g // triton.next_power_of_2(group) if shared else 1
    splits = min(max_splits, triton.cdiv(max_len, min_split))  # the most any row < max_len uses
    block_d = triton.next_power_of_2(d)
    part = torch.empty((b, h, splits, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((b, h, splits), dtype=torch.float32, device=q.device)
    _paged_split_kernel[(b, hkv, splits)](
        q, k_cache, v_cache, block_tables, lengths, part, lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        block_tables.shape[1], part.stride(0), part.stride(1), part.stride(2), lse.stride(0),
        lse.stride(1), scale, D=d, G=group, BLOCK_G=block_g, BS=bs, MIN_SPLIT=min_split,
        MAX_SPLITS=max_splits, BLOCK_N=block_n, BLOCK_D=block_d, TOKENS=tokens, num_warps=4,
        num_stages=2)
    out = torch.empty_like(q)
    _combine_kernel[(b, h)](part, lse, out, lengths, part.stride(0), part.stride(1),
                            part.stride(2), lse.stride(0), lse.stride(1), out.stride(0),
                            out.stride(1), splits, D=d, MIN_SPLIT=min_split, MAX_SPLITS=max_splits,
                            BLOCK_N=block_n, BLOCK_D=block_d,
                            BLOCK_S=merge_splits or triton.next_power_of_2(max_splits),
                            num_warps=1 if merge_splits == 1 else 4)
    return out

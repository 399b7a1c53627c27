"""Attention over the slot KV cache for one fused iteration.

A fused iteration's tokens are laid out flat: first one token for each of the `num_decode`
decode rows (row i lives in KV slot i: the memory shuffle keeps the live block dense), then
the prompt chunks of the requests being prefilled. `AttentionMetadata` says where each token
goes; model code passes it through untouched. This module holds the plain PyTorch path;
`attention_triton` holds the fast GPU kernel behind the same functions, `fused_cpu` the compiled
float32 CPU kernels of the cache write and of decode attention. With
`batch_invariant` (the default on a GPU) every token, decode row or prompt token, goes
through one per-row kernel whose KV split is fixed by position: a token's attention is
then bitwise the same whatever else runs in its iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from flover.ops import fused, fused_cpu
from flover.ops.transfer import to_device


@dataclass(slots=True)
class PrefillChunk:
    slot: int
    start: int  # position of the chunk's first token
    length: int  # tokens in this chunk
    offset: int  # index of the chunk's first token in the flat batch
    blocks: torch.Tensor | None = None  # paged layout: the row's blocks covering [0, start + length)


@dataclass(slots=True)
class AttentionMetadata:
    slot_ids: torch.Tensor  # [T] KV slot of each token (cache write)
    positions: torch.Tensor  # [T] position of each token (cache write, rotary)
    num_decode: int  # decode rows, in slots 0..num_decode-1
    decode_lengths: torch.Tensor | None  # [num_decode] KV length of each row, new token included
    decode_max_len: int  # max(decode_lengths), known on the host
    prefills: list[PrefillChunk]
    padded: PaddedPrefill | bool | None = None  # built by the first layer (False: none)
    # paged layout: the cache is [blocks, Hkv, block_size, D]; slot_ids are each token's block,
    # write_offsets its position in the block, block_tables [num_decode, n] each row's blocks
    write_offsets: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    batch_invariant: bool = False  # GPU: every token through `row_attention` (see there)
    # every token as a row: its slot (paged: its block table), its KV length, and the longest
    # (built by `_rows` / `_paged_rows`, or given by cuda_graph.TokenGraphs, whose tokens are
    # all rows)
    rows: tuple[torch.Tensor, torch.Tensor, int] | None = None
    # row_attention's own state for this forward (its persistent form's work list, built by
    # the first layer, read by the others)
    row_plan: dict = field(default_factory=dict)


@dataclass(slots=True)
class PaddedPrefill:
    """Whole prompts (chunks starting at position 0) laid out [n, L] for one attention call."""

    chunks: list[PrefillChunk]
    slots: torch.Tensor  # [n]
    index: torch.Tensor  # [n, L] flat token index of each (prompt, position); padding repeats
    valid: torch.Tensor  # [n, L] position < the prompt's length
    mask: torch.Tensor  # [n, 1, L, L] causal and within the prompt

    @classmethod
    def build(cls, chunks: list[PrefillChunk], device) -> PaddedPrefill:
        width = max(c.length for c in chunks)
        lens = to_device([c.length for c in chunks], device)
        offs = to_device([c.offset for c in chunks], device)
        j = torch.arange(width, device=device)
        valid = j[None, :] < lens[:, None]
        index = torch.where(valid, offs[:, None] + j[None, :], offs[:, None])
        mask = (j[None, :] <= j[:, None])[None, None] & valid[:, None, None, :]
        slots = to_device([c.slot for c in chunks], device)
        return cls(chunks, slots, index, valid, mask)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             meta: AttentionMetadata) -> None:
    """Store this iteration's keys and values: cache[slot, :, pos] = k[token] (paged: slot is
    the token's block, pos its offset in the block)."""
    pos = meta.positions if meta.write_offsets is None else meta.write_offsets
    if fused.write_kv(k_cache, v_cache, k, v, meta.slot_ids, pos):
        return
    if _cpu_kernels(k, k_cache, v_cache) and fused_cpu.usable(v) and v.stride(-1) == 1:
        fused_cpu.write_kv(k_cache, v_cache, k, v, meta.slot_ids, pos)
        return
    k_cache[meta.slot_ids, :, pos] = k.to(k_cache.dtype)
    v_cache[meta.slot_ids, :, pos] = v.to(v_cache.dtype)


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """A paged cache [N, Hkv, bs, D] read through block tables [..., n] as [..., Hkv, length, D]."""
    x = cache[blocks]  # [..., n, Hkv, bs, D]
    x = x.transpose(-4, -3)  # [..., Hkv, n, bs, D]
    return x.reshape(*x.shape[:-3], x.shape[-3] * x.shape[-2], x.shape[-1])[..., :length, :]


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, lengths: torch.Tensor, max_len: int,
                               scale: float) -> torch.Tensor:
    """q [B, H, D]; row b reads the blocks block_tables[b] of the paged cache up to lengths[b]."""
    n = -(-max_len // k_cache.shape[2])
    tables = block_tables[:, :n]
    return decode_attention_ref(q, gather_blocks(k_cache, tables, max_len),
                                gather_blocks(v_cache, tables, max_len), lengths, max_len, scale)


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         lengths: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:
    """q [B, H, D] against slots 0..B-1 of the cache [S, Hkv, L, D], each row up to its length."""
    b, h, d = q.shape
    hkv = k_cache.shape[1]
    k = k_cache[:b, :, :max_len].float()
    v = v_cache[:b, :, :max_len].float()
    qg = q.float().view(b, hkv, h // hkv, d)
    scores = torch.einsum("bhgd,bhld->bhgl", qg, k) * scale
    pad = torch.arange(max_len, device=q.device)[None, :] >= lengths[:, None]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgl,bhld->bhgd", scores.softmax(-1), v)
    return out.reshape(b, h, d).to(q.dtype)


def _expand_kv(k: torch.Tensor, v: torch.Tensor, heads: int, dim: int):
    """Repeat each KV head for its group of query heads (GQA) along `dim`."""
    groups = heads // k.shape[dim]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=dim), v.repeat_interleave(groups, dim=dim)


def prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          chunk: PrefillChunk, scale: float) -> torch.Tensor:
    """One prompt chunk q [n, H, D] attends causally to its slot's cache up to its last token."""
    n, h, _ = q.shape
    end = chunk.start + chunk.length
    k, v = _expand_kv(k_cache[chunk.slot, :, :end], v_cache[chunk.slot, :, :end], h, dim=0)
    qh = q.transpose(0, 1).to(k.dtype)
    if chunk.start == 0:
        out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale)
    else:
        rows = torch.arange(chunk.start, end, device=q.device)[:, None]
        mask = torch.arange(end, device=q.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1).to(q.dtype)


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                chunk: PrefillChunk, scale: float) -> torch.Tensor:
    """One prompt chunk q [n, H, D] against its row's blocks, causally: query i sits at
    position start + i (the causal mask aligned to the bottom right, which SDPA's fused
    kernels take, as a chunk after a cached prefix is the common case here)."""
    n, h, _ = q.shape
    end = chunk.start + chunk.length
    k, v = _expand_kv(gather_blocks(k_cache, chunk.blocks, end),
                      gather_blocks(v_cache, chunk.blocks, end), h, dim=0)
    qh = q.transpose(0, 1).to(k.dtype)[None]
    if chunk.start == 0:
        out = F.scaled_dot_product_attention(qh, k[None], v[None], is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qh, k[None], v[None], scale=scale,
                                             attn_mask=causal_lower_right(n, end))
    return out[0].transpose(0, 1).to(q.dtype)


def prefill_attention_padded(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             p: PaddedPrefill, scale: float) -> torch.Tensor:
    """Several whole prompts in one attention call: [sum of lengths, H, D], in p.index order.

    Padding queries attend to their prompt's first keys at least (no empty softmax) and are
    dropped; padding keys are masked.
    """
    h = q.shape[1]
    width = p.index.shape[1]
    k, v = _expand_kv(k_cache[p.slots, :, :width], v_cache[p.slots, :, :width], h, dim=1)
    qp = q[p.index].transpose(1, 2).to(k.dtype)  # [n, H, L, D]
    out = F.scaled_dot_product_attention(qp, k, v, attn_mask=p.mask, scale=scale)
    return out.transpose(1, 2)[p.valid].to(q.dtype)


def _batchable(chunks: list[PrefillChunk]) -> list[PrefillChunk]:
    """Whole prompts worth one padded call: at least two, padding at most half the work."""
    fresh = [c for c in chunks if c.start == 0]
    if len(fresh) < 2:
        return []
    return fresh if len(fresh) * max(c.length for c in fresh) <= 2 * sum(c.length for c in fresh) \
        else []


def row_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slots: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, H, D]: token t against slot slots[t] of the cache, positions < lengths[t]."""
    return decode_attention_ref(q, k_cache[slots], v_cache[slots], lengths,
                                int(lengths.max()), scale)


def _rows(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every token's slot and KV length, decode rows then prompt tokens (built once)."""
    if meta.rows is None:
        nd = meta.num_decode
        if not meta.prefills:
            meta.rows = meta.slot_ids[:nd], meta.decode_lengths, meta.decode_max_len
        else:
            meta.rows = meta.slot_ids, *_token_lengths(meta)
    return meta.rows


def _token_lengths(meta: AttentionMetadata) -> tuple[torch.Tensor, int]:
    """Every token's KV length (a prompt token reads up to its own position), the longest."""
    nd = meta.num_decode
    prompt = meta.positions[nd:] + 1
    lengths = prompt if not nd else torch.cat([meta.decode_lengths, prompt])
    end = max(c.start + c.length for c in meta.prefills)
    return lengths, max(meta.decode_max_len, end)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] for the flat batch; returns [T, H, D]."""
    write_kv(k_cache, v_cache, k, v, meta)
    return attend(q, k_cache, v_cache, meta, scale)


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """`attention` once this iteration's keys and values are in the cache (written by
    `write_kv` or `fused.rotary_write_kv`)."""
    if meta.block_tables is not None or meta.write_offsets is not None:
        return paged_attention(q, k_cache, v_cache, meta, scale)
    if meta.batch_invariant and q.is_cuda and _triton_rows is not None:
        slots, lengths, max_len = _rows(meta)
        return _triton_rows(q, k_cache, v_cache, slots, lengths, max_len, scale,
                            positions=meta.positions[:len(slots)], plan=meta.row_plan)
    if meta.rows is not None:  # tokens given as rows (cuda_graph.TokenGraphs) without Triton
        slots, lengths, _ = meta.rows
        return row_attention_ref(q, k_cache, v_cache, slots, lengths, scale)
    nd = meta.num_decode
    if nd == q.shape[0] and not meta.prefills:
        return decode_attention(q, k_cache, v_cache, meta.decode_lengths, meta.decode_max_len,
                                scale)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = decode_attention(q[:nd], k_cache, v_cache, meta.decode_lengths,
                                    meta.decode_max_len, scale)
    chunks = meta.prefills
    if chunks and meta.padded is None:
        batch = _batchable(chunks)
        meta.padded = PaddedPrefill.build(batch, q.device) if batch else False
    if meta.padded:
        out[meta.padded.index[meta.padded.valid]] = prefill_attention_padded(
            q, k_cache, v_cache, meta.padded, scale)
        chunks = [c for c in chunks if c not in meta.padded.chunks]
    for c in chunks:
        out[c.offset:c.offset + c.length] = prefill_attention_ref(
            q[c.offset:c.offset + c.length], k_cache, v_cache, c, scale)
    return out


def _paged_rows(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every token of a paged iteration as a row of the decode kernel: its block table, its
    KV length, the longest. A prompt token then reads its row's blocks up to its own position
    with a KV split fixed by its own length: the same bits whether its prompt is prefilled
    whole, in chunks, after a cached prefix, alone or beside others (batch invariance)."""
    if meta.rows is None:
        nd = meta.num_decode
        parts = [meta.block_tables] if nd else []
        parts += [c.blocks.expand(c.length, -1) for c in meta.prefills]
        width = max(t.shape[1] for t in parts)
        tables = torch.cat([F.pad(t, (0, width - t.shape[1])) for t in parts])
        meta.rows = tables, *_token_lengths(meta)
    return meta.rows


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The paged layout's attention, once this iteration's keys and values are written."""
    if meta.batch_invariant and meta.prefills and q.is_cuda and _triton_paged_decode is not None:
        tables, lengths, max_len = _paged_rows(meta)
        return _triton_paged_decode(q, k_cache, v_cache, tables, lengths, max_len, scale)
    out = torch.empty_like(q)
    nd = meta.num_decode
    if nd:
        out[:nd] = paged_decode_attention(q[:nd], k_cache, v_cache, meta.block_tables,
                                          meta.decode_lengths, meta.decode_max_len, scale)
    for c in meta.prefills:
        out[c.offset:c.offset + c.length] = paged_prefill_attention_ref(
            q[c.offset:c.offset + c.length], k_cache, v_cache, c, scale)
    return out


def paged_decode_attention(q, k_cache, v_cache, block_tables, lengths, max_len, scale):
    """Dispatch: the Triton kernel on a GPU when it is available, else the reference."""
    if q.is_cuda and _triton_paged_decode is not None:
        return _triton_paged_decode(q, k_cache, v_cache, block_tables, lengths, max_len, scale)
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, lengths, max_len, scale)


def row_attention_available() -> bool:
    """Whether the GPU's per-row (batch-invariant) attention kernel can run here."""
    return _triton_rows is not None


def decode_attention(q, k_cache, v_cache, lengths, max_len, scale):
    """Dispatch: the Triton kernel on a GPU when it is available, the compiled kernel for
    float32 on the CPU, else the reference."""
    if q.is_cuda and _triton_decode is not None:
        return _triton_decode(q, k_cache, v_cache, lengths, max_len, scale)
    if _cpu_kernels(q, k_cache, v_cache):
        return fused_cpu.decode_attention(q, k_cache, v_cache, lengths, scale)
    return decode_attention_ref(q, k_cache, v_cache, lengths, max_len, scale)


def _cpu_kernels(x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the compiled CPU kernels take x [T, heads, D] against this float32 slot cache."""
    return (fused.ENABLED and fused_cpu.usable(x) and x.stride(-1) == 1
            and k_cache.dtype == torch.float32 and v_cache.dtype == torch.float32
            and k_cache.is_contiguous() and v_cache.is_contiguous())


try:  # the kernel module imports triton; CPU-only installs go without it
    from flover.ops.attention_triton import decode_attention as _triton_decode
    from flover.ops.attention_triton import row_attention as _triton_rows
except Exception:  # noqa: BLE001 - any import failure means: use the reference
    _triton_decode = _triton_rows = None

try:
    from flover.ops.paged_attention_triton import paged_decode_attention as _triton_paged_decode
except Exception:  # noqa: BLE001 - any import failure means: use the reference
    _triton_paged_decode = None

"""Attention over the slot cache: the batched prompt path against one call per prompt."""

from __future__ import annotations

import pytest
import torch

from flover.ops.attention import AttentionMetadata, PrefillChunk, attention, prefill_attention_ref


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (4, 1)])
def test_padded_prompts_equal_one_call_per_prompt(heads, kv_heads):
    torch.manual_seed(0)
    d, slots, seq = 16, 4, 32
    lengths = [5, 3, 7, 6]
    chunks, off = [], 0
    for slot, n in enumerate(lengths):
        chunks.append(PrefillChunk(slot, 0, n, off))
        off += n
    q, k, v = torch.randn(off, heads, d), torch.randn(off, kv_heads, d), torch.randn(off, kv_heads, d)
    k_cache = torch.randn(slots, kv_heads, seq, d)  # garbage past each prompt must not matter
    v_cache = torch.randn(slots, kv_heads, seq, d)
    meta = AttentionMetadata(
        slot_ids=torch.tensor([c.slot for c in chunks for _ in range(c.length)]),
        positions=torch.tensor([p for c in chunks for p in range(c.length)]),
        num_decode=0, decode_lengths=None, decode_max_len=0, prefills=chunks)
    out = attention(q, k, v, k_cache, v_cache, meta, d ** -0.5)
    assert meta.padded and meta.padded.chunks == chunks  # the batched path ran
    for c in chunks:
        ref = prefill_attention_ref(q[c.offset:c.offset + c.length], k_cache, v_cache, c, d ** -0.5)
        torch.testing.assert_close(out[c.offset:c.offset + c.length], ref, rtol=1e-5, atol=1e-5)


def test_prompts_of_very_different_lengths_go_one_by_one():
    from flover.ops.attention import _batchable

    chunks = [PrefillChunk(0, 0, 40, 0), PrefillChunk(1, 0, 2, 40), PrefillChunk(2, 0, 3, 42)]
    assert _batchable(chunks) == []  # 3 x 40 padded for 45 real tokens
    assert _batchable(chunks[1:]) == chunks[1:]
    assert _batchable([PrefillChunk(0, 8, 4, 0), PrefillChunk(1, 0, 4, 4)]) == []  # one whole


def test_paged_iteration_as_rows_equals_decode_and_prefill_attention():
    """Under batch invariance on a GPU a paged iteration's prompt tokens become rows of the
    paged decode kernel (`_paged_rows`). Checked here through the kernel's reference: every
    token's row (its table, its length) gives what the decode and prefill paths give."""
    from flover.ops.attention import _paged_rows, paged_attention, paged_decode_attention_ref

    gen = torch.Generator().manual_seed(0)
    blocks, hkv, bs, d, h = 12, 2, 4, 8, 4
    k_cache = torch.randn(blocks, hkv, bs, d, generator=gen)
    v_cache = torch.randn(blocks, hkv, bs, d, generator=gen)
    # two decode rows (lengths 6 and 9), then a chunk at positions 4..8 and a whole prompt of 3
    tables = torch.tensor([[1, 2, 0], [3, 4, 5]])
    chunks = [PrefillChunk(0, 4, 5, 2, torch.tensor([6, 7, 8])),
              PrefillChunk(0, 0, 3, 7, torch.tensor([9]))]
    positions = torch.tensor([5, 8, 4, 5, 6, 7, 8, 0, 1, 2])
    q = torch.randn(len(positions), h, d, generator=gen)
    meta = AttentionMetadata(slot_ids=torch.zeros(10, dtype=torch.long), positions=positions,
                             num_decode=2, decode_lengths=torch.tensor([6, 9]), decode_max_len=9,
                             prefills=chunks, block_tables=tables)
    expected = paged_attention(q, k_cache, v_cache, meta, d ** -0.5)
    rows, lengths, max_len = _paged_rows(meta)
    assert rows.shape == (10, 3) and lengths.tolist() == [6, 9, 5, 6, 7, 8, 9, 1, 2, 3]
    assert max_len == 9
    got = paged_decode_attention_ref(q, k_cache, v_cache, rows, lengths, max_len, d ** -0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

"""Triton kernels against their PyTorch references, under TRITON_INTERPRET=1 on the CPU.

The interpreter runs each program in numpy, so sizes stay small; on a GPU machine the same
tests run the compiled kernels (bench/gpu_check.sh does that).
"""

from __future__ import annotations

import os

import pytest
import torch

# conftest.py sets TRITON_INTERPRET=1 without a GPU: it must be set before triton is first
# imported (triton's own helpers are built at import), and any flover import pulls it in
if not torch.cuda.is_available():
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets this before imports"
triton = pytest.importorskip("triton")

from flover.attention import decode_attention_ref  # noqa: E402
from flover.kernels.decode_attention import decode_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cache(layers, slots, hkv, max_len, d, dtype, gen):
    shape = (layers, slots, hkv, max_len, d)
    k = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    v = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    return k, v


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [
    (4, 4, 16),  # multi-head (LLaMA-7B, GPT-J shape of the problem)
    (4, 2, 16),  # grouped-query: 2 query heads per KV head
    (6, 1, 24),  # multi-query, head_dim not a power of two
    (2, 2, 64),  # GPT-J-like wide head (rotary_dim < head_dim does not matter here)
])
def test_decode_attention_matches_reference(heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(heads * 100 + kv_heads * 10 + head_dim)
    rows, slots, max_seq = 3, 4, 80
    k, v = _cache(2, slots, kv_heads, max_seq, head_dim, torch.float32, gen)
    q = torch.randn(rows, heads, head_dim, generator=gen).to(DEVICE)
    lengths = torch.tensor([1, 77, 33], device=DEVICE)
    max_len = int(lengths.max())
    # layer 1: a strided view into the 5-D cache, as the models pass it
    ours = decode_attention(q, k[1], v[1], lengths, max_len, head_dim ** -0.5)
    ref = decode_attention_ref(q, k[1], v[1], lengths, max_len, head_dim ** -0.5)
    torch.testing.assert_close(ours, ref, rtol=2e-3, atol=2e-3)


def test_decode_attention_ignores_positions_past_each_row_length():
    gen = torch.Generator().manual_seed(7)
    k, v = _cache(1, 2, 2, 64, 16, torch.float32, gen)
    q = torch.randn(2, 2, 16, generator=gen).to(DEVICE)
    lengths = torch.tensor([5, 40], device=DEVICE)
    before = decode_attention(q, k[0], v[0], lengths, 64, 0.25)
    k[0, 0, :, 5:] = float("nan")  # garbage past row 0's length, as in a reused slot
    v[0, 0, :, 5:] = float("nan")
    after = decode_attention(q, k[0], v[0], lengths, 64, 0.25)
    torch.testing.assert_close(after, before)


def test_decode_attention_splits_long_rows_and_keeps_half_precision():
    gen = torch.Generator().manual_seed(11)
    # one row and one head: the whole context is split across programs and reduced
    k, v = _cache(1, 1, 1, 300, 32, torch.float16, gen)
    q = torch.randn(1, 1, 32, generator=gen).to(DEVICE, torch.float16)
    lengths = torch.tensor([290], device=DEVICE)
    ours = decode_attention(q, k[0], v[0], lengths, 300, 32 ** -0.5)
    ref = decode_attention_ref(q, k[0], v[0], lengths, 300, 32 ** -0.5)
    assert ours.dtype == torch.float16
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-2, atol=1e-2)

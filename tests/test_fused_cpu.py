"""The compiled float32 CPU kernels (flover/ops/fused_cpu.c) against their PyTorch references,
row by row the same alone and in a batch, and the dispatch that falls back to the references."""

from __future__ import annotations

import pytest
import torch

from flover.models.layers import RMSNorm, Rotary
from flover.ops import attention, fused, fused_cpu

pytestmark = pytest.mark.skipif(fused_cpu.lib() is None, reason="no C compiler")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _norm(h: int, gen: torch.Generator) -> RMSNorm:
    n = RMSNorm(h, 1e-5)
    n.weight.data = torch.rand(h, generator=gen) + 0.5
    return n


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_kernel_matches_reference(with_residual):
    gen = _gen(1)
    x = torch.randn(6, 2, 72, generator=gen)[:, 1]  # rows 144 apart: a strided view
    r = torch.randn(6, 72, generator=gen) if with_residual else None
    n = _norm(72, gen)
    y, s = fused.rms_norm(x, n, r)
    y_ref, s_ref = fused.rms_norm_ref(x, n.weight, n.eps, r)
    assert torch.equal(s, s_ref)  # x + residual, one rounding either way
    torch.testing.assert_close(y, y_ref, rtol=2e-6, atol=2e-6)


def test_silu_mul_kernel_matches_reference_over_the_whole_range():
    gen = _gen(2)
    gate_up = torch.randn(5, 2 * 40, generator=gen) * 8  # 40: a 16-wide body and a tail
    gate_up[0, :8] = torch.tensor([-1e4, -100.0, -88.5, -87.5, 0.0, 88.5, 100.0, 1e4])
    torch.testing.assert_close(fused.silu_mul(gate_up), fused.silu_mul_ref(gate_up),
                               rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize(("rot_dim", "interleaved"), [(32, False), (32, True), (16, False),
                                                      (8, True)])
def test_rotary_kernel_matches_reference(rot_dim, interleaved):
    rot = Rotary(rot_dim, 64, 10000.0, interleaved)
    qkv = torch.randn(4, 3, 2, 32, generator=_gen(3))
    x = qkv[:, 1]  # a strided view, as the models pass q and k
    pos = torch.tensor([0, 5, 63, 17])
    out = fused.rotary(x, pos, rot)
    torch.testing.assert_close(out, rot(x, pos), rtol=1e-6, atol=1e-6)
    assert torch.equal(out[2:3], fused.rotary(x[2:3], pos[2:3], rot))


def test_rotary_kernel_refuses_a_position_outside_its_table():
    rot = Rotary(16, 8, 10000.0, False)
    with pytest.raises(IndexError):
        fused_cpu.rotary(torch.randn(2, 1, 16), torch.tensor([3, 8]), rot.cos, rot.sin, 16, False)


def test_norm_rotary_and_silu_rows_are_bitwise_the_same_alone_and_in_a_batch_of_8():
    gen = _gen(10)
    x, r, n = torch.randn(8, 72, generator=gen), torch.randn(8, 72, generator=gen), _norm(72, gen)
    gate_up = torch.randn(8, 2 * 40, generator=gen)
    rot, pos = Rotary(32, 64, 10000.0, False), torch.arange(8) * 7
    q = torch.randn(8, 3, 32, generator=gen)
    together = (fused.rms_norm(x, n, r), fused.silu_mul(gate_up), fused.rotary(q, pos, rot))
    for i in (0, 5, 7):
        row = slice(i, i + 1)
        y, s = fused.rms_norm(x[row], n, r[row])
        assert torch.equal(y, together[0][0][row]) and torch.equal(s, together[0][1][row])
        assert torch.equal(fused.silu_mul(gate_up[row]), together[1][row])
        assert torch.equal(fused.rotary(q[row], pos[row], rot), together[2][row])


def _cache(slots: int, hkv: int, length: int, d: int, gen: torch.Generator):
    return (torch.randn(slots, hkv, length, d, generator=gen),
            torch.randn(slots, hkv, length, d, generator=gen))


def test_write_kv_kernel_writes_each_token_at_its_slot_and_position():
    gen = _gen(4)
    k_cache, v_cache = _cache(3, 2, 10, 24, gen)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    kv = torch.randn(3, 2, 2, 24, generator=gen)
    k, v = kv[:, 0], kv[:, 1]  # strided views, as v comes from the qkv projection
    slots, pos = torch.tensor([2, 0, 1]), torch.tensor([9, 4, 0])
    fused_cpu.write_kv(k_cache, v_cache, k, v, slots, pos)
    ref_k[slots, :, pos] = k
    ref_v[slots, :, pos] = v
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_write_kv_kernel_refuses_a_slot_outside_the_cache_and_writes_nothing():
    k_cache, v_cache = _cache(2, 1, 4, 16, _gen(5))
    before = k_cache.clone()
    k = torch.randn(2, 1, 16)
    with pytest.raises(IndexError):
        fused_cpu.write_kv(k_cache, v_cache, k, k, torch.tensor([0, 2]), torch.tensor([1, 1]))
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 24), (6, 1, 32), (3, 3, 64)])
def test_decode_attention_kernel_matches_reference(heads, kv_heads, head_dim):
    gen = _gen(6)
    k_cache, v_cache = _cache(6, kv_heads, 40, head_dim, gen)
    q = torch.randn(5, heads, head_dim, generator=gen)
    lengths = torch.tensor([1, 16, 17, 40, 33])  # a row shorter, equal to and past 16 keys
    out = attention.decode_attention(q, k_cache, v_cache, lengths, 40, head_dim ** -0.5)
    ref = attention.decode_attention_ref(q, k_cache, v_cache, lengths, 40, head_dim ** -0.5)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)


def test_decode_attention_row_is_bitwise_the_same_alone_and_in_a_threaded_batch():
    """8 rows x 8 heads x 64 keys x 64 channels is enough work for the kernel's threads."""
    gen = _gen(7)
    k_cache, v_cache = _cache(8, 2, 64, 64, gen)
    q = torch.randn(8, 8, 64, generator=gen)
    lengths = torch.tensor([64, 3, 64, 50, 64, 64, 17, 64])
    together = fused_cpu.decode_attention(q, k_cache, v_cache, lengths, 0.125)
    for b in (0, 1, 6):
        alone = fused_cpu.decode_attention(q[b:b + 1], k_cache, v_cache, lengths[b:b + 1], 0.125,
                                           slots=torch.tensor([b]))
        assert torch.equal(alone[0], together[b])


def test_decode_attention_kernel_refuses_a_row_longer_than_the_cache():
    k_cache, v_cache = _cache(2, 1, 8, 16, _gen(8))
    with pytest.raises(IndexError):
        fused_cpu.decode_attention(torch.randn(2, 1, 16), k_cache, v_cache, torch.tensor([8, 9]),
                                   0.25)


def test_without_the_library_the_ops_run_their_references(monkeypatch):
    monkeypatch.setattr(fused_cpu, "lib", lambda: None)
    gen = _gen(9)
    x, n = torch.randn(3, 40, generator=gen), _norm(40, gen)
    assert torch.equal(fused.rms_norm(x, n)[0], fused.rms_norm_ref(x, n.weight, n.eps)[0])
    gate_up = torch.randn(3, 80, generator=gen)
    assert torch.equal(fused.silu_mul(gate_up), fused.silu_mul_ref(gate_up))


@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_gptj"])
def test_model_with_cpu_kernels_matches_references(preset):
    """A prefill then a padded decode batch through the runner, kernels on and off."""
    from test_kernels import logits_fused_on_and_off

    on, off = logits_fused_on_and_off(preset, torch.device("cpu"))
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)

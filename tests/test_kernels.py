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

from flover.ops.attention import decode_attention_ref  # noqa: E402
from flover.ops.attention_triton import decode_attention  # noqa: E402

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
@pytest.mark.parametrize("mha_2d", [True, False])  # G = 1: 2-D tiles or the padded tl.dot path
def test_decode_attention_matches_reference(heads, kv_heads, head_dim, mha_2d):
    gen = torch.Generator().manual_seed(heads * 100 + kv_heads * 10 + head_dim)
    rows, slots, max_seq = 3, 4, 80
    k, v = _cache(2, slots, kv_heads, max_seq, head_dim, torch.float32, gen)
    q = torch.randn(rows, heads, head_dim, generator=gen).to(DEVICE)
    lengths = torch.tensor([1, 77, 33], device=DEVICE)
    max_len = int(lengths.max())
    # layer 1: a strided view into the 5-D cache, as the models pass it
    ours = decode_attention(q, k[1], v[1], lengths, max_len, head_dim ** -0.5,
                            config={"mha_2d": mha_2d, "block_n": 16})
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


# --- fused elementwise kernels (flover.ops.fused_triton) against flover.fused's references ---

from flover.models.layers import Rotary  # noqa: E402
from flover.ops import fused  # noqa: E402
from flover.ops import fused_triton as kf  # noqa: E402


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_kernel_matches_reference(with_residual):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 48, generator=gen).to(DEVICE, torch.float16)
    r = torch.randn(5, 48, generator=gen).to(DEVICE, torch.float16) if with_residual else None
    w = torch.rand(48, generator=gen).to(DEVICE, torch.float16)
    y, s = kf.rms_norm(x, w, 1e-6, r)
    y_ref, s_ref = fused.rms_norm_ref(x, w, 1e-6, r)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-3, atol=1e-3)


def test_silu_mul_kernel_matches_reference():
    gen = torch.Generator().manual_seed(4)
    gate_up = torch.randn(3, 2 * 40, generator=gen).to(DEVICE, torch.float16)
    torch.testing.assert_close(kf.silu_mul(gate_up).float(), fused.silu_mul_ref(gate_up).float(),
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("rot_dim", "interleaved"), [(16, False), (8, True), (12, False)])
def test_rotary_kernel_matches_reference(rot_dim, interleaved):
    gen = torch.Generator().manual_seed(5)
    rot = Rotary(rot_dim, 64, 10000.0, interleaved).to(DEVICE)
    qkv = torch.randn(4, 3, 2, 16, generator=gen).to(DEVICE)
    x = qkv[:, 1]  # a strided view, as the models pass q and k
    pos = torch.tensor([0, 5, 63, 17], device=DEVICE)
    ours = kf.rotary(x, pos, rot.cos, rot.sin, rot_dim, interleaved)
    torch.testing.assert_close(ours, rot(x, pos), rtol=1e-5, atol=1e-5)


def test_write_kv_kernel_writes_each_token_at_its_slot_and_position():
    gen = torch.Generator().manual_seed(6)
    k_cache, v_cache = _cache(2, 3, 2, 10, 24, torch.float16, gen)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    k = torch.randn(3, 2, 24, generator=gen).to(DEVICE)  # float32 in, cast to the cache's
    v = torch.randn(3, 2, 24, generator=gen).to(DEVICE)
    slots, pos = torch.tensor([2, 0, 2], device=DEVICE), torch.tensor([9, 4, 0], device=DEVICE)
    kf.write_kv(k_cache[1], v_cache[1], k, v, slots, pos)
    ref_k[1][slots, :, pos] = k.half()
    ref_v[1][slots, :, pos] = v.half()
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the dispatch uses kernels on a GPU only")
@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_gptj"])
def test_model_with_fused_kernels_matches_references_on_gpu(preset):
    on, off = logits_fused_on_and_off(preset, torch.device("cuda"))
    torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-4)


def logits_fused_on_and_off(preset: str, device: torch.device) -> list[torch.Tensor]:
    """A prefill then a padded decode batch of a float32 preset through the runner, with the
    device's fused kernels on (`fused.ENABLED`), then off (the references): both logits."""
    from test_cuda_graph import prefilled_rows

    from flover.engine.kv_cache import SlotCache
    from flover.engine.runner import ModelRunner
    from flover.weights import load_model

    model, _ = load_model(preset, torch.float32, device, seed=2)
    out = []
    for enabled in (True, False):
        fused.ENABLED = enabled
        try:
            cache = SlotCache(model.cfg.num_layers, 4, model.cfg.num_kv_heads, 64,
                              model.cfg.head_dim, torch.float32, device)
            runner = ModelRunner(model, cache, cuda_graphs=False)
            batch = prefilled_rows(runner, cache)
            out.append(runner.forward_logits(batch))
        finally:
            fused.ENABLED = True
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("m", "n", "k", "group"), [(3, 24, 64, 32), (1, 20, 96, 32), (17, 16, 128, 64),
                                                (2, 16, 1536, 32)])  # a long K
def test_quant_mm_matches_dequantised_reference(bits, m, n, k, group):
    """Weight-only int4/int8 (flover/ops/quant_triton.py) against F.linear on the dequantised
    matrix; rows beyond one M tile (17) and N not a multiple of the tile (20, 24)."""
    from flover.ops import quant
    from flover.ops.quant_triton import quant_mm

    gen = torch.Generator().manual_seed(bits * 1000 + m * 10 + k)
    p = quant.quantize(torch.randn(n, k, generator=gen) * 0.05, bits, group)
    x = torch.randn(m, k, generator=gen)
    ref = torch.nn.functional.linear(x, p.dequantize())
    t = lambda a: None if a is None else a.to(DEVICE)  # noqa: E731
    ours = quant_mm(x.to(DEVICE), t(p.qweight), t(p.scales), t(p.mins), bits, group)
    torch.testing.assert_close(ours.cpu(), ref, rtol=1e-4, atol=1e-5)
    # a row's result does not depend on the other rows
    one = quant_mm(x[-1:].to(DEVICE), t(p.qweight), t(p.scales), t(p.mins), bits, group)
    assert torch.equal(one.cpu(), ours[-1:].cpu())


def _assert_row_alone_equals_fused(xs, w, cfg, mma_order=False):
    """quant_mm of row 5 of xs alone, bitwise equal to the same row among M = 3, 17, 70."""
    from flover.ops.quant_triton import quant_mm

    row = xs[5:6]
    alone = quant_mm(row, *w, config=cfg, mma_order=mma_order)
    for m in (3, 17, 70):
        x = xs[:m].clone()
        x[m // 2] = row[0]
        assert torch.equal(quant_mm(x, *w, config=cfg, mma_order=mma_order)[m // 2], alone[0]), m


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cfg", [{"dequant": "asm"}, {"dequant": "bits"}, {"dequant": "float"},
                                 {"split": 2, "block_k": 64, "prefetch": 0, "block_n": 16},
                                 {"split": 1, "block_k": 32, "prefetch": 3}])
@pytest.mark.parametrize(("n", "k", "group"), [(40, 128, 32), (16, 256, 128)])
def test_quant_mm_float16_matches_reference_and_rows_do_not_depend_on_m(bits, cfg, n, k, group):
    """float16 activations, each way of dequantising (the interpreter runs "asm" as "bits"),
    K split in two summed in order, steps of several blocks read ahead: equal to
    F.linear on the dequantised matrix within float16 rounding, and a row bitwise the same
    alone and at M = 3, 17 (two row tiles in one program) and 70 (two programs)."""
    from flover.ops import quant
    from flover.ops.quant_triton import quant_mm

    gen = torch.Generator().manual_seed(bits * 100 + k + n)
    p = quant.quantize(torch.randn(n, k, generator=gen) * 0.05, bits, group)
    t = lambda a: None if a is None else a.to(DEVICE)  # noqa: E731
    w = (t(p.qweight), t(p.scales), t(p.mins), bits, group)
    xs = torch.randn(70, k, generator=gen).half().to(DEVICE)
    ref = torch.nn.functional.linear(xs.float().cpu(), p.dequantize().half().float())
    ours = quant_mm(xs, *w, config=cfg)
    assert ours.dtype == torch.float16
    torch.testing.assert_close(ours.cpu().float(), ref, rtol=2e-3, atol=2e-3)
    _assert_row_alone_equals_fused(xs, w, cfg)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cfg", [{}, {"split": 2, "block_n": 16}, {"max_m_tiles": 1},
                                 {"dequant": "float", "block_k": 512, "num_stages": 2}])
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_quant_mm_tma_form_matches_reference_and_rows_do_not_depend_on_m(bits, cfg, dtype):
    """The Hopper form (TMA, weights in the mma order; the interpreter runs it too, without
    bfloat16): equal to F.linear on the dequantised matrix within the activations' rounding,
    N past the tile and K past the step (zeros), K in parts summed in order, the
    dequantisation through float32 (bfloat16's), and a row bitwise the same alone and at
    M = 3, 17, 70."""
    from flover.ops import quant
    from flover.ops.quant_triton import quant_mm

    n, k = 40, 768  # 768 = 1.5 steps of 512
    gen = torch.Generator().manual_seed(bits * 7 + len(cfg))
    p = quant.quantize(torch.randn(n, k, generator=gen) * 0.05, bits, 32)
    t = lambda a: None if a is None else a.to(DEVICE)  # noqa: E731
    w = (t(quant.to_mma_order(p.qweight, bits)), t(p.scales), t(p.mins), bits, 32)
    xs = torch.randn(70, k, generator=gen).to(dtype).to(DEVICE)
    ref = torch.nn.functional.linear(xs.float().cpu(), p.dequantize().to(dtype).float())
    ours = quant_mm(xs, *w, config=cfg, mma_order=True)
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(ours.cpu().float(), ref, rtol=tol, atol=tol)
    _assert_row_alone_equals_fused(xs, w, cfg, mma_order=True)


@pytest.mark.parametrize("bits", [8])  # int4's "float" converts as "cvt" does
@pytest.mark.parametrize(("dtype", "mma_order"), [(torch.float32, False), (torch.float16, False),
                                                  (torch.float16, True)]
                         + ([(torch.bfloat16, True)] if DEVICE == "cuda" else []))
def test_quant_mm_float_dequantisation_is_bitwise_the_conversions(bits, dtype, mma_order):
    """"float" makes each int8 q by the float32 trick (2^23 + q), "cvt" by int -> float conversions:
    the same weights, so the same bits, in the pointer form (float32 and float16 x) and the
    TMA form (float16, and bfloat16 on a GPU)."""
    from flover.ops import quant
    from flover.ops.quant_triton import quant_mm

    n, k = 40, 512
    gen = torch.Generator().manual_seed(bits + 5)
    p = quant.quantize(torch.randn(n, k, generator=gen) * 0.05, bits, 32)
    t = lambda a: None if a is None else a.to(DEVICE)  # noqa: E731
    q = quant.to_mma_order(p.qweight, bits) if mma_order else p.qweight
    w = (t(q), t(p.scales), t(p.mins), bits, 32)
    x = torch.randn(17, k, generator=gen).to(dtype).to(DEVICE)
    trick = quant_mm(x, *w, config={"dequant": "float"}, mma_order=mma_order)
    assert torch.equal(trick, quant_mm(x, *w, config={"dequant": "cvt"}, mma_order=mma_order))
    ref = torch.nn.functional.linear(x.float().cpu(), p.dequantize().to(dtype).float())
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(trick.cpu().float(), ref, rtol=tol, atol=tol)


def test_weights_in_the_mma_order_refuse_shapes_without_the_tma_form():
    from flover.ops import quant
    from flover.ops.quant_triton import quant_mm

    p = quant.quantize(torch.randn(16, 128), 8, 32)  # K = 128: not a multiple of 256
    with pytest.raises(ValueError, match="mma order"):
        quant_mm(torch.randn(1, 128).half().to(DEVICE), p.qweight.to(DEVICE), p.scales.to(DEVICE),
                 None, 8, 32, mma_order=True)


@pytest.mark.parametrize("bits", [4, 8])
def test_mma_order_is_a_permutation_within_each_row(bits):
    """to_mma_order / from_mma_order are inverses, keep shape and dtype, and move bytes (int8)
    or nibbles (int4) only within each row's spans of 64 / 128 weights, as the layout says."""
    from flover.ops import quant

    gen = torch.Generator().manual_seed(bits)
    p = quant.quantize(torch.randn(3, 512, generator=gen), bits, 32)
    q = quant.to_mma_order(p.qweight, bits)
    assert q.shape == p.qweight.shape and q.dtype == p.qweight.dtype
    assert torch.equal(quant.from_mma_order(q, bits), p.qweight)
    if bits == 8:  # row 1, span 2 (weights 128..191), word 4t + j = 6 (t 1, j 2): 34, 35, 42, 43
        assert q[1, 128 + 24: 128 + 28].tolist() == p.qweight[1, [162, 163, 170, 171]].tolist()
    else:  # word 4t + j = 4 * 3 + 1 of span 0: nibble i = weight 32 + 16(i // 2) + 8(i % 2) + 6
        vals = quant._unpack_nibbles(p.qweight)[0]
        word = q[0, 4 * 13: 4 * 14]
        nibbles = torch.stack((word & 15, word >> 4), -1).flatten().tolist()
        ks = [32 + 16 * (i // 2) + 8 * (i % 2) + 6 for i in range(4)]
        assert nibbles == [int(vals[k]) for k in ks] + [int(vals[k + 1]) for k in ks]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("cfg", "mma_order"), [({}, True), ({"split": 1}, True),
                                                ({"split": 2, "block_n": 16}, False),
                                                ({"split": 1, "block_n": 16}, False)])
def test_quant_mm_epilogues_are_bitwise_the_unfused_ops(bits, cfg, mma_order):
    """The residual add and SiLU * up, applied by the parts' sum (or after the product, in one
    part), in the TMA form (mma order) and the pointer form: the same bits as the product
    followed by `r + y` and by `silu_mul`."""
    from flover.ops import quant
    from flover.ops.fused_triton import silu_mul
    from flover.ops.quant_triton import quant_mm

    n, k = 48, 512  # gate and up of 24 outputs each
    gen = torch.Generator().manual_seed(bits + len(cfg))
    p = quant.quantize(torch.randn(n, k, generator=gen) * 0.05, bits, 32)
    t = lambda a: None if a is None else a.to(DEVICE)  # noqa: E731
    q = quant.to_mma_order(p.qweight, bits) if mma_order else p.qweight
    w = (t(q), t(p.scales), t(p.mins), bits, 32)
    x = torch.randn(5, k, generator=gen).half().to(DEVICE)
    r = torch.randn(5, n, generator=gen).half().to(DEVICE)
    kw = {"config": cfg, "mma_order": mma_order}
    y = quant_mm(x, *w, **kw)
    assert torch.equal(quant_mm(x, *w, **kw, residual=r), r + y)
    gated = quant_mm(x, *w, **kw, gated=True)
    assert gated.shape == (5, n // 2) and torch.equal(gated, silu_mul(y))
    assert quant_mm(x[:0], *w, **kw, gated=True).shape == (0, n // 2)


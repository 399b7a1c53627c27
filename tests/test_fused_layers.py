"""The decode step's fused layers (issue 11): the invariant linear with the RMSNorm (and the
residual add) as its prologue, SiLU * up as its prologue and a residual add as its epilogue,
and rotary with the KV-cache write in one kernel. Each against the unfused sequence it
replaces, and a row's result bitwise the same at every batch size. Under TRITON_INTERPRET=1 on
the CPU (small sizes, no bfloat16), compiled on a GPU machine.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets this before imports"
triton = pytest.importorskip("triton")

from flover.models.layers import Rotary  # noqa: E402
from flover.ops import fused  # noqa: E402
from flover.ops import fused_triton as kf  # noqa: E402
from flover.ops.attention import AttentionMetadata, write_kv  # noqa: E402
from flover.ops.linear_triton import linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
SMALL = {"block_n": 16, "block_k": 32}  # small tiles keep the interpreter fast; K below spans
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # several K steps


def _randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def _unfused_norm_linear(x, nw, eps, w, b, residual):
    """Today's sequence on the Triton path: the norm kernel, then the product."""
    h, s = kf.rms_norm(x, nw, eps, residual)
    return linear(h, w, b, config=SMALL), s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_linear_matches_the_norm_then_the_product(dtype, with_residual):
    gen = torch.Generator().manual_seed(11)
    k, n = 80, 40  # K over two steps and a masked edge, N not a multiple of the tile
    x, w = _randn(19, k, gen=gen, dtype=dtype), _randn(n, k, gen=gen, dtype=dtype)
    r = _randn(19, k, gen=gen, dtype=dtype) if with_residual else None
    nw, b = (torch.rand(k, generator=gen) + 0.5).to(DEVICE, dtype), _randn(n, gen=gen, dtype=dtype)
    y, s = linear(x, w, b, config=SMALL, norm=(nw, 1e-5), x_residual=r)
    y_ref, s_ref = _unfused_norm_linear(x, nw, 1e-5, w, b, r)
    assert torch.equal(s, s_ref)  # the summed stream, stored once, is the reference's sum
    assert (s is x) == (not with_residual)  # without a residual, s is x itself
    # 1/rms sums K in BLOCK_K steps here, in one block there: the last bit may differ
    torch.testing.assert_close(y, y_ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_prologue_and_residual_epilogue_equal_the_unfused_sequence(dtype):
    gen = torch.Generator().manual_seed(12)
    inter, n = 72, 24
    gate_up, w = _randn(7, 2 * inter, gen=gen, dtype=dtype), _randn(n, inter, gen=gen, dtype=dtype)
    r = _randn(7, n, gen=gen, dtype=dtype)
    got = linear(gate_up, w, config=SMALL, silu_gate=True, residual=r)
    act = kf.silu_mul(gate_up)
    ref = r + linear(act, w, config=SMALL)
    tol = TOL[dtype]
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    # the product's input is the silu_mul kernel's output, bit for bit: same products, same sum
    assert torch.equal(linear(gate_up, w, config=SMALL, silu_gate=True), linear(act, w, config=SMALL))
    assert torch.equal(got, r + linear(act, w, config=SMALL))  # the add rounds as torch's does


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_epilogue_equals_the_product_then_the_add(dtype):
    """The default decode path's down projection: the plain product, + residual as epilogue."""
    gen = torch.Generator().manual_seed(16)
    x, w = _randn(9, 48, gen=gen, dtype=dtype), _randn(24, 48, gen=gen, dtype=dtype)
    b, r = _randn(24, gen=gen, dtype=dtype), _randn(9, 24, gen=gen, dtype=dtype)
    assert torch.equal(linear(x, w, b, config=SMALL, residual=r), r + linear(x, w, b, config=SMALL))
    one = linear(x[4:5], w, b, config=SMALL, residual=r[4:5])  # and a row alone is the same
    assert torch.equal(one[0], linear(x, w, b, config=SMALL | {"max_m_tiles": 1}, residual=r)[4])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_linear_rows_are_bitwise_the_same_at_every_batch_size(dtype):
    gen = torch.Generator().manual_seed(13)
    k, n = 64, 32
    w, nw = _randn(n, k, gen=gen, dtype=dtype), (torch.rand(k, generator=gen) + 0.5).to(DEVICE, dtype)
    w2 = _randn(n, k // 2, gen=gen, dtype=dtype)
    row, res = _randn(1, k, gen=gen, dtype=dtype), _randn(1, k, gen=gen, dtype=dtype)
    out_res = _randn(1, n, gen=gen, dtype=dtype)
    alone_norm, alone_s = linear(row, w, config=SMALL, norm=(nw, 1e-6), x_residual=res)
    alone_silu = linear(row, w2, config=SMALL, silu_gate=True, residual=out_res)
    for tiles in (2, 4):
        cfg = SMALL | {"max_m_tiles": tiles}
        for m, at in [(3, 1), (17, 16), (40, 5)]:
            x, xr = _randn(m, k, gen=gen, dtype=dtype), _randn(m, k, gen=gen, dtype=dtype)
            yr = _randn(m, n, gen=gen, dtype=dtype)
            x[at], xr[at], yr[at] = row[0], res[0], out_res[0]
            y, s = linear(x, w, config=cfg, norm=(nw, 1e-6), x_residual=xr)
            assert torch.equal(y[at], alone_norm[0]) and torch.equal(s[at], alone_s[0]), (m, at)
            z = linear(x, w2, config=cfg, silu_gate=True, residual=yr)
            assert torch.equal(z[at], alone_silu[0]), (tiles, m, at)


@pytest.mark.parametrize(("rot_dim", "interleaved", "paged"),
                         [(16, False, False), (16, False, True), (8, True, False), (12, False, True)])
def test_rotary_kv_equals_rotary_then_the_cache_write(rot_dim, interleaved, paged):
    gen = torch.Generator().manual_seed(14)
    heads, hkv, d, t = 4, 2, 16, 5
    rot = Rotary(rot_dim, 64, 10000.0, interleaved).to(DEVICE)
    qkv = _randn(t, (heads + 2 * hkv) * d, gen=gen, dtype=torch.float16)
    q, k, v = qkv.split([heads * d, hkv * d, hkv * d], -1)  # strided views, as the model's
    q, k, v = q.view(t, heads, d), k.view(t, hkv, d), v.view(t, hkv, d)
    # slots: [slots, Hkv, L, D] at (slot, position); pages: [blocks, Hkv, 4, D] at (block, offset)
    shape = (6, hkv, 4, d) if paged else (3, hkv, 40, d)
    k_cache, v_cache = _randn(*shape, gen=gen, dtype=torch.float16), _randn(*shape, gen=gen,
                                                                            dtype=torch.float16)
    pos = torch.tensor([0, 7, 39, 3, 8], device=DEVICE)
    if paged:
        meta = AttentionMetadata(torch.tensor([5, 1, 2, 0, 3], device=DEVICE), pos, 0, None, 0, [],
                                 write_offsets=torch.tensor([0, 3, 1, 3, 2], device=DEVICE),
                                 batch_invariant=True)
    else:
        meta = AttentionMetadata(torch.tensor([2, 0, 1, 1, 2], device=DEVICE), pos, 0, None, 0, [],
                                 batch_invariant=True)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    q_ref = kf.rotary(q, pos, rot.cos, rot.sin, rot_dim, interleaved)
    k_ref = kf.rotary(k, pos, rot.cos, rot.sin, rot_dim, interleaved)
    write_kv(ref_k, ref_v, k_ref, v, meta)
    offs = meta.write_offsets if paged else pos
    got = kf.rotary_kv(q, k, v, pos, rot.cos, rot.sin, rot_dim, interleaved, k_cache, v_cache,
                       meta.slot_ids, offs)
    assert torch.equal(got, q_ref)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    # and against the plain PyTorch rotary (the CPU's path)
    torch.testing.assert_close(got, rot(q, pos), rtol=2e-3, atol=2e-3)


def test_fused_functions_run_their_references_off_the_invariant_gpu_path():
    """On the CPU (or a plain nn.Linear) each fused function is the unfused sequence."""
    gen = torch.Generator().manual_seed(15)
    lin = torch.nn.Linear(16, 8)
    down = torch.nn.Linear(8, 16)
    norm = torch.nn.Module()
    norm.weight, norm.eps = torch.rand(16, generator=gen) + 0.5, 1e-6
    x, r = torch.randn(3, 16, generator=gen), torch.randn(3, 16, generator=gen)
    y, s = fused.norm_linear(x, norm, lin, residual=r)
    h, s_ref = fused.rms_norm_ref(x, norm.weight, norm.eps, r)
    assert torch.equal(s, s_ref) and torch.equal(y, lin(h))
    gu = torch.randn(3, 16, generator=gen)
    assert torch.equal(fused.silu_mul_linear(gu, down, residual=s),
                       s + down(fused.silu_mul_ref(gu)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused layers run on a GPU only")
@pytest.mark.parametrize("prologues", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_invariant_llama_with_fused_layers_matches_the_unfused_one(dtype, prologues):
    """The whole model, slot layout (tests/test_engine_gpu.py runs the paged one bitwise)."""
    from test_cuda_graph import prefilled_rows

    from flover.engine.kv_cache import SlotCache
    from flover.engine.runner import ModelRunner
    from flover.ops.linear import swap_linears
    from flover.weights import load_model

    model, _ = load_model("tiny_llama", dtype, torch.device("cuda"), seed=2)
    swap_linears(model)
    cfg = model.cfg
    out, default = [], fused.PROLOGUES
    for enabled in (True, False):
        fused.ENABLED, fused.PROLOGUES = enabled, prologues
        try:
            cache = SlotCache(cfg.num_layers, 4, cfg.num_kv_heads, 64, cfg.head_dim, dtype,
                              torch.device("cuda"))
            runner = ModelRunner(model, cache, cuda_graphs=False, batch_invariant=True)
            batch = prefilled_rows(runner, cache)
            out.append(runner.forward_logits(batch))
        finally:
            fused.ENABLED, fused.PROLOGUES = True, default
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out[0], out[1], rtol=tol, atol=tol)

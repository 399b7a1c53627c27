"""Weight-only int8/int4: formats, kernels against their references, loading, fusion invariance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB, prompts

from flover import LLM, Engine, EngineConfig, SamplingParams
from flover.config import ConfigError
from flover.models.layers import TiedHead
from flover.ops import quant, quant_cpu
from flover.weights import load_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _packed(bits: int, n: int, k: int, group: int = 32, seed: int = 0) -> quant.Packed:
    g = torch.Generator().manual_seed(seed)
    return quant.quantize(torch.randn(n, k, generator=g) * 0.05, bits, group)


def _module(p: quant.Packed, n: int, k: int) -> quant.QuantLinear:
    m = quant.QuantLinear(k, n, p.bits, p.group)
    for name, t in p.tensors(""):
        setattr(m, name, torch.nn.Parameter(t, requires_grad=False))
    return m


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quant_linear_in_the_mma_order_computes_what_it_did(bits, monkeypatch):
    """`use_mma_order` (what load_model does on a GPU whose TMA form reads that order; on the
    CPU forced, the interpreter running the kernel): the module still dequantises to the same
    matrix (`packed`), its product matches the reference within float16 rounding, and a
    second call changes nothing. Where the TMA form does not apply (the CPU unforced, group
    64) the bytes stay in the K order."""
    from flover.ops import launch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, k = 48, 512
    p = _packed(bits, n, k, seed=bits)
    m = _module(quant.Packed(bits, 32, p.qweight.clone(), p.scales, p.mins), n, k).to(dev)
    m.dtype = torch.float16
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1)).half().to(dev)
    ref = torch.nn.functional.linear(x.float().cpu(), p.dequantize().half().float())
    if dev.type == "cpu":
        m.use_mma_order()
        assert not m.mma_order  # no TMA form on the CPU
        monkeypatch.setattr(launch, "_hopper", lambda device: True)
    elif not launch.tma(dev):
        pytest.skip("no TMA form on this GPU")
    other = _module(_packed(bits, n, k, group=64), n, k).to(dev)
    other.dtype = torch.float16
    other.use_mma_order()
    assert not other.mma_order
    m.use_mma_order()
    assert m.mma_order and not torch.equal(m.qweight.cpu(), p.qweight)
    m.use_mma_order()
    assert torch.equal(quant.from_mma_order(m.qweight, bits).cpu(), p.qweight)
    assert all(torch.equal(a.cpu(), b) for (_, a), (_, b) in zip(m.packed().tensors(""),
                                                                p.tensors(""), strict=True))
    ours = m.fused(x)
    torch.testing.assert_close(ours.float().cpu(), ref, rtol=2e-3, atol=2e-3)
    # forward: the GPU's kernel; the CPU's reference path on the dequantised (K order) matrix
    assert torch.equal(m(x), ours if dev.type == "cuda" else
                       torch.nn.functional.linear(x, p.dequantize().half()))
    if dev.type == "cpu":  # float32: not the C kernels (K order), the reference path
        assert torch.equal(m(x.float()), torch.nn.functional.linear(x.float(), p.dequantize()))
    r = torch.randn(5, n, generator=torch.Generator().manual_seed(2)).half().to(dev)
    assert torch.equal(m.fused(x, residual=r), r + ours)


def test_loading_a_quantized_model_on_the_cpu_asks_nothing_of_triton(llama_dir, monkeypatch):
    """load_model's pass into the mma order skips CPU modules before importing the Triton
    kernels (a CPU install of torch may come without Triton)."""
    import sys

    monkeypatch.setitem(sys.modules, "flover.ops.quant_triton", None)  # importing it fails
    model, _ = load_model(str(llama_dir), torch.float32, torch.device("cpu"), quantization="int4")
    layers = [m for m in model.modules() if isinstance(m, quant.QuantLinear)]
    assert layers and not any(m.mma_order for m in layers)


# --- formats ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64])
def test_quantize_dequantize_error_is_within_half_a_step(bits, group):
    w = torch.randn(24, 128) * 0.1
    p = quant.quantize(w, bits, group)
    err = (p.dequantize() - w).abs().view(24, -1, group)
    step = p.scales.float()[..., None]
    assert torch.all(err <= step * 0.51 + 1e-6)  # half a step (the float16 min adds a little)
    assert p.qweight.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert p.qweight.shape == (24, 64 if bits == 4 else 128)


def test_nibble_layout_is_llama_cpp_s():
    """Byte j of a block holds weight j (low nibble) and weight j + 16 (high nibble)."""
    q = torch.arange(32).remainder(16).view(1, 32)
    packed = quant._pack_nibbles(q)
    assert packed[0, 0].item() == 0 | (0 << 4) and packed[0, 1].item() == 1 | (1 << 4)
    assert torch.equal(quant._unpack_nibbles(packed), q.to(torch.uint8))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_dequantise_exactly_like_gguf(kind):
    """A GGUF tensor kept packed holds exactly the weights gguf's own dequantisation gives."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize, quantize

    qtype = gguf.GGMLQuantizationType[kind]
    w = np.random.default_rng(0).normal(0, 0.05, (6, 96)).astype(np.float32)
    raw = quantize(w, qtype)
    p = quant.from_gguf(kind, raw, (6, 96))
    assert torch.equal(p.dequantize(), torch.from_numpy(dequantize(raw, qtype).reshape(6, 96)))


# --- kernels -------------------------------------------------------------------------------------

needs_kernel = pytest.mark.skipif(quant_cpu.lib() is None, reason="no C compiler")


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 3, 8, 13])
@pytest.mark.parametrize("group", [32, 64])
def test_cpu_kernel_equals_dequantised_linear(bits, m, group):
    n, k = 37, 128  # an odd column count: the kernel's single-column tail
    p = _packed(bits, n, k, group)
    x = torch.randn(m, k)
    ref = torch.nn.functional.linear(x.double(), p.dequantize().double()).float()
    torch.testing.assert_close(_module(p, n, k)(x), ref, atol=2e-6, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_kernel_row_is_bitwise_independent_of_the_batch(bits):
    p = _packed(bits, 19, 96)
    mod = _module(p, 19, 96)
    x = torch.randn(13, 96)
    together = mod(x)
    for i in (0, 7, 8, 12):
        assert torch.equal(mod(x[i:i + 1]), together[i:i + 1])
    assert torch.equal(mod(x[8:13]), together[8:13])


@pytest.mark.parametrize("bits", [4, 8])
def test_reference_path_for_other_dtypes(bits):
    """Off the CPU float32 path (here bfloat16), QuantLinear dequantises and calls F.linear."""
    p = _packed(bits, 8, 64)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x, p.dequantize().to(torch.bfloat16))
    assert torch.equal(_module(p, 8, 64)(x), ref)


# --- loading and the engine ------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_checkpoint_quantized_at_load(llama_dir, llama_tied_dir, bits):
    for path, tied in ((llama_dir, False), (llama_tied_dir, True)):
        full, _ = load_model(str(path), torch.float32, torch.device("cpu"))
        model, _ = load_model(str(path), torch.float32, torch.device("cpu"),
                              quantization=f"int{bits}")
        quantized = {n for n, m in model.named_modules() if isinstance(m, quant.QuantLinear)}
        hidden = model.cfg.hidden_size
        # every linear whose input width splits into groups of 32, the head included
        assert ("lm_head" in quantized) == (hidden % 32 == 0)
        assert "model.layers.0.mlp.gate_up_proj" in quantized or hidden % 32
        if tied and hidden % 32 == 0:
            assert not isinstance(model.lm_head, TiedHead)
        x = torch.randn(5, hidden)
        rel = (model.logits(x) - full.logits(x)).norm() / full.logits(x).norm()
        assert rel < (0.1 if bits == 4 else 0.01)


def test_quantized_layers_use_the_same_blocks_as_the_dequantised_model(llama_dir):
    """Each QuantLinear dequantises to the quantization of the checkpoint's own matrix."""
    from flover.weights import hf_tensors

    model, _ = load_model(str(llama_dir), torch.float32, torch.device("cpu"), quantization="int4")
    w = dict(hf_tensors(Path(llama_dir)))["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(model.model.layers[1].mlp.down_proj.packed().dequantize(),
                       quant.quantize(w, 4).dequantize())


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_fusion_invariance_with_quantized_weights(llama_dir, quantization):
    """A request's greedy tokens alone == fused with others that arrive at other times."""
    cfg = EngineConfig(model=str(llama_dir), device="cpu", max_concurrency=4, max_seq_len=64,
                       quantization=quantization)
    eng = Engine(cfg)
    ps = prompts(4, seed=3)
    alone = []
    for i, p in enumerate(ps):
        eng.add_request(f"solo{i}", p, GREEDY)
        alone.append([o for o in eng.run_until_done() if o.finished][0].token_ids)
    fused = {}
    for i, p in enumerate(ps):  # staggered: each joins a batch already decoding
        eng.add_request(f"fused{i}", p, GREEDY)
        for o in eng.step():
            if o.finished:
                fused[o.request_id] = o.token_ids
    for o in eng.run_until_done():
        if o.finished:
            fused[o.request_id] = o.token_ids
    assert [fused[f"fused{i}"] for i in range(4)] == alone
    assert all(0 <= t < VOCAB for t in alone[0])


def test_quantization_values_are_checked():
    assert EngineConfig(quantization="NONE").quantization is None
    assert EngineConfig(quantization="Int4").quantization == "int4"
    with pytest.raises(ConfigError, match="quantization='int3'"):
        EngineConfig(quantization="int3")


def test_ini_and_cli_take_the_quantization(tmp_path):
    from flover.cli import build_parser
    from flover.run.ini import load_config

    ini = tmp_path / "q.ini"
    ini.write_text("[model_specification]\nmodel_type=llama_7b\nweight_quantization=int8\n")
    assert load_config(str(ini)).engine_config().quantization == "int8"
    ini.write_text("[model_specification]\nmodel_type=llama_7b\nweight_quantization=int2\n")
    with pytest.raises(ConfigError, match="weight_quantization"):
        load_config(str(ini))
    args = build_parser().parse_args(["generate", "--prompt", "x", "--quantization", "none"])
    assert args.quantization == "none"


# --- the embedded model: its GGUF file kept packed -----------------------------------------

@pytest.fixture(scope="module")
def embedded_pair():
    pytest.importorskip("gguf")
    packed = LLM(device="cpu", max_concurrency=12, max_seq_len=256)  # quantization="auto"
    full = LLM(device="cpu", max_concurrency=12, max_seq_len=256, quantization="none")
    return packed, full


def test_embedded_model_keeps_its_gguf_blocks(embedded_pair):
    packed, full = embedded_pair
    model = packed.engine.model
    layers = [m for m in model.modules() if isinstance(m, quant.QuantLinear)]
    assert len(layers) == 4 * model.cfg.num_layers + 1  # qkv, o, gate_up, down; the head
    assert {m.bits for m in model.model.layers.modules() if isinstance(m, quant.QuantLinear)} == {4}
    assert model.lm_head.bits == 8  # token_embd is Q8_0 in this file
    # the packed model's layers hold exactly the weights of the dequantised (fp32) model
    for name in ("model.layers.3.self_attn.qkv_proj", "model.layers.7.mlp.down_proj", "lm_head"):
        ours = model.get_submodule(name).packed().dequantize()
        assert torch.equal(ours, _dense_weight(full.engine.model.get_submodule(name), ours.shape[1]))


def _dense_weight(mod, k: int) -> torch.Tensor:
    """The float32 matrix of a (possibly oneDNN-packed) linear: its product with I (exact)."""
    return mod(torch.eye(k)).T.contiguous()


def test_embedded_greedy_tokens_agree_with_the_dequantised_model(embedded_pair):
    """The demo prompts, all 12 fused: packed (Q4_1 + Q8_0 kernels) vs dequantised fp32.
    Measured: 12 of 12 identical over 64 tokens (docs/PERF.md, "Weight-only int8 / int4")."""
    packed, full = embedded_pair
    lines = (Path(__file__).parents[1] / "configs" / "demo_prompts.jsonl").read_text().splitlines()
    convs = [json.loads(line)["messages"] for line in lines]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    ours = [o.token_ids for o in packed.chat(convs, params)]
    theirs = [o.token_ids for o in full.chat(convs, params)]
    assert ours == theirs

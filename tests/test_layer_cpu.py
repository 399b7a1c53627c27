"""The LLaMA decoder layer in one compiled call (flover/ops/layer_cpu.c) against the layer's
Python path: every call, bit for bit, output and caches."""

from __future__ import annotations

import pytest
import torch
from conftest import prompts

from flover import LLM, Engine, EngineConfig, SamplingParams
from flover.ops import layer_cpu, quant_cpu

pytestmark = pytest.mark.skipif(layer_cpu.lib() is None, reason="no C compiler")
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture
def checked(monkeypatch):
    """Run the Python layer beside every compiled call, on copies of the caches, and hold
    the two equal; counts the calls."""
    state = {"calls": 0}
    real_prepare, real_layer = layer_cpu.prepare, layer_cpu.decode_layer

    def prepare(x, meta, k_caches, v_caches):
        state["meta"] = meta
        return real_prepare(x, meta, k_caches, v_caches)

    def decode_layer(layer, x, rotary, prep, k_cache, v_cache):
        k2, v2 = k_cache.clone(), v_cache.clone()
        ref = layer(x, rotary, state["meta"], k2, v2)
        y = real_layer(layer, x, rotary, prep, k_cache, v_cache)
        if y is not None:
            state["calls"] += 1
            assert torch.equal(y.view(torch.int32), ref.view(torch.int32))
            assert torch.equal(k_cache, k2) and torch.equal(v_cache, v2)
        return y

    monkeypatch.setattr(layer_cpu, "prepare", prepare)
    monkeypatch.setattr(layer_cpu, "decode_layer", decode_layer)
    return state


def _staggered(eng: Engine, ps: list[list[int]]) -> dict[str, list[int]]:
    """Requests joining a batch already decoding, so rows sit at different positions."""
    out = {}
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", p, GREEDY)
        out |= {o.request_id: o.token_ids for o in eng.step() if o.finished}
    out |= {o.request_id: o.token_ids for o in eng.run_until_done() if o.finished}
    return out


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_compiled_layer_is_the_python_layer_bit_for_bit(llama_dir, quantization, checked):
    """GQA (4 query heads over 2), fused decode rows at different positions and slots."""
    eng = Engine(EngineConfig(model=str(llama_dir), device="cpu", max_concurrency=4,
                              max_seq_len=64, quantization=quantization))
    _staggered(eng, prompts(4, seed=5))
    assert checked["calls"] >= 2 * 4  # both layers in each of (at least) 4 decode-only iterations


def test_the_embedded_model_takes_the_compiled_layer(checked):
    """The embedded GGUF kept packed (Q4_1 layers, 9 query heads over 3): what `make run` runs."""
    pytest.importorskip("gguf")
    llm = LLM(device="cpu", max_concurrency=4, max_seq_len=128)
    llm.generate(["Hello there", "The capital of France is"], SamplingParams(max_tokens=4, temperature=0.0))
    assert checked["calls"] >= 30 * 3


def test_tokens_are_those_of_the_python_layer(llama_dir, monkeypatch):
    eng = Engine(EngineConfig(model=str(llama_dir), device="cpu", max_concurrency=4,
                              max_seq_len=64, quantization="int4"))
    ps = prompts(4, seed=6)
    compiled = _staggered(eng, ps)
    monkeypatch.setattr(layer_cpu, "prepare", lambda *a: None)
    assert _staggered(eng, ps) == compiled


def test_layers_it_cannot_take_run_as_before(llama_tied_dir, llama_dir, checked):
    """Full-precision linears, or a hidden size of 48 (not in groups of 32: the products stay
    in float32), run the Python layer: the compiled one is never called."""
    for path, q in ((llama_dir, "none"), (llama_tied_dir, "int4")):
        eng = Engine(EngineConfig(model=str(path), device="cpu", max_concurrency=2,
                                  max_seq_len=64, quantization=q))
        _staggered(eng, prompts(2, seed=7))
    assert checked["calls"] == 0


def test_a_position_outside_the_tables_is_refused(llama_dir):
    eng = Engine(EngineConfig(model=str(llama_dir), device="cpu", max_concurrency=2,
                              max_seq_len=64, quantization="int4"))
    model = eng.model
    layer, rot = model.model.layers[0], model.model.rotary
    k, v = eng.runner.cache.k[0], eng.runner.cache.v[0]
    before = k.clone()
    x = torch.randn(1, model.cfg.hidden_size)
    prep = (torch.tensor([0]), torch.tensor([rot.cos.shape[0]]), torch.tensor([1]))
    with pytest.raises(IndexError, match="outside"):
        layer_cpu.decode_layer(layer, x, rot, prep, k, v)
    assert torch.equal(k, before)  # nothing written


def test_without_the_kernels_nothing_is_compiled(monkeypatch):
    monkeypatch.setenv("FLOVER_NO_CPU_LAYER", "1")
    layer_cpu.lib.cache_clear()
    try:
        assert layer_cpu.lib() is None
    finally:
        monkeypatch.delenv("FLOVER_NO_CPU_LAYER")
        layer_cpu.lib.cache_clear()
    assert (layer_cpu.lib() is None) == (quant_cpu.lib() is None)

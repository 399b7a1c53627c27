"""Our model code against transformers' on the same weights (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy, hf_model, prompts

from flover import Engine, EngineConfig, SamplingParams
from flover.engine.scheduler import Batch, Chunk
from flover.engine.sequence import Request
from flover.models import ModelFormatError


def engine(path, **kw) -> Engine:
    kw.setdefault("max_concurrency", 4)
    kw.setdefault("max_seq_len", 128)
    kw.setdefault("dtype", "float32")
    return Engine(EngineConfig(model=str(path), device="cpu", **kw))


def test_prefill_logits_match_transformers(checkpoint):
    eng, ref = engine(checkpoint), hf_model(checkpoint)
    prompt = prompts(1, seed=3, low=12, high=13)[0]
    req = Request("r", prompt, SamplingParams())
    # logits at every prompt position: ask for all rows of one prefill chunk
    ids, meta, _ = eng.runner.prepare(Batch([], [Chunk(req, eng.slots.allocate(req), 0, len(prompt))]))
    with torch.inference_mode():
        ours = eng.model.logits(eng.model(ids, meta, eng.cache.k, eng.cache.v))
        theirs = ref(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_match_transformers_generate(checkpoint):
    eng, ref = engine(checkpoint), hf_model(checkpoint)
    for i, p in enumerate(prompts(3, seed=4)):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        outs = [o for o in eng.run_until_done() if o.finished]
        assert outs[0].token_ids == hf_greedy(ref, p, 12)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_runs_close_to_float32(llama_dir, dtype):
    p = prompts(1, seed=5)[0]
    params = SamplingParams(max_tokens=1, temperature=0.0)
    e32, e16 = engine(llama_dir), engine(llama_dir, dtype=dtype)
    assert e16.model.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    r32 = Request("a", p, params)
    r16 = Request("a", p, params)
    l32 = e32.runner.forward_logits(Batch([], [Chunk(r32, e32.slots.allocate(r32), 0, len(p))], [r32]))
    l16 = e16.runner.forward_logits(Batch([], [Chunk(r16, e16.slots.allocate(r16), 0, len(p))], [r16]))
    assert torch.isfinite(l16).all()
    torch.testing.assert_close(l16, l32, rtol=0.05, atol=0.1)


def test_unknown_model_name_lists_what_is_accepted():
    with pytest.raises(ModelFormatError, match="unknown model 'llama_8b'.*preset.*gguf"):
        engine("llama_8b")


def test_checkpoint_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelFormatError, match="no config.json"):
        engine(tmp_path)


def test_checkpoint_with_missing_tensor_is_rejected(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(llama_dir / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(ModelFormatError, match="missing 1 tensors.*up_proj"):
        engine(tmp_path)


def test_presets_build_with_real_shapes():
    from flover.models.presets import PRESETS

    assert PRESETS["llama_65b"].intermediate_size == 22016
    assert round(PRESETS["llama_7b"].num_params() / 1e9, 1) == 6.7
    assert round(PRESETS["gptj_6b"].num_params() / 1e9, 1) == 6.1
    eng = engine("tiny_llama")
    eng.add_request("r", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert [len(o.token_ids) for o in eng.run_until_done()][-1] == 4

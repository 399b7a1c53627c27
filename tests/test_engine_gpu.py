"""The engine on a GPU, CUDA graphs and Triton kernels included: fusion and isolation.

Skipped without a GPU (CI has none); `bench/gpu_check.sh` runs them on the device.
"""

from __future__ import annotations

import pytest
import torch
from test_engine import finals as run

from flover import Engine, EngineConfig, SamplingParams
from flover.sampling import sampler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
WORK = [(0, [5, 6, 7], GREEDY), (0, list(range(3, 40)), GREEDY), (2, [9] * 5, GREEDY),
        (3, [11, 12], SamplingParams(max_tokens=9, temperature=0.8, seed=3, ignore_eos=True)),
        (5, [13, 14, 15, 16], SamplingParams(max_tokens=7, n=2, temperature=1.0, seed=4,
                                              ignore_eos=True))]


def engine(model="tiny_llama") -> Engine:
    return Engine(EngineConfig(model=model, dtype="float32", device="cuda", max_concurrency=8,
                               max_seq_len=128))


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gptj"])
def test_fused_requests_give_their_solo_tokens_under_cuda_graphs(model):
    fused = run(engine(model), WORK)
    for i, item in enumerate(WORK):
        alone = run(engine(model), [(0, item[1], item[2])])["r0"]
        assert [c.token_ids for c in fused[f"r{i}"].outputs] == [c.token_ids for c in alone.outputs]


def test_a_fault_in_one_request_leaves_the_others_exact_under_cuda_graphs(monkeypatch):
    clean = run(engine(), WORK)
    real = sampler.row_sampling

    def faulty(req, vocab, shared):
        if req.request_id.startswith("r3"):
            raise RuntimeError("injected")
        return real(req, vocab, shared)
    monkeypatch.setattr(sampler, "row_sampling", faulty)
    eng = engine()
    got = run(eng, WORK)
    assert got["r3"].finish_reason == "error" and "injected" in got["r3"].error
    for rid in ("r0", "r1", "r2", "r4"):
        assert [c.token_ids for c in got[rid].outputs] == [c.token_ids for c in clean[rid].outputs]
    assert eng.stats()["slots_used"] == 0


def _logged(model: str, dtype: str, budget: int, work, graphs: bool = True,
            engines: list | None = None, **kw) -> dict[str, list[torch.Tensor]]:
    """Each request's logits rows, step by step, under batch invariance (the default)."""
    eng = Engine(EngineConfig(model=model, dtype=dtype, device="cuda", max_concurrency=8,
                              max_seq_len=128, prefill_token_budget=budget, cuda_graphs=graphs,
                              **kw))
    if engines is not None:
        engines.append(eng)
    seen = record_logits(eng)
    run(eng, work)
    assert seen, "no logits recorded"
    return seen


def record_logits(eng: Engine) -> dict[str, list[torch.Tensor]]:
    """Each row's ("request.index") logits, step by step, as the runner selects its token:
    `launch_select`, which the synchronous and the async scheduling paths both go through."""
    seen: dict[str, list[torch.Tensor]] = {}
    real = eng.runner.launch_select

    def spy(logits, rows, slots, failed=None):
        for i, r in enumerate(rows):
            seen.setdefault(f"{r.request_id}.{r.index}", []).append(logits[i].clone())
        return real(logits, rows, slots, failed)
    eng.runner.launch_select = spy
    return seen


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gptj"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("epilogues", [False, True])
def test_fused_and_chunked_logits_are_bitwise_the_solo_logits(model, dtype, epilogues,
                                                               monkeypatch):
    """Also with the folded norm and SiLU * up as the products' epilogues on Hopper."""
    from flover.ops import fused as fused_ops

    monkeypatch.setattr(fused_ops, "FOLDED", epilogues)
    fused = _logged(model, dtype, 8, WORK)  # budget 8: the longer prompts prefill in chunks
    for i, item in enumerate(WORK):
        alone = _logged(model, dtype, 2048, [(0, item[1], item[2])])
        for key, steps in alone.items():
            got = fused[key.replace("r0", f"r{i}", 1)]
            assert len(got) == len(steps)
            assert all(torch.equal(a, b) for a, b in zip(got, steps, strict=True)), (i, key)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mixed_iterations_replay_graphs_bitwise_equal_to_the_eager_forward(dtype):
    """With invariant kernels every iteration, prompt chunks beside decode rows included,
    replays a CUDA graph (cuda_graph.TokenGraphs), and its logits are the eager ones bit for bit."""
    engines: list[Engine] = []
    graphed = _logged("tiny_llama", dtype, 8, WORK, engines=engines)
    eager = _logged("tiny_llama", dtype, 8, WORK, graphs=False)
    assert graphed.keys() == eager.keys()
    for key, steps in eager.items():
        assert all(torch.equal(a, b) for a, b in zip(graphed[key], steps, strict=True)), key
    eng = engines[0]
    assert eng.runner.graphs.replays == eng.stats()["iterations"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_paged_fused_chunked_and_prefix_cached_logits_are_bitwise_the_solo_logits(dtype):
    """Pages: prompt tokens go through the paged decode kernel one row each, so chunks, cached
    prefixes (r5 shares r1's first 32 tokens) and fusion change no bit of any request's logits."""
    work = WORK + [(6, list(range(3, 40))[:32] + [7, 8, 9], GREEDY)]
    pages = dict(kv_layout="pages", num_kv_blocks=64, block_size=16)
    fused = _logged("tiny_llama", dtype, 8, work, **pages)
    for i, item in enumerate(work):
        alone = _logged("tiny_llama", dtype, 2048, [(0, item[1], item[2])], **pages)
        for key, steps in alone.items():
            got = fused[key.replace("r0", f"r{i}", 1)]
            assert all(torch.equal(a, b) for a, b in zip(got, steps, strict=True)), (i, key)

"""Async scheduling on a GPU: CUDA graphs replayed with their input ids gathered on the
device from the previous iteration's tokens give the synchronous engine's tokens and, under
batch invariance, its logits bit for bit.

Skipped without a GPU (CI has none); run on the device with the other GPU tests.
"""

from __future__ import annotations

import pytest
import torch
from test_engine import finals
from test_engine_gpu import WORK, record_logits

from flover import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def with_stops(dtype: str, **kw) -> list:
    """WORK (staggered, a long prompt, seeded, n=2) and rows that end by a stop token, each at
    a token its prompt does produce (one wasted token each with async on, dropped)."""
    prompt = [21, 22, 23]
    plain, _, _ = logged([(0, prompt, SamplingParams(max_tokens=30, temperature=0.0))], False,
                         dtype, **kw)
    out = plain["r0"][0][0]
    return WORK + [(4 + i, prompt, SamplingParams(max_tokens=30, temperature=0.0,
                                                   stop_token_ids=[out[k]]))
                   for i, k in enumerate((1, 4, 9)) if k < len(out)]


def logged(work, on: bool, dtype: str = "float16", **kw) -> tuple[dict, dict, Engine]:
    """(each request's final tokens, each row's logits step by step, the engine)."""
    eng = Engine(EngineConfig(model="tiny_llama", dtype=dtype, device="cuda", max_concurrency=8,
                              max_seq_len=128, prefill_token_budget=8, async_scheduling=on, **kw))
    seen = record_logits(eng)
    done = finals(eng, work)
    tokens = {k: ([c.token_ids for c in o.outputs], o.finish_reason) for k, o in done.items()}
    return tokens, seen, eng


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_async_tokens_and_logits_equal_sync_under_cuda_graphs(dtype):
    work = with_stops(dtype)
    sync_tokens, sync_logits, _ = logged(work, False, dtype)
    tokens, logits, eng = logged(work, True, dtype)
    assert eng.async_scheduling and eng.runner.graphs.replays == eng.stats()["iterations"]
    assert tokens == sync_tokens
    assert {t[1] for t in tokens.values()} == {"length", "stop"}
    for key, steps in sync_logits.items():  # async rows may have one more (wasted) step
        got = logits[key][:len(steps)]
        assert all(torch.equal(a, b) for a, b in zip(got, steps, strict=True)), key


def test_async_decode_graphs_without_batch_invariance_give_the_sync_tokens():
    """--no-batch-invariant: decode iterations replay DecodeGraphs (fed on the device), mixed
    ones run eagerly (their input ids patched on the device too)."""
    work = with_stops("float32", batch_invariant=False)
    sync_tokens, _, _ = logged(work, False, "float32", batch_invariant=False)
    tokens, _, eng = logged(work, True, "float32", batch_invariant=False)
    assert eng.async_scheduling and tokens == sync_tokens
    assert {t[1] for t in tokens.values()} == {"length", "stop"}


def test_async_paged_decode_graphs_give_the_sync_tokens_through_preemption():
    """kv_layout=pages: decode iterations replay PagedDecodeGraphs fed on the device, mixed ones
    run eagerly; a pool too small for every row preempts with iterations in flight."""
    kw = dict(kv_layout="pages", block_size=8, num_kv_blocks=16)
    work = with_stops("float16", **kw)
    sync_tokens, _, sync = logged(work, False, "float16", **kw)
    tokens, _, eng = logged(work, True, "float16", **kw)
    assert eng.async_scheduling and tokens == sync_tokens
    assert eng.stats()["num_preemptions"] > 0 and eng.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("layout", ["slots", "pages"])
def test_an_async_launch_never_waits_for_the_device(layout):
    """Under async scheduling, queuing iteration i+1 must not wait for iteration i: no
    synchronizing CUDA call in `launch` (a copy from pageable host memory would be one), for
    graphed and eager iterations (pages run prompt chunks eagerly), with sampled rows (top-k,
    top-p, min-p, a logit bias, min_tokens, logprobs) beside greedy ones."""
    extra = {"kv_layout": "pages", "block_size": 16} if layout == "pages" else {}
    eng = Engine(EngineConfig(model="tiny_llama", dtype="float16", device="cuda", max_concurrency=8,
                              max_seq_len=128, prefill_token_budget=8, async_scheduling=True,
                              **extra))
    real, launches = eng.runner.launch, []

    def launch(batch, prev=None):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(batch, prev)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            launches.append(prev is not None)
    eng.runner.launch = launch
    sampled = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05,
                             seed=1, logit_bias={5: 2.0}, min_tokens=3, logprobs=2)
    work = WORK + [(1, [30, 31, 32, 33], sampled), (4, list(range(40, 60)), sampled)]
    done = finals(eng, work)
    errors = {o.error for o in done.values() if o.finish_reason == "error"}
    assert not errors, errors
    assert sum(launches) > 10  # launched with an iteration in flight

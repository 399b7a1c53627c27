"""The padded, static-shaped decode path behind the CUDA graphs equals the plain forward.

On the CPU the path runs eagerly (capture=False): that checks the padding rows, the bucket
sizes and the one-copy input buffer. With a GPU the graphs themselves are captured too.
"""

from __future__ import annotations

import pytest
import torch
from test_engine import engine, greedy, run_staggered

from flover.config import SamplingParams
from flover.engine.cuda_graph import DecodeGraphs, TokenGraphs, bucket_sizes, token_buckets
from flover.engine.kv_cache import SlotCache
from flover.engine.runner import ModelRunner
from flover.engine.scheduler import Batch, Chunk
from flover.engine.sequence import Request, Status
from flover.weights import load_model

CAPTURE = [False] + ([True] if torch.cuda.is_available() else [])


def test_bucket_sizes_grow_then_step_by_16_up_to_the_slot_count():
    assert bucket_sizes(64) == [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
    assert bucket_sizes(40) == [1, 2, 4, 8, 12, 16, 24, 32, 40]
    assert bucket_sizes(3) == [1, 2, 3]


def prefilled_rows(plain: ModelRunner, cache: SlotCache) -> Batch:
    """Prefill three requests in slots 0..2; a decode batch of rows 0 and 2 (1 pads)."""
    gen = torch.Generator().manual_seed(0)
    reqs = []
    for i, n in enumerate([5, 17, 9]):
        r = Request(f"r{i}", torch.randint(3, 256, (n,), generator=gen).tolist(), SamplingParams())
        plain.forward_logits(Batch([], [Chunk(r, i, 0, n)]))
        r.num_computed, r.status = n, Status.DECODE
        reqs.append(r)
    return Batch([reqs[0], None, reqs[2]], [], [reqs[0], reqs[2]], [0, 2])


@pytest.mark.parametrize("capture", CAPTURE)
@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_gptj"])
def test_padded_decode_matches_plain_forward(preset, capture):
    dev = torch.device("cuda" if capture else "cpu")
    model, _ = load_model(preset, torch.float32, dev, seed=1)
    cache = SlotCache(model.cfg.num_layers, 8, model.cfg.num_kv_heads, 64, model.cfg.head_dim,
                      torch.float32, dev)
    plain = ModelRunner(model, cache, cuda_graphs=False)
    batch = prefilled_rows(plain, cache)  # slot 1 is not decoding: a padding row inside
    rows = batch.decode
    expected = plain.forward_logits(batch)
    graphs = DecodeGraphs(model, cache, capture=capture)
    if capture:
        graphs.capture_all()  # as the runner does when the engine starts
    assert graphs.bucket(len(rows)) == 4
    for _ in range(2):  # twice: the second refills the same input buffer
        got = graphs.forward_logits(rows)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_token_buckets_cover_decode_rows_then_prompt_chunks():
    assert token_buckets(8, 8 + 200) == [1, 2, 4, 8, 64, 96, 128, 192, 208]
    assert token_buckets(64, 64 + 2048)[:12] == [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128]
    assert token_buckets(64, 64 + 2048)[-3:] == [1536, 2048, 2112]


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_iteration_through_the_token_graph_path_gives_the_plain_tokens(llama_dir, shuffle):
    """TokenGraphs' host side (flat tokens, padding, buckets, rows kept) on the CPU: prompt
    chunks beside decode rows, n samples and a hole in the slots (shuffle off) all replay the
    static-shaped forward (eagerly here), and every request's tokens equal the plain engine's."""
    work = [(0, list(range(3, 40)), greedy(9)), (1, [5, 6, 7], greedy(12)),
            (2, [9] * 21, greedy(4)),
            (3, [11, 12], SamplingParams(max_tokens=6, n=2, temperature=0.9, seed=5,
                                         ignore_eos=True))]
    kw = dict(max_concurrency=5, prefill_token_budget=8, use_mem_shuffle=shuffle)
    plain = run_staggered(engine(llama_dir, **kw), work)
    eng = engine(llama_dir, **kw)
    graphs = TokenGraphs(eng.model, eng.cache, 8, capture=False)
    eng.runner.graphs = graphs
    assert run_staggered(eng, work) == plain
    assert graphs.replays == eng.stats()["iterations"]  # prompt chunks included

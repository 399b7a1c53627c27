"""The paged KV cache: blocks taken as rows grow, shared prefixes computed once, preemption.

Every test holds the same contract as the slot layout: each request's greedy tokens equal
transformers' and its solo run's, whatever runs beside it, and every block goes back.
"""

from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy, hf_model, prompts
from test_engine import finals as run

from flover import Engine, EngineConfig, SamplingParams
from flover.engine.block_manager import BlockAllocator, block_hash


def engine(path, **kw) -> Engine:
    kw.setdefault("max_concurrency", 4)
    kw.setdefault("max_seq_len", 64)
    kw.setdefault("block_size", 8)
    kw.setdefault("kv_layout", "pages")
    return Engine(EngineConfig(model=str(path), dtype="float32", device="cpu", **kw))


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def tokens(done: dict) -> dict:
    return {rid: [c.token_ids for c in out.outputs] for rid, out in done.items()}


def assert_pool_empty(eng: Engine) -> None:
    s = eng.stats()
    assert s["kv_blocks_used"] == 0 and s["slots_live"] == 0 and s["in_flight"] == 0
    assert all(r == 0 for r in eng.slots.ref)


def test_staggered_chunked_requests_equal_transformers(checkpoint):
    ref = hf_model(checkpoint)
    ps = prompts(6, seed=11)
    lengths = [9, 3, 14, 6, 11, 8]
    work = [(it, p, greedy(n)) for it, p, n in zip([0, 0, 1, 2, 4, 6], ps, lengths, strict=True)]
    eng = engine(checkpoint, prefill_token_budget=10)  # chunks prompts across iterations
    done = run(eng, work)
    for i, (_, p, params) in enumerate(work):
        assert done[f"r{i}"].outputs[0].token_ids == hf_greedy(ref, p, params.max_tokens), i
    assert_pool_empty(eng)


def test_pages_give_the_slot_layouts_tokens_for_samples_and_beams(llama_dir):
    ps = prompts(4, seed=5)
    work = [(0, ps[0], greedy(10)),
            (1, ps[1], SamplingParams(max_tokens=9, n=3, temperature=0.9, seed=4, ignore_eos=True)),
            (2, ps[2], greedy(8, beam_width=3)),
            (2, ps[3], SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True,
                                      repetition_penalty=1.4, presence_penalty=0.5))]
    slots = Engine(EngineConfig(model=str(llama_dir), dtype="float32", device="cpu",
                                max_concurrency=8, max_seq_len=64))
    want = tokens(run(slots, work))
    eng = engine(llama_dir, max_concurrency=8)
    assert tokens(run(eng, work)) == want
    assert_pool_empty(eng)


def test_forks_share_their_prompt_blocks(llama_dir):
    eng = engine(llama_dir, max_concurrency=4)
    prompt = list(range(3, 3 + 21))  # 2 full blocks and a partial one
    eng.add_request("n4", prompt, SamplingParams(max_tokens=5, n=4, temperature=1.0, seed=1,
                                                 ignore_eos=True))
    eng.step()  # the head computes the prompt; every row samples its first token from it
    eng.step()  # each fork's first decode write copies the partial block (copy on write)
    rows = eng.scheduler.running
    tables = [eng.slots.table(r) for r in rows]
    assert all(t[:2] == tables[0][:2] for t in tables)  # full prompt blocks shared
    assert len({t[2] for t in tables}) == 4  # the partial block: one copy each
    assert eng.stats()["kv_blocks_used"] == 2 + 4
    list(eng.run_until_done())
    assert_pool_empty(eng)


def test_a_pool_too_small_for_all_preempts_the_newest_and_changes_no_token(llama_dir):
    ps = prompts(4, seed=21, low=10, high=20)
    work = [(i, p, greedy(24)) for i, p in enumerate(ps)]
    work.append((1, prompts(1, seed=22)[0], greedy(8, beam_width=2)))
    work.append((2, prompts(1, seed=23)[0],
                 SamplingParams(max_tokens=12, n=2, temperature=1.0, seed=7, ignore_eos=True,
                                frequency_penalty=0.5)))
    roomy = engine(llama_dir, max_concurrency=8)
    want = tokens(run(roomy, work))
    assert roomy.stats()["num_preemptions"] == 0
    tight = engine(llama_dir, max_concurrency=8, num_kv_blocks=14, enable_prefix_caching=False)
    assert tokens(run(tight, work)) == want
    assert tight.stats()["num_preemptions"] > 0
    assert_pool_empty(tight)


def test_a_shared_prefix_is_computed_once_and_changes_no_token(llama_tied_dir):
    ref = hf_model(llama_tied_dir)
    prefix = prompts(1, seed=3, low=30, high=31)[0]  # 3 full blocks of 8, and 6 more tokens
    tails = prompts(3, seed=4, low=2, high=6)
    work = [(0, prefix + tails[0], greedy(6)), (3, prefix + tails[1], greedy(6)),
            (4, prefix + tails[2], greedy(6)), (9, prefix[:24], greedy(4))]
    eng = engine(llama_tied_dir)
    done = run(eng, work)
    for i, (_, p, params) in enumerate(work):
        assert done[f"r{i}"].outputs[0].token_ids == hf_greedy(ref, p, params.max_tokens), i
    s = eng.stats()
    # r1, r2 find the prefix's 3 full blocks; r3's whole prompt is 3 cached blocks, yet it
    # computes its last block's tokens again: its last token's logits are needed
    assert s["prefix_cache_hits"] == 3 + 3 + 2
    assert s["prefill_tokens_saved"] == 8 * 8
    total = sum(len(p) for _, p, _ in work)
    assert s["prefill_tokens"] == total - 64
    assert_pool_empty(eng)


def test_requests_arriving_together_wait_for_their_shared_prefix_once(llama_dir):
    prefix = prompts(1, seed=8, low=40, high=41)[0]  # 5 full blocks of 8
    tails = prompts(3, seed=9, low=3, high=7)
    work = [(0, prefix + t, greedy(5)) for t in tails]
    want = tokens(run(engine(llama_dir, enable_prefix_caching=False), work))
    eng = engine(llama_dir)
    assert tokens(run(eng, work)) == want
    s = eng.stats()
    assert s["prefix_cache_hits"] == 2 * 5  # the two later ones waited an iteration for it
    assert s["prefill_tokens"] == sum(len(p) for _, p, _ in work) - 2 * 40
    assert_pool_empty(eng)


def test_prefix_caching_off_computes_every_prompt():
    a = BlockAllocator(10, 4, 2, prefix_caching=False)
    for row in ("x", "y"):
        a.add_row(row)
        assert a.allocate_prompts([(row, list(range(9)), True)]) == [0]
        a.register(row, list(range(9)), 9)
    assert a.hits == 0 and a.used == 6


def test_block_keys_are_sha256_of_the_parent_key_and_the_tokens():
    """A key collision would hand a row another prompt's KV: keys are SHA-256 digests (as
    vLLM's sha256 option), not Python's 64-bit tuple hash, and chain through the parent."""
    import hashlib
    from array import array

    first = block_hash(None, (1, 2, 3, 4))
    assert first == hashlib.sha256(array("q", [1, 2, 3, 4]).tobytes()).digest()
    assert block_hash(first, (5, 6, 7, 8)) == hashlib.sha256(
        first + array("q", [5, 6, 7, 8]).tobytes()).digest()
    keys = {first, block_hash(None, (1, 2, 3, 5)), block_hash(None, (2, 1, 3, 4)),
            block_hash(first, (1, 2, 3, 4)), block_hash(block_hash(None, (0,) * 4), (1, 2, 3, 4))}
    assert len(keys) == 5


def test_unreferenced_blocks_stay_cached_and_the_least_recently_used_go_first():
    a = BlockAllocator(6, 2, 4, prefix_caching=True)  # 5 usable blocks of 2 tokens
    old, new = [1, 2, 3, 4, 5], [7, 8, 9]
    for row, toks in (("old", old), ("new", new)):
        a.add_row(row)
        a.allocate_prompts([(row, toks, True)])
        a.register(row, toks, len(toks))
        a.remove_row(row)
    assert a.used == 0 and len(a.cached) == 3  # old's 2 full blocks, new's 1
    assert len(a.match(old)) == 2 and len(a.match(new + [0])) == 1
    a.add_row("z")  # 3 fresh blocks: the 2 never cached, then the least recently used one
    a.allocate_prompts([("z", [20, 21, 22, 23, 24, 25], False)])
    assert len(a.match(old)) == 1  # old's tail went first (a row frees its tail first)
    assert len(a.match(new + [0])) == 1  # new's block, used later, survived
    a.remove_row("z")
    assert a.used == 0


def test_a_request_larger_than_the_pool_is_refused_and_others_go_on(llama_dir):
    from flover import RequestError

    eng = engine(llama_dir, num_kv_blocks=5)
    with pytest.raises(RequestError, match="KV blocks"):
        eng.add_request("big", list(range(3, 30)), greedy(10))
    eng.add_request("ok", [3, 4, 5], greedy(4))
    assert [o.finished for o in eng.run_until_done()][-1]
    assert_pool_empty(eng)


@pytest.mark.parametrize("kwargs, message", [
    ({"kv_layout": "paged"}, "kv_layout"),
    ({"block_size": 12}, "block_size"),
    ({"num_kv_blocks": 1}, "num_kv_blocks"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"enable_prefix_caching": True}, "enable_prefix_caching"),  # with slots
])
def test_invalid_kv_settings_name_the_key(kwargs, message):
    from flover.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        EngineConfig(**kwargs)


def test_prefix_caching_is_on_by_default_with_pages_only():
    assert EngineConfig(kv_layout="pages").enable_prefix_caching is True
    assert EngineConfig().enable_prefix_caching is False


# --- attention over block tables ------------------------------------------------------------

def scattered_cache(lengths: list[int], kv_heads: int, d: int, bs: int, dtype=torch.float32):
    """A paged cache whose rows' blocks are scattered, and the same rows as slots."""
    gen = torch.Generator().manual_seed(0)
    width = -(-max(lengths) // bs)
    n_blocks = 1 + len(lengths) * width
    perm = (torch.randperm(n_blocks - 1, generator=gen) + 1).tolist()
    tables = torch.tensor([perm[i * width:(i + 1) * width] for i in range(len(lengths))])
    k_pages = torch.randn(n_blocks, kv_heads, bs, d, generator=gen).to(dtype)
    v_pages = torch.randn(n_blocks, kv_heads, bs, d, generator=gen).to(dtype)
    return k_pages, v_pages, tables


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (4, 1)])
def test_paged_decode_reference_equals_the_slot_reference(heads, kv_heads):
    from flover.ops.attention import (
        decode_attention_ref,
        gather_blocks,
        paged_decode_attention_ref,
    )

    d, bs, lengths = 16, 4, [5, 13, 1, 9]
    k_pages, v_pages, tables = scattered_cache(lengths, kv_heads, d, bs)
    q = torch.randn(len(lengths), heads, d)
    lens, max_len = torch.tensor(lengths), max(lengths)
    got = paged_decode_attention_ref(q, k_pages, v_pages, tables, lens, max_len, 0.3)
    k_slots, v_slots = gather_blocks(k_pages, tables, max_len), gather_blocks(v_pages, tables, max_len)
    assert torch.equal(k_slots[1, :, 6], k_pages[tables[1, 1], :, 2])  # position 6 = block 1, 2
    torch.testing.assert_close(got, decode_attention_ref(q, k_slots, v_slots, lens, max_len, 0.3))


def test_paged_prefill_chunk_equals_the_slot_reference():
    from flover.ops.attention import (
        PrefillChunk,
        gather_blocks,
        paged_prefill_attention_ref,
        prefill_attention_ref,
    )

    d, bs = 8, 4
    k_pages, v_pages, tables = scattered_cache([14], 2, d, bs)
    q = torch.randn(5, 4, d)
    chunk = PrefillChunk(0, 9, 5, 0, tables[0, :4])  # positions 9..13, after a cached prefix
    got = paged_prefill_attention_ref(q, k_pages, v_pages, chunk, 0.25)
    want = prefill_attention_ref(q, gather_blocks(k_pages, tables, 14),
                                 gather_blocks(v_pages, tables, 14), chunk, 0.25)
    torch.testing.assert_close(got, want)


def on_kernel_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The Triton kernels' tests run on the GPU where there is one (compiled), else on the CPU
    under TRITON_INTERPRET=1 (conftest.py). Compiled, a dot needs 16 or more along each side."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return [t.to(dev) for t in tensors]


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)])
def test_paged_triton_decode_equals_the_reference(heads, kv_heads):
    from flover.ops.attention import paged_decode_attention_ref
    pytest.importorskip("triton")
    from flover.ops.paged_attention_triton import paged_decode_attention

    d, bs, lengths = 16, 4, [5, 37, 1, 20]
    k_pages, v_pages, tables = on_kernel_device(*scattered_cache(lengths, kv_heads, d, bs))
    q, lens = on_kernel_device(torch.randn(len(lengths), heads, d), torch.tensor(lengths))
    max_len = max(lengths)
    ref = paged_decode_attention_ref(q, k_pages, v_pages, tables, lens, max_len, 0.3)
    got = paged_decode_attention(q, k_pages, v_pages, tables, lens, max_len, 0.3, block_n=16,
                                 min_split=16, max_splits=3)  # 3 splits of 16 for the longest
    tol = 2e-3 if got.is_cuda else 1e-4  # compiled, tl.dot takes float32 operands as TF32
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


def test_the_split_length_grows_with_the_row_alone():
    from flover.ops.paged_attention_triton import split_len

    assert [split_len(n) for n in (1, 128, 1024, 1025, 4096)] == [128, 128, 128, 192, 512]


def test_paged_triton_decode_of_a_row_does_not_depend_on_its_neighbours():
    """Bitwise: the KV split is fixed by position, never chosen from the batch."""
    pytest.importorskip("triton")
    from flover.ops.paged_attention_triton import paged_decode_attention

    d, bs, lengths = 16, 4, [37, 5, 30, 12]
    k_pages, v_pages, tables = on_kernel_device(*scattered_cache(lengths, 2, d, bs))
    q, lens = on_kernel_device(torch.randn(len(lengths), 4, d), torch.tensor(lengths))
    fused = paged_decode_attention(q, k_pages, v_pages, tables, lens, 64, 0.3, 16, 16, 3)
    alone = paged_decode_attention(q[:1], k_pages, v_pages, tables[:1], lens[:1], 37, 0.3, 16, 16, 3)
    assert torch.equal(fused[:1], alone)
    # the merge loading its splits one by one (as before 2026-12-08): the same bits
    one = paged_decode_attention(q, k_pages, v_pages, tables, lens, 64, 0.3, 16, 16, 3,
                                 merge_splits=1)
    assert torch.equal(one, fused)


def _prompt_beside_a_shared_prefix(heads: int, kv_heads: int):
    """Rows: C's decode row, B's decode row (B shares A's first 5 blocks; its length 35 is
    one short of A's first token's), A's prompt tokens at lengths 36..55 (split lengths 16
    then 32 from 49 on, with splits of at least 16 and at most 3), a padding row (block 0)."""
    gen = torch.Generator().manual_seed(heads)
    d, bs, width = 16, 4, 14
    perm = (torch.randperm(40, generator=gen) + 1).tolist()
    a, b_own, c = perm[:14], perm[14:23], perm[23:25]
    tables = [c + [0] * 12, a[:5] + b_own + [0] * 0, *[a] * 20, [0] * width]
    tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    lens = torch.tensor([7, 35, *range(36, 56), 1])
    k_pages = torch.randn(41, kv_heads, bs, d, generator=gen)
    v_pages = torch.randn(41, kv_heads, bs, d, generator=gen)
    q = torch.randn(len(lens), heads, d, generator=gen)
    return on_kernel_device(q, k_pages, v_pages, tables, lens)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)])
def test_paged_prompt_tokens_sharing_a_tile_are_bitwise_each_token_alone(heads, kv_heads):
    """Up to 16 // group consecutive rows of one request share a tile (one K/V read); each
    row's result is bitwise its result alone, whole or chunked; a request sharing the
    prompt's prefix blocks at the very next length is not taken for the same request."""
    from flover.ops.attention import paged_decode_attention_ref
    pytest.importorskip("triton")
    from flover.ops.paged_attention_triton import paged_decode_attention

    q, k, v, tables, lens = _prompt_beside_a_shared_prefix(heads, kv_heads)

    def attend(rows: slice):
        return paged_decode_attention(q[rows], k, v, tables[rows], lens[rows], 56, 0.3, 16, 16, 3,
                                      shared_tile=True)  # 16 // group tokens a tile

    whole = attend(slice(0, len(q)))
    tol = 2e-3 if whole.is_cuda else 1e-4
    torch.testing.assert_close(whole, paged_decode_attention_ref(q, k, v, tables, lens, 56, 0.3),
                               rtol=tol, atol=tol)
    for i in [0, 1, 2, 3, 9, 14, 15, 17, 21, 22]:
        assert torch.equal(attend(slice(i, i + 1))[0], whole[i]), i
    a, b = slice(0, 9), slice(9, len(q))  # A's prompt in two chunks
    assert torch.equal(attend(a), whole[a]) and torch.equal(attend(b), whole[b])


try:  # a kernel of the test's own: compiled Triton finds what it calls in module globals
    import triton
    import triton.language as tl

    from flover.ops.paged_attention_triton import _paged_run

    @triton.jit
    def _paged_runs_kernel(Tables, Lens, Count, st_b, width, TOKENS: tl.constexpr):
        b = tl.program_id(0)
        count, _ = _paged_run(Tables, Lens, b, tl.num_programs(0), st_b, width, 4, 16, 3, 16,
                              TOKENS)
        tl.store(Count + b, count)
except ImportError:
    triton = None


@pytest.mark.skipif(triton is None, reason="needs Triton")
def test_paged_runs_group_one_requests_tokens_at_one_split_length():
    _, _, _, tables, lens = _prompt_beside_a_shared_prefix(4, 4)
    count = torch.zeros(len(lens), dtype=torch.int32, device=lens.device)
    _paged_runs_kernel[(len(lens),)](tables, lens, count, tables.stride(0), tables.shape[1],
                                     TOKENS=8)
    # windows of 8: C, B alone; A's tokens 36..48 (split 16) then 49..55 (split 32); padding
    assert count.tolist() == [1, 1, 6, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 1, 6, 0, 0, 0, 0,
                              0, 1]


# --- the decode graphs' paged inputs ---------------------------------------------------------

def test_paged_padded_decode_matches_the_plain_forward():
    from flover.engine.cuda_graph import PagedDecodeGraphs
    from flover.engine.kv_cache import PagedCache
    from flover.engine.runner import ModelRunner
    from flover.engine.scheduler import Batch
    from flover.engine.sequence import Request, Status
    from flover.weights import load_model

    model, _ = load_model("tiny_llama", torch.float32, torch.device("cpu"), seed=1)
    c = model.cfg
    cache = PagedCache(c.num_layers, 40, c.num_kv_heads, 8, c.head_dim, torch.float32,
                       torch.device("cpu"), num_slots=8, max_seq_len=64)
    plain = ModelRunner(model, cache, cuda_graphs=False)
    gen = torch.Generator().manual_seed(0)
    rows, tables, free = [], {}, list(range(39, 0, -1))
    for i, n in enumerate([5, 17, 9]):
        r = Request(f"r{i}", torch.randint(3, 256, (n,), generator=gen).tolist(), SamplingParams())
        r.num_computed, r.status = n, Status.DECODE
        r.output_ids = [7 + i]
        tables[r] = [free.pop() for _ in range(-(-(n + 1) // 8))]
        rows.append(r)
    from flover.engine.paged_scheduler import PagedChunk

    for r in rows:  # prefill each row's prompt into its blocks
        r.num_computed = 0
        plain.forward_logits(Batch([], [PagedChunk(r, 0, 0, len(r.prompt_ids), True)],
                                   block_tables=tables))
        r.num_computed = len(r.prompt_ids)
    batch = Batch(rows, [], rows, [0, 1, 2], decode_slots=[0, 1, 2], block_tables=tables)
    k0, v0 = cache.k.clone(), cache.v.clone()
    expected = plain.forward_logits(batch)
    graphs = PagedDecodeGraphs(model, cache, capture=False)
    assert graphs.bucket(3) == 4  # one padding row, writing into block 0
    for _ in range(2):
        cache.k.copy_(k0), cache.v.copy_(v0)
        got = graphs.forward_logits(rows, tables)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_serve_uses_pages_by_default_and_run_keeps_the_ini_slots():
    from flover.cli import build_parser, serve_kv_layout
    from flover.run.ini import RunConfig

    args = build_parser().parse_args(["serve"])
    assert (args.kv_layout, args.block_size, args.enable_prefix_caching) == (None, 16, None)
    assert serve_kv_layout(args.kv_layout, 1) == "pages"
    assert serve_kv_layout(args.kv_layout, 2) == "slots"  # pages are not broadcast to ranks yet
    assert serve_kv_layout("pages", 1) == "pages"
    args = build_parser().parse_args(["serve", "--kv-layout", "slots", "--no-enable-prefix-caching",
                                      "--num-kv-blocks", "64", "--gpu-memory-utilization", "0.5"])
    assert (args.kv_layout, args.enable_prefix_caching, args.num_kv_blocks,
            args.gpu_memory_utilization) == ("slots", False, 64, 0.5)
    assert RunConfig().engine_config().kv_layout == "slots"


def test_aborting_a_preempted_request_gives_its_slots_back(llama_dir):
    eng = engine(llama_dir, num_kv_blocks=9, enable_prefix_caching=False)
    work = prompts(3, seed=60, low=9, high=12)
    for i, p in enumerate(work):
        eng.add_request(f"r{i}", p, greedy(20))
    while not eng.stats()["num_preemptions"]:
        eng.step()
    preempted = [h for h in eng.scheduler.waiting if h.output_ids]
    assert preempted
    eng.abort(preempted[0].request_id)
    done = {o.request_id: o for o in eng.run_until_done() if o.finished}
    solo = engine(llama_dir)
    for rid, out in done.items():
        solo.add_request(rid, work[int(rid[1:])], greedy(20))
        want = [o for o in solo.run_until_done() if o.finished][0]
        assert out.outputs[0].token_ids == want.outputs[0].token_ids
    assert_pool_empty(eng)


@pytest.mark.parametrize("layout", ["slots", "pages"])
def test_an_iteration_of_prompt_chunks_that_sample_nothing_runs(llama_dir, layout):
    """A lone prompt longer than the token budget: its first iterations sample no row."""
    ref = hf_model(llama_dir)
    p = prompts(1, seed=70, low=30, high=31)[0]
    eng = Engine(EngineConfig(model=str(llama_dir), dtype="float32", device="cpu",
                              max_concurrency=2, max_seq_len=64, kv_layout=layout,
                              prefill_token_budget=8))
    done = run(eng, [(0, p, greedy(5))])
    assert done["r0"].error is None and eng.stats()["failed_batches"] == 0
    assert done["r0"].outputs[0].token_ids == hf_greedy(ref, p, 5)


def test_prompt_logprobs_survive_preemption_and_skip_the_prefix_cache(llama_dir):
    shared = prompts(1, seed=80, low=16, high=17)[0]  # 2 full blocks of 8
    asks = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    work = [(0, shared + [5, 6], greedy(20)), (1, shared + [7, 8, 9], asks),
            (1, prompts(1, seed=81, low=12, high=13)[0], greedy(20))]

    def logprobs(eng):
        done = run(eng, work)
        return tokens(done), done["r1"].prompt_logprobs

    want = logprobs(engine(llama_dir, max_concurrency=4, kv_layout="slots"))
    roomy = engine(llama_dir, max_concurrency=4)
    assert logprobs(roomy) == want
    assert roomy.stats()["prefix_cache_hits"] == 0  # r1 computes its whole prompt for them
    tight = engine(llama_dir, max_concurrency=4, num_kv_blocks=10)
    assert logprobs(tight) == want
    assert tight.stats()["num_preemptions"] > 0
    assert_pool_empty(tight)


def test_pages_with_tensor_parallelism_are_refused_naming_the_field():
    from flover.config import ConfigError, EngineConfig

    with pytest.raises(ConfigError, match="kv_layout"):
        EngineConfig(kv_layout="pages", tensor_para_size=2)
    assert EngineConfig(kv_layout="slots", tensor_para_size=2).kv_layout == "slots"

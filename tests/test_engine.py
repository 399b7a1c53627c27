"""Temporal fusion: requests at different times, one forward per iteration, same tokens."""

from __future__ import annotations

import pytest
from conftest import hf_greedy, hf_model, prompts

from flover import Engine, EngineConfig, RequestError, SamplingParams


def engine(path, **kw) -> Engine:
    kw.setdefault("max_concurrency", 3)
    kw.setdefault("max_seq_len", 64)
    return Engine(EngineConfig(model=str(path), dtype="float32", device="cpu", **kw))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def finals(eng: Engine, work: list[tuple[int, list[int], SamplingParams]]) -> dict:
    """Add request i at iteration work[i][0]; step until all finish. Returns id -> output."""
    done, it = {}, 0
    pending = sorted(enumerate(work), key=lambda x: x[1][0])
    while pending or eng.has_unfinished():
        while pending and pending[0][1][0] <= it:
            i, (_, prompt, params) = pending.pop(0)
            eng.add_request(f"r{i}", prompt, params)
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        it += 1
    return done


def run_staggered(eng: Engine, work: list[tuple[int, list[int], SamplingParams]]) -> dict:
    """As `finals`, returning id -> generated tokens."""
    return {rid: out.token_ids for rid, out in finals(eng, work).items()}


@pytest.mark.parametrize("shuffle", [True, False])
def test_fused_staggered_requests_equal_transformers_solo(checkpoint, shuffle):
    ref = hf_model(checkpoint)
    ps = prompts(7, seed=11)
    lengths = [9, 3, 14, 6, 11, 2, 8]
    work = [(it, p, greedy(n)) for it, p, n in zip([0, 0, 1, 2, 2, 5, 7], ps, lengths, strict=True)]
    # prefill budget 16 also chunks the longer prompts across iterations
    eng = engine(checkpoint, use_mem_shuffle=shuffle, prefill_token_budget=16)
    done = run_staggered(eng, work)
    for i, (_, p, params) in enumerate(work):
        assert done[f"r{i}"] == hf_greedy(ref, p, params.max_tokens), f"request r{i}"


def test_an_iteration_of_prompt_chunks_that_completes_none_samples_nothing_and_goes_on(llama_dir):
    prompt = list(range(3, 23))  # 20 tokens under a budget of 6: three iterations sample nothing
    whole = run_staggered(engine(llama_dir), [(0, prompt, greedy(5))])
    done = finals(engine(llama_dir, prefill_token_budget=6), [(0, prompt, greedy(5))])
    assert done["r0"].finish_reason == "length" and done["r0"].token_ids == whole["r0"]


def test_staggered_requests_finish_in_far_fewer_iterations_than_their_lengths(llama_dir):
    eng = engine(llama_dir, max_concurrency=8)
    lengths = [20, 18, 16, 20, 12, 15, 20, 19]
    work = [(i, [5 + i, 6, 7], greedy(n)) for i, n in enumerate(lengths)]
    run_staggered(eng, work)
    assert eng.stats()["iterations"] == 26  # last arrival at 7 + its 19 tokens
    assert eng.stats()["iterations"] < sum(lengths) / 4


def test_shuffle_reuses_slots_and_moves_one_slot_per_hole(llama_dir):
    eng = engine(llama_dir, max_concurrency=3)
    for i, n in enumerate([2, 6, 9]):  # r0 finishes first while r1, r2 still run
        eng.add_request(f"r{i}", [3, 4, 5, 6], greedy(n))
    finished_order = [o.request_id for o in eng.run_until_done() if o.finished]
    assert finished_order == ["r0", "r1", "r2"]
    stats = eng.stats()
    # r0 (slot 0) finishes at iteration 2 with r2 (slot 2, 4 prompt + 1 token in cache) moved in;
    # r1 (slot 1) finishes at iteration 6, r2 now at slot 0 is below it: no move.
    assert stats["shuffle_moves"] == 1
    assert stats["shuffle_bytes"] == 5 * eng.cache.token_bytes
    assert stats["slots_used"] == 0


def test_without_shuffle_holes_keep_their_rows_until_the_edge_frees_them(llama_dir):
    eng = engine(llama_dir, max_concurrency=3, use_mem_shuffle=False)
    for i, n in enumerate([2, 9, 4]):
        eng.add_request(f"r{i}", [3, 4, 5, 6], greedy(n))
    sizes = []
    while eng.has_unfinished():
        eng.step()
        sizes.append(eng.stats()["slots_used"])
    assert eng.stats()["shuffle_moves"] == 0
    # r0 (slot 0) and r2 (slot 2) finish early, but r1 in slot 1 holds the block at 2 rows
    assert sizes[:3] == [3, 3, 3] and sizes[3:8] == [2] * 5 and sizes[-1] == 0


def test_shuffle_on_and_off_give_identical_tokens(llama_dir):
    work = [(it, p, greedy(n)) for it, p, n in
            zip([0, 0, 0, 1, 3, 4], prompts(6, seed=12), [3, 12, 5, 7, 2, 9], strict=True)]
    on = run_staggered(engine(llama_dir, use_mem_shuffle=True), work)
    off = run_staggered(engine(llama_dir, use_mem_shuffle=False), work)
    assert on == off


def test_more_requests_than_slots_wait_in_fifo_order(llama_dir):
    eng = engine(llama_dir, max_concurrency=2)
    for i in range(5):
        eng.add_request(f"r{i}", [3, 4], greedy(3))
    eng.step()
    assert eng.stats()["in_flight"] == 2 and eng.stats()["waiting"] == 3
    order = [o.request_id for o in eng.run_until_done() if o.finished]
    assert order == ["r0", "r1", "r2", "r3", "r4"]


def test_seeded_sampled_request_is_the_same_alone_and_fused(llama_dir):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=1234,
                            ignore_eos=True)
    p = prompts(1, seed=13)[0]
    alone = run_staggered(engine(llama_dir), [(0, p, params)])["r0"]
    noisy = SamplingParams(max_tokens=10, temperature=1.3, ignore_eos=True)
    fused = run_staggered(engine(llama_dir), [(0, [7, 8, 9], noisy), (1, [4] * 5, noisy),
                                              (2, p, params), (3, [9, 9], greedy(4))])["r2"]
    assert alone == fused
    other_seed = run_staggered(engine(llama_dir), [(0, p, SamplingParams(
        max_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=99, ignore_eos=True))])["r0"]
    assert other_seed != alone


def test_eos_finishes_with_reason_stop(llama_dir):
    eng = engine(llama_dir)
    ref = run_staggered(engine(llama_dir), [(0, [3, 4, 5], greedy(10))])["r0"]
    eng.eos_token_ids = [ref[3]]
    eng.add_request("r", [3, 4, 5], SamplingParams(max_tokens=10, temperature=0.0))
    last = list(eng.run_until_done())[-1]
    assert last.finish_reason == "stop" and last.token_ids == ref[: ref.index(ref[3]) + 1]


def test_stop_token_ids_and_min_tokens(llama_dir):
    ref = run_staggered(engine(llama_dir), [(0, [3, 4, 5], greedy(10))])["r0"]
    eng = engine(llama_dir)
    eng.add_request("r", [3, 4, 5], SamplingParams(max_tokens=10, temperature=0.0,
                                                   stop_token_ids=[ref[2]]))
    last = list(eng.run_until_done())[-1]
    assert last.finish_reason == "stop" and last.token_ids == ref[: ref.index(ref[2]) + 1]


def test_abort_frees_the_slot_at_once_and_others_go_on(llama_dir):
    eng = engine(llama_dir, max_concurrency=2)
    ref = run_staggered(engine(llama_dir), [(0, [3, 4, 5], greedy(8))])["r0"]
    eng.add_request("a", [6, 7], greedy(8))
    eng.add_request("b", [3, 4, 5], greedy(8))
    eng.add_request("c", [3, 4, 5], greedy(8))
    eng.step()
    eng.abort("a")
    assert eng.stats()["slots_used"] == 1 and eng.stats()["waiting"] == 1
    done = {o.request_id: o.token_ids for o in eng.run_until_done() if o.finished}
    assert done == {"b": ref, "c": ref}


@pytest.mark.parametrize("prompt, params, message", [
    ([], greedy(4), "prompt is empty"),
    ([3] * 64, greedy(1), "prompt of 64 tokens does not fit max_seq_len=64"),
    ([3] * 60, greedy(5), "max_tokens=5 exceeds max_seq_len=64; at most 4 new tokens fit"),
    ([3, 128], greedy(4), "token id 128 is outside the vocabulary"),
    ([3, -1], greedy(4), "token id -1 is outside the vocabulary"),
    ("hello", greedy(4), "no tokenizer"),
])
def test_bad_request_is_refused_and_others_go_on(llama_dir, prompt, params, message):
    eng = engine(llama_dir)
    ref = run_staggered(engine(llama_dir), [(0, [3, 4, 5], greedy(6))])["r0"]
    eng.add_request("good", [3, 4, 5], greedy(6))
    eng.step()
    with pytest.raises(RequestError, match=message):
        eng.add_request("bad", prompt, params)
    done = {o.request_id: o.token_ids for o in eng.run_until_done() if o.finished}
    assert done == {"good": ref}


def test_duplicate_request_id_is_refused(llama_dir):
    eng = engine(llama_dir)
    eng.add_request("x", [3, 4], greedy(3))
    with pytest.raises(RequestError, match="request id 'x' is already in use"):
        eng.add_request("x", [5, 6], greedy(3))


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature=-1.0 is invalid"),
    ({"top_p": 0.0}, r"top_p=0.0 is invalid: must be in \(0, 1\]"),
    ({"top_k": -2}, "top_k=-2 is invalid"),
    ({"max_tokens": 0}, "max_tokens=0 is invalid"),
    ({"repetition_penalty": 0.0}, "repetition_penalty=0.0 is invalid"),
])
def test_invalid_sampling_values_name_the_field(kwargs, message):
    from flover import ConfigError

    with pytest.raises(ConfigError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_invariant": "yes"}, "batch_invariant='yes' is invalid: must be True or False"),
    ({"cuda_graphs": 1}, "cuda_graphs=1 is invalid: must be True or False"),
    ({"kv_layout": "blocks"}, "kv_layout='blocks' is invalid"),
    ({"block_size": 7}, "block_size=7 is invalid"),
    ({"quantization": "int3"}, "quantization='int3' is invalid"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization=1.5 is invalid"),
])
def test_invalid_engine_values_name_the_field(kwargs, message):
    from flover import ConfigError, EngineConfig

    with pytest.raises(ConfigError, match=message):
        EngineConfig(**kwargs)


def test_llm_generate_fuses_all_prompts_and_keeps_their_order(llama_dir):
    from flover import LLM

    ref = hf_model(llama_dir)
    llm = LLM(model=str(llama_dir), dtype="float32", device="cpu", max_concurrency=4,
              max_seq_len=64)
    ps = prompts(5, seed=14)
    outs = llm.generate(ps, greedy(6))
    assert [o.token_ids for o in outs] == [hf_greedy(ref, p, 6) for p in ps]
    assert all(o.finish_reason == "length" for o in outs)
    assert llm.engine.stats()["iterations"] < 5 * 6

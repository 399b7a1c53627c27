"""Async scheduling changes no output: the engine launches iteration i+1 before it reads
iteration i's tokens (decode rows take them on the device), and every output (tokens,
logprobs, finish reasons, texts, errors) equals the synchronous engine's, across the
feature matrix. CPU, fp32: the pipeline's bookkeeping is the same as on a GPU.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import prompts
from test_engine import finals
from test_isolation import engine, faulty

from flover import ConfigError, EngineConfig, SamplingParams
from flover.engine import outputs
from flover.engine.block_manager import BlockAllocator
from flover.sampling import sampler
from flover.weights import load_model


@pytest.fixture(scope="module")
def tiny(llama_dir, byte_tokenizer):
    """The tiny LLaMA with a byte-level tokenizer (test_isolation's engines), loaded once."""
    model, _ = load_model(str(llama_dir), torch.float32, torch.device("cpu"), 0)
    return model, byte_tokenizer


def seen(out) -> tuple:
    """Everything a request's final output says: (the exact part, its logprobs and scores)."""
    floats: list[float] = []
    exact = (out.finish_reason, out.error, _lp(out.prompt_logprobs, floats),
             [(c.token_ids, c.text, c.finish_reason, _lp(c.logprobs, floats)) for c in out.outputs])
    floats += [c.score for c in out.outputs if c.score is not None]  # beams
    return exact, floats


def _lp(entries, floats: list[float]):
    if entries is None:
        return None
    out = []
    for e in entries:
        if e is not None:
            floats += [e["logprob"], *(v for _, v in e["top_logprobs"])]
            e = (e["token_id"], [t for t, _ in e["top_logprobs"]])
        out.append(e)
    return out


def same(a: dict, b: dict) -> bool:
    """Equal outputs; logprobs to 1e-5 (on the CPU a fused batch's float32 sums may round
    apart in the last bits: its tokens may not)."""
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}
    for k in a:
        assert a[k][1] == pytest.approx(b[k][1], rel=1e-5, abs=1e-6), k
    return True


def run(tiny, work, on: bool, **kw) -> tuple[dict, object]:
    eng = engine(tiny, async_scheduling=on, **kw)
    steps = []  # whether an iteration was in flight after each step (async on)
    real = eng.step

    def step():
        outs = real()
        steps.append(eng.inflight is not None)
        return outs
    eng.step = step
    done = finals(eng, work)
    eng.overlapped = sum(steps)
    return {rid: seen(o) for rid, o in done.items()}, eng


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


P = prompts(10, seed=41, high=24)
# staggered arrivals, chunked prompts (budget 8), n > 1, seeds, top-k/top-p, logprobs, EOS,
# min_tokens, stop tokens and stop strings, max_tokens; 10 requests for 4 slots: rows wait,
# finish in the middle of the block and the shuffle moves rows into the holes
MATRIX = [
    (0, P[0], greedy(12, ignore_eos=True)),
    (0, P[1], SamplingParams(max_tokens=14, temperature=0.9, top_k=20, top_p=0.9, seed=7,
                             logprobs=2)),
    (1, P[2], greedy(16, stop=["A", "?"], logprobs=1)),
    (2, P[3], SamplingParams(max_tokens=9, n=2, temperature=1.0, seed=11, stop_token_ids=[40])),
    (2, P[4], greedy(20, stop_token_ids=[33, 17, 50], min_tokens=3)),
    (3, P[5], greedy(5, ignore_eos=True, logit_bias={9: 3.0})),
    (4, P[6], SamplingParams(max_tokens=18, temperature=1.2, seed=3, stop=[" ", "Q"])),
    (6, P[7], greedy(7)),
    (9, P[8], SamplingParams(max_tokens=11, temperature=0.7, min_p=0.05, seed=5)),
    (9, P[9], greedy(13, ignore_eos=True)),
]


LAYOUTS = {"slots, shuffle": dict(use_mem_shuffle=True), "slots": dict(use_mem_shuffle=False),
           "pages": dict(kv_layout="pages", block_size=8)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_async_on_equals_off_across_the_feature_matrix(tiny, layout):
    kw = dict(max_concurrency=4, prefill_token_budget=8, **LAYOUTS[layout])
    off, sync = run(tiny, MATRIX, False, **kw)
    on, eng = run(tiny, MATRIX, True, **kw)
    assert same(on, off)
    assert sync.overlapped == 0 and eng.overlapped > 20  # the pipeline was really used
    reasons = {o[0][0] for o in on.values()}
    assert {"length", "stop"} <= reasons  # rows ended by length and by stops
    if layout == "slots, shuffle":
        assert eng.stats()["shuffle_moves"] > 0
    if layout == "pages":
        assert eng.stats()["kv_blocks_used"] == 0
    assert eng.stats()["slots_used"] == 0 and not eng.requests and not eng.has_unfinished()


def test_pages_preempt_only_with_the_pipeline_drained_and_change_no_output(tiny):
    """A pool too small for every row preempts the newest request; a preempted row
    recomputes all its tokens, so the engine reads the iteration in flight before a plan
    that may preempt. Prefix-cache hits (a shared prefix arriving later) stay the same too."""
    shared = P[0][:8]
    work = [(i, shared + P[i + 1][:4], greedy(14, ignore_eos=True)) for i in range(4)]
    work += [(1, P[6], SamplingParams(max_tokens=12, temperature=0.8, seed=2, n=2, ignore_eos=True))]
    kw = dict(max_concurrency=6, kv_layout="pages", block_size=8, num_kv_blocks=13,
              prefill_token_budget=8)
    off, sync = run(tiny, work, False, **kw)
    on, eng = run(tiny, work, True, **kw)
    assert same(on, off)
    s_on, s_off = eng.stats(), sync.stats()
    assert s_on["num_preemptions"] > 0 and s_off["num_preemptions"] > 0
    assert s_on["prefix_cache_hits"] > 0 and s_off["prefix_cache_hits"] > 0
    assert eng.overlapped > 10 and s_on["kv_blocks_used"] == 0 and not eng.has_unfinished()


def test_a_request_preempted_with_its_token_in_flight_resumes_only_once_it_is_read():
    """Resumed before its token arrived, a row would recompute its prompt and draw its first
    token a second time: it waits at the front of the queue until the token is read."""
    from flover.engine.paged_scheduler import PagedScheduler
    from flover.engine.scheduler import StepResult
    from flover.engine.sequence import new_request

    s = PagedScheduler(BlockAllocator(20, 8, 4, prefix_caching=True), 64)
    head = new_request("a", list(range(10)), greedy(5), None, None)
    s.add(head)
    first = s.schedule()
    s.launched(first)  # the prompt, its first token in flight
    s._preempt(head)
    assert head.pending == 1 and s.schedule().empty  # the pool has room: it still waits
    s.postprocess(first, StepResult([7]))
    again = s.schedule()
    assert [(c.row, c.length, c.completes) for c in again.prefill] == [(head, 10, False)]
    assert head.output_ids == [7]


def test_a_row_ending_by_length_is_not_run_once_more(tiny):
    """A request's max_tokens-th token is launched, not yet read: the next iteration must not
    run that row (its next position may be past its slot); one ending by a stop token cannot
    be known then and computes one dropped token."""
    p = P[0][:6]
    for on in (False, True):
        eng = engine(tiny, async_scheduling=on, max_seq_len=len(p) + 5)
        eng.add_request("a", p, greedy(5, ignore_eos=True))  # fills its slot to the last position
        out = [o for o in eng.run_until_done() if o.finished][0]
        assert out.finish_reason == "length" and len(out.token_ids) == 5
        assert eng.stats()["iterations"] == 5 and eng.stats()["decode_rows"] == 4
    stop = out.token_ids[2]
    counts = {}
    for on in (False, True):
        eng = engine(tiny, async_scheduling=on)
        eng.add_request("a", p, greedy(5, stop_token_ids=[stop]))
        out = [o for o in eng.run_until_done() if o.finished][0]
        assert out.finish_reason == "stop" and out.token_ids[-1] == stop
        counts[on] = eng.stats()["decode_rows"]
    assert counts[True] == counts[False] + 1  # the wasted row, whose token was dropped


def test_abort_mid_flight_drops_the_token_in_flight_and_the_others_are_unchanged(tiny):
    """A request aborted after it streamed 3 tokens ends with those 3, async on or off."""
    results = {}
    for on in (False, True):
        eng = engine(tiny, async_scheduling=on, max_concurrency=3)
        for i, (_, p, params) in enumerate(MATRIX[:3]):
            eng.add_request(f"r{i}", p, params)
        streamed, done = {}, {}
        while eng.has_unfinished():
            for o in eng.step():
                streamed[o.request_id] = o.token_ids
                if o.finished:
                    done[o.request_id] = seen(o)
            if len(streamed.get("r1", [])) == 3 and "r1" not in done:
                eng.abort("r1")
                done["r1"] = streamed["r1"]
        assert eng.stats()["slots_used"] == 0 and not eng.requests
        results[on] = done
    aborted = results[True].pop("r1")
    assert aborted == results[False].pop("r1") and len(aborted) == 3
    assert same(results[True], results[False])


@pytest.mark.parametrize("module, stage, args_row", [
    (sampler, "row_sampling", 0),  # at launch
    (outputs, "detokenize", 1),  # when the tokens are read
])
def test_a_failing_request_fails_alone_with_the_pipeline_full(tiny, monkeypatch, module, stage,
                                                              args_row):
    work = MATRIX[:2] + [(1, P[5], SamplingParams(max_tokens=10, temperature=0.8, seed=3, n=2,
                                                  stop=["zz"]))] + MATRIX[3:5]
    clean, _ = run(tiny, work, False)
    monkeypatch.setattr(module, stage, faulty(module, stage, lambda a: a[args_row].request_id
                                              .split("#")[0] == "r2"))
    for on in (False, True):
        got, eng = run(tiny, work, on)
        assert got["r2"][0][0] == "error" and f"injected fault in {stage}" in got["r2"][0][1]
        assert same({k: v for k, v in got.items() if k != "r2"},
                    {k: v for k, v in clean.items() if k != "r2"})
        assert eng.stats()["slots_used"] == 0 and not eng.requests


def test_a_failed_forward_with_an_iteration_in_flight_fails_its_batch_and_the_engine_goes_on(
        tiny, monkeypatch):
    eng = engine(tiny, async_scheduling=True)
    for i in range(2):
        eng.add_request(f"r{i}", P[i], greedy(8, ignore_eos=True))
    eng.step()
    eng.step()  # one iteration in flight, one read
    assert eng.inflight is not None
    real = eng.runner.forward_logits
    monkeypatch.setattr(eng.runner, "forward_logits", lambda *a: 1 / 0)
    outs = eng.step()  # the next launch fails: the one in flight is read first, then failed
    assert [o.request_id for o in outs if o.finished] == ["r0", "r1"]
    assert all(o.finish_reason == "error" and "ZeroDivisionError" in o.error
               for o in outs if o.finished)
    assert eng.stats()["failed_batches"] == 1 and eng.stats()["slots_used"] == 0
    monkeypatch.setattr(eng.runner, "forward_logits", real)
    work = [(0, P[2], greedy(6, ignore_eos=True))]
    after = {k: seen(v) for k, v in finals(eng, work).items()}  # the engine goes on, exact
    assert same(after, run(tiny, work, False)[0])


def test_beams_penalties_and_prompt_logprobs_step_synchronously_and_equal(tiny):
    """Requests that need their tokens on the host before the next forward drain the
    pipeline; the engine overlaps again once they are done."""
    work = MATRIX[:2] + [
        (1, P[2], SamplingParams(max_tokens=6, beam_width=3, ignore_eos=True)),
        (2, P[3], greedy(8, repetition_penalty=1.3, presence_penalty=0.5, ignore_eos=True)),
        (3, P[4], greedy(5, prompt_logprobs=2, ignore_eos=True)),
        (20, P[5], greedy(6, ignore_eos=True)),
    ]
    off, _ = run(tiny, work, False)
    on, eng = run(tiny, work, True)
    assert same(on, off)
    assert eng.overlapped > 0 and not eng.host_bound


def test_async_scheduling_is_off_by_default_on_the_cpu_and_refused_where_unsupported(tiny):
    assert engine(tiny).async_scheduling is False
    assert engine(tiny, async_scheduling=True).async_scheduling is True
    with pytest.raises(ConfigError, match="async_scheduling"):
        EngineConfig(async_scheduling="yes")
    with pytest.raises(ConfigError, match="async_scheduling.*tensor_para_size=1"):
        EngineConfig(async_scheduling=True, tensor_para_size=2)
    assert EngineConfig(async_scheduling=True, kv_layout="pages").async_scheduling is True
    assert replace(EngineConfig(), async_scheduling=False).async_scheduling is False



def test_the_ini_key_and_the_cli_flag_reach_the_engine_config():
    from flover.cli import build_parser
    from flover.run.ini import load_config

    for value, expected in (("1", True), ("0", False)):
        cfg = load_config(None, [f"runtime_hyperparameter.async_scheduling={value}"])
        assert cfg.engine_config().async_scheduling is expected
    assert load_config(None, []).engine_config().async_scheduling is None  # auto
    parse = build_parser().parse_args
    assert parse(["generate", "--prompt", "x"]).async_scheduling is None
    assert parse(["generate", "--prompt", "x", "--async-scheduling"]).async_scheduling is True
    assert parse(["serve", "--no-async-scheduling"]).async_scheduling is False

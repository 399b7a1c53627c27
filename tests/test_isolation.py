"""One request's fault stays its own.

Each test runs bystanders beside a request that goes wrong (a fault injected into one
per-request stage, or a shared forward pass that raises) and asserts: the faulty request
ends with finish_reason "error" and a message naming the fault; every bystander's tokens and
text equal its solo run's; afterwards no slot is held and the engine serves new requests.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import prompts

from flover import Engine, EngineConfig, SamplingParams
from flover.engine import outputs, runner
from flover.engine.detokenizer import StopChecker
from flover.sampling import penalties, sampler


@pytest.fixture(scope="module")
def tiny(llama_dir, byte_tokenizer):
    """The tiny LLaMA with a byte-level tokenizer, loaded once."""
    import torch

    from flover.weights import load_model

    model, _ = load_model(str(llama_dir), torch.float32, torch.device("cpu"), 0)
    return model, byte_tokenizer


def engine(tiny, **kw) -> Engine:
    model, tok = tiny
    kw.setdefault("max_concurrency", 6)
    kw.setdefault("max_seq_len", 64)
    return Engine(EngineConfig(dtype="float32", device="cpu", **kw), model=model, tokenizer=tok)


BYSTANDERS = [
    ("greedy", prompts(1, seed=31)[0], SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)),
    ("seeded", prompts(1, seed=32)[0], SamplingParams(max_tokens=11, temperature=0.9, top_p=0.9,
                                                      seed=5, ignore_eos=True)),
    ("penalised", prompts(1, seed=33)[0], SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.5,
        logit_bias={7: 2.0}, logprobs=2)),
    ("n2", prompts(1, seed=34)[0], SamplingParams(max_tokens=6, n=2, temperature=1.0, seed=9,
                                                  ignore_eos=True)),
]


_SOLO: dict = {}  # solo runs use the slot layout: the paged runs' bystanders must equal them
LAYOUTS = ["slots", "pages"]


def solo(tiny, prompt, params) -> list:
    """(tokens, text) of each sequence of the request run alone (memoised: pure of its inputs)."""
    key = (tuple(prompt), repr(params))
    if key not in _SOLO:
        eng = engine(tiny)
        eng.add_request("solo", prompt, params)
        out = [o for o in eng.run_until_done() if o.finished][0]
        _SOLO[key] = [(c.token_ids, c.text) for c in out.outputs]
    return _SOLO[key]


def run_with(tiny, bad_prompt, bad_params, extra=(), **kw):
    """Bystanders at iterations 0 and 1, the bad request at 1; returns (finals, engine)."""
    eng = engine(tiny, **kw)
    eng.add_request(BYSTANDERS[0][0], BYSTANDERS[0][1], BYSTANDERS[0][2])
    eng.add_request(BYSTANDERS[1][0], BYSTANDERS[1][1], BYSTANDERS[1][2])
    eng.step()
    eng.add_request("bad", bad_prompt, bad_params)
    for name, p, params in BYSTANDERS[2:]:
        eng.add_request(name, p, params)
    for name, p, params in extra:
        eng.add_request(name, p, params)
    done = {}
    for o in eng.run_until_done():
        if o.finished:
            done[o.request_id] = o
    return done, eng


def assert_isolated(tiny, done, eng, message):
    assert done["bad"].finish_reason == "error"
    assert message in done["bad"].error
    for name, p, params in BYSTANDERS:
        got = [(c.token_ids, c.text) for c in done[name].outputs]
        assert done[name].error is None and got == solo(tiny, p, params), name
    stats = eng.stats()
    assert stats["slots_used"] == 0 and stats["in_flight"] == 0 and stats["waiting"] == 0
    assert stats.get("kv_blocks_used", 0) == 0  # the paged layout's pool is whole again
    assert not eng.requests
    # the engine goes on: a new request after the fault is exact too
    name, p, params = BYSTANDERS[0]
    eng.add_request("after", p, params)
    after = [o for o in eng.run_until_done() if o.finished][0]
    assert [(c.token_ids, c.text) for c in after.outputs] == solo(tiny, p, params)


def faulty(module, name, when):
    """A stage function that raises for rows of the request "bad" (when `when(args)`)."""
    real = getattr(module, name)

    def stage(*args, **kwargs):
        if when(args):
            raise RuntimeError(f"injected fault in {name}")
        return real(*args, **kwargs)
    return stage


def is_bad(row) -> bool:
    return row.request_id.split("#")[0] == "bad"


BAD = SamplingParams(max_tokens=10, temperature=0.8, seed=3, ignore_eos=True, repetition_penalty=1.2,
                     logit_bias={5: 1.0}, logprobs=1, stop=["zz"])


@pytest.mark.parametrize("module, stage, args_row", [
    (penalties, "row_penalty", 0),
    (penalties, "row_logit_bias", 0),
    (sampler, "row_sampling", 0),
    (outputs, "detokenize", 1),
])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_fault_in_a_per_request_stage_fails_that_request_alone(tiny, monkeypatch, module, stage,
                                                                  args_row, n, layout):
    monkeypatch.setattr(module, stage, faulty(module, stage, lambda a: is_bad(a[args_row])))
    params = replace(BAD, n=n)
    done, eng = run_with(tiny, prompts(1, seed=40)[0], params, kv_layout=layout)
    assert_isolated(tiny, done, eng, f"injected fault in {stage}")


def test_a_fault_in_the_logprobs_of_one_request_fails_it_alone(tiny, monkeypatch):
    calls = {"n": 0}
    real = penalties.logprob_entry

    def entry(row, k, ki):  # the bad request asks for 1 logprob, the bystander for 2
        if ki == 1:
            calls["n"] += 1
            raise RuntimeError("injected fault in logprob_entry")
        return real(row, k, ki)
    monkeypatch.setattr(penalties, "logprob_entry", entry)
    done, eng = run_with(tiny, prompts(1, seed=41)[0], BAD)
    assert calls["n"] == 1
    assert_isolated(tiny, done, eng, "injected fault in logprob_entry")


def test_a_fault_in_a_stop_string_check_fails_that_request_alone(tiny, monkeypatch):
    real = StopChecker.find

    def find(self, text, checked=0):
        if "zz" in self.stops:
            raise RuntimeError("injected fault in find")
        return real(self, text, checked)
    monkeypatch.setattr(StopChecker, "find", find)
    done, eng = run_with(tiny, prompts(1, seed=42)[0], BAD)
    assert_isolated(tiny, done, eng, "injected fault in find")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_fault_in_a_beam_step_fails_that_beam_search_alone(tiny, monkeypatch, layout):
    monkeypatch.setattr(runner, "beam_step", faulty(runner, "beam_step", lambda a: is_bad(a[0].rows[0])))
    beam_ok = ("beams", prompts(1, seed=43)[0], SamplingParams(max_tokens=6, beam_width=2))
    done, eng = run_with(tiny, prompts(1, seed=44)[0], SamplingParams(max_tokens=6, beam_width=3),
                         extra=[beam_ok], max_concurrency=12, kv_layout=layout)
    assert [c.token_ids for c in done["beams"].outputs] == [t for t, _ in solo(tiny, *beam_ok[1:])]
    assert_isolated(tiny, done, eng, "injected fault in beam_step")


def test_a_fault_assembling_one_output_fails_that_request_alone(tiny, monkeypatch):
    real = outputs.OutputProcessor._completion

    def completion(self, r, advanced):
        if is_bad(r):
            raise RuntimeError("injected fault in _completion")
        return real(self, r, advanced)
    monkeypatch.setattr(outputs.OutputProcessor, "_completion", completion)
    done, eng = run_with(tiny, prompts(1, seed=45)[0], BAD)
    assert_isolated(tiny, done, eng, "injected fault in _completion")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_failed_forward_fails_its_batch_frees_the_slots_and_the_engine_goes_on(tiny, monkeypatch,
                                                                                 layout):
    eng = engine(tiny, max_concurrency=2, kv_layout=layout)
    name, p, params = BYSTANDERS[0]
    eng.add_request("a", p, params)
    eng.add_request("b", prompts(1, seed=46)[0], params)
    eng.add_request("waiting", p, params)  # no slot yet: not in the failing batch
    eng.step()
    real = eng.runner.forward_logits
    calls = {"n": 0}

    def forward(batch, feed=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return real(batch, feed)
    monkeypatch.setattr(eng.runner, "forward_logits", forward)
    outs = eng.step()
    assert sorted(o.request_id for o in outs) == ["a", "b"]
    assert all(o.finished and o.finish_reason == "error" and "device lost" in o.error for o in outs)
    assert eng.stats()["failed_batches"] == 1 and eng.stats()["in_flight"] == 0
    done = {o.request_id: o for o in eng.run_until_done() if o.finished}
    assert [(c.token_ids, c.text) for c in done["waiting"].outputs] == solo(tiny, p, params)
    assert eng.stats()["slots_used"] == 0 and eng.stats().get("kv_blocks_used", 0) == 0


def test_a_generator_that_cannot_be_seeded_refuses_the_request_at_add(tiny, monkeypatch):
    from flover.engine import sequence
    from flover.engine.engine import RequestError

    monkeypatch.setattr(sequence, "make_generator", faulty(sequence, "make_generator", lambda a: a[0] == 3))
    eng = engine(tiny)
    name, p, params = BYSTANDERS[1]
    eng.add_request(name, p, params)
    with pytest.raises(RequestError, match="injected fault in make_generator"):
        eng.add_request("bad", p, BAD)
    assert set(eng.requests) == {name}
    done = {o.request_id: o for o in eng.run_until_done() if o.finished}
    assert [(c.token_ids, c.text) for c in done[name].outputs] == solo(tiny, p, params)


# --- the findings of the engine redesign issue, each with bystanders --------------------------

def finals_of(eng: Engine) -> dict:
    return {o.request_id: o for o in eng.run_until_done() if o.finished}


def assert_bystanders_exact(tiny, done):
    for name, p, params in BYSTANDERS:
        assert [(c.token_ids, c.text) for c in done[name].outputs] == solo(tiny, p, params), name


def add_bystanders(eng: Engine) -> None:
    for name, p, params in BYSTANDERS:
        eng.add_request(name, p, params)


def test_beams_with_a_stop_string_end_that_beam_as_a_hypothesis_and_go_on(tiny):
    p = prompts(1, seed=50)[0]
    plain = SamplingParams(max_tokens=10, beam_width=3)
    ref = engine(tiny, max_concurrency=12)
    ref.add_request("b", p, plain)
    texts = [c.text for c in finals_of(ref)["b"].outputs]
    stop = texts[1][2:4]  # two characters the second best beam reaches
    assert len(stop) == 2
    eng = engine(tiny, max_concurrency=12)
    add_bystanders(eng)
    eng.add_request("b", p, SamplingParams(max_tokens=10, beam_width=3, stop=[stop]))
    done = finals_of(eng)
    assert_bystanders_exact(tiny, done)
    out = done["b"]
    assert out.finished and out.error is None and len(out.outputs) == 3
    assert all(stop not in c.text for c in out.outputs)
    assert any(c.finish_reason == "stop" for c in out.outputs)
    assert eng.stats()["slots_used"] == 0


def test_beams_end_at_a_stop_token_as_transformers_beams_end_at_eos(checkpoint):
    from conftest import hf_model
    from test_sampling_options import frequent_token, hf_beams

    ref = hf_model(checkpoint)
    p = prompts(1, seed=21)[0]
    stop = frequent_token(ref, p)
    theirs, scores = hf_beams(ref, p, 3, 10, 1.0, stop)
    eng = Engine(EngineConfig(model=str(checkpoint), dtype="float32", device="cpu",
                              max_concurrency=6, max_seq_len=64))
    eng.add_request("b", p, SamplingParams(max_tokens=10, beam_width=3, len_penalty=1.0,
                                           stop_token_ids=[stop], ignore_eos=True))
    out = finals_of(eng)["b"]
    assert [c.token_ids for c in out.outputs] == theirs
    assert [c.score for c in out.outputs] == pytest.approx(scores, abs=1e-4)


def test_a_huge_top_k_means_all_tokens_and_harms_no_one(tiny):
    p = prompts(1, seed=51)[0]
    eng = engine(tiny)
    add_bystanders(eng)
    eng.add_request("big", p, SamplingParams(max_tokens=8, top_k=2**63, seed=4, ignore_eos=True))
    done = finals_of(eng)
    assert_bystanders_exact(tiny, done)
    off = solo(tiny, p, SamplingParams(max_tokens=8, top_k=0, seed=4, ignore_eos=True))
    assert [(c.token_ids, c.text) for c in done["big"].outputs] == off


def test_a_tiny_temperature_is_greedy(tiny):
    p = prompts(1, seed=52)[0]
    eng = engine(tiny)
    add_bystanders(eng)
    eng.add_request("cold", p, SamplingParams(max_tokens=8, temperature=1e-40, ignore_eos=True))
    done = finals_of(eng)
    assert_bystanders_exact(tiny, done)
    greedy = solo(tiny, p, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert [(c.token_ids, c.text) for c in done["cold"].outputs] == greedy


@pytest.mark.parametrize("field, value", [("seed", 2**64), ("logit_bias", {3: float("nan")}),
                                          ("logit_bias", {3: float("inf")}), ("temperature", float("nan"))])
def test_values_that_would_overflow_in_a_step_are_refused_where_they_enter(field, value):
    from flover import ConfigError

    with pytest.raises(ConfigError, match=field):
        SamplingParams(**{field: value})


def test_new_token_ids_of_n_samples_are_each_rows_own(tiny):
    p = prompts(1, seed=53)[0]
    params = SamplingParams(max_tokens=12, n=3, temperature=1.0, seed=8, ignore_eos=True)
    rows = [c.token_ids for c in [o for o in run_solo_outputs(tiny, p, params) if o.finished][0].outputs]
    # a stop token that ends row 0 early while row 1 goes on
    j, tok = next((j, t) for j, t in enumerate(rows[0]) if t not in rows[1] and j < 8)
    outs = run_solo_outputs(tiny, p, SamplingParams(max_tokens=12, n=3, temperature=1.0, seed=8,
                                                    ignore_eos=True, stop_token_ids=[tok]))
    seen = [[] for _ in range(3)]
    for o in outs:
        assert o.new_token_ids == o.outputs[0].new_token_ids
        for c in o.outputs:
            seen[c.index] += c.new_token_ids
    final = outs[-1]
    assert final.outputs[0].token_ids == rows[0][: j + 1]
    assert [seen[i] for i in range(3)] == [c.token_ids for c in final.outputs]
    assert len(final.outputs[1].token_ids) > j + 1


def run_solo_outputs(tiny, p, params) -> list:
    eng = engine(tiny)
    eng.add_request("s", p, params)
    return list(eng.run_until_done())


def test_llm_generate_that_refuses_a_prompt_leaves_nothing_queued(llama_dir):
    from flover import LLM, RequestError

    llm = LLM(model=str(llama_dir), dtype="float32", device="cpu", max_concurrency=4, max_seq_len=32)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with pytest.raises(RequestError, match="does not fit"):
        llm.generate([[5, 6], [7, 8], [3] * 40], params)
    assert not llm.engine.has_unfinished() and not llm.engine.requests
    outs = llm.generate([[9, 10]], params)
    assert len(outs) == 1 and len(outs[0].token_ids) == 4
    assert llm.engine.stats()["iterations"] == 4  # only the new prompt ran


def test_detokenisation_per_step_does_not_grow_with_the_output(tiny):
    model, tok = tiny

    class Counting:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, skip_special_tokens=True):
            self.longest = max(self.longest, len(ids))
            return tok.decode(ids, skip_special_tokens)

    counting = Counting()
    eng = Engine(EngineConfig(dtype="float32", device="cpu", max_concurrency=2, max_seq_len=256),
                 model=model, tokenizer=counting)
    eng.add_request("long", [5, 6], SamplingParams(max_tokens=250, temperature=1.0, seed=1,
                                                   ignore_eos=True, stop=["never here"]))
    out = [o for o in eng.run_until_done() if o.finished][0]
    assert len(out.token_ids) == 250 and out.text == tok.decode(out.token_ids)
    assert counting.longest <= 16


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_fault_in_prompt_logprobs_fails_that_request_alone_even_mid_prompt(tiny, monkeypatch,
                                                                             layout):
    real = runner.ModelRunner._chunk_logprobs

    def chunk_logprobs(self, hidden, offset, start, end, prompt, k, slice_len=256):
        if start > 0:  # the second chunk of the bad prompt: no token is sampled for it yet
            raise RuntimeError("injected fault in _chunk_logprobs")
        return real(self, hidden, offset, start, end, prompt, k, slice_len)
    monkeypatch.setattr(runner.ModelRunner, "_chunk_logprobs", chunk_logprobs)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    done, eng = run_with(tiny, list(range(3, 40)), params, prefill_token_budget=24,
                         kv_layout=layout)
    assert_isolated(tiny, done, eng, "injected fault in _chunk_logprobs")

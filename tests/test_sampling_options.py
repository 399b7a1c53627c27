"""Per-request sampling options inside a fused batch: beams, n samples, penalties, stops."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_model, prompts
from test_engine import engine, finals, greedy

from flover import RequestError, SamplingParams


def hf_beams(model, prompt, k, max_new, len_penalty, eos):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), num_beams=k, num_return_sequences=k,
                             max_new_tokens=max_new, length_penalty=len_penalty, do_sample=False,
                             eos_token_id=eos, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
    seqs = []
    for row in out.sequences[:, len(prompt):].tolist():
        seqs.append(row[: row.index(eos) + 1] if eos in row else row)
    return seqs, out.sequences_scores.tolist()


def frequent_token(model, prompt):
    """A token greedy decoding emits early: as EOS it makes beams end at different lengths."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt) + 3].item()


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("len_penalty", [0.0, 1.0])
def test_beam_search_equals_transformers(checkpoint, k, len_penalty):
    ref = hf_model(checkpoint)
    p = prompts(1, seed=21)[0]
    eos = frequent_token(ref, p)
    theirs, scores = hf_beams(ref, p, k, 10, len_penalty, eos)
    eng = engine(checkpoint, max_concurrency=6)
    eng.eos_token_ids = [eos]
    params = SamplingParams(max_tokens=10, beam_width=k, len_penalty=len_penalty)
    # fused with a greedy request before and a sampled one arriving mid-way
    out = finals(eng, [(0, [5, 6, 7], greedy(12)), (1, p, params),
                       (4, [9, 8], SamplingParams(max_tokens=8, temperature=1.0, seed=3))])["r1"]
    assert [c.token_ids for c in out.outputs] == theirs
    assert [c.score for c in out.outputs] == pytest.approx(scores, abs=1e-4)
    assert eng.stats()["slots_used"] == 0


def test_beam_rows_share_the_prompt_prefill(llama_dir):
    eng = engine(llama_dir, max_concurrency=4)
    eng.add_request("b", prompts(1, seed=22)[0], SamplingParams(max_tokens=5, beam_width=4))
    batch = eng.scheduler.schedule()
    assert len(batch.prefill) == 1 and len(batch.sample) == 4


def test_diversity_rate_penalises_candidates_by_their_rank_within_their_beam():
    from flover.sampling.beam import BeamSearch

    logprobs = torch.tensor([[-0.1, -0.2, -5.0, -5.0], [-1.0, -6.0, -6.0, -6.0]])

    def select(rate):
        bs = BeamSearch(width=2, max_tokens=10, eos_ids=[3], diversity_rate=rate)
        bs.scores, bs.tokens = [0.0, 0.0], [[7], [8]]
        return bs.step(logprobs)

    assert select(0.0) == ([0, 1], [0, 0])  # both continue beam 0
    assert select(0.5) == ([0, 1], [0, 0])  # beam 0's second candidate: -0.7 > -1.0
    assert select(1.0) == ([0, 0], [0, 1])  # now -1.2 < -1.0: beam 1 survives


def test_diversity_rate_changes_fused_beams(llama_dir):
    p = prompts(1, seed=23)[0]
    plain = finals(engine(llama_dir), [(0, p, SamplingParams(max_tokens=8, beam_width=3))])
    diverse = finals(engine(llama_dir), [(0, p, SamplingParams(
        max_tokens=8, beam_width=3, beam_search_diversity_rate=5.0))])
    tokens = lambda out: [c.token_ids for c in out["r0"].outputs]  # noqa: E731
    assert tokens(plain) != tokens(diverse)


def test_n_samples_run_one_prefill_and_return_n_outputs(llama_dir):
    eng = engine(llama_dir, max_concurrency=4)
    params = SamplingParams(max_tokens=6, n=3, temperature=1.0, seed=7, ignore_eos=True)
    prompt = prompts(1, seed=24)[0]
    eng.add_request("s", prompt, params)
    out = [o for o in eng.run_until_done() if o.finished][0]
    assert eng.stats()["prefill_tokens"] == len(prompt)  # one prefill for the three samples
    assert eng.stats()["decode_rows"] == 3 * 5
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_seeded_n_samples_do_not_depend_on_fusion(llama_dir):
    p = prompts(1, seed=25)[0]
    params = SamplingParams(max_tokens=8, n=2, temperature=1.0, seed=11, ignore_eos=True)
    alone = finals(engine(llama_dir), [(0, p, params)])["r0"]
    noisy = SamplingParams(max_tokens=9, temperature=1.0, ignore_eos=True)
    fused = finals(engine(llama_dir), [(0, [3, 3, 3], noisy), (2, p, params), (3, [4], noisy)])["r1"]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in fused.outputs]


def test_repetition_penalty_changes_only_its_own_request(llama_dir):
    p = prompts(1, seed=26)[0]
    base = finals(engine(llama_dir), [(0, p, greedy(12))])["r0"].token_ids
    mixed = finals(engine(llama_dir), [
        (0, p, greedy(12)),
        (0, p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                              repetition_penalty=5.0))])
    assert mixed["r0"].token_ids == base
    assert mixed["r1"].token_ids != base
    assert len(set(mixed["r1"].token_ids)) > len(set(base))


def test_logit_bias_forces_a_token(llama_dir):
    out = finals(engine(llama_dir), [(0, [5, 6], SamplingParams(
        max_tokens=4, temperature=0.0, ignore_eos=True, logit_bias={42: 100.0}))])["r0"]
    assert out.token_ids == [42, 42, 42, 42]


def test_logprobs_are_log_softmax_of_the_model_logits(llama_dir):
    ref = hf_model(llama_dir)
    p = prompts(1, seed=27)[0]
    out = finals(engine(llama_dir), [(0, p, SamplingParams(
        max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=2))])["r0"]
    lps = out.outputs[0].logprobs
    with torch.no_grad():
        logits = ref(torch.tensor([p + out.token_ids])).logits[0, len(p) - 1:-1]
    expected = torch.log_softmax(logits, -1)
    for step, (lp, tok) in enumerate(zip(lps, out.token_ids, strict=True)):
        assert lp["token_id"] == tok
        assert lp["logprob"] == pytest.approx(expected[step, tok].item(), abs=1e-4)
        top = expected[step].topk(2)
        assert [t for t, _ in lp["top_logprobs"]] == top.indices.tolist()


def test_stop_string_cuts_the_text_before_it():
    from flover import LLM

    llm = LLM(device="cpu", max_concurrency=2, max_seq_len=256)
    msgs = [[{"role": "user", "content": "What is the capital of France?"}]]
    full = llm.chat(msgs, SamplingParams(max_tokens=20, temperature=0.0))[0].text
    assert "capital of France is" in full
    cut = llm.chat(msgs, SamplingParams(max_tokens=20, temperature=0.0, stop=["of Fr"]))[0]
    assert cut.text == full[: full.index("of Fr")]
    assert cut.finish_reason == "stop"


@pytest.mark.parametrize("params, message", [
    (dict(max_tokens=4, beam_width=5), "5 rows .* do not fit max_concurrency=3"),
    (dict(max_tokens=4, logit_bias={999: 1.0}), "logit_bias token id 999 is outside"),
])
def test_requests_that_cannot_run_are_refused(llama_dir, params, message):
    with pytest.raises(RequestError, match=message):
        engine(llama_dir).add_request("x", [3, 4], SamplingParams(**params))


@pytest.mark.parametrize("kwargs, message", [
    ({"beam_width": 2, "n": 2}, "cannot be combined with n=2"),
    ({"presence_penalty": -3.0}, "presence_penalty=-3.0 is invalid"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens=9 is invalid"),
    ({"beam_search_diversity_rate": -1.0}, "beam_search_diversity_rate=-1.0 is invalid"),
])
def test_bad_sampling_values_are_named(kwargs, message):
    from flover import ConfigError

    with pytest.raises(ConfigError, match=message):
        SamplingParams(**kwargs)


def test_beam_requests_wait_until_enough_slots_are_free(llama_dir):
    eng = engine(llama_dir, max_concurrency=3)
    eng.add_request("g", [3, 4], greedy(4))
    eng.add_request("b", [5, 6], SamplingParams(max_tokens=3, beam_width=3))
    eng.step()
    assert eng.stats()["in_flight"] == 1 and eng.stats()["waiting"] == 3
    outs = {o.request_id: o for o in eng.run_until_done() if o.finished}
    assert set(outs) == {"g", "b"} and len(outs["b"].outputs) == 3


def test_prompt_logprobs_are_log_softmax_of_the_model_logits_over_the_prompt(llama_dir):
    ref = hf_model(llama_dir)
    p = prompts(1, seed=28, low=13, high=14)[0]
    bystander = greedy(6)
    alone = finals(engine(llama_dir), [(0, [5, 6, 7], bystander)])["r0"].token_ids
    # a prefill budget of 5 splits the prompt into chunks, fused with a decoding bystander
    eng = engine(llama_dir, prefill_token_budget=5)
    done = finals(eng, [(0, [5, 6, 7], bystander), (1, p, SamplingParams(
        max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=2))])
    assert done["r0"].token_ids == alone and done["r0"].prompt_logprobs is None
    lps = done["r1"].prompt_logprobs
    assert len(lps) == len(p) and lps[0] is None
    with torch.no_grad():
        expected = torch.log_softmax(ref(torch.tensor([p])).logits[0], -1)
    for i in range(1, len(p)):
        assert lps[i]["token_id"] == p[i]
        assert lps[i]["logprob"] == pytest.approx(expected[i - 1, p[i]].item(), abs=1e-4)
        assert [t for t, _ in lps[i]["top_logprobs"]] == expected[i - 1].topk(2).indices.tolist()

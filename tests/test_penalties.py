"""Penalties, biases and logprobs on fused batches, each held equal to its reference.

Every batch mixes rows with different parameters, including a neutral row that must come
out bit-identical. References are transformers' logits processors applied one row at a time,
or the OpenAI formula written out.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from flover.config import SamplingParams
from flover.engine.kv_cache import Move, Reorder
from flover.engine.sequence import Request
from flover.sampling.penalties import (
    TokenCounts,
    apply_penalties,
    compute_logprobs,
    logit_bias,
    row_penalty,
)

transformers = pytest.importorskip("transformers")

V = 64
EOS = [2]


def make_reqs(params: list[SamplingParams], seed: int = 0) -> list[Request]:
    """One request per params, with random prompt and output histories (repeats likely)."""
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for i, p in enumerate(params):
        n_prompt, n_out = torch.randint(1, 30, (), generator=g), torch.randint(0, 20, (), generator=g)
        r = Request(f"r{i}", torch.randint(0, V, (int(n_prompt),), generator=g).tolist(), p)
        r.output_ids = torch.randint(0, V, (int(n_out),), generator=g).tolist()
        reqs.append(r)
    return reqs


def rand_logits(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g) * 4


def history(r: Request) -> torch.Tensor:
    return torch.tensor([r.prompt_ids + r.output_ids])


def test_fast_path_returns_the_same_tensor_when_no_row_uses_penalties():
    reqs = make_reqs([SamplingParams(), SamplingParams(temperature=0.5, top_k=5), SamplingParams()])
    logits = rand_logits(3)
    assert apply_penalties(logits, reqs, EOS) is logits


def test_min_tokens_already_reached_is_the_fast_path():
    reqs = make_reqs([SamplingParams(min_tokens=2, stop_token_ids=[7])])
    reqs[0].output_ids = [5, 6]
    logits = rand_logits(1)
    assert row_penalty(reqs[0], EOS) is None
    assert apply_penalties(logits, reqs, EOS) is logits


def test_input_logits_are_never_modified():
    reqs = make_reqs([SamplingParams(repetition_penalty=1.5, logit_bias={3: 2.0}, min_tokens=4,
                                     presence_penalty=0.5), SamplingParams()])
    logits = rand_logits(2)
    before = logits.clone()
    apply_penalties(logits, reqs, EOS)
    assert torch.equal(logits, before)


def test_token_counts_hold_the_prompt_once_and_count_each_output_token():
    counts = TokenCounts(2, V, "cpu")
    counts.start(0, [1, 1, 3])
    counts.start(1, [])
    counts.add([0, 0, 0, 1, 1, 1], [3, 3, 3, 0, V + 5, -1])
    prompt, output = counts.rows([0, 1])
    assert prompt[0, 1] and prompt[0, 3] and prompt[0].sum() == 2 and prompt[1].sum() == 0
    assert output[0, 3] == 3 and output[1, 0] == 1
    assert output[1].sum() == 1  # ids outside [0, V) are not counted


def test_token_counts_follow_their_rows_through_moves_and_beam_reorders():
    counts = TokenCounts(3, V, "cpu")
    for slot, prompt in enumerate([[1], [2], [3]]):
        counts.start(slot, prompt)
    counts.add([0, 1, 2], [10, 11, 12])
    counts.apply(Reorder((1, 1, 0), (0, 1, 2), 4))  # beams 0 and 1 continue beam 1, beam 2 beam 0
    prompt, output = counts.rows([0, 1, 2])
    assert output[:, 11].tolist() == [1, 1, 0] and output[2, 10] == 1 and prompt[2, 1]
    counts.apply(Move(2, 0, 4))
    assert counts.rows([0])[1][0, 10] == 1 and counts.rows([0])[0][0, 1]


def test_repetition_penalty_matches_transformers_per_row():
    pens = [1.3, 1.0, 0.7, 2.0]
    reqs = make_reqs([SamplingParams(repetition_penalty=p) for p in pens], seed=1)
    logits = rand_logits(len(reqs), seed=1)
    out = apply_penalties(logits, reqs, EOS)
    for i, (r, p) in enumerate(zip(reqs, pens, strict=True)):
        ref = transformers.RepetitionPenaltyLogitsProcessor(p)(history(r), logits[i:i + 1].clone())
        assert torch.equal(out[i:i + 1], ref), i
    assert torch.equal(out[1], logits[1])  # penalty 1.0: bit-identical


def test_presence_and_frequency_penalties_follow_the_openai_formula_on_generated_tokens():
    params = [SamplingParams(presence_penalty=0.8), SamplingParams(frequency_penalty=0.5),
              SamplingParams(presence_penalty=-1.2, frequency_penalty=1.7), SamplingParams()]
    reqs = make_reqs(params, seed=2)
    reqs[1].output_ids += reqs[1].output_ids[:3] * 2  # make sure some tokens repeat
    logits = rand_logits(len(reqs), seed=2)
    out = apply_penalties(logits, reqs, EOS)
    for i, r in enumerate(reqs):
        counts = torch.zeros(V)
        for t, c in Counter(r.output_ids).items():  # the prompt does not count
            counts[t] = c
        presence = torch.tensor(r.params.presence_penalty)
        frequency = torch.tensor(r.params.frequency_penalty)
        ref = logits[i] - (presence * (counts > 0) + frequency * counts)
        assert torch.equal(out[i], ref), i
    assert torch.equal(out[3], logits[3])


def test_presence_penalty_ignores_prompt_tokens():
    reqs = make_reqs([SamplingParams(presence_penalty=1.0)])
    reqs[0].prompt_ids, reqs[0].output_ids = [5, 6], [7]
    logits = torch.zeros(1, V)
    out = apply_penalties(logits, reqs, EOS)
    assert out[0, 7] == -1.0 and out[0, 5] == 0.0 and (out[0] != 0).sum() == 1


def test_min_tokens_matches_transformers_per_row():
    params = [SamplingParams(min_tokens=10), SamplingParams(min_tokens=10, stop_token_ids=[9, 11]),
              SamplingParams(min_tokens=10, ignore_eos=True, stop_token_ids=[4]), SamplingParams(),
              SamplingParams(min_tokens=1, stop_token_ids=[5])]
    reqs = make_reqs(params, seed=3)
    reqs[0].output_ids, reqs[1].output_ids, reqs[2].output_ids = [1] * 3, [1] * 9, []
    reqs[4].output_ids = [8]  # min_tokens reached: nothing banned
    logits = rand_logits(len(reqs), seed=3)
    out = apply_penalties(logits, reqs, EOS)
    banned = [EOS, [9, 11] + EOS, [4], None, None]  # ignore_eos: only the stop ids are banned
    for i, (r, ids) in enumerate(zip(reqs, banned, strict=True)):
        if ids is None:
            assert torch.equal(out[i], logits[i]), i
            continue
        proc = transformers.MinNewTokensLengthLogitsProcessor(len(r.prompt_ids), r.params.min_tokens, ids)
        assert torch.equal(out[i:i + 1], proc(history(r), logits[i:i + 1].clone())), i
        assert torch.isinf(out[i, ids]).all()


def test_logit_bias_matches_transformers_sequence_bias_per_row():
    biases = [{3: 5.0, 17: -2.5}, {}, {0: -100.0, V - 1: 0.25, 3: 1.0}]
    reqs = make_reqs([SamplingParams(logit_bias=b) for b in biases], seed=4)
    logits = rand_logits(len(reqs), seed=4)
    out = apply_penalties(logits, reqs, EOS)
    for i, b in enumerate(biases):
        if not b:
            assert torch.equal(out[i], logits[i])
            continue
        proc = transformers.SequenceBiasLogitsProcessor([[[t], v] for t, v in b.items()])
        assert torch.equal(out[i:i + 1], proc(history(reqs[i]), logits[i:i + 1].clone())), i


def test_logit_bias_ignores_ids_outside_the_vocabulary():
    logits = torch.zeros(1, V)
    out = logit_bias(logits, [{V: 1.0, -1: 1.0, 4: 2.0}])
    assert out[0, 4] == 2.0 and out.sum() == 2.0


def test_mixed_batch_applies_bias_ban_repetition_then_presence_frequency():
    params = [SamplingParams(repetition_penalty=1.4, presence_penalty=0.3, frequency_penalty=0.6,
                             logit_bias={5: 3.0, 6: -1.0}, min_tokens=16, stop_token_ids=[12]),
              SamplingParams(),
              SamplingParams(repetition_penalty=0.8, logit_bias={1: 2.0}),
              SamplingParams(temperature=0.0, frequency_penalty=-0.4),
              SamplingParams(top_p=0.9)]
    reqs = make_reqs(params, seed=5)
    logits = rand_logits(len(reqs), seed=5)
    out = apply_penalties(logits, reqs, EOS)
    for i, r in enumerate(reqs):
        p, x, ids = r.params, logits[i:i + 1].clone(), history(r)
        if p.logit_bias:
            x = transformers.SequenceBiasLogitsProcessor([[[t], v] for t, v in p.logit_bias.items()])(ids, x)
        if len(r.output_ids) < p.min_tokens:
            x = transformers.MinNewTokensLengthLogitsProcessor(
                len(r.prompt_ids), p.min_tokens, p.stop_token_ids + EOS)(ids, x)
        x = transformers.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x)
        counts = torch.zeros(V)
        for t, c in Counter(r.output_ids).items():
            counts[t] = c
        x = x - (torch.tensor(p.presence_penalty) * (counts > 0) + torch.tensor(p.frequency_penalty) * counts)
        assert torch.equal(out[i:i + 1], x), i
    assert torch.equal(out[1], logits[1]) and torch.equal(out[4], logits[4])


def test_logprobs_match_log_softmax_with_each_rows_k():
    logits = rand_logits(5, seed=6)
    chosen = torch.tensor([3, 0, 7, V - 1, 9])
    ks = [2, None, 0, 5, 1]
    got = compute_logprobs(logits, chosen, ks)
    ref = torch.log_softmax(logits, dim=-1)
    assert got[1] is None
    for i, k in enumerate(ks):
        if k is None:
            continue
        assert got[i]["token_id"] == chosen[i].item()
        assert got[i]["logprob"] == ref[i, chosen[i]].item()
        top_lp, top_id = ref[i].topk(k)
        assert got[i]["top_logprobs"] == list(zip(top_id.tolist(), top_lp.tolist(), strict=True))


def test_logprobs_with_no_row_asking_are_all_none():
    assert compute_logprobs(rand_logits(3), torch.zeros(3, dtype=torch.long), [None] * 3) == [None] * 3


def test_logprobs_read_the_penalised_logits():
    reqs = make_reqs([SamplingParams(logit_bias={4: -100.0}, logprobs=1)])
    logits = apply_penalties(rand_logits(1), reqs, EOS)
    got = compute_logprobs(logits, torch.tensor([4]), [1])[0]
    assert got["logprob"] < -80 and got["top_logprobs"][0][0] != 4


def test_a_row_comes_out_the_same_alone_or_fused():
    params = [SamplingParams(repetition_penalty=1.2, frequency_penalty=0.7, logit_bias={2: 1.5}),
              SamplingParams(presence_penalty=0.4, min_tokens=16, stop_token_ids=[3]), SamplingParams()]
    reqs = make_reqs(params, seed=7)
    logits = rand_logits(len(reqs), seed=7)
    fused = apply_penalties(logits, reqs, EOS)
    for i, r in enumerate(reqs):
        assert torch.equal(fused[i:i + 1], apply_penalties(logits[i:i + 1], [r], EOS)), i


def test_incremental_counts_equal_counts_from_whole_histories_at_every_step(llama_dir, monkeypatch):
    """Through a fused run with shuffle moves, forks and beam reorders, the penalised logits
    from the per-slot counts equal those from counting each row's history from scratch."""
    from test_engine import engine, finals

    from flover.sampling import penalties

    real, calls = penalties.apply_penalties, {"n": 0}

    def checked(logits, reqs, eos_ids, counts=None, slots=None, specs=None):
        out = real(logits, reqs, eos_ids, counts, slots, specs)
        if counts is not None:
            calls["n"] += 1
            assert torch.equal(out, real(logits, reqs, eos_ids)), [r.request_id for r in reqs]
        return out
    monkeypatch.setattr(penalties, "apply_penalties", checked)
    ps = [[3, 4, 5, 3], [7, 7, 8], [9, 10], [11, 12, 11], [5, 5, 5, 6], [20, 21]]
    work = [(0, ps[0], SamplingParams(max_tokens=9, temperature=0.0, presence_penalty=1.5, ignore_eos=True)),
            (0, ps[1], SamplingParams(max_tokens=4, temperature=0.0, frequency_penalty=1.0, ignore_eos=True)),
            (1, ps[2], SamplingParams(max_tokens=7, beam_width=2, repetition_penalty=1.4)),
            (2, ps[3], SamplingParams(max_tokens=6, n=2, temperature=1.0, seed=3, frequency_penalty=0.8,
                                      ignore_eos=True)),
            (3, ps[4], SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.3,
                                      ignore_eos=True)),
            (5, ps[5], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))]
    eng = engine(llama_dir, max_concurrency=6)
    done = finals(eng, work)
    assert len(done) == 6 and calls["n"] > 10 and eng.stats()["shuffle_moves"] > 0

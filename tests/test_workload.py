"""The request stream: arrival patterns, output lengths and prompts, all seeded."""

from __future__ import annotations

import json

import pytest

from flover.config import ConfigError
from flover.run.workload import (
    arrival_times,
    encode_prompt,
    output_lengths,
    read_prompts_file,
    synthetic_prompts,
)


def test_constant_arrivals_are_interval_apart_from_zero():
    assert arrival_times(4, 250, "constant", seed=0) == [0.0, 0.25, 0.5, 0.75]


def test_poisson_arrivals_start_at_zero_and_never_go_back():
    t = arrival_times(50, 100, "poisson", seed=0)
    assert t[0] == 0.0 and all(b >= a for a, b in zip(t, t[1:], strict=False))


def test_poisson_arrivals_are_the_same_for_the_same_seed():
    assert arrival_times(20, 100, "poisson", seed=3) == arrival_times(20, 100, "poisson", seed=3)


def test_poisson_arrivals_change_with_the_seed():
    assert arrival_times(20, 100, "poisson", seed=3) != arrival_times(20, 100, "poisson", seed=4)


def test_poisson_gaps_have_the_interval_as_mean():
    t = arrival_times(4001, 20, "poisson", seed=0)
    assert t[-1] / 4000 == pytest.approx(0.020, rel=0.05)


def test_poisson_gaps_are_exponential():
    """An exponential's standard deviation equals its mean; a constant's is 0."""
    t = arrival_times(4001, 20, "poisson", seed=0)
    gaps = [b - a for a, b in zip(t, t[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    std = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert std / mean == pytest.approx(1.0, rel=0.1)


def test_zero_interval_means_all_arrive_at_once():
    assert arrival_times(3, 0, "poisson", seed=0) == [0.0, 0.0, 0.0]


def test_fixed_lengths_are_the_output_len():
    assert output_lengths(3, 7, False, seed=0) == [7, 7, 7]


def test_random_lengths_are_uniform_between_one_and_the_output_len():
    lens = output_lengths(2000, 10, True, seed=0)
    assert set(lens) == set(range(1, 11))


def test_random_lengths_are_the_same_for_the_same_seed():
    assert output_lengths(10, 50, True, seed=1) == output_lengths(10, 50, True, seed=1)


def test_synthetic_prompts_share_the_prefix_and_differ_after_it():
    ps = synthetic_prompts(3, input_len=4, prefix_len=2, vocab_size=1000, seed=0)
    assert [len(p) for p in ps] == [6, 6, 6]
    assert len({tuple(p[:2]) for p in ps}) == 1 and len({tuple(p[2:]) for p in ps}) == 3


def test_prompts_file_reads_raw_and_chat_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    msgs = [{"role": "user", "content": "hi"}]
    path.write_text(json.dumps({"prompt": "raw"}) + "\n\n" + json.dumps({"messages": msgs}) + "\n")
    assert read_prompts_file(path) == ["raw", msgs]


def test_prompts_file_bad_line_is_rejected_with_its_number(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    with pytest.raises(ConfigError, match=r"line 2: expected \{\"prompt\""):
        read_prompts_file(path)


class ChatTok:
    def apply_chat_template(self, messages):
        return "<chat>" + messages[0]["content"]

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [len(text)]


def test_chat_prompts_go_through_the_template_without_extra_special_tokens():
    assert encode_prompt([{"role": "user", "content": "hey"}], ChatTok()) == [9]


def test_raw_prompts_are_encoded_as_they_are():
    assert encode_prompt("hey", ChatTok()) == [1, 3]


def test_prompts_file_without_a_tokenizer_is_rejected():
    with pytest.raises(ConfigError, match="prompts_file needs a model with a tokenizer"):
        encode_prompt("hey", None)

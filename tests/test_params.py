"""SamplingParams refuses every value that could fail, overflow or turn into NaN later.

One test per rule: each bad value raises ConfigError naming the field; then the edge values
that must still pass, and the normalisations (str stop, str logit_bias keys).
"""

from __future__ import annotations

import math

import pytest
import torch

from flover.config import (
    LEN_PENALTY_RANGE,
    LOGIT_BIAS_RANGE,
    MAX_DIVERSITY_RATE,
    MAX_LOGIT_BIAS,
    MAX_STOP,
    MAX_STOP_LEN,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPERATURE,
    REPETITION_PENALTY_RANGE,
    SAMPLING_EPS,
    ConfigError,
    SamplingParams,
)

NAN, INF = math.nan, math.inf


def refused(field: str, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        SamplingParams(**kwargs)
    msg = str(e.value)
    assert field in msg and "is invalid" in msg, msg
    return msg


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "4", None])
def test_max_tokens_is_an_integer_at_least_1(value):
    refused("max_tokens", max_tokens=value)


@pytest.mark.parametrize("value", [-1, 5, True, 1.0, None])
def test_min_tokens_is_an_integer_up_to_max_tokens(value):
    refused("min_tokens", max_tokens=4, min_tokens=value)


@pytest.mark.parametrize("value", [-1e-9, -1, NAN, INF, -INF, MAX_TEMPERATURE * 1.01, 10**400, True, "1",
                                   None])
def test_temperature_is_finite_and_in_range(value):
    refused("temperature", temperature=value)


@pytest.mark.parametrize("value", [-1, True, False, 2.0, "5", None])
def test_top_k_is_an_integer_at_least_0(value):
    refused("top_k", top_k=value)


@pytest.mark.parametrize("value", [0.0, -0.1, 1.0000001, 2, NAN, INF, -INF, True, None])
def test_top_p_is_in_0_1_and_not_nan(value):
    refused("top_p", top_p=value)


@pytest.mark.parametrize("value", [-0.01, 1.01, NAN, INF, -INF, True, None])
def test_min_p_is_in_0_1_and_not_nan(value):
    refused("min_p", min_p=value)


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 10**30, True, False, 1.0, "7"])
def test_seed_is_none_or_an_integer_torch_accepts(value):
    refused("seed", seed=value)
    if isinstance(value, int) and not isinstance(value, bool):
        with pytest.raises((ValueError, RuntimeError, OverflowError)):
            torch.Generator().manual_seed(value)  # the range is torch's own


@pytest.mark.parametrize("value", [0, -1, NAN, INF, REPETITION_PENALTY_RANGE[0] / 2,
                                   REPETITION_PENALTY_RANGE[1] * 2, 1e-300, True])
def test_repetition_penalty_is_positive_finite_and_bounded(value):
    refused("repetition_penalty", repetition_penalty=value)


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [2.01, -2.01, NAN, INF, -INF, True, "0"])
def test_presence_and_frequency_penalties_are_in_minus_2_2(field, value):
    refused(field, **{field: value})


@pytest.mark.parametrize("value", [NAN, INF, -INF, LEN_PENALTY_RANGE[1] + 1, LEN_PENALTY_RANGE[0] - 1, True])
def test_len_penalty_is_finite_and_bounded(value):
    refused("len_penalty", len_penalty=value)


@pytest.mark.parametrize("value", [-1.0, -1e-9, NAN, INF, MAX_DIVERSITY_RATE * 2, True])
def test_beam_search_diversity_rate_is_finite_and_at_least_0(value):
    refused("beam_search_diversity_rate", beam_search_diversity_rate=value)


@pytest.mark.parametrize("bias", [
    {5: NAN}, {5: INF}, {5: -INF}, {5: LOGIT_BIAS_RANGE + 0.5}, {5: -LOGIT_BIAS_RANGE - 0.5}, {5: 1e9},
    {5: True}, {5: "1"}, {5: None}, {5: 10**400},
    {"abc": 1.0}, {"1.5": 1.0}, {"": 1.0}, {1.5: 1.0}, {None: 1.0}, {True: 1.0}, {-1: 1.0}, {"-3": 1.0},
    [(1, 2.0)], None,
])
def test_logit_bias_keys_are_token_ids_and_values_finite_in_range(bias):
    refused("logit_bias", logit_bias=bias)


def test_logit_bias_has_at_most_max_entries():
    msg = refused("logit_bias", logit_bias=dict.fromkeys(range(MAX_LOGIT_BIAS + 1), 1.0))
    assert len(msg) < 200  # the count, not the whole dict
    full = SamplingParams(logit_bias=dict.fromkeys(range(MAX_LOGIT_BIAS), 1.0))
    assert len(full.logit_bias) == MAX_LOGIT_BIAS


@pytest.mark.parametrize("stop", [[""], "", ["ok", ""], [5], ["ok", None], None, 5,
                                  ["x"] * (MAX_STOP + 1), ["x" * (MAX_STOP_LEN + 1)]])
def test_stop_strings_are_few_short_and_non_empty(stop):
    msg = refused("stop", stop=stop)
    assert len(msg) < 300


@pytest.mark.parametrize("ids", [[-1], [3, -2], [True], [1.0], ["3"], [None], None, 3,
                                 list(range(MAX_STOP_TOKEN_IDS + 1))])
def test_stop_token_ids_are_few_integers_at_least_0(ids):
    refused("stop_token_ids", stop_token_ids=ids)


@pytest.mark.parametrize("field", ["n", "beam_width"])
@pytest.mark.parametrize("value", [0, -1, True, 2.0, None])
def test_n_and_beam_width_are_integers_at_least_1(field, value):
    refused(field, **{field: value})


def test_n_cannot_be_combined_with_beam_width():
    msg = refused("beam_width", n=2, beam_width=3)
    assert "n=2" in msg


@pytest.mark.parametrize("value", [-1, 21, True, 1.0, "2"])
def test_logprobs_is_none_or_an_integer_in_0_20(value):
    refused("logprobs", logprobs=value)


@pytest.mark.parametrize("value", [-1, 21, True, 1.0, "2"])
def test_prompt_logprobs_is_none_or_an_integer_in_0_20(value):
    refused("prompt_logprobs", prompt_logprobs=value)


def test_message_names_field_value_and_what_is_allowed():
    msg = refused("top_p", top_p=NAN)
    assert msg == "top_p=nan is invalid: must be in (0, 1] (1 disables top-p)"
    assert "logit_bias={7: inf}" in refused("logit_bias", logit_bias={7: INF})


# --- values that must pass -------------------------------------------------------------------

@pytest.mark.parametrize("seed", [2**64 - 1, -1, -(2**63), 0, 2**63])
def test_seed_edges_pass_and_torch_accepts_them(seed):
    p = SamplingParams(seed=seed)
    assert p.seed == seed
    torch.Generator().manual_seed(p.seed)


def test_huge_top_k_passes():
    assert SamplingParams(top_k=2**63).top_k == 2**63
    assert not SamplingParams(top_k=2**63).greedy


def test_tiny_temperature_passes_and_is_greedy():
    p = SamplingParams(temperature=1e-40)
    assert p.temperature == 1e-40 and p.greedy
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=SAMPLING_EPS * 0.999).greedy
    assert not SamplingParams(temperature=SAMPLING_EPS).greedy
    assert SamplingParams(top_k=1).greedy


def test_edge_values_pass():
    SamplingParams(temperature=MAX_TEMPERATURE, top_p=1e-12, min_p=1.0)
    SamplingParams(top_p=1.0, min_p=0.0, repetition_penalty=REPETITION_PENALTY_RANGE[0])
    SamplingParams(repetition_penalty=REPETITION_PENALTY_RANGE[1], presence_penalty=-2.0,
                   frequency_penalty=2.0)
    SamplingParams(len_penalty=LEN_PENALTY_RANGE[0], beam_search_diversity_rate=MAX_DIVERSITY_RATE)
    SamplingParams(len_penalty=LEN_PENALTY_RANGE[1], beam_search_diversity_rate=0.0, logprobs=20)
    SamplingParams(max_tokens=1, min_tokens=1, logprobs=0, n=3)
    SamplingParams(logit_bias={0: -LOGIT_BIAS_RANGE, 10**6: LOGIT_BIAS_RANGE})
    SamplingParams(stop=["x" * MAX_STOP_LEN] * MAX_STOP, stop_token_ids=list(range(MAX_STOP_TOKEN_IDS)))


def test_values_are_normalised():
    p = SamplingParams(stop="END", logit_bias={"5": 1, 7: -2.5}, temperature=1, stop_token_ids=(4, 5))
    assert p.stop == ["END"]
    assert p.logit_bias == {5: 1.0, 7: -2.5} and all(type(v) is float for v in p.logit_bias.values())
    assert type(p.temperature) is float and p.stop_token_ids == [4, 5]


def test_numpy_scalars_pass_as_numbers():
    np = pytest.importorskip("numpy")
    p = SamplingParams(max_tokens=np.int64(8), top_k=np.int32(5), temperature=np.float32(0.5),
                       seed=np.uint64(2**64 - 1), logit_bias={np.int64(3): np.float64(1.5)})
    assert (p.max_tokens, p.top_k, p.seed, p.logit_bias) == (8, 5, 2**64 - 1, {3: 1.5})
    assert type(p.max_tokens) is int and type(p.temperature) is float
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=np.float32("nan"))

"""User-facing configuration: the engine's settings and each request's sampling options.

Every value is checked when the object is built, and an error names the field, the value
and what is allowed, so that a bad request fails alone at `add_request`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


QUANTIZATIONS = ("none", "auto", "int8", "int4")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names it."""


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {allowed}")


class _Shown:
    """Stands in for a value too long to print whole in an error message."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _is_int(v: object) -> bool:
    """An integer, numpy's included; bool is not one here (True is not a count or a seed)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    """A finite real number (int, float, numpy scalar); bool, NaN, infinities and ints too
    large for a float are not."""
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float range
        return False


def _int_in(v: object, lo: int, hi: float = math.inf) -> bool:
    return _is_int(v) and lo <= v <= hi


def _real_in(v: object, lo: float, hi: float) -> bool:
    return _is_real(v) and lo <= v <= hi


def _token_id(key: object) -> int | None:
    """A logit_bias key as a token id: an int, or a string of one (JSON keys are strings)."""
    if _is_int(key):
        return int(key)
    if isinstance(key, str):
        try:
            return int(key)
        except ValueError:
            return None
    return None


def canonical_dtype(name: str) -> str:
    """'fp16' -> 'float16' etc.; raises ConfigError on an unknown name."""
    _check(isinstance(name, str) and name.lower() in DTYPES, "dtype", name,
           f"expected one of {sorted(DTYPES)}")
    return DTYPES[name.lower()]


# Limits on SamplingParams. Each keeps a value that passes from overflowing or turning into NaN
# later, inside a batched step, where one bad row would spoil its neighbours.
SAMPLING_EPS = 1e-5  # temperatures below this act as greedy (vLLM's value): logits / T overflows
MAX_TEMPERATURE = 1e4  # flat for any real logits long before this; keeps T finite in float32
REPETITION_PENALTY_RANGE = (1e-4, 1e4)  # seen logits are multiplied or divided by it in float32
LEN_PENALTY_RANGE = (-10.0, 10.0)  # beam scores divide by length ** len_penalty: no overflow, no 0
MAX_DIVERSITY_RATE = 1e4  # times a rank up to the vocabulary size, in float32
MAX_LOGIT_BIAS = 1024  # entries per request
LOGIT_BIAS_RANGE = 100.0  # each bias in [-100, 100] (OpenAI's range)
MAX_STOP = 16  # stop strings per request
MAX_STOP_LEN = 256  # characters per stop string
MAX_STOP_TOKEN_IDS = 256
MAX_LOGPROBS = 20
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass(slots=True)
class SamplingParams:
    """How one request is decoded. Temperatures below SAMPLING_EPS (0 included) mean greedy.

    Every field is checked (and normalised: ints to int, numbers to float, `stop` to a list,
    logit_bias keys to int) when the object is built, so a bad value fails its own request at
    `add_request` instead of producing NaN or an overflow for the whole batch later.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: off; larger than the vocabulary: keep everything
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    n: int = 1
    beam_width: int = 1
    len_penalty: float = 0.0
    beam_search_diversity_rate: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # each prompt token's logprob and the k best (vLLM's name)

    def __post_init__(self) -> None:
        _check(_int_in(self.max_tokens, 1), "max_tokens", self.max_tokens, "must be an integer >= 1")
        self.max_tokens = int(self.max_tokens)
        _check(_int_in(self.min_tokens, 0, self.max_tokens), "min_tokens", self.min_tokens,
               f"must be an integer in [0, max_tokens={self.max_tokens}]")
        self.min_tokens = int(self.min_tokens)
        _check(_real_in(self.temperature, 0.0, MAX_TEMPERATURE), "temperature", self.temperature,
               f"must be in [0, {MAX_TEMPERATURE:g}] (below {SAMPLING_EPS:g}, 0 included, means greedy)")
        self.temperature = float(self.temperature)
        _check(_int_in(self.top_k, 0), "top_k", self.top_k,
               "must be an integer >= 0 (0 disables top-k)")
        self.top_k = int(self.top_k)
        _check(_is_real(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", self.top_p,
               "must be in (0, 1] (1 disables top-p)")
        self.top_p = float(self.top_p)
        _check(_real_in(self.min_p, 0.0, 1.0), "min_p", self.min_p,
               "must be in [0, 1] (0 disables min-p)")
        self.min_p = float(self.min_p)
        _check(self.seed is None or _int_in(self.seed, *SEED_RANGE), "seed", self.seed,
               f"must be None or an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
        if self.seed is not None:
            self.seed = int(self.seed)
        self._check_penalties()
        self._check_stops()
        self._check_logit_bias()
        _check(_int_in(self.n, 1), "n", self.n, "must be an integer >= 1")
        self.n = int(self.n)
        _check(_int_in(self.beam_width, 1), "beam_width", self.beam_width, "must be an integer >= 1")
        self.beam_width = int(self.beam_width)
        _check(self.beam_width == 1 or self.n == 1, "beam_width", self.beam_width,
               f"cannot be combined with n={self.n}; beam search returns beam_width sequences")
        lo, hi = LEN_PENALTY_RANGE
        _check(_real_in(self.len_penalty, lo, hi), "len_penalty", self.len_penalty,
               f"must be in [{lo:g}, {hi:g}] (0 disables it)")
        self.len_penalty = float(self.len_penalty)
        _check(_real_in(self.beam_search_diversity_rate, 0.0, MAX_DIVERSITY_RATE),
               "beam_search_diversity_rate", self.beam_search_diversity_rate,
               f"must be >= 0 and at most {MAX_DIVERSITY_RATE:g} (0 disables it)")
        self.beam_search_diversity_rate = float(self.beam_search_diversity_rate)
        _check(self.logprobs is None or _int_in(self.logprobs, 0, MAX_LOGPROBS), "logprobs",
               self.logprobs, f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        if self.logprobs is not None:
            self.logprobs = int(self.logprobs)
        _check(self.prompt_logprobs is None or _int_in(self.prompt_logprobs, 0, MAX_LOGPROBS),
               "prompt_logprobs", self.prompt_logprobs,
               f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = int(self.prompt_logprobs)

    def _check_penalties(self) -> None:
        lo, hi = REPETITION_PENALTY_RANGE
        _check(_real_in(self.repetition_penalty, lo, hi), "repetition_penalty", self.repetition_penalty,
               f"must be > 0, in [{lo:g}, {hi:g}] (1.0 disables it)")
        self.repetition_penalty = float(self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_real_in(value, -2.0, 2.0), name, value, "must be in [-2, 2] (0 disables it)")
            setattr(self, name, float(value))

    def _check_stops(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(isinstance(self.stop, list | tuple), "stop", self.stop,
               "must be a string or a list of strings")
        _check(len(self.stop) <= MAX_STOP, "stop", _Shown(f"<{len(self.stop)} strings>"),
               f"at most {MAX_STOP} stop strings")
        for s in self.stop:
            _check(isinstance(s, str) and s != "", "stop", s, "stop strings must be non-empty strings")
            _check(len(s) <= MAX_STOP_LEN, "stop", _Shown(f"<a string of {len(s)} characters>"),
                   f"each stop string has at most {MAX_STOP_LEN} characters")
        self.stop = list(self.stop)
        ids = self.stop_token_ids
        _check(isinstance(ids, list | tuple), "stop_token_ids", ids, "must be a list of token ids")
        _check(len(ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids", _Shown(f"<{len(ids)} ids>"),
               f"at most {MAX_STOP_TOKEN_IDS} token ids")
        for t in ids:
            _check(_int_in(t, 0), "stop_token_ids", t, "token ids must be integers >= 0")
        self.stop_token_ids = [int(t) for t in ids]

    def _check_logit_bias(self) -> None:
        bias = self.logit_bias
        _check(isinstance(bias, Mapping), "logit_bias", bias, "must be a mapping {token id: bias}")
        _check(len(bias) <= MAX_LOGIT_BIAS, "logit_bias", _Shown(f"<{len(bias)} entries>"),
               f"at most {MAX_LOGIT_BIAS} entries")
        out: dict[int, float] = {}
        for key, value in bias.items():
            tok = _token_id(key)
            _check(tok is not None and tok >= 0, "logit_bias", {key: value},
                   "keys must be token ids: integers >= 0 (or strings of them)")
            _check(_real_in(value, -LOGIT_BIAS_RANGE, LOGIT_BIAS_RANGE), "logit_bias", {key: value},
                   f"biases must be in [{-LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}]")
            out[tok] = float(value)
        self.logit_bias = out

    @property
    def greedy(self) -> bool:
        """Argmax rows: a temperature below SAMPLING_EPS (dividing by it would overflow) or top_k=1."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1


@dataclass(slots=True)
class EngineConfig:
    """The engine's fixed resources. `max_concurrency` KV slots of `max_seq_len` tokens each."""

    model: str | None = None  # preset name, HF checkpoint dir or GGUF file; None: embedded model
    dtype: str = "auto"  # auto: float32 on the CPU, bfloat16 on a GPU
    device: str = "auto"
    max_concurrency: int = 8
    max_seq_len: int = 512
    use_mem_shuffle: bool = True
    prefill_token_budget: int = 2048  # prompt tokens per iteration; longer prompts are chunked
    seed: int = 0
    tensor_para_size: int = 1
    cuda_graphs: bool = True  # replay iterations as CUDA graphs (GPU only; see cuda_graph.py)
    # vLLM's name: launch iteration i+1 before reading iteration i's tokens (the host's work
    # overlaps the GPU's); None: on where it helps (CUDA, the slot layout, one rank)
    async_scheduling: bool | None = None
    # "slots": one max_seq_len slot per row, the memory shuffle (the original's); "pages": a
    # pool of blocks of block_size positions that rows take as they grow (vLLM's names below)
    kv_layout: str = "slots"
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from gpu_memory_utilization (GPU), slots' memory (CPU)
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory the engine may use in all
    enable_prefix_caching: bool | None = None  # None: on with pages
    batch_invariant: bool = True  # GPU: a request's logits bitwise the same alone or fused
    # weight-only: None/"none" full precision; "int8"/"int4" group-wise, quantized at load;
    # "auto": a GGUF file keeps its own Q4_0/Q4_1/Q8_0 tensors on the CPU (flover/ops/quant.py)
    quantization: str | None = "auto"

    def __post_init__(self) -> None:
        _check(isinstance(self.max_concurrency, int) and self.max_concurrency >= 1,
               "max_concurrency", self.max_concurrency, "must be an integer >= 1")
        _check(isinstance(self.max_seq_len, int) and self.max_seq_len >= 2, "max_seq_len",
               self.max_seq_len, "must be an integer >= 2")
        _check(isinstance(self.prefill_token_budget, int) and self.prefill_token_budget >= 1,
               "prefill_token_budget", self.prefill_token_budget, "must be an integer >= 1")
        _check(isinstance(self.tensor_para_size, int) and self.tensor_para_size >= 1,
               "tensor_para_size", self.tensor_para_size, "must be an integer >= 1")
        if self.dtype != "auto":
            self.dtype = canonical_dtype(self.dtype)
        for name in ("cuda_graphs", "batch_invariant"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name),
                   "must be True or False")
        _check(self.async_scheduling is None or isinstance(self.async_scheduling, bool),
               "async_scheduling", self.async_scheduling, "must be None, True or False")
        _check(self.kv_layout in ("slots", "pages"), "kv_layout", self.kv_layout,
               "expected 'slots' or 'pages'")
        _check(_is_int(self.block_size) and self.block_size in (8, 16, 32, 64, 128), "block_size",
               self.block_size, "must be one of 8, 16, 32, 64, 128")
        _check(self.num_kv_blocks is None or _int_in(self.num_kv_blocks, 2), "num_kv_blocks",
               self.num_kv_blocks, "must be None or an integer >= 2 (block 0 is reserved)")
        _check(_is_real(self.gpu_memory_utilization) and 0.0 < self.gpu_memory_utilization <= 1.0,
               "gpu_memory_utilization", self.gpu_memory_utilization, "must be in (0, 1]")
        _check(self.enable_prefix_caching in (None, True, False), "enable_prefix_caching",
               self.enable_prefix_caching, "must be None, True or False")
        if self.enable_prefix_caching is None:
            self.enable_prefix_caching = self.kv_layout == "pages"
        _check(not self.enable_prefix_caching or self.kv_layout == "pages",
               "enable_prefix_caching", self.enable_prefix_caching, "needs kv_layout='pages'")
        _check(self.kv_layout == "slots" or self.tensor_para_size == 1, "kv_layout",
               self.kv_layout, "must be 'slots' with tensor_para_size > 1 (pages are not yet "
               "broadcast to the other ranks)")
        _check(not self.async_scheduling or self.tensor_para_size == 1, "async_scheduling",
               self.async_scheduling, "needs tensor_para_size=1 (the follower ranks are sent "
               "every input id from the host)")
        _check(self.quantization is None or (isinstance(self.quantization, str) and
               self.quantization.lower() in QUANTIZATIONS), "quantization", self.quantization,
               f"expected None or one of {list(QUANTIZATIONS)}")
        if self.quantization is not None:
            self.quantization = self.quantization.lower()
            self.quantization = None if self.quantization == "none" else self.quantization

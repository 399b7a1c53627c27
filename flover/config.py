"""User-facing configuration: the engine's settings and each request's sampling options.

Every value is checked when the object is built, and an error names the field, the value
and what is allowed, so that a bad request fails alone at `add_request`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names it."""


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {allowed}")


def canonical_dtype(name: str) -> str:
    """'fp16' -> 'float16' etc.; raises ConfigError on an unknown name."""
    _check(isinstance(name, str) and name.lower() in DTYPES, "dtype", name,
           f"expected one of {sorted(DTYPES)}")
    return DTYPES[name.lower()]


@dataclass(slots=True)
class SamplingParams:
    """How one request is decoded. `temperature=0` means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: off
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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
               self.max_tokens, "must be an integer >= 1")
        _check(math.isfinite(self.temperature) and self.temperature >= 0, "temperature",
               self.temperature, "must be >= 0 (0 means greedy)")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", self.top_k,
               "must be an integer >= 0 (0 disables top-k)")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "must be in [0, 1]")
        _check(self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty),
               "repetition_penalty", self.repetition_penalty, "must be > 0 (1.0 disables it)")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", self.presence_penalty,
               "must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
               self.frequency_penalty, "must be in [-2, 2]")
        _check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
               "min_tokens", self.min_tokens, f"must be in [0, max_tokens={self.max_tokens}]")
        _check(isinstance(self.n, int) and self.n >= 1, "n", self.n, "must be an integer >= 1")
        _check(isinstance(self.beam_width, int) and self.beam_width >= 1, "beam_width",
               self.beam_width, "must be an integer >= 1")
        _check(self.beam_width == 1 or self.n == 1, "beam_width", self.beam_width,
               f"cannot be combined with n={self.n}; beam search returns beam_width sequences")
        _check(self.beam_search_diversity_rate >= 0, "beam_search_diversity_rate",
               self.beam_search_diversity_rate, "must be >= 0")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
               "logprobs", self.logprobs, "must be None or an integer in [0, 20]")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "must be non-empty strings")
        _check(self.seed is None or isinstance(self.seed, int), "seed", self.seed,
               "must be an integer or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


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
    cuda_graphs: bool = True  # replay pure-decode iterations as CUDA graphs (GPU only)

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

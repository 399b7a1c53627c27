"""What the engine hands back: one RequestOutput per request per step, with its text."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class CompletionOutput:
    """One sequence of a request: its only one, one of n samples, or one beam."""

    index: int
    token_ids: list[int]
    text: str = ""
    new_text: str = ""
    finish_reason: str | None = None
    score: float | None = None  # beam search: sum of log-probs / length ** len_penalty
    logprobs: list[dict] = field(default_factory=list)


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    token_ids: list[int]  # every generated token so far (of the first sequence)
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    text: str = ""  # decoded generated text so far ("" without a tokenizer)
    new_text: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    outputs: list[CompletionOutput] = field(default_factory=list)  # n samples or k beams

"""The OpenAI API's request bodies (and our extensions), as pydantic models.

Unknown parameters are refused, so that a typo, or an OpenAI feature we do not have (tools,
suffix, ...), is an error that names it instead of being silently ignored. Parameters whose
default we do have (`response_format` text) are accepted with that value only;
the app refuses the others with a 400 that names them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ResponseFormat(BaseModel):
    """OpenAI's response_format; only {"type": "text"} (its default) is served. Other types
    carry more fields (json_schema, ...): they are allowed here so that the refusal names the
    type, not the field."""

    model_config = ConfigDict(extra="allow")
    type: str


class _Sampling(BaseModel):
    """Parameters shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None  # only with stream=true, as OpenAI
    response_format: ResponseFormat | None = None  # only type "text" (vLLM has it on both routes)
    best_of: int | None = None
    # accepted and ignored, as OpenAI's abuse-monitoring id; bounded like OpenAI's
    user: str | None = Field(default=None, max_length=256)
    # extensions (vLLM's names where it has them)
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    use_beam_search: bool = False
    beam_width: int | None = None  # default: best_of, else n
    length_penalty: float = 0.0
    return_token_ids: bool = False  # each choice also carries its generated token ids


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None  # top alternatives per token; 0: the chosen token's only
    echo: bool = False  # each choice's text starts with its prompt's (and logprobs cover it)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: handed to the template
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None


class TokenizeRequest(BaseModel):
    """POST /tokenize, as vLLM's: a `prompt`, or chat `messages` through the chat template.

    vLLM's defaults: `add_special_tokens` is true for a prompt and false for messages (the
    template writes them); `add_generation_prompt` (messages only) is true.
    """

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None


class DetokenizeRequest(BaseModel):
    """POST /detokenize, as vLLM's: token ids -> text (special tokens kept)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]

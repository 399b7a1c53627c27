"""The engine: requests in, one fused iteration per `step()`, outputs out.

`Engine` is the online interface (add_request / step / abort); `LLM` is the offline one that
fuses a list of prompts and returns their completions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from flover.config import ConfigError, EngineConfig, SamplingParams, canonical_dtype
from flover.kv_cache import SlotCache
from flover.runner import ModelRunner
from flover.scheduler import Scheduler
from flover.sequence import Request
from flover.weights import load_model


class RequestError(ValueError):
    """A request was refused; the message says why. Other requests are unaffected."""


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    token_ids: list[int]  # every generated token so far
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    text: str = ""  # decoded generated text so far ("" without a tokenizer)
    new_text: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device={device!r} is invalid: {e}") from e


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, canonical_dtype(dtype))


class Engine:
    def __init__(self, config: EngineConfig | None = None, *, model=None, tokenizer=None) -> None:
        self.config = cfg = config or EngineConfig()
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if model is None:
            model, tokenizer = load_model(cfg.model, self.dtype, self.device, cfg.seed)
        self.model, self.tokenizer = model, tokenizer
        mc = model.cfg
        if cfg.max_seq_len > mc.max_position:
            raise ConfigError(f"max_seq_len={cfg.max_seq_len} is invalid: the model supports "
                              f"at most {mc.max_position} positions")
        self.cache = SlotCache(mc.num_layers, cfg.max_concurrency, mc.num_kv_heads,
                               cfg.max_seq_len, mc.head_dim, self.dtype, self.device,
                               shuffle=cfg.use_mem_shuffle)
        self.scheduler = Scheduler(self.cache, cfg.prefill_token_budget)
        self.runner = ModelRunner(model, self.cache, cfg.seed, cuda_graphs=cfg.cuda_graphs)
        self.requests: dict[str, Request] = {}
        self.eos_token_ids = list(mc.eos_token_ids) or (tokenizer.eos_token_ids if tokenizer else [])
        self._text: dict[str, str] = {}

    # --- requests ---------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: pass the prompt as token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def add_request(self, request_id: str, prompt: str | Sequence[int],
                    params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> Request:
        """Queue a request; raises RequestError (naming the problem) and changes nothing."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = self.encode(prompt)
        if not ids:
            raise RequestError(f"request {request_id!r}: the prompt is empty")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"request {request_id!r}: token id {bad[0]} is outside the "
                               f"vocabulary [0, {vocab})")
        limit = self.config.max_seq_len
        if len(ids) >= limit:
            raise RequestError(f"request {request_id!r}: prompt of {len(ids)} tokens does not fit "
                               f"max_seq_len={limit} (at most {limit - 1})")
        if len(ids) + params.max_tokens > limit:
            raise RequestError(
                f"request {request_id!r}: prompt of {len(ids)} tokens + max_tokens="
                f"{params.max_tokens} exceeds max_seq_len={limit}; at most "
                f"{limit - len(ids)} new tokens fit")
        if params.n > 1 or params.beam_width > 1:
            raise RequestError(f"request {request_id!r}: n > 1 and beam search are not "
                               "supported yet")
        req = Request(request_id, ids, params)
        if arrival_time is not None:
            req.arrival_time = arrival_time
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    def abort(self, request_id: str) -> None:
        """Finish a request now and free its slot; unknown or finished ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is not None and not req.finished:
            self.scheduler.finish(req, "abort")
        self._text.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- iterations -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One fused iteration. Returns an output for every request that got a token."""
        batch = self.scheduler.schedule()
        if batch.empty:
            return []
        tokens = self.runner.run(batch)
        advanced = self.scheduler.postprocess(batch, tokens, self.eos_token_ids)
        outs = [self._output(r) for r in advanced]
        for r in advanced:
            if r.finished:
                self.requests.pop(r.request_id, None)
                self._text.pop(r.request_id, None)
        return outs

    def _output(self, r: Request) -> RequestOutput:
        text = new_text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(r.output_ids)
            old = self._text.get(r.request_id, "")
            if text.endswith("\ufffd") and not r.finished:  # an incomplete UTF-8 sequence
                text = old
            if r.params.stop:
                text = self._apply_stop(r, text, old)
            new_text = text[len(old):] if text.startswith(old) else text
            self._text[r.request_id] = text
        return RequestOutput(r.request_id, list(r.output_ids), r.output_ids[-1:], r.finished,
                             r.finish_reason, text, new_text, r.prompt_ids)

    def _apply_stop(self, r: Request, text: str, old: str) -> str:
        """End the request at the first stop string; the text stops before it."""
        start = max(0, len(old) - max(len(s) for s in r.params.stop))
        hits = [i for i in (text.find(s, start) for s in r.params.stop) if i >= 0]
        if not hits:
            return text
        if r.finished:
            r.finish_reason = "stop"
        else:
            self.scheduler.finish(r, "stop")
        return text[: min(hits)]

    def stats(self) -> dict:
        s = self.scheduler
        return {
            "in_flight": len(s.running), "waiting": len(s.waiting),
            "slots_used": self.cache.size, "slots_live": self.cache.num_live,
            "max_concurrency": self.cache.num_slots, "shuffle_moves": self.cache.moves,
            "shuffle_bytes": self.cache.bytes_moved, "iterations": s.iterations,
        }

    def run_until_done(self) -> Iterator[RequestOutput]:
        while self.has_unfinished():
            yield from self.step()


class LLM:
    """Offline generation: every prompt of a call is fused into one in-flight batch."""

    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "auto",
                 max_concurrency: int = 32, max_seq_len: int = 1024, **kwargs) -> None:
        self.engine = Engine(EngineConfig(model=model, dtype=dtype, device=device,
                                          max_concurrency=max_concurrency,
                                          max_seq_len=max_seq_len, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 params: SamplingParams | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = []
        for p in prompts:
            self._counter += 1
            ids.append(f"llm-{self._counter}")
            self.engine.add_request(ids[-1], p, params)
        final: dict[str, RequestOutput] = {}
        for out in self.engine.run_until_done():
            if out.finished:
                final[out.request_id] = out
        return [final[i] for i in ids]

    def chat(self, conversations: list[list[dict]],
             params: SamplingParams | None = None) -> list[RequestOutput]:
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer, so no chat template")
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c),
                                         add_special_tokens=False) for c in conversations]
        return self.generate(prompts, params)

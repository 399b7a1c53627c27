"""The engine: requests in, one fused iteration per `step()`, outputs out.

`Engine` is the online interface (add_request / step / abort); `LLM` is the offline one that
fuses a list of prompts and returns their completions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from flover.config import ConfigError, EngineConfig, SamplingParams, canonical_dtype
from flover.engine.kv_cache import SlotCache
from flover.engine.outputs import CompletionOutput, RequestOutput
from flover.engine.runner import ModelRunner
from flover.engine.scheduler import Scheduler
from flover.engine.sequence import Group, Request
from flover.sampling.beam import BeamSearch
from flover.weights import load_model


class RequestError(ValueError):
    """A request was refused; the message says why. Other requests are unaffected."""


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
        tp = cfg.tensor_para_size
        if tp > 1:  # one process per rank, started by torchrun (flover.distributed)
            from flover import distributed
            distributed.check_launch(tp)
            group = distributed.init_distributed(self.device)
            self.device = group.device
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if model is None and tp > 1:
            model, tokenizer = distributed.load_sharded(cfg.model, self.dtype, group, cfg.seed)
        elif model is None:
            model, tokenizer = load_model(cfg.model, self.dtype, self.device, cfg.seed)
        elif tp > 1:
            distributed.shard_model(model, group.rank, group.world)  # in place; once
        self.model, self.tokenizer = model, tokenizer
        mc = model.cfg
        if cfg.max_seq_len > mc.max_position:
            raise ConfigError(f"max_seq_len={cfg.max_seq_len} is invalid: the model supports "
                              f"at most {mc.max_position} positions")
        self.cache = SlotCache(mc.num_layers, cfg.max_concurrency, mc.num_kv_heads,
                               cfg.max_seq_len, mc.head_dim, self.dtype, self.device,
                               shuffle=cfg.use_mem_shuffle)
        self.scheduler = Scheduler(self.cache, cfg.prefill_token_budget)
        # no CUDA graphs around the all-reduces yet: tensor parallelism runs eagerly
        self.runner = ModelRunner(model, self.cache, cfg.seed,
                                  cuda_graphs=cfg.cuda_graphs and tp == 1)
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
        rows = max(params.n, params.beam_width)
        if rows > self.cache.num_slots:
            raise RequestError(f"request {request_id!r}: {rows} rows (n or beam_width) do not fit "
                               f"max_concurrency={self.cache.num_slots} slots")
        vocab_bias = [t for t in params.logit_bias if not 0 <= t < vocab]
        if vocab_bias:
            raise RequestError(f"request {request_id!r}: logit_bias token id {vocab_bias[0]} is "
                               f"outside the vocabulary [0, {vocab})")
        req = Request(request_id, ids, params)
        if arrival_time is not None:
            req.arrival_time = arrival_time
        if rows > 1:
            seed = params.seed
            forks = [req.fork(i, None if seed is None else hash((seed, i)) & 0x7FFFFFFFFFFF)
                     for i in range(1, rows)]
            beam = None
            if params.beam_width > 1:
                beam = BeamSearch(params.beam_width, params.max_tokens,
                                  [] if params.ignore_eos else self.eos_token_ids,
                                  params.len_penalty, params.beam_search_diversity_rate)
            req.group = Group(request_id, [req, *forks], beam)
            for f in forks:
                f.group = req.group
        self.requests[request_id] = req
        for row in req.group.rows if req.group else [req]:
            self.scheduler.add(row)
        return req

    def abort(self, request_id: str) -> None:
        """Finish a request now and free its slot; unknown or finished ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for row in req.group.rows if req.group else [req]:
            if not row.finished:
                self.scheduler.finish(row, "abort")
        self._forget_text(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- iterations -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One fused iteration. Returns an output for every request that got a token."""
        batch = self.scheduler.schedule()
        if batch.empty:
            return []
        tokens, parents = self.runner.run(batch, self.eos_token_ids)
        advanced = self.scheduler.postprocess(batch, tokens, self.eos_token_ids, parents)
        heads = list(dict.fromkeys(r.group.rows[0] if r.group else r for r in advanced))
        outs = [self._output(r) for r in heads]
        for r, out in zip(heads, outs, strict=True):
            if out.finished:
                self.requests.pop(r.request_id, None)
                self._forget_text(r)
        return outs

    def _forget_text(self, head: Request) -> None:
        """Drop the decoded text kept for streaming a request's rows (and beams)."""
        rows = head.group.rows if head.group else [head]
        for key in [r.request_id for r in rows] + [f"{head.request_id}#beam{i}"
                                                   for i in range(len(rows))]:
            self._text.pop(key, None)

    def _output(self, head: Request) -> RequestOutput:
        """The output of a request (all rows of its group), after this iteration."""
        group = head.group
        if group is not None and group.beam is not None and group.beam.done:
            comps = [self._completion(i, h.tokens, True, None, score=h.score,
                                      key=f"{head.request_id}#beam{i}")
                     for i, h in enumerate(group.beam.best())]
            finished = True
        else:
            rows = group.rows if group is not None else [head]
            comps = [self._completion(r.index, r.output_ids, r.finished, r) for r in rows]
            finished = all(r.finished for r in rows)
        first = comps[0]
        reason = first.finish_reason if finished else None
        return RequestOutput(head.request_id, first.token_ids, first.token_ids[-1:], finished,
                             reason, first.text, first.new_text, head.prompt_ids, comps)

    def _completion(self, index: int, ids: list[int], finished: bool, row: Request | None,
                    score: float | None = None, key: str | None = None) -> CompletionOutput:
        reason = row.finish_reason if row is not None else (
            "stop" if ids and ids[-1] in self.eos_token_ids else "length")
        text = new_text = ""
        if self.tokenizer is not None:
            key = row.request_id if row is not None else key
            text = self.tokenizer.decode(ids)
            old = self._text.get(key, "")
            if text.endswith("\ufffd") and not finished:  # an incomplete UTF-8 sequence
                text = old
            if row is not None and row.params.stop:
                text = self._apply_stop(row, text, old)
                reason = row.finish_reason
            new_text = text[len(old):] if text.startswith(old) else text
            self._text[key] = text
        return CompletionOutput(index, list(ids), text, new_text,
                                reason if finished or (row and row.finished) else None, score,
                                list(row.logprobs) if row is not None else [])

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
            "prefill_tokens": s.prefill_tokens, "decode_rows": s.decode_rows,
        }

    def run_until_done(self) -> Iterator[RequestOutput]:
        while self.has_unfinished():
            yield from self.step()

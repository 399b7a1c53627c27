"""The engine: requests in, one fused iteration per `step()`, outputs out.

`step()` is four calls that go one way: the scheduler plans the iteration, the runner
executes it, the scheduler advances the rows, the output processor turns tokens into text.
Each hands back data; the engine alone decides which requests end (`_finish`), so no
formatting code can reach into the scheduler or the cache. With async scheduling (vLLM's
name) the runner's launch of iteration i+1 comes before the reading of iteration i's tokens,
so that the host's work overlaps the device's (see `step`).

One request's fault stays its own: everything checkable is checked in `add_request`, which
changes nothing when it refuses; a per-request stage that still fails inside `step()` ends
that request with finish_reason "error" and its message, and the others get their tokens.
Only a failure of the shared forward pass fails the requests of that batch; their slots are
freed and the engine goes on (under tensor parallelism it ends the run instead: the ranks'
collectives would be out of step).

Tensor parallelism (flover.distributed): rank 0's engine plans, samples and sends each
forward's inputs to the other ranks, whose engines only `follow()`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from flover import distributed
from flover.config import ConfigError, EngineConfig, SamplingParams, canonical_dtype
from flover.engine.block_manager import BlockAllocator
from flover.engine.kv_cache import PagedCache, SlotAllocator, SlotCache
from flover.engine.outputs import OutputProcessor, RequestOutput
from flover.engine.paged_scheduler import PagedScheduler
from flover.engine.runner import InFlight, ModelRunner
from flover.engine.scheduler import Batch, Scheduler
from flover.engine.sequence import Request, new_request
from flover.ops.linear import swap_linears
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
        tp, group = cfg.tensor_para_size, None
        if tp > 1:  # one process per rank, started by torchrun (flover.distributed)
            distributed.check_launch(tp)
            group = distributed.init_distributed(self.device)
            self.device = group.device
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if tp > 1 and cfg.quantization in ("int8", "int4"):
            raise ConfigError(f"quantization={cfg.quantization!r} is invalid with "
                              f"tensor_para_size={tp}: sharded models load in full precision")
        if model is None and tp > 1:
            model, tokenizer = distributed.load_sharded(cfg.model, self.dtype, group, cfg.seed)
        elif model is None:
            model, loaded = load_model(cfg.model, self.dtype, self.device, cfg.seed,
                                       cfg.quantization)
            tokenizer = tokenizer or loaded
        elif tp > 1:
            distributed.shard_model(model, group.rank, group.world)  # in place; once
        if self.device.type == "cuda":  # invariant: a row's product ignores the batch (ops.linear)
            swap_linears(model, invariant=cfg.batch_invariant)  # (or back, for a reused model)
        self.model, self.tokenizer = model, tokenizer
        mc = model.cfg
        if cfg.max_seq_len > mc.max_position:
            raise ConfigError(f"max_seq_len={cfg.max_seq_len} is invalid: the model supports "
                              f"at most {mc.max_position} positions")
        self.eos_token_ids = list(mc.eos_token_ids) or (tokenizer.eos_token_ids if tokenizer else [])
        if cfg.kv_layout == "pages":
            blocks = cfg.num_kv_blocks or self._pool_blocks()
            self.slots = BlockAllocator(blocks, cfg.block_size, cfg.max_concurrency,
                                        cfg.enable_prefix_caching)
            self.cache = PagedCache(mc.num_layers, blocks, mc.num_kv_heads, cfg.block_size,
                                    mc.head_dim, self.dtype, self.device, cfg.max_concurrency,
                                    cfg.max_seq_len)
            self.scheduler = PagedScheduler(self.slots, cfg.prefill_token_budget)
        else:
            self.slots = SlotAllocator(cfg.max_concurrency, cfg.use_mem_shuffle)
            self.cache = SlotCache(mc.num_layers, cfg.max_concurrency, mc.num_kv_heads,
                                   cfg.max_seq_len, mc.head_dim, self.dtype, self.device)
            self.scheduler = Scheduler(self.slots, cfg.prefill_token_budget)
        # tensor parallelism: rank 0 plans and sends each forward's inputs; the others follow()
        self.channel = distributed.PlanChannel(group) if tp > 1 else None
        self.runner = ModelRunner(model, self.cache, self.eos_token_ids, cfg.seed,
                                  cuda_graphs=cfg.cuda_graphs,
                                  batch_invariant=cfg.batch_invariant,
                                  max_prefill_tokens=cfg.prefill_token_budget,
                                  channel=self.leading_channel)
        self.closed = False
        self.outputs = OutputProcessor(tokenizer)
        self.requests: dict[str, Request] = {}  # unfinished requests by id (their head rows)
        self.failed_batches = 0
        self.async_scheduling = (cfg.async_scheduling if cfg.async_scheduling is not None
                                 else self.device.type == "cuda" and tp == 1)
        self.inflight: InFlight | None = None  # launched, its tokens not read (async scheduling)
        self.host_bound: set[str] = set()  # unfinished requests that need host tokens each step

    def _pool_blocks(self) -> int:
        """The paged pool's size: on a GPU, what `gpu_memory_utilization` of its memory leaves
        after the weights and a margin for activations; on the CPU, the slot layout's memory.
        Never more than every row at max_seq_len needs (plus the reserved block 0)."""
        cfg, mc = self.config, self.model.cfg
        per_row = -(-cfg.max_seq_len // cfg.block_size)
        most = cfg.max_concurrency * per_row + 1
        if self.device.type != "cuda":
            return most
        elem = torch.empty((), dtype=self.dtype).element_size()
        block_bytes = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * cfg.block_size * elem
        free, total = torch.cuda.mem_get_info(self.device)
        tokens = max(cfg.prefill_token_budget, cfg.max_concurrency)
        activations = (tokens * (6 * mc.hidden_size + 3 * mc.intermediate_size) * 4
                       + cfg.max_concurrency * mc.vocab_size * 16 + (1 << 30))
        room = int(total * cfg.gpu_memory_utilization) - (total - free) - activations
        blocks = room // block_bytes
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([blocks], device=self.device)  # every rank the same pool
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            blocks = int(t.item())
        if blocks < per_row + 1:
            raise ConfigError(f"gpu_memory_utilization={cfg.gpu_memory_utilization} leaves room "
                              f"for {max(blocks, 0)} KV blocks; one max_seq_len row needs "
                              f"{per_row + 1}")
        return min(blocks, most)

    # --- tensor parallelism: rank 0 leads, the other ranks follow --------------------------

    @property
    def follower(self) -> bool:
        """A tensor-parallel rank other than 0: it runs `follow()`, never `add_request`/`step`."""
        return self.channel is not None and not self.channel.leader

    @property
    def leading_channel(self):
        return self.channel if self.channel is not None and self.channel.leader else None

    def follow(self) -> int:
        """On ranks other than 0: run rank 0's forwards, each from the plan it sends, until
        rank 0's `close()`. Returns the number of forwards run."""
        if not self.follower:
            raise RuntimeError("follow() is for tensor-parallel ranks other than 0")
        n = 0
        while True:
            try:
                plan = self.channel.recv()
            except Exception as e:  # noqa: BLE001 - the group broke: say so, not gloo's words
                raise RuntimeError(f"tensor parallelism: lost rank 0 while waiting for its next "
                                   f"plan ({type(e).__name__}: {e}); it died or its node is "
                                   "gone") from e
            if plan is None:
                break
            self.runner.follow(plan)
            n += 1
        self.closed = True
        return n

    def close(self) -> None:
        """On rank 0: end the followers' `follow()` (they return; the engine is done). Once;
        nothing without tensor parallelism."""
        if self.leading_channel is not None and not self.closed:
            self.closed = True
            self.channel.send(None)

    def _lead(self) -> None:
        if self.follower:
            raise RuntimeError(f"rank {self.channel.group.rank} follows rank 0's plans: call "
                               "follow() there; requests go to rank 0")
        if self.closed:
            raise RuntimeError("this engine was closed: its followers have stopped")

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
        self._lead()
        params = params or SamplingParams()
        if not isinstance(request_id, str) or not request_id:
            raise RequestError(f"request_id={request_id!r} is invalid: must be a non-empty string")
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be SamplingParams, got {type(params).__name__}")
        try:
            ids = self.encode(prompt)
        except (TypeError, ValueError, OverflowError) as e:
            raise RequestError(f"request {request_id!r}: prompt is invalid: {e}") from e
        self._check(request_id, ids, params)
        beam = None
        if params.beam_width > 1:
            ends = ([] if params.ignore_eos else self.eos_token_ids) + params.stop_token_ids
            beam = BeamSearch(params.beam_width, params.max_tokens, ends, params.len_penalty,
                              params.beam_search_diversity_rate)
        try:
            head = new_request(request_id, ids, params, arrival_time, beam)
        except Exception as e:  # noqa: BLE001 - e.g. a seed the generator refuses: this request's
            raise RequestError(f"request {request_id!r}: {e}") from e
        self.requests[request_id] = head
        if needs_host(params):
            self.host_bound.add(request_id)
        self.scheduler.add(head)
        return head

    def _check(self, rid: str, ids: list[int], params: SamplingParams) -> None:
        """What SamplingParams cannot know alone: the vocabulary, the slots, the slot length."""
        if not ids:
            raise RequestError(f"request {rid!r}: the prompt is empty")
        vocab = self.model.cfg.vocab_size
        for name, values in (("prompt token id", ids), ("stop_token_ids", params.stop_token_ids),
                             ("logit_bias token id", params.logit_bias)):
            bad = [t for t in values if not 0 <= t < vocab]
            if bad:
                raise RequestError(f"request {rid!r}: {name} {bad[0]} is outside the vocabulary "
                                   f"[0, {vocab})")
        limit = self.config.max_seq_len
        if len(ids) >= limit:
            raise RequestError(f"request {rid!r}: prompt of {len(ids)} tokens does not fit "
                               f"max_seq_len={limit} (at most {limit - 1})")
        if len(ids) + params.max_tokens > limit:
            raise RequestError(
                f"request {rid!r}: prompt of {len(ids)} tokens + max_tokens={params.max_tokens} "
                f"exceeds max_seq_len={limit}; at most {limit - len(ids)} new tokens fit")
        rows = max(params.n, params.beam_width)
        if rows > self.slots.num_slots:
            raise RequestError(f"request {rid!r}: {rows} rows (n or beam_width) do not fit "
                               f"max_concurrency={self.slots.num_slots} slots")
        if isinstance(self.slots, BlockAllocator):  # it must fit the pool alone, at its longest
            need = rows * self.slots.blocks_for(len(ids) + params.max_tokens)
            if need > self.slots.num_blocks - 1:
                raise RequestError(f"request {rid!r}: {rows} rows of up to "
                                   f"{len(ids) + params.max_tokens} tokens need {need} KV blocks; "
                                   f"the pool has {self.slots.num_blocks - 1}")

    def abort(self, request_id: str) -> None:
        """Finish a request now and free its slots; unknown or finished ids are ignored."""
        head = self.requests.pop(request_id, None)
        self.host_bound.discard(request_id)
        if head is not None:
            for row in head.rows:
                self._finish(row, "abort")

    def has_unfinished(self) -> bool:
        return self.inflight is not None or self.scheduler.has_unfinished()

    # --- iterations -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One fused iteration. Returns an output for every request that got a token, ended
        or failed in it.

        With async scheduling the step launches the next iteration before it reads the tokens
        of the one in flight (its decode rows take those tokens on the device), then finishes
        the one in flight while the device runs the next: outputs come one step later. A row
        found ended then has computed one wasted token in the next iteration; it is dropped.
        While an unfinished request needs every token on the host before the next forward
        (beams, penalties that count tokens, prompt logprobs), the engine drains the pipeline
        and steps synchronously."""
        self._lead()
        prev, self.inflight = self.inflight, None
        if prev is not None and not self._overlap():  # drain: finish it, launch nothing
            return self._complete(prev)
        batch = self.scheduler.schedule()
        if batch.empty:
            return self._complete(prev) if prev is not None else []
        try:
            flight = self.runner.launch(batch, prev)
        except Exception as e:  # noqa: BLE001 - the shared forward failed: its batch fails
            outs = self._complete(prev) if prev is not None else []
            return outs + self._fail_batch(batch, e)
        self.scheduler.launched(batch)
        outs = self._complete(prev) if prev is not None else []
        if self._overlap():
            self.inflight = flight
            return outs
        return outs + self._complete(flight)

    def _overlap(self) -> bool:
        """Whether the next iteration may be launched before this one's tokens are read."""
        return self.async_scheduling and not self.host_bound

    def _fail_batch(self, batch: Batch, e: BaseException) -> list[RequestOutput]:
        if self.channel is not None:  # the ranks' collectives are out of step: end the run
            distributed.end_run(f"the forward failed on rank 0 ({type(e).__name__}: {e}): "
                                "a rank has died, or the ranks' collectives are out of step")
        self.failed_batches += 1
        heads = [h for h in _heads(batch.requests) if not all(r.finished for r in h.rows)]
        for head in heads:
            self._fail(head, f"the batch failed: {type(e).__name__}: {e}")
        return self._collect(heads, set())

    def _complete(self, flight: InFlight) -> list[RequestOutput]:
        """Read a launched iteration's tokens and act on them: stops, text, outputs. Rows that
        ended since its launch (async scheduling) get nothing from it."""
        batch = flight.batch
        live = [r for r in batch.sample if not r.finished]
        try:
            result = self.runner.finish(flight)
        except Exception as e:  # noqa: BLE001 - the device work failed: its batch fails
            for r in batch.sample:
                r.pending -= 1
            return self._fail_batch(batch, e)
        advanced = self.scheduler.postprocess(batch, result)
        ending = {r: reason for r in advanced
                  if r.beam is None and (reason := self._natural_end(r)) is not None}
        stopped, detok_failed = self.outputs.process(advanced, result.parents, set(ending))
        failed = {r: e for r, e in {**result.failed, **detok_failed}.items() if not r.finished}
        for row, e in failed.items():
            self._fail(row.rows[0], f"{type(e).__name__}: {e}")
        for r in stopped:
            if r.finished:
                continue
            if r.beam is not None:
                r.beam.end(r.index)  # a beam reaching a stop string is a finished hypothesis
            else:
                self._finish(r, "stop")
        for r in advanced:
            if r.finished:
                continue
            if r.beam is not None:
                if r.beam.done:
                    self._finish(r, "stop")  # the search has ended: every beam row ends
            elif r in ending:
                self._finish(r, ending[r])
        return self._collect(_heads([*live, *failed]), set(advanced))

    def _natural_end(self, r: Request) -> str | None:
        """length, EOS or a stop token: what ends a row (not a beam) after its new token."""
        p, tok = r.params, r.output_ids[-1]
        if len(r.output_ids) >= p.max_tokens:
            return "length"
        if len(r.output_ids) >= p.min_tokens and (
                tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_token_ids)):
            return "stop"
        return None

    def _finish(self, row: Request, reason: str) -> None:
        """The one place a row ends: its slot is freed (the plan moves another into it)."""
        self.scheduler.finish(row, reason)

    def _fail(self, head: Request, message: str) -> None:
        if head.error is None:
            head.error = message
        for row in head.rows:
            self._finish(row, "error")

    def _collect(self, heads: list[Request], advanced: set[Request]) -> list[RequestOutput]:
        outs = []
        for head in heads:
            try:
                out = self.outputs.output(head, advanced)
            except Exception as e:  # noqa: BLE001 - assembling this request's output failed
                self._fail(head, f"{type(e).__name__}: {e}")
                out = RequestOutput(head.request_id, list(head.output_ids), [], True, "error",
                                    prompt_token_ids=head.prompt_ids, error=head.error)
            if out.finished:
                self.requests.pop(head.request_id, None)
                self.host_bound.discard(head.request_id)
            outs.append(out)
        return outs

    def stats(self) -> dict:
        s, slots = self.scheduler, self.slots
        out = {
            "in_flight": len(s.running), "waiting": sum(len(h.rows) for h in s.waiting),
            "slots_live": slots.live, "max_concurrency": slots.num_slots,
            "iterations": s.iterations, "prefill_tokens": s.prefill_tokens,
            "decode_rows": s.decode_rows, "failed_batches": self.failed_batches,
        }
        if isinstance(slots, BlockAllocator):  # no shuffle: blocks are taken anywhere
            return out | {
                "slots_used": slots.live, "shuffle_moves": 0, "shuffle_bytes": 0,
                "kv_blocks": slots.num_blocks - 1, "kv_blocks_used": slots.used,
                "prefix_cache_hits": slots.hits, "prefill_tokens_saved": slots.tokens_saved,
                "num_preemptions": slots.preemptions,
            }
        return out | {"slots_used": slots.size, "shuffle_moves": slots.moves,
                      "shuffle_bytes": slots.tokens_moved * self.cache.token_bytes}

    def run_until_done(self) -> Iterator[RequestOutput]:
        while self.has_unfinished():
            yield from self.step()


def needs_host(params: SamplingParams) -> bool:
    """Whether a request's next forward needs its last token on the host: beams (their
    reorders), penalties that count tokens, prompt logprobs (read from the hidden states)."""
    return (params.beam_width > 1 or params.prompt_logprobs is not None
            or params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


def _heads(rows) -> list[Request]:
    """The requests (head rows) of these rows, each once, in order."""
    return list(dict.fromkeys(r.rows[0] for r in rows))


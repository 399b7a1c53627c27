"""Executes a plan: cache operations, then one forward pass, then every row's next token.

Flat layout of an iteration's tokens: decode rows first (row i reads and writes slot i),
then each prefill chunk. Padding rows feed token 0 and write their key and value at the
slot's last position, which no request ever reads: a request needs prompt + max_tokens <=
max_seq_len, so its last fed token sits at max_seq_len - 2 at most.

Token selection keeps one request's fault its own: each per-request stage (reading its
penalties and logit bias, its sampling parameters and random draw, its beam step, its
logprobs) runs for that request alone, and a request whose stage raises is reported failed
while every other row gets its token. The batched tensor work in between takes only
validated numbers. Only the cache operations and the forward pass are shared: if they raise,
the engine fails the batch.

`run` is `launch` (everything up to the tokens' copy to pinned host memory, which it does not
wait for) then `finish` (wait for that copy alone, then the per-request logprob entries); the
engine calls them apart under async scheduling, launching the next iteration in between.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from flover.engine.cuda_graph import DecodeGraphs, PagedDecodeGraphs, TokenGraphs
from flover.engine.kv_cache import PagedCache, SlotCache
from flover.engine.paged_scheduler import tokens_of
from flover.engine.plan import ForwardPlan
from flover.engine.scheduler import Batch, StepResult
from flover.engine.sequence import Group, Request
from flover.ops import attention
from flover.ops.attention import AttentionMetadata, PrefillChunk
from flover.ops.transfer import to_device, to_host
from flover.sampling import penalties, sampler

T = TypeVar("T")


class ModelRunner:
    def __init__(self, model: nn.Module, cache: SlotCache | PagedCache,
                 eos_ids: list[int] | None = None, seed: int = 0, cuda_graphs: bool = True,
                 batch_invariant: bool = False, max_prefill_tokens: int = 2048,
                 channel=None) -> None:
        self.model, self.cache, self.eos_ids = model, cache, list(eos_ids or [])
        self.batch_invariant = batch_invariant  # attention's per-row kernel (flover.ops.attention)
        self.channel = channel  # tensor parallelism: rank 0 sends each forward's plan on it
        self.device = cache.k.device
        self.vocab = model.cfg.vocab_size
        self.generator = torch.Generator().manual_seed(seed)  # rows without a seed of their own
        self.counts = penalties.TokenCounts(cache.num_slots, self.vocab, self.device)
        # iterations replay captured graphs on the GPU (flover.engine.cuda_graph)
        use_graphs = cuda_graphs and self.device.type == "cuda"
        self.paged = isinstance(cache, PagedCache)
        if not use_graphs:
            self.graphs = None
        elif self.paged:
            self.graphs = PagedDecodeGraphs(model, cache)
        elif batch_invariant and attention.row_attention_available():
            # every iteration, prompt chunks too, replays a graph (flover.engine.cuda_graph)
            self.graphs = TokenGraphs(model, cache, max_prefill_tokens)
        else:
            self.graphs = DecodeGraphs(model, cache)
        if self.graphs is not None:
            self.graphs.capture_all()

    @torch.inference_mode()
    def run(self, batch: Batch) -> StepResult:
        """Apply the plan's cache operations, run the forward, select every sampled row's token."""
        return self.finish(self.launch(batch))

    @torch.inference_mode()
    def launch(self, batch: Batch, prev: InFlight | None = None) -> InFlight:
        """Queue the iteration on the device (cache operations, forward, sampling) and start
        its tokens' copy to the host; `finish` waits for them. Decode rows whose last token is
        still in flight (`Request.pending`) take it from `prev`'s sampled tokens on the device
        (async scheduling): the host need not wait for `prev` before launching this one."""
        for op in batch.cache_ops:
            self.cache.apply(op)
            self.counts.apply(op)
        if self.counts.output is not None:  # some request has used penalties
            slots = batch.decode_slots or range(len(batch.decode))  # slot layout: row i is slot i
            fed = [(s, r.last_token) for s, r in zip(slots, batch.decode, strict=True)
                   if r is not None and penalties.uses_counts(r)]
            self.counts.add([i for i, _ in fed], [t for _, t in fed])
        feed = self._feed(batch, prev)
        if any(c.row.params.prompt_logprobs is not None for c in batch.prefill):
            logits, hidden = self._eager(batch, feed)
            entries, failed = self.prompt_logprobs(batch, hidden)
        else:
            logits = self.forward_logits(batch, feed)
            entries, failed = {}, {}
        # a request whose prompt logprobs failed fails whole, all its rows
        flight = self.launch_select(logits, batch.sample, batch.sample_slots,
                                    {row: e for req, e in failed.items() for row in req.rows})
        flight.batch = batch
        flight.prompt_logprobs = entries
        return flight

    @torch.inference_mode()
    def finish(self, flight: InFlight) -> StepResult:
        """Wait for a launched iteration's tokens; its StepResult."""
        result = self.finish_select(flight)
        result.prompt_logprobs = {r: v for r, v in flight.prompt_logprobs.items()
                                  if r not in result.failed}
        return result

    def _feed(self, batch: Batch, prev: InFlight | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Where the decode rows whose last token is in flight find it: (their flat indices,
        those tokens), on the device; None when every input id is on the host."""
        if prev is None:
            return None
        pairs = [(i, prev.index[r]) for i, r in enumerate(batch.decode)
                 if r is not None and r.pending]
        if not pairs:
            return None
        idx = to_device([[i for i, _ in pairs], [j for _, j in pairs]], self.device, torch.long)
        return idx[0], prev.tokens.index_select(0, idx[1])

    def prompt_logprobs(self, batch: Batch, hidden: torch.Tensor
                        ) -> tuple[dict[Request, list[dict]], dict[Request, BaseException]]:
        """Each asking chunk's prompt tokens' logprobs (the model's own, before penalties):
        position p's logits score prompt token p + 1. Per request: a failure is its own."""
        entries: dict[Request, list[dict]] = {}
        failed: dict[Request, BaseException] = {}
        offset = len(batch.decode)
        for c in batch.prefill:
            k, prompt = c.row.params.prompt_logprobs, c.row.prompt_ids
            if k is not None:
                try:
                    entries[c.row] = self._chunk_logprobs(hidden, offset, c.start,
                                                          min(c.start + c.length, len(prompt) - 1),
                                                          prompt, k)
                except Exception as e:  # noqa: BLE001 - the error belongs to this request alone
                    failed[c.row] = e
            offset += c.length
        return entries, failed

    def _chunk_logprobs(self, hidden: torch.Tensor, offset: int, start: int, end: int,
                        prompt: list[int], k: int, slice_len: int = 256) -> list[dict]:
        """Positions [start, end) of a chunk whose first token sits at flat index `offset`,
        in slices so that a long chunk never holds [length, vocab] logits at once."""
        out = []
        for a in range(start, end, slice_len):
            b = min(a + slice_len, end)
            idx = torch.arange(offset + a - start, offset + b - start, device=self.device)
            targets = to_device(prompt[a + 1:b + 1], self.device)
            host, kk = penalties.logprob_rows(self.model.logits(hidden[idx]), targets, [k] * (b - a))
            out += [penalties.logprob_entry(row, kk, k) for row in host]
        return out

    def flat(self, batch: Batch) -> tuple[list[int], list[int], list[int], list[int], list[int],
                                          list[PrefillChunk]]:
        """The slot layout's flat iteration on the host: each token's id, slot, position and KV
        length (decode rows first, then the prompt chunks), the flat index of each row to
        sample, and the chunks."""
        pad_pos = self.cache.max_seq_len - 1
        ids, slots, pos, lengths, logit_rows = [], [], [], [], []
        for i, r in enumerate(batch.decode):
            if r is None:
                ids.append(0), slots.append(i), pos.append(pad_pos), lengths.append(1)
            else:
                ids.append(r.last_token), slots.append(i), pos.append(r.num_computed)
                lengths.append(r.num_computed + 1)
                logit_rows.append(i)
        chunks = []
        for c in batch.prefill:
            chunks.append(PrefillChunk(c.slot, c.start, c.length, len(ids)))
            ids.extend(c.row.prompt_ids[c.start:c.start + c.length])
            slots.extend([c.slot] * c.length)
            pos.extend(range(c.start, c.start + c.length))
            lengths.extend(range(c.start + 1, c.start + c.length + 1))
            if c.completes:
                logit_rows += [len(ids) - 1] * len(c.row.rows)
        return ids, slots, pos, lengths, logit_rows, chunks

    def plan(self, batch: Batch) -> tuple[ForwardPlan, list[int]]:
        """The slot layout's eager forward as a host record (what tensor parallelism sends to
        the other ranks), and the flat index of each row to sample."""
        ids, slots, pos, lengths, logit_rows, chunks = self.flat(batch)
        lengths = lengths[:len(batch.decode)]  # prompt tokens' lengths follow from positions
        plan = ForwardPlan(list(batch.cache_ops), ids, slots, pos, len(batch.decode), lengths,
                           max(lengths, default=0),
                           [(c.slot, c.start, c.length, c.offset) for c in chunks],
                           batch_invariant=self.batch_invariant)
        return plan, logit_rows

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, AttentionMetadata, list[int]]:
        """input ids, attention metadata, and the flat index of each row to sample."""
        if self.paged:
            return self.prepare_paged(batch)
        plan, logit_rows = self.plan(batch)
        return *plan.inputs(self.device), logit_rows

    def prepare_paged(self, batch: Batch) -> tuple[torch.Tensor, AttentionMetadata, list[int]]:
        """As `prepare`, over block tables: every token is written to its row's block for its
        position; decode rows are dense (no padding rows)."""
        bs, tables = self.cache.block_size, batch.block_tables
        ids, blocks, offs, pos, lengths = [], [], [], [], []
        for r in batch.decode:
            p, t = r.num_computed, tables[r]
            ids.append(r.last_token), pos.append(p), lengths.append(p + 1)
            blocks.append(t[p // bs]), offs.append(p % bs)
        logit_rows = list(range(len(batch.decode)))
        dev = self.device
        chunks = []
        for c in batch.prefill:
            t, end = tables[c.row], c.start + c.length
            tokens = tokens_of(c.row)  # a resumed row recomputes its outputs too
            chunks.append(PrefillChunk(c.slot, c.start, c.length, len(ids),
                                       to_device(t[:-(-end // bs)], dev)))
            ids.extend(tokens[c.start:end])
            pos.extend(range(c.start, end))
            blocks.extend(t[p // bs] for p in range(c.start, end))
            offs.extend(p % bs for p in range(c.start, end))
            if c.completes:
                logit_rows += [len(ids) - 1] * len(c.row.rows)
        width = max((len(tables[r]) for r in batch.decode), default=0)
        table = [tables[r] + [0] * (width - len(tables[r])) for r in batch.decode]
        meta = AttentionMetadata(
            slot_ids=to_device(blocks, dev), positions=to_device(pos, dev),
            num_decode=len(batch.decode),
            decode_lengths=to_device(lengths, dev) if lengths else None,
            decode_max_len=max(lengths, default=0), prefills=chunks,
            write_offsets=to_device(offs, dev),
            block_tables=to_device(table, dev, torch.long) if table else None,
            batch_invariant=self.batch_invariant)
        return to_device(ids, dev), meta, logit_rows

    @torch.inference_mode()
    def forward_logits(self, batch: Batch, feed=None) -> torch.Tensor:
        """Logits [len(batch.sample), vocab] in float32. `feed`: see `_feed`."""
        if isinstance(self.graphs, TokenGraphs):  # every iteration, prompt chunks too
            ids, slots, pos, lengths, keep, _ = self.flat(batch)
            if self.graphs.fits(len(ids), len(keep)):
                self._send(ForwardPlan.token_graph(batch.cache_ops, ids, slots, pos, lengths, keep))
                return self.graphs.forward_logits(ids, slots, pos, lengths, keep, feed=feed)
        elif self.graphs is not None and batch.decode and not batch.prefill:
            if self.paged:
                return self.graphs.forward_logits(batch.decode, batch.block_tables, feed=feed)
            self._send(ForwardPlan.graph(batch.cache_ops, batch.decode))
            return self.graphs.forward_logits(batch.decode, feed=feed)
        return self._eager(batch, feed)[0]

    def _eager(self, batch: Batch, feed=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward without graphs: (logits of the rows to sample, every token's hidden state)."""
        if self.paged:  # (no tensor parallelism with pages: EngineConfig refuses it)
            ids, meta, rows = self.prepare_paged(batch)
        else:
            plan, rows = self.plan(batch)
            self._send(plan)
            ids, meta = plan.inputs(self.device)
        if feed is not None:
            ids.index_copy_(0, *feed)
        hidden = self.model(ids, meta, self.cache.k, self.cache.v)
        # long: a batch of prompt chunks none of which completes samples no row (rows == [])
        rows = to_device(rows, self.device, torch.long)
        return self.model.logits(hidden[rows]), hidden

    def _send(self, plan: ForwardPlan) -> None:
        """Tensor parallelism: the other ranks run the same forward from this record."""
        if self.channel is not None:
            self.channel.send(plan)

    @torch.inference_mode()
    def follow(self, plan: ForwardPlan) -> None:
        """A follower rank's part of rank 0's iteration: its cache operations and its forward
        (whose all-reduces pair with rank 0's); no logits, no sampling."""
        for op in plan.cache_ops:
            self.cache.apply(op)
        if plan.tokens is not None:
            self.graphs.forward_logits(*plan.tokens)
        elif plan.graph_rows is not None:
            self.graphs.forward_logits(plan.graph_rows)
        else:
            ids, meta = plan.inputs(self.device)
            self.model(ids, meta, self.cache.k, self.cache.v)

    @torch.inference_mode()
    def select(self, logits: torch.Tensor, rows: list[Request], slots: list[int],
               failed: dict[Request, BaseException] | None = None) -> StepResult:
        """Every row's next token (one device-to-host copy), beams' parents, failed rows.
        `failed`: rows whose request failed already (they get no token)."""
        return self.finish_select(self.launch_select(logits, rows, slots, failed))

    @torch.inference_mode()
    def launch_select(self, logits: torch.Tensor, rows: list[Request], slots: list[int],
                      failed: dict[Request, BaseException] | None = None) -> InFlight:
        """`select` up to the tokens' copy to the host, which it starts without waiting."""
        failed = dict(failed or {})

        def guard(row: Request, stage: Callable[..., T], *args) -> T | None:
            return _guarded(failed, row, stage, *args)

        specs = [guard(r, penalties.row_penalty, r, self.eos_ids) for r in rows]
        for r, s in zip(rows, slots, strict=True):
            if not r.output_ids and penalties.uses_counts(r):  # first sampled: its history starts
                guard(r, self.counts.start, s, r.prompt_ids)
        draws = [guard(r, sampler.row_sampling, r, self.vocab, self.generator) for r in rows]
        ok = [i for i, r in enumerate(rows) if r not in failed]
        flight = InFlight(rows, ok, failed)
        if not ok:
            flight.tokens = torch.zeros(len(rows), dtype=torch.long, device=self.device)
            return flight
        if len(ok) < len(rows):
            logits = logits[to_device(ok, logits.device)]
        x = penalties.apply_penalties(logits, [rows[i] for i in ok], self.eos_ids, self.counts,
                                      [slots[i] for i in ok], [specs[i] for i in ok])
        tokens = sampler.sample_rows(x, [draws[i] for i in ok])

        beams: dict[Group, list[int]] = {}  # group -> positions in `ok`, in beam order
        for j, i in enumerate(ok):
            if rows[i].beam is not None:
                beams.setdefault(rows[i].group, []).append(j)
        for group, js in beams.items():
            js.sort(key=lambda j: rows[ok[j]].index)
            toks = guard(group.rows[0], beam_step, group, x[to_device(js, x.device)])
            if toks is not None:
                flight.parents[group] = toks[1]
                tokens[to_device(js, tokens.device)] = to_device(toks[0], tokens.device)

        flight.ks = [rows[i].params.logprobs for i in ok]
        table, flight.lp_index, flight.k = penalties.logprob_table(x, tokens, flight.ks)
        if len(ok) < len(rows):  # every row has a device token (the next launch may gather it)
            full = torch.zeros(len(rows), dtype=torch.long, device=self.device)
            tokens = full.index_copy_(0, to_device(ok, self.device), tokens)
        flight.tokens = tokens
        if self.device.type == "cuda":  # the copies to the host wait for this iteration only
            flight.host = to_host(tokens)
            flight.lp_host = None if table is None else to_host(table)
            flight.copied = torch.cuda.Event()
            flight.copied.record()
        else:
            flight.host, flight.lp_host = tokens, table
        return flight

    def finish_select(self, flight: InFlight) -> StepResult:
        """`select`'s end: wait for the tokens on the host, each row's logprobs."""
        rows, ok, failed = flight.rows, flight.ok, flight.failed
        if not ok:
            return StepResult([None] * len(rows), {}, failed)
        if flight.copied is not None:
            flight.copied.synchronize()
        host = flight.host.tolist()
        lp_rows = penalties.spread_rows([] if flight.lp_host is None else flight.lp_host.tolist(),
                                        flight.lp_index, len(flight.ks))
        out: list[int | None] = [None] * len(rows)
        logprobs: list[dict | None] = [None] * len(rows)
        for j, i in enumerate(ok):
            if flight.ks[j] is not None:
                logprobs[i] = _guarded(failed, rows[i], penalties.logprob_entry, lp_rows[j],
                                       flight.k, flight.ks[j])
            out[i] = host[i]
        for i, r in enumerate(rows):  # a row whose request failed at a later stage gets nothing
            if r in failed:
                out[i] = None
        return StepResult(out, {g: p for g, p in flight.parents.items() if g.rows[0] not in failed},
                          failed, logprobs)


def _guarded(failed: dict[Request, BaseException], row: Request, stage: Callable[..., T],
             *args) -> T | None:
    """A per-request stage: its error fails the row's request, all its rows (in `failed`)."""
    try:
        return stage(*args)
    except Exception as e:  # noqa: BLE001 - the error belongs to this request alone
        for r in row.rows:
            failed.setdefault(r, e)
        return None


@dataclass(slots=True, eq=False)
class InFlight:
    """An iteration launched on the device whose tokens the host has not read yet."""

    rows: list[Request]  # the rows sampled, in order
    ok: list[int]  # the indices of those not failed
    failed: dict[Request, BaseException]
    tokens: torch.Tensor | None = None  # [len(rows)] on the device (0 for a failed row)
    host: torch.Tensor | None = None  # their copy on the host (pinned on a GPU)
    copied: torch.cuda.Event | None = None  # when `host` is filled (GPU)
    parents: dict[Group, list[int]] = field(default_factory=dict)
    ks: list[int | None] = field(default_factory=list)  # logprobs asked, rows `ok`
    lp_host: torch.Tensor | None = None  # the logprobs table on the host (pinned on a GPU)
    lp_index: list[int] = field(default_factory=list)  # its rows' positions in `ks`
    k: int = 0
    batch: Batch | None = None
    prompt_logprobs: dict[Request, list[dict]] = field(default_factory=dict)
    index: dict[Request, int] = field(default_factory=dict)  # a sampled row -> its token's index

    def __post_init__(self) -> None:
        self.index = {r: i for i, r in enumerate(self.rows)}


def beam_step(group: Group, logits: torch.Tensor) -> tuple[list[int], list[int]]:
    """One beam search step over the group's rows' penalised logits [k, V], in beam order."""
    return group.beam.step(torch.log_softmax(logits, -1))

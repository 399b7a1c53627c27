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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from flover.engine.cuda_graph import DecodeGraphs
from flover.engine.kv_cache import SlotCache
from flover.engine.plan import ForwardPlan
from flover.engine.scheduler import Batch, StepResult
from flover.engine.sequence import Group, Request
from flover.ops.attention import AttentionMetadata
from flover.sampling import penalties, sampler

T = TypeVar("T")


class ModelRunner:
    def __init__(self, model: nn.Module, cache: SlotCache, eos_ids: list[int] | None = None,
                 seed: int = 0, cuda_graphs: bool = True, channel=None) -> None:
        self.model, self.cache, self.eos_ids = model, cache, list(eos_ids or [])
        self.channel = channel  # tensor parallelism: rank 0 sends each forward's plan on it
        self.device = cache.k.device
        self.vocab = model.cfg.vocab_size
        self.generator = torch.Generator().manual_seed(seed)  # rows without a seed of their own
        self.counts = penalties.TokenCounts(cache.num_slots, self.vocab, self.device)
        # pure-decode iterations replay a captured graph on the GPU (flover.engine.cuda_graph)
        use_graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs = DecodeGraphs(model, cache) if use_graphs else None
        if self.graphs is not None:
            self.graphs.capture_all()

    @torch.inference_mode()
    def run(self, batch: Batch) -> StepResult:
        """Apply the plan's cache operations, run the forward, select every sampled row's token."""
        for op in batch.cache_ops:
            self.cache.apply(op)
            self.counts.apply(op)
        if self.counts.output is not None:  # some request has used penalties
            fed = [(i, r.last_token) for i, r in enumerate(batch.decode)
                   if r is not None and penalties.uses_counts(r)]
            self.counts.add([i for i, _ in fed], [t for _, t in fed])  # decode row i is slot i
        if any(c.row.params.prompt_logprobs is not None for c in batch.prefill):
            logits, hidden = self._eager(batch)
            entries, failed = self.prompt_logprobs(batch, hidden)
        else:
            logits, entries, failed = self.forward_logits(batch), {}, {}
        # a request whose prompt logprobs failed fails whole, all its rows
        result = self.select(logits, batch.sample, batch.sample_slots,
                             {row: e for req, e in failed.items() for row in req.rows})
        result.prompt_logprobs = {r: v for r, v in entries.items() if r not in result.failed}
        return result

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
            targets = torch.tensor(prompt[a + 1:b + 1], device=self.device)
            host, kk = penalties.logprob_rows(self.model.logits(hidden[idx]), targets, [k] * (b - a))
            out += [penalties.logprob_entry(row, kk, k) for row in host]
        return out

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, AttentionMetadata, list[int]]:
        """input ids, attention metadata, and the flat index of each row to sample."""
        plan, logit_rows = self.plan(batch)
        return *plan.inputs(self.device), logit_rows

    def plan(self, batch: Batch) -> tuple[ForwardPlan, list[int]]:
        """The eager forward's inputs as host lists, and the flat index of each row to sample."""
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
            chunks.append((c.slot, c.start, c.length, len(ids)))
            ids.extend(c.row.prompt_ids[c.start:c.start + c.length])
            slots.extend([c.slot] * c.length)
            pos.extend(range(c.start, c.start + c.length))
            if c.completes:
                logit_rows += [len(ids) - 1] * len(c.row.rows)
        plan = ForwardPlan(list(batch.cache_ops), ids, slots, pos, len(batch.decode), lengths,
                           max(lengths, default=0), chunks)
        return plan, logit_rows

    @torch.inference_mode()
    def forward_logits(self, batch: Batch) -> torch.Tensor:
        """Logits [len(batch.sample), vocab] in float32."""
        if self.graphs is not None and batch.decode and not batch.prefill:
            if self.channel is not None:
                self.channel.send(ForwardPlan.graph(batch.cache_ops, batch.decode))
            return self.graphs.forward_logits(batch.decode)
        return self._eager(batch)[0]

    def _eager(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward without graphs: (logits of the rows to sample, every token's hidden state)."""
        plan, rows = self.plan(batch)
        ids, meta = plan.inputs(self.device)
        if self.channel is not None:
            self.channel.send(plan)
        hidden = self.model(ids, meta, self.cache.k, self.cache.v)
        return self.model.logits(hidden[torch.tensor(rows, device=self.device)]), hidden

    @torch.inference_mode()
    def follow(self, plan: ForwardPlan) -> None:
        """A follower rank's part of rank 0's iteration: its cache operations and its forward
        (whose all-reduces pair with rank 0's); no logits, no sampling."""
        for op in plan.cache_ops:
            self.cache.apply(op)
        if plan.graph_rows is not None:
            self.graphs.forward_logits(plan.graph_rows)
        else:
            ids, meta = plan.inputs(self.device)
            self.model(ids, meta, self.cache.k, self.cache.v)

    @torch.inference_mode()
    def select(self, logits: torch.Tensor, rows: list[Request], slots: list[int],
               failed: dict[Request, BaseException] | None = None) -> StepResult:
        """Every row's next token (one device-to-host copy), beams' parents, failed rows.
        `failed`: rows whose request failed already (they get no token)."""
        failed = dict(failed or {})

        def guard(row: Request, stage: Callable[..., T], *args) -> T | None:
            try:
                return stage(*args)
            except Exception as e:  # noqa: BLE001 - the error belongs to this request alone
                for r in row.rows:  # a request fails whole, all its rows
                    failed.setdefault(r, e)
                return None

        specs = [guard(r, penalties.row_penalty, r, self.eos_ids) for r in rows]
        for r, s in zip(rows, slots, strict=True):
            if not r.output_ids and penalties.uses_counts(r):  # first sampled: its history starts
                guard(r, self.counts.start, s, r.prompt_ids)
        draws = [guard(r, sampler.row_sampling, r, self.vocab, self.generator) for r in rows]
        ok = [i for i, r in enumerate(rows) if r not in failed]
        if not ok:
            return StepResult([None] * len(rows), {}, failed)
        if len(ok) < len(rows):
            logits = logits[torch.tensor(ok, device=logits.device)]
        x = penalties.apply_penalties(logits, [rows[i] for i in ok], self.eos_ids, self.counts,
                                      [slots[i] for i in ok], [specs[i] for i in ok])
        tokens = sampler.sample_rows(x, [draws[i] for i in ok])

        parents: dict[Group, list[int]] = {}
        beams: dict[Group, list[int]] = {}  # group -> positions in `ok`, in beam order
        for j, i in enumerate(ok):
            if rows[i].beam is not None:
                beams.setdefault(rows[i].group, []).append(j)
        for group, js in beams.items():
            js.sort(key=lambda j: rows[ok[j]].index)
            toks = guard(group.rows[0], beam_step, group, x[torch.tensor(js, device=x.device)])
            if toks is not None:
                parents[group] = toks[1]
                tokens[torch.tensor(js, device=tokens.device)] = torch.tensor(toks[0], device=tokens.device)

        ks = [rows[i].params.logprobs for i in ok]
        lp_rows, k = penalties.logprob_rows(x, tokens, ks)
        host = tokens.tolist()
        out: list[int | None] = [None] * len(rows)
        logprobs: list[dict | None] = [None] * len(rows)
        for j, i in enumerate(ok):
            if ks[j] is not None:
                logprobs[i] = guard(rows[i], penalties.logprob_entry, lp_rows[j], k, ks[j])
            out[i] = host[j]
        for i, r in enumerate(rows):  # a row whose request failed at a later stage gets nothing
            if r in failed:
                out[i] = None
        return StepResult(out, {g: p for g, p in parents.items() if g.rows[0] not in failed},
                          failed, logprobs)


def beam_step(group: Group, logits: torch.Tensor) -> tuple[list[int], list[int]]:
    """One beam search step over the group's rows' penalised logits [k, V], in beam order."""
    return group.beam.step(torch.log_softmax(logits, -1))

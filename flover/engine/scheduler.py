"""Temporal fusion: which requests run in the next iteration, and what happens after it.

Every iteration admits each waiting request while a slot is free (FIFO), gives prompt chunks
to requests being prefilled under a token budget, and runs one decode row for every request
that is generating, each at its own position. Rows follow slots: row i is slot i, and a row
whose slot holds no generating request is a padding row. The scheduler knows requests and
slots, never tensors.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from flover.engine.kv_cache import SlotCache
from flover.engine.sequence import Group, Request, Status


@dataclass(slots=True)
class Batch:
    decode: list[Request | None]  # row i <-> slot i; None is a padding row
    prefill: list[tuple[Request, int, int]]  # (request, first position, number of tokens)
    sample: list[Request] = field(default_factory=list)  # rows whose logits get sampled, in order

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(self, cache: SlotCache, prefill_token_budget: int) -> None:
        self.cache = cache
        self.budget = prefill_token_budget
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.iterations = 0
        self.prefill_tokens = 0  # prompt tokens run through the model
        self.decode_rows = 0  # decode rows run (padding rows included)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        # a request with several rows (n samples, beams) is admitted whole or waits
        while self.waiting and self.cache.free >= self._rows_of(self.waiting[0]):
            for _ in range(self._rows_of(self.waiting[0])):
                req = self.waiting.popleft()
                req.slot = self.cache.allocate(req)
                req.status = Status.PREFILL
                req.admit_time = time.perf_counter()
                self.running.append(req)

        prefill, budget = [], self.budget
        for req in self.running:  # forked rows copy their first row's prompt instead
            if req.status is Status.PREFILL and req.fork_of is None and budget > 0:
                n = min(len(req.prompt_ids) - req.num_computed, budget)
                prefill.append((req, req.num_computed, n))
                budget -= n

        decoding = [r for r in self.running if r.status is Status.DECODE]
        rows: list[Request | None] = []
        if decoding:
            rows = [None] * (max(r.slot for r in decoding) + 1)
            for r in decoding:
                rows[r.slot] = r
        sample = [r for r in rows if r is not None]
        for r, start, n in prefill:
            if start + n == len(r.prompt_ids):
                sample += [r, *r.forks]  # forks sample their first token from r's logits
        return Batch(rows, prefill, sample)

    @staticmethod
    def _rows_of(req: Request) -> int:
        return len(req.group.rows) if req.group is not None else 1

    def postprocess(self, batch: Batch, tokens: list[int], eos: list[int],
                    parents: dict[Group, list[int]] | None = None) -> list[Request]:
        """Advance every request of the batch; returns those that got a new token.

        `parents[g][i]` is the beam that beam i of group g continues (beam search only).
        """
        self.iterations += 1
        self.decode_rows += len(batch.decode)
        self.prefill_tokens += sum(n for _, _, n in batch.prefill)
        for r in batch.decode:
            if r is not None:
                r.num_computed += 1
        for r, _, n in batch.prefill:
            r.num_computed += n
            if r.num_computed == len(r.prompt_ids):
                for f in r.forks:
                    self.cache.copy(r.slot, f.slot, r.num_computed)
                    f.num_computed = r.num_computed
        now = time.perf_counter()
        for r, tok in zip(batch.sample, tokens, strict=True):
            r.output_ids.append(tok)
            if r.status is Status.PREFILL:
                r.status, r.first_token_time = Status.DECODE, now
            if r.is_beam:
                continue  # the beam search decides when its rows end
            p = r.params
            if len(r.output_ids) >= p.max_tokens:
                r.finish_reason = "length"
            elif len(r.output_ids) >= p.min_tokens and (
                    tok in p.stop_token_ids or (not p.ignore_eos and tok in eos)):
                r.finish_reason = "stop"
        for group, par in (parents or {}).items():
            self._reorder_beams(group, par)
        for r in self.running:
            self.cache.filled[r.slot] = r.num_computed
        for r in batch.sample:
            if r.is_beam:
                if r.group.beam.done and not r.finished:
                    self.finish(r, "beam")
            elif r.finish_reason is not None and not r.finished:
                self.finish(r, r.finish_reason)
        return batch.sample

    def _reorder_beams(self, group: Group, parents: list[int]) -> None:
        """Beam i continues beam parents[i]: take its history and its cache."""
        rows = group.rows
        if parents == list(range(len(rows))):
            return
        n = rows[0].num_computed
        self.cache.gather([rows[p].slot for p in parents], [r.slot for r in rows], n)
        outputs = [rows[p].output_ids[:-1] + [r.output_ids[-1]] for r, p in zip(rows, parents, strict=True)]
        for r, out in zip(rows, outputs, strict=True):
            r.output_ids = out

    def finish(self, req: Request, reason: str) -> None:
        """End a request now and free its slot (moving another request into it if shuffling)."""
        req.finish_reason, req.finish_time = reason, time.perf_counter()
        if req.status is Status.WAITING:
            self.waiting.remove(req)
        elif req.status is not Status.FINISHED:
            self.running.remove(req)
            move = self.cache.release(req.slot)
            if move is not None:
                moved = self.cache.owner[move.dst]
                assert isinstance(moved, Request) and moved.slot == move.src
                moved.slot = move.dst
            req.slot = None
        req.status = Status.FINISHED

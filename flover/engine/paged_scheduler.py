"""Temporal fusion over the paged KV cache: rows take blocks as they grow, and yield them.

Same plan as `flover.engine.scheduler.Scheduler` (decode rows, prompt chunks under a token
budget, cache operations), with the memory in blocks (`flover.engine.block_manager`):
- Decode rows are the generating rows in admission order, dense (no padding rows); each
  gets the block its next token is written to (a new one, or a private copy of a shared
  one) before anything new is admitted.
- When the pool runs dry, the newest request is preempted: its blocks go back, its tokens
  are kept, and it waits at the front of the queue (under async scheduling, until a token of
  its still in flight has reached the host). On resume each of its rows recomputes
  its prompt and outputs but the last token (the prefix cache usually still holds most of
  them), then the request decodes on, its rows together (beams step as one).
- A request is admitted when a row slot is free for each of its rows (`max_concurrency` caps
  the rows in flight) and the pool holds the blocks of its prompt; cached full blocks of
  the prompt are shared and not computed again. A request whose next uncached block is being
  computed by a running row waits for it instead of computing it too (32 requests arriving
  together with one long shared prefix compute it once).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from flover.engine.block_manager import BlockAllocator
from flover.engine.kv_cache import Reorder
from flover.engine.scheduler import Batch, Chunk, Scheduler, StepResult, last_launched
from flover.engine.sequence import Request, Status


@dataclass(slots=True)
class PagedChunk(Chunk):
    """A chunk of a row's tokens (prompt, then outputs for a resumed row)."""

    sample: bool = False  # its last token's logits give the row's (and its forks') next token

    @property
    def completes(self) -> bool:
        return self.sample


def tokens_of(row: Request) -> list[int]:
    """Every token of the row so far: its prompt and its outputs."""
    return row.prompt_ids + row.output_ids if row.output_ids else row.prompt_ids


def target(row: Request) -> int:
    """Tokens a row computes before it decodes: its prompt, or for a resumed row everything
    but its last output (which its next decode feeds)."""
    return len(row.prompt_ids) + len(row.output_ids) - 1 if row.output_ids else len(row.prompt_ids)


def computes_own(row: Request) -> bool:
    """A fork with no outputs yet takes its head's blocks instead of computing its prompt."""
    return not (row.is_fork and not row.output_ids)


class PagedScheduler(Scheduler):
    def __init__(self, blocks: BlockAllocator, prefill_token_budget: int) -> None:
        super().__init__(blocks, prefill_token_budget)
        self.blocks = blocks
        self.reserve = max(1, blocks.num_blocks // 100)  # left free at admission, for growth

    def schedule(self) -> Batch:
        ops = self._grow()
        self._admit()
        prefill, budget = [], self.budget
        for row in self.running:
            if row.status is Status.PREFILL and computes_own(row) and budget > 0:
                left = target(row) - row.num_computed
                if left > 0:
                    n = min(left, budget)
                    sample = n == left and not row.output_ids
                    prefill.append(PagedChunk(row, self.blocks.slot(row), row.num_computed, n,
                                              sample))
                    budget -= n
        decode = [r for r in self.running if r.status is Status.DECODE and not last_launched(r)]
        sample = list(decode)
        for c in prefill:
            if c.completes:
                sample += c.row.rows  # forks draw their first token from the head's logits
        batch = Batch(decode, prefill, sample, [self.blocks.slot(r) for r in sample])
        batch.decode_slots = [self.blocks.slot(r) for r in decode]
        batch.block_tables = {r: list(self.blocks.table(r)) for r in batch.requests}
        if not batch.empty:
            batch.cache_ops, self.pending_ops = self.pending_ops + ops, []
        else:
            self.pending_ops += ops
        return batch

    def _grow(self) -> list:
        """Every decode row gets the block of its next write, the newest requests yielding
        theirs when the pool is empty."""
        ops = []
        for row in list(self.running):
            if row.status is not Status.DECODE or last_launched(row):
                continue
            while (not self.blocks.can_append(row, row.num_computed)
                   and self.blocks.available == 0):
                victim = self._newest()
                self._preempt(victim)
                if victim is row.rows[0]:
                    break
            if row.status is Status.DECODE:
                op = self.blocks.prepare_write(row, row.num_computed)
                if op is not None:
                    ops.append(op)
        return ops

    def _newest(self) -> Request:
        heads = list(dict.fromkeys(r.rows[0] for r in self.running))
        return max(reversed(heads), key=lambda h: h.arrival_time)  # ties: the last admitted

    def _preempt(self, head: Request) -> None:
        """Free the request's blocks, keep its tokens and slots; it resumes first."""
        for row in head.rows:
            if row.finished or row.status is Status.WAITING:
                continue
            self.running.remove(row)
            self.blocks.drop_blocks(row)
            row.status, row.num_computed = Status.WAITING, 0
        self.blocks.preemptions += 1
        self.waiting.appendleft(head)

    def _admit(self) -> None:
        while self.waiting:
            head = self.waiting[0]
            rows = [r for r in head.rows if not r.finished]
            if not rows:
                self.waiting.popleft()
                continue
            if any(r.pending for r in rows):  # preempted with a token in flight (async
                return  # scheduling): it resumes once that token is read, with all its tokens
            if self.blocks.free < sum(1 for r in rows if not self.blocks.has(r)):
                return
            own = [r for r in rows if computes_own(r)]
            work = [(r, tokens_of(r)[:target(r)], r.params.prompt_logprobs is None) for r in own]
            if self.running and any(hit and self.blocks.being_computed(t) for _, t, hit in work):
                return  # its prefix is being computed: it waits to share it (FIFO behind it)
            reserve = self.reserve if self.running else 0
            for r in rows:
                if not self.blocks.has(r):
                    self.blocks.add_row(r)
            saved = self.blocks.allocate_prompts(work, reserve)
            if saved is None:
                if not any(r.output_ids for r in rows):  # a new request gives its slots back
                    for r in rows:
                        self.blocks.remove_row(r)
                return
            self.waiting.popleft()
            now = time.perf_counter()
            for r in rows:
                r.status, r.num_computed = Status.PREFILL, 0
                if r.admit_time is None:
                    r.admit_time = now
                self.running.append(r)
            for r, n in zip(own, saved, strict=True):
                r.num_computed = n
            self._ready(head)

    def _ready(self, head: Request) -> None:
        """A resumed request decodes again once every row of it has recomputed its tokens."""
        rows = [r for r in head.rows if not r.finished]
        if all(r.output_ids and r.status is Status.PREFILL and r.num_computed == target(r)
               for r in rows):
            for r in rows:
                r.status = Status.DECODE

    def launched(self, batch: Batch) -> None:
        self.iterations += 1
        self.decode_rows += len(batch.decode)
        self.prefill_tokens += sum(c.length for c in batch.prefill)
        for r in batch.decode:
            r.num_computed += 1
        for c in batch.prefill:
            row = c.row
            row.num_computed += c.length
            if c.completes:
                for f in row.forks:
                    if not f.finished:
                        self.blocks.fork(row, f)
                        f.num_computed = row.num_computed
            elif row.output_ids and row.num_computed == target(row):
                self._ready(row.rows[0])
        self._launch_rows(batch)

    def postprocess(self, batch: Batch, result: StepResult) -> list[Request]:
        for c in batch.prefill:
            row = c.row
            if not row.output_ids:  # a resumed row has its prompt logprobs already
                if row.params.prompt_logprobs is not None and c.start == 0:
                    row.prompt_logprobs = [None]
                row.prompt_logprobs += result.prompt_logprobs.get(row, [])
        advanced = self._take_tokens(batch, result)
        if self.blocks.prefix_caching:
            bs = self.blocks.block_size
            for r in self.running:
                if r.num_computed // bs > len(self.blocks.rows[r].hashes):
                    self.blocks.register(r, tokens_of(r), r.num_computed)
        return advanced

    def _reorder_cache(self, rows: list[Request], parents: list[int]) -> None:
        """Beam i shares beam parents[i]'s blocks (copied on write); the sampler's per-row
        state follows (`Reorder` of slots, no tokens: blocks are not copied)."""
        self.blocks.reorder(rows, parents)
        self.pending_ops.append(Reorder(tuple(self.blocks.slot(rows[p]) for p in parents),
                                        tuple(self.blocks.slot(r) for r in rows), 0))

    def finish(self, row: Request, reason: str) -> None:
        if row.finished:
            return
        row.finish_reason, row.finish_time = reason, time.perf_counter()
        if row.status is not Status.WAITING:
            self.running.remove(row)
        if self.blocks.has(row):
            self.blocks.remove_row(row)
        row.status = Status.FINISHED
        head = row.rows[0]
        if all(r.finished for r in row.rows) and head in self.waiting:
            self.waiting.remove(head)

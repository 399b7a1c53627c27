"""Temporal fusion: which rows run in the next iteration, and what each row became after it.

Every iteration admits each waiting request while slots are free (FIFO; a request of several
rows is admitted whole), gives prompt chunks to rows being prefilled under a token budget,
and runs one decode row for every generating row, each at its own position. Rows follow
slots: decode row i is slot i, and a row whose slot holds no generating row is a padding row.
The plan also carries the cache operations decided since the last one (fork copies, beam
reorders, shuffle moves), for the runner to apply before its forward. The scheduler knows
rows and slots, never tensors; it finishes a row only when the engine tells it to.

A plan's bookkeeping comes in two halves: `launched` when its forward is queued (positions,
PREFILL -> DECODE, one pending token per sampled row), `postprocess` when its tokens reach the
host. Between them the next plan can be made (async scheduling): a row whose token is pending
feeds it from the device, and one whose last allowed token is pending is not run again.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from flover.engine.kv_cache import CacheOp, CopyPrefix, Reorder, SlotAllocator
from flover.engine.sequence import Group, Request, Status


@dataclass(slots=True)
class Chunk:
    """Prompt tokens [start, start + length) of a row, written into its slot."""

    row: Request
    slot: int
    start: int
    length: int

    @property
    def completes(self) -> bool:
        return self.start + self.length == len(self.row.prompt_ids)


@dataclass(slots=True)
class Batch:
    """One iteration's plan."""

    decode: list[Request | None]  # row i <-> slot i; None is a padding row
    prefill: list[Chunk]
    sample: list[Request] = field(default_factory=list)  # rows whose next token is drawn, in order
    sample_slots: list[int] = field(default_factory=list)  # their slots
    cache_ops: list[CacheOp] = field(default_factory=list)  # applied before the forward, in order
    # paged layout (flover.engine.paged_scheduler): decode rows' slots and each row's blocks
    decode_slots: list[int] | None = None
    block_tables: dict[Request, list[int]] | None = None

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def requests(self) -> list[Request]:
        """The rows this iteration computes (decode rows and prefill chunks)."""
        return [r for r in self.decode if r is not None] + [c.row for c in self.prefill]


@dataclass(slots=True)
class StepResult:
    """What the runner found for a batch, aligned with `batch.sample`."""

    tokens: list[int | None]  # None: that row failed this iteration
    parents: dict[Group, list[int]] = field(default_factory=dict)  # beam i continues parents[i]
    failed: dict[Request, BaseException] = field(default_factory=dict)
    logprobs: list[dict | None] = field(default_factory=list)  # rows that asked for them
    prompt_logprobs: dict[Request, list[dict]] = field(default_factory=dict)  # per prefill chunk


def last_launched(row: Request) -> bool:
    """Whether a row's last token (max_tokens) is already launched (async scheduling): it
    ends by length when that token arrives and must not be run once more (its next position
    may lie past its slot's end)."""
    return row.pending > 0 and row.num_generated >= row.params.max_tokens


class Scheduler:
    def __init__(self, slots: SlotAllocator, prefill_token_budget: int) -> None:
        self.slots = slots
        self.budget = prefill_token_budget
        self.waiting: deque[Request] = deque()  # requests (head rows), FIFO
        self.running: list[Request] = []  # rows holding a slot, in admission order
        self.pending_ops: list[CacheOp] = []  # decided, not yet handed to the runner
        self.iterations = 0
        self.prefill_tokens = 0  # prompt tokens run through the model
        self.decode_rows = 0  # decode rows run (padding rows included)

    def add(self, head: Request) -> None:
        self.waiting.append(head)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        while self.waiting and self.slots.free >= len(self.waiting[0].rows):
            head = self.waiting.popleft()
            now = time.perf_counter()
            for row in head.rows:
                self.slots.allocate(row)
                row.status, row.admit_time = Status.PREFILL, now
                self.running.append(row)

        prefill, budget = [], self.budget
        for row in self.running:  # forks copy their head's prompt instead
            if row.status is Status.PREFILL and not row.is_fork and budget > 0:
                n = min(len(row.prompt_ids) - row.num_computed, budget)
                prefill.append(Chunk(row, self.slots.slot(row), row.num_computed, n))
                budget -= n

        decode: list[Request | None] = []
        decoding = [r for r in self.running if r.status is Status.DECODE and not last_launched(r)]
        if decoding:
            decode = [None] * (max(self.slots.slot(r) for r in decoding) + 1)
            for r in decoding:
                decode[self.slots.slot(r)] = r
        sample = [r for r in decode if r is not None]
        for c in prefill:
            if c.completes:
                sample += c.row.rows  # forks draw their first token from the head's logits
        batch = Batch(decode, prefill, sample, [self.slots.slot(r) for r in sample])
        if not batch.empty:  # an empty plan is not run: its operations wait for the next one
            batch.cache_ops, self.pending_ops = self.pending_ops, []
        return batch

    def launched(self, batch: Batch) -> None:
        """The batch's forward is on its way: advance what the plan alone decides (cache
        positions, forks' prompt copies, PREFILL -> DECODE, one pending token per sampled row),
        so that the next plan can be made before this one's tokens reach the host."""
        self.iterations += 1
        self.decode_rows += len(batch.decode)
        self.prefill_tokens += sum(c.length for c in batch.prefill)
        for r in batch.decode:
            if r is not None:
                r.num_computed += 1
        for c in batch.prefill:
            c.row.num_computed += c.length
            if c.completes:
                for f in c.row.forks:
                    f.num_computed = c.row.num_computed
                    self.pending_ops.append(CopyPrefix(c.slot, self.slots.slot(f), f.num_computed))
        self._launch_rows(batch)

    def _launch_rows(self, batch: Batch) -> None:
        for r in batch.sample:
            r.pending += 1
            if r.status is Status.PREFILL:
                r.status = Status.DECODE

    def postprocess(self, batch: Batch, result: StepResult) -> list[Request]:
        """The launched batch's tokens have arrived: returns the rows that got a new token."""
        for c in batch.prefill:
            if c.row.params.prompt_logprobs is not None and c.start == 0:
                c.row.prompt_logprobs = [None]  # the first prompt token has none
            c.row.prompt_logprobs += result.prompt_logprobs.get(c.row, [])
        return self._take_tokens(batch, result)

    def _take_tokens(self, batch: Batch, result: StepResult) -> list[Request]:
        """Append each sampled row's token (and logprobs), reorder beams; the rows that
        advanced. A row that ended after the launch (async scheduling) drops its token."""
        now = time.perf_counter()
        advanced = []
        logprobs = result.logprobs or [None] * len(result.tokens)
        for r, tok, lp in zip(batch.sample, result.tokens, logprobs, strict=True):
            r.pending -= 1
            if tok is None or r.finished:
                continue
            r.output_ids.append(tok)
            if lp is not None:
                r.logprobs.append(lp)
            if r.first_token_time is None:
                r.first_token_time = now
            advanced.append(r)
        for group, parents in result.parents.items():
            self._reorder_beams(group, parents)
        return advanced

    def _reorder_beams(self, group: Group, parents: list[int]) -> None:
        """Beam i continues beam parents[i]: it takes that beam's history and cache."""
        rows = group.rows
        if parents == list(range(len(rows))):
            return
        self._reorder_cache(rows, parents)
        outputs = [rows[p].output_ids[:-1] + [r.output_ids[-1]]
                   for r, p in zip(rows, parents, strict=True)]
        for r, out in zip(rows, outputs, strict=True):
            r.output_ids = out

    def _reorder_cache(self, rows: list[Request], parents: list[int]) -> None:
        """Row i's slot takes row parents[i]'s cache (one `Reorder`, all at once)."""
        self.pending_ops.append(Reorder(tuple(self.slots.slot(rows[p]) for p in parents),
                                        tuple(self.slots.slot(r) for r in rows),
                                        rows[0].num_computed))

    def finish(self, row: Request, reason: str) -> None:
        """End a row now and free its slot (another row may move into it)."""
        if row.finished:
            return
        row.finish_reason, row.finish_time = reason, time.perf_counter()
        if row.status is Status.WAITING:
            if row.index == 0:
                self.waiting.remove(row)
        else:
            self.running.remove(row)
            move = self.slots.release(row)
            if move is not None:
                self.pending_ops.append(move)
        row.status = Status.FINISHED

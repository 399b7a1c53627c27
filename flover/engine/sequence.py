"""One request's state as it moves through the engine: its rows and their tokens.

A request is one row of the fused batch, or a `Group` of rows that share its prompt (n
samples, or the beams of a beam search). The scheduler advances rows; which KV slot a row
holds is recorded by `kv_cache.SlotAllocator` alone.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from flover.config import SamplingParams
from flover.sampling.beam import BeamSearch


class Status(enum.Enum):
    WAITING = "waiting"  # queued for a slot
    PREFILL = "prefill"  # has a slot; prompt (partly) in the cache, or waiting to copy it (forks)
    DECODE = "decode"  # generating, one token per iteration
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    """One row: a request of its own, or row `index` of a group."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose keys and values are in the cache (or being written)
    pending: int = 0  # sampled tokens launched on the device, not yet in output_ids (async)
    finish_reason: str | None = None  # length | stop | abort | error
    error: str | None = None  # why the request failed (finish_reason "error")
    generator: torch.Generator | None = None  # its own RNG when seeded
    admit_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list[dict | None] = field(default_factory=list)  # with params.prompt_logprobs
    group: Group | None = None  # several rows (n > 1, beams)
    index: int = 0  # row index within its group
    text: object | None = None  # its detokenizer (flover.engine.outputs), when there is a tokenizer

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def num_generated(self) -> int:
        """Tokens generated so far, those still on their way to the host included."""
        return len(self.output_ids) + self.pending

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def is_fork(self) -> bool:
        """A row that copies row 0's prompt cache instead of computing it."""
        return self.index > 0

    @property
    def forks(self) -> list[Request]:
        return self.group.rows[1:] if self.group is not None and self.index == 0 else []

    @property
    def beam(self) -> BeamSearch | None:
        return self.group.beam if self.group is not None else None

    @property
    def rows(self) -> list[Request]:
        """Every row of the request this row belongs to."""
        return self.group.rows if self.group is not None else [self]


@dataclass(slots=True, eq=False)
class Group:
    """One user request made of several rows: n samples, or the beams of a beam search."""

    rows: list[Request]
    beam: BeamSearch | None = None


def make_generator(seed: int) -> torch.Generator:
    """A request's own RNG: its draws do not depend on its neighbours in the batch."""
    return torch.Generator().manual_seed(seed)


def new_request(request_id: str, prompt_ids: list[int], params: SamplingParams,
                arrival_time: float | None, beam: BeamSearch | None) -> Request:
    """A request with its rows: n samples or beam_width beams share the head's prompt.

    Row i > 0 of a seeded request draws from a generator seeded from (seed, i)."""
    head = Request(request_id, prompt_ids, params)
    if arrival_time is not None:
        head.arrival_time = arrival_time
    rows = max(params.n, params.beam_width)
    seed = params.seed
    if seed is not None:
        head.generator = make_generator(seed)
    if rows > 1:
        forks = [Request(f"{request_id}#{i}", prompt_ids, params, head.arrival_time, index=i)
                 for i in range(1, rows)]
        for i, f in enumerate(forks, start=1):
            if seed is not None:
                f.generator = make_generator(hash((seed, i)) & 0x7FFFFFFFFFFF)
        head.group = Group([head, *forks], beam)
        for f in forks:
            f.group = head.group
    return head

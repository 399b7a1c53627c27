"""One request's state as it moves through the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from flover.config import SamplingParams
from flover.sampling.beam import BeamSearch


class Status(enum.Enum):
    WAITING = "waiting"  # queued for a slot
    PREFILL = "prefill"  # has a slot; prompt (partly) in the cache
    DECODE = "decode"  # generating, one token per iteration
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    slot: int | None = None
    num_computed: int = 0  # tokens whose keys and values are in the cache
    finish_reason: str | None = None
    generator: torch.Generator | None = None  # per-request RNG when seeded
    first_token_time: float | None = None
    finish_time: float | None = None
    admit_time: float | None = None
    logprobs: list[dict] = field(default_factory=list)
    group: Group | None = None  # set when the request has several rows (n > 1, beams)
    index: int = 0  # row index within its group
    forks: list[Request] = field(default_factory=list)  # rows that copy this row's prompt
    fork_of: Request | None = None  # the row whose prefill this row copies
    cumulative_logprob: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def token_at(self, i: int) -> int:
        p = len(self.prompt_ids)
        return self.prompt_ids[i] if i < p else self.output_ids[i - p]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def is_beam(self) -> bool:
        return self.group is not None and self.group.beam is not None

    def fork(self, index: int, seed: int | None) -> Request:
        """A sibling row with the same prompt that will copy this row's cache."""
        row = Request(f"{self.request_id}#{index}", self.prompt_ids, self.params,
                      self.arrival_time, index=index, fork_of=self)
        if seed is not None:
            row.generator = torch.Generator().manual_seed(seed)
        self.forks.append(row)
        return row


@dataclass(slots=True, eq=False)
class Group:
    """One user request made of several rows: n samples, or the beams of a beam search."""

    request_id: str
    rows: list[Request]
    beam: BeamSearch | None = None

    @property
    def finished(self) -> bool:
        return (self.beam.done if self.beam is not None
                else all(r.finished for r in self.rows))

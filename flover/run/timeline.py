"""What a run records as it goes: each request's times, the in-flight count over iterations,
and a log of arrivals and finishes. The drivers write it; the live view and the report read it.

Times are seconds after the start of the run. Writers may be several threads (`instances`
mode), so every change goes through the lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class Record:
    request_id: str
    arrival: float  # when it arrived (the workload's schedule)
    prompt_len: int
    max_tokens: int
    admit: float | None = None  # when it got a KV slot (or its own instance)
    first_token: float | None = None
    finish: float | None = None
    tokens: int = 0  # output tokens so far
    text: str = ""  # decoded output so far ("" without a tokenizer)
    status: str = "pending"  # pending -> waiting -> running -> done

    @property
    def latency(self) -> float | None:
        return None if self.finish is None else self.finish - self.arrival

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first."""
        if self.finish is None or self.first_token is None or self.tokens < 2:
            return None
        return (self.finish - self.first_token) / (self.tokens - 1)


@dataclass
class RunState:
    mode: str
    records: list[Record]
    max_concurrency: int
    t0: float = 0.0  # perf_counter at the start of the run
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time, requests in flight)
    events: deque = field(default_factory=lambda: deque(maxlen=200))  # (time, text)
    iterations: int = 0  # forward passes, over all instances
    slots_used: int = 0
    shuffle_moves: int = 0
    started: bool = False
    done: bool = False
    lone: dict | None = None  # a lone request's latency, ttft, tpot, output length
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> float:
        self.t0, self.started = time.perf_counter(), True
        return self.t0

    def now(self) -> float:
        return time.perf_counter() - self.t0 if self.started else 0.0

    def rel(self, perf: float | None) -> float | None:
        """A perf_counter value as seconds after the start."""
        return None if perf is None else perf - self.t0

    def log(self, text: str) -> None:
        with self.lock:
            self.events.append((self.now(), text))

    def sample(self, in_flight: int) -> None:
        with self.lock:
            self.samples.append((self.now(), in_flight))

    @property
    def generated(self) -> int:
        return sum(r.tokens for r in self.records)

    @property
    def finished(self) -> int:
        return sum(r.status == "done" for r in self.records)

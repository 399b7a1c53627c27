"""AsyncEngine: the Engine behind asyncio, for the HTTP server.

One background thread owns the engine (and the GPU): it takes new requests and aborts from a
thread-safe inbox between iterations, runs `step()`, and hands each output to the asyncio
queue of the request it belongs to with `loop.call_soon_threadsafe`. Request handlers never
touch the engine. A request refused by `add_request` gets its error back alone; the loop goes
on. A request that fails inside the engine ends with an output whose `error` says why; the
others go on. A consumer that stops listening (client gone) aborts its requests, which frees
their slots.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from flover.config import SamplingParams
from flover.engine import Engine, RequestOutput
from flover.engine.sequence import Request


class EngineDeadError(RuntimeError):
    """The engine thread is not running."""


class ServerShuttingDownError(EngineDeadError):
    """The server is draining for shutdown: new calls are refused, and calls still running when
    the drain timeout ends are cut off with this error (a 503 / a stream's error event)."""

    code = "server_shutting_down"


class QueueTimeoutError(RuntimeError):
    """The request waited longer than the queue timeout for a slot; it never ran."""

    code = "queue_timeout"


class RequestFailedError(RuntimeError):
    """The engine ended this request with an error (its output's `error`); others went on."""


@dataclass(slots=True, eq=False)
class _Sink:
    """Where one API call's outputs go: an asyncio queue on the caller's loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop has closed: nobody is listening any more
            pass


@dataclass(slots=True)
class _Add:
    request_ids: list[str]
    prompts: list[str | list[int]]
    params: SamplingParams
    sink: _Sink
    rows: int = 0  # slots it asks for, for the waiting count


@dataclass(slots=True)
class _Abort:
    request_ids: list[str]


@dataclass(slots=True)
class _FailAll:
    error: Exception


class AsyncEngine:
    def __init__(self, engine: Engine, queue_timeout: float | None = None) -> None:
        self.engine = engine
        self.queue_timeout = queue_timeout  # seconds a request may wait for a slot; None: no limit
        self.tokenizer = engine.tokenizer
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}  # request id -> its sink; engine thread only
        self._heads: dict[str, Request] = {}  # request id -> its head row, for on_finished
        # called on the engine thread as each request ends (head row, finish reason): metrics
        self.on_finished: Callable[[Request, str | None], None] | None = None
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats = engine.stats()  # a snapshot the engine thread refreshes
        # rows handed over but not yet taken by the engine thread: each counter has one writer
        self._rows_posted = 0  # event loop
        self._rows_taken = 0  # engine thread
        self.requests = 0  # API calls handed to the engine
        self.refused = 0  # calls answered with a 4xx (the app counts them)
        self.engine_failures = 0  # steps that raised (their requests got the error)
        self.draining = False  # set by drain(): generate() refuses new calls
        self.active = 0  # generate() calls not yet finished; event loop only

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="flover-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._stopping = True
            self._inbox.put(None)  # wakes the thread if it waits for work
            self._thread.join(timeout)
            self._thread = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def waiting(self) -> int:
        """Rows waiting for a slot: the engine's queue (as of its snapshot) plus those still in
        the inbox; never blocks. For the server's --max-waiting."""
        return self._stats["waiting"] + max(0, self._rows_posted - self._rows_taken)

    def stats(self) -> dict:
        """The engine's stats as of its last iteration or inbox change (never blocks)."""
        return {**self._stats, "requests": self.requests, "refused": self.refused,
                "engine_failures": self.engine_failures}

    async def drain(self, timeout: float, cut: asyncio.Event | None = None,
                    poll: float = 0.02) -> int:
        """Graceful shutdown's first half, before the HTTP server stops: refuse new calls
        (ServerShuttingDownError, a 503), give the calls in flight up to `timeout` seconds (or
        until `cut` is set) to finish, then end the rest with ServerShuttingDownError, so that
        streams get an error event and [DONE] instead of being cut mid-answer. Returns how many
        calls were cut off. The engine thread keeps running; shutdown() stops it.

        It polls `active` (a counter the event loop alone writes) rather than waiting on an
        event: a few wake-ups a second for at most `timeout` seconds cost nothing."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.active and loop.time() < deadline and not (cut is not None and cut.is_set()):
            await asyncio.sleep(poll)
        left = self.active
        if left:
            # FIFO inbox: every call counted in `active` has posted its _Add before this
            why = "the drain was cut short" if cut is not None and cut.is_set() else \
                f"the request did not finish within the drain timeout ({timeout:g} s)"
            self._inbox.put(_FailAll(ServerShuttingDownError(f"the server is shutting down: {why}")))
            end = loop.time() + 5.0  # the callers see the error at the engine's next iteration
            while self.active and loop.time() < end:
                await asyncio.sleep(poll)
        return left

    # --- the API handlers' side ----------------------------------------------------------

    async def generate(self, prompts: Sequence[str | list[int]], params: SamplingParams,
                       prefix: str = "req") -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run prompts as requests fused with everything in flight; yields (prompt index,
        output) as tokens come. Either every prompt is accepted or the first error is raised.
        Closing the iterator early (client gone) aborts whatever has not finished."""
        if not self.started:
            self.start()  # e.g. under an ASGI transport that skips the app's lifespan
        if not self.alive:
            raise EngineDeadError("the engine thread is not running")
        if self.draining:
            raise ServerShuttingDownError("the server is shutting down: it takes no new requests")
        call = next(self._ids)
        self.requests += 1
        ids = [f"{prefix}-{call}-{i}" for i in range(len(prompts))]
        index = {rid: i for i, rid in enumerate(ids)}
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        rows = len(ids) * max(params.n, params.beam_width)
        self._rows_posted += rows
        self._inbox.put(_Add(ids, list(prompts), params, sink, rows))
        pending = set(ids)
        self.active += 1
        try:
            while pending:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    pending.clear()  # nothing of this call is in the engine
                    raise item
                if item.error is not None:
                    pending.discard(item.request_id)  # ended already; the rest is aborted
                    raise RequestFailedError(item.error)
                yield index[item.request_id], item
                if item.finished:
                    pending.discard(item.request_id)
        finally:
            self.active -= 1
            if pending:
                self._inbox.put(_Abort(sorted(pending)))

    # --- the engine thread ---------------------------------------------------------------

    def _loop(self) -> None:
        eng = self.engine
        while not self._stopping:
            # wait for work when idle; otherwise take what has arrived and go on
            msg = self._inbox.get() if not eng.has_unfinished() else self._next()
            while msg is not None:
                try:
                    self._handle(msg)
                except Exception as e:  # noqa: BLE001 - an abort gone wrong must not end the loop
                    self.engine_failures += 1
                    self._fail_all(e)
                msg = self._next()
            if self.queue_timeout is not None:
                self._expire_waiting()
            self._stats = eng.stats()
            if self._stopping or not eng.has_unfinished():
                continue
            try:
                outs = eng.step()
            except Exception as e:  # noqa: BLE001 - fail what is in flight, keep serving
                self.engine_failures += 1
                self._fail_all(e)
                self._stats = eng.stats()
                continue
            for out in outs:
                if out.finished:  # counted before the caller can see it: a scrape after agrees
                    self._ended(out.request_id)
                sink = self._sinks.get(out.request_id)
                if sink is not None:
                    sink.put(out)
                    if out.finished:
                        del self._sinks[out.request_id]
            self._stats = eng.stats()
        self._fail_all(EngineDeadError("the server is shutting down"))

    def _next(self):
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _handle(self, msg: _Add | _Abort | _FailAll | None) -> None:
        if isinstance(msg, _FailAll):
            self._fail_all(msg.error)
        elif isinstance(msg, _Abort):
            for rid in msg.request_ids:
                self.engine.abort(rid)
                self._sinks.pop(rid, None)
                self._ended(rid)
        elif isinstance(msg, _Add):
            self._rows_taken += msg.rows
            added: list[str] = []
            try:
                for rid, prompt in zip(msg.request_ids, msg.prompts, strict=True):
                    self.engine.add_request(rid, prompt, msg.params)
                    added.append(rid)
            except Exception as e:  # noqa: BLE001 - the error belongs to this request alone
                for rid in added:
                    self.engine.abort(rid)
                msg.sink.put(e)
                return
            for rid in added:
                self._sinks[rid] = msg.sink
                self._heads[rid] = self.engine.requests[rid]

    def _expire_waiting(self) -> None:
        """End the requests that have waited longer than queue_timeout for a slot (the oldest
        wait longest, so the scan stops at the first that has not)."""
        now = time.perf_counter()
        waiting = self.engine.scheduler.waiting  # FIFO: the front has waited longest
        while waiting and now - waiting[0].arrival_time > self.queue_timeout:
            head = waiting[0]
            rid = head.request_id
            self.engine.abort(rid)  # takes it off the queue
            if waiting and waiting[0] is head:  # it did not: never spin on the engine thread
                break
            self._ended(rid, "abort")
            sink = self._sinks.pop(rid, None)
            if sink is not None:
                sink.put(QueueTimeoutError(f"waited {now - head.arrival_time:.1f} s for a slot, "
                                           f"longer than the queue timeout of {self.queue_timeout:g} s"))

    def _fail_all(self, error: Exception) -> None:
        """Abort every request in flight and hand each caller the error."""
        sinks = set(self._sinks.values())
        for rid in list(self._sinks):
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001, S110 - the engine is already failing
                pass
            self._ended(rid, "abort" if isinstance(error, EngineDeadError) else "error")
        self._sinks.clear()
        for sink in sinks:
            sink.put(error)

    def _ended(self, rid: str, reason: str | None = None) -> None:
        """Hand an ended request to on_finished, once. A failing hook is logged and dropped:
        metrics must never stop the engine thread."""
        head = self._heads.pop(rid, None)
        if head is not None and self.on_finished is not None:
            try:
                self.on_finished(head, reason or head.finish_reason)
            except Exception:  # noqa: BLE001
                logging.getLogger("flover.server").exception("on_finished failed for %s", rid)

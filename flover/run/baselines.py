"""The comparisons that temporal fusion is measured against, fed the same arrival stream.

- `instances`: every request is its own batch-1 generation, all concurrently: one thread
  each with its own engine and KV cache over the shared weights (and, on a GPU, its own
  CUDA stream). The original Flover's "concurrent model instances".
- `dynamic`: dynamic batching. The oldest waiting request opens a window of `batch_window`
  ms; when it closes (or the batch is full) the waiting requests run as one static batch
  to the longest one's end, and return together. Later arrivals wait for the next batch.
(`fused` and `serial` are in driver.py; `serial` is the fused driver over one slot.)
"""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext

import torch

from flover.engine import Engine
from flover.run.context import RunContext, mark_arrived, mark_finished
from flover.run.ini import RunConfig
from flover.run.timeline import Record, RunState
from flover.run.workload import WorkItem


def run_instances(ctx: RunContext, items: list[WorkItem], state: RunState) -> None:
    cfg, recs = ctx.cfg, {r.request_id: r for r in state.records}
    running, errors = [0], []
    t0 = state.start()

    def one(it: WorkItem, rec: Record) -> None:
        try:
            dev = next(ctx.model.parameters()).device
            with torch.cuda.stream(torch.cuda.Stream(dev)) if dev.type == "cuda" else nullcontext():
                eng = ctx.engine(1)
                req = eng.add_request(it.request_id, it.prompt_ids,
                                      cfg.sampling_params(it.max_tokens, it.seed),
                                      arrival_time=t0 + it.arrival)
                while eng.has_unfinished():
                    outs = eng.step()
                    with state.lock:
                        state.iterations += 1
                    if rec.admit is None:
                        rec.admit, rec.status = state.rel(req.admit_time), "running"
                    for out in outs:
                        rec.tokens, rec.text = len(out.token_ids), out.text
                        if rec.first_token is None:
                            rec.first_token = state.rel(req.first_token_time)
                    state.sample(running[0])
            with state.lock:
                running[0] -= 1
                state.slots_used = running[0]
            mark_finished(state, rec, state.rel(req.finish_time))
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = []
    for it in sorted(items, key=lambda it: it.arrival):
        time.sleep(max(0.0, it.arrival - state.now()))
        if errors:
            break
        rec = recs[it.request_id]
        mark_arrived(state, rec, "running")
        with state.lock:
            running[0] += 1
            state.slots_used = running[0]
        th = threading.Thread(target=one, args=(it, rec), name=f"flover-{it.request_id}", daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


def run_dynamic(engine: Engine, items: list[WorkItem], cfg: RunConfig, state: RunState) -> None:
    recs = {r.request_id: r for r in state.records}
    pending = sorted(items, key=lambda it: it.arrival)
    queue: list[WorkItem] = []
    window, cap = cfg.batch_window / 1000.0, engine.slots.num_slots
    t0 = state.start()
    clock = state.now  # under tensor parallelism rank 0 alone runs this; the others follow

    def take_arrivals() -> None:
        arrived = clock()
        while pending and pending[0].arrival <= arrived:
            it = pending.pop(0)
            queue.append(it)
            mark_arrived(state, recs[it.request_id])

    while pending or queue:
        take_arrivals()
        now = clock()
        if not queue:
            time.sleep(max(0.0, pending[0].arrival - now))
            continue
        deadline = queue[0].arrival + window
        if len(queue) < cap and now < deadline:
            wake = min(deadline, pending[0].arrival) if pending else deadline
            time.sleep(max(0.0, wake - now))
            continue
        batch, queue[:] = queue[:cap], queue[cap:]
        longest = max(it.max_tokens for it in batch)
        reqs = {it.request_id: engine.add_request(
            it.request_id, it.prompt_ids, cfg.sampling_params(longest, it.seed),
            arrival_time=t0 + it.arrival) for it in batch}
        own = {it.request_id: it.max_tokens for it in batch}
        state.log(f"static batch of {len(batch)}: {', '.join(reqs)}")
        while engine.has_unfinished():
            outs = engine.step()
            for out in outs:
                rec, req = recs[out.request_id], reqs[out.request_id]
                if rec.admit is None:
                    rec.admit, rec.status = state.rel(req.admit_time), "running"
                    rec.first_token = state.rel(req.first_token_time)
                if len(out.token_ids) <= own[out.request_id]:  # the rest is padding
                    rec.tokens, rec.text = len(out.token_ids), out.text
            state.iterations += 1
            state.slots_used = engine.slots.size
            state.sample(len(outs))
            take_arrivals()
        end = state.now()
        for rid in reqs:
            mark_finished(state, recs[rid], end)

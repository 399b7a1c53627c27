"""Replays a workload's arrival stream against the wall clock, in one of the four modes.

A request is handed over when its arrival time has passed; when nothing is in flight the
driver sleeps until the next arrival. `fused` feeds every arrival to one engine (temporal
fusion); `serial` does the same with an engine of one slot, so requests run one after
another; `instances` and `dynamic` live in baselines.py. All modes share one loaded model
(`context.RunContext`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace

from flover.engine import Engine
from flover.engine.sequence import Request
from flover.run import baselines
from flover.run.context import RunContext, mark_arrived, mark_finished
from flover.run.ini import RunConfig
from flover.run.timeline import RunState
from flover.run.workload import WorkItem


def measure_lone(ctx: RunContext, item: WorkItem) -> dict:
    """One request alone, `request_output_len` tokens (EOS ignored): the yardstick of the
    report's latency ratio. It also warms the model up before the timed run."""
    cfg = ctx.cfg
    eng = ctx.engine(2)
    params = replace(cfg.sampling_params(cfg.request_output_len, item.seed), ignore_eos=True)
    # first calls pay for allocations and kernel compiles: a decode-only iteration, then one
    # that mixes a new prompt with a decoding request, as a fused run does
    warm = replace(params, max_tokens=min(4, params.max_tokens))
    eng.add_request("warm-up", item.prompt_ids, warm)
    eng.step()
    eng.step()
    eng.add_request("warm-up-2", item.prompt_ids, warm)
    for _ in eng.run_until_done():
        pass
    start = time.perf_counter()
    req = eng.add_request("lone", item.prompt_ids, params, arrival_time=start)
    for _ in eng.run_until_done():
        pass
    eng.close()
    n = len(req.output_ids)
    return {"latency": req.finish_time - start, "ttft": req.first_token_time - start,
            "tpot": (req.finish_time - req.first_token_time) / (n - 1) if n > 1 else 0.0,
            "tokens": n, "prompt_len": len(item.prompt_ids)}


def run_workload(ctx: RunContext, items: list[WorkItem], state: RunState) -> None:
    mode = ctx.cfg.mode
    try:
        if mode == "instances":
            baselines.run_instances(ctx, items, state)
            return
        engine = ctx.engine(workload_slots(ctx.cfg))
        try:
            run = baselines.run_dynamic if mode == "dynamic" else run_engine
            run(engine, items, ctx.cfg, state)
        finally:
            engine.close()  # tensor parallelism: the other ranks' follow() returns
    finally:
        state.done = True


def workload_slots(cfg: RunConfig) -> int:
    return 1 if cfg.mode == "serial" else cfg.max_concurrency


def follow_run(ctx: RunContext) -> None:
    """A tensor-parallel rank other than 0: build the engines rank 0 builds, in its order
    (`measure_lone`'s, then `run_workload`'s), and run the forwards of each as it sends them."""
    ctx.engine(2).follow()
    ctx.engine(workload_slots(ctx.cfg)).follow()


def run_engine(engine: Engine, items: list[WorkItem], cfg: RunConfig, state: RunState) -> None:
    """Temporal fusion: every arrived request joins the engine's in-flight batch."""
    pending = deque(sorted(items, key=lambda it: it.arrival))
    recs = {r.request_id: r for r in state.records}
    live: dict[str, Request] = {}
    t0 = state.start()
    now = state.now  # under tensor parallelism rank 0 alone runs this; the others follow
    while pending or engine.has_unfinished():
        arrived = now()
        while pending and pending[0].arrival <= arrived:
            it = pending.popleft()
            live[it.request_id] = engine.add_request(
                it.request_id, it.prompt_ids, cfg.sampling_params(it.max_tokens, it.seed),
                arrival_time=t0 + it.arrival)
            mark_arrived(state, recs[it.request_id])
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[0].arrival - state.now()))
            continue
        outs = engine.step()
        for rid, req in live.items():
            rec = recs[rid]
            if rec.status == "waiting" and req.admit_time is not None:
                rec.admit, rec.status = state.rel(req.admit_time), "running"
        for out in outs:
            rec, req = recs[out.request_id], live[out.request_id]
            rec.tokens, rec.text = len(out.token_ids), out.text
            if rec.first_token is None:
                rec.first_token = state.rel(req.first_token_time)
            if out.finished:
                del live[out.request_id]
                mark_finished(state, rec, state.rel(req.finish_time))
        state.iterations = engine.scheduler.iterations
        state.slots_used, state.shuffle_moves = engine.slots.size, engine.slots.moves
        state.sample(len(outs))

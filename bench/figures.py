"""The original Flover's end-to-end figures (DESIGN.md section 4), replayed with `flover run`'s
machinery on one device: each model is loaded once and reused by every run.

Figures (each a list of runs; one run = one `flover run` with `--set` overrides):
  constant  1, 2, 4, 8, 16, 32 requests at a constant interval: total time, tokens/s, mean
            latency over a lone request's; fused against dynamic, instances and serial
  poisson   32 requests, Poisson arrivals, across mean intervals
  shuffle   32 requests, random lengths (uniform up to 512 ... 2040), with and without the
            memory shuffle (fewer slots than requests, so a slot freed mid-block matters)
  memory    32 and 64 requests at 0 / 100 / 500 ms, fixed and random lengths, peak memory
  headline  32 requests 500 ms apart, 504 tokens each (the original's llama_13b config, fixed
            lengths): the targets' point

How a run differs from `flover run` (and why): engines are built and warmed before the timed
run (every decode CUDA graph captured, Triton kernels compiled) and reused by later runs of
the same shape; `instances` gets one such warmed 1-slot engine per request, handed out when the
request arrives (stock `flover run` builds it inside the request's thread, so a graph capture
would sit inside the timed run). A run past its cap stops and is reported as "> cap". The lone
request (the latency yardstick) is measured once per model, output length and slot length.

    python3 bench/figures.py --out DIR                                # all figures, GPU
    python3 bench/figures.py --model tiny_llama --device cpu --quick  # CPU smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import torch

from flover.config import SamplingParams
from flover.run import report
from flover.run.context import RunContext, new_state
from flover.run.driver import measure_lone, run_workload
from flover.run.ini import load_config
from flover.run.workload import build_workload

MODES = ("fused", "dynamic", "instances", "serial")


class CapExceeded(RuntimeError):
    """A run went past its time cap; the engines it used are dropped."""


class BenchContext(RunContext):
    """A RunContext whose engines are warmed before the timed run and reused across runs."""

    def __init__(self, cfg, model, tokenizer) -> None:
        super().__init__(cfg, model, tokenizer)
        self.pool: dict[tuple, object] = {}  # (slots, max_seq_len, shuffle) -> warmed Engine
        self.spares: list = []  # warmed 1-slot engines for `instances`, one per request
        self.lent: list = []
        self.lock = threading.Lock()
        self.deadline = math.inf

    def key(self, slots: int) -> tuple:
        return slots, self.cfg.max_seq_len, self.cfg.use_mem_shuffle

    def build(self, slots: int):
        eng = RunContext.engine(self, slots)
        warm(eng, slots)
        step = eng.step

        def guarded():  # the run's time cap, checked every iteration
            if time.perf_counter() > self.deadline:
                raise CapExceeded
            return step()

        eng.step = guarded
        return eng

    def engine(self, slots: int):
        if self.cfg.mode == "instances" and slots == 1:
            with self.lock:
                eng = self.spares.pop() if self.spares else None
                if eng is None:
                    print("  (instances: no warmed engine left, building one in the run)", flush=True)
                    eng = self.build(1)
                self.lent.append(eng)
            return reset(eng)
        k = self.key(slots)
        if k not in self.pool:
            self.pool[k] = self.build(slots)
        return reset(self.pool[k])

    def prepare(self, cfg, n_requests: int) -> None:
        """Keep only the engines this run uses (peak memory counts what is alive), build them."""
        self.cfg = cfg
        slots = {"fused": cfg.max_concurrency, "dynamic": cfg.max_concurrency, "serial": 1}
        need = self.key(slots[cfg.mode]) if cfg.mode in slots else None
        for k in [k for k in self.pool if k != need]:
            del self.pool[k]
        if cfg.mode == "instances":
            if self.spares and self.spares[0].config.max_seq_len != cfg.max_seq_len:
                self.spares.clear()
            while len(self.spares) < n_requests:
                self.spares.append(self.build(1))
        else:
            self.spares.clear()
        free_memory()
        if need is not None:
            self.engine(need[0])

    def after(self, capped: bool) -> None:
        if capped:  # engines with requests left in them: drop them all
            self.pool.clear()
            self.spares.clear()
        else:
            self.spares.extend(self.lent)
        self.lent = []
        free_memory()


def reset(eng):
    assert not eng.has_unfinished(), "an engine was handed out with requests in it"
    eng.scheduler.iterations = 0
    eng.slots.moves = eng.slots.tokens_moved = 0
    return eng


def warm(eng, slots: int) -> None:
    """A burst of `slots` requests of decreasing lengths: the live block shrinks through every
    size, so every decode graph bucket is captured; prefill and sampling kernels compile."""
    vocab = eng.model.cfg.vocab_size
    for i in range(slots):
        n = min(slots - i + 1, eng.config.max_seq_len - 9)
        eng.add_request(f"warm{i}", [(7 * i + 3) % vocab] * 8,
                        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    for _ in eng.run_until_done():
        pass


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# --- the figures ------------------------------------------------------------------------------

def figure_runs(name: str, q: bool, tokens: int) -> list[dict]:
    """Each run: its label, the point on the x axis, mode, overrides, cap in seconds."""
    t = tokens
    runs = []

    def add(point, mode, sets, cap, **extra):
        runs.append({"figure": name, "point": point, "mode": mode, "sets": sets, "cap_s": cap,
                     **extra})

    if name == "constant":
        ns = [1, 2, 4] if q else [1, 2, 4, 8, 16, 32]
        few = [1, 4] if q else [1, 4, 16, 32]
        for mode in MODES:
            for n in ns if mode in ("fused", "dynamic") else few:
                add(n, mode, [f"request.num_requests={n}", "runtime_hyperparameter.interval=100",
                              f"request.request_output_len={t}"], 45)
    elif name == "poisson":
        per_mode = ({"fused": [0, 20], "dynamic": [20], "instances": [20], "serial": [20]} if q else
                    {"fused": [20, 50, 100, 200, 500, 1000], "dynamic": [20, 100, 500],
                     "instances": [20, 500], "serial": [20]})
        n = 4 if q else 32
        for mode in MODES:
            for ms in per_mode[mode]:
                add(ms, mode, [f"request.num_requests={n}", "runtime_hyperparameter.arrival=poisson",
                               f"runtime_hyperparameter.interval={ms}",
                               f"request.request_output_len={t}"], 45)
    elif name == "shuffle":
        lengths = [24, 48] if q else [512, 1024, 1536, 2040]
        n, slots = (6, 3) if q else (32, 16)
        for shuffle in (1, 0):
            for L in lengths:
                msl = min(2048, L + 64)
                add(L, "fused", [f"request.num_requests={n}",
                                 f"model_specification.max_concurrency={slots}",
                                 f"model_specification.max_seq_len={msl}",
                                 "runtime_hyperparameter.interval=0",
                                 "runtime_hyperparameter.use_mem_shuffle=1",
                                 f"request.request_output_len={L}"],
                    90, shuffle=bool(shuffle), lone=False)
    elif name in ("memory", "memory_fixed", "memory_random"):
        ns = [4, 8] if q else [32, 64]
        gaps = [0, 100] if q else [0, 100, 500]
        kinds = {"memory": (0, 1), "memory_fixed": (0,), "memory_random": (1,)}[name]
        for mode in ("fused", "instances"):
            for rnd in kinds:
                for n in ns:
                    for ms in gaps:
                        if mode == "instances" and (rnd or ms > 100 or (ms == 100 and n > ns[0])):
                            continue  # instances: fixed lengths, 0 ms both sizes, 100 ms the smaller
                        add(f"{n}@{ms}{'r' if rnd else 'f'}", mode, [
                            f"request.num_requests={n}", f"model_specification.max_concurrency={n}",
                            f"runtime_hyperparameter.interval={ms}", f"request.request_output_len={t}",
                            f"runtime_hyperparameter.use_mem_shuffle={rnd}"], 60,
                            requests=n, interval_ms=ms, random_lengths=bool(rnd))
    elif name == "headline":
        n, ms, L = (4, 50, 24) if q else (32, 500, 504)
        caps = {"fused": 60, "dynamic": 90, "instances": 240, "serial": 150}
        for mode in MODES:
            add(f"{n}x{L}@{ms}", mode, [f"request.num_requests={n}", f"runtime_hyperparameter.interval={ms}",
                                        f"request.request_output_len={L}"], 20 if q else caps[mode],
                keep_timeline=True)
    else:
        raise SystemExit(f"unknown figure {name!r}")
    return runs


def run_one(ctx: BenchContext, base: list[str], spec: dict, lones: dict, budget_end: float) -> dict:
    mode = spec["mode"]
    cfg = load_config(None, [*base, *spec["sets"], f"runtime_hyperparameter.mode={mode}"])
    items = build_workload(cfg, ctx.tokenizer, ctx.model.cfg.vocab_size)
    if not spec.get("shuffle", True):  # the same random lengths, no compaction
        cfg = dataclasses.replace(cfg, use_mem_shuffle=False)
    out = {k: v for k, v in spec.items()}
    if time.perf_counter() > budget_end:
        out["skipped"] = "time budget"
        return out
    t_setup = time.perf_counter()
    lone = None
    if spec.get("lone", True):
        key = (cfg.request_output_len, cfg.max_seq_len)
        if key not in lones:
            ctx.prepare(dataclasses.replace(cfg, mode="serial", use_mem_shuffle=False), 1)
            lones[key] = measure_lone(ctx, items[0])
        lone = lones[key]
    ctx.prepare(cfg, len(items))
    device = next(ctx.model.parameters()).device
    report.reset_peak_memory(device)
    state = new_state(cfg, items)
    state.lone = lone
    cap = spec["cap_s"]  # the budget only decides whether a run starts
    t0 = time.perf_counter()
    ctx.deadline = t0 + cap
    capped = False
    try:
        run_workload(ctx, items, state)
    except CapExceeded:
        capped = True
    ctx.deadline = math.inf
    if device.type == "cuda":
        torch.cuda.synchronize()
    m = report.summarize(state, device)
    ctx.after(capped)
    out.update(metrics=m, capped=capped, cap_used_s=cap, run_wall_s=time.perf_counter() - t0,
               setup_s=t0 - t_setup, max_in_flight=max((n for _, n in state.samples), default=0))
    reqs = report.to_json(state, cfg, m)["requests"]
    out["requests"] = [{k: r[k] for k in ("request_id", "max_tokens", "output_tokens", "arrival_s",
                                           "admit_s", "first_token_s", "finish_s")} for r in reqs]
    if spec.get("keep_timeline"):
        s = state.samples
        step = max(1, len(s) // 600)
        out["in_flight"] = [[round(t, 4), n] for t, n in s[::step]]
    return out


def fmt_run(r: dict) -> str:
    if "skipped" in r:
        return f"{r['figure']:9s} {str(r['point']):>9s} {r['mode']:9s} skipped ({r['skipped']})"
    m = r["metrics"]
    tot = f">{r['cap_used_s']:.0f}s cap" if r["capped"] else f"{m['total_time_s']:.2f}"
    shuf = "" if "shuffle" not in r else (" shuffle" if r["shuffle"] else " no-shuffle")
    lol = m["latency_over_lone"]
    return (f"{r['figure']:9s} {str(r['point']):>9s} {r['mode'] + shuf:19s} {tot:>10s} "
            f"{(m['tokens_per_s'] or 0):9.1f} {(m['mean_latency_s'] or 0):8.3f} "
            f"{(f'{lol:.3f}' if lol is not None else '-'):>7s} {m['finished']:3d}/{m['requests']:<3d} "
            f"{m['iterations']:6d} {m['shuffle_moves']:5d} {m['peak_memory_bytes'] / 2**30:7.2f} "
            f"{r['max_in_flight']:4d}")


HEADER = (f"{'figure':9s} {'point':>9s} {'mode':19s} {'total s':>10s} {'tok/s':>9s} {'mean lat':>8s} "
          f"{'lat/lone':>7s} {'done':>7s} {'iters':>6s} {'moves':>5s} {'peakGiB':>7s} {'infl':>4s}")


def ratios(runs: list[dict]) -> list[str]:
    """Per point: fused total time against each baseline's (a capped baseline: 'more than')."""
    lines = []
    by = {}
    for r in runs:
        if "metrics" in r:
            mode = r["mode"] + ("" if r.get("shuffle", True) else "-noshuffle")
            by.setdefault(str(r["point"]), {})[mode] = r
    for p, modes in by.items():
        f = modes.get("fused")
        if not f or f["capped"]:
            continue
        ft = f["metrics"]["total_time_s"]
        parts = []
        for k, r in modes.items():
            if k == "fused":
                continue
            t = r["cap_used_s"] if r["capped"] else r["metrics"]["total_time_s"]
            parts.append(f"{k} {'>' if r['capped'] else ''}{t / ft:.2f}x")
        if parts:
            lines.append(f"  point {p}: fused {ft:.2f} s; baseline/fused total time: " + ", ".join(parts))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_7b", help="model of every figure but the headline")
    ap.add_argument("--headline-model", default="llama_13b")
    ap.add_argument("--figures", default="constant,poisson,memory_random,shuffle",
                    help="comma-separated; FIGURE:P1+P2 runs only those points of it")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--tokens", type=int, default=128, help="output length of the sweeps")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip runs once this much time passed")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()
    t_start = time.perf_counter()
    budget_end = t_start + args.budget_s
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    tokens = 16 if args.quick else args.tokens
    if args.device == "cpu" and args.dtype == "fp16":
        args.dtype = "fp32"
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    meta = {"card": card, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "commit": os.environ.get("FLOVER_COMMIT", ""), "command": " ".join(sys.argv),
            "dtype": args.dtype, "quick": args.quick}
    print(f"{card}, torch {torch.__version__}, commit {meta['commit'] or '?'}", flush=True)

    plan: dict[str, list[str]] = {}
    for f in args.figures.split(","):
        name = f.split(":")[0]
        plan.setdefault(args.headline_model if name == "headline" else args.model, []).append(f)
    results: dict[str, dict] = {}
    for model_name, figs in plan.items():
        base = [f"model_specification.model_type={model_name}",
                f"model_specification.data_type={args.dtype}",
                f"model_specification.device={args.device}", "model_specification.max_seq_len=512",
                "model_specification.fixed_input_len=8", "runtime_hyperparameter.top_k=1"]
        t = time.perf_counter()
        loaded = RunContext.load(load_config(None, base))
        ctx = BenchContext(loaded.cfg, loaded.model, loaded.tokenizer)
        print(f"loaded {model_name} ({args.dtype}) in {time.perf_counter() - t:.1f} s", flush=True)
        lones: dict = {}
        for fig in figs:
            fig, _, only = fig.partition(":")
            runs = [r for r in figure_runs(fig, args.quick, tokens)
                    if not only or str(r["point"]) in only.split("+")]
            res = results[fig] = {**meta, "figure": fig, "model": model_name, "runs": []}
            print(f"\n== {fig} ({model_name}): {len(runs)} runs ==\n{HEADER}", flush=True)
            for spec in runs:
                r = run_one(ctx, base, spec, lones, budget_end)
                res["runs"].append(r)
                res["lone"] = {f"{k[0]}@{k[1]}": v for k, v in lones.items()}
                print(fmt_run(r), flush=True)
                (outdir / f"fig_{fig}.json").write_text(json.dumps(res, indent=1) + "\n")
            ctx.pool.clear()
            ctx.spares.clear()
            free_memory()
        del ctx, loaded
        free_memory()

    print(f"\n==== summary: {card}, {args.dtype}, {time.perf_counter() - t_start:.0f} s in all ====")
    for fig, res in results.items():
        print(f"\n{fig} ({res['model']}); lone: " + ", ".join(
            f"{k}: {v['latency']:.3f} s ({v['tpot'] * 1e3:.2f} ms/token)"
            for k, v in res.get("lone", {}).items()))
        print(HEADER)
        for r in res["runs"]:
            print(fmt_run(r))
        for line in ratios(res["runs"]):
            print(line)


if __name__ == "__main__":
    main()

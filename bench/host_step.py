"""Host time per engine step as outputs grow: 32 rows decoding 2,000 tokens each, on the CPU.

What is measured: the wall-clock time of `engine.step()`, median over steps 1-50 ("early")
and over the last 51 steps, 1950-2000 at the default length ("late"). Work that does not
depend on the output length costs the same early and late; what grows between the two is
per-step work that scans each row's whole output (re-decoding it for the new text and stop
strings, rebuilding penalty counts from the token lists).

The model is a 1-layer LLaMA with hidden size 16 and the embedded model's vocabulary (49,152),
random weights, float32 on the CPU, with the embedded model's tokenizer (SmolLM2, byte-level
BPE), so detokenization does real work on real token ids. Two modes:

  model  the tiny model's forward runs (an LM head of 32 x 16 x 49,152, ~25 MFLOP, and
         attention over up to 2,000 positions with head size 8); everything is real.
  stub   the model's forward and LM head are replaced by precomputed random logits (one clone
         of [rows, 49,152] per step): no model math is left, only the engine.

Sampling is not stubbed: it is the engine's own work (and being rewritten too), but on this CPU
it is tensor math over 32 x 49,152 logits per step (the 5c5356d sampler sorts every row: ~50-150
ms on 2 cores, noisy), which a GPU would do, and it does not grow with the output. So the table
also splits each step: "outside runner.run" is the step minus the time inside
`engine.runner.run` (forward, penalties, sampling), i.e. scheduling, bookkeeping and building
the outputs (detokenization, stop strings): pure host work, and the part of it that grows with
the output. Penalty counting sits inside runner.run in 5c5356d; its growth shows in the step
columns of the stop+pen variant. "n/a" where an engine has no `runner.run`.

Each is given in wall-clock time and in CPU time of the stepping thread (`time.thread_time`).
Wall clock is what a user waits, but on a shared machine (this 2-core one often is: see "load",
the 1-minute load average) it wanders by 2x. The thread's CPU time holds still: all of the
single-threaded Python work and the main thread's share of torch's (with --threads 1, all of
the step). Compare CPU columns across runs; compare wall columns only at a load below the core
count.

Two request variants, both `temperature=1.0, seed=i, ignore_eos=True, max_tokens=--tokens`:
  plain      nothing else;
  stop+pen   plus stop=["\\n\\n\\n\\n"], repetition_penalty=1.1, presence_penalty=0.5.
A row can end early only if its sampled text holds "\\n\\n\\n\\n" (one token of the 49,152 does);
"rows late" is how many rows were still running in the late window.

Works against the current tree and against the flat layout of commit 5c5356d (it touches only
the public API, `flover.models`, `flover.weights`, `flover.tokenizer` and `engine.runner`).
At 2,000 tokens the 5c5356d engine needs ~3-10 minutes per (variant, mode) on 2 cores:

    python bench/host_step.py --out host_step.json
    python bench/host_step.py --tokens 300 --modes stub      # a quick look
    cd /tmp/old && PYTHONPATH=/tmp/old python /path/to/bench/host_step.py   # another checkout
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import math
import os
import platform
import pstats
import statistics
import subprocess
import time
from pathlib import Path

import torch

import flover
from flover import Engine, EngineConfig, SamplingParams
from flover.models import ModelConfig
from flover.models.layers import init_random
from flover.tokenizer import Tokenizer
from flover.weights import allocate, convert_gguf, default_model_path, hf_config

try:  # moved between layouts; both import it into flover.weights
    from flover.weights import pack_linears
except ImportError:  # pragma: no cover - a layout without packed CPU linears
    pack_linears = None

ROWS = 32
VOCAB = 49152
TOPICS = ["a lighthouse keeper", "the history of tea", "a robot learning to paint", "tides",
          "a city under snow", "prime numbers", "an old map", "the first winter on Mars"]


def load_tokenizer() -> Tokenizer:
    path = convert_gguf(default_model_path())
    tok = Tokenizer.from_hf_dir(path, hf_config(path))
    assert tok is not None and tok.vocab_size == VOCAB, "expected the embedded SmolLM2 tokenizer"
    return tok


def tiny_model(max_position: int, seed: int = 0):
    cfg = ModelConfig(arch="llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                      num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                      max_position=max_position, norm_eps=1e-6, bos_token_id=1, eos_token_ids=[2])
    model = allocate(cfg, torch.float32, torch.device("cpu"))
    init_random(model, seed)
    if pack_linears is not None:
        pack_linears(model)  # as load_model does on the CPU in float32
    return model


def stub_forward(model, pool: int = 8, seed: int = 0) -> None:
    """Replace the model's math by precomputed random logits (a clone per step: callers may
    modify logits in place)."""
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(pool, ROWS, VOCAB, generator=g)
    hidden = model.cfg.hidden_size
    calls = [0]

    def forward(ids, *args, **kwargs):
        return torch.zeros(ids.shape[0], hidden)

    def logits(h):
        calls[0] += 1
        n = h.shape[0]
        out = bank[calls[0] % pool, :min(n, ROWS)]
        return (out if n <= ROWS else out.repeat((n + ROWS - 1) // ROWS, 1)[:n]).clone()

    model.forward = forward
    model.logits = logits


def params(variant: str, i: int, tokens: int) -> SamplingParams:
    extra = {}
    if variant == "stop+pen":
        extra = {"stop": ["\n\n\n\n"], "repetition_penalty": 1.1, "presence_penalty": 0.5}
    return SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, ignore_eos=True, **extra)


def run(tok: Tokenizer, variant: str, mode: str, tokens: int, window: int,
        profile: bool) -> dict:
    prompts = [f"Request {i}: write a very long story about {TOPICS[i % len(TOPICS)]}."
               for i in range(ROWS)]
    longest = max(len(tok.encode(p)) for p in prompts)
    max_seq = longest + tokens + 8
    model = tiny_model(max_position=max_seq + 64)
    if mode == "stub":
        stub_forward(model)
    eng = Engine(EngineConfig(device="cpu", dtype="float32", max_concurrency=ROWS,
                              max_seq_len=max_seq, prefill_token_budget=4096, cuda_graphs=False),
                 model=model, tokenizer=tok)
    # time inside runner.run (forward, penalties, sampling) this step: wall clock, thread CPU
    in_runner = [0.0, 0.0]
    inner = getattr(eng.runner, "run", None)
    if inner is not None:
        def timed(*args, **kwargs):
            t, c = time.perf_counter(), time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                in_runner[0] += time.perf_counter() - t
                in_runner[1] += time.thread_time() - c
        eng.runner.run = timed
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params(variant, i, tokens))
    wall, cpu, runner_wall, runner_cpu, rows = [], [], [], [], []
    late_from = max(1, tokens - window)  # step numbers are 1-based: step 1 prefills
    prof = cProfile.Profile() if profile else None
    load = os.getloadavg()[0]
    start = time.perf_counter()
    while eng.has_unfinished():
        if prof is not None and len(wall) + 1 == late_from:
            prof.enable()
        in_runner[:] = [0.0, 0.0]
        t, c = time.perf_counter(), time.thread_time()
        outs = eng.step()
        wall.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
        runner_wall.append(in_runner[0])
        runner_cpu.append(in_runner[1])
        rows.append(len(outs))
        failed = [o for o in outs if o.finish_reason == "error"]
        if failed:  # an engine mid-rewrite: say why instead of timing empty steps
            raise SystemExit(f"{variant}/{mode}: request {failed[0].request_id} failed at step "
                             f"{len(wall)}: {getattr(failed[0], 'error', None)}")
    total = time.perf_counter() - start
    if prof is not None:
        prof.disable()
        print(f"\n--- profile of steps {late_from}-{len(wall)}: {variant}, {mode} ---")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    early, late = slice(0, window), slice(late_from - 1, len(wall))
    seen = inner is not None

    def ms(xs: list[float], part: slice) -> float:
        return round(1e3 * statistics.median(xs[part]), 3) if xs[part] else math.nan

    out = {"variant": variant, "mode": mode, "steps": len(wall), "total_s": round(total, 2),
           "early_steps": [1, min(window, len(wall))], "late_steps": [late_from, len(wall)],
           "early_ms": ms(wall, early), "late_ms": ms(wall, late),
           "early_cpu_ms": ms(cpu, early), "late_cpu_ms": ms(cpu, late),
           "early_rows": min(rows[1:window], default=rows[0]), "late_rows": min(rows[late], default=0),
           "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}
    for name, steps, inside in [("outside_runner", wall, runner_wall),
                                ("outside_runner_cpu", cpu, runner_cpu)]:
        rest = [x - y for x, y in zip(steps, inside, strict=True)]
        out[f"early_{name}_ms"] = ms(rest, early) if seen else None
        out[f"late_{name}_ms"] = ms(rest, late) if seen else None
    return out


def source() -> dict:
    """Which flover ran: its folder and commit (and whether that checkout has changes)."""
    folder = Path(flover.__file__).resolve().parent.parent
    info = {"flover": str(Path(flover.__file__).resolve())}
    try:
        git = ["git", "-C", str(folder)]
        info["commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True,
                                        text=True, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "flover"], capture_output=True,
                               text=True, check=True).stdout.strip()
        info["dirty"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000, help="output tokens per row (steps)")
    ap.add_argument("--window", type=int, default=50, help="steps in the early window; the late "
                    "window is the last window + 1 steps")
    ap.add_argument("--variants", default="plain,stop+pen")
    ap.add_argument("--modes", default="stub,model")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile the late window (its overhead inflates the times)")
    ap.add_argument("--out", help="write the results as JSON to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tokens <= args.window:
        ap.error(f"--tokens must exceed --window={args.window}")
    tok = load_tokenizer()
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "rows": ROWS, "tokens": args.tokens, "window": args.window, "profiled": args.profile,
            **source()}
    print(f"flover: {meta['flover']}  commit {meta.get('commit', '?')[:10]}"
          f"{' (with changes)' if meta.get('dirty') else ''}  threads {meta['threads']}")
    results = []
    print(f"{'':<17} {'step, median ms':^30}   {'outside runner.run, median ms':^30}")
    print(f"{'':<17} {'wall early':>10} {'late':>6} {'cpu early':>9} {'late':>6}   "
          f"{'wall early':>10} {'late':>6} {'cpu early':>9} {'late':>6}   "
          f"{'rows late':>9} {'total s':>7} {'load':>5}")

    def num(x: float | None, width: int) -> str:
        return f"{'n/a' if x is None else f'{x:.2f}':>{width}}"

    for variant in args.variants.split(","):
        for mode in args.modes.split(","):
            r = run(tok, variant, mode, args.tokens, args.window, args.profile)
            results.append(r)
            print(f"{r['variant']:<10} {r['mode']:<6} {num(r['early_ms'], 10)} {num(r['late_ms'], 6)} "
                  f"{num(r['early_cpu_ms'], 9)} {num(r['late_cpu_ms'], 6)}   "
                  f"{num(r['early_outside_runner_ms'], 10)} {num(r['late_outside_runner_ms'], 6)} "
                  f"{num(r['early_outside_runner_cpu_ms'], 9)} {num(r['late_outside_runner_cpu_ms'], 6)}"
                  f"   {r['late_rows']:>9} {r['total_s']:>7.1f} {r['load_after']:>5.1f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Before/after in one process: the packed embedded model's decode step with
  before: quant_cpu.c of 7b16966 and no compiled CPU ops (fused.ENABLED = False)
  after:  this tree's quant_cpu.c and fused_cpu.c
alternating rounds; min and median step time per (variant, B)."""
import argparse, ctypes, os, statistics, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from flover import Engine, EngineConfig, SamplingParams
from flover.ops import fused, quant_cpu

PROMPT = list(range(1000, 1032))
ap = argparse.ArgumentParser()
ap.add_argument("--old", required=True, help="the old quant_cpu.c")
ap.add_argument("--batches", default="1,8")
ap.add_argument("--rounds", type=int, default=4)
ap.add_argument("--steps", type=int, default=16)
args = ap.parse_args()
new_so = quant_cpu.lib()
old_so = quant_cpu.load(Path(args.old))
for so in (old_so,):
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    so.flover_int4_mm.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, ptr, ctypes.c_int]
    so.flover_int8_mm.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, ptr, ctypes.c_int]
variants = {"before": (old_so, False), "after": (new_so, True)}
eng = Engine(EngineConfig(device="cpu", dtype="float32", max_concurrency=8, max_seq_len=128))
n = [0]
def steps(b):
    for i in range(b):
        n[0] += 1
        eng.add_request(f"r{n[0]}", PROMPT, SamplingParams(max_tokens=args.steps + 8, temperature=0.0, ignore_eos=True))
    for _ in range(4): eng.step()
    ts = []
    for _ in range(args.steps):
        t = time.perf_counter(); eng.step(); ts.append(time.perf_counter() - t)
    while eng.has_unfinished(): eng.step()
    return ts
res = {}
batches = [int(b) for b in args.batches.split(",")]
for r in range(args.rounds):
    for b in batches:
        for name, (so, on) in variants.items():
            quant_cpu.lib = lambda so=so: so
            fused.ENABLED = on
            res.setdefault((name, b), []).extend(steps(b))
load = os.getloadavg()
print(f"threads {torch.get_num_threads()}, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, "
      f"{args.rounds} alternating rounds x {args.steps} steps")
print(f"{'variant':>7} {'B':>2} {'min ms':>7} {'med ms':>7} {'tok/s (med)':>11}")
for b in batches:
    for name in variants:
        v = res[(name, b)]
        print(f"{name:>7} {b:>2} {min(v)*1e3:7.2f} {statistics.median(v)*1e3:7.2f} {b/statistics.median(v):11.1f}")

"""A/B of two versions of the CPU kernels' C sources in the decode step of the embedded model
kept packed, alternating in one process: each directory holds quant_cpu.c, fused_cpu.c,
layer_cpu.c and vec16.h (missing files are taken from the tree), built like the shipped ones
and swapped in for quant_cpu.lib, fused_cpu.lib and layer_cpu.lib.

    python docs/perf/2026-12-08-session13/ab_step_kernels.py /tmp/before /tmp/after --rounds 3
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "bench"))
from cpu_step import flover_step  # noqa: E402

from flover import Engine, EngineConfig  # noqa: E402
from flover.ops import fused_cpu, layer_cpu, quant_cpu  # noqa: E402

FILES = ("quant_cpu.c", "fused_cpu.c", "layer_cpu.c", "vec16.h")


def libs(d: Path) -> dict:
    """Each module's library built from d's sources, bound like the shipped one."""
    ops = ROOT / "flover" / "ops"
    for f in FILES:
        if not (d / f).exists():
            shutil.copy(ops / f, d / f)
    return {mod: mod.bind(quant_cpu.load(d / mod.SOURCE.name))
            for mod in (quant_cpu, fused_cpu, layer_cpu)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    versions = {d.name: libs(d) for d in args.dirs}
    eng = Engine(EngineConfig(device="cpu", dtype="float32", max_concurrency=8, max_seq_len=128))
    times: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.rounds):
        for b in map(int, args.batches.split(",")):
            for name, ls in versions.items():
                for mod, so in ls.items():
                    mod.lib = lambda so=so: so
                times.setdefault((b, name), []).append(flover_step(eng, b, args.steps) * 1e3)
    print("batch  version  ms/step (median)  rounds")
    for (b, name), ts in times.items():
        print(f"{b:5d} {name:>10} {statistics.median(ts):10.2f}  {' '.join(f'{t:.2f}' for t in ts)}")


if __name__ == "__main__":
    main()

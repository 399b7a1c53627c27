"""A/B of software prefetch distances in quant_cpu.c's streaming tiles (M < 8), in the decode
step of the embedded model kept packed, alternating variants in one process.

    python docs/perf/2026-12-08-session13/ab_prefetch.py --dists 0,256,512,1024 --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "bench"))
from cpu_step import flover_step  # noqa: E402

from flover import Engine, EngineConfig  # noqa: E402
from flover.ops import quant_cpu  # noqa: E402

# the streaming tile's block loop as it was at commit 8d6db9c (this A/B's "before")
ANCHOR = ("            for (int64_t b = 0; b < nb; b++) {"
          "                                          \\\n                if (INTERLEAVE)")


def variant(dist: int, tmp: Path):
    src = quant_cpu.SOURCE.read_text()
    assert ANCHOR in src
    line = ("                if (!(INTERLEAVE) && PF) __builtin_prefetch((const char *)qs + "
            "((n + c0) * nb + b) * bstep + PF); \\\n")
    tail = "                if (INTERLEAVE)"
    src = src.replace(ANCHOR, ANCHOR.replace(tail, line + tail))
    src = src.replace("#define TM 8", f"#define TM 8\n#define PF {dist}")
    d = tmp / f"pf{dist}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "quant_cpu.c").write_text(src)
    (d / "vec16.h").write_text((quant_cpu.SOURCE.parent / "vec16.h").read_text())
    return quant_cpu.bind(quant_cpu.load(d / "quant_cpu.c"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dists", default="0,256,512,1024")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--tmp", default="/tmp/flover-pf")
    args = ap.parse_args()
    libs = {d: variant(d, Path(args.tmp)) for d in map(int, args.dists.split(","))}
    eng = Engine(EngineConfig(device="cpu", dtype="float32", max_concurrency=8, max_seq_len=128))
    times: dict[tuple[int, int], list[float]] = {}
    for _ in range(args.rounds):
        for b in map(int, args.batches.split(",")):
            for d, so in libs.items():
                quant_cpu.lib = lambda so=so: so
                times.setdefault((b, d), []).append(flover_step(eng, b, args.steps) * 1e3)
    print("batch  prefetch  ms/step (median)  rounds")
    for (b, d), ts in times.items():
        print(f"{b:5d} {d:9d} {statistics.median(ts):17.2f}  {' '.join(f'{t:.2f}' for t in ts)}")


if __name__ == "__main__":
    main()

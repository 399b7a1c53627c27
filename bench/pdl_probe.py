"""Does programmatic dependent launch (PDL) overlap kernels, eagerly and in a CUDA graph?

`flover.ops.launch` launches the decode step's Triton kernels with PDL (FLOVER_PDL=1): each
kernel may start while the one before it runs, does what needs none of its results, then
waits (`launch.prior`). docs/PERF.md ("Split-K and PDL") measured it moving the step by
under 0.7% and left open whether the graph capture kept the programmatic edges. This probe
answers it from the device's global timer:

1. `overlap`: kernel A spins for --spin-us on every multiprocessor; kernel B, launched next,
   stamps the time it starts (before its wait) and the time its wait returns. B starting
   before A ends means the launch overlapped; the wait returning after A ends means it was
   held. Eager and graph-captured, PDL on and off.
2. `chain`: --chain tiny kernels in a row, captured in one graph: microseconds per kernel
   with PDL on and off (the launch gap PDL can hide, as the graph replays it).

    python3 bench/pdl_probe.py [--out pdl_probe.json]
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
import triton
import triton.language as tl

from flover.ops import launch


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _spin(T, NS, PDL: tl.constexpr):
    """A: every program busy for NS nanoseconds, T[0] = the latest end."""
    launch.prior(PDL)
    t0 = _now()
    t = t0
    while t - t0 < NS:
        t = _now()
    tl.atomic_max(T, t)


@triton.jit
def _stamp(T, PDL: tl.constexpr):
    """B: T[1] = the earliest start (before the wait), T[2] = the earliest return of the wait."""
    tl.atomic_min(T + 1, _now())
    launch.prior(PDL)
    tl.atomic_min(T + 2, _now())


@triton.jit
def _tiny(X, PDL: tl.constexpr):
    launch.prior(PDL)
    i = tl.arange(0, 128)
    tl.store(X + i, tl.load(X + i) + 1.0)


def overlap(pdl: bool, graph: bool, spin_us: float, sms: int) -> dict:
    big = torch.iinfo(torch.int64).max
    init = torch.tensor([0, big, big], dtype=torch.int64, device="cuda")
    t = init.clone()
    opts = launch.options(pdl)

    def pair():
        t.copy_(init)
        _spin[(sms,)](t, int(spin_us * 1000), PDL=pdl, **opts)
        _stamp[(1,)](t, PDL=pdl, **opts)

    pair()  # compile
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            pair()
        run = g.replay
    else:
        run = pair
    rows = []
    for _ in range(5):
        run()
        torch.cuda.synchronize()
        a_end, b_start, b_wait = t.tolist()
        rows.append((b_start - a_end, b_wait - a_end))
    starts = sorted(r[0] for r in rows)
    waits = sorted(r[1] for r in rows)
    return {"pdl": pdl, "graph": graph, "b_start_minus_a_end_ns": starts[2],
            "b_wait_minus_a_end_ns": waits[2], "overlapped": starts[2] < 0,
            "held": min(waits) >= 0}


def chain(pdl: bool, n: int, iters: int) -> float:
    x = torch.zeros(128, device="cuda")
    opts = launch.options(pdl)

    def run():
        for _ in range(n):
            _tiny[(1,)](x, PDL=pdl, **opts)

    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / n)
    expected = float(n * (iters + 2))
    assert x[0].item() == expected, (x[0].item(), expected)  # every kernel ran, in order
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spin-us", type=float, default=20.0)
    ap.add_argument("--chain", type=int, default=200)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    sms = launch.sm_count(torch.device("cuda"))
    report = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "triton": triton.__version__,
              "cuda": torch.version.cuda, "overlap": [], "chain_us_per_kernel": {}}
    for graph in (False, True):
        for pdl in (False, True):
            r = overlap(pdl, graph, args.spin_us, sms)
            report["overlap"].append(r)
            print(f"overlap graph={graph!s:5} pdl={pdl!s:5}: B starts "
                  f"{r['b_start_minus_a_end_ns'] / 1000:+8.2f} us after A ends, its wait returns "
                  f"{r['b_wait_minus_a_end_ns'] / 1000:+8.2f} us after (overlapped={r['overlapped']},"
                  f" held={r['held']})", flush=True)
    for pdl in (False, True):
        us = chain(pdl, args.chain, args.iters)
        report["chain_us_per_kernel"][str(pdl)] = us
        print(f"chain of {args.chain} tiny kernels in a graph, pdl={pdl!s:5}: {us:.3f} us per kernel",
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

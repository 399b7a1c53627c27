"""The batch-invariant linear kernel against cuBLAS at the decode sizes, and its invariance.

For LLaMA-7B's matrices (and the 13B's) at M rows: the Triton kernel's time (CUDA events,
median) and cuBLAS's (`F.linear`), each as a fraction of the copy bandwidth (weight bytes
over time, against a device-to-device copy measured in the same run); and whether a row's
output is bitwise the same at M = 1 and inside larger M (it must be). `--sweep` times a few
launch configurations too (the default is the one `linear_triton.default_config` names);
`--splits 1,2,3,4` times the kernel with its K cut into each of those numbers of parts beside
the default (`linear_triton.splits`, printed as `auto`), and checks a row's bits with each.
`--tma-sweep` times the pointer form ("tma": False) and the TMA form's launch configurations
beside the default (the TMA form where the device has it). `--fused` times the folded-norm
epilogues (Hopper): qkv's product with the norm as its epilogue against the norm kernel then
the product, and gate_up's with the norm and SiLU * up against norm, product and silu_mul, for
each of `--fused-configs` (JSON list of launch settings; {}: the shipped ones).

    python3 bench/linear.py --out linear.json [--sweep] [--splits 1,2,3,4] [--tma-sweep] [--fused]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch
import torch.nn.functional as F

from flover.ops import fused_triton
from flover.ops.launch import sm_count
from flover.ops.linear_triton import default_config, linear, splits, tma_config

SHAPES = {  # name: (N, K)
    "7b.qkv": (12288, 4096), "7b.o": (4096, 4096), "7b.gate_up": (22016, 4096),
    "7b.down": (4096, 11008), "7b.head": (32000, 4096),
    "13b.qkv": (15360, 5120), "13b.o": (5120, 5120), "13b.gate_up": (27648, 5120),
    "13b.down": (5120, 13824), "13b.head": (32000, 5120),
}


def cycled_weights(n: int, k: int, dtype: torch.dtype):
    """A random [n, k] weight and an endless cycle over it and enough copies, taken in turn,
    that no call finds its weight in L2 (50 MB)."""
    w = torch.randn(n, k, device="cuda").to(dtype)
    return w, itertools.cycle([w] + [w.clone() for _ in range(-(-256 * 2**20 // w.nbytes) - 1)])


def fused_rows(dtypes: str, shapes: str, batches: str, configs: list[dict],
               bw: float) -> list[dict]:
    """Each RMSNorm-fed product (qkv: the norm as epilogue; gate_up: the norm and SiLU * up),
    in each of `configs` ({}: the shipped one), against the kernels it replaces, in CUDA
    graphs, weights cycled past L2."""
    rows = []
    for dname in dtypes.split(","):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dname]
        for shape in [s for s in shapes.split(",") if s.endswith(("qkv", "gate_up"))]:
            n, k = SHAPES[shape]
            gated = shape.endswith("gate_up")
            w, turn = cycled_weights(n, k, dtype)
            ones = torch.ones(k, device="cuda", dtype=dtype)
            for b in [int(x) for x in batches.split(",")]:
                x = torch.randn(b, k, device="cuda").to(dtype)

                def unfused():
                    h, _ = fused_triton.rms_norm(x, ones, 1e-6)  # noqa: B023
                    y = linear(h, next(turn))  # noqa: B023
                    return fused_triton.silu_mul(y) if gated else y  # noqa: B023

                base = timed(unfused)
                for cfg in configs:
                    ms = timed(lambda: linear(x, next(turn), config=cfg or None,  # noqa: B023
                                              rms_eps=1e-6, gated=gated))  # noqa: B023
                    r = {"dtype": dname, "shape": shape, "M": b, "fused_config": cfg,
                         "fused_ms": ms, "unfused_ms": base, "bw_frac": w.nbytes / (ms / 1e3) / bw}
                    rows.append(r)
                    print(f"{dname} {shape:12s} M={b:3d}  fused {ms * 1e3:7.1f} us "
                          f"({r['bw_frac']:.0%})  unfused {base * 1e3:7.1f} us  {cfg}", flush=True)
    return rows


def timed(fn, iters: int = 10, calls: int = 20) -> float:
    """Median ms of one call: `calls` calls captured in one CUDA graph, replayed (no launch
    cost from the host in the figure, as in the engine's decode graphs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()  # compiles, warms
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / calls)
    return statistics.median(times)


def copy_bandwidth() -> float:
    a = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.nbytes / (timed(lambda: b.copy_(a), 10, 4) / 1e3)


def invariant_rows(w: torch.Tensor, cfg: dict) -> bool:
    """Row 0 alone, then the same row at several offsets inside M = 7, 32, 64, 300."""
    k = w.shape[1]
    g = torch.Generator(device="cuda").manual_seed(0)
    row = torch.randn(1, k, device="cuda", generator=g).to(w.dtype)
    alone = linear(row, w, config=cfg)[0]
    for m in (7, 32, 64, 300):
        x = torch.randn(m, k, device="cuda", generator=g).to(w.dtype)
        at = m // 2 + 1
        x[at] = row[0]
        if not torch.equal(linear(x, w, config=cfg)[at], alone):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--splits", default="", help="e.g. 1,2,3,4: K parts to time beside auto")
    ap.add_argument("--tma-sweep", action="store_true")
    ap.add_argument("--fused", action="store_true")
    ap.add_argument("--fused-configs", default='[{}, {"block_k": 128, "num_stages": 4}, '
                    '{"block_k": 256, "num_stages": 2}, {"block_k": 64, "num_stages": 4}, '
                    '{"block_k": 256, "num_stages": 4}]')
    ap.add_argument("--out", default="linear.json")
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.3f} TB/s", flush=True)
    if args.fused:  # only these rows
        rows = fused_rows(args.dtypes, args.shapes, args.batches,
                          json.loads(args.fused_configs), bw)
        with open(args.out, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "copy_bandwidth_Bps": bw,
                       "rows": rows}, f, indent=1)
        return
    configs = [default_config()]
    if args.sweep:
        configs += [{"block_m": m, "block_n": n, "block_k": k, "num_warps": 4, "num_stages": s}
                    for m, n, k, s in itertools.product((16, 32, 64), (16, 32, 64), (128, 256),
                                                        (3, 5))]
    configs += [default_config() | {"split": int(p)} for p in args.splits.split(",") if p]
    if args.tma_sweep:
        configs += [{"tma": False}] + [
            tma_config() | {"tma": True, "block_n": n, "block_k": k, "num_stages": s,
                            "max_m_tiles": t}
            for n, k, s, t in itertools.product((64, 128), (128, 256), (3, 4, 6), (2,))]
    rows = []
    for dname in args.dtypes.split(","):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dname]
        for shape in args.shapes.split(","):
            n, k = SHAPES[shape]
            w, turn = cycled_weights(n, k, dtype)
            for b in [int(x) for x in args.batches.split(",")]:
                x = torch.randn(b, k, device="cuda").to(dtype)
                ms_cublas = timed(lambda: F.linear(x, next(turn)))  # noqa: B023
                best = None
                for i, cfg in enumerate(configs):
                    try:
                        ms = timed(lambda: linear(x, next(turn), config=cfg))  # noqa: B023
                    except Exception:  # noqa: BLE001 - a swept tile that does not fit: skip it
                        if i == 0:
                            raise
                        continue
                    r = {"dtype": dname, "shape": shape, "M": b, "config": cfg, "ms": ms,
                         "cublas_ms": ms_cublas, "bw_frac": w.nbytes / (ms / 1e3) / bw,
                         "cublas_bw_frac": w.nbytes / (ms_cublas / 1e3) / bw, "default": i == 0}
                    rows.append(r)
                    if best is None or ms < best["ms"]:
                        best = r
                d = next(r for r in reversed(rows) if r.get("default"))
                ptr = next((r for r in rows if r.get("config") == {"tma": False}
                            and (r["dtype"], r["shape"], r["M"]) == (dname, shape, b)), None)
                ptr_us = f"  ptr {ptr['ms'] * 1e3:7.1f} us" if ptr else ""
                print(f"{dname} {shape:12s} M={b:3d}  triton {d['ms'] * 1e3:7.1f} us "
                      f"({d['bw_frac']:.0%}){ptr_us}  cublas {ms_cublas * 1e3:7.1f} us "
                      f"({d['cublas_bw_frac']:.0%})  best {best['ms'] * 1e3:7.1f} us "
                      f"{best['config']}", flush=True)
            auto = splits(n, k, default_config(), sm_count(w.device))
            if args.splits:  # each part count against the others, M by M (us)
                for b in [int(x) for x in args.batches.split(",")]:
                    per = {r["config"].get("split", "auto"): r["ms"] * 1e3 for r in rows
                           if r.get("shape") == shape and r.get("dtype") == dname
                           and r.get("M") == b and "prefetch" in r.get("config", {})}
                    cells = "  ".join(f"{key}: {us:6.1f}" for key, us in per.items())
                    print(f"{dname} {shape:12s} M={b:3d}  parts (auto = {auto})  {cells}", flush=True)
            checked = (configs if not (args.sweep or args.tma_sweep)
                       else [configs[0]] + [{"tma": False}] * args.tma_sweep)
            ok = all(invariant_rows(w, cfg) for cfg in checked)
            rows.append({"dtype": dname, "shape": shape, "bitwise_invariant": ok, "auto_split": auto})
            print(f"{dname} {shape}: row bitwise the same at M = 1, 7, 32, 64, 300: {ok}", flush=True)
    if args.sweep:  # the configurations with the least time summed over sizes: overall, per shape
        for shape in [None, *args.shapes.split(",")]:
            total: dict[str, float] = {}
            for r in rows:
                if "config" in r and shape in (None, r["shape"]):
                    key = json.dumps(r["config"], sort_keys=True)
                    total[key] = total.get(key, 0.0) + r["ms"]
            best = sorted(total.items(), key=lambda kv: kv[1])[:3 if shape is None else 2]
            for key, ms in best:
                print(f"sweep {shape or 'all':12s} {ms * 1e3:8.1f} us  {key}")
    with open(args.out, "w") as f:
        json.dump({"card": torch.cuda.get_device_name(), "copy_bandwidth_Bps": bw, "rows": rows},
                  f, indent=1)


if __name__ == "__main__":
    main()

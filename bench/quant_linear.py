"""The int8 / int4 weight-only product alone against the floor of its bytes, and fp16's.

For each of LLaMA-7B's matrices at M rows: the time of `quant_mm` (CUDA-graph replays of 20
calls, median of 10; the weights taken in turn from enough copies that none sits in L2), the
floor of its bytes (qweight + scales + mins over a device-to-device copy's bandwidth measured
in the same run), and fp16's cuBLAS (`F.linear`) and invariant Triton linear on the same shape.
Then a decode step's products summed (32 layers of qkv, o, gate_up, down, and the head), and
whether a row is bitwise the same alone and at M = 3, 17, 32, 64. The shipped column is the
TMA form on the packed bytes in the mma order (as `load_model` leaves them on Hopper), "ptr"
the pointer form on the K order. `--sweep` times launch
configurations (compiled first in parallel processes, which fill Triton's cache); `--old PATH`
times another quant_triton.py's TMA form too, on the same mma-ordered bytes (the kernel before
this one).

    python3 bench/quant_linear.py --out quant_linear.json [--sweep] [--old old_quant_triton.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import multiprocessing as mp

import torch
import torch.nn.functional as F
from decode_step import copy_bandwidth
from linear import timed

from flover.ops import quant
from flover.ops.linear_triton import linear as triton_linear
from flover.ops.quant_triton import default_config, quant_mm

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096),
          "down": (4096, 11008), "head": (32000, 4096)}
PER_STEP = {"qkv": 32, "o": 32, "gate_up": 32, "down": 32, "head": 1}  # llama_7b, 32 layers


def tma_sweep_configs() -> list[dict]:
    """The TMA form on the mma order: BLOCK_N and K parts (steps of 256, 3 stages, two row
    tiles; tiles of 128, steps of 512 and 4 stages lost in session 9's sweep)."""
    return [{"mma": True, "bits": b, "block_n": bn, "block_k": bk, "num_stages": st,
             "split": sp, "max_m_tiles": 2}
            for b, bn, bk, st, sp in itertools.product((8, 4), (32, 64), (256,), (3,),
                                                       (1, 2, 4, 8))]


def sweep_configs() -> list[dict]:
    """K split against steps read ahead, the step's depth and BLOCK_N."""
    return [{"block_n": bn, "block_k": bk, "split": sp, "prefetch": pf, "num_warps": 4,
             "num_stages": 2} for bn, bk, sp, pf in itertools.product(
                 (32, 64), (128, 256, 512), (1, 4, 8), (0, 1, 2))]


def _warm(cfgs: list[dict]) -> list[tuple[dict, str | None]]:
    """Compile each configuration (both bit widths, one and two row tiles); the error if any."""
    out = []
    packs = [quant.quantize(torch.randn(4096, k, device="cuda") * 0.02, b)
             for b in (8, 4) for k in (4096, 11008)]
    for cfg in cfgs:
        try:
            for p, m in itertools.product(packs, (1, 32)):
                if cfg.get("bits", p.bits) != p.bits:
                    continue
                x = torch.randn(m, p.scales.shape[1] * 32, device="cuda", dtype=torch.float16)
                _mm(x, mma_ordered(p) if cfg.get("mma") else p, cfg)
            torch.cuda.synchronize()
            out.append((cfg, None))
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile or fit
            out.append((cfg, f"{type(e).__name__}: {str(e)[:200]}"))
    return out


def compile_all(cfgs: list[dict], procs: int = 14) -> list[dict]:
    chunks = [cfgs[i::procs] for i in range(procs)]
    with mp.get_context("spawn").Pool(procs) as pool:
        results = [r for part in pool.map(_warm, chunks) for r in part]
    for cfg, err in results:
        if err:
            print(f"config {cfg} fails: {err}", flush=True)
    return [cfg for cfg, err in results if err is None]


def rotated(make, nbytes: int) -> itertools.cycle:
    first = make()
    return itertools.cycle([first] + [make() for _ in range(-(-256 * 2**20 // nbytes) - 1)])


def mma_ordered(p: quant.Packed) -> quant.Packed:
    return quant.Packed(p.bits, p.group, quant.to_mma_order(p.qweight, p.bits), p.scales, p.mins)


def load_quant_module(path: str):
    """Another quant_triton.py (the kernel before this one), imported from its path."""
    spec = importlib.util.spec_from_file_location("old_quant_triton", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _mm(x: torch.Tensor, p: quant.Packed, cfg: dict | None, mod=None) -> torch.Tensor:
    """quant_mm (or an old module's) on p, in the mma order where cfg says "mma"."""
    mm = quant_mm if mod is None else mod.quant_mm
    return mm(x, p.qweight, p.scales, p.mins, p.bits, p.group, config=cfg,
              mma_order=bool(cfg and cfg.get("mma")))


def packed_bytes(p: quant.Packed) -> int:
    return sum(t.nbytes for _, t in p.tensors(""))


def invariant(p: quant.Packed, cfg: dict | None) -> bool:
    k = p.qweight.shape[1] * (2 if p.bits == 4 else 1)
    g = torch.Generator(device="cuda").manual_seed(0)
    row = torch.randn(1, k, device="cuda", generator=g).half()
    alone = _mm(row, p, cfg)[0]
    for m in (3, 17, 32, 64):
        x = torch.randn(m, k, device="cuda", generator=g).half()
        x[m // 2] = row[0]
        y = _mm(x, p, cfg)
        if not torch.equal(y[m // 2], alone):
            return False
    return True


def time_fp16(w16: torch.Tensor, m: int) -> tuple[float, float]:
    """Microseconds of cuBLAS and of the invariant Triton linear, weights rotated."""
    ws = rotated(lambda: w16.clone(), w16.nbytes)
    x = torch.randn(m, w16.shape[1], device="cuda", dtype=torch.float16)
    return (timed(lambda: F.linear(x, next(ws))) * 1e3,
            timed(lambda: triton_linear(x, next(ws))) * 1e3)


def time_quant(p0: quant.Packed, m: int, cfgs: list[dict], old) -> dict:
    """Microseconds of quant_mm (shipped: the TMA form on the mma order; the pointer form on the
    K order; each swept configuration; the old kernel)."""
    def copies(p: quant.Packed) -> itertools.cycle:
        return rotated(lambda: quant.Packed(p.bits, p.group, p.qweight.clone(), p.scales.clone(),
                                            None if p.mins is None else p.mins.clone()),
                       packed_bytes(p))

    ps, pm = copies(p0), copies(mma_ordered(p0))
    k = p0.qweight.shape[1] * (2 if p0.bits == 4 else 1)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)

    def run(cfg: dict | None, mod=None) -> torch.Tensor:
        return _mm(x, next(pm if cfg and cfg.get("mma") else ps), cfg, mod)

    out = {"us": timed(lambda: run({"mma": True})) * 1e3, "ptr_us": timed(lambda: run(None)) * 1e3}
    if old is not None:
        out["old_us"] = timed(lambda: run({"mma": True}, old)) * 1e3
    if cfgs:
        out["sweep"] = [(cfg, timed(lambda c=cfg: run(c), iters=5, calls=10) * 1e3) for cfg in cfgs
                        if cfg.get("bits", p0.bits) == p0.bits]
        out["best"] = min(out["sweep"], key=lambda c: c[1])
    return out


def measure_shape(name: str, batches: list[int], bw: float, cfgs: list[dict], old) -> list[dict]:
    n, k = SHAPES[name]
    w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    rows = []
    for m in batches:
        cublas, tri = time_fp16(w16, m)
        rows.append({"shape": name, "N": n, "K": k, "M": m, "fp16_floor_us": w16.nbytes / bw * 1e6,
                     "cublas_us": cublas, "triton_fp16_us": tri})
    for bits in (8, 4):
        p0 = quant.quantize(w16.float(), bits)
        for r in rows[:len(batches)]:
            t = time_quant(p0, r["M"], cfgs, old)
            r[f"int{bits}_floor_us"] = floor = packed_bytes(p0) / bw * 1e6
            r.update({f"int{bits}_{key}": v for key, v in t.items()})
            print(f"{name:8s} M={r['M']:3d} int{bits}: {t['us']:8.1f} us, floor {floor:7.1f} "
                  f"(x{t['us'] / floor:.2f}), ptr {t['ptr_us']:8.1f}"
                  + (f", old {t['old_us']:8.1f}" if old else "")
                  + (f", best {t['best'][1]:8.1f} {t['best'][0]}" if cfgs else ""), flush=True)
        inv = invariant(mma_ordered(p0), {"mma": True}) and invariant(p0, None)
        rows.append({"shape": name, "bits": bits, "bitwise_invariant": inv})
        print(f"{name} int{bits}: a row bitwise the same at M = 1, 3, 17, 32, 64: {inv}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--sweep-shapes", default=",".join(SHAPES))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--tma-sweep", action="store_true", help="sweep the TMA form's configurations")
    ap.add_argument("--old", default=None, help="path of another quant_triton.py to time too")
    ap.add_argument("--out", default="quant_linear.json")
    args = ap.parse_args()
    old = load_quant_module(args.old) if args.old else None
    cfgs = compile_all((sweep_configs() if args.sweep else [])
                       + (tma_sweep_configs() if args.tma_sweep else []))
    bw = copy_bandwidth()
    card = torch.cuda.get_device_name()
    print(f"{card}: copy {bw / 1e12:.3f} TB/s", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name in args.shapes.split(","):
        rows += measure_shape(name, batches, bw, cfgs if name in args.sweep_shapes.split(",") else [], old)
        torch.cuda.empty_cache()
    if cfgs:  # the configurations with the least time over the swept shapes and M, each shape
        for bits in (8, 4):  # weighted by its launches per llama_7b step; then each shape's best
            total: dict[str, float] = {}
            for r in rows:
                for cfg, us in r.get(f"int{bits}_sweep", []):
                    key = json.dumps(cfg, sort_keys=True)
                    total[key] = total.get(key, 0.0) + us * PER_STEP[r["shape"]] / 1e3
            for key, ms in sorted(total.items(), key=lambda kv: kv[1])[:5]:
                print(f"sweep int{bits} {ms:7.3f} ms per step  {key}")
            for shape in SHAPES:  # each shape's best over its Ms (one configuration serves all)
                mine = [r for r in rows if r.get("shape") == shape and r.get(f"int{bits}_sweep")]
                if not mine:
                    continue
                by_cfg: dict[str, float] = {}
                for r in mine:
                    for cfg, us in r[f"int{bits}_sweep"]:
                        key = " ".join(f"{k}={cfg[k]}" for k in ("block_n", "block_k",
                                                                 "num_stages", "split"))
                        by_cfg[key] = by_cfg.get(key, 0.0) + us
                key, us = min(by_cfg.items(), key=lambda kv: kv[1])
                shipped = sum(r[f"int{bits}_us"] for r in mine)
                per_m = " ".join(f"M={r['M']} {r[f'int{bits}_us']:.1f}" for r in mine)
                print(f"sweep int{bits} best {shape:8s} {us:7.1f} us over the Ms, shipped "
                      f"{shipped:7.1f} ({per_m})  {key}")
    with open(args.out, "w") as f:
        json.dump({"card": card, "copy_bandwidth_Bps": bw, "torch": torch.__version__, "rows": rows,
                   "default_config": {b: default_config(4096, 4096, b) for b in (8, 4)}}, f, indent=1)
    print(f"\n{card}, copy {bw / 1e12:.3f} TB/s; microseconds per product (x = over its floor)")
    cols = (["cublas", "triton_fp16", "int8", "int4", "int8_ptr", "int4_ptr"]
            + (["int8_old", "int4_old"] if old else []))
    print(f"{'shape':8s} {'M':>3s} " + " ".join(f"{c:>16s}" for c in cols))
    floor_of = {c: "fp16_floor_us" if c in ("cublas", "triton_fp16") else f"{c[:4]}_floor_us"
                for c in cols}
    for r in rows:
        if "M" in r:
            cells = [f"{r[c + '_us']:8.1f} x{r[c + '_us'] / r[floor_of[c]]:5.2f}" for c in cols]
            print(f"{r['shape']:8s} {r['M']:3d} " + " ".join(f"{c:>16s}" for c in cells))
    if set(args.shapes.split(",")) == set(SHAPES):
        print("\nllama_7b decode step, its products alone: ms (x = over the floor of their bytes)")
        for m in batches:
            mine = [r for r in rows if r.get("M") == m]
            total = {key: sum(r[key] * PER_STEP[r["shape"]] for r in mine) / 1e3
                     for key in [c + "_us" for c in cols] + list(set(floor_of.values()))}
            print(f"M={m:3d} " + "  ".join(f"{c} {total[c + '_us']:6.3f} "
                                         f"(x{total[c + '_us'] / total[floor_of[c]]:4.2f})" for c in cols)
                  + "  floors: " + " ".join(f"{f[:-9]} {total[f]:.3f}" for f in
                                            ("fp16_floor_us", "int8_floor_us", "int4_floor_us")))

if __name__ == "__main__":
    main()

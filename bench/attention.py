"""Decode attention alone: the Triton kernel and the PyTorch reference over its floor.

Floor: the live K and V bytes of every row (and q/out, negligible) over the copy bandwidth
measured in the same run. Rows all at one context; several layers' caches are cycled so the
L2 cache does not hold the data between calls.

    python3 bench/attention.py --out attention.json
    python3 bench/attention.py --invariant-sweep --out attention_sweep.json

`--invariant-sweep` times the batch-invariant attention (`row_attention`: the split kernel
and the ordered merge) for each fixed split length and launch configuration, graph-replayed,
at contexts 512 and 2048 and B = 1 and 32, and prints each configuration's total against the
shipped one's.

`--forms` times `row_attention`'s forms, graph-replayed, per layer: decode rows (B = 1 and 32,
contexts 512 and 2048, the grid sized by --max-len as a decode graph's is) and one prompt of
512 or 2048 tokens prefilled whole: "tokens1" (a tile per token, as before 2026-12-08), the
shipped grid (a prompt's consecutive tokens sharing a tile) and "items" (the persistent form,
its work list built once per replay as the first layer of a forward does), "warps8" and
"n32" (8 warps, or K/V blocks of 32: fewer registers a thread, more programs a multiprocessor),
"merge1" (the merge loading one split per round trip, as before; its output is the same),
with each form's largest difference from the shipped one's output. Then the paged layout's
kernel (blocks of 16 positions, rows' blocks scattered) in the same cases: K/V steps of 64 or
32 positions ("64", shipped, spills under triton 3.6; "32" does not), each with a tile per
token ("x1", shipped) or a prompt's tokens sharing it ("xrun"); "merge1": the merge loading
one split per round trip, as before.

    python3 bench/attention.py --forms --out attention_forms.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton.testing
from decode_step import copy_bandwidth

from flover.ops.attention import decode_attention_ref
from flover.ops.attention_triton import SPLIT_LEN, decode_attention, row_attention
from flover.ops.paged_attention_triton import paged_decode_attention

SHAPES = {"llama_7b": (32, 32, 128), "llama_13b": (40, 40, 128), "gptj_6b": (16, 16, 256),
          "gqa_8b": (32, 8, 128)}  # (heads, kv heads, head dim)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--out", default="attention.json")
    ap.add_argument("--sweep", action="store_true", help="time launch configurations instead")
    ap.add_argument("--invariant-sweep", action="store_true")
    ap.add_argument("--forms", action="store_true", help="row_attention's forms (see above)")
    ap.add_argument("--max-len", type=int, default=4096, help="--invariant-sweep's grid")
    ap.add_argument("--split-lens", default="32,64,128,256")
    ap.add_argument("--skips", default="1", help="1,0: also without skipping empty splits")
    args = ap.parse_args()
    bw = copy_bandwidth()
    if args.invariant_sweep:
        return invariant_sweep(bw, args.out, args.max_len,
                               [int(x) for x in args.split_lens.split(",")],
                               [x == "1" for x in args.skips.split(",")])
    if args.forms:
        return forms(bw, args.out, args.max_len)
    if args.sweep:
        return sweep(bw, args.context, args.out)
    layers, ctx, rows = 8, args.context, []
    for name, (h, hkv, d) in SHAPES.items():
        for b in [int(x) for x in args.batches.split(",")]:
            k = torch.randn(layers, b, hkv, ctx + 8, d, device="cuda", dtype=torch.float16)
            v = torch.randn_like(k)
            q = torch.randn(b, h, d, device="cuda", dtype=torch.float16)
            lens = torch.full((b,), ctx + 1, device="cuda")
            ours = decode_attention(q, k[3], v[3], lens, ctx + 8, d ** -0.5)
            ref = decode_attention_ref(q, k[3], v[3], lens, ctx + 1, d ** -0.5)
            err = ((ours.float() - ref.float()).norm() / ref.float().norm()).item()

            def cycle(fn, max_len, q=q, k=k, v=v, lens=lens, scale=d ** -0.5):
                for i in range(layers):
                    fn(q, k[i], v[i], lens, max_len, scale)

            t_ours = triton.testing.do_bench(lambda: cycle(decode_attention, ctx + 8),
                                             return_mode="median") / layers
            t_ref = triton.testing.do_bench(lambda: cycle(decode_attention_ref, ctx + 1),
                                            return_mode="median") / layers
            floor = 2 * b * hkv * (ctx + 1) * d * 2 / bw * 1e3
            rows.append({"shape": name, "batch": b, "context": ctx, "kernel_ms": t_ours,
                         "ref_ms": t_ref, "floor_ms": floor, "rel_err": err})
            print(f"{name:9s} B={b:3d} kernel {t_ours * 1e3:7.1f} us  ref {t_ref * 1e3:8.1f} us"
                  f"  floor {floor * 1e3:6.1f} us  x{t_ours / floor:5.2f}  err {err:.1e}",
                  flush=True)
    with open(args.out, "w") as f:
        json.dump({"card": torch.cuda.get_device_name(), "copy_bandwidth_Bps": bw,
                   "rows": rows}, f, indent=1)


def sweep(bw: float, ctx: int, out: str) -> None:
    """Kernel time over floor for each launch configuration; the best per shape last."""
    configs = []
    for mha_2d in (True, False):
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for target in (512, 2048):
                    configs.append({"mha_2d": mha_2d, "block_n": block_n, "num_warps": warps,
                                    "num_stages": 2, "target": target})
    layers, results = 8, []
    for name in ("llama_7b", "gptj_6b", "gqa_8b"):
        h, hkv, d = SHAPES[name]
        for b in (1, 32, 64):
            k = torch.randn(layers, b, hkv, ctx + 8, d, device="cuda", dtype=torch.float16)
            v = torch.randn_like(k)
            q = torch.randn(b, h, d, device="cuda", dtype=torch.float16)
            lens = torch.full((b,), ctx + 1, device="cuda")
            ref = decode_attention_ref(q, k[0], v[0], lens, ctx + 1, d ** -0.5).float()
            floor = 2 * b * hkv * (ctx + 1) * d * 2 / bw * 1e3
            best = None
            for c in configs:
                if c["mha_2d"] and h != hkv:
                    continue
                if d >= 256 and c["block_n"] == 128:
                    continue
                try:
                    o = decode_attention(q, k[0], v[0], lens, ctx + 8, d ** -0.5, config=c)
                    err = ((o.float() - ref).norm() / ref.norm()).item()
                    g = torch.cuda.CUDAGraph()  # graph-replayed, as in a decode step
                    with torch.cuda.graph(g):
                        for i in range(layers):
                            decode_attention(q, k[i], v[i], lens, ctx + 8, d ** -0.5, config=c)
                    t = triton.testing.do_bench(g.replay, return_mode="median") / layers
                except Exception as e:  # noqa: BLE001 - a config that fails to build is skipped
                    print(f"{name} B={b} {c}: {type(e).__name__} {str(e)[:100]}")
                    continue
                r = {"shape": name, "batch": b, **c, "kernel_ms": t, "floor_ms": floor,
                     "rel_err": err}
                results.append(r)
                if best is None or t < best["kernel_ms"]:
                    best = r
            print(f"best {name:9s} B={b:3d} {best['kernel_ms'] * 1e3:6.1f} us "
                  f"(floor {floor * 1e3:5.1f}, x{best['kernel_ms'] / floor:4.2f}) "
                  f"mha_2d={best['mha_2d']} block_n={best['block_n']} "
                  f"warps={best['num_warps']} target={best['target']} err {best['rel_err']:.1e}",
                  flush=True)
            default = next(r for r in results[::-1] if r["shape"] == name and r["batch"] == b
                           and r["num_warps"] == 4 and r["target"] == 512
                           and r["mha_2d"] == (h == hkv)
                           and r["block_n"] == (32 if d >= 256 else 64))
            print(f"     default {default['kernel_ms'] * 1e3:6.1f} us", flush=True)
    with open(out, "w") as f:
        json.dump({"card": torch.cuda.get_device_name(), "copy_bandwidth_Bps": bw,
                   "sweep": results}, f, indent=1)


def invariant_sweep(bw: float, out: str, max_len: int, split_lens: list[int],
                    skips: list[bool], layers: int = 4) -> None:
    """`row_attention` per split length (positions per split, fixed: the bits change with it,
    never with the batch) and launch configuration, graph-replayed over `layers` caches;
    max_len as a captured decode graph has it (the cache's max_seq_len: the grid's size, not
    the work); `skips`: the split programs past a row's length writing nothing (shipped) or
    empty partials."""
    configs = [{"split_len": sl, "block_n": bn, "num_stages": st, "num_warps": 4,
                "skip_empty": skip}
               for sl in split_lens for bn in (32, 64) for st in (2, 3) for skip in skips
               if bn <= sl]
    shipped = {"split_len": SPLIT_LEN, "block_n": 64, "num_stages": 2, "num_warps": 4,
               "skip_empty": True}
    results, totals = [], {}
    for name in ("llama_7b", "gqa_8b"):
        h, hkv, d = SHAPES[name]
        for ctx in (512, 2048):
            for b in (1, 32):
                k = torch.randn(layers, b, hkv, ctx + 8, d, device="cuda", dtype=torch.float16)
                v = torch.randn_like(k)
                q = torch.randn(b, h, d, device="cuda", dtype=torch.float16)
                lens = torch.full((b,), ctx + 1, device="cuda")
                slots = torch.arange(b, device="cuda")
                floor = 2 * b * hkv * (ctx + 1) * d * 2 / bw * 1e3
                line = []
                for c in configs:
                    def run(c=c, q=q, k=k, v=v, lens=lens, slots=slots, scale=d ** -0.5):
                        for i in range(layers):
                            row_attention(q, k[i], v[i], slots, lens, max_len, scale, c)
                    run()
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        run()
                    t = triton.testing.do_bench(g.replay, return_mode="median") / layers
                    key = json.dumps(c, sort_keys=True)
                    totals[key] = totals.get(key, 0.0) + t
                    results.append({"shape": name, "batch": b, "context": ctx, **c,
                                    "kernel_ms": t, "floor_ms": floor})
                    line.append((t, c))
                    del g
                best = min(line, key=lambda r: r[0])
                ship = next(t for t, c in line if c == shipped)
                print(f"{name:9s} ctx={ctx:5d} B={b:3d} floor {floor * 1e3:6.1f} us  shipped "
                      f"{ship * 1e3:6.1f}  best {best[0] * 1e3:6.1f} {best[1]}", flush=True)
                del k, v
    base = totals[json.dumps(shipped, sort_keys=True)]
    print("configuration: sum over the cases, and against the shipped one's")
    for key, t in sorted(totals.items(), key=lambda kv: kv[1]):
        print(f"  {t * 1e3:8.1f} us  {t / base:5.3f}  {key}", flush=True)
    with open(out, "w") as f:
        json.dump({"card": torch.cuda.get_device_name(), "copy_bandwidth_Bps": bw,
                   "max_len": max_len, "invariant_sweep": results}, f, indent=1)


FORMS = {"tokens1": {"tokens": 1}, "shipped": {}, "items": {"persistent": True},
         # fewer registers a thread (255 at 4 warps and blocks of 64: 2 programs a
         # multiprocessor), never swept for the invariant kernel: other bits, another kernel
         "warps8": {"num_warps": 8}, "n32": {"block_n": 32},
         # the merge loading one split at a time, as before 2026-12-08 (the same bits)
         "merge1": {"merge_splits": 1}}


def _graphed(run, layers: int) -> tuple[float, torch.Tensor]:
    """ms per layer of run() (a list of `layers` outputs), graph-replayed; the first output."""
    first = run()[0]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    return triton.testing.do_bench(g.replay, return_mode="median") / layers, first


CASES = [("decode", b, ctx) for b in (1, 32) for ctx in (512, 2048)] + [
    ("prompt", 1, n) for n in (512, 2048)]  # (kind, rows or 1, context or prompt length)


def _header(label: str, forms: dict, shipped: str) -> None:
    print(f"{label:9s} {'case':7s} {'B':>3s} {'ctx':>5s} {'floor us':>9s} "
          + " ".join(f"{f:>9s}" for f in forms) + f"  max |diff| vs {shipped}", flush=True)


def _report(name: str, kind: str, b: int, ctx: int, floor: float, times: dict, outs: dict,
            shipped: str) -> dict:
    """One case's line (us per layer per form; each form's largest difference from the
    shipped form's output) and its record."""
    diffs = {f: (o.float() - outs[shipped].float()).abs().max().item() for f, o in outs.items()}
    print(f"{name:9s} {kind:7s} {b:3d} {ctx:5d} {floor * 1e3:9.1f} "
          + " ".join(f"{t * 1e3:9.1f}" for t in times.values()) + "  "
          + " ".join(f"{f}={x:.1e}" for f, x in diffs.items() if f != shipped), flush=True)
    return {"shape": name, "case": kind, "batch": b, "context": ctx, "floor_ms": floor,
            "ms": times, "max_diff_vs_shipped": diffs}


def _time_form(q, k, v, slots, lens, pos, grid_len, cfg) -> tuple[float, torch.Tensor]:
    """`row_attention` in one form over k.shape[0] layers' caches."""
    layers, scale = k.shape[0], q.shape[-1] ** -0.5

    def run():
        plan = {}  # one forward: the work list built by the first layer
        return [row_attention(q, k[i], v[i], slots, lens, grid_len, scale, cfg, positions=pos,
                              plan=plan) for i in range(layers)]
    return _graphed(run, layers)


def _time_paged(q, k, v, tables, lens, grid_len, form: dict) -> tuple[float, torch.Tensor]:
    """`paged_decode_attention` in one form over k.shape[0] layers' caches."""
    layers, scale = k.shape[0], q.shape[-1] ** -0.5

    def run():
        return [paged_decode_attention(q, k[i], v[i], tables, lens, grid_len, scale, **form)
                for i in range(layers)]
    return _graphed(run, layers)


def forms(bw: float, out: str, max_len: int, layers: int = 4) -> None:
    """`row_attention`'s forms (FORMS) on decode rows and on one whole prompt, us per layer."""
    results = []
    _header("shape", FORMS, "shipped")
    for name in ("llama_7b", "gqa_8b", "gptj_6b"):
        h, hkv, d = SHAPES[name]
        for kind, b, ctx in CASES:
            rows = b if kind == "decode" else ctx
            k = torch.randn(layers, b, hkv, ctx + 8, d, device="cuda", dtype=torch.float16)
            v = torch.randn_like(k)
            q = torch.randn(rows, h, d, device="cuda", dtype=torch.float16)
            if kind == "decode":
                lens = torch.full((b,), ctx + 1, device="cuda")
                slots = torch.arange(b, device="cuda")
                grid_len, floor_bytes = max_len, 2 * b * hkv * (ctx + 1) * d * 2
            else:  # token i of the prompt reads positions 0..i (its own written)
                lens = torch.arange(1, ctx + 1, device="cuda")
                slots = torch.zeros(ctx, dtype=torch.long, device="cuda")
                grid_len, floor_bytes = ctx, 2 * hkv * ctx * d * 2  # each tile once
            pos = lens - 1
            floor = floor_bytes / bw * 1e3
            times, outs = {}, {}
            for form, cfg in FORMS.items():
                times[form], outs[form] = _time_form(q, k, v, slots, lens, pos, grid_len, cfg)
            results.append(_report(name, kind, b, ctx, floor, times, outs, "shipped"))
            del k, v
    paged = paged_forms(bw, max_len, layers)
    with open(out, "w") as f:
        json.dump({"card": torch.cuda.get_device_name(), "copy_bandwidth_Bps": bw,
                   "max_len": max_len, "forms": results, "paged_forms": paged}, f, indent=1)


PAGED_FORMS = {"64x1": {"block_n": 64, "shared_tile": False},
               "64xrun": {"block_n": 64, "shared_tile": True},
               "32x1": {"block_n": 32, "shared_tile": False},
               "32xrun": {"block_n": 32, "shared_tile": True},
               "merge1": {"block_n": 64, "shared_tile": False, "merge_splits": 1}}


def paged_forms(bw: float, max_len: int, layers: int, bs: int = 16) -> list[dict]:
    """`paged_decode_attention` per PAGED_FORMS (K/V step, tokens a tile, the merge's loads),
    us per layer."""
    results = []
    _header("paged", PAGED_FORMS, "64x1")
    for name in ("llama_7b", "gqa_8b"):
        h, hkv, d = SHAPES[name]
        for kind, b, ctx in CASES:
            width = -(-(ctx + 1) // bs)
            blocks = torch.randperm(b * width, device="cuda").view(b, width) + 1
            k = torch.randn(layers, b * width + 1, hkv, bs, d, device="cuda", dtype=torch.float16)
            v = torch.randn_like(k)
            if kind == "decode":
                rows, tables = b, blocks
                lens = torch.full((b,), ctx + 1, device="cuda")
                grid_len, floor_bytes = max_len, 2 * b * hkv * (ctx + 1) * d * 2
            else:
                rows, tables = ctx, blocks.expand(ctx, -1).contiguous()
                lens = torch.arange(1, ctx + 1, device="cuda")
                grid_len, floor_bytes = ctx, 2 * hkv * ctx * d * 2
            q = torch.randn(rows, h, d, device="cuda", dtype=torch.float16)
            floor = floor_bytes / bw * 1e3
            times, outs = {}, {}
            for form, kw in PAGED_FORMS.items():
                times[form], outs[form] = _time_paged(q, k, v, tables, lens, grid_len, kw)
            results.append(_report(name, kind, b, ctx, floor, times, outs, "64x1"))
            del k, v, q, outs
    return results


if __name__ == "__main__":
    main()

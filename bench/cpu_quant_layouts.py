"""Per-call time of the CPU int4 / int8 kernels (flover/ops/quant_cpu.c) in each layout a GGUF
file's blocks are kept in, at the embedded model's shapes, M = 1 and 8.

Layouts (flover/ops/quant.py, `GGUF_LAYOUTS`): int4 with float16 scales and mins (Q4_0, Q4_1),
int4 with float32 ones (Q4_K), int8 with float16 scales (Q8_0, Q5_0), int8 in groups of 16 with
float32 scales (Q6_K), int8 with float32 scales and mins (Q5_K; groups of 16: a linear whose
pieces differ in type). With `--old SRC` (a quant_cpu.c from before commit 8d6db9c, whose
argument lists this script knows, e.g. `git show a048e20:flover/ops/quant_cpu.c`), its
kernel's float16 layouts run beside the current ones in the same process, alternating, so the
two can be compared. Weights are random and hot in cache (each shape is called repeatedly):
this ranks layouts, it does not predict a decode step (bench/cpu_quant_step.py does). Median
over `--rounds` rounds of the min over 5 repeats of 20 calls.

    python bench/cpu_quant_layouts.py [--old /tmp/old/quant_cpu.c] [--rounds 3]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
from pathlib import Path

import torch
from cpu_linear_ops import bench  # beside this file: min over 5 repeats of 20 calls, us

from flover.ops import quant, quant_cpu

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
          "head": (49152, 576)}
LAYOUTS = {  # name: (bits, group, scale dtype, mins)
    "i4-f16": (4, 32, torch.float16, True),
    "i4-f32": (4, 32, torch.float32, True),
    "i8-f16": (8, 32, torch.float16, False),
    "i8-f32-g16": (8, 16, torch.float32, False),
    "i8-f32-min": (8, 32, torch.float32, True),
    "i8-f32-g16-min": (8, 16, torch.float32, True),
}


def packed(w: torch.Tensor, bits: int, group: int, dtype: torch.dtype, mins: bool) -> quant.Packed:
    p = quant.quantize(w, bits, 32)
    if bits == 8 and mins:  # any min will do for timing: the kernel adds it
        p = quant.Packed(8, 32, p.qweight, p.scales, p.scales * 0.5)
    return p.to(quant.Layout(bits, group, dtype == torch.float32, mins))


def old_calls(source: Path):
    """The float16 layouts through an earlier kernel (its own argument lists)."""
    so = quant_cpu.load(source)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    so.flover_int4_mm.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, ptr, ctypes.c_int]
    so.flover_int8_mm.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, ptr, ctypes.c_int]

    def int4(x, p):
        y = torch.empty(x.shape[0], p.qweight.shape[0])
        so.flover_int4_mm(x.data_ptr(), x.shape[0], x.shape[1], p.qweight.data_ptr(),
                          p.scales.data_ptr(), p.mins.data_ptr(), p.qweight.shape[0], p.group,
                          y.data_ptr(), torch.get_num_threads())
        return y

    def int8(x, p):
        y = torch.empty(x.shape[0], p.qweight.shape[0])
        so.flover_int8_mm(x.data_ptr(), x.shape[0], x.shape[1], p.qweight.data_ptr(),
                          p.scales.data_ptr(), p.qweight.shape[0], p.group, y.data_ptr(),
                          torch.get_num_threads())
        return y
    return {"old-i4-f16": ("i4-f16", int4), "old-i8-f16": ("i8-f16", int8)}


def call(x: torch.Tensor, p: quant.Packed) -> torch.Tensor:
    if p.bits == 4:
        return quant_cpu.int4_mm(x, p.qweight, p.scales, p.mins, p.group)
    return quant_cpu.int8_mm(x, p.qweight, p.scales, p.group, p.mins)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, help="an earlier quant_cpu.c to time beside this one")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if quant_cpu.lib() is None:
        raise SystemExit("no C compiler: the kernels are not built")
    torch.manual_seed(0)
    olds = old_calls(args.old) if args.old else {}
    cols = [*LAYOUTS, *olds]
    print(f"threads {torch.get_num_threads()}; us per call, median of {args.rounds} rounds")
    print(f"{'shape':>8} {'M':>2} " + " ".join(f"{c:>15}" for c in cols))
    for m in (1, 8):
        for name, (n, k) in SHAPES.items():
            w, x = torch.randn(n, k) * 0.02, torch.randn(m, k)
            ps = {c: packed(w, *spec) for c, spec in LAYOUTS.items()}
            fns = {c: (lambda p=ps[c], x=x: call(x, p)) for c in LAYOUTS}
            for c, (layout, fn) in olds.items():
                # the same products; an earlier kernel may round its sums otherwise (FMAs)
                torch.testing.assert_close(fn(x, ps[layout]), call(x, ps[layout]), rtol=1e-4, atol=1e-5)
                fns[c] = lambda fn=fn, p=ps[layout], x=x: fn(x, p)
            runs = {c: [] for c in cols}
            for _ in range(args.rounds):  # alternate, so drift hits every column alike
                for c in cols:
                    runs[c].append(bench(fns[c]))
            print(f"{name:>8} {m:>2} " + " ".join(f"{statistics.median(runs[c]):15.1f}"
                                                  for c in cols), flush=True)


if __name__ == "__main__":
    main()

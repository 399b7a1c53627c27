"""Per-call time of the CPU linear kernels at the embedded model's shapes, M = 1 and 8.

float32 oneDNN with packed weights (flover/ops/cpu_linear.py), torch's own weight-only
`_weight_int8pack_mm` (per-channel scales) and `_weight_int4pack_mm_for_cpu` (groups of 32),
and flover's C kernels (flover/ops/quant_cpu.c, int4 and int8, groups of 32). Weights are
random and hot in cache (each shape is called repeatedly): this ranks kernels, it does not
predict a decode step (bench/cpu_quant_step.py does). Min over 5 repeats of 20 calls.

    python bench/cpu_linear_ops.py
"""

from __future__ import annotations

import time

import torch

from flover.ops import quant, quant_cpu
from flover.ops.cpu_linear import PackedLinear

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
          "head": (49152, 576)}


def bench(fn, iters: int = 20, reps: int = 5) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t) / iters)
    return best * 1e6


def timings(m: int, n: int, k: int) -> list[float]:
    w, x = torch.randn(n, k) * 0.02, torch.randn(m, k)
    fp32 = PackedLinear(w, None)
    s8 = w.abs().amax(1) / 127
    q8 = torch.round(w / s8[:, None]).to(torch.int8)
    g = w.view(n, k // 32, 32)
    lo, sc = g.amin(-1), ((g.amax(-1) - g.amin(-1)) / 15).clamp(min=1e-8)
    q4 = torch.round((g - lo[..., None]) / sc[..., None]).clamp(0, 15).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.view(n, k), 1)
    sz = torch.stack([sc.T, (lo + 8 * sc).T], -1).contiguous()
    out = [bench(lambda: fp32(x)),
           bench(lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8)),
           bench(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz))]
    if quant_cpu.lib() is not None:
        p4, p8 = quant.quantize(w, 4), quant.quantize(w, 8)
        out += [bench(lambda: quant_cpu.int4_mm(x, p4.qweight, p4.scales, p4.mins, 32)),
                bench(lambda: quant_cpu.int8_mm(x, p8.qweight, p8.scales, 32))]
    return out


def main() -> None:
    torch.manual_seed(0)
    print(f"{'shape':>8} {'M':>2} {'fp32':>9} {'torch i8':>9} {'torch i4':>9} {'ours i4':>9} "
          f"{'ours i8':>9}  (us per call)")
    for m in (1, 8):
        for name, (n, k) in SHAPES.items():
            row = timings(m, n, k)
            print(f"{name:>8} {m:>2} " + " ".join(f"{t:9.1f}" for t in row), flush=True)


if __name__ == "__main__":
    main()

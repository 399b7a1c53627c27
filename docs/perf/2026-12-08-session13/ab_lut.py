"""A/B of two quant_cpu.c builds on the int4 products alone (hot in cache, bench/cpu_quant_layouts'
shapes), checking that both give the same bits. "before": a quant_cpu.c (with its vec16.h) in
the first directory; the other: the tree's. Used with /tmp/prelut (commit 2d42009's kernel,
before the permuted dequantisation) and /tmp/prewiden (commit d5afba6's, before the widened
scales).

    python docs/perf/2026-12-08-session13/ab_lut.py /tmp/prelut
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
from cpu_quant_layouts import SHAPES, bench, packed  # noqa: E402

from flover.ops import quant_cpu  # noqa: E402


def load(src: Path):
    return quant_cpu.bind(quant_cpu.load(src))


def main() -> None:
    libs = {"before": load(Path(sys.argv[1]) / "quant_cpu.c"), "after": load(quant_cpu.SOURCE)}
    torch.manual_seed(0)
    for wide in (False, True):
        for m in (1, 8):
            for name, (n, k) in SHAPES.items():
                w, x = torch.randn(n, k) * 0.02, torch.randn(m, k)
                p = packed(w, 4, 32, torch.float32 if wide else torch.float16, True)
                outs, t = {}, {c: [] for c in libs}
                run = lambda x=x, p=p: quant_cpu.int4_mm(x, p.qweight, p.scales, p.mins, 32)  # noqa: E731
                for _ in range(3):
                    for c, so in libs.items():
                        quant_cpu.lib = lambda so=so: so
                        outs[c] = run()
                        t[c].append(bench(run))
                same = torch.equal(outs["before"].view(torch.int32), outs["after"].view(torch.int32))
                print(f"{'f32' if wide else 'f16'} {name:>8} M={m}: before "
                      f"{statistics.median(t['before']):8.1f} us, after "
                      f"{statistics.median(t['after']):8.1f} us, same bits {same}")


if __name__ == "__main__":
    main()

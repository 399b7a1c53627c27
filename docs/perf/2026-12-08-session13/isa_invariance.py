"""The int4 / int8 CPU kernel built for AVX-512 (native here), AVX2 + FMA (-march=haswell) and
SSE without FMA (-march=x86-64): in each build, in each GGUF layout, a row's result is bitwise
the same alone and in batches of other sizes, and within float32's error of the float64
product.

    python docs/perf/2026-12-08-session13/isa_invariance.py
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))
from test_quant_gguf import module_of, raw_blocks  # noqa: E402

from flover.ops import quant, quant_cpu  # noqa: E402

ARCHES = ("native", "haswell", "x86-64")


def build(arch: str, tmp: Path):
    out = tmp / f"quant_cpu-{arch}.so"
    flags = [f if f != "-march=native" else f"-march={arch}" for f in quant_cpu.FLAGS]
    subprocess.run([shutil.which("cc") or "gcc", *flags, "-Wno-psabi", str(quant_cpu.SOURCE),
                    "-o", str(out), "-lm"], check=True)
    import ctypes
    return quant_cpu.bind(ctypes.CDLL(str(out)))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHES:
            so = build(arch, Path(tmp))
            quant_cpu.lib = lambda so=so: so
            for kind in ("Q4_1", "Q8_0", "Q4_K", "Q6_K", "Q5_K"):
                rng = np.random.default_rng(0)
                p = quant.from_gguf(kind, raw_blocks(kind, 37, 512, rng), (37, 512))
                mod, x = module_of(p), torch.randn(13, 512)
                together = mod(x)
                same = all(torch.equal(mod(x[i:i + 1]), together[i:i + 1]) for i in range(13))
                same &= torch.equal(mod(x[8:13]), together[8:13])
                same &= torch.equal(mod(x[2:6]), together[2:6])
                w = p.dequantize().double()
                err = ((together.double() - x.double() @ w.T).abs()
                       / (x.double().abs() @ w.abs().T)).max().item()
                print(f"{arch:8s} {kind}: {'invariant' if same else 'NOT invariant'}, "
                      f"relative error {err:.1e}")


if __name__ == "__main__":
    main()

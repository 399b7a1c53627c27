"""Decode tokens/s on the CPU with the embedded GGUF kept quantized, against float32.

flover runs the embedded SmolLM2-135M-Instruct twice in this process: with its GGUF file's own
Q4_1/Q8_0 blocks kept packed (quantization="auto", the default on the CPU) and dequantised to
float32 (quantization="none", the baseline), B requests decoding together, median step time
over --steps iterations after warm-up (bench/cpu_step.py's method). llama.cpp is not run here
(llama-cpp-python builds from source for ~10 minutes on 2 cores): its figures on this file and
CPU are given as constants, measured with 2 threads (DESIGN.md section 4).

    python bench/cpu_quant_step.py --batches 1,8 --out cpu_quant.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import torch
from cpu_step import copy_bandwidth, flover_step  # beside this file

from flover import Engine, EngineConfig
from flover.ops.quant import QuantLinear

LLAMA_CPP_B1_MS = 10.7  # llama.cpp, same file, 2 threads, batch 1 (93 tokens/s)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every linear's weights once (packed or not), not the
    embedding table (only the looked-up rows are read)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += sum(t.numel() * t.element_size() for t in (m.qweight, m.scales, m.mins)
                         if t is not None)
        elif hasattr(m, "in_features") and hasattr(m, "out_features"):
            total += m.in_features * m.out_features * 4
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    bw = copy_bandwidth()
    rows = []
    for quant in ("auto", "none"):
        eng = Engine(EngineConfig(device="cpu", dtype="float32", max_concurrency=max(batches),
                                  max_seq_len=128, quantization=quant))
        nbytes = weight_bytes(eng.model)
        for b in batches:
            t = flover_step(eng, b, args.steps)
            rows.append({"weights": "gguf-packed" if quant == "auto" else "float32", "batch": b,
                         "ms": t * 1e3, "tok_s": b / t, "weight_bytes": nbytes,
                         "floor_ms": nbytes / bw * 1e3, "over_floor": t / (nbytes / bw)})
        del eng
    load = os.getloadavg()
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; copy bandwidth {bw / 1e9:.1f} GB/s; load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"{'weights':>12} {'batch':>5} {'ms/step':>8} {'tok/s':>7} {'MB read':>8} {'floor ms':>8} "
          f"{'x floor':>7} {'vs llama.cpp b1':>15}")
    for r in rows:
        print(f"{r['weights']:>12} {r['batch']:>5} {r['ms']:>8.2f} {r['tok_s']:>7.1f} "
              f"{r['weight_bytes'] / 1e6:>8.1f} {r['floor_ms']:>8.2f} {r['over_floor']:>7.2f} "
              f"{r['tok_s'] / (1e3 / LLAMA_CPP_B1_MS):>14.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "threads": torch.get_num_threads(),
                       "copy_bandwidth": bw, "load_average": load, "torch": torch.__version__,
                       "llama_cpp_b1_ms": LLAMA_CPP_B1_MS, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

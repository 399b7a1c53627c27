"""Decode tokens/s on the CPU with the embedded GGUF kept quantized, against float32.

flover runs the embedded SmolLM2-135M-Instruct twice in this process: with its GGUF file's own
Q4_1/Q8_0 blocks kept packed (quantization="auto", the default on the CPU) and dequantised to
float32 (quantization="none", the baseline), B requests decoding together, median step time
over --steps iterations after warm-up (bench/cpu_step.py's method). `--llama-cpp PYTHON` runs
llama.cpp on the same file in the same run, before and after flover (bench/llama_cpp_step.py
under an interpreter that has llama-cpp-python, which builds from source in ~8 minutes on 2
cores); without it, the figure of DESIGN.md section 4 stands in (10.7 ms, 2 threads, on the
2-core AMD EPYC of 2026-11-26: not this machine, unless it is one).

`--cpu-ops both` runs every row twice, with the compiled CPU ops (flover/ops/fused_cpu.c:
RMSNorm, rotary, silu_mul, the cache write, decode attention) off and on, alternating over
`--rounds` rounds in this process, so that a noisy machine weighs on both alike; `--cpu-layer
both` does the same with the decode layer in one compiled call (flover/ops/layer_cpu.c) off
and on. `--scales
both` does the same with the packed model's float16 scales and mins as the file has them
and widened to float32 (the same values; `quant.Layout.wide`, which the K-quants load as).

    python bench/cpu_quant_step.py --batches 1,8 --out cpu_quant.json
    python bench/cpu_quant_step.py --cpu-ops both --rounds 3
    python bench/cpu_quant_step.py --scales both --rounds 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

import torch
from cpu_step import copy_bandwidth, flover_step  # beside this file

from flover import Engine, EngineConfig
from flover.ops import fused, layer_cpu
from flover.ops.quant import QuantLinear
from flover.weights import default_model_path

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


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def llama_cpp_ms(python: str, rounds: int) -> dict:
    """llama.cpp's batch-1 ms per token on the embedded file (bench/llama_cpp_step.py)."""
    script = Path(__file__).with_name("llama_cpp_step.py")
    out = subprocess.run([python, str(script), str(default_model_path()), "--rounds", str(rounds),
                          "--threads", str(torch.get_num_threads())],
                         check=True, capture_output=True, text=True, timeout=1200)
    return json.loads(out.stdout.strip().splitlines()[-1])


def scale_widths(model: torch.nn.Module, widths: list[str]):
    """A function that gives every QuantLinear its scales and mins in `width` ("float16" as
    loaded, "float32" widened), each kept once."""
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    kept = {"float16": [(m.scales, m.mins) for m in mods]}
    if "float32" in widths:
        kept["float32"] = [(torch.nn.Parameter(s.float(), requires_grad=False),
                            None if n is None else torch.nn.Parameter(n.float(), requires_grad=False))
                           for s, n in kept["float16"]]

    def use(width: str) -> None:
        for m, (s, n) in zip(mods, kept[width], strict=True):
            m.scales, m.mins = s, n
    return use


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--cpu-ops", choices=("on", "off", "both"), default="on",
                    help="the compiled CPU ops (fused_cpu.c); both: off and on, alternating")
    ap.add_argument("--cpu-layer", choices=("on", "off", "both"), default="on",
                    help="the decode layer in one compiled call (layer_cpu.c); both: alternating")
    ap.add_argument("--scales", choices=("float16", "float32", "both"), default="float16",
                    help="the packed model's scales and mins as loaded, widened, or both alternating")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds (median of all)")
    ap.add_argument("--llama-cpp", metavar="PYTHON", default=None,
                    help="an interpreter with llama-cpp-python: llama.cpp in the same run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    ops = {"on": [True], "off": [False], "both": [False, True]}[args.cpu_ops]
    widths = ["float16", "float32"] if args.scales == "both" else [args.scales]
    layers = {"on": [True], "off": [False], "both": [False, True]}[args.cpu_layer]
    bw = copy_bandwidth()
    rows = []
    lcpp = [llama_cpp_ms(args.llama_cpp, args.rounds)] if args.llama_cpp else []
    for quant in ("auto", "none"):
        eng = Engine(EngineConfig(device="cpu", dtype="float32", max_concurrency=max(batches),
                                  max_seq_len=128, quantization=quant))
        use_width = scale_widths(eng.model, widths)
        times: dict[tuple[int, bool, str, bool], list[float]] = {}
        nbytes: dict[str, int] = {}
        for _ in range(args.rounds):
            for b in batches:
                for on in ops:
                    for width in widths if quant == "auto" else ["-"]:
                        for layer in layers if quant == "auto" else [False]:
                            if quant == "auto":
                                use_width(width)
                            nbytes[width] = weight_bytes(eng.model)
                            fused.ENABLED, layer_cpu.ENABLED = on, layer
                            times.setdefault((b, on, width, layer), []).append(
                                flover_step(eng, b, args.steps))
        fused.ENABLED = layer_cpu.ENABLED = True
        for (b, on, width, layer), ts in times.items():
            t = statistics.median(ts)
            name = f"packed-{width[5:]}" if quant == "auto" else "float32"
            rows.append({"weights": name + ("+layer" if layer else ""), "scales": width,
                         "cpu_layer": layer, "batch": b,
                         "cpu_ops": on, "ms": t * 1e3, "ms_rounds": [x * 1e3 for x in ts],
                         "tok_s": b / t, "weight_bytes": nbytes[width],
                         "floor_ms": nbytes[width] / bw * 1e3, "over_floor": t / (nbytes[width] / bw)})
        del eng
    if args.llama_cpp:
        lcpp.append(llama_cpp_ms(args.llama_cpp, args.rounds))
    b1_ms = statistics.median(r["ms"] for r in lcpp) if lcpp else LLAMA_CPP_B1_MS
    load = os.getloadavg()
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; copy bandwidth {bw / 1e9:.1f} GB/s; load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"{'weights':>12} {'batch':>5} {'cpu ops':>7} {'ms/step':>8} {'tok/s':>7} {'MB read':>8} "
          f"{'floor ms':>8} {'x floor':>7} {'vs llama.cpp b1':>15}")
    for r in rows:
        print(f"{r['weights']:>12} {r['batch']:>5} {'on' if r['cpu_ops'] else 'off':>7} "
              f"{r['ms']:>8.2f} {r['tok_s']:>7.1f} "
              f"{r['weight_bytes'] / 1e6:>8.1f} {r['floor_ms']:>8.2f} {r['over_floor']:>7.2f} "
              f"{r['tok_s'] / (1e3 / b1_ms):>14.2f}x")
    runs = ", ".join(f"{r['ms']:.2f}" for r in lcpp)
    print(f"llama.cpp batch 1: {b1_ms:.2f} ms ({1e3 / b1_ms:.1f} tok/s), "
          + (f"this run (before / after flover: {runs} ms)" if lcpp
             else "DESIGN.md's figure (another CPU), not this run"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "threads": torch.get_num_threads(),
                       "copy_bandwidth": bw, "load_average": load, "torch": torch.__version__,
                       "llama_cpp_b1_ms": b1_ms, "llama_cpp_runs": lcpp, "cpu": cpu_name(),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

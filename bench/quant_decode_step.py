"""GPU decode step over its floor with weight-only int8 / int4 (Triton), against fp16.

bench/decode_step.py's method (one fused decode step with CUDA graphs, median of --iters,
floor = bytes read / device-to-device copy bandwidth) for a preset with random weights,
run in full precision (`--dtype`, fp16 or bf16: the activations' dtype throughout), then
quantized to int8 and to int4 (groups of 32, float16 scales) in the same process; the width
named "fp16" is the model in `--dtype` whichever it is. First checks the kernel against its
reference at the model's shapes. A width named with "-ptr" (int8-ptr, int4-ptr) runs with the
TMA forms off (`launch.TMA`: the bytes stay in the K order, the pointer form reads them), one
with "-unfused" with the residual add and SiLU * up as ops of their own
(`fused.QUANT_EPILOGUES`), one with "-cvt" with the "float" dequantisation's q made by
int -> float conversions instead of the float32 trick (bfloat16 activations), one with "-s4"
with K in four parts for every shape (session 9's configuration), one with "-pdl" with the
step's Triton kernels launched with programmatic dependent launch (`launch.ENABLED`: each
product first asks for its part's leading weights in L2, then waits for the kernel before
it), one with "-old" with `--old`'s quant_mm (another quant_triton.py, the kernel before), to
compare. `--config` is merged into both forms' launch configurations.

    python3 bench/quant_decode_step.py --out quant_decode_step.json [--dtype bf16]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json

import torch
from decode_step import DTYPES, copy_bandwidth, decode_batch, time_steps, weight_bytes_read
from quant_linear import load_quant_module

from flover.engine.kv_cache import SlotCache
from flover.engine.runner import ModelRunner
from flover.models.layers import init_random
from flover.models.presets import preset
from flover.ops import fused, launch, quant, quant_triton
from flover.ops.quant_triton import quant_mm
from flover.weights import allocate, quantize_model


def check_kernel(n: int, k: int, dtype: torch.dtype) -> dict:
    """Max abs error of the kernel against F.linear on the dequantised matrix."""
    out = {}
    w = torch.randn(n, k, device="cuda") * 0.02
    for bits in (8, 4):
        p = quant.quantize(w, bits)
        ref_w = p.dequantize().to(dtype)
        for m in (1, 32):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = torch.nn.functional.linear(x.float(), ref_w.float())
            y = quant_mm(x, p.qweight, p.scales, p.mins, bits, p.group).float()
            out[f"int{bits}_m{m}"] = float((y - ref).abs().max() / ref.abs().max())
            if quant_triton.mma_order_applies(x.device, dtype, k, p.group):
                q = quant.to_mma_order(p.qweight, bits)
                y = quant_mm(x, q, p.scales, p.mins, bits, p.group, mma_order=True).float()
                out[f"int{bits}_m{m}_mma"] = float((y - ref).abs().max() / ref.abs().max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_7b")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--weights", default="fp16,int8,int4")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--config", default=None,
                    help="JSON merged into quant_triton.default_config and tma_config (both widths)")
    ap.add_argument("--old", default=None,
                    help="path of another quant_triton.py: widths named with '-old' run its quant_mm")
    ap.add_argument("--out", default="quant_decode_step.json")
    args = ap.parse_args()
    shipped_mm = quant_triton.quant_mm
    old_mm = load_quant_module(args.old).quant_mm if args.old else None
    if args.config:
        extra = json.loads(args.config)
        for name in ("default_config", "tma_config"):
            base = getattr(quant_triton, name)
            setattr(quant_triton, name, lambda *a, base=base: base(*a) | extra)
    batches = [int(b) for b in args.batches.split(",")]
    bw = copy_bandwidth()
    card = torch.cuda.get_device_name()
    cfg = preset(args.model)
    dtype = DTYPES[args.dtype]
    errs = check_kernel(cfg.intermediate_size, cfg.hidden_size, dtype)
    print(f"{card}: copy {bw / 1e12:.3f} TB/s; kernel vs reference (max rel err): {errs}", flush=True)
    rows = []
    shipped_tma, shipped_epilogues, shipped_pdl = launch.TMA, fused.QUANT_EPILOGUES, launch.ENABLED
    shipped_tma_config = quant_triton.tma_config
    for quantization in args.weights.split(","):
        launch.TMA = shipped_tma and not quantization.endswith("-ptr")
        fused.QUANT_EPILOGUES = shipped_epilogues and not quantization.endswith("-unfused")
        launch.set_enabled(shipped_pdl or quantization.endswith("-pdl"))
        quant_triton.quant_mm = old_mm if quantization.endswith("-old") else shipped_mm
        quant_triton.tma_config = shipped_tma_config
        extra = ({"dequant": "cvt"} if quantization.endswith("-cvt")
                 else {"split": 4} if quantization.endswith("-s4") else {})
        if extra:
            quant_triton.tma_config = lambda *a, extra=extra: shipped_tma_config(*a) | extra
        model = allocate(cfg, dtype, torch.device("cuda"))
        init_random(model, seed=0)
        if not quantization.startswith("fp16"):
            quantize_model(model, 8 if quantization.startswith("int8") else 4)
            quant.use_mma_order(model)  # as load_model does (where launch.TMA)
            gc.collect()
            torch.cuda.empty_cache()
        cache = SlotCache(cfg.num_layers, max(batches), cfg.num_kv_heads, args.context + 8,
                          cfg.head_dim, dtype, torch.device("cuda"))
        cache.k.normal_()
        cache.v.normal_()
        wbytes = weight_bytes_read(model)
        kv_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * cache.k.element_size()
        runner = ModelRunner(model, cache, cuda_graphs=True)
        for b in batches:
            kv = b * (args.context + 1) * kv_token
            floor = (wbytes + kv) / bw * 1e3
            ms = time_steps(runner, decode_batch(b, args.context), args.iters)
            rows.append({"weights": quantization, "batch": b, "step_ms": ms, "floor_ms": floor,
                         "over_floor": ms / floor, "weight_bytes": wbytes, "kv_bytes": kv})
            print(f"{quantization} B={b}: {ms:.3f} ms, floor {floor:.3f} ms, x{ms / floor:.2f}",
                  flush=True)
        del model, cache, runner
        gc.collect()
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"card": card, "date": datetime.date.today().isoformat(), "model": args.model,
                   "dtype": args.dtype,
                   "context": args.context, "torch": torch.__version__, "copy_bandwidth_Bps": bw,
                   "kernel_rel_err": errs, "config": args.config, "rows": rows}, f, indent=1)
    fp16 = {r["batch"]: r["step_ms"] for r in rows if r["weights"] == "fp16"}
    print(f"\n{card}, {args.model} {args.dtype}, context {args.context}, "
          f"copy {bw / 1e12:.3f} TB/s")
    print(f"{'weights':>7} {'B':>3} {'step ms':>8} {'floor ms':>8} {'x floor':>7} {'vs fp16':>7}")
    for r in rows:
        print(f"{r['weights']:>7} {r['batch']:>3} {r['step_ms']:8.3f} {r['floor_ms']:8.3f} "
              f"{r['over_floor']:7.2f} {fp16.get(r['batch'], float('nan')) / r['step_ms']:6.2f}x")


if __name__ == "__main__":
    main()

"""Where a decode step's GPU time goes: kernels grouped by name, eager mode, torch.profiler.

    python3 bench/profile_step.py --model llama_7b --batch 32 --out profile.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from decode_step import DTYPES, VARIANTS, apply_variant, decode_batch
from torch.profiler import ProfilerActivity, profile

from flover.engine.kv_cache import SlotCache
from flover.engine.runner import ModelRunner
from flover.models.layers import init_random
from flover.models.presets import preset
from flover.ops import quant
from flover.ops.linear import swap_linears
from flover.weights import allocate, quantize_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_7b")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--batch-invariant", action="store_true",
                    help="the batch-invariant linear and attention (EngineConfig's default)")
    ap.add_argument("--variant", default=None, choices=sorted(VARIANTS),
                    help="the invariant step's form (bench/decode_step.py's variants)")
    ap.add_argument("--quantization", default=None, choices=["int8", "int4"],
                    help="weight-only int8 / int4 (groups of 32, in the mma order where it applies)")
    ap.add_argument("--out", default="profile.json")
    args = ap.parse_args()
    cfg = preset(args.model)
    model = allocate(cfg, DTYPES[args.dtype], torch.device("cuda"))
    init_random(model, 0)
    cache = SlotCache(cfg.num_layers, args.batch, cfg.num_kv_heads, args.context + 8,
                      cfg.head_dim, DTYPES[args.dtype], torch.device("cuda"))
    cache.k.normal_()
    cache.v.normal_()
    if args.quantization:
        quantize_model(model, int(args.quantization[3:]))
        quant.use_mma_order(model)  # as load_model does
    apply_variant(args.variant)
    if args.batch_invariant:
        swap_linears(model)
    runner = ModelRunner(model, cache, cuda_graphs=False, batch_invariant=args.batch_invariant)
    batch = decode_batch(args.batch, args.context)
    for _ in range(3):
        runner.run(batch)
    steps = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.run(batch)
    by_name: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name[e.name[:90]] += e.device_time / steps / 1e3
    total = sum(by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1])
    print(f"{args.model} {args.dtype} B={args.batch} invariant={args.batch_invariant} "
          f"variant={args.variant} quantization={args.quantization}: "
          f"{total:.3f} ms of kernels per step")
    for name, ms in top[:18]:
        print(f"{ms:8.3f} ms {100 * ms / total:5.1f}%  {name}")
    with open(args.out, "w") as f:
        json.dump({"card": torch.cuda.get_device_name(), "total_ms": total,
                   "kernels_ms": dict(top)}, f, indent=1)


if __name__ == "__main__":
    main()

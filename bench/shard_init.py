"""How long a rank takes to build its shard of a random preset (`load_sharded`'s preset path),
on one GPU and without a process group: allocate rank r's shard of `world`, draw its weights
(`init_random_shard`), synchronise. What every rank of a tp=world run pays at start.

    python3 bench/shard_init.py --model llama_65b --world 4 8
"""

from __future__ import annotations

import argparse
import time

import torch

from flover.distributed import init_random_shard, shard_model
from flover.models.presets import preset
from flover.weights import allocate


def build(name: str, rank: int, world: int, device: torch.device) -> tuple[float, float]:
    """(seconds, GB of parameters) for rank `rank`'s shard."""
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    model = shard_model(allocate(preset(name), torch.float16, torch.device("meta")), rank, world)
    model = model.to_empty(device=device)
    for m in model.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()
    init_random_shard(model, 0, rank, world)
    torch.cuda.synchronize(device)
    took = time.perf_counter() - t0
    gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    del model
    torch.cuda.empty_cache()
    return took, gb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="llama_65b")
    ap.add_argument("--world", type=int, nargs="+", default=[4, 8])
    args = ap.parse_args()
    dev = torch.device("cuda")
    build("tiny_llama", 0, 2, dev)  # CUDA context and allocator warm-up
    print(f"shard_init: {args.model} fp16 on {torch.cuda.get_device_name(dev)}, "
          f"torch {torch.__version__}")
    print(f"  {'world':>5} {'rank':>4} {'GB':>7} {'seconds':>8}")
    for w in args.world:
        for r in sorted({0, w - 1}):
            took, gb = build(args.model, r, w, dev)
            print(f"  {w:>5} {r:>4} {gb:>7.1f} {took:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

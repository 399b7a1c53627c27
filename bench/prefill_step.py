"""Prefill time with batch invariance off and on: one prompt of L tokens prefilled whole.

Invariance sends every prompt token through the per-row attention kernel (each token reads
its whole prefix: O(L^2) cache reads where SDPA's flash attention reads tiles once), and the
linear layers through the Triton product; this measures what that costs. CUDA events,
median of --iters `ModelRunner.run` calls (the forward, the last token's logits, argmax).
`--variants` times the invariant prefill in several forms (`decode_step.VARIANTS`), e.g.
`tokens1`: attention's tile per prompt token, as before a prompt's consecutive tokens shared
one (the last token's logits are compared with the first variant's, bitwise).

    python3 bench/prefill_step.py --lengths 128,512,2048 --out prefill_step.json [--variants ,tokens1]
"""

from __future__ import annotations

import argparse
import json

import torch
from decode_step import DTYPES, apply_variant, time_steps

from flover.config import SamplingParams
from flover.engine.kv_cache import SlotCache
from flover.engine.runner import ModelRunner
from flover.engine.scheduler import Batch, Chunk
from flover.engine.sequence import Request
from flover.models.layers import init_random
from flover.models.presets import preset
from flover.ops.linear import swap_linears
from flover.weights import allocate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_7b")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--lengths", default="128,512,2048")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default="prefill_step.json")
    ap.add_argument("--variants", default="", help="comma-separated forms of the invariant "
                    "prefill (an empty name: as shipped); default: as shipped only")
    args = ap.parse_args()
    cfg = preset(args.model)
    lengths = [int(x) for x in args.lengths.split(",")]
    model = allocate(cfg, DTYPES[args.dtype], torch.device("cuda"))
    init_random(model, seed=0)
    cache = SlotCache(cfg.num_layers, 1, cfg.num_kv_heads, max(lengths) + 8, cfg.head_dim,
                      DTYPES[args.dtype], torch.device("cuda"))
    rows, first = [], {}
    variants = args.variants.split(",") if args.variants else [""]
    for on, variant in [(False, "")] + [(True, v) for v in variants]:
        if on and not any(r["batch_invariant"] for r in rows):
            swap_linears(model)  # off first: on swaps the linear layers for good
        apply_variant(variant or None)
        runner = ModelRunner(model, cache, cuda_graphs=False, batch_invariant=on)
        for n in lengths:
            r = Request("p", [5] * n, SamplingParams(temperature=0.0, max_tokens=1))
            batch = Batch([], [Chunk(r, 0, 0, n)], [r], [0])
            ms = time_steps(runner, batch, args.iters)
            logits = runner.forward_logits(batch)
            same = bool(torch.equal(first.setdefault((on, n), logits), logits))
            rows.append({"model": args.model, "dtype": args.dtype, "tokens": n,
                         "batch_invariant": on, "variant": variant, "ms": ms,
                         "logits_equal_first": same})
            print(f"{args.model} {args.dtype} prompt {n:5d}  invariant {'on ' if on else 'off'} "
                  f"{variant:10s} {ms:9.2f} ms  logits as the first variant's: {same}",
                  flush=True)
        apply_variant(None)
    with open(args.out, "w") as f:
        json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

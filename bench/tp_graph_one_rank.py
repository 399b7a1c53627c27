"""NCCL all-reduces captured inside the decode CUDA graphs, checked on ONE GPU.

With one GPU there is no tensor parallelism to measure, but the mechanism can be checked: a
one-rank NCCL group, the model's row-parallel layers swapped for `RowParallel` (an NCCL
all_reduce after each of them, two per layer, as at tp=k), and the engine's decode graphs
captured around them. It reports whether capture and replay work, whether greedy tokens equal
those of the plain model (no all-reduce) with graphs and of the all-reduce model run eagerly,
and the decode step (median wall time, `ModelRunner.run`) of each at B=1 and B=32.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 1 bench/tp_graph_one_rank.py --out x.json
"""

from __future__ import annotations

import argparse
import gc
import json

import torch
from decode_step import decode_batch  # bench/ is on the path of a script run from it
from tp_check import prompts, step_ms

from flover import Engine, EngineConfig, SamplingParams
from flover.distributed import ROW, RowParallel, init_distributed
from flover.engine.runner import ModelRunner
from flover.models.layers import init_random
from flover.models.presets import preset
from flover.weights import allocate


def row_parallel(model: torch.nn.Module) -> int:
    """Swap every row-parallel Linear for RowParallel over the default (NCCL) group."""
    n = 0
    for mod in list(model.modules()):
        for attr in ROW:
            lin = getattr(mod, attr, None)
            if isinstance(lin, torch.nn.Linear):
                setattr(mod, attr, RowParallel(lin.weight.data, None if lin.bias is None
                                               else lin.bias.data))
                n += 1
    return n


def run(model, args, graphs: bool) -> dict:
    # cuBLAS products in every run (batch_invariant=False): RowParallel multiplies with
    # F.linear, and an invariant engine would swap the plain model's linears in place, so the
    # plain and all-reduce runs would differ in their products, not in the all-reduces
    eng = Engine(EngineConfig(max_concurrency=max(args.batches), max_seq_len=args.context + 64,
                              cuda_graphs=graphs, dtype="float16", device="cuda",
                              batch_invariant=False), model=model)
    for i, p in enumerate(prompts(4, model.cfg.vocab_size)):
        eng.add_request(f"p{i}", p, SamplingParams(max_tokens=args.tokens, temperature=0.0,
                                                   ignore_eos=True))
    tokens = {o.request_id: o.token_ids for o in eng.run_until_done() if o.finished}
    eng.cache.k.normal_()
    eng.cache.v.normal_()
    runner = eng.runner if graphs else ModelRunner(model, eng.cache, cuda_graphs=False)
    steps = {b: step_ms(runner, decode_batch(b, args.context), args.iters, eng.device)
             for b in args.batches}
    out = {"tokens": [tokens[f"p{i}"] for i in range(4)], "steps_ms": steps}
    del eng, runner
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="llama_7b")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--plain-only", action="store_true", help="only the plain model (to compare "
                    "another checkout's tp=1 tokens)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    g = init_distributed("cuda")
    assert g.world == 1, "run it with torchrun --nproc-per-node 1"
    model = allocate(preset(args.model), torch.float16, g.device)
    init_random(model, 0)
    res = {"plain graphs": run(model, args, graphs=True)}
    swapped = 0 if args.plain_only else row_parallel(model)
    for name, graphs in () if args.plain_only else (("all-reduce graphs", True),
                                                     ("all-reduce eager", False)):
        try:
            res[name] = run(model, args, graphs)
        except Exception as e:  # noqa: BLE001 - report a failed capture, do not hide it
            res[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    card = torch.cuda.get_device_name(g.device)
    print(f"tp_graph_one_rank: {args.model} fp16 on 1 x {card}, torch {torch.__version__}, "
          f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}; {swapped} RowParallel layers")
    ref = res["plain graphs"]["tokens"]
    print(f"  {'run':<18} {'tokens == plain':>15} " + " ".join(f"{f'B={b} ms':>9}"
                                                          for b in args.batches))
    for name, r in res.items():
        if "error" in r:
            print(f"  {name:<18} FAILED: {r['error']}")
            continue
        same = "yes" if r["tokens"] == ref else "NO"
        print(f"  {name:<18} {same:>15} " + " ".join(f"{r['steps_ms'][b]:>9.3f}"
                                                    for b in args.batches))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "card": card, "torch": torch.__version__,
                       "context": args.context, "iters": args.iters, "results": res}, f, indent=1)
    ok = all("error" not in r and r["tokens"] == ref for r in res.values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

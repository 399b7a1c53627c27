"""Tensor parallelism check: tp=k gives tp=1's tokens, and what it does to the decode step.

Run under torchrun, one process per GPU (NCCL), a preset with random weights:

    torchrun --nproc-per-node 2 bench/tp_check.py --out tp_check.json
    torchrun --nproc-per-node 2 bench/tp_check.py --device cpu --model tiny_llama --dtype fp32

1. Rank 0 alone runs the unsharded model (tp=1) while the others wait: greedy tokens of a few
   prompts fused in one engine, the prompt logits, and the decode step time at each batch.
2. Every rank loads its shard (the same random weights, sliced); rank 0 runs the same
   requests and timings, the other ranks follow its plans (one forward per plan).
3. Rank 0 reports: tokens tp=k vs tp=1 (in fp16 a near-tie may flip a token: the first
   divergence is shown), whether every follower ran exactly rank 0's forwards and computed
   rank 0's logits bits, the prompt logits' largest difference, and step times.

A decode step is `ModelRunner.run` over B rows at context C (forward, logits, greedy
argmax, the tokens' host copy; at tp=k also the plan's broadcast), median wall time of
--iters. Both tp=1 and tp=k are timed eagerly (like for like) and with CUDA graphs (at tp=k
the NCCL all-reduces are captured inside the graph; `--no-graphs` skips that).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist
from decode_step import decode_batch  # bench/ is on the path of a script run from it

from flover import Engine, EngineConfig, SamplingParams
from flover.distributed import init_distributed, init_random_shard
from flover.engine.runner import ModelRunner
from flover.engine.scheduler import Batch
from flover.models.presets import PRESETS, preset
from flover.ops.attention import AttentionMetadata, PrefillChunk
from flover.weights import allocate

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (5 + 7 * i,), generator=g).tolist() for i in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_ms(runner: ModelRunner, batch: Batch, iters: int, device: torch.device) -> float:
    for _ in range(3):
        runner.run(batch)
    times = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        runner.run(batch)  # ends in the tokens' device-to-host copy
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def prompt_logits(eng: Engine, ids: list[int]) -> torch.Tensor:
    n, dev = len(ids), eng.device
    meta = AttentionMetadata(slot_ids=torch.zeros(n, dtype=torch.long, device=dev),
                             positions=torch.arange(n, device=dev), num_decode=0,
                             decode_lengths=None, decode_max_len=0,
                             prefills=[PrefillChunk(0, 0, n, 0)])
    with torch.inference_mode():
        hidden = eng.model(torch.tensor(ids, device=dev), meta, eng.cache.k, eng.cache.v)
        return eng.model.logits(hidden).cpu()


def measure(args, tp: int, device: torch.device, graphs: bool) -> dict:
    """Tokens, prompt logits and step times of one engine (tp=1, or tp=k: rank 0 leads and
    times, the other ranks follow its plans)."""
    slots = max(max(args.batches), args.prompts)
    model = None
    if tp == 1 and args.model in PRESETS:  # the weights the ranks draw their shards of
        model = allocate(preset(args.model), getattr(torch, DTYPES[args.dtype]), device)
        init_random_shard(model, 0)
    eng = Engine(EngineConfig(model=args.model, dtype=DTYPES[args.dtype], device=str(device),
                              max_concurrency=slots, max_seq_len=args.context + 64,
                              tensor_para_size=tp, seed=0, cuda_graphs=graphs), model=model)
    ps = prompts(args.prompts, eng.model.cfg.vocab_size)
    out: dict = {"steps": {}}
    if eng.follower:
        out["forwards"] = eng.follow()
    else:
        for i, p in enumerate(ps):
            eng.add_request(f"p{i}", p, SamplingParams(max_tokens=args.tokens, temperature=0.0,
                                                       ignore_eos=True))
        tokens = {o.request_id: o.token_ids for o in eng.run_until_done() if o.finished}
        eng.close()
        out |= {"tokens": [tokens[f"p{i}"] for i in range(len(ps))],
                "iterations": eng.stats()["iterations"]}
    out["logits"] = prompt_logits(eng, ps[-1])  # every rank runs this forward alike
    eng.cache.k.normal_()
    eng.cache.v.normal_()
    kinds = {"eager": False}
    if device.type == "cuda" and graphs:
        kinds["graphs"] = True
    for kind, g in kinds.items():
        runner = ModelRunner(eng.model, eng.cache, cuda_graphs=g, channel=eng.leading_channel)
        if eng.follower:
            while (plan := eng.channel.recv()) is not None:
                runner.follow(plan)
            continue
        for b in args.batches:
            out["steps"][f"{kind}/{b}"] = step_ms(runner, decode_batch(b, args.context),
                                                  args.iters, device)
        if eng.channel is not None:
            eng.channel.send(None)
        del runner
    del eng
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def agree(a: list[int], b: list[int]) -> int:
    """Leading tokens in common."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="llama_7b")
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--context", type=int, default=512, help="KV length of the timed rows")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="tp=k with CUDA graphs (NCCL all-reduces captured), besides eager")
    ap.add_argument("--out", default=None, help="write the numbers as JSON")
    args = ap.parse_args()
    if args.model in PRESETS:  # the slots hold context + 64 positions
        args.context = min(args.context, PRESETS[args.model].max_position - 64)

    g = init_distributed(args.device)
    ctrl = g.control  # gloo: host-side agreement without touching the GPUs
    if g.world < 2:
        print("tp_check: start it with torchrun --nproc-per-node 2 (or more)", file=sys.stderr)
        return 2
    single = measure(args, 1, g.device, graphs=True) if g.rank == 0 else None
    dist.barrier(group=ctrl)
    shard = measure(args, g.world, g.device, graphs=args.graphs)
    every = [None] * g.world
    dist.all_gather_object(every, (shard.get("iterations"), shard.get("forwards"),
                                   shard["logits"]), group=ctrl)
    if g.rank != 0:
        return 0

    # every follower ran one forward per iteration of rank 0's, and got rank 0's logits bits
    ranks_agree = all(f == every[0][0] and torch.equal(x, every[0][2]) for _, f, x in every[1:])
    rows = [{"prompt": i, "tokens": len(t1), "agree": agree(t1, tk), "equal": t1 == tk}
            for i, (t1, tk) in enumerate(zip(single["tokens"], shard["tokens"], strict=True))]
    diff = (single["logits"] - shard["logits"]).abs().max().item()
    card = torch.cuda.get_device_name(g.device) if g.device.type == "cuda" else "cpu"
    k = g.world
    print(f"tp_check: {args.model} {args.dtype}, tp={k} vs tp=1 on {k} x {card}, "
          f"torch {torch.__version__}")
    for r in rows:
        state = "equal" if r["equal"] else f"first difference at token {r['agree']}"
        print(f"  prompt {r['prompt']}: {r['tokens']} greedy tokens, tp={k} vs tp=1: {state}")
    print(f"  the {k - 1} follower(s) ran one forward per plan, with rank 0's logits bits: "
          f"{'yes' if ranks_agree else 'NO'}")
    print(f"  prompt logits, largest |tp={k} - tp=1|: {diff:.3g}")
    print(f"  decode step, context {args.context}, median of {args.iters} (ms):")
    print(f"    {'B':>4} {'tp1 graphs':>11} {'tp1 eager':>10} {f'tp{k} eager':>10} "
          f"{'speedup':>8}" + (f" {f'tp{k} graphs':>11}" if args.graphs else ""))

    def fmt(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else "failed")

    for b in args.batches:
        s1, sg, sk = (single["steps"].get(f"eager/{b}"), single["steps"].get(f"graphs/{b}"),
                      shard["steps"].get(f"eager/{b}"))
        speed = s1 / sk if isinstance(s1, float) and isinstance(sk, float) else None
        line = (f"    {b:>4} {fmt(sg):>11} {fmt(s1):>10} {fmt(sk):>10} "
                f"{(f'{speed:.2f}x' if speed else '-'):>8}")
        if args.graphs:
            line += f" {fmt(shard['steps'].get(f'graphs/{b}')):>11}"
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "dtype": args.dtype, "tp": k, "card": card,
                       "torch": torch.__version__, "context": args.context, "iters": args.iters,
                       "tokens": rows, "ranks_agree": ranks_agree, "logits_max_diff": diff,
                       "tp1_steps_ms": single["steps"], f"tp{k}_steps_ms": shard["steps"]},
                      f, indent=1)
        print(f"wrote {args.out}")
    exact = args.dtype == "fp32"
    return 0 if ranks_agree and (not exact or all(r["equal"] for r in rows)) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""KV layouts on one GPU: the slot cache against the paged cache, with the same KV memory.

LLaMA-7B shapes, fp16, random weights (rotary tables extended to max_seq_len 4096), all in
one process, in this order:
0. check: the paged Triton decode kernel against its PyTorch reference at LLaMA-7B shapes,
   and a row's output alone == fused (bitwise).
1. saturation: --requests requests with seeded long-tailed lengths (log-normal, means about
   1,000 prompt and 250 output tokens) all waiting at t=0; each layout runs for --window
   seconds. Slots: --slots slots of 4096 positions; pages: the same memory in blocks of 16,
   max_concurrency 256. Reported: requests in flight (mean over the last two thirds of the
   window, and peak) and output tokens/s over the last two thirds.
2. shared prefix: 32 requests arriving together, a 2,000-token prefix and 16-64 tokens of
   their own, 16 new tokens each; pages with and without prefix caching. Reported: prompt
   tokens computed, time to first token p50 and p90.
3. decode step over its floor (weights + live KV bytes over the copy bandwidth measured in
   the same run), slots vs pages, B=1 and 32 at context --context, CUDA graphs.

    python3 bench/kv_layouts.py --out kv_layouts.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import statistics
import time
import traceback

import torch
from decode_step import copy_bandwidth, decode_batch, time_steps, weight_bytes_read

from flover import Engine, EngineConfig, SamplingParams
from flover.engine.kv_cache import PagedCache, SlotCache
from flover.engine.runner import ModelRunner
from flover.engine.scheduler import Batch
from flover.models.layers import init_random
from flover.models.presets import preset
from flover.weights import allocate

MAX_SEQ_LEN = 4096
BLOCK = 16


def long_tailed(n: int, mean: float, sigma: float, gen: torch.Generator) -> list[float]:
    """Log-normal draws with the given mean."""
    return torch.empty(n).log_normal_(math.log(mean) - sigma ** 2 / 2, sigma, generator=gen).tolist()


def workload(n: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    gen = torch.Generator().manual_seed(seed)
    prompts = long_tailed(n, 1000, 0.9, gen)
    outputs = long_tailed(n, 250, 0.9, gen)
    work = []
    for p, o in zip(prompts, outputs, strict=True):
        p = int(min(max(p, 8), 3500))
        o = int(min(max(o, 4), MAX_SEQ_LEN - p))
        work.append((torch.randint(3, vocab, (p,), generator=gen).tolist(), o))
    return work


def engine(model, **kw) -> Engine:
    cfg = EngineConfig(dtype="float16", device="cuda", max_seq_len=MAX_SEQ_LEN, **kw)
    return Engine(cfg, model=model)


def free() -> None:
    """Release what the caller has deleted."""
    gc.collect()
    torch.cuda.empty_cache()


def check_kernel() -> dict:
    from flover.ops.attention import paged_decode_attention_ref
    from flover.ops.paged_attention_triton import paged_decode_attention

    torch.manual_seed(0)
    lengths = [1, 17, 700, 2049, 3000, 64]
    width = -(-max(lengths) // BLOCK)
    nb = 1 + len(lengths) * width
    perm = torch.randperm(nb - 1) + 1
    tables = perm.view(len(lengths), width).cuda()
    k = torch.randn(nb, 32, BLOCK, 128, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    q = torch.randn(len(lengths), 32, 128, device="cuda", dtype=torch.float16)
    lens = torch.tensor(lengths, device="cuda")
    out = paged_decode_attention(q, k, v, tables, lens, MAX_SEQ_LEN, 128 ** -0.5)
    ref = paged_decode_attention_ref(q, k, v, tables, lens, max(lengths), 128 ** -0.5)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    alone = [paged_decode_attention(q[i:i + 1], k, v, tables[i:i + 1], lens[i:i + 1],
                                    lengths[i], 128 ** -0.5) for i in range(len(lengths))]
    invariant = all(torch.equal(out[i:i + 1], a) for i, a in enumerate(alone))
    print(f"check: paged kernel rel err {err:.1e}, alone == fused bitwise: {invariant}", flush=True)
    return {"rel_err": err, "alone_equals_fused": invariant, "engines": check_engines()}


def check_engines() -> float:
    """tiny_llama fp32 on the GPU (CUDA graphs, Triton kernels): the share of requests whose
    greedy tokens are the same with pages (a pool small enough to preempt) as with slots."""
    gen = torch.Generator().manual_seed(1)
    work = [(torch.randint(3, 256, (int(n),), generator=gen).tolist(), 40)
            for n in torch.randint(5, 120, (12,), generator=gen)]
    outs = []
    for kw in ({"kv_layout": "slots"},
               {"kv_layout": "pages", "block_size": 16, "num_kv_blocks": 40}):
        eng = Engine(EngineConfig(model="tiny_llama", dtype="float32", device="cuda",
                                  max_concurrency=8, max_seq_len=256, **kw))
        for i, (p, n) in enumerate(work):
            eng.add_request(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0.0,
                                                       ignore_eos=True))
        outs.append({o.request_id: o.outputs[0].token_ids for o in eng.run_until_done()
                     if o.finished})
        preempted = eng.stats().get("num_preemptions")
    same = sum(outs[0][k] == outs[1][k] for k in outs[0]) / len(work)
    print(f"check: tiny_llama fp32 greedy, pages == slots for {same:.0%} of requests "
          f"({preempted} preemptions)", flush=True)
    return same


def saturation(model, layout: str, slots: int, work, window: float) -> dict:
    """One layout at saturation; the rows' failed batches, if any, are reported too."""
    if layout == "slots":
        eng = engine(model, max_concurrency=slots, kv_layout="slots", use_mem_shuffle=True)
    else:
        eng = engine(model, max_concurrency=256, kv_layout="pages", block_size=BLOCK,
                     num_kv_blocks=slots * MAX_SEQ_LEN // BLOCK)
    kv_bytes = eng.cache.k.nbytes + eng.cache.v.nbytes
    eng.add_request("warm", work[0][0][:600], SamplingParams(max_tokens=4, temperature=0.0,
                                                             ignore_eos=True))
    list(eng.run_until_done())
    heads = [eng.add_request(f"r{i}", p, SamplingParams(max_tokens=o, temperature=0.0,
                                                        ignore_eos=True))
             for i, (p, o) in enumerate(work)]
    t0 = time.perf_counter()
    trace = []  # (seconds, in flight, output tokens so far, step ms, prompt tokens in it)
    while eng.has_unfinished():
        p0, s0 = eng.scheduler.prefill_tokens, time.perf_counter()
        eng.step()
        t = time.perf_counter() - t0
        trace.append((t, len(eng.scheduler.running), sum(len(h.output_ids) for h in heads),
                      (time.perf_counter() - s0) * 1e3, eng.scheduler.prefill_tokens - p0))
        if t > window:
            break
    steady = [x for x in trace if x[0] >= window / 3]
    pure = [x[3] for x in steady if x[4] == 0]
    mixed = [x for x in steady if x[4] > 0]
    (ta, _, na, _, _), (tb, _, nb, _, _) = steady[0], steady[-1]
    row = {"layout": layout, "kv_bytes": kv_bytes, "steps": len(trace),
           "in_flight_mean": statistics.mean(x[1] for x in steady),
           "in_flight_peak": max(x[1] for x in trace), "tokens_per_s": (nb - na) / (tb - ta),
           "finished": sum(h.finished for h in heads), "stats": eng.stats(),
           "errors": sorted({h.error for h in heads if h.error}),
           "decode_only_steps": len(pure), "decode_only_ms": statistics.mean(pure) if pure else None,
           "mixed_steps": len(mixed),
           "mixed_ms": statistics.mean(x[3] for x in mixed) if mixed else None,
           "mixed_prompt_tokens": statistics.mean(x[4] for x in mixed) if mixed else None}
    print(f"saturation {layout:5s} ({slots} slots' memory): KV {kv_bytes / 2**30:.1f} GiB, in flight mean "
          f"{row['in_flight_mean']:.1f} peak {row['in_flight_peak']}, "
          f"{row['tokens_per_s']:.0f} output tokens/s, {row['finished']} finished, "
          f"{row['stats']['failed_batches']} failed batches {row['errors'][:1]}; steady: "
          f"{len(pure)} decode-only steps of {row['decode_only_ms'] or 0:.1f} ms, {len(mixed)} "
          f"with prompt chunks of {row['mixed_ms'] or 0:.1f} ms "
          f"({row['mixed_prompt_tokens'] or 0:.0f} prompt tokens)", flush=True)
    del eng, heads
    free()
    return row


def shared_prefix(model, caching: bool, vocab: int) -> dict:
    eng = engine(model, max_concurrency=32, kv_layout="pages", block_size=BLOCK,
                 num_kv_blocks=32 * MAX_SEQ_LEN // BLOCK + 1, enable_prefix_caching=caching)
    gen = torch.Generator().manual_seed(5)
    warm = torch.randint(3, vocab, (2100,), generator=gen).tolist()
    eng.add_request("warm", warm, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    list(eng.run_until_done())
    before = eng.stats()["prefill_tokens"]
    prefix = torch.randint(3, vocab, (2000,), generator=gen).tolist()
    tails = [torch.randint(3, vocab, (int(n),), generator=gen).tolist()
             for n in torch.randint(16, 65, (32,), generator=gen)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    heads = [eng.add_request(f"p{i}", prefix + t, params) for i, t in enumerate(tails)]
    list(eng.run_until_done())
    ttft = sorted((h.first_token_time - h.arrival_time) * 1e3 for h in heads)
    s = eng.stats()
    row = {"prefix_caching": caching, "prompt_tokens": sum(len(h.prompt_ids) for h in heads),
           "prefill_tokens": s["prefill_tokens"] - before, "ttft_p50_ms": statistics.median(ttft),
           "ttft_p90_ms": ttft[int(0.9 * len(ttft))], "prefix_cache_hits": s["prefix_cache_hits"]}
    print(f"shared prefix, caching {caching!s:5s}: {row['prefill_tokens']} of "
          f"{row['prompt_tokens']} prompt tokens computed, TTFT p50 {row['ttft_p50_ms']:.1f} ms "
          f"p90 {row['ttft_p90_ms']:.1f} ms", flush=True)
    del eng, heads
    free()
    return row


def decode_steps(model, context: int, batches: list[int], iters: int, bw: float,
                 rounds: int = 5) -> list[dict]:
    cfg = model.cfg
    most = max(batches)
    length = context + 8
    slot_cache = SlotCache(cfg.num_layers, most, cfg.num_kv_heads, length, cfg.head_dim,
                           torch.float16, torch.device("cuda"))
    width = -(-length // BLOCK)
    paged = PagedCache(cfg.num_layers, 1 + most * width, cfg.num_kv_heads, BLOCK, cfg.head_dim,
                       torch.float16, torch.device("cuda"), most, length)
    for c in (slot_cache, paged):
        c.k.normal_()
        c.v.normal_()
    perm = (torch.randperm(most * width, generator=torch.Generator().manual_seed(0)) + 1).tolist()
    wbytes = weight_bytes_read(model)
    kv_token = slot_cache.token_bytes
    runners = {"slots": ModelRunner(model, slot_cache, cuda_graphs=True),
               "pages": ModelRunner(model, paged, cuda_graphs=True)}
    rows = []
    for b in batches:
        batch = decode_batch(b, context)
        batches_of = {"slots": batch,
                      "pages": Batch(batch.decode, [], batch.sample, batch.sample_slots,
                                     decode_slots=list(range(b)),
                                     block_tables={r: perm[i * width:(i + 1) * width]
                                                   for i, r in enumerate(batch.decode)})}
        times = {"slots": [], "pages": []}
        for _ in range(rounds):  # interleaved: clock and thermal drift hit both alike
            for layout, runner in runners.items():
                times[layout].append(time_steps(runner, batches_of[layout], iters))
        floor = (wbytes + b * (context + 1) * kv_token) / bw * 1e3
        for layout in runners:
            ms = statistics.median(times[layout])
            rows.append({"layout": layout, "batch": b, "context": context, "step_ms": ms,
                         "floor_ms": floor, "over_floor": ms / floor, "rounds": times[layout]})
            print(f"decode {layout:5s} B={b:3d} ctx {context}: {ms:.3f} ms (median of {rounds} "
                  f"rounds of {iters}), floor {floor:.3f} ms, x{ms / floor:.3f}", flush=True)
    del runners, slot_cache, paged, c
    free()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", default="16,8", help="slot layout: slots of 4096 (one run of "
                    "both layouts for each count)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--window", type=float, default=10.0, help="seconds per layout")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5, help="decode: interleaved rounds per layout")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sections", default="check,saturation,prefix,decode")
    ap.add_argument("--out", default="kv_layouts.json")
    args = ap.parse_args()
    card = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"{card}: copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    cfg = dataclasses.replace(preset("llama_7b"), max_position=MAX_SEQ_LEN)
    model = allocate(cfg, torch.float16, torch.device("cuda"))
    init_random(model, seed=0)
    work = workload(args.requests, args.seed, cfg.vocab_size)
    result = {"card": card, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "copy_bandwidth_Bps": bw, "args": vars(args),
              "workload": {"prompt_mean": statistics.mean(len(p) for p, _ in work),
                           "output_mean": statistics.mean(o for _, o in work)}}
    print(f"workload: {args.requests} requests, prompt mean {result['workload']['prompt_mean']:.0f}"
          f", output mean {result['workload']['output_mean']:.0f}", flush=True)

    def section(name, fn):
        if name not in args.sections.split(","):
            return
        try:
            result[name] = fn()
        except Exception:  # noqa: BLE001 - report it and go on with the other sections
            traceback.print_exc()
            result[name] = {"error": traceback.format_exc()}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)

    section("check", check_kernel)
    section("saturation", lambda: [saturation(model, lay, int(n), work, args.window)
                                   for n in args.slots.split(",") for lay in ("slots", "pages")])
    section("prefix", lambda: [shared_prefix(model, c, cfg.vocab_size) for c in (False, True)])
    section("decode", lambda: decode_steps(model, args.context, [1, 32], args.iters, bw,
                                           args.rounds))

    print(f"\n{card}, llama_7b fp16 random weights, max_seq_len {MAX_SEQ_LEN}")
    sat = result.get("saturation")
    if isinstance(sat, list):
        for s, p in zip(sat[::2], sat[1::2], strict=True):
            print(f"saturation  KV {s['kv_bytes'] / 2**30:.0f} GiB: in flight "
                  f"{s['in_flight_mean']:.1f} -> {p['in_flight_mean']:.1f} "
                  f"(x{p['in_flight_mean'] / s['in_flight_mean']:.2f}); tokens/s "
                  f"{s['tokens_per_s']:.0f} -> {p['tokens_per_s']:.0f} "
                  f"(x{p['tokens_per_s'] / s['tokens_per_s']:.2f})")
    pre = result.get("prefix")
    if isinstance(pre, list):
        off, on = pre
        print(f"prefix      prefill tokens {off['prefill_tokens']} -> {on['prefill_tokens']}; "
              f"TTFT p50 {off['ttft_p50_ms']:.1f} -> {on['ttft_p50_ms']:.1f} ms "
              f"(x{off['ttft_p50_ms'] / on['ttft_p50_ms']:.2f} lower)")
    dec = result.get("decode")
    if isinstance(dec, list):
        for b in (1, 32):
            s = next(r for r in dec if r["layout"] == "slots" and r["batch"] == b)
            p = next(r for r in dec if r["layout"] == "pages" and r["batch"] == b)
            print(f"decode B={b:2d}  slots x{s['over_floor']:.3f}  pages x{p['over_floor']:.3f} "
                  f"(pages/slots {p['step_ms'] / s['step_ms']:.3f})")


if __name__ == "__main__":
    main()

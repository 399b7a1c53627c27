"""Decode step time over its floor, for presets with random weights on one GPU.

One decode step = the fused forward of every row at context C, the logits and the greedy
argmax, with the one device-to-host copy of the new tokens (`ModelRunner.run`), timed with
CUDA events (median of --iters). Its floor is the bytes the step must read, every weight
once plus each row's live KV cache, over the device-to-device copy bandwidth measured in the
same run (bytes read + bytes written). The embedding table is not counted: a step reads only
B of its rows. Optionally the transformers `generate` per-step time on the same card (static
batch, prompt of C tokens, LLaMA-7B shape, fp16): (t(1 + n new tokens) - t(1)) / n.

Each row runs with batch invariance off and on (`--invariance`), in the same run; `--variants`
times the invariant step in several forms, each with graphs captured afresh, in the same
process: `nosplit` (the linear kernel's K in one part), `split` (in `linear_triton.splits`
parts), `pdl` (split, and the kernels of the step launched with programmatic dependent launch,
the linear kernel asking for its first weight tiles in L2 before it waits), `pdl-noprefetch`;
`tma` and `ptr` (the products' Hopper TMA forms on, off: `launch.TMA`), both with the
RMSNorm and SiLU in kernels of their own; `tma-pdl` (the TMA forms with every Triton kernel
of the step launched with PDL, each product asking for its first weight tiles in L2 before it
waits) and `tma-pdl-noprefetch`; `fold` (the TMA forms with the norm folded into the
next product, the norm and SiLU * up as its epilogue: `fused.FOLDED`) and `fold-rms256` (qkv's
norm epilogue with the plain form's K steps: `linear_triton.EPILOGUE_TILES`); `split64`,
`split32`, `split64-n32`, `split256-n32` (attention's fixed split length,
`attention_triton.SPLIT_LEN`, and its K/V block), `noskip` (attention's split programs past
a row's length write empty partials, as before; with `--max-seq-len` above the context) and
`fold-split64`. List the `fold` variants after the others, since a folded model stays folded
(it runs the same function).

    python3 bench/decode_step.py --out decode_step.json [--variants nosplit,split,pdl]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import time

import torch

from flover.config import SamplingParams
from flover.engine.kv_cache import SlotCache
from flover.engine.runner import ModelRunner
from flover.engine.scheduler import Batch
from flover.engine.sequence import Request, Status
from flover.models.layers import init_random
from flover.models.presets import preset
from flover.ops import attention_triton, fused, launch, linear_triton
from flover.ops.linear import swap_linears
from flover.weights import allocate

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def copy_bandwidth(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Bytes per second of a large device-to-device copy, counting read + write."""
    a = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    times = []
    for _ in range(iters + 3):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * nbytes / statistics.median(times[3:])


def weight_bytes_read(model: torch.nn.Module) -> int:
    tied = model.cfg.tie_word_embeddings
    skip = set() if tied else {id(m.weight) for m in model.modules()
                                if isinstance(m, torch.nn.Embedding)}
    return sum(p.nbytes for p in model.parameters() if id(p) not in skip)


VARIANTS = {  # name: the switches it sets (`_SHIPPED`'s names); the others as shipped
    "nosplit": {"split": False}, "split": {"split": True},
    "pdl": {"split": True, "pdl": True}, "pdl-noprefetch": {"split": True, "pdl": True,
                                                            "prefetch": 0},
    "pdl-nosplit": {"pdl": True}, "pdl-prefetch2": {"split": True, "pdl": True, "prefetch": 2},
    "pdl-prefetch8": {"split": True, "pdl": True, "prefetch": 8},
    "ptr": {"tma": False, "folded": False}, "tma": {"tma": True, "folded": False},
    "tma-pdl": {"tma": True, "folded": False, "pdl": True},
    "tma-pdl-noprefetch": {"tma": True, "folded": False, "pdl": True, "prefetch": 0},
    "fold": {"tma": True, "folded": True},
    "fold-rms256": {"tma": True, "folded": True, "epilogue_tiles": {
        "rms": {"block_k": 256, "num_stages": 4}, "gated": {"block_k": 128, "num_stages": 3}}},
    "split64": {"split_len": 64}, "split32": {"split_len": 32, "attention": {"block_n": 32}},
    "split64-n32": {"split_len": 64, "attention": {"block_n": 32}},
    "split256-n32": {"split_len": 256, "attention": {"block_n": 32}},
    "noskip": {"attention": {"skip_empty": False}},
    # attention's tile per token, as before a prompt's tokens shared it (row_attention)
    "tokens1": {"attention": {"tokens": 1}},
    # attention's persistent form: a work list walked by a fixed grid (row_attention)
    "items": {"attention": {"persistent": True}},
    # attention's merge loading one split per round trip, as before 2026-12-08 (same bits)
    "merge1": {"attention": {"merge_splits": 1}},
    "fold-split64": {"tma": True, "folded": True, "split_len": 64},
}


_DEFAULT_LINEAR = linear_triton.default_config
_DEFAULT_TMA = linear_triton.tma_config
_DEFAULT_ATTENTION = attention_triton.default_config
_SHIPPED = {"split": linear_triton.SPLIT_K, "pdl": launch.ENABLED, "prefetch": None,
            "tma": launch.TMA, "folded": fused.FOLDED,  # as imported (the environment included)
            "epilogue_tiles": linear_triton.EPILOGUE_TILES,
            "split_len": attention_triton.SPLIT_LEN, "attention": {}}


def apply_variant(name: str | None) -> None:
    """Set the switches of `name` (None: back to the defaults as shipped)."""
    v = _SHIPPED | VARIANTS.get(name, {})
    fused.FOLDED = v["folded"]
    linear_triton.SPLIT_K = v["split"]
    linear_triton.EPILOGUE_TILES = v["epilogue_tiles"]
    launch.set_enabled(v["pdl"])
    launch.TMA = v["tma"]
    attention_triton.SPLIT_LEN = v["split_len"]
    base, tbase, prefetch = _DEFAULT_LINEAR, _DEFAULT_TMA, v["prefetch"]
    linear_triton.default_config = (base if prefetch is None
                                    else lambda *a: base(*a) | {"prefetch": prefetch})
    linear_triton.tma_config = (tbase if prefetch is None
                                else lambda *a: tbase(*a) | {"prefetch": prefetch})
    abase, extra = _DEFAULT_ATTENTION, v["attention"]
    attention_triton.default_config = (lambda *a: abase(*a) | extra) if extra else abase


CHECKS: list[dict] = []  # variants' logits against the first invariant variant's


def time_steps(runner: ModelRunner, batch: Batch, iters: int) -> float:
    """Median milliseconds of `runner.run(batch)` (which ends in the tokens' host copy)."""
    for _ in range(3):
        runner.run(batch)
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        runner.run(batch)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


@torch.inference_mode()
def step_logits(runner: ModelRunner, batch: Batch) -> torch.Tensor:
    """One step's logits (float32 copy), through the runner's graphs."""
    return runner.forward_logits(batch).float().clone()


def decode_batch(rows: int, context: int) -> Batch:
    reqs = []
    for i in range(rows):
        r = Request(f"r{i}", [1] * context, SamplingParams(temperature=0.0, max_tokens=1))
        r.num_computed, r.status = context, Status.DECODE
        r.output_ids.append(7)
        reqs.append(r)
    return Batch(list(reqs), [], reqs, list(range(rows)))


def bench_model(name: str, dtype: str, batches: list[int], context: int, iters: int,
                bw: float, eager: bool, invariance: list[str],
                variants: list[str | None] = (None,), max_seq_len: int = 0) -> list[dict]:
    """Each batch size's step with batch invariance off (cuBLAS, SDPA) then on (the Triton
    linear and per-row attention: `EngineConfig.batch_invariant`, the engine's default).
    The cache's slots hold `max_seq_len` tokens (0: context + 8); graphs size attention's
    grid by it, as the engine's do."""
    cfg = preset(name)
    model = allocate(cfg, DTYPES[dtype], torch.device("cuda"))
    init_random(model, seed=0)
    slots = max(batches)
    cache = SlotCache(cfg.num_layers, slots, cfg.num_kv_heads, max_seq_len or context + 8,
                      cfg.head_dim,
                      DTYPES[dtype], torch.device("cuda"))
    cache.k.normal_()
    cache.v.normal_()
    wbytes = weight_bytes_read(model)
    kv_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * cache.k.element_size()
    rows = []
    reference = None  # the first invariant variant's logits
    runs = [(m, v) for m in sorted(invariance, key=lambda m: m == "on")  # off first: on swaps
            for v in (variants if m == "on" else [None])]
    for mode, variant in runs:
        on = mode == "on"
        apply_variant(variant)  # first: the swap folds the norms only where the variant does
        if on:
            swap_linears(model)
        graphs = plain = None
        try:  # a variant that fails (PDL where the driver lacks it) costs its rows only
            graphs = ModelRunner(model, cache, cuda_graphs=True, batch_invariant=on)
            plain = ModelRunner(model, cache, cuda_graphs=False, batch_invariant=on) if eager else None
            for b in batches:
                batch = decode_batch(b, context)
                kv = b * (context + 1) * kv_token
                floor_ms = (wbytes + kv) / bw * 1e3
                ms = time_steps(graphs, batch, iters)
                row = {"model": name, "dtype": dtype, "batch": b, "context": context,
                       "batch_invariant": on, "weight_bytes": wbytes, "kv_bytes": kv,
                       "floor_ms": floor_ms, "step_ms": ms, "over_floor": ms / floor_ms,
                       "variant": variant}
                if plain is not None:
                    row["eager_ms"] = time_steps(plain, batch, iters)
                print(f"{name:10s} {dtype:5s} invariant {mode:3s} {variant or '':14s} B={b:3d}  "
                      f"step {ms:7.3f} ms  "
                      f"floor {floor_ms:6.3f} ms  x{ms / floor_ms:5.2f}  "
                      f"eager {row.get('eager_ms', float('nan')):7.3f} ms", flush=True)
                rows.append(row)
            logits = step_logits(graphs, decode_batch(max(batches), context))
            if on and reference is None:
                reference = (variant, logits)
            elif on:  # reported: equal bits are promised only for the same arithmetic
                same = torch.equal(logits, reference[1])
                diff = (logits - reference[1]).abs().max().item()
                print(f"{name} {dtype} {variant} vs {reference[0]}: logits bitwise equal {same}, "
                      f"max diff {diff:.3g}", flush=True)
                CHECKS.append({"model": name, "dtype": dtype, "variant": variant,
                               "logits_vs": reference[0], "bitwise_equal": same, "max_diff": diff})
        except Exception as e:  # noqa: BLE001 - reported, and the next variant runs
            print(f"{name} {dtype} {mode} {variant}: failed: {type(e).__name__}: {e}", flush=True)
        del graphs, plain
        apply_variant(None)
        gc.collect()
        torch.cuda.empty_cache()
    del model, cache
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def hf_generate_per_step(batch: int, context: int, new: int) -> float:
    """transformers `generate` ms per new token, LLaMA-7B shape, random fp16 weights."""
    import transformers

    c = preset("llama_7b")
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, max_position_embeddings=c.max_position,
        rms_norm_eps=c.norm_eps)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.float16).eval()
    ids = torch.randint(3, c.vocab_size, (batch, context), device="cuda")

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(2)  # warm-up
    t1 = statistics.median(run(1) for _ in range(3))
    tn = statistics.median(run(1 + new) for _ in range(3))
    return (tn - t1) / new * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama_7b,llama_13b,gptj_6b")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--max-seq-len", type=int, default=0, help="the cache's slot length "
                    "(default context + 8); the graphs' attention grid is sized by it")
    ap.add_argument("--eager", action="store_true", help="also time without CUDA graphs")
    ap.add_argument("--invariance", default="off,on", help="batch invariance off, on or both")
    ap.add_argument("--linear-configs", default="", help="JSON list of linear_triton launch "
                    "configs to time instead of its default (tuning)")
    ap.add_argument("--variants", default="", help="e.g. nosplit,split,pdl: forms of the "
                    "invariant step to time (default: as shipped)")
    ap.add_argument("--hf-batches", default="", help="e.g. 1,32: transformers generate baseline")
    ap.add_argument("--hf-new-tokens", type=int, default=32)
    ap.add_argument("--out", default="decode_step.json")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    bw = copy_bandwidth()
    card = torch.cuda.get_device_name()
    print(f"{card}: device-to-device copy {bw / 1e12:.3f} TB/s (read + write)", flush=True)
    rows, hf = [], []
    result = {"card": card, "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "copy_bandwidth_Bps": bw, "rows": rows, "checks": CHECKS,
              "transformers_generate": hf}

    def save() -> None:  # after every model: a run cut short keeps what it measured
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    tuning = json.loads(args.linear_configs) if args.linear_configs else [None]
    default = linear_triton.default_config
    for name in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for i, cfg in enumerate(tuning):
                if cfg is not None:  # every swapped layer launches with this configuration
                    linear_triton.default_config = lambda *a, c=cfg: default(*a) | c
                    print(f"linear config {cfg}", flush=True)
                modes = args.invariance.split(",") if i == 0 else ["on"]
                got = bench_model(name, dtype, batches, args.context, args.iters, bw, args.eager,
                                  modes, [v for v in args.variants.split(",") if v] or [None],
                                  args.max_seq_len)
                rows += [r | {"linear_config": cfg} if cfg else r for r in got]
                save()
    for b in [int(x) for x in args.hf_batches.split(",") if x]:
        ms = hf_generate_per_step(b, args.context, args.hf_new_tokens)
        gc.collect()
        torch.cuda.empty_cache()
        hf.append({"model": "llama_7b", "dtype": "fp16", "batch": b, "context": args.context,
                   "hf_generate_ms_per_step": ms})
        print(f"transformers generate llama_7b fp16 B={b}: {ms:.3f} ms/step", flush=True)
        save()

    print(f"\n{card}, copy bandwidth {bw / 1e12:.3f} TB/s, context {args.context}")
    print(f"{'model':10s} {'dtype':5s} {'inv':3s} {'variant':14s} {'B':>3s} {'step ms':>8s} "
          f"{'floor ms':>8s} "
          f"{'x floor':>7s} {'eager ms':>8s} {'on/off':>6s}")
    off = {(r["model"], r["dtype"], r["batch"]): r["step_ms"] for r in rows
           if not r["batch_invariant"]}
    for r in rows:
        base = off.get((r["model"], r["dtype"], r["batch"]))
        ratio = r["step_ms"] / base if r["batch_invariant"] and base else float("nan")
        print(f"{r['model']:10s} {r['dtype']:5s} {'on' if r['batch_invariant'] else 'off':3s} "
              f"{r.get('variant') or '':14s} {r['batch']:3d} {r['step_ms']:8.3f} "
              f"{r['floor_ms']:8.3f} {r['over_floor']:7.2f} "
              f"{r.get('eager_ms', float('nan')):8.3f} {ratio:6.3f} {r.get('linear_config') or ''}")
    for h in hf:
        print(f"transformers generate llama_7b fp16 B={h['batch']}: "
              f"{h['hf_generate_ms_per_step']:.3f} ms/step")


if __name__ == "__main__":
    main()

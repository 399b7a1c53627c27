"""The peers on the same card in the same run: transformers' continuous batching
(`generate_batch`) and static-batch `generate`, against flover `fused`, on one workload:
32 requests x 128 new tokens, 8-token prompts, all arriving at once, LLaMA-7B shapes, random
fp16 weights, greedy, no early stop.

tokens/s = generated tokens / time from the first request's submission to the last one's
end. For `generate_batch` that is GenerationOutput.created_time to lifespan[1] (the manager's
set-up and CUDA-graph warm-up are excluded; the call's wall time is reported beside it). Each
continuous-batching variant (attention implementation x CUDA graphs) first runs a probe of
16 new tokens (its warm-up); a variant whose probe predicts more than --cap-s is not run in
full. flover runs the same prompts through `flover run`'s fused driver (the median of three
runs after a first that captures the graphs).

    python3 bench/peers.py --out DIR
    python3 bench/peers.py --quick --device cpu     # tiny shapes, a smoke test
    python3 bench/peers.py --flover-only --out DIR  # flover, async scheduling on and off
    python3 bench/peers.py --flover-only --sampled --out DIR  # the same with sampled rows
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from flover.models.presets import preset
from flover.run import report
from flover.run.context import RunContext, new_state
from flover.run.driver import run_workload
from flover.run.ini import load_config
from flover.run.workload import build_workload

VARIANTS = [  # (attention, CUDA graphs (None: transformers' default), async batching)
    ("paged|sdpa", None, None), ("paged|sdpa", True, None), ("paged|eager", True, None),
    ("paged|sdpa", True, True), ("paged|eager", True, True),
    ("paged|flash_attention_3", None, None), ("paged|flash_attention_2", None, None),
]  # transformers >= 5.23 names 'paged|sdpa' 'sdpa'; flash needs a package the GPU image lacks


def flover_fused(model_name: str, dtype: str, device: str, n: int, new: int,
                 async_scheduling: bool | None = None, sampled: bool = False) -> tuple[dict, list]:
    sets = [] if async_scheduling is None else [
        f"runtime_hyperparameter.async_scheduling={int(async_scheduling)}"]
    # sampled: temperature 0.8, top-k 50, top-p 0.9 (the sampler's sorted path) instead of greedy
    sampling = (["runtime_hyperparameter.top_k=50", "runtime_hyperparameter.top_p=0.9",
                 "runtime_hyperparameter.temperature=0.8"] if sampled
                else ["runtime_hyperparameter.top_k=1"])
    cfg = load_config(None, sets + [
        f"model_specification.model_type={model_name}", f"model_specification.data_type={dtype}",
        f"model_specification.device={device}", f"model_specification.max_concurrency={n}",
        "model_specification.max_seq_len=512", "model_specification.fixed_input_len=8",
        *sampling, "runtime_hyperparameter.interval=0",
        f"request.num_requests={n}", f"request.request_output_len={new}"])
    loaded = RunContext.load(cfg)
    eng = loaded.engine(n)  # one engine for both runs: the first one captures its graphs

    class OneEngine(RunContext):
        def engine(self, slots: int):
            return eng

    ctx = OneEngine(cfg, loaded.model, loaded.tokenizer)
    items = build_workload(cfg, None, ctx.model.cfg.vocab_size)
    dev = next(ctx.model.parameters()).device
    runs = []
    for _ in range(4):  # the first captures graphs; the median of the other three counts
        eng.scheduler.iterations = 0
        state = new_state(cfg, items)
        report.reset_peak_memory(dev)
        run_workload(ctx, items, state)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        runs.append(report.summarize(state, dev))
    m = sorted(runs[1:], key=lambda r: r["total_time_s"])[1]
    name = "flover fused" + {None: "", True: " (async scheduling)", False: " (sync)"}[async_scheduling]
    name += ", sampled" if sampled else ""
    out = {"engine": name, "tokens": m["output_tokens"], "time_s": m["total_time_s"],
           "tokens_per_s": m["tokens_per_s"], "first_run_time_s": runs[0]["total_time_s"],
           "times_s": [r["total_time_s"] for r in runs],
           "peak_memory_bytes": m["peak_memory_bytes"], "iterations": m["iterations"],
           "ms_per_iteration": 1000 * m["total_time_s"] / max(m["iterations"], 1)}
    prompts = [it.prompt_ids for it in items]
    del ctx, loaded
    gc.collect()
    return out, prompts


def hf_model(model_name: str, dtype: torch.dtype, device: str):
    import transformers

    c = preset(model_name)
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, max_position_embeddings=c.max_position,
        rms_norm_eps=c.norm_eps, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def gen_config(new: int):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)


def cb_config(graphs: bool | None, async_batching: bool | None = None):
    """transformers' ContinuousBatchingConfig where it exists (5.x), else None."""
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:
        try:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig
        except ImportError:
            return None
    kwargs = {}
    if graphs is not None:
        kwargs["use_cuda_graph"] = graphs
    if async_batching is not None:
        kwargs["use_async_batching"] = async_batching
    names = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)} \
        if dataclasses.is_dataclass(ContinuousBatchingConfig) else set(kwargs)
    return ContinuousBatchingConfig(**{k: v for k, v in kwargs.items() if k in names})


def cb_run(model, prompts: list[list[int]], new: int, graphs: bool | None,
           async_batching: bool | None = None) -> dict:
    cbc = cb_config(graphs, async_batching)
    kw = {"continuous_batching_config": cbc} if cbc is not None else {}
    if cbc is None and graphs is not None:
        kw["generation_config"] = gen_config(new)
        kw["generation_config"].use_cuda_graph = graphs
    kw.setdefault("generation_config", gen_config(new))
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate_batch(prompts, max_new_tokens=new, progress_bar=False, **kw)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    outs = list(out.values())
    errors = [o.error for o in outs if getattr(o, "error", None)]
    tokens = sum(len(o.generated_tokens) for o in outs)
    created = [o.created_time for o in outs if hasattr(o, "created_time")]
    ends = [o.lifespan[1] for o in outs if hasattr(o, "lifespan") and o.lifespan[1] > 0]
    serve = max(ends) - min(created) if created and ends else wall
    return {"requests": len(outs), "tokens": tokens, "expected_tokens": len(prompts) * new,
            "wall_s": wall, "time_s": serve, "tokens_per_s": tokens / serve if serve > 0 else None,
            "wall_tokens_per_s": tokens / wall, "errors": errors[:3]}


def hf_static(model, prompts: list[list[int]], new: int) -> dict:
    ids = torch.tensor(prompts, device=model.device)

    def run(n: int) -> float:
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == ids.shape[1] + n, out.shape
        return time.perf_counter() - t0

    run(2)  # warm-up
    t = run(new)
    tokens = len(prompts) * new
    return {"engine": "transformers generate (static batch, sdpa)", "tokens": tokens, "time_s": t,
            "tokens_per_s": tokens / t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--cap-s", type=float, default=45.0, help="longest full run of one variant")
    ap.add_argument("--quick", action="store_true", help="tiny_llama shapes, 4 x 16 tokens")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--flover-only", action="store_true", help="flover with async scheduling "
                    "on and off, no transformers peers")
    ap.add_argument("--sampled", action="store_true", help="with --flover-only: temperature 0.8, "
                    "top-k 50, top-p 0.9 instead of greedy")
    args = ap.parse_args()
    if args.quick:
        args.model, args.requests, args.tokens = "tiny_llama", 4, 16
    gpu = args.device.startswith("cuda")
    dtype, tdtype = ("fp16", torch.float16) if gpu else ("fp32", torch.float32)
    import transformers

    res = {"card": torch.cuda.get_device_name() if gpu else "cpu",
           "date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "transformers": transformers.__version__, "commit": os.environ.get("FLOVER_COMMIT", ""),
           "command": " ".join(sys.argv), "model": args.model, "dtype": dtype,
           "requests": args.requests, "new_tokens": args.tokens, "prompt_len": 8, "runs": []}
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)

    def save(row: dict) -> None:
        res["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        (path / "peers.json").write_text(json.dumps(res, indent=1) + "\n")

    if args.flover_only:  # the engine with each setting of async scheduling, nothing else
        for on in (True, False):
            save(flover_fused(args.model, dtype, args.device, args.requests, args.tokens, on,
                              args.sampled)[0])
            if gpu:
                torch.cuda.empty_cache()
        for r in res["runs"]:
            print(f"{r['engine']:40s} {r['tokens']:7d} {r['time_s']:8.3f} s "
                  f"{r['tokens_per_s']:9.1f} tok/s {r['ms_per_iteration']:7.3f} ms/iteration")
        return
    row, prompts = flover_fused(args.model, dtype, args.device, args.requests, args.tokens)
    save(row)
    if gpu:
        torch.cuda.empty_cache()
    model = hf_model(args.model, tdtype, args.device)
    try:
        save(hf_static(model, prompts, args.tokens))
    except Exception as e:  # noqa: BLE001 - recorded, the other peers still run
        save({"engine": "transformers generate", "error": repr(e), "traceback": traceback.format_exc()})
    default_impl = model.config._attn_implementation
    seen: set = set()
    for attn, graphs, async_batching in VARIANTS:
        name = (f"transformers generate_batch ({attn}, cuda graphs "
                f"{'default' if graphs is None else graphs}{', async' if async_batching else ''})")
        row = {"engine": name, "attn": attn, "cuda_graphs": graphs, "async_batching": async_batching}
        try:
            model.set_attn_implementation(attn)
            row["attn_set"] = model.config._attn_implementation
            if (row["attn_set"], graphs, async_batching) in seen:  # e.g. 'paged|sdpa' is 'sdpa' since 5.23
                row["skipped"] = "same implementation as an earlier variant"
                continue
            seen.add((row["attn_set"], graphs, async_batching))
            probe = cb_run(model, prompts, min(16, args.tokens), graphs, async_batching)
            row["probe"] = probe
            predicted = probe["time_s"] * args.tokens / min(16, args.tokens)
            if probe["tokens"] != probe["expected_tokens"] or probe["errors"]:
                row["error"] = f"probe generated {probe['tokens']} of {probe['expected_tokens']} tokens"
            elif predicted > args.cap_s:
                row["skipped"] = f"probe predicts {predicted:.0f} s > cap {args.cap_s:.0f} s"
                row["tokens_per_s_probe"] = probe["tokens_per_s"]
            else:
                row.update(cb_run(model, prompts, args.tokens, graphs, async_batching))
        except Exception as e:  # noqa: BLE001 - an implementation that does not run here
            row["error"] = repr(e)[:500]
            row["traceback"] = traceback.format_exc()[-3000:]
        finally:
            try:
                model.set_attn_implementation(default_impl)
            except Exception:  # noqa: BLE001
                pass
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
        save(row)

    flover = res["runs"][0]
    print(f"\n{res['card']}, transformers {transformers.__version__}, {args.model} {dtype}, "
          f"{args.requests} requests x {args.tokens} new tokens (8-token prompts)")
    print(f"{'engine':72s} {'tokens':>7s} {'time s':>8s} {'tok/s':>9s} {'flover x':>8s}")
    for r in res["runs"]:
        tps = r.get("tokens_per_s")
        if tps:
            print(f"{r['engine']:72s} {r['tokens']:7d} {r['time_s']:8.2f} {tps:9.1f} "
                  f"{flover['tokens_per_s'] / tps:8.2f}")
        else:
            print(f"{r['engine']:72s} {r.get('skipped') or r.get('error', '?')[:60]}")


if __name__ == "__main__":
    main()

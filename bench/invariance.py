"""Fusion invariance on the GPU: is each request's every logit bitwise the same alone and fused?

For each model and dtype, with batch invariance on and off (`EngineConfig.batch_invariant`):
every request runs alone first (one request in flight, its prompt prefilled whole), then all
of them run fused in each batch mix:
- `staggered`: the requests arrive a few per iteration (batches grow to 64 and shrink),
  prompts prefilled whole beside the decode rows;
- `chunked`: they arrive in bursts with a small prefill token budget, so long prompts are
  prefilled in chunks beside decode rows and other prompts.
Greedy, `ignore_eos`; every sampled row's float32 logits are recorded at every step.
A request is `equal` when every step's logits are bitwise those of its solo run; `max diff`
is the largest |difference| over the steps before the first differing token (afterwards the
contexts differ and so must the logits); `tokens` counts requests whose tokens are the same.

Models: presets with random weights and fewer layers (`--layers`, default 4: the kernels are
per layer, so more layers only repeat them), LLaMA-7B shapes (MHA), the same with 8 KV heads
(GQA), GPT-J-6B shapes; and the embedded model (`--embedded`, FLOVER_DEFAULT_MODEL or the
package's GGUF) with all its layers.

    python3 bench/invariance.py --out invariance.json [--embedded]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import random

import torch

from flover import Engine, EngineConfig, SamplingParams
from flover.models.layers import init_random
from flover.models.presets import preset
from flover.weights import allocate, load_model

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEVICE = "cuda"


def shapes(layers: int) -> dict:
    return {"llama_7b": dataclasses.replace(preset("llama_7b"), num_layers=layers),
            "llama_7b_gqa8": dataclasses.replace(preset("llama_7b"), num_layers=layers,
                                                 num_kv_heads=8),
            "gptj_6b": dataclasses.replace(preset("gptj_6b"), num_layers=layers),
            "tiny_llama": preset("tiny_llama"), "tiny_gptj": preset("tiny_gptj")}  # dry runs


def workload(n: int, vocab: int, max_tokens: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.choice([1, 3, 8, 20, 50, 97, 130]))]
            for _ in range(n)]


def engine(model, dtype: str, invariant: bool, slots: int, budget: int) -> Engine:
    return Engine(EngineConfig(model="bench", dtype=dtype, device=DEVICE, max_concurrency=slots,
                               max_seq_len=256, prefill_token_budget=budget,
                               batch_invariant=invariant), model=model)


def record(eng: Engine) -> dict[str, list[torch.Tensor]]:
    """request id -> the float32 logits row of each of its steps (the runner's token
    selection, which the synchronous and the async scheduling paths both go through)."""
    seen: dict[str, list[torch.Tensor]] = {}
    real = eng.runner.launch_select

    def spy(logits, rows, slots, failed=None):
        for i, r in enumerate(rows):
            seen.setdefault(r.request_id, []).append(logits[i].clone())
        return real(logits, rows, slots, failed)
    eng.runner.launch_select = spy
    return seen


def run(eng: Engine, prompts: dict[int, list[int]], arrivals: dict[int, int],
        params) -> tuple[dict, dict]:
    """Request i joins at iteration arrivals[i]; returns (logits by id, tokens by id)."""
    seen = record(eng)
    tokens, it, order = {}, 0, sorted(prompts, key=lambda i: arrivals[i])
    while order or eng.has_unfinished():
        while order and arrivals[order[0]] <= it:
            i = order.pop(0)
            eng.add_request(f"q{i}", prompts[i], params)
        for out in eng.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
        it += 1
    return seen, tokens


def compare(solo: tuple[dict, dict], fused: tuple[dict, dict]) -> dict:
    equal = same_tokens = 0
    worst = 0.0
    for rid, steps in solo[0].items():
        other = fused[0][rid]
        a_tok, b_tok = solo[1][rid], fused[1][rid]
        same_tokens += a_tok == b_tok
        equal += all(torch.equal(x, y) for x, y in zip(steps, other, strict=True))
        upto = next((i for i, (x, y) in enumerate(zip(a_tok, b_tok, strict=True)) if x != y), len(a_tok))
        for x, y in list(zip(steps, other, strict=True))[:upto + 1]:  # step i's logits chose token i
            worst = max(worst, (x - y).abs().max().item())
    n = len(solo[0])
    return {"requests": n, "equal": equal, "equal_frac": equal / n, "tokens_equal": same_tokens,
            "max_diff": worst}


def bench(name: str, model, dtype: str, prompts, max_tokens: int, out: list) -> None:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    n = len(prompts)
    mixes = {"staggered": ([i // 3 for i in range(n)], 4096),
             "chunked": ([(i // 16) * 6 for i in range(n)], 48)}
    for invariant in (False, True):  # each engine swaps the shared model's linears to its setting
        solo = {}, {}
        eng = engine(model, dtype, invariant, n, 4096)
        for i, p in enumerate(prompts):  # one at a time: alone, prefilled whole
            got = run(eng, {i: p}, {i: 0}, params)
            solo[0].update(got[0]), solo[1].update(got[1])
        del eng
        for mix, (arrivals, budget) in mixes.items():
            eng = engine(model, dtype, invariant, n, budget)
            r = compare(solo, run(eng, dict(enumerate(prompts)), dict(enumerate(arrivals)),
                                  params))
            del eng
            r |= {"model": name, "dtype": dtype, "batch_invariant": invariant, "mix": mix}
            out.append(r)
            print(f"{name:16s} {dtype} invariant={'on ' if invariant else 'off'} {mix:9s} "
                  f"bitwise {r['equal']:3d}/{r['requests']}  tokens {r['tokens_equal']:3d}/"
                  f"{r['requests']}  max diff {r['max_diff']:.3g}", flush=True)
        gc.collect()
        if DEVICE != "cpu":
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama_7b,llama_7b_gqa8,gptj_6b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--embedded", action="store_true", help="also the embedded model")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    ap.add_argument("--out", default="invariance.json")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    rows: list[dict] = []
    for dtype in args.dtypes.split(","):
        for name in [m for m in args.models.split(",") if m]:
            cfg = shapes(args.layers)[name]
            model = allocate(cfg, DTYPES[dtype], torch.device(DEVICE))
            init_random(model, seed=0)
            bench(f"{name}/{cfg.num_layers}L", model, dtype,
                  workload(args.requests, cfg.vocab_size, args.max_tokens), args.max_tokens, rows)
            del model
            gc.collect()
        if args.embedded:
            model, _ = load_model(None, DTYPES[dtype], torch.device(DEVICE))
            bench("smollm2-135m", model, dtype,
                  workload(args.requests, model.cfg.vocab_size, args.max_tokens),
                  args.max_tokens, rows)
            del model
        gc.collect()
    with open(args.out, "w") as f:
        card = torch.cuda.get_device_name() if DEVICE != "cpu" else "cpu"
        json.dump({"card": card, "date": datetime.date.today().isoformat(),
                   "requests": args.requests, "max_tokens": args.max_tokens, "rows": rows}, f,
                  indent=1)
    print(f"\n{'model':16s} {'dtype':5s} {'inv':3s} {'mix':9s} {'bitwise':>8s} {'tokens':>7s} "
          f"{'max diff':>9s}")
    for r in rows:
        print(f"{r['model']:16s} {r['dtype']:5s} {'on' if r['batch_invariant'] else 'off':3s} "
              f"{r['mix']:9s} {r['equal']:3d}/{r['requests']:<4d} {r['tokens_equal']:3d}/"
              f"{r['requests']:<3d} {r['max_diff']:9.3g}")


if __name__ == "__main__":
    main()

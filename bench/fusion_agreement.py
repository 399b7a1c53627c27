"""How often a request's greedy tokens are the same fused as alone, per dtype (DESIGN.md 3).

On the CPU in float32 they must be identical (the tests hold it). On a GPU in fp16/bf16 the
fused batch changes the order of reductions (other matrix shapes, other attention splits), so
a near-tie can flip a token and the two runs diverge from there: this measures how often.

The embedded SmolLM2-135M-Instruct answers the demo's chat questions greedily (EOS ignored,
--tokens each): once alone, one request at a time, then fused, a new request joining every
--stagger iterations.

    python3 bench/fusion_agreement.py --dtypes fp32,fp16,bf16 --out agreement.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from flover import Engine, EngineConfig, SamplingParams

PROMPTS = Path(__file__).resolve().parent.parent / "configs" / "demo_prompts.jsonl"


def chat_prompts(eng: Engine) -> list[list[int]]:
    tok = eng.tokenizer
    out = []
    for line in PROMPTS.read_text().splitlines():
        item = json.loads(line)
        text = tok.apply_chat_template(item["messages"]) if "messages" in item else item["prompt"]
        out.append(tok.encode(text, add_special_tokens="messages" not in item))
    return out


def run(eng: Engine, prompts: list[list[int]], params: SamplingParams, stagger: int | None):
    """stagger None: each prompt alone; else request i joins at iteration i * stagger."""
    done: dict[str, list[int]] = {}
    if stagger is None:
        for i, p in enumerate(prompts):
            eng.add_request(f"s{i}", p, params)
            done.update({o.request_id: o.token_ids for o in eng.run_until_done() if o.finished})
        return [done[f"s{i}"] for i in range(len(prompts))]
    it, nxt = 0, 0
    while nxt < len(prompts) or eng.has_unfinished():
        while nxt < len(prompts) and it >= nxt * stagger:
            eng.add_request(f"f{nxt}", prompts[nxt], params)
            nxt += 1
        done.update({o.request_id: o.token_ids for o in eng.step() if o.finished})
        it += 1
    return [done[f"f{i}"] for i in range(len(prompts))]


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="a checkpoint with a tokenizer (default: "
                    "the embedded model)")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--stagger", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    rows = []
    for dtype in args.dtypes.split(","):
        eng = Engine(EngineConfig(model=args.model, dtype=dtype, device=args.device, max_concurrency=16,
                                  max_seq_len=256))
        prompts = chat_prompts(eng)
        alone = run(eng, prompts, params, None)
        fused = run(eng, prompts, params, args.stagger)
        diffs = [first_difference(a, f) for a, f in zip(alone, fused, strict=True)]
        flipped = [d for d in diffs if d is not None]
        rows.append({"dtype": dtype, "device": str(eng.device), "requests": len(prompts),
                     "identical": len(prompts) - len(flipped), "first_difference": diffs,
                     "median_first_difference": statistics.median(flipped) if flipped else None})
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{name}, torch {torch.__version__}: {args.tokens} greedy tokens per request, "
          f"a new request every {args.stagger} iterations")
    print(f"{'dtype':>6} {'identical':>10} {'first difference at token (diverging requests)'}")
    for r in rows:
        print(f"{r['dtype']:>6} {r['identical']:>4} / {r['requests']:<3} "
              f"{[d for d in r['first_difference'] if d is not None]}")
    if args.out:
        Path(args.out).write_text(json.dumps({"card": name, "torch": torch.__version__,
                                              "tokens": args.tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

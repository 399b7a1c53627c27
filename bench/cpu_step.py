"""Decode tokens/s on the CPU: the embedded model in float32, flover against transformers.

Both run in this process on the same weights (the embedded SmolLM2-135M-Instruct, converted
from its GGUF file) with the same thread count. flover: B requests decoding together in the
engine, median step time over --steps iterations after warm-up. transformers: `generate`
with a static batch of B, per new token = (t(1 + n tokens) - t(1 token)) / n, so the prompt's
prefill is not counted on either side.

    python bench/cpu_step.py --batches 1,8 --out cpu_step.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

from flover import Engine, EngineConfig, SamplingParams
from flover.weights import convert_gguf, default_model_path

PROMPT = list(range(1000, 1032))  # 32 prompt tokens


def copy_bandwidth(nbytes: int = 1 << 29, iters: int = 10) -> float:
    """Bytes per second of a large copy in host memory, counting read + write."""
    a = torch.ones(nbytes // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    t = time.perf_counter()
    for _ in range(iters):
        b.copy_(a)
    return 2 * a.nbytes * iters / (time.perf_counter() - t)


def flover_step(eng: Engine, batch: int, steps: int) -> float:
    for i in range(batch):
        eng.add_request(f"b{batch}-{i}", PROMPT, SamplingParams(
            max_tokens=steps + 8, temperature=0.0, ignore_eos=True))
    for _ in range(4):  # prefill + warm-up
        eng.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    while eng.has_unfinished():
        eng.step()
    return statistics.median(times)


def hf_step(model, batch: int, steps: int) -> float:
    ids = torch.tensor([PROMPT] * batch)

    def gen(n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
        return time.perf_counter() - t

    gen(2)  # warm-up
    return (gen(1 + steps) - gen(1)) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import transformers

    batches = [int(b) for b in args.batches.split(",")]
    eng = Engine(EngineConfig(device="cpu", dtype="float32", max_concurrency=max(batches),
                              max_seq_len=128))
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(convert_gguf(default_model_path())), dtype=torch.float32).eval()
    bw = copy_bandwidth()
    weight_bytes = sum(p.numel() * 4 for p in ref.parameters())  # float32, each read once
    floor = weight_bytes / bw
    rows = []
    for b in batches:
        ours, theirs = flover_step(eng, b, args.steps), hf_step(ref, b, args.steps)
        rows.append({"batch": b, "flover_ms": ours * 1e3, "hf_ms": theirs * 1e3,
                     "flover_tok_s": b / ours, "hf_tok_s": b / theirs, "speedup": theirs / ours,
                     "floor_ms": floor * 1e3, "flover_over_floor": ours / floor})
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; copy bandwidth "
          f"{bw / 1e9:.1f} GB/s, weights {weight_bytes / 1e6:.0f} MB, floor {floor * 1e3:.1f} ms")
    print(f"{'batch':>5} {'flover ms':>10} {'hf ms':>8} {'flover tok/s':>13} {'hf tok/s':>9} {'x':>6}")
    for r in rows:
        print(f"{r['batch']:>5} {r['flover_ms']:>10.1f} {r['hf_ms']:>8.1f} {r['flover_tok_s']:>13.1f} "
              f"{r['hf_tok_s']:>9.1f} {r['speedup']:>6.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "threads": torch.get_num_threads(),
                       "copy_bandwidth": bw, "weight_bytes": weight_bytes,
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

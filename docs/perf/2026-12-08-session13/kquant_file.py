"""A llama.cpp-made Q4_K_M file on the CPU: what flover keeps packed, that it holds the file's
weights exactly, greedy agreement with the dequantised model, and the decode step against
llama.cpp on the same file in the same run.

The file: the embedded SmolLM2-135M (Q4_1) requantized by llama.cpp to Q4_K_M
(llama_cpp.llama_model_quantize, allow_requantize; its 576-column tensors fall back to Q5_0 /
Q8_0, ffn_down is Q4_K or Q6_K).

    python docs/perf/2026-12-08-session13/kquant_file.py /tmp/smollm2-q4_k_m.gguf \
        --llama-cpp /tmp/lcpp/bin/python
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "bench"))
from cpu_step import flover_step  # noqa: E402

from flover import LLM, SamplingParams  # noqa: E402
from flover.ops import quant  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--llama-cpp", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    packed = LLM(model=args.model, device="cpu", max_concurrency=12, max_seq_len=256)
    full = LLM(model=args.model, device="cpu", max_concurrency=12, max_seq_len=256, quantization="none")
    mods = {n: m for n, m in packed.engine.model.named_modules() if isinstance(m, quant.QuantLinear)}
    layouts = collections.Counter(str(m.layout) for m in mods.values())
    qbytes = sum(t.numel() * t.element_size() for m in mods.values()
                 for t in (m.qweight, m.scales, m.mins) if t is not None)
    fbytes = sum(m.in_features * m.out_features * 4 for m in mods.values())
    exact = 0
    for name, m in mods.items():
        ours = m.packed().dequantize()
        dense = full.engine.model.get_submodule(name)(torch.eye(ours.shape[1])).T
        exact += bool(torch.equal(ours, dense))
    lines = (ROOT / "configs" / "demo_prompts.jsonl").read_text().splitlines()
    convs = [json.loads(line)["messages"] for line in lines]
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0)
    ours = [o.token_ids for o in packed.chat(convs, params)]
    theirs = [o.token_ids for o in full.chat(convs, params)]
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    first = [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
             for a, b in zip(ours, theirs, strict=True)]
    print(f"linears kept packed: {len(mods)}; layouts: {dict(layouts)}")
    print(f"their bytes: {qbytes / 1e6:.1f} MB packed, {fbytes / 1e6:.1f} MB in float32")
    print(f"modules holding the dequantised model's weights exactly: {exact} of {len(mods)}")
    print(f"demo prompts, {args.tokens} greedy tokens: {same} of {len(ours)} identical; "
          f"first differing token: {first}")
    times = collections.defaultdict(list)
    lcpp = []
    for _ in range(args.rounds):
        if args.llama_cpp:
            out = subprocess.run([args.llama_cpp, str(ROOT / "bench" / "llama_cpp_step.py"),
                                  args.model, "--threads", str(torch.get_num_threads())],
                                 check=True, capture_output=True, text=True)
            lcpp.append(json.loads(out.stdout.strip().splitlines()[-1])["ms"])
        for b in (1, 8):
            for name, llm in (("packed", packed), ("float32", full)):
                times[(name, b)].append(flover_step(llm.engine, b, 32) * 1e3)
    print("weights  batch  ms/step (median; rounds)  tok/s")
    for (name, b), ts in times.items():
        t = statistics.median(ts)
        print(f"{name:8s} {b:5d}  {t:7.2f} ({' '.join(f'{x:.2f}' for x in ts)})  {b * 1e3 / t:7.1f}")
    if lcpp:
        t = statistics.median(lcpp)
        print(f"llama.cpp    1  {t:7.2f} ({' '.join(f'{x:.2f}' for x in lcpp)})  {1e3 / t:7.1f}")


if __name__ == "__main__":
    main()

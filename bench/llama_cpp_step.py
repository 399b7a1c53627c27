"""llama.cpp's batch-1 decode step on a GGUF file, for bench/cpu_quant_step.py's same-run
baseline. Runs under an interpreter that has llama-cpp-python (built from source, e.g.
`python -m venv /tmp/lcpp && CMAKE_ARGS=-DGGML_NATIVE=ON /tmp/lcpp/bin/pip install
llama-cpp-python`, about 8 minutes on 2 cores); imports nothing of flover. Prints one JSON
line: the median ms per decoded token over --steps single-token evaluations after a prompt of
--prompt-len tokens, in --rounds rounds.

    /tmp/lcpp/bin/python bench/llama_cpp_step.py MODEL.gguf --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    import llama_cpp

    # the prompt goes in one token at a time (n_batch 1): llama-cpp-python 0.3.36 crashed in
    # decode on a batch of several tokens on an Intel Xeon (AMX) here; decode steps are 1 anyway
    llm = llama_cpp.Llama(args.model, n_threads=args.threads, n_threads_batch=args.threads,
                          n_ctx=256, n_batch=1, n_ubatch=1, verbose=False)
    prompt = [(17 * i + 5) % 1000 + 100 for i in range(args.prompt_len)]
    rounds = []
    for _ in range(args.rounds):
        llm.reset()
        llm.eval(prompt)
        token, times = prompt[-1], []
        for _ in range(4 + args.steps):  # 4 warm-up tokens
            t = time.perf_counter()
            llm.eval([token])
            times.append(time.perf_counter() - t)
            token = (7 * token + 3) % 1000 + 100  # which token is fed does not change the work
        rounds.append(statistics.median(times[4:]) * 1e3)
    print(json.dumps({"llama_cpp": llama_cpp.__version__, "threads": args.threads,
                      "ms": statistics.median(rounds), "ms_rounds": rounds}))


if __name__ == "__main__":
    main()

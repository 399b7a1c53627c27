"""`flover serve` under torchrun: rank 0 serves HTTP, the other ranks follow its plans.

Two gloo ranks on the CPU with tiny_llama (random weights, no tokenizer: prompts are token
ids), answering the openai client with tp=1's greedy tokens.
Launched two ways: one torchrun of 2 processes, and two torchrun "nodes" of 1 process each
meeting through the c10d rendezvous on loopback (the README's multi-node recipe). SIGTERM to
rank 0's process drains it; it ends the followers' loop, and every launch exits 0.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from flover import Engine, EngineConfig, SamplingParams  # noqa: E402
from flover.distributed import init_random_shard  # noqa: E402
from flover.models.presets import preset  # noqa: E402
from flover.weights import allocate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [5, 17, 42, 99, 7]
START_TIMEOUT = 150.0  # s: torchrun, then two processes importing torch, on 2 busy cores
EXIT_TIMEOUT = 40.0  # s after SIGTERM: the drain (nothing in flight), close, teardown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launches(kind: str, rdzv_port: int) -> list[list[str]]:
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if kind == "one node":
        return [[*torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                 "--master-port", str(rdzv_port)]]
    return [[*torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
             "--rdzv-endpoint", f"127.0.0.1:{rdzv_port}", "--rdzv-id", "flover-test"]] * 2


def greedy_tp1(max_tokens: int) -> list[int]:
    """One process over the weights tensor-parallel ranks draw their shards of."""
    model = allocate(preset("tiny_llama"), torch.float32, torch.device("cpu"))
    init_random_shard(model, 0)
    eng = Engine(EngineConfig(model="tiny_llama", dtype="float32", device="cpu",
                              max_concurrency=4, max_seq_len=128), model=model)
    eng.add_request("ref", PROMPT, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                  ignore_eos=True))
    return [o for o in eng.run_until_done()][-1].token_ids


@pytest.mark.parametrize("kind", ["one node", "two nodes"])
def test_serve_under_torchrun_answers_the_openai_client_with_tp1_tokens(kind, tmp_path):
    port = free_port()
    serve = ["-m", "flover.cli", "serve", "--model", "tiny_llama", "--device", "cpu",
             "--dtype", "float32", "--max-concurrency", "4", "--max-seq-len", "128",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("FLOVER_API_KEY", None)
    procs, logs = [], []
    for i, launch in enumerate(launches(kind, free_port())):
        log = tmp_path / f"launch{i}.log"
        logs.append(log)
        with log.open("wb") as out:
            procs.append(subprocess.Popen([*launch, *serve], cwd=ROOT, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))

    def output() -> str:
        return "\n".join(f"--- launch {i}\n{p.read_text(errors='replace')[-4000:]}"
                         for i, p in enumerate(logs))

    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert all(p.poll() is None for p in procs), f"a launch exited:\n{output()}"
            assert time.monotonic() < deadline, f"serve did not start:\n{output()}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=60, max_retries=0)
        kw = dict(model="tiny_llama", prompt=PROMPT, temperature=0,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
        first = client.completions.create(max_tokens=10, **kw)
        streamed = [t for c in client.completions.create(max_tokens=6, stream=True, **kw)
                    for ch in c.choices for t in ch.token_ids]
        assert first.choices[0].token_ids == greedy_tp1(10)
        assert streamed == greedy_tp1(6)

        # SIGTERM to rank 0's process: it drains, closes, and the followers return: every
        # rank exits 0, so every torchrun does
        leader = re.search(r"rank 0 of 2, pid (\d+)", output())
        assert leader, output()
        os.kill(int(leader.group(1)), signal.SIGTERM)
        t0 = time.monotonic()
        for p in procs:
            try:
                rc = p.wait(max(1.0, EXIT_TIMEOUT - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running {EXIT_TIMEOUT} s after SIGTERM:\n{output()}")
            assert rc == 0, output()
        assert "tensor parallelism:" not in output()  # no rank was taken for dead
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


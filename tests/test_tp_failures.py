"""Tensor parallelism: a rank that dies ends the run on every rank, with a message, never a hang.

Each rank is a plain subprocess with torchrun's environment (not torchrun itself, whose agent
would kill the others on its own and hide what is tested here: flover's heartbeat). Rank 0
serves requests now and then, as an idle server does; rank 1 follows its plans. Once both
run, the test kills one with SIGKILL and times how long the other takes to exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 120.0  # s: two processes importing torch on a busy 2-core machine
END_LIMIT = 30.0  # s: the survivor must be gone by then
HEARTBEAT = "5"  # s of silence before a peer counts as dead (FLOVER_TP_HEARTBEAT_TIMEOUT)

WORKER = """
import sys, time
from pathlib import Path
import torch
from flover import Engine, EngineConfig, SamplingParams
torch.set_num_threads(1)
eng = Engine(EngineConfig(model="tiny_llama", dtype="float32", device="cpu",
                          max_concurrency=2, max_seq_len=64, tensor_para_size=2))
ready = Path(sys.argv[1])
if eng.follower:
    ready.write_text("1")
    eng.follow()
    sys.exit(0)
if sys.argv[2] == "forward":  # after the first requests, rank 0's forward fails, alone
    real = eng.model.forward
    calls = [0]
    def forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] > 8 and ready.exists():
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)
    eng.model.forward = forward
i = 0
while True:  # a request now and then, idle in between
    eng.add_request(f"r{i}", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0))
    for _ in eng.run_until_done():
        pass
    ready.write_text("1")
    i += 1
    time.sleep(0.3)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path: Path, how: str) -> tuple[list[subprocess.Popen], list]:
    port = _free_port()
    procs, logs = [], []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   FLOVER_TP_HEARTBEAT_TIMEOUT=HEARTBEAT,
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        log = open(tmp_path / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / f"ready{rank}"),
                                       how], env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs, logs


def _wait_ready(tmp_path: Path, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            pytest.fail("the ranks did not start:\n" + _output(tmp_path))
        time.sleep(0.2)


def _stop(procs: list[subprocess.Popen], logs: list) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    for log in logs:
        log.close()


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_ends_the_other_with_an_error(victim, tmp_path):
    procs, logs = _start(tmp_path, "serve")
    try:
        _wait_ready(tmp_path, procs)
        procs[victim].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        survivor = procs[1 - victim]
        try:
            rc = survivor.wait(END_LIMIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank {1 - victim} still runs {END_LIMIT} s after rank {victim} was "
                        "killed:\n" + _output(tmp_path))
        took = time.monotonic() - t0
    finally:
        _stop(procs, logs)
    out = (tmp_path / f"rank{1 - victim}.log").read_text()
    assert rc != 0, out
    assert took < END_LIMIT
    # a message that says what happened: the heartbeat's, the follower's lost leader, or
    # rank 0's forward broken by the dead peer (gloo notices a closed connection at once)
    assert ("tensor parallelism" in out and
            (f"rank {victim} has stopped answering" in out or "lost rank 0" in out
             or "lost the rendezvous store" in out or "a rank has died" in out)), out


def _output(tmp_path: Path) -> str:
    return "\n".join(f"--- rank {r}\n{(tmp_path / f'rank{r}.log').read_text()[-3000:]}"
                     for r in range(2))


def test_a_forward_failing_on_rank_0_alone_ends_every_rank(tmp_path):
    """Rank 0's forward raises after it sent the plan: the follower waits in an all-reduce
    that rank 0 will never join. Rank 0 cannot fail just that batch and go on."""
    procs, logs = _start(tmp_path, "forward")
    try:
        t0 = time.monotonic()
        rcs = []
        for p in procs:
            try:
                rcs.append(p.wait(START_TIMEOUT + END_LIMIT - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                pytest.fail("a rank still runs after rank 0's forward failed:\n" + _output(tmp_path))
    finally:
        _stop(procs, logs)
    assert rcs[0] != 0 and rcs[1] != 0, _output(tmp_path)
    out = (tmp_path / "rank0.log").read_text()
    assert "tensor parallelism: the forward failed on rank 0 (RuntimeError: injected failure)" in out
    assert "ranks' collectives are out of step" in out

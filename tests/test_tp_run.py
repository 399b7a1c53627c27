"""`flover run` under torchrun: rank 0 replays the workload and reports; rank 1 builds the
same engines (the lone request's, then the workload's) and follows each one's plans."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 180  # s: torchrun and two processes importing torch on a busy 2-core machine

INI = """
[model_specification]
model_type=tiny_llama
data_type=fp32
device=cpu
max_concurrency=3
max_seq_len=64
fixed_input_len=6
tensor_para_size=2
[runtime_hyperparameter]
top_k=1
interval=10
use_mem_shuffle=0
mode=fused
[request]
request_output_len=12
num_requests=6
ignore_eos=1
"""


def test_flover_run_under_torchrun_finishes_every_request(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "tp.ini").write_text(INI)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "flover.cli", "run",
         str(tmp_path / "tp.ini"), "--no-live", "--json", str(tmp_path / "run.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "run.json").read_text())
    assert [r["output_tokens"] for r in report["requests"]] == [12] * 6
    assert "tensor parallelism:" not in out.stderr

"""The Python of a CPU decode step: the embedded model kept packed, batch 1, the step timed
as is and then with every compiled call (quant_cpu, fused_cpu, layer_cpu) a no-op, so that
what is left is Python, PyTorch's small ops and the engine.

    python docs/perf/2026-12-08-session13/python_overhead.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
from cpu_step import PROMPT  # noqa: E402

from flover import Engine, EngineConfig, SamplingParams  # noqa: E402
from flover.ops import fused_cpu, layer_cpu, quant_cpu  # noqa: E402


class NoOps:
    """A library whose every function returns 0 at once."""

    def __getattr__(self, name):
        return lambda *a: 0


def main() -> None:
    eng = Engine(EngineConfig(device="cpu", dtype="float32", max_concurrency=8, max_seq_len=512))
    eng.add_request("a", PROMPT, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    for _ in range(6):
        eng.step()

    def ms(n: int = 40) -> float:
        t = time.perf_counter()
        for _ in range(n):
            eng.step()
        return (time.perf_counter() - t) / n * 1e3
    print(f"step: {ms():.2f} ms")
    for mod in (quant_cpu, fused_cpu, layer_cpu):
        mod.lib = NoOps
    print(f"every compiled call a no-op: {ms():.2f} ms")


if __name__ == "__main__":
    main()

"""Where a CPU decode step goes: the embedded model kept packed, one request (batch 1), each
compiled call wrapped with a timer (the layer's Python path: layer_cpu off), then the model's
forward against the whole step. The wrappers' own Python adds about 1 us a call.

    python docs/perf/2026-12-08-session13/profile_calls.py
"""
from __future__ import annotations

import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
from cpu_step import PROMPT  # noqa: E402

from flover import Engine, EngineConfig, SamplingParams  # noqa: E402
from flover.ops import fused_cpu, layer_cpu, quant_cpu  # noqa: E402

STEPS = 20
spent: dict[str, float] = collections.defaultdict(float)
calls: collections.Counter = collections.Counter()


def wrap(mod, name: str) -> None:
    f = getattr(mod, name)

    def timed(*a, **k):
        t = time.perf_counter()
        r = f(*a, **k)
        spent[name] += time.perf_counter() - t
        calls[name] += 1
        return r
    setattr(mod, name, timed)


def steps(eng: Engine) -> float:
    t = time.perf_counter()
    for _ in range(STEPS):
        eng.step()
    return (time.perf_counter() - t) / STEPS * 1e3


def main() -> None:
    layer_cpu.ENABLED = False
    for name in ("rms_norm", "rotary", "silu_mul", "write_kv", "decode_attention"):
        wrap(fused_cpu, name)
    for name in ("int4_mm", "int8_mm"):
        wrap(quant_cpu, name)
    eng = Engine(EngineConfig(device="cpu", dtype="float32", max_concurrency=8, max_seq_len=128))
    eng.add_request("a", PROMPT, SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True))
    for _ in range(6):
        eng.step()
    spent.clear()
    calls.clear()
    print(f"step {steps(eng):.2f} ms")
    for name, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"{name:18s} {s / STEPS * 1e3:7.3f} ms  {calls[name] // STEPS} calls")
    forward, model_forward = [0.0], type(eng.model).forward

    def timed_forward(self, *a, **k):
        t = time.perf_counter()
        r = model_forward(self, *a, **k)
        forward[0] += time.perf_counter() - t
        return r
    type(eng.model).forward = timed_forward
    spent.clear()
    step = steps(eng)
    print(f"step {step:.2f} ms, model forward {forward[0] / STEPS * 1e3:.2f} ms, "
          f"compiled calls {sum(spent.values()) / STEPS * 1e3:.2f} ms")


if __name__ == "__main__":
    main()

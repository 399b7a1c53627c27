"""Programmatic dependent launch (PDL) for the decode step's Triton kernels (Hopper and newer).

In a CUDA graph each kernel normally starts only once the one before it has finished and its
writes are flushed: the launch latency and the ramp of the first loads sit between every two
kernels, ~10 per layer. With PDL a kernel is launched while its predecessor still runs; it
does what needs none of the predecessor's results (the linear kernel: pull its first weight
tiles into L2), then waits (`griddepcontrol.wait`, which returns once the predecessor has
completed and flushed), then lets its own successor launch. Every kernel launched this way
must wait before it reads or writes anything a predecessor touches: `prior` below, called
first in each such kernel, is that wait.

Off by default: on an H100 (docs/PERF.md, "Split-K and PDL") the LLaMA-7B and 13B decode steps
were within 0.7% of the same step without it, so nothing measured pays for it yet; the
engine's bitwise tests pass with it on (FLOVER_PDL=1).

`ENABLED` is the switch (`set_enabled`; FLOVER_PDL=1 or 0 in the environment sets it at
import); `enabled(x)` says whether a launch on x's device uses it: never on the CPU or under
Triton's interpreter, never before compute capability 9 (Hopper).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ENABLED = os.environ.get("FLOVER_PDL", "0") == "1"
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_CAPABLE: dict[int, bool] = {}


def set_enabled(on: bool) -> None:
    global ENABLED
    ENABLED = on


def enabled(x: torch.Tensor) -> bool:
    if not (ENABLED and x.is_cuda) or _INTERPRETED:
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _CAPABLE:
        _CAPABLE[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _CAPABLE[index]


def options(on: bool) -> dict:
    """The launch keywords for a kernel whose PDL constexpr is `on`."""
    return {"launch_pdl": True} if on else {}


@triton.jit
def prior(PDL: tl.constexpr):
    """Wait for the predecessor kernel (a no-op unless launched with PDL), then let the
    successor launch: its waiting programs take no slot that this kernel's programs need,
    since all of them are running by now."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

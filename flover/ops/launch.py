"""Hopper launch features of the Triton kernels: programmatic dependent launch (PDL), and the
switch of the products' TMA forms; and the device's multiprocessor count (`sm_count`), from
which the products choose their K parts.

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
engine's bitwise tests pass with it on (FLOVER_PDL=1). That was before the products' TMA
forms, which since 2026-12-08 take part too (each asking for its first weight tiles in L2
with `prefetch_l2` before it waits), and whether a CUDA graph keeps the programmatic edges
was never checked: bench/pdl_probe.py measures both (docs/PERF.md, session 11).

`ENABLED` is the switch (`set_enabled`; FLOVER_PDL=1 or 0 in the environment sets it at
import); `enabled(x)` says whether a launch on x's device uses it: never on the CPU or under
Triton's interpreter, never before compute capability 9 (Hopper).

TMA: the linear and weight-only products have a form whose operands reach shared memory by
the tensor memory accelerator, several K steps deep (`linear_triton._linear_tma_kernel`,
`quant_triton._quant_tma_kernel`). `TMA` (FLOVER_TMA=0 turns it off, to compare) and
`tma(x)` (also: compiled, compute capability 9 or more) say whether products take it
where their shapes allow. Each form is batch-invariant on its own; their bits are not promised
to be each other's (other MMA instructions), so the choice never depends on M.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ENABLED = os.environ.get("FLOVER_PDL", "0") == "1"
TMA = os.environ.get("FLOVER_TMA", "1") != "0"
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_CAPABLE: dict[int, bool] = {}
_SMS: dict[torch.device, int] = {}


def set_enabled(on: bool) -> None:
    global ENABLED
    ENABLED = on


def _hopper(device: torch.device) -> bool:
    """Compiled (not interpreted) on a GPU of compute capability 9 or more."""
    if device.type != "cuda" or _INTERPRETED:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABLE:
        _CAPABLE[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _CAPABLE[index]


def enabled(x: torch.Tensor) -> bool:
    return ENABLED and _hopper(x.device)


def tma(x: torch.Tensor | torch.device, asked: bool | None = None) -> bool:
    """Whether products on x's device (or this device) take their TMA forms (where the shapes
    allow): as `asked` (a launch configuration's "tma"), else by the switch and the device."""
    if asked is not None:
        return asked
    return TMA and _hopper(x if isinstance(x, torch.device) else x.device)


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


@triton.jit
def prefetch_l2(P, rows, stride, mask, lo, hi, LINES: tl.constexpr, LINE: tl.constexpr):
    """Ask for elements [lo, lo + LINES * LINE) (up to hi) of P's rows `rows` (where mask) in
    L2, one prefetch per line of LINE elements (128 bytes): issued before `prior`'s wait, they
    load while the kernel before still runs (a weight does not depend on it). A hint: nothing
    waits for it, and L2 is where every SM's reads and writes meet, so it reads nothing stale."""
    rl = lo + tl.arange(0, LINES) * LINE
    ok = mask[:, None] & (rl < hi)[None, :]
    off = tl.where(ok, rows.to(tl.int64)[:, None] * stride + rl[None, :], 0)
    tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;",
                              "=r,l", [P + off], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_lines(nbytes: int) -> int:
    """`prefetch_l2`'s LINES for a span of nbytes a row: 128-byte lines, a power of two (at
    least one)."""
    return triton.next_power_of_2(max(1, -(-nbytes // 128)))


def sm_count(device: torch.device) -> int:
    """The device's multiprocessors (1 off the GPU): the products' K parts are chosen from it
    and the weight's shape, never from M."""
    if device not in _SMS:
        _SMS[device] = (torch.cuda.get_device_properties(device).multi_processor_count
                        if device.type == "cuda" else 1)
    return _SMS[device]

"""Host values to the device, and device tensors to the host, without waiting for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory, and such a copy first waits
for all the work already queued on the stream: with async scheduling that is the iteration in
flight, so the host would stop overlapping it. `to_device` stages the values in pinned memory
and copies them without a wait, ordered on the stream after the queued work (PyTorch's pinned
allocator keeps the staging buffer until the copy is done).
"""

from __future__ import annotations

import torch


def to_device(values, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.tensor(values, dtype=dtype, device=device), without a host wait on a GPU."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of a device tensor, started without waiting: it is filled once the
    work queued before it is done (record an event after it to know when)."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host

"""The slot KV cache and the memory shuffle: who holds which slot, and the tensors.

One fixed slot of `max_seq_len` positions per in-flight row, allocated once. The live slots
form a block [0, size): a fused decode runs over rows 0..size-1 and reads slot i for row i.
With the shuffle on, a finished row's slot is filled by moving the block's last slot into it
(one copy of its filled length), so the block stays dense. With it off, the block only
shrinks when its top slots are free: finished rows in the middle keep their memory and their
rows (the original Flover's behaviour without reordering).

`SlotAllocator` is the one record of which row holds which slot; it knows no tensors and
answers with cache operations (data). `SlotCache` holds the tensors and applies those
operations when the runner executes a plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flover.engine.block_manager import CopyBlocks
from flover.ops.transfer import to_device


@dataclass(frozen=True, slots=True)
class CopyPrefix:
    """Slot dst takes the first `tokens` positions of slot src (a forked row's prompt)."""

    src: int
    dst: int
    tokens: int


@dataclass(frozen=True, slots=True)
class Reorder:
    """dst[i] takes src[i]'s first `tokens` positions, all at once (beams among their slots)."""

    src: tuple[int, ...]
    dst: tuple[int, ...]
    tokens: int


@dataclass(frozen=True, slots=True)
class Move:
    """The memory shuffle: the row of slot src now lives in slot dst."""

    src: int
    dst: int
    tokens: int


CacheOp = CopyPrefix | Reorder | Move | CopyBlocks


class SlotAllocator:
    """Which row holds which slot. Rows are any hashable objects with `num_computed`."""

    def __init__(self, num_slots: int, shuffle: bool) -> None:
        self.num_slots, self.shuffle = num_slots, shuffle
        self.owner: list[object | None] = [None] * num_slots
        self._slot: dict[object, int] = {}
        self.size = 0  # the block [0, size) holds every live slot
        self.moves = 0
        self.tokens_moved = 0

    @property
    def free(self) -> int:
        """Slots a new row can take now (always at the top of the block)."""
        return self.num_slots - self.size

    @property
    def live(self) -> int:
        return len(self._slot)

    def slot(self, row: object) -> int:
        return self._slot[row]

    def allocate(self, row: object) -> int:
        """Place a new row at the top of the block."""
        if self.size == self.num_slots:
            raise RuntimeError("no free KV slot")
        slot = self.size
        self.owner[slot], self._slot[row] = row, slot
        self.size += 1
        return slot

    def release(self, row: object) -> Move | None:
        """Free a row's slot; with the shuffle on, the block's last row moves into it."""
        slot = self._slot.pop(row)
        self.owner[slot] = None
        move = None
        top = self.size - 1
        if self.shuffle and slot != top:
            moved = self.owner[top]
            move = Move(top, slot, moved.num_computed)
            self.owner[slot], self.owner[top] = moved, None
            self._slot[moved] = slot
            self.moves += 1
            self.tokens_moved += move.tokens
        while self.size and self.owner[self.size - 1] is None:
            self.size -= 1
        return move


class SlotCache:
    """The K and V tensors: [layers, slots, kv heads, max_seq_len, head_dim] each."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_seq_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, num_slots, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots, self.max_seq_len = num_slots, max_seq_len
        self.token_bytes = 2 * num_layers * num_kv_heads * head_dim * self.k.element_size()

    def apply(self, op: CacheOp) -> None:
        if isinstance(op, Reorder):
            src, dst = to_device(op.src, self.k.device), to_device(op.dst, self.k.device)
        else:
            src, dst = op.src, op.dst
        n = op.tokens
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]


class PagedCache:
    """The paged layout's K and V tensors: [layers, blocks, kv heads, block_size, head_dim] each
    (`flover.engine.block_manager` decides who holds which block). `num_slots` is the number
    of rows in flight (the sampler's per-row state)."""

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, num_slots: int,
                 max_seq_len: int) -> None:
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_slots, self.max_seq_len = num_slots, max_seq_len
        self.token_bytes = 2 * num_layers * num_kv_heads * head_dim * self.k.element_size()

    def apply(self, op: CacheOp) -> None:
        """Copies on write; a beam `Reorder` moves block tables only (nothing to copy here)."""
        if isinstance(op, CopyBlocks):
            src, dst = to_device(op.src, self.k.device), to_device(op.dst, self.k.device)
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]

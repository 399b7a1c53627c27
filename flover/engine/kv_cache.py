"""The slot KV cache and the memory shuffle.

One fixed slot of `max_seq_len` positions per in-flight request, allocated once. The live
slots form a block [0, size): a fused decode runs over rows 0..size-1 and reads slot i for
row i. With the shuffle on, a finished request's slot is filled by moving the block's last
slot into it (one copy of its filled length), so the block stays dense. With it off, the
block only shrinks when its top slots are free: finished requests in the middle keep their
memory and their rows (the original Flover's behaviour without reordering).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Move:
    src: int
    dst: int
    tokens: int


class SlotCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_seq_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device,
                 shuffle: bool = True) -> None:
        shape = (num_layers, num_slots, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots, self.max_seq_len, self.shuffle = num_slots, max_seq_len, shuffle
        self.owner: list[object | None] = [None] * num_slots
        self.filled = [0] * num_slots  # tokens written per slot, kept by the scheduler
        self.size = 0  # the block [0, size) holds every live slot
        self.moves = 0
        self.bytes_moved = 0
        self._token_bytes = 2 * num_layers * num_kv_heads * head_dim * self.k.element_size()

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def num_live(self) -> int:
        return sum(o is not None for o in self.owner[: self.size])

    def can_allocate(self) -> bool:
        return self.size < self.num_slots

    @property
    def free(self) -> int:
        """Slots a new request can take now (always at the top of the block)."""
        return self.num_slots - self.size

    def copy(self, src: int, dst: int, tokens: int) -> None:
        """Give slot dst the first `tokens` positions of slot src (a forked row's prompt)."""
        self.k[:, dst, :, :tokens] = self.k[:, src, :, :tokens]
        self.v[:, dst, :, :tokens] = self.v[:, src, :, :tokens]
        self.filled[dst] = tokens

    def gather(self, src: list[int], dst: list[int], tokens: int) -> None:
        """dst[i] <- src[i] for all i at once (beams reordering among their own slots)."""
        s = torch.tensor(src, device=self.k.device)
        d = torch.tensor(dst, device=self.k.device)
        self.k[:, d, :, :tokens] = self.k[:, s, :, :tokens]
        self.v[:, d, :, :tokens] = self.v[:, s, :, :tokens]

    def allocate(self, owner: object) -> int:
        """Place a new request at the top of the block."""
        if not self.can_allocate():
            raise RuntimeError("no free KV slot")
        slot = self.size
        self.owner[slot], self.filled[slot] = owner, 0
        self.size += 1
        return slot

    def release(self, slot: int) -> Move | None:
        """Free a slot; with the shuffle on, move the block's last slot into it."""
        assert self.owner[slot] is not None, f"slot {slot} is not in use"
        self.owner[slot], self.filled[slot] = None, 0
        move = None
        if self.shuffle and slot != self.size - 1:
            src = self.size - 1
            n = self.filled[src]
            self.k[:, slot, :, :n] = self.k[:, src, :, :n]
            self.v[:, slot, :, :n] = self.v[:, src, :, :n]
            self.owner[slot], self.filled[slot] = self.owner[src], n
            self.owner[src], self.filled[src] = None, 0
            self.moves += 1
            self.bytes_moved += n * self._token_bytes
            move = Move(src, slot, n)
        while self.size and self.owner[self.size - 1] is None:
            self.size -= 1
        return move

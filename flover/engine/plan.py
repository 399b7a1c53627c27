"""What one forward consumes, as a small picklable record: rank 0 of a tensor-parallel group
sends it to the other ranks before its forward, and they run the same forward from it.

It carries the runner's prepared inputs, not the scheduler's objects (no requests, no rows):
the cache operations to apply first, then either the flat input ids with the attention
metadata's fields (an eager forward), or each decode row's last token and position (a
replayed decode graph: the follower fills and replays the same bucket), or the flat tokens of
a replayed token graph (every iteration under batch invariance). Followers take no
logits and sample nothing; rank 0 does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from flover.engine.kv_cache import CacheOp
from flover.ops.attention import AttentionMetadata, PrefillChunk
from flover.ops.transfer import to_device


class DecodeRow(NamedTuple):
    """What a decode graph reads of a row (see `DecodeGraphs._fill`)."""

    last_token: int
    num_computed: int


@dataclass(slots=True)
class ForwardPlan:
    cache_ops: list[CacheOp] = field(default_factory=list)
    # an eager forward: the flat batch and AttentionMetadata's fields
    ids: list[int] = field(default_factory=list)
    slot_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    num_decode: int = 0
    decode_lengths: list[int] | None = None
    decode_max_len: int = 0
    prefills: list[tuple[int, int, int, int]] = field(default_factory=list)  # PrefillChunk fields
    batch_invariant: bool = False
    # a replayed decode graph instead: row i <-> slot i, None for a padding row
    graph_rows: list[DecodeRow | None] | None = None
    # or a replayed token graph (cuda_graph.TokenGraphs): ids, slots, positions, lengths, rows kept
    tokens: tuple[list[int], list[int], list[int], list[int], list[int]] | None = None

    @classmethod
    def graph(cls, ops: list[CacheOp], decode: list) -> ForwardPlan:
        rows = [None if r is None else DecodeRow(r.last_token, r.num_computed) for r in decode]
        return cls(list(ops), graph_rows=rows)

    @classmethod
    def token_graph(cls, ops: list[CacheOp], ids: list[int], slots: list[int], pos: list[int],
                    lengths: list[int], keep: list[int]) -> ForwardPlan:
        return cls(list(ops), tokens=(ids, slots, pos, lengths, keep))

    def inputs(self, device: torch.device) -> tuple[torch.Tensor, AttentionMetadata]:
        """The eager forward's input ids and metadata, on `device`."""
        lengths = self.decode_lengths or None
        meta = AttentionMetadata(
            slot_ids=to_device(self.slot_ids, device),
            positions=to_device(self.positions, device), num_decode=self.num_decode,
            decode_lengths=None if lengths is None else to_device(lengths, device),
            decode_max_len=self.decode_max_len,
            prefills=[PrefillChunk(*c) for c in self.prefills],
            batch_invariant=self.batch_invariant)
        return to_device(self.ids, device), meta

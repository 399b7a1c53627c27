"""The paged KV cache's bookkeeping: which blocks each row holds, shared prefixes, free blocks.

The pool is `num_blocks` blocks of `block_size` positions. Block 0 is never handed out: it is
where padding rows of a captured decode graph write (no request reads it). A row's block
table lists its blocks in position order; it grows a block at a time as the row does.

Blocks are reference-counted: forks (n samples, beams) share their head's blocks, and a
row about to write into a block that others share first takes a private copy
(`CopyBlocks`, copy on write). With prefix caching on, every full block is keyed by a hash
of its tokens and of everything before them (SHA-256 over the parent's key and the block's
token ids, as vLLM's `sha256` prefix-caching hash: a collision, which would hand a row another
prompt's keys and values, is not a practical risk); a new row reuses every cached block of its
tokens, and a block nobody references stays cached (least recently used first) until the
pool needs it.

Each row also holds an index in [0, max_concurrency): the slot the sampler's per-row state
(penalty counts) lives in. It keeps that index while preempted, so its state survives.
`BlockAllocator` knows no tensors: it answers with cache operations (data).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class CopyBlocks:
    """Block dst[i] takes block src[i]'s contents, for every layer (copy on write)."""

    src: tuple[int, ...]
    dst: tuple[int, ...]


def block_hash(parent: bytes | None, tokens: tuple[int, ...]) -> bytes:
    """The key of a full block: its tokens and (through the parent's key) all before them.
    SHA-256, not Python's 64-bit `hash`: two prefixes sharing a key would share KV blocks."""
    h = hashlib.sha256(parent or b"")
    h.update(array("q", tokens).tobytes())
    return h.digest()


@dataclass(slots=True)
class RowBlocks:
    """One row's blocks and the keys of its full, hashed ones (a prefix of the table)."""

    slot: int
    table: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)


class BlockAllocator:
    """Rows are any hashable objects; the caller passes their tokens when it matters."""

    def __init__(self, num_blocks: int, block_size: int, num_slots: int,
                 prefix_caching: bool) -> None:
        if num_blocks < 2:
            raise ValueError("a paged cache needs at least 2 blocks (block 0 is reserved)")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_slots, self.prefix_caching = num_slots, prefix_caching
        self.ref = [0] * num_blocks
        self.key: list[bytes | None] = [None] * num_blocks  # hash of a cached full block
        self.cached: dict[bytes, int] = {}  # hash -> block
        self.free_blocks: list[int] = list(range(num_blocks - 1, 0, -1))  # never cached
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but cached: LRU first
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.rows: dict[object, RowBlocks] = {}
        self.computing: dict[bytes, object] = {}  # key of a full block a row is computing -> row
        self.hits = 0  # blocks found in the prefix cache
        self.tokens_saved = 0  # prompt tokens not recomputed thanks to them
        self.preemptions = 0

    # --- capacity ---------------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Blocks a row could take now: free ones and cached ones nobody references."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def used(self) -> int:
        """Blocks referenced by some row."""
        return self.num_blocks - 1 - self.available

    @property
    def free(self) -> int:
        """Row slots free (the cap of rows in flight)."""
        return len(self.free_slots)

    @property
    def live(self) -> int:
        """Rows holding a slot (running, or preempted and waiting to resume)."""
        return len(self.rows)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # --- rows -------------------------------------------------------------------------------

    def has(self, row: object) -> bool:
        return row in self.rows

    def slot(self, row: object) -> int:
        return self.rows[row].slot

    def table(self, row: object) -> list[int]:
        return self.rows[row].table

    def add_row(self, row: object) -> int:
        """Give a row its slot (no blocks yet)."""
        if not self.free_slots:
            raise RuntimeError("no free row slot")
        rb = RowBlocks(self.free_slots.pop())
        self.rows[row] = rb
        return rb.slot

    def remove_row(self, row: object) -> None:
        """The row has ended: its blocks and its slot go back."""
        self.drop_blocks(row)
        self.free_slots.append(self.rows.pop(row).slot)

    def drop_blocks(self, row: object) -> None:
        """Give back a row's blocks and keep its slot (preemption)."""
        rb = self.rows[row]
        if self.computing:
            self.computing = {k: r for k, r in self.computing.items() if r is not row}
        for b in reversed(rb.table):  # the tail first: it is the least useful to keep cached
            self._decref(b)
        rb.table, rb.hashes = [], []

    # --- prefix cache -----------------------------------------------------------------------

    def _keys(self, tokens: list[int], blocks: int) -> list[bytes]:
        keys, parent, bs = [], None, self.block_size
        for i in range(blocks):
            parent = block_hash(parent, tuple(tokens[i * bs:(i + 1) * bs]))
            keys.append(parent)
        return keys

    def match(self, tokens: list[int]) -> list[int]:
        """Cached blocks holding a prefix of `tokens`, leaving at least the last token to
        compute (its logits are needed)."""
        if not self.prefix_caching:
            return []
        out = []
        for key in self._keys(tokens, (len(tokens) - 1) // self.block_size):
            b = self.cached.get(key)
            if b is None:
                break
            out.append(b)
        return out

    def being_computed(self, tokens: list[int]) -> bool:
        """Whether the first full block of `tokens` missing from the cache is being computed by
        a row now: a row with these tokens had better wait for it than compute it again."""
        if not self.prefix_caching:
            return False
        for key in self._keys(tokens, (len(tokens) - 1) // self.block_size):
            if key not in self.cached:
                return key in self.computing
        return False

    def allocate_prompts(self, work: list[tuple[object, list[int], bool]],
                         reserve: int = 0) -> list[int] | None:
        """Blocks for every (row, tokens, may_hit) at once, or None (nothing changes) when
        they would leave fewer than `reserve` available. Cached blocks of each row's tokens
        are shared (pinned before any new block is taken, so none of them is evicted for its
        neighbours); returns each row's tokens already in the cache."""
        hits = [self.match(t) if may_hit else [] for _, t, may_hit in work]
        new = sum(self.blocks_for(len(t)) - len(h) for (_, t, _), h in zip(work, hits, strict=True))
        revived = len({b for h in hits for b in h if self.ref[b] == 0})
        if new + revived + reserve > self.available:
            return None
        for h in hits:
            for b in h:
                self._incref(b)
        saved = []
        for (row, t, _), h in zip(work, hits, strict=True):
            rb = self.rows[row]
            assert not rb.table
            rb.table = list(h) + [self._take() for _ in range(self.blocks_for(len(t)) - len(h))]
            rb.hashes = [self.key[b] for b in h]
            if self.prefix_caching:
                for key in self._keys(t, len(t) // self.block_size)[len(h):]:
                    self.computing.setdefault(key, row)
            self.hits += len(h)
            self.tokens_saved += len(h) * self.block_size
            saved.append(len(h) * self.block_size)
        return saved

    def register(self, row: object, tokens: list[int], computed: int) -> None:
        """Key the row's full blocks among its first `computed` tokens, for later rows."""
        if not self.prefix_caching:
            return
        rb, bs = self.rows[row], self.block_size
        full = min(computed // bs, len(rb.table))
        parent = rb.hashes[-1] if rb.hashes else None
        for i in range(len(rb.hashes), full):
            parent = block_hash(parent, tuple(tokens[i * bs:(i + 1) * bs]))
            rb.hashes.append(parent)
            if self.computing.get(parent) is row:
                del self.computing[parent]
            b = rb.table[i]
            if self.key[b] is None and parent not in self.cached:
                self.key[b], self.cached[parent] = parent, b

    # --- growth, sharing, copy on write -----------------------------------------------------

    def can_append(self, row: object, position: int) -> bool:
        """Whether writing `position` needs no new block."""
        rb = self.rows[row]
        i = position // self.block_size
        return i < len(rb.table) and self.ref[rb.table[i]] == 1

    def prepare_write(self, row: object, position: int) -> CopyBlocks | None:
        """Make the block holding `position` the row's own: a new block at the end of the
        table, or a private copy of a shared one. Needs `available` >= 1 unless can_append."""
        rb = self.rows[row]
        i = position // self.block_size
        if i == len(rb.table):
            rb.table.append(self._take())
            return None
        b = rb.table[i]
        if self.ref[b] == 1:
            return None
        new = self._take()
        self._decref(b)
        rb.table[i] = new
        del rb.hashes[i:]  # the copy is not (yet) keyed
        return CopyBlocks((b,), (new,))

    def fork(self, src: object, dst: object) -> None:
        """dst shares every block of src (its own blocks, if any, go back)."""
        s, d = self.rows[src], self.rows[dst]
        table, hashes = list(s.table), list(s.hashes)
        for b in table:
            self._incref(b)
        for b in d.table:
            self._decref(b)
        d.table, d.hashes = table, hashes

    def reorder(self, rows: list[object], parents: list[int]) -> None:
        """Row i continues row parents[i]: it shares that row's blocks (beams)."""
        tables = [(list(self.rows[rows[p]].table), list(self.rows[rows[p]].hashes))
                  for p in parents]
        for t, _ in tables:
            for b in t:
                self._incref(b)
        for r, (t, h) in zip(rows, tables, strict=True):
            rb = self.rows[r]
            for b in rb.table:
                self._decref(b)
            rb.table, rb.hashes = t, h

    # --- blocks -----------------------------------------------------------------------------

    def _take(self) -> int:
        if self.free_blocks:
            b = self.free_blocks.pop()
        elif self.evictable:
            b, _ = self.evictable.popitem(last=False)  # least recently used
            del self.cached[self.key[b]]
            self.key[b] = None
        else:
            raise RuntimeError("the KV block pool is empty")
        self.ref[b] = 1
        return b

    def _incref(self, b: int) -> None:
        if self.ref[b] == 0:
            del self.evictable[b]
        self.ref[b] += 1

    def _decref(self, b: int) -> None:
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if self.key[b] is not None:
                self.evictable[b] = None  # most recently used at the end
            else:
                self.free_blocks.append(b)

"""CUDA graphs for the iterations: one graph per size bucket, replayed.

`DecodeGraphs` and `PagedDecodeGraphs` replay pure-decode iterations. `TokenGraphs` replays
every iteration of the slot layout, prompt chunks included, when the kernels are
batch-invariant (see its docstring).

A decode iteration launches a few hundred small kernels; replaying them as one graph takes
the host's launch cost off the critical path. Each bucket size (1, 2, 4, 8, 12, 16, 24, 32,
48, 64, then steps of 16, up to the number of slots) is captured when the engine starts
(`capture_all`), all sharing one memory pool. A batch of n rows replays the graph of the next
bucket up: rows n.. are padding rows that feed token 0 and write their key and value at their
slot's last position, which no request reads (see `flover.engine.runner`). The memory shuffle keeps
the live rows in slots 0..n-1, so the padding stays small. The graph sees the cache through
`max_len = max_seq_len`; the attention kernel still reads each row only up to its own length.

Every per-iteration input (token ids, positions, lengths, which logits rows to keep) goes to
the GPU in one host-to-device copy from a pinned buffer.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from flover.engine.kv_cache import PagedCache, SlotCache
from flover.ops.attention import AttentionMetadata

# Captures share torch's default capture stream, and a capture in global mode forbids other
# threads' CUDA calls; `flover run`'s `instances` mode has one engine per thread.
_CAPTURE_LOCK = threading.Lock()


def bucket_sizes(num_slots: int) -> list[int]:
    """1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, ... up to num_slots, and num_slots itself.

    Steps of a quarter to a half below 32: a step at 9-12 live rows replays 12 rows, not 16
    (on an H200, llama_13b: the 16-row step costs 1.13x the 1-row step, the 8-row 1.065x)."""
    sizes = [1, 2, 4, 8, 12, 16, 24] + list(range(32, num_slots + 1, 16))
    return sorted({s for s in sizes if s < num_slots} | {num_slots})


class BucketGraphs:
    """What the graph classes share: one graph per size bucket, captured at start into one
    memory pool, fed from a pinned host buffer (`host` -> `static`) in one copy per iteration.
    Subclasses define `_forward(size)` (the static-shaped forward, reading `static`) and
    `_pad(size)` (fill `host` with padding only, for the warm-up and the capture)."""

    host: torch.Tensor
    static: torch.Tensor
    buckets: list[int]

    def __init__(self, model: nn.Module, cache, capture: bool) -> None:
        self.model, self.cache, self.capture = model, cache, capture
        self.copied: torch.cuda.Event | None = None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _forward(self, size: int) -> torch.Tensor:
        raise NotImplementedError

    def _pad(self, size: int) -> None:
        raise NotImplementedError

    def capture_all(self) -> None:
        """Capture every bucket now, largest first (the smaller reuse its pool memory), so that
        no request waits for a capture in the middle of a run."""
        for size in reversed(self.buckets):
            if size not in self.graphs:
                self._capture(size)

    def _capture(self, size: int) -> None:
        """Warm up on a side stream (Triton compiles, cuBLAS picks), then capture."""
        self._pad(size)
        self._upload()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(size)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with _CAPTURE_LOCK, torch.cuda.graph(graph, pool=self.pool,
                                             capture_error_mode="thread_local"):
            logits = self._forward(size)
        self.pool = graph.pool()
        self.graphs[size] = (graph, logits)

    def _wait_for_copy(self) -> None:
        """Before the host buffer is written again: its last copy out has finished."""
        if self.copied is not None:
            self.copied.synchronize()

    def _upload(self) -> None:
        self.static.copy_(self.host, non_blocking=True)

    def _replay(self, size: int, feed=None) -> torch.Tensor:
        """Send the filled host buffer and replay the bucket's graph (or run its forward
        eagerly with capture=False); the logits it leaves. `feed` (async scheduling): (flat
        indices, token ids) on the device, written over the uploaded input ids."""
        self._upload()
        if feed is not None:
            self.static[0].index_copy_(0, *feed)
        if not self.capture:
            return self._forward(size)
        self.copied = torch.cuda.Event()
        self.copied.record()
        graph, logits = self.graphs[size]
        graph.replay()
        return logits


class DecodeGraphs(BucketGraphs):
    """`forward_logits(rows)` for a decode-only batch: replays the bucket's graph.

    With `capture=False` the same padded, static-shaped forward runs eagerly (the CPU tests
    check the padding and buffer logic that way).
    """

    def __init__(self, model: nn.Module, cache: SlotCache, capture: bool = True) -> None:
        super().__init__(model, cache, capture)
        n, dev = cache.num_slots, cache.k.device
        self.buckets = bucket_sizes(n)
        # rows: token ids, positions, lengths, logits rows to keep; one copy per iteration
        self.static = torch.zeros((4, n), dtype=torch.long, device=dev)
        self.host = torch.zeros((4, n), dtype=torch.long, pin_memory=capture)
        self.slot_ids = torch.arange(n, device=dev)

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def _forward(self, size: int) -> torch.Tensor:
        ids, pos, lens = self.static[0, :size], self.static[1, :size], self.static[2, :size]
        meta = AttentionMetadata(slot_ids=self.slot_ids[:size], positions=pos, num_decode=size,
                                 decode_lengths=lens, decode_max_len=self.cache.max_seq_len,
                                 prefills=[])
        return self.model.logits(self.model(ids, meta, self.cache.k, self.cache.v))

    def _pad(self, size: int) -> None:
        self._fill([], size)  # every row a padding row: writes only last positions

    def _fill(self, decode: list, size: int) -> int:
        """Write the padded inputs into the pinned host buffer; returns the live row count."""
        self._wait_for_copy()
        pad_pos = self.cache.max_seq_len - 1
        ids, pos, lens, keep = [], [], [], []
        for i, r in enumerate(decode):
            if r is None:
                ids.append(0), pos.append(pad_pos), lens.append(1)
            else:
                ids.append(r.last_token), pos.append(r.num_computed), lens.append(r.num_computed + 1)
                keep.append(i)
        pad = size - len(decode)
        self.host[0, :size] = torch.tensor(ids + [0] * pad)
        self.host[1, :size] = torch.tensor(pos + [pad_pos] * pad)
        self.host[2, :size] = torch.tensor(lens + [1] * pad)
        self.host[3, :len(keep)] = torch.tensor(keep, dtype=torch.long)
        return len(keep)

    def forward_logits(self, decode: list, feed=None) -> torch.Tensor:
        """decode: row i <-> slot i, None for a padding row. Logits [live rows, vocab]."""
        size = self.bucket(len(decode))
        live = self._fill(decode, size)
        return self._replay(size, feed).index_select(0, self.static[3, :live])


class PagedDecodeGraphs(DecodeGraphs):
    """The same for the paged layout: the block table is one more static input.

    Decode rows are dense (row i is the i-th generating row); rows n.. of a bucket are padding
    rows whose table is all block 0, the block no request holds: they write there and read
    only it. Per-iteration inputs (ids, positions, lengths, rows to keep, the block and the
    offset each row writes, then the tables) go in one host-to-device copy.
    """

    def __init__(self, model: nn.Module, cache: PagedCache, capture: bool = True) -> None:
        self.width = -(-cache.max_seq_len // cache.block_size)  # blocks of a full-length row
        super().__init__(model, cache, capture)
        n, dev, w = cache.num_slots, cache.k.device, self.width
        # one buffer: 6 rows of n inputs, then the tables [n, width] (each row's contiguous)
        self.flat = torch.zeros(6 * n + n * w, dtype=torch.long, device=dev)
        self.flat_host = torch.zeros(6 * n + n * w, dtype=torch.long, pin_memory=capture)
        self.static, self.host = self.flat[:6 * n].view(6, n), self.flat_host[:6 * n].view(6, n)
        self.tables = self.flat[6 * n:].view(n, w)
        self.tables_host = self.flat_host[6 * n:].view(n, w)
        self.written: list[list[int] | None] = [None] * n  # what each table row holds now

    def _forward(self, size: int) -> torch.Tensor:
        st = self.static
        meta = AttentionMetadata(slot_ids=st[4, :size], positions=st[1, :size], num_decode=size,
                                 decode_lengths=st[2, :size], decode_max_len=self.cache.max_seq_len,
                                 prefills=[], write_offsets=st[5, :size],
                                 block_tables=self.tables[:size])
        return self.model.logits(self.model(st[0, :size], meta, self.cache.k, self.cache.v))

    def _upload(self) -> None:
        self.flat.copy_(self.flat_host, non_blocking=True)

    def _fill(self, decode: list, size: int, tables: dict | None = None) -> int:
        self._wait_for_copy()
        bs, n = self.cache.block_size, len(decode)
        rows = [[r.last_token, r.num_computed, r.num_computed + 1, i,
                 tables[r][r.num_computed // bs], r.num_computed % bs]
                for i, r in enumerate(decode)]
        pad = [[0, 0, 1, 0, 0, 0]] * (size - n)
        self.host[:, :size] = torch.tensor(rows + pad, dtype=torch.long).reshape(size, 6).t()
        # table rows persist in the pinned buffer: only those that changed are written. Entries
        # past a row's length are never read; a padding row reads entry 0, any valid block.
        for i, r in enumerate(decode):
            t = tables[r]
            if self.written[i] != t:
                self.tables_host[i, :len(t)] = torch.tensor(t, dtype=torch.long)
                self.written[i] = list(t)
        return n

    def forward_logits(self, decode: list, tables: dict | None = None, feed=None) -> torch.Tensor:
        """decode: the generating rows, dense; tables: each row's blocks. Logits [rows, vocab].
        `feed`: see `BucketGraphs._replay`."""
        size = self.bucket(len(decode))
        live = self._fill(decode, size, tables)
        # the graph's output is overwritten by the next replay
        return self._replay(size, feed)[:live].clone()


def token_buckets(num_slots: int, max_tokens: int) -> list[int]:
    """The decode buckets, then steps of a third to a half up to `max_tokens` (prompt chunks)."""
    sizes = set(bucket_sizes(num_slots))
    b = 64
    while b < max_tokens:
        if b > num_slots:
            sizes.add(b)
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3  # 64, 96, 128, 192, 256, ...
    return sorted(s for s in sizes | {max_tokens} if s <= max_tokens)


class TokenGraphs(BucketGraphs):
    """`forward_logits(...)` for any iteration of the slot layout: decode rows and prompt
    chunks are one flat list of tokens, each with its slot, position and KV length.

    With batch-invariant kernels a token's result depends on its own inputs only: the linear
    layers take one tile configuration for every row count and attention runs per token
    (`row_attention`), so a prompt token is just a row that reads its slot up to its own
    position. An iteration of T tokens therefore replays the graph of the next bucket up,
    bitwise the same as the eager forward, and mixed prefill-and-decode iterations leave the
    host's launch cost behind as decode iterations do. Padding tokens write their key and value
    at slot 0's last position, which no request reads, and read slot 0 up to length 1; the
    logits of at most `num_slots` rows are computed (no iteration samples more rows).
    """

    def __init__(self, model: nn.Module, cache: SlotCache, max_prefill_tokens: int,
                 capture: bool = True) -> None:
        super().__init__(model, cache, capture)
        n, dev = cache.num_slots, cache.k.device
        self.max_tokens = n + max_prefill_tokens
        self.buckets = token_buckets(n, self.max_tokens)
        # ids, slots, positions, KV lengths, rows to keep: one copy per iteration
        self.static = torch.zeros((5, self.max_tokens), dtype=torch.long, device=dev)
        self.host = torch.zeros((5, self.max_tokens), dtype=torch.long, pin_memory=capture)
        self.replays = 0  # iterations served from a graph (tests and stats)

    def bucket(self, tokens: int) -> int | None:
        return next((b for b in self.buckets if b >= tokens), None)

    def fits(self, tokens: int, rows: int) -> bool:
        """Whether an iteration of `tokens` tokens sampling `rows` rows has a graph."""
        size = self.bucket(tokens)
        return size is not None and rows <= min(size, self.cache.num_slots)

    def _forward(self, size: int) -> torch.Tensor:
        ids, slots, pos, lens = self.static[:4, :size]
        keep = self.static[4, :min(size, self.cache.num_slots)]
        max_len = self.cache.max_seq_len  # sizes the grid only: a token reads its own length
        meta = AttentionMetadata(slot_ids=slots, positions=pos, num_decode=size,
                                 decode_lengths=lens, decode_max_len=max_len, prefills=[],
                                 batch_invariant=True, rows=(slots, lens, max_len))
        hidden = self.model(ids, meta, self.cache.k, self.cache.v)
        return self.model.logits(hidden.index_select(0, keep))

    def _pad(self, size: int) -> None:
        self._fill([], [], [], [], [], size)  # all padding: writes only slot 0's last position

    def _fill(self, ids: list[int], slots: list[int], pos: list[int], lens: list[int],
              keep: list[int], size: int) -> None:
        self._wait_for_copy()
        pad = size - len(ids)
        self.host[:, :size] = torch.tensor(
            [ids + [0] * pad, slots + [0] * pad, pos + [self.cache.max_seq_len - 1] * pad,
             lens + [1] * pad, keep + [0] * (size - len(keep))], dtype=torch.long)

    def forward_logits(self, ids: list[int], slots: list[int], pos: list[int],
                       lens: list[int], keep: list[int], feed=None) -> torch.Tensor:
        """Logits [len(keep), vocab] of the flat tokens' rows `keep`. The iteration must fit
        (`fits`): the caller runs a larger one eagerly."""
        assert self.fits(len(ids), len(keep)), "no graph this large: run it eagerly"
        size = self.bucket(len(ids))
        self._fill(ids, slots, pos, lens, keep, size)
        logits = self._replay(size, feed)
        self.replays += 1
        return logits[:len(keep)].clone()  # the graph's output is overwritten by the next replay

"""Turns a scheduled batch into tensors, runs one forward pass, and samples.

Flat layout of an iteration's tokens: decode rows first (row i reads and writes slot i),
then each prefill chunk. Padding rows feed token 0 and write their key and value at the
slot's last position, which no request ever reads: a request needs prompt + max_tokens <=
max_seq_len, so its last fed token sits at max_seq_len - 2 at most.
"""

from __future__ import annotations

import torch
from torch import nn

from flover.engine.cuda_graph import DecodeGraphs
from flover.engine.kv_cache import SlotCache
from flover.engine.scheduler import Batch
from flover.engine.sequence import Group
from flover.ops.attention import AttentionMetadata, PrefillChunk
from flover.sampling.penalties import apply_penalties, compute_logprobs
from flover.sampling.sampler import sample


class ModelRunner:
    def __init__(self, model: nn.Module, cache: SlotCache, seed: int = 0,
                 cuda_graphs: bool = True) -> None:
        self.model, self.cache = model, cache
        self.device = cache.k.device
        self.generator = torch.Generator().manual_seed(seed)
        # pure-decode iterations replay a captured graph on the GPU (flover.engine.cuda_graph)
        use_graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs = DecodeGraphs(model, cache) if use_graphs else None
        if self.graphs is not None:
            self.graphs.capture_all()

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, AttentionMetadata, list[int]]:
        """input ids, attention metadata, and the flat index of each row to sample."""
        pad_pos = self.cache.max_seq_len - 1
        ids, slots, pos, lengths, logit_rows = [], [], [], [], []
        for i, r in enumerate(batch.decode):
            if r is None:
                ids.append(0), slots.append(i), pos.append(pad_pos), lengths.append(1)
            else:
                ids.append(r.last_token), slots.append(i), pos.append(r.num_computed)
                lengths.append(r.num_computed + 1)
                logit_rows.append(i)
        chunks = []
        for r, start, n in batch.prefill:
            chunks.append(PrefillChunk(r.slot, start, n, len(ids)))
            ids.extend(r.prompt_ids[start:start + n])
            slots.extend([r.slot] * n)
            pos.extend(range(start, start + n))
            if start + n == len(r.prompt_ids):
                logit_rows += [len(ids) - 1] * (1 + len(r.forks))
        dev = self.device
        meta = AttentionMetadata(
            slot_ids=torch.tensor(slots, device=dev), positions=torch.tensor(pos, device=dev),
            num_decode=len(batch.decode),
            decode_lengths=torch.tensor(lengths, device=dev) if lengths else None,
            decode_max_len=max(lengths, default=0), prefills=chunks)
        return torch.tensor(ids, device=dev), meta, logit_rows

    @torch.inference_mode()
    def forward_logits(self, batch: Batch) -> torch.Tensor:
        """Logits [len(batch.sample), vocab] in float32."""
        if self.graphs is not None and batch.decode and not batch.prefill:
            return self.graphs.forward_logits(batch.decode)
        ids, meta, rows = self.prepare(batch)
        hidden = self.model(ids, meta, self.cache.k, self.cache.v)
        return self.model.logits(hidden[torch.tensor(rows, device=self.device)])

    @torch.inference_mode()
    def run(self, batch: Batch, eos_ids: list[int]) -> tuple[list[int], dict[Group, list[int]]]:
        """One iteration: forward, penalties, then every row's next token.

        Returns the tokens (aligned with batch.sample) and, for each beam search in the
        batch, the beam each new beam continues. One device-to-host copy of the tokens.
        """
        logits = self.forward_logits(batch)
        if not batch.sample:
            return [], {}
        reqs = batch.sample
        logits = apply_penalties(logits, reqs, eos_ids)
        tokens = sample(logits, reqs, self.generator)
        parents: dict[Group, list[int]] = {}
        beam_rows: dict[Group, list[int]] = {}
        for i, r in enumerate(reqs):
            if r.is_beam:
                beam_rows.setdefault(r.group, []).append(i)
        for group, idx in beam_rows.items():
            order = sorted(idx, key=lambda i: reqs[i].index)  # rows in beam order
            logprobs = torch.log_softmax(logits[torch.tensor(order, device=logits.device)], -1)
            toks, parents[group] = group.beam.step(logprobs)
            tokens[torch.tensor(order, device=tokens.device)] = torch.tensor(toks, device=tokens.device)
        if any(r.params.logprobs is not None for r in reqs):
            for r, lp in zip(reqs, compute_logprobs(logits, tokens, [r.params.logprobs for r in reqs]),
                             strict=True):
                if lp is not None:
                    r.logprobs.append(lp)
        return tokens.tolist(), parents

"""Penalties, biases and log-probabilities: per-row changes to a fused batch's logits.

Every function works on all rows of a logits tensor [N, V] at once, each row with its own
parameters; a row whose parameters are neutral comes out bit-identical. The per-request part
(reading a row's parameters into a `RowPenalty`) is a function of its own, so that a failure
there fails that request alone before any batched work starts.

Token histories are counted incrementally in `TokenCounts`, one row per KV slot on the
logits' device: a row's prompt once when it is first sampled, then each output token as it
is fed back. Per-step work does not grow with the output's length.

`apply_penalties` applies, in this order (vLLM's): logit_bias, the min_tokens ban,
repetition_penalty (prompt + generated tokens), then frequency and presence penalties
(generated tokens only). It returns its input untouched when no row uses any of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flover.engine.kv_cache import CacheOp, Move, Reorder
from flover.engine.sequence import Request
from flover.ops.transfer import to_device


@dataclass(slots=True)
class RowPenalty:
    """One row's non-neutral penalty parameters, read on the host."""

    bias: dict[int, float]
    banned: list[int]
    repetition: float
    presence: float
    frequency: float

    @property
    def counts(self) -> bool:
        """Whether this row reads the token counts."""
        return self.repetition != 1.0 or self.presence != 0.0 or self.frequency != 0.0


def uses_counts(req: Request) -> bool:
    p = req.params
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def row_logit_bias(req: Request) -> dict[int, float]:
    return req.params.logit_bias


def min_tokens_banned(req: Request, eos_ids: list[int]) -> list[int]:
    """Token ids a request may not sample yet: its stop ids, and EOS unless it ignores EOS,
    while fewer than min_tokens have been generated (as MinNewTokensLengthLogitsProcessor)."""
    p = req.params
    if req.num_generated >= p.min_tokens:  # (async scheduling: the launched ones count)
        return []
    return list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))


def row_penalty(req: Request, eos_ids: list[int]) -> RowPenalty | None:
    """The per-request stage: this row's parameters, or None when it is neutral this step."""
    p = req.params
    bias = row_logit_bias(req)
    banned = min_tokens_banned(req, eos_ids)
    out = bool(req.output_ids)  # presence and frequency read generated tokens only
    spec = RowPenalty(bias, banned, p.repetition_penalty, p.presence_penalty if out else 0.0,
                      p.frequency_penalty if out else 0.0)
    return spec if bias or banned or spec.counts else None


class TokenCounts:
    """Per-slot token histories on the device: which tokens the prompt holds ([S, V] bool) and
    how often each was generated ([S, V] float32). Allocated when a row first needs them."""

    def __init__(self, num_slots: int, vocab: int, device: torch.device | str) -> None:
        self.num_slots, self.vocab, self.device = num_slots, vocab, torch.device(device)
        self.prompt: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    @classmethod
    def of(cls, reqs: list[Request], vocab: int, device: torch.device | str) -> TokenCounts:
        """Counts from whole histories, row i for reqs[i]: the reference of the incremental path."""
        counts = cls(len(reqs), vocab, device)
        for i, r in enumerate(reqs):
            counts.start(i, r.prompt_ids)
            counts.add([i] * len(r.output_ids), r.output_ids)
        return counts

    def start(self, slot: int, prompt_ids: list[int]) -> None:
        """A row's history is its prompt: set once, when the row is first sampled."""
        if self.prompt is None:
            self.prompt = torch.zeros(self.num_slots, self.vocab, dtype=torch.bool, device=self.device)
            self.output = torch.zeros(self.num_slots, self.vocab, device=self.device)
        self.prompt[slot] = False
        self.prompt[slot, _ids(prompt_ids, self.vocab, self.device)] = True
        self.output[slot] = 0.0

    def add(self, slots: list[int], tokens: list[int]) -> None:
        """Count one more occurrence of tokens[i] in slots[i] (ids outside the vocabulary are not)."""
        if self.output is None or not slots:
            return
        keep = [(s, t) for s, t in zip(slots, tokens, strict=True) if 0 <= t < self.vocab]
        if keep:
            s, t = to_device(keep, self.device).unbind(-1)
            self.output.index_put_((s, t), torch.ones(len(keep), device=self.device), accumulate=True)

    def apply(self, op: CacheOp) -> None:
        """Histories follow their rows when the shuffle moves them and beams reorder; a fork
        (CopyPrefix) starts its own history when it is first sampled; KV block copies move none."""
        if self.prompt is None or not isinstance(op, Reorder | Move):
            return  # a fork, or a copy of KV blocks: no history moves
        if isinstance(op, Reorder):
            src, dst = list(op.src), list(op.dst)
        else:
            src, dst = op.src, op.dst
        self.prompt[dst] = self.prompt[src]
        self.output[dst] = self.output[src]

    def rows(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = to_device(slots, self.device)
        return self.prompt[idx], self.output[idx]


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Seen tokens: positive logits divided by the row's penalty, negative ones multiplied.

    seen [N, V] bool (prompt or output, each token once), penalty [N] (1 = off).
    As transformers' RepetitionPenaltyLogitsProcessor.
    """
    p = penalty.to(logits.dtype)[:, None]
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


def presence_frequency_penalty(logits: torch.Tensor, output_counts: torch.Tensor,
                               presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties over generated tokens: logit -= presence * (count > 0) + frequency * count.

    output_counts [N, V], presence [N], frequency [N] (0 = off).
    """
    c = output_counts.to(logits.dtype)
    pen = presence.to(logits.dtype)[:, None] * (c > 0) + frequency.to(logits.dtype)[:, None] * c
    return logits - pen


def logit_bias(logits: torch.Tensor, biases: list[dict[int, float]]) -> torch.Tensor:
    """Adds each row's {token id: bias}; ids outside [0, V) are ignored."""
    rows, cols, vals = _sparse(biases, logits.shape[-1])
    out = logits.clone()
    if rows:
        dev = logits.device
        out.index_put_((to_device(rows, dev), to_device(cols, dev)),
                       to_device(vals, dev, logits.dtype), accumulate=True)
    return out


def ban_tokens(logits: torch.Tensor, banned: list[list[int]]) -> torch.Tensor:
    """Sets each row's listed token ids to -inf; ids outside [0, V) are ignored."""
    rows, cols, _ = _sparse([dict.fromkeys(b, 0.0) for b in banned], logits.shape[-1])
    out = logits.clone()
    if rows:
        dev = logits.device
        # the value as a device tensor: a Python float would be copied from the host, a wait
        out.index_put_((to_device(rows, dev), to_device(cols, dev)),
                       torch.full((), float("-inf"), dtype=out.dtype, device=dev))
    return out


def apply_penalties(logits: torch.Tensor, reqs: list[Request], eos_ids: list[int],
                    counts: TokenCounts | None = None, slots: list[int] | None = None,
                    specs: list[RowPenalty | None] | None = None) -> torch.Tensor:
    """logits [N, V] (row i belongs to reqs[i], whose history is row slots[i] of `counts`)
    -> penalised logits [N, V].

    Without `counts`, histories are counted from the requests' token lists (the reference).
    `specs` are the rows' `row_penalty`, when the caller has read them already. Returns
    `logits` itself, untouched, when no row uses a penalty, a bias or a pending min_tokens;
    otherwise a new tensor in which only the rows that use them differ. Values stay finite or
    -inf, so that sampling never sees NaN.
    """
    if specs is None:
        specs = [row_penalty(r, eos_ids) for r in reqs]
    active = [i for i, s in enumerate(specs) if s is not None]
    if not active:
        return logits
    dev = logits.device
    sub = [specs[i] for i in active]
    idx = to_device(active, dev)
    x = logits[idx]
    if any(s.bias for s in sub):
        x = logit_bias(x, [s.bias for s in sub])
    if any(s.banned for s in sub):
        x = ban_tokens(x, [s.banned for s in sub])
    if any(s.counts for s in sub):
        if counts is None:
            counts, slots = TokenCounts.of(reqs, logits.shape[-1], dev), list(range(len(reqs)))
        prompt, output = counts.rows([slots[i] for i in active])
        if any(s.repetition != 1.0 for s in sub):
            penalty = to_device([s.repetition for s in sub], dev)
            x = repetition_penalty(x, prompt | (output > 0), penalty)
        if any(s.presence != 0.0 or s.frequency != 0.0 for s in sub):
            presence = to_device([s.presence for s in sub], dev)
            frequency = to_device([s.frequency for s in sub], dev)
            x = presence_frequency_penalty(x, output, presence, frequency)
    x = torch.nan_to_num(x, nan=-math.inf, posinf=torch.finfo(x.dtype).max, neginf=-math.inf)
    if len(active) == len(reqs):
        return x  # logits[idx] with idx = 0..N-1 is already a fresh copy in row order
    out = logits.clone()
    out[idx] = x
    return out


def compute_logprobs(logits: torch.Tensor, chosen: torch.Tensor,
                     k_per_row: list[int | None]) -> list[dict | None]:
    """Log-probabilities of the chosen tokens and each row's top-k alternatives.

    Convention: log_softmax of the model's logits after apply_penalties (penalties, bias and
    the min_tokens ban), before temperature, top-k, top-p and min-p; so a token's logprob does
    not depend on the sampling temperature, and greedy and sampled rows read alike.

    logits [N, V], chosen [N] token ids, k_per_row[i] None (no logprobs for that row) or k >= 0.
    Returns per row None or {"token_id": int, "logprob": float, "top_logprobs": [(id, logprob),
    ...]} with the k most likely tokens, best first.
    """
    host, k = logprob_rows(logits, chosen, k_per_row)
    return [None if ki is None else logprob_entry(row, k, ki)
            for row, ki in zip(host, k_per_row, strict=True)]


def logprob_rows(logits: torch.Tensor, chosen: torch.Tensor,
                 k_per_row: list[int | None]) -> tuple[list[list[float] | None], int]:
    """The batched part of compute_logprobs, in one device-to-host copy: per row None or
    [token, logprob, k ids, k logprobs] with k the largest k asked for (returned too)."""
    table, rows, k = logprob_table(logits, chosen, k_per_row)
    return spread_rows([] if table is None else table.tolist(), rows, len(k_per_row)), k


def logprob_table(logits: torch.Tensor, chosen: torch.Tensor, k_per_row: list[int | None]
                  ) -> tuple[torch.Tensor | None, list[int], int]:
    """`logprob_rows`' device part, which reads nothing back (async scheduling copies it with
    the tokens): [rows asking, 2 + 2k] float32 (None if none asks), those rows, k."""
    rows = [i for i, k in enumerate(k_per_row) if k is not None]
    if not rows:
        return None, rows, 0
    dev = logits.device
    idx = to_device(rows, dev)
    lp = torch.log_softmax(logits[idx].float(), dim=-1)
    tok = chosen.to(dev)[idx]
    picked = lp.gather(-1, tok[:, None]).squeeze(-1)
    k = max(k_per_row[i] for i in rows)
    top_lp, top_id = lp.topk(k, dim=-1)
    # Ids ride along as float32 (exact below 2**24) so that everything comes back in one copy.
    return torch.cat([tok[:, None].float(), picked[:, None], top_id.float(), top_lp], dim=-1), rows, k


def spread_rows(host: list[list[float]], rows: list[int], n: int) -> list[list[float] | None]:
    """The table's host rows back in place among n rows (None where none was asked)."""
    out: list[list[float] | None] = [None] * n
    for row, i in zip(host, rows, strict=True):
        out[i] = row
    return out


def logprob_entry(row: list[float], k: int, ki: int) -> dict:
    """The per-request stage: one row's logprobs (its k_i best) from its host copy."""
    ids, lps = row[2:2 + k], row[2 + k:]
    return {"token_id": int(row[0]), "logprob": row[1],
            "top_logprobs": [(int(t), v) for t, v in zip(ids[:ki], lps[:ki], strict=True)]}


def _ids(values: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    return to_device([t for t in values if 0 <= t < vocab], device, torch.long)


def _sparse(per_row: list[dict[int, float]], vocab: int) -> tuple[list[int], list[int], list[float]]:
    """Flattens per-row {token id: value} into (rows, cols, values), dropping ids outside [0, vocab)."""
    rows, cols, vals = [], [], []
    for i, d in enumerate(per_row):
        for t, v in d.items():
            if 0 <= t < vocab:
                rows.append(i)
                cols.append(t)
                vals.append(v)
    return rows, cols, vals

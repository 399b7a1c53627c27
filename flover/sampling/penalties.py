"""Penalties, biases and log-probabilities: per-row changes to a fused batch's logits.

Every function works on all rows of a logits tensor [N, V] at once, each row with its own
parameters; a row whose parameters are neutral comes out bit-identical. Token histories live
on the host as python lists and are counted on the logits' device with one scatter per call.

`apply_penalties` applies, in this order (vLLM's): logit_bias, the min_tokens ban,
repetition_penalty (prompt + generated tokens), then frequency and presence penalties
(generated tokens only). It returns its input untouched when no row uses any of them.
"""

from __future__ import annotations

from array import array

import torch

from flover.engine.sequence import Request


def count_tokens(prompts: list[list[int]], outputs: list[list[int]], vocab: int,
                 device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """How often each token occurs in each row's prompt and output: two float32 [N, vocab].

    One zeros and one scatter_add_ of a flat index; ids outside [0, vocab) are not counted.
    """
    n = len(prompts)
    width = vocab + 1  # the last column collects out-of-range ids and is dropped
    lengths, flat = [], []
    for p, o in zip(prompts, outputs, strict=True):
        lengths += [len(p), len(o)]
        flat += p
        flat += o
    tok = _long_tensor(flat, device)
    tok = torch.where((tok >= 0) & (tok < vocab), tok, vocab)
    plane = torch.arange(2 * n, device=device) * width  # (row, prompt|output) -> base offset
    index = tok + plane.repeat_interleave(torch.tensor(lengths, device=device), output_size=len(flat))
    counts = torch.zeros(2 * n * width, dtype=torch.float32, device=device)
    counts.scatter_add_(0, index, torch.ones_like(index, dtype=torch.float32))
    counts = counts.view(n, 2, width)[:, :, :vocab]
    return counts[:, 0], counts[:, 1]


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
        out.index_put_((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                       torch.tensor(vals, dtype=logits.dtype, device=dev), accumulate=True)
    return out


def ban_tokens(logits: torch.Tensor, banned: list[list[int]]) -> torch.Tensor:
    """Sets each row's listed token ids to -inf; ids outside [0, V) are ignored."""
    rows, cols, _ = _sparse([dict.fromkeys(b, 0.0) for b in banned], logits.shape[-1])
    out = logits.clone()
    if rows:
        dev = logits.device
        out[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = float("-inf")
    return out


def min_tokens_banned(req: Request, eos_ids: list[int]) -> list[int]:
    """Token ids a request may not sample yet: its stop ids, and EOS unless it ignores EOS,
    while fewer than min_tokens have been generated (as MinNewTokensLengthLogitsProcessor)."""
    p = req.params
    if len(req.output_ids) >= p.min_tokens:
        return []
    return list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))


def uses_penalties(req: Request, eos_ids: list[int]) -> bool:
    """Whether apply_penalties would change this request's row."""
    p = req.params
    return (p.repetition_penalty != 1.0 or bool(p.logit_bias)
            or ((p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and bool(req.output_ids))
            or bool(min_tokens_banned(req, eos_ids)))


def apply_penalties(logits: torch.Tensor, reqs: list[Request], eos_ids: list[int]) -> torch.Tensor:
    """logits [N, V] (row i belongs to reqs[i]) -> penalised logits [N, V].

    Returns `logits` itself, untouched and without allocating, when no row uses a penalty,
    a bias or a pending min_tokens; otherwise a new tensor (the input is never modified) in
    which only the rows that use them differ.
    """
    active = [i for i, r in enumerate(reqs) if uses_penalties(r, eos_ids)]
    if not active:
        return logits
    dev, vocab = logits.device, logits.shape[-1]
    sub = [reqs[i] for i in active]
    idx = torch.tensor(active, device=dev)
    x = logits[idx]
    if any(r.params.logit_bias for r in sub):
        x = logit_bias(x, [r.params.logit_bias for r in sub])
    banned = [min_tokens_banned(r, eos_ids) for r in sub]
    if any(banned):
        x = ban_tokens(x, banned)
    rep = [r.params.repetition_penalty != 1.0 for r in sub]
    pf = [(r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0) and bool(r.output_ids)
          for r in sub]
    if any(rep) or any(pf):
        # The prompt is counted only where the repetition penalty reads it; the output wherever used.
        prompt_counts, output_counts = count_tokens(
            [r.prompt_ids if u else [] for r, u in zip(sub, rep, strict=True)],
            [r.output_ids if u or v else [] for r, u, v in zip(sub, rep, pf, strict=True)], vocab, dev)
        if any(rep):
            penalty = torch.tensor([r.params.repetition_penalty for r in sub], device=dev)
            x = repetition_penalty(x, (prompt_counts + output_counts) > 0, penalty)
        if any(pf):
            presence = torch.tensor([r.params.presence_penalty for r in sub], device=dev)
            frequency = torch.tensor([r.params.frequency_penalty for r in sub], device=dev)
            x = presence_frequency_penalty(x, output_counts, presence, frequency)
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
    ...]} with the k most likely tokens, best first. One device-to-host copy.
    """
    rows = [i for i, k in enumerate(k_per_row) if k is not None]
    out: list[dict | None] = [None] * len(k_per_row)
    if not rows:
        return out
    dev = logits.device
    idx = torch.tensor(rows, device=dev)
    lp = torch.log_softmax(logits[idx].float(), dim=-1)
    tok = chosen.to(dev)[idx]
    picked = lp.gather(-1, tok[:, None]).squeeze(-1)
    k = max(k_per_row[i] for i in rows)
    top_lp, top_id = lp.topk(k, dim=-1)
    # Ids ride along as float32 (exact below 2**24) so that everything comes back in one copy.
    host = torch.cat([tok[:, None].float(), picked[:, None], top_id.float(), top_lp], dim=-1).tolist()
    for row, i in zip(host, rows, strict=True):
        ki = k_per_row[i]
        ids, lps = row[2:2 + k], row[2 + k:]
        out[i] = {"token_id": int(row[0]), "logprob": row[1],
                  "top_logprobs": [(int(t), v) for t, v in zip(ids[:ki], lps[:ki], strict=True)]}
    return out


def _long_tensor(values: list[int], device: torch.device | str) -> torch.Tensor:
    """A python list of ints as an int64 tensor; via array, about 4x faster than torch.tensor."""
    if not values:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.frombuffer(array("q", values), dtype=torch.long).to(device)


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

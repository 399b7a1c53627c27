"""Batched sampling: every row of a fused batch with its own parameters, in one pass.

Greedy rows take the argmax. Sampled rows are scaled by their temperature, cut by their
top-k / top-p / min-p, and drawn by inverse CDF from one uniform number per row. That
number comes from the request's own generator when it has a seed, so a seeded request draws
the same tokens alone or fused with any neighbours.
"""

from __future__ import annotations

import torch

from flover.engine.sequence import Request


def uniforms(reqs: list[Request], shared: torch.Generator) -> list[float]:
    """One uniform draw per row, from the request's own generator when it is seeded."""
    out = []
    for r in reqs:
        if r.generator is None and r.params.seed is not None:
            r.generator = torch.Generator().manual_seed(r.params.seed)
        g = r.generator if r.generator is not None else shared
        out.append(torch.rand((), generator=g).item())
    return out


def filter_sorted(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Probabilities over descending-sorted logits after top-k, top-p and min-p cuts.

    top_k [N] (0 = off), top_p [N] (1 = off), min_p [N] (0 = off). The best token always stays.
    """
    probs = sorted_logits.softmax(-1)
    rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    keep = (top_k[:, None] == 0) | (rank < top_k[:, None])
    keep &= (probs.cumsum(-1) - probs) < top_p[:, None]
    keep &= probs >= min_p[:, None] * probs[:, :1]
    keep[:, 0] = True
    return probs * keep


def sample(logits: torch.Tensor, reqs: list[Request], shared: torch.Generator) -> torch.Tensor:
    """logits [N, V] float32 -> token ids [N] (on the logits' device)."""
    greedy_tok = logits.argmax(-1)
    rows = [i for i, r in enumerate(reqs) if not r.params.greedy and not r.is_beam]
    if not rows:
        return greedy_tok
    dev = logits.device
    sub = [reqs[i] for i in rows]
    temp = torch.tensor([r.params.temperature for r in sub], device=dev)
    top_k = torch.tensor([r.params.top_k for r in sub], device=dev)
    top_p = torch.tensor([r.params.top_p for r in sub], device=dev)
    min_p = torch.tensor([r.params.min_p for r in sub], device=dev)
    u = torch.tensor(uniforms(sub, shared), device=dev)
    idx = torch.tensor(rows, device=dev)
    sorted_logits, order = (logits[idx] / temp[:, None]).sort(dim=-1, descending=True)
    cdf = filter_sorted(sorted_logits, top_k, top_p, min_p).cumsum(-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    pick = pick.clamp_(max=cdf.shape[-1] - 1)
    tokens = greedy_tok.clone()
    tokens[idx] = order.gather(-1, pick).squeeze(-1)
    return tokens

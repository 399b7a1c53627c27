"""Batched sampling: every row of a fused batch with its own parameters, in one pass.

Greedy rows (a temperature below SAMPLING_EPS, or top_k=1) take the argmax. Sampled rows are
scaled by their temperature, cut by their top-k, then top-p, then min-p, each cut seeing the
renormalised distribution the previous ones left (transformers' TopK, TopP and MinP logits
warpers in that order, with the same comparisons), and drawn by inverse CDF from one uniform
number per row (a row without a cut draws in vocabulary order: no sort). That number comes
from the request's own generator when it has a seed, so a seeded request draws the same
tokens alone or fused with any neighbours.

`row_sampling` is the per-request stage (a row's numbers and its draw, on the host), where a
failure belongs to that request alone; `sample_rows` is the batched tensor work over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flover.engine.sequence import Request
from flover.ops.transfer import to_device


def kept_sorted(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                min_p: torch.Tensor, order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which descending-sorted logits survive top-k, then top-p, then min-p: (keep [N, V] bool,
    probabilities [N, V] that min-p saw, i.e. renormalised after top-k and top-p).

    Each cut is the transformers warper's own arithmetic on the same values, so kept sets match
    at thresholds too. Top-k keeps every logit >= the k-th largest (ties included). Top-p
    softmaxes and sums in ascending order, as TopPLogitsWarper's sort does, and drops cumulative
    <= 1 - top_p with 1 - top_p taken in float64 then rounded, as a python float is; pass top_p
    as float64 for bit-identical thresholds. Min-p drops p < min_p * max p, p being the
    softmax in vocabulary order when `order` (the sort's indices, [N, V]) is given, as
    MinPLogitsWarper sums; without it, in sorted order, which can move a min_p lying within
    one float32 ulp of a token's probability ratio (about 2% of such knife-edge cases). The
    best token always stays. Pure tensor code without host syncs; rows whose cut is off pass
    through it unchanged.
    """
    vocab = sorted_logits.shape[-1]
    neg = torch.full((), float("-inf"), dtype=sorted_logits.dtype, device=sorted_logits.device)
    # top-k: TopKLogitsWarper removes scores < the k-th largest; k beyond the vocabulary keeps all
    k = top_k.to(torch.long).clamp(min=0, max=vocab)
    kth = sorted_logits.gather(-1, (k - 1).clamp(min=0)[:, None])
    keep = (k[:, None] == 0) | ~(sorted_logits < kth)
    # top-p: TopPLogitsWarper on the top-k output, ascending, so the same float sums
    ascending = torch.where(keep, sorted_logits, neg).flip(-1)
    cum = ascending.softmax(-1).cumsum(-1)
    cut = (1.0 - top_p.to(torch.float64)).to(cum.dtype)
    drop = (cum <= cut[:, None]) & (top_p < 1.0)[:, None]  # generate() skips top_p >= 1
    drop[:, -1] = False  # min_tokens_to_keep=1: the largest logit
    keep &= ~drop.flip(-1)
    # min-p: MinPLogitsWarper on the top-p output; min_p rounded to the probabilities' dtype
    masked = torch.where(keep, sorted_logits, neg)
    if order is None:
        probs = masked.softmax(-1)
    else:  # the normaliser summed in vocabulary order, as transformers sums it
        probs = torch.empty_like(masked).scatter_(-1, order, masked).softmax(-1).gather(-1, order)
    floor = min_p.to(probs.dtype)[:, None] * probs.amax(-1, keepdim=True)
    drop = probs < floor
    drop[:, 0] = False  # topk(probs, 1): the largest logit
    keep &= ~drop
    return keep, probs


def filter_sorted(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """Unnormalised probabilities over descending-sorted logits after top-k, top-p and min-p.

    top_k [N] (0 = off, > V keeps all), top_p [N] (1 = off; float64 for exact thresholds),
    min_p [N] (0 = off); order [N, V], optional: the sort's indices, for min-p cuts equal to
    transformers' to the last bit. Removed tokens are 0; the best token always stays. See
    `kept_sorted` for the exact semantics.
    """
    keep, probs = kept_sorted(sorted_logits, top_k, top_p, min_p, order)
    return torch.where(keep, probs, torch.zeros((), dtype=probs.dtype, device=probs.device))


@dataclass(slots=True)
class RowSampling:
    """One row's sampling numbers for this step, read on the host."""

    greedy: bool
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    u: float = 0.0  # this step's uniform draw


GREEDY = RowSampling(True)


def row_sampling(req: Request, vocab: int, shared: torch.Generator) -> RowSampling:
    """The per-request stage: the row's parameters and its uniform draw, from its own
    generator when it is seeded. Beam rows are chosen by their BeamSearch, greedy rows by argmax."""
    p = req.params
    if p.greedy or req.beam is not None:
        return GREEDY
    g = req.generator if req.generator is not None else shared
    # top_k may be any int >= 0 (2**63 means all): clamped here so int64 cannot overflow
    return RowSampling(False, p.temperature, min(p.top_k, vocab), p.top_p, p.min_p,
                       torch.rand((), generator=g).item())


def sample_rows(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """logits [N, V] float32 -> token ids [N] (on the logits' device); row i drawn per rows[i].

    A row without top-k, top-p or min-p draws by inverse CDF over its distribution in
    vocabulary order: no sort (on the CPU the sort of 32 x 49,152 logits costs ~100 ms). A
    row with a cut sorts, cuts and draws over the kept tokens in descending order.
    """
    tokens = logits.argmax(-1)
    vocab = logits.shape[-1]
    plain = [i for i, r in enumerate(rows) if not r.greedy and _uncut(r, vocab)]
    cut = [i for i, r in enumerate(rows) if not r.greedy and not _uncut(r, vocab)]
    if plain:
        scaled, u, idx = _scaled(logits, [rows[i] for i in plain], plain)
        cdf = scaled.softmax(-1).cumsum(-1)
        tokens[idx] = _draw(cdf, u)
    if cut:
        sub = [rows[i] for i in cut]
        scaled, u, idx = _scaled(logits, sub, cut)
        dev = logits.device
        top_k = to_device([r.top_k for r in sub], dev, torch.long)
        top_p = to_device([r.top_p for r in sub], dev, torch.float64)
        min_p = to_device([r.min_p for r in sub], dev)
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        exact_min_p = order if any(r.min_p > 0 for r in sub) else None  # a scatter and a gather
        cdf = filter_sorted(sorted_logits, top_k, top_p, min_p, exact_min_p).cumsum(-1)
        tokens[idx] = order.gather(-1, _draw(cdf, u)[:, None]).squeeze(-1)
    return tokens


def _uncut(r: RowSampling, vocab: int) -> bool:
    return (r.top_k == 0 or r.top_k >= vocab) and r.top_p >= 1.0 and r.min_p == 0.0


def _scaled(logits: torch.Tensor, sub: list[RowSampling], idx_rows: list[int]):
    """The rows' logits over their temperatures (never +inf), their draws, their indices."""
    dev = logits.device
    temp = to_device([r.temperature for r in sub], dev)
    idx = to_device(idx_rows, dev)
    scaled = (logits[idx] / temp[:, None]).clamp_(max=torch.finfo(logits.dtype).max)
    return scaled, to_device([r.u for r in sub], dev), idx


def _draw(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: the first index whose cumulative mass passes u of the total."""
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return pick.clamp_(max=cdf.shape[-1] - 1)


def sample(logits: torch.Tensor, reqs: list[Request], shared: torch.Generator) -> torch.Tensor:
    """logits [N, V] float32 -> token ids [N]: each row's `row_sampling`, then `sample_rows`."""
    return sample_rows(logits, [row_sampling(r, logits.shape[-1], shared) for r in reqs])

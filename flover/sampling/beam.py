"""Beam search for one request whose k beams are k rows of the fused batch.

The selection follows transformers' beam search (the default `early_stopping=False`): from
the k beams' accumulated log-probabilities take the best 2k continuations; those that end
(EOS, or the length limit) and rank among the first k become finished hypotheses scored
`sum_logprobs / generated_len ** len_penalty`; the best k that go on become the next beams.
Search ends when no running beam can beat the worst of k finished hypotheses, or when
every continuation ends. `diversity_rate` follows FasterTransformer: each beam's candidates
lose `rank * rate`, rank being their order within that beam, before the beams compete.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NEG = -1.0e9


@dataclass(slots=True)
class Hypothesis:
    score: float
    tokens: list[int]


@dataclass(slots=True)
class BeamSearch:
    width: int
    max_tokens: int
    eos_ids: list[int]
    len_penalty: float = 0.0
    diversity_rate: float = 0.0
    scores: list[float] = field(default_factory=list)  # running beams' sums of log-probs
    tokens: list[list[int]] = field(default_factory=list)  # running beams' generated tokens
    finished: list[Hypothesis] = field(default_factory=list)
    improvable: bool = True
    done: bool = False

    def __post_init__(self) -> None:
        # before the first token every beam is the prompt; only beam 0 may expand
        self.scores = [0.0] + [NEG] * (self.width - 1)
        self.tokens = [[] for _ in range(self.width)]

    def step(self, logprobs: torch.Tensor) -> tuple[list[int], list[int]]:
        """logprobs [k, V] of the k beams -> (next token, parent beam) for each new beam."""
        k, vocab = logprobs.shape
        assert k == self.width
        acc = logprobs.float() + torch.tensor(self.scores, device=logprobs.device)[:, None]
        if self.diversity_rate > 0:
            ranks = logprobs.argsort(dim=-1, descending=True).argsort(dim=-1)
            acc = acc - self.diversity_rate * ranks.to(acc.dtype)
        keep = max(2, 1 + len(self.eos_ids)) * k
        top_scores, top_idx = acc.flatten().topk(keep)
        top_scores, top_idx = top_scores.tolist(), top_idx.tolist()
        parents = [i // vocab for i in top_idx]
        toks = [i % vocab for i in top_idx]
        gen_len = len(self.tokens[0]) + 1
        ends = [t in self.eos_ids or gen_len >= self.max_tokens for t in toks]

        if self.improvable:
            norm = gen_len ** self.len_penalty
            for rank in range(k):
                if ends[rank]:
                    seq = self.tokens[parents[rank]] + [toks[rank]]
                    self.finished.append(Hypothesis(top_scores[rank] / norm, seq))
            self.finished.sort(key=lambda h: -h.score)
            del self.finished[k:]

        going = sorted(range(keep), key=lambda i: -(top_scores[i] + (NEG if ends[i] else 0.0)))[:k]
        new_tokens = [toks[i] for i in going]
        new_parents = [parents[i] for i in going]
        self.scores = [top_scores[i] + (NEG if ends[i] else 0.0) for i in going]
        self.tokens = [self.tokens[p] + [t] for p, t in zip(new_parents, new_tokens, strict=True)]

        if len(self.finished) == k:  # while a hypothesis slot is empty, search can improve
            best_running = self.scores[0] / (gen_len ** self.len_penalty)
            self.improvable = self.improvable and best_running > self.finished[-1].score
        self.done = not self.improvable or all(ends)
        return new_tokens, new_parents

    def best(self) -> list[Hypothesis]:
        """The k best finished hypotheses, best first."""
        return list(self.finished)

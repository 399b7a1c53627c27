"""Beam search for one request whose k beams are k rows of the fused batch.

The selection follows transformers' beam search (the default `early_stopping=False`): from
the k beams' accumulated log-probabilities take the best 2k continuations; those that end
(EOS or a stop token, or the length limit) and rank among the first k become finished
hypotheses scored `sum_logprobs / generated_len ** len_penalty`; the best k that go on become
the next beams. A running beam can also be ended from outside (`end`, when its text reaches a
stop string): it becomes a hypothesis and stops competing. Search ends when no running beam
can beat the worst of k finished hypotheses, or when every beam has ended. The rows of the
request stay in the batch until then, and end together.

`diversity_rate` follows FasterTransformer: each beam's candidates lose `rank * rate`, rank
being their order within that beam, before the beams compete.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flover.ops.transfer import to_device

NEG = -1.0e9  # the score of a beam that cannot continue


@dataclass(slots=True)
class Hypothesis:
    score: float
    tokens: list[int]
    reason: str  # "stop" (EOS, stop token or stop string) or "length"


@dataclass(slots=True)
class BeamSearch:
    width: int
    max_tokens: int
    eos_ids: list[int]  # EOS (unless ignored) and the request's stop tokens
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
        if k != self.width:
            raise ValueError(f"beam search of width {self.width} got {k} rows")
        acc = logprobs.float() + to_device(self.scores, logprobs.device)[:, None]
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
            for rank in range(k):
                if ends[rank] and top_scores[rank] > NEG / 2:
                    reason = "stop" if toks[rank] in self.eos_ids else "length"
                    self._add(Hypothesis(top_scores[rank] / gen_len ** self.len_penalty,
                                         self.tokens[parents[rank]] + [toks[rank]], reason))

        going = sorted(range(keep), key=lambda i: -(top_scores[i] + (NEG if ends[i] else 0.0)))[:k]
        new_tokens = [toks[i] for i in going]
        new_parents = [parents[i] for i in going]
        self.scores = [top_scores[i] + (NEG if ends[i] else 0.0) for i in going]
        self.tokens = [self.tokens[p] + [t] for p, t in zip(new_parents, new_tokens, strict=True)]
        self._update(all(ends))
        return new_tokens, new_parents

    def end(self, beam: int) -> None:
        """Running beam `beam` ends here (its text reached a stop string): a hypothesis now."""
        if self.scores[beam] <= NEG / 2:
            return  # not a live beam
        if self.improvable:
            n = max(1, len(self.tokens[beam]))
            self._add(Hypothesis(self.scores[beam] / n ** self.len_penalty,
                                 list(self.tokens[beam]), "stop"))
        self.scores[beam] = NEG
        self._update(False)

    def _add(self, h: Hypothesis) -> None:
        self.finished.append(h)
        self.finished.sort(key=lambda x: -x.score)
        del self.finished[self.width:]

    def _update(self, every_continuation_ended: bool) -> None:
        live = [s for s in self.scores if s > NEG / 2]
        if live and len(self.finished) == self.width:  # while a slot is empty, search can improve
            gen_len = len(self.tokens[0])
            self.improvable = self.improvable and \
                max(live) / gen_len ** self.len_penalty > self.finished[-1].score
        self.done = not self.improvable or every_continuation_ended or not live

    def best(self) -> list[Hypothesis]:
        """The k best finished hypotheses, best first."""
        return list(self.finished)

"""The sampler's top-k, top-p and min-p cuts, held equal to transformers' logits warpers.

The reference is transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
and MinPLogitsWarper, added as `generate()` adds them (top-k unless 0, top-p unless 1) and
applied one row at a time; a token is kept when the warpers leave its logit finite. Our
`filter_sorted` runs on the whole batch at once, each row with its own parameters, over the
descending-sorted logits; its kept set is mapped back through the sort order.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from flover.config import SamplingParams
from flover.engine.sequence import Request, new_request
from flover.sampling.sampler import filter_sorted, kept_sorted, sample

transformers = pytest.importorskip("transformers")
lp = pytest.importorskip("transformers.generation.logits_process")

N, V = 16, 50
TOP_K = [0, 1, 2, 3, 7, 20, V - 1, V, V + 5, 2**40]
TOP_P = [1.0, 0.999, 0.95, 0.9, 0.6, 0.5, 0.3, 0.1, 1e-6]
MIN_P = [0.0, 0.01, 0.05, 0.1, 0.3, 0.7, 1.0]


def reference_kept(scores: torch.Tensor, temperature: float, top_k: int, top_p: float,
                   min_p: float) -> torch.Tensor:
    """transformers' warpers on one row [V] -> bool [V]: which logits stay finite."""
    x = scores[None].clone()
    warpers = [lp.TemperatureLogitsWarper(temperature)]
    if top_k != 0:
        warpers.append(lp.TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        warpers.append(lp.TopPLogitsWarper(top_p=top_p))
    warpers.append(lp.MinPLogitsWarper(min_p=min_p))
    ids = torch.zeros((1, 1), dtype=torch.long)
    for w in warpers:
        x = w(ids, x)
    return torch.isfinite(x[0])


def ours_kept(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
              min_p: list[float], exact_min_p: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """filter_sorted's kept set and kept_sorted's mask, both in vocabulary order: bool [N, V] each.

    exact_min_p passes the sort order, so that min-p sums its softmax in vocabulary order."""
    temp = torch.tensor(temperature)
    sorted_logits, order = (logits / temp[:, None]).sort(dim=-1, descending=True)
    args = (sorted_logits, torch.tensor(top_k),  # k > V is clamped inside
            torch.tensor(top_p, dtype=torch.float64), torch.tensor(min_p), order if exact_min_p else None)
    probs = filter_sorted(*args)
    mask, _ = kept_sorted(*args)

    def unsort(m: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(m).scatter(-1, order, m)

    return unsort(probs > 0), unsort(mask)


def assert_same_as_transformers(logits, temperature, top_k, top_p, min_p, both_min_p_sums=True):
    """Kept sets equal per row; with both_min_p_sums, also without the order argument (random
    min_p values are nowhere near the one-ulp cases where that can differ)."""
    for exact in [True, False] if both_min_p_sums else [True]:
        ours, mask = ours_kept(logits, temperature, top_k, top_p, min_p, exact)
        for i in range(logits.shape[0]):
            ref = reference_kept(logits[i], temperature[i], top_k[i], top_p[i], min_p[i])
            what = (i, exact, temperature[i], top_k[i], top_p[i], min_p[i])
            assert torch.equal(mask[i], ref), what
            assert torch.equal(ours[i], ref), what


def test_top_p_sees_the_distribution_renormalised_after_top_k():
    """[0.5, 0.3, 0.2], top_k=2 -> [0.625, 0.375]; top_p=0.6 keeps the first token only."""
    sorted_logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    probs = filter_sorted(sorted_logits, torch.tensor([2]), torch.tensor([0.6], dtype=torch.float64),
                          torch.tensor([0.0]))
    assert (probs > 0).tolist() == [[True, False, False]]
    ref = reference_kept(sorted_logits[0], 1.0, 2, 0.6, 0.0)
    assert ref.tolist() == [True, False, False]
    # without top-k, top-p 0.6 needs two tokens (0.5 < 0.6)
    probs = filter_sorted(sorted_logits, torch.tensor([0]), torch.tensor([0.6], dtype=torch.float64),
                          torch.tensor([0.0]))
    assert (probs > 0).tolist() == [[True, True, False]]


def test_sample_draws_only_the_token_that_top_k_then_top_p_keep():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    params = SamplingParams(top_k=2, top_p=0.6, temperature=1.0)
    shared = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert sample(logits, [Request("r", [1], params)], shared).tolist() == [0]


def _random_params(g: torch.Generator, n: int, use_k: bool, use_p: bool, use_min_p: bool):
    """Per-row parameters: a mix of listed values (off ones included) and random ones."""
    def pick(values, on, rand):
        if not on:
            return [values[0]] * n
        return [values[int(torch.randint(len(values), (), generator=g))]
                if torch.rand((), generator=g) < 0.7 else rand() for _ in range(n)]

    temperature = [float(t) for t in torch.empty(n).uniform_(0.3, 2.0, generator=g)]
    top_k = pick(TOP_K, use_k, lambda: int(torch.randint(1, V + 10, (), generator=g)))
    top_p = pick(TOP_P, use_p, lambda: float(torch.rand((), generator=g)) * 0.999 + 0.001)
    min_p = pick(MIN_P, use_min_p, lambda: float(torch.rand((), generator=g)) * 0.5)
    return temperature, top_k, top_p, min_p


@pytest.mark.parametrize("use_k,use_p,use_min_p",
                         [c for c in itertools.product([False, True], repeat=3) if any(c)],
                         ids=lambda b: "on" if b else "off")
@pytest.mark.parametrize("seed", range(6))
def test_kept_set_equals_transformers_warpers(seed, use_k, use_p, use_min_p):
    g = torch.Generator().manual_seed(seed)
    scale = [1.0, 3.0, 8.0][seed % 3]
    logits = torch.randn(N, V, generator=g) * scale
    assert_same_as_transformers(logits, *_random_params(g, N, use_k, use_p, use_min_p))


@pytest.mark.parametrize("seed", range(4))
def test_top_p_at_its_exact_thresholds_equals_transformers(seed):
    """top_p chosen so that 1 - top_p is (within a rounding) a cumulative sum itself.

    A threshold taken in float32 instead of float64 (or summed in descending order) would
    keep a different set on some of these rows.
    """
    g = torch.Generator().manual_seed(100 + seed)
    logits = torch.randn(N, V, generator=g) * 2.0
    top_k = [[0, 5, 20][i % 3] for i in range(N)]
    top_p = []
    for i in range(N):
        x = logits[i][None]
        if top_k[i]:
            x = lp.TopKLogitsWarper(top_k[i])(None, x)
        cum = x.sort(descending=False).values.softmax(-1).cumsum(-1)[0]
        j = int(torch.randint(V - 6, V - 1, (), generator=g))
        c = float(cum[j])
        step = [0.0, 1e-9, -1e-9, 2**-25, -(2**-25)][i % 5]
        top_p.append(min(max(1.0 - c + step, 1e-9), 0.999999))
    assert_same_as_transformers(logits, [1.0] * N, top_k, top_p, [0.0] * N)


@pytest.mark.parametrize("seed", range(4))
def test_min_p_at_its_exact_thresholds_equals_transformers(seed):
    """min_p equal to (or one float32 step above) a token's probability ratio after top-k and
    top-p, as transformers computes it; with the sort order passed, the sets are identical.
    (Summed in sorted order instead, about 2% of these rows differ.)"""
    g = torch.Generator().manual_seed(200 + seed)
    n = 64
    logits = torch.randn(n, V, generator=g) * 2.0
    top_k = [[0, 9, 30][i % 3] for i in range(n)]
    top_p = [[1.0, 0.9][i % 2] for i in range(n)]
    min_p = []
    for i in range(n):
        x = logits[i][None]
        if top_k[i]:
            x = lp.TopKLogitsWarper(top_k[i])(None, x)
        if top_p[i] < 1:
            x = lp.TopPLogitsWarper(top_p[i])(None, x)
        probs = x.softmax(-1)[0]
        finite = torch.isfinite(x[0]).nonzero().flatten()
        j = int(finite[torch.randint(len(finite), (), generator=g)])
        ratio = probs[j] / probs.max()
        edges = [float(ratio), float(probs[j]) / float(probs.max()),
                 float(torch.nextafter(ratio, torch.tensor(2.0)))]
        min_p.append(min(edges[i % 3], 1.0))
    assert_same_as_transformers(logits, [1.0] * n, top_k, top_p, min_p, both_min_p_sums=False)


def test_top_k_keeps_ties_with_the_kth_logit_like_transformers():
    """Top-k keeps every logit equal to the k-th, as transformers does: the same set. Where a
    top-p or min-p cut falls inside a run of equal logits, which of them stay depends on the
    sort's order (in transformers too), so there only the kept values must agree."""
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.5, -1.0, 2.0],
                           [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                           [5.0, 4.0, 4.0, 3.0, 3.0, 3.0, 0.0, -2.0]])
    for k in range(1, 10):
        assert_same_as_transformers(logits, [1.0] * 3, [k] * 3, [1.0] * 3, [0.0] * 3)
        for top_p, min_p in [(0.8, 0.0), (0.5, 0.2), (1.0, 0.3), (0.3, 0.0)]:
            ours, _ = ours_kept(logits, [1.0] * 3, [k] * 3, [top_p] * 3, [min_p] * 3)
            for i in range(3):
                ref = reference_kept(logits[i], 1.0, k, top_p, min_p)
                assert sorted(logits[i][ours[i]].tolist()) == sorted(logits[i][ref].tolist()), (k, i)


def test_banned_tokens_stay_out_and_the_best_token_always_stays():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(N, V, generator=g)
    logits[:, ::3] = float("-inf")  # e.g. banned by min_tokens or a stop-id ban
    temperature, top_k, top_p, min_p = _random_params(g, N, True, True, True)
    assert_same_as_transformers(logits, temperature, top_k, top_p, min_p)
    ours, _ = ours_kept(logits, temperature, top_k, top_p, min_p)
    assert not ours[:, ::3].any()
    assert ours.gather(-1, logits.argmax(-1, keepdim=True)).all()
    tiny = ours_kept(logits, [1.0] * N, [0] * N, [1e-9] * N, [1.0] * N)[0]
    assert tiny.sum(-1).tolist() == [1] * N


@pytest.mark.parametrize("seed", range(5))
def test_huge_top_k_samples_like_top_k_off(seed):
    """top_k=2**63 would overflow an int64 tensor; the sampler clamps it to the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, V, generator=g).expand(4, V).contiguous()
    rows = [SamplingParams(top_k=2**63, seed=seed), SamplingParams(top_k=0, seed=seed),
            SamplingParams(top_k=2**63, top_p=0.9, min_p=0.05, seed=seed + 1),
            SamplingParams(top_k=0, top_p=0.9, min_p=0.05, seed=seed + 1)]
    reqs = [new_request(f"r{i}", [1], p, None, None) for i, p in enumerate(rows)]  # seeded generators
    tok = sample(logits, reqs, torch.Generator().manual_seed(0)).tolist()
    assert tok[0] == tok[1] and tok[2] == tok[3]


def test_tiny_temperature_is_greedy_not_nan():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, V, generator=g) * 30
    reqs = [Request("a", [1], SamplingParams(temperature=1e-40, seed=1)),
            Request("b", [1], SamplingParams(temperature=0.0)),
            Request("c", [1], SamplingParams(temperature=9.9e-6, top_p=0.5, seed=2))]
    assert all(r.params.greedy for r in reqs)
    assert sample(logits, reqs, torch.Generator()).tolist() == logits.argmax(-1).tolist()


def test_sampled_tokens_come_from_transformers_kept_set():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(N, V, generator=g) * 2
    temperature, top_k, top_p, min_p = _random_params(g, N, True, True, True)
    reqs = [Request(f"r{i}", [1], SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m))
            for i, (t, k, p, m) in enumerate(zip(temperature, top_k, top_p, min_p, strict=True))]
    allowed = [reference_kept(logits[i], temperature[i], top_k[i], top_p[i], min_p[i]) for i in range(N)]
    shared = torch.Generator().manual_seed(0)
    for _ in range(20):
        for i, t in enumerate(sample(logits, reqs, shared).tolist()):
            assert allowed[i][t] or reqs[i].params.greedy, (i, t)



def test_uncut_rows_draw_by_inverse_cdf_in_vocabulary_order_and_cut_rows_over_kept_tokens():
    from flover.sampling.sampler import RowSampling, sample_rows

    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 2))
    cdf = [0.1, 0.3, 0.6, 1.0]
    for u in (0.0, 0.05, 0.15, 0.29, 0.31, 0.7, 0.99):
        plain = RowSampling(False, 1.0, 0, 1.0, 0.0, u)
        top2 = RowSampling(False, 1.0, 2, 1.0, 0.0, u)  # keeps 0.4, 0.3 -> 4/7, 3/7, descending
        got = sample_rows(logits, [plain, top2]).tolist()
        assert got[0] == next(i for i, c in enumerate(cdf) if c > u + 1e-7)
        assert got[1] == (3 if u < 4 / 7 else 2)

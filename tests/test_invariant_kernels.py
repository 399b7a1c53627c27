"""Batch-invariant kernels: each equals its PyTorch reference, and a row's result is bitwise
the same whatever else runs beside it. Under TRITON_INTERPRET=1 on the CPU (small sizes; the
interpreter has no bfloat16, so bf16 runs only on a GPU), compiled on a GPU machine.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets this before imports"
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from flover.models.layers import TiedHead  # noqa: E402
from flover.ops import launch, linear_triton  # noqa: E402
from flover.ops.attention import row_attention_ref  # noqa: E402
from flover.ops.attention_triton import (  # noqa: E402
    _items_kernel,
    _ordered_combine_kernel,
    _run,
    row_attention,
)
from flover.ops.linear import InvariantLinear, InvariantTiedHead, linear_ref, swap_linears  # noqa: E402
from flover.ops.linear_triton import default_config, linear, splits  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
SMALL = {"block_n": 16, "block_k": 32}  # small tiles keep the interpreter fast
# row_attention's persistent form: the work list, walked by 3 programs per kv head
PERSISTENT = {"persistent": True, "programs": 3}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_reference(dtype, bias):
    gen = torch.Generator().manual_seed(1)
    # N and K not multiples of the tiles: masked edges on both
    w, x = _randn(40, 70, gen=gen, dtype=dtype), _randn(19, 70, gen=gen, dtype=dtype)
    b = _randn(40, gen=gen, dtype=dtype) if bias else None
    torch.testing.assert_close(linear(x, w, b, config=SMALL), linear_ref(x, w, b),
                               rtol=TOL[dtype], atol=TOL[dtype])


HALF = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TMA = SMALL | {"tma": True}  # the Hopper form, forced (the interpreter runs it too)


@pytest.mark.parametrize(("dtype", "form"), [(d, SMALL) for d in DTYPES] + [(d, TMA) for d in HALF])
def test_linear_row_is_bitwise_the_same_at_every_batch_size(dtype, form):
    """Both forms: the pointer one (every dtype) and the TMA one (16-bit dtypes)."""
    gen = torch.Generator().manual_seed(2)
    w, b = _randn(48, 96, gen=gen, dtype=dtype), _randn(48, gen=gen, dtype=dtype)
    row = _randn(1, 96, gen=gen, dtype=dtype)
    alone = linear(row, w, b, config=form)
    for tiles in (1, 2, 4):  # row tiles sharing a program: 1 to 4 of them below
        for m, at in [(3, 1), (17, 16), (33, 5), (70, 66)]:  # other tiles, programs, offsets
            x = _randn(m, 96, gen=gen, dtype=dtype)
            x[at] = row[0]
            got = linear(x, w, b, config=form | {"max_m_tiles": tiles})
            assert torch.equal(got[at], alone[0]), (tiles, m, at)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts", [2, 3])
def test_linear_split_k_as_programs_or_in_one_program_gives_the_same_bits(dtype, parts):
    gen = torch.Generator().manual_seed(7)
    w, x = _randn(40, 200, gen=gen, dtype=dtype), _randn(19, 200, gen=gen, dtype=dtype)
    b, r = _randn(40, gen=gen, dtype=dtype), _randn(19, 40, gen=gen, dtype=dtype)
    grid = linear(x, w, b, config=SMALL | {"split": parts, "split_grid": True}, residual=r)
    loop = linear(x, w, b, config=SMALL | {"split": parts, "split_grid": False}, residual=r)
    assert torch.equal(grid, loop)
    ref = (linear_ref(x, w, b).float() + r.float()).to(dtype)
    torch.testing.assert_close(grid, ref, rtol=TOL[dtype], atol=TOL[dtype])
    assert int(linear_triton._counters(torch.device(DEVICE)).abs().sum()) == 0  # left at zero


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_split_row_is_bitwise_the_same_at_every_batch_size(dtype):
    gen = torch.Generator().manual_seed(8)
    w = _randn(48, 224, gen=gen, dtype=dtype)
    row = _randn(1, 224, gen=gen, dtype=dtype)
    cfg = SMALL | {"split": 3}
    alone = linear(row, w, config=cfg | {"split_grid": True})
    for m, at, grid in [(3, 1, True), (17, 16, False), (33, 5, True), (70, 66, False)]:
        x = _randn(m, 224, gen=gen, dtype=dtype)
        x[at] = row[0]
        got = linear(x, w, config=cfg | {"split_grid": grid, "max_m_tiles": 4})
        assert torch.equal(got[at], alone[0]), (m, at, grid)


def test_splits_cut_narrow_weights_and_leave_wide_ones_whole(monkeypatch):
    monkeypatch.setattr(linear_triton, "SPLIT_K", True)
    cfg = default_config()
    llama_7b = {"o": (4096, 4096), "down": (4096, 11008), "qkv": (12288, 4096),
                "gate_up": (22016, 4096), "head": (32000, 4096)}
    got = {name: splits(n, k, cfg, 132) for name, (n, k) in llama_7b.items()}
    assert got["o"] > 1 and got["down"] > 1  # 64 column tiles: half an H200's 132 SMs
    assert got["gate_up"] == 1 and got["head"] == 1  # several full waves already
    for name, (_, k) in llama_7b.items():  # every part at least 4 K steps
        assert -(-k // cfg["block_k"]) >= 4 * got[name]
    monkeypatch.setattr(linear_triton, "SPLIT_K", False)
    assert splits(4096, 4096, cfg, 132) == 1


def test_linear_keeps_leading_dimensions_and_takes_no_rows():
    gen = torch.Generator().manual_seed(3)
    w, x = _randn(16, 32, gen=gen), _randn(2, 3, 32, gen=gen)
    assert linear(x, w, config=SMALL).shape == (2, 3, 16)
    assert linear(x[:0, 0], w, config=SMALL).shape == (0, 16)


class _Quantized(nn.Module):  # stands in for another branch's linear module: not to be swapped
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4, 8))


def _tiny():
    m = nn.Module()
    m.embed = nn.Embedding(10, 8)
    m.proj = nn.Linear(8, 8)
    m.q = _Quantized()
    m.head = TiedHead(m.embed)
    return m


def test_swap_linears_leaves_cpu_models_alone():
    model = _tiny()
    assert swap_linears(model) == 0
    assert type(model.proj) is nn.Linear and type(model.head) is TiedHead


def test_swap_linears_replaces_linear_and_tied_head_only_keeping_parameters():
    model = _tiny()
    x = torch.randn(3, 8)
    before = model.head(model.proj(x))
    names = {n: p for n, p in model.named_parameters()}
    assert swap_linears(model, only_cuda=False) == 2
    assert type(model.proj) is InvariantLinear and type(model.head) is InvariantTiedHead
    assert type(model.q) is _Quantized
    assert {n: p for n, p in model.named_parameters()} == names  # same names, same tensors
    assert model.head.weight is model.embed.weight  # still tied
    assert torch.equal(model.head(model.proj(x)), before)  # CPU tensors: F.linear, unchanged
    assert swap_linears(model, only_cuda=False) == 0  # idempotent
    assert swap_linears(model, only_cuda=False, invariant=False) == 2  # and back
    assert type(model.proj) is nn.Linear and type(model.head) is TiedHead
    assert {n: p for n, p in model.named_parameters()} == names
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.head(model.proj(x)), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 16), (4, 2, 16), (6, 1, 24)])
def test_row_attention_matches_reference(dtype, heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    k = _randn(4, kv_heads, 100, head_dim, gen=gen, dtype=dtype)
    v = _randn(4, kv_heads, 100, head_dim, gen=gen, dtype=dtype)
    q = _randn(6, heads, head_dim, gen=gen, dtype=dtype)
    # prompt tokens of one slot beside decode rows of others, lengths across split edges
    slots = torch.tensor([2, 0, 3, 3, 1, 2], device=DEVICE)
    lengths = torch.tensor([1, 77, 32, 33, 100, 65], device=DEVICE)
    ours = row_attention(q, k, v, slots, lengths, 100, head_dim ** -0.5,
                         config={"block_n": 16, "split_len": 32})
    ref = row_attention_ref(q, k, v, slots, lengths, head_dim ** -0.5)
    tol = max(TOL[dtype], 2e-3)  # on a GPU, float32 tl.dot rounds its inputs to tf32
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", [{}, PERSISTENT])
def test_row_attention_is_bitwise_the_same_alone_fused_and_in_a_wider_grid(dtype, form):
    gen = torch.Generator().manual_seed(5)
    k, v = _randn(3, 2, 96, 16, gen=gen, dtype=dtype), _randn(3, 2, 96, 16, gen=gen, dtype=dtype)
    q = _randn(5, 4, 16, gen=gen, dtype=dtype)
    slots = torch.tensor([0, 1, 2, 2, 2], device=DEVICE)
    lengths = torch.tensor([90, 7, 40, 41, 42], device=DEVICE)
    cfg = {"block_n": 16, "split_len": 32} | form
    fused = row_attention(q, k, v, slots, lengths, 90, 0.25, cfg)
    for i in range(5):
        alone = row_attention(q[i:i + 1], k, v, slots[i:i + 1], lengths[i:i + 1],
                              int(lengths[i]), 0.25, cfg)
        graph = row_attention(q[i:i + 1], k, v, slots[i:i + 1], lengths[i:i + 1], 96, 0.25, cfg)
        assert torch.equal(alone[0], fused[i]) and torch.equal(graph[0], fused[i]), i
    # many tokens go in slices (bounded partials): the same bits
    sliced = row_attention(q, k, v, slots, lengths, 90, 0.25, cfg | {"max_partials": 2 * 4 * 3 * 16})
    assert torch.equal(sliced, fused)
    if not form:  # the grid's split programs past a row's length writing empty partials
        assert torch.equal(row_attention(q, k, v, slots, lengths, 96, 0.25,
                                         cfg | {"skip_empty": False}), fused)


@pytest.mark.parametrize(("heads", "kv_heads", "dtype", "form"),
                         [(2, 2, torch.float32, {}), (4, 2, torch.float16, {}),
                          (6, 1, torch.float16, {}), (2, 2, torch.float16, PERSISTENT),
                          (4, 2, torch.float32, PERSISTENT)])
def test_a_prompts_tokens_sharing_a_tile_are_bitwise_each_token_alone(heads, kv_heads, dtype,
                                                                       form):
    """Up to 16 // group consecutive tokens of a prompt share a program's rows (one K/V read);
    each token's result is still bitwise its result as a lone decode row, whole or chunked,
    at any offset in the batch, beside decode rows and graph padding (slot 0, length 1, at
    the last position: with the positions given, the persistent form gives it zeros)."""
    gen = torch.Generator().manual_seed(heads + kv_heads)
    d, n = 16, 37  # a prompt of 37 tokens in slot 1, after 3 decode rows: windows misaligned
    k, v = _randn(3, kv_heads, 80, d, gen=gen, dtype=dtype), _randn(3, kv_heads, 80, d, gen=gen, dtype=dtype)
    q = _randn(3 + n + 4, heads, d, gen=gen, dtype=dtype)
    slots = torch.tensor([2, 0, 2] + [1] * n + [0] * 4, device=DEVICE)
    lengths = torch.tensor([50, 9, 70] + list(range(30, 30 + n)) + [1] * 4, device=DEVICE)
    pos = torch.where(torch.arange(len(q), device=DEVICE) < 3 + n, lengths - 1, 79)
    cfg = {"block_n": 16, "split_len": 32} | form

    def attend(rows: slice):
        return row_attention(q[rows], k, v, slots[rows], lengths[rows], 80, 0.25, cfg,
                             positions=pos[rows])

    whole = attend(slice(0, len(q)))
    real = slice(0, 3 + n)
    torch.testing.assert_close(whole[real], row_attention_ref(q, k, v, slots, lengths, 0.25)[real],
                               rtol=2e-3, atol=2e-3)
    if form:
        assert not whole[3 + n:].any()  # padding: no work, zeros
    for i in [0, 1, 2, 3, 4, 5, 12, 18, 19, 26, 35, 39, 40, 43]:  # decode, prompt, padding
        assert torch.equal(attend(slice(i, i + 1))[0], whole[i]), i
    for cut in (5, 20):  # the prompt in two chunks, each beside other rows
        a, b = slice(0, 3 + cut), slice(3 + cut, len(q))
        assert torch.equal(attend(a), whole[a]) and torch.equal(attend(b), whole[b])
    one = row_attention(q, k, v, slots, lengths, 80, 0.25, cfg | {"tokens": 1})  # a tile per token
    torch.testing.assert_close(one[real], whole[real], rtol=1e-3, atol=1e-3)


@triton.jit
def _runs_kernel(Lens, Slots, Count, TOKENS: tl.constexpr):
    b = tl.program_id(0)
    count, _ = _run(Lens, Slots, b, tl.num_programs(0), TOKENS)
    tl.store(Count + b, count)


SLOTS = [3, 1, 1, 1, 1, 1, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0]
LENS = [9, 4, 5, 6, 7, 9, 1, 8, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 1, 1]
# windows of 4 from token 0; a run breaks at a window, a slot change or a length jump
RUNS = [1, 3, 0, 0, 1, 1, 1, 1, 1, 3, 0, 0, 4, 0, 0, 0, 2, 0, 1, 1, 1]


def test_runs_cover_every_token_once_with_consecutive_lengths_of_one_slot():
    count = torch.zeros(len(SLOTS), dtype=torch.int32, device=DEVICE)
    _runs_kernel[(len(SLOTS),)](torch.tensor(LENS, device=DEVICE),
                                torch.tensor(SLOTS, device=DEVICE), count, TOKENS=4)
    assert count.tolist() == RUNS


def test_the_work_list_holds_each_runs_splits_and_skips_padding():
    # the last three tokens are padding (length 1 at the last position); split length 4
    pos = [n - 1 for n in LENS[:18]] + [99] * 3
    items = torch.full((len(SLOTS) * 4, 4), -1, dtype=torch.int32, device=DEVICE)
    count = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    _items_kernel[(1,)](torch.tensor(SLOTS, device=DEVICE), torch.tensor(LENS, device=DEVICE),
                        torch.tensor(pos, device=DEVICE), items, count, len(SLOTS), 4, 2,
                        TOKENS=4, HAS_POS=True, BLOCK_T=8, BLOCK_S=2, PDL=False)
    # two splits at most (the partials' size): a run longer than that gets two
    want = [(b, sp * 32 + RUNS[b], SLOTS[b], LENS[b]) for b in range(18) if RUNS[b]
            for sp in range(min(2, -(-(LENS[b] + RUNS[b] - 1) // 4)))]
    assert int(count) == len(want)
    assert [tuple(r) for r in items[:len(want)].tolist()] == want


@pytest.mark.parametrize("form", [{}, PERSISTENT])
def test_a_length_past_max_len_stays_within_its_own_row(form):
    """A row longer than the max_len that sizes the partials (an engine bug, not an input)
    must neither write nor read past them: its neighbour's bits stay those it has alone."""
    gen = torch.Generator().manual_seed(8)
    k, v = _randn(2, 1, 200, 16, gen=gen), _randn(2, 1, 200, 16, gen=gen)
    q = _randn(2, 2, 16, gen=gen)
    slots, lengths = torch.tensor([0, 1], device=DEVICE), torch.tensor([40, 200], device=DEVICE)
    cfg = {"block_n": 16, "split_len": 32} | form
    both = row_attention(q, k, v, slots, lengths, 64, 0.25, cfg)
    alone = row_attention(q[:1], k, v, slots[:1], lengths[:1], 64, 0.25, cfg)
    assert torch.equal(both[0], alone[0]) and torch.isfinite(both[1]).all()


@triton.jit
def _merge_one_by_one(OutPart, LsePart, Lens, Out, so_b, so_h, so_s, sl_b, sl_h, sout_b,
                      sout_h, split_len, num_splits, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """The merge as it was before 2026-12-08: two loads per split, waited for one by one."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    mask_d = d < D
    n = tl.minimum(tl.cdiv(tl.load(Lens + b).to(tl.int32), split_len), num_splits)
    lse_row = LsePart + b * sl_b + h * sl_h
    o_row = OutPart + b * so_b + h * so_h + d
    m = tl.load(lse_row)
    for s in range(1, n):
        m = tl.maximum(m, tl.load(lse_row + s))
    acc = tl.zeros([BLOCK_D], tl.float32)
    den = 0.0
    for s in range(0, n):
        w = tl.exp(tl.load(lse_row + s) - m)
        acc += w * tl.load(o_row + s * so_s, mask=mask_d, other=0.0)
        den += w
    tl.store(Out + b * sout_b + h * sout_h + d, acc / den, mask=mask_d)


def test_the_merge_loading_splits_at_once_is_bitwise_the_one_by_one_merge():
    """Splits loaded BLOCK_S at a time (here 4, so rows of 5-8 splits take two rounds) and
    merged from registers: the same bits as loading each split when it is merged."""
    gen = torch.Generator().manual_seed(9)
    t, h, splits, d = 6, 3, 8, 24
    part = _randn(t, h, splits, d, gen=gen)
    lse = _randn(t, h, splits, gen=gen) * 4
    lens = torch.tensor([1, 8, 9, 33, 40, 64], device=DEVICE)  # 1 to 8 splits of 8
    pos = torch.tensor([0, 7, 8, 32, 63, 63], device=DEVICE)  # the fifth: padding
    outs = {}
    for name in ("one by one", "at once", "at once, positions", "1 at once"):
        out = torch.empty(t, h, d, device=DEVICE)
        strides = (part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
                   out.stride(0), out.stride(1), 8, splits)
        if name == "one by one":
            _merge_one_by_one[(t, h)](part, lse, lens, out, *strides, D=d, BLOCK_D=32)
        else:
            _ordered_combine_kernel[(t, h)](part, lse, lens, pos, out, *strides, D=d, BLOCK_D=32,
                                            BLOCK_S=1 if name[0] == "1" else 4,
                                            HAS_POS="positions" in name, PDL=False, num_warps=4)
        outs[name] = out
    assert torch.equal(outs["at once"], outs["one by one"])
    assert torch.equal(outs["1 at once"], outs["one by one"])  # the bench's old form
    padding = torch.arange(t, device=DEVICE) == 4
    assert torch.equal(outs["at once, positions"][~padding], outs["one by one"][~padding])
    assert not outs["at once, positions"][padding].any()


def test_row_attention_ignores_positions_past_each_row_length():
    gen = torch.Generator().manual_seed(6)
    k, v = _randn(2, 1, 64, 16, gen=gen), _randn(2, 1, 64, 16, gen=gen)
    q = _randn(2, 2, 16, gen=gen)
    slots, lengths = torch.tensor([1, 0], device=DEVICE), torch.tensor([5, 40], device=DEVICE)
    cfg = {"block_n": 16, "split_len": 32}
    before = row_attention(q, k, v, slots, lengths, 64, 0.25, cfg)
    k[1, :, 5:], v[1, :, 5:] = float("nan"), float("nan")  # garbage past row 0's length
    assert torch.equal(row_attention(q, k, v, slots, lengths, 64, 0.25, cfg), before)


def test_pdl_is_never_used_off_a_hopper_gpu(monkeypatch):
    monkeypatch.setattr(launch, "ENABLED", True)
    assert not launch.enabled(torch.zeros(2))  # CPU tensors: the interpreter, no PDL
    assert launch.options(False) == {} and launch.options(True) == {"launch_pdl": True}
    monkeypatch.setattr(launch, "ENABLED", False)
    if torch.cuda.is_available():
        assert not launch.enabled(torch.zeros(2, device="cuda"))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_tma_form_matches_reference_with_its_epilogues(dtype, bias):
    gen = torch.Generator().manual_seed(11)
    # N and K not multiples of the tiles: TMA's zeros past the edges
    w, x = _randn(40, 104, gen=gen, dtype=dtype), _randn(19, 104, gen=gen, dtype=dtype)
    b = _randn(40, gen=gen, dtype=dtype) if bias else None
    r = _randn(19, 40, gen=gen, dtype=dtype)
    ref = linear_ref(x, w, b)
    torch.testing.assert_close(linear(x, w, b, config=TMA), ref, rtol=TOL[dtype], atol=TOL[dtype])
    got = linear(x, w, b, config=TMA, residual=r)
    torch.testing.assert_close(got, (ref.float() + r.float()).to(dtype), rtol=TOL[dtype],
                               atol=TOL[dtype])
    # an unaligned x (a view one element in) is copied: the same values, the same bits
    xs = _randn(19 * 104 + 1, gen=gen, dtype=dtype)
    xs[1:] = x.reshape(-1)
    assert torch.equal(linear(xs[1:].view(19, 104), w, b, config=TMA), linear(x, w, b, config=TMA))


def test_linear_tma_form_is_taken_only_where_it_can_be():
    gen = torch.Generator().manual_seed(13)
    form = linear_triton._tma_form
    w16, x16 = _randn(40, 96, gen=gen, dtype=torch.float16), _randn(3, 96, gen=gen, dtype=torch.float16)
    assert form(x16, w16, TMA, 1)
    assert not form(x16, w16, SMALL | {"tma": False}, 1)
    assert not form(x16.float(), w16.float(), TMA, 1)  # float32: the IEEE products
    assert not form(x16, w16, TMA, 2)  # parts
    odd = _randn(40, 70, gen=gen, dtype=torch.float16)  # rows of 140 bytes: no TMA
    assert not form(x16[:, :70], odd, TMA, 1)
    hopper = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9
    assert form(x16, w16, SMALL, 1) == hopper
    # the folded-norm and gated epilogues go where the TMA form goes, and nowhere else
    assert linear_triton.fusable(w16, TMA) and not linear_triton.fusable(odd, TMA)
    assert linear_triton.fusable(w16) == hopper
    assert not linear_triton.fusable(w16.float(), TMA)
    with pytest.raises(ValueError, match="TMA form"):
        linear(x16, w16, config=SMALL | {"tma": False}, rms_eps=1e-6)

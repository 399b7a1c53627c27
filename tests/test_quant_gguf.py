"""A GGUF file's quantized tensors kept as they are: every type in quant.GGUF_LAYOUTS (the
K-quants of Q4_K_M / Q5_K_M files included) against gguf's own dequantisation, the layouts'
conversions, the CPU kernels on each layout, and a whole Q4_K_M-like file loaded and served."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flover import Engine, EngineConfig, SamplingParams
from flover.ops import quant, quant_cpu
from flover.weights import load_model

gguf = pytest.importorskip("gguf")
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

KINDS = list(quant.GGUF_LAYOUTS)
# the byte offsets of each type's float16 d (and dmin or m) within its block
_HALVES = {"Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def raw_blocks(kind: str, n: int, k: int, rng: np.random.Generator, d: float = 1e-2) -> np.ndarray:
    """A [n, bytes per row] tensor of `kind` with random bytes (every bit pattern is a valid
    block) and finite random float16 d and min fields."""
    qtype = gguf.GGMLQuantizationType[kind]
    per, size = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (n, k // per, size), dtype=np.uint8)
    for at in _HALVES.get(kind, (0,)):
        b[..., at:at + 2] = rng.normal(0, d, (n, k // per, 1)).astype(np.float16).view(np.uint8)
    return b.reshape(n, -1)


def reference(kind: str, data: np.ndarray, n: int, k: int) -> torch.Tensor:
    return torch.from_numpy(dequantize(data, gguf.GGMLQuantizationType[kind]).reshape(n, k))


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_kept_bit_for_bit(kind):
    """Random blocks: our layout's dequantisation (quant.dequantize, the kernels' reference)
    gives gguf's weights to the bit, signs of zeros included (Q4_0's d * (q - 8) is held as
    q * d + (-8d), the same value, whose zeros are +0 where d is negative)."""
    rng = np.random.default_rng(1)
    n, k = 5, 512
    data = raw_blocks(kind, n, k, rng)
    p = quant.from_gguf(kind, data, (n, k))
    assert p.layout == quant.GGUF_LAYOUTS[kind]
    assert p.scales.dtype == p.layout.scale_dtype
    ours, ref = p.dequantize(), reference(kind, data, n, k)
    assert torch.equal(ours, ref)
    if kind != "Q4_0":
        assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1"])
def test_gguf_s_own_quantizer_round_trips(kind):
    """Blocks as gguf's quantizer writes them (the types it can write)."""
    from gguf.quants import quantize

    w = np.random.default_rng(0).normal(0, 0.05, (6, 96)).astype(np.float32)
    raw = quantize(w, gguf.GGMLQuantizationType[kind])
    assert torch.equal(quant.from_gguf(kind, raw, (6, 96)).dequantize(), reference(kind, raw, 6, 96))


def test_a_mixed_linear_takes_the_smallest_layout_that_holds_its_pieces():
    L = quant.GGUF_LAYOUTS
    assert L["Q4_K"].join(L["Q6_K"]) == quant.Layout(8, 16, wide=True, mins=True)  # Q4_K_M's qkv
    assert L["Q4_0"].join(L["Q4_1"]) == quant.Layout(4)
    assert L["Q4_1"].join(L["Q4_K"]) == quant.Layout(4, wide=True)
    assert L["Q8_0"].join(L["Q5_0"]) == quant.Layout(8)
    assert L["Q8_0"].join(L["Q4_0"]) == quant.Layout(8, mins=True)
    assert L["Q5_K"].join(L["Q6_K"]) == quant.Layout(8, 16, wide=True, mins=True)
    assert not quant.Layout(4).holds(L["Q4_K"]) and not quant.Layout(8).holds(L["Q6_K"])
    assert [kind for kind, lay in L.items() if lay.gpu_kernel()] == ["Q4_0", "Q4_1", "Q8_0", "Q5_0"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("into", ["Q4_1", "Q8_0", "Q6_K", "Q5_K"])
def test_conversions_keep_every_weight(kind, into):
    """Packed.to the join of two types: the same weights (==; a min of zero added to -0
    gives +0)."""
    rng = np.random.default_rng(2)
    n, k = 3, 256
    p = quant.from_gguf(kind, raw_blocks(kind, n, k, rng), (n, k))
    layout = p.layout.join(quant.GGUF_LAYOUTS[into])
    q = p.to(layout)
    assert q.layout == layout
    assert torch.equal(q.dequantize(), p.dequantize())
    with pytest.raises(ValueError, match="cannot hold"):
        p.to(quant.Layout(4, 64))  # groups of 64 hold no group of 32 or 16


# --- the CPU kernels on each layout ---------------------------------------------------------

needs_kernel = pytest.mark.skipif(quant_cpu.lib() is None, reason="no C compiler")
LAYOUT_KINDS = ["Q4_K", "Q5_K", "Q6_K", "Q5_1", "Q5_0"]


def module_of(p: quant.Packed) -> quant.QuantLinear:
    n = p.qweight.shape[0]
    lay = p.layout
    m = quant.QuantLinear(p.scales.shape[1] * p.group, n, p.bits, p.group, wide=lay.wide, mins=lay.mins)
    for name, t in p.tensors(""):
        getattr(m, name).data = t
    return m


def mixed(rng: np.random.Generator, n: int, k: int) -> quant.Packed:
    """Q4_K_M's qkv: Q4_K rows over Q6_K rows, in int8 groups of 16 with float32 mins."""
    a = quant.from_gguf("Q4_K", raw_blocks("Q4_K", n, k, rng), (n, k))
    b = quant.from_gguf("Q6_K", raw_blocks("Q6_K", n, k, rng), (n, k))
    lay = a.layout.join(b.layout)
    a, b = a.to(lay), b.to(lay)
    return quant.Packed(8, lay.group, torch.cat((a.qweight, b.qweight)),
                        torch.cat((a.scales, b.scales)), torch.cat((a.mins, b.mins)))


@needs_kernel
@pytest.mark.parametrize("kind", [*LAYOUT_KINDS, "mixed"])
@pytest.mark.parametrize("m", [1, 3, 8, 13])
def test_cpu_kernel_equals_dequantised_linear_in_each_layout(kind, m):
    rng = np.random.default_rng(3)
    n, k = 19, 512  # 19 rows: the kernel's single-column tail
    if kind == "mixed":
        p = mixed(rng, 10, k)
    else:
        p = quant.from_gguf(kind, raw_blocks(kind, n, k, rng), (n, k))
    x = torch.randn(m, k)
    w = p.dequantize().double()
    ref = torch.nn.functional.linear(x.double(), w)
    # float32 sums of k products in any order: within k * eps of the sum of their magnitudes
    bound = k * torch.finfo(torch.float32).eps * (x.double().abs() @ w.abs().T)
    assert ((module_of(p)(x).double() - ref).abs() <= bound).all()


@needs_kernel
@pytest.mark.parametrize("kind", [*LAYOUT_KINDS, "mixed"])
def test_cpu_kernel_row_is_bitwise_independent_of_the_batch_in_each_layout(kind):
    rng = np.random.default_rng(4)
    if kind == "mixed":
        p = mixed(rng, 9, 256)
    else:
        p = quant.from_gguf(kind, raw_blocks(kind, 18, 256, rng), (18, 256))
    mod = module_of(p)
    x = torch.randn(13, 256)
    together = mod(x)
    for i in (0, 7, 8, 12):
        assert torch.equal(mod(x[i:i + 1]), together[i:i + 1])
    assert torch.equal(mod(x[8:13]), together[8:13])


def test_layouts_the_gpu_kernels_do_not_take_run_the_reference_elsewhere():
    """Off the CPU float32 path (bfloat16 here; a GPU for float32 scales, groups of 16 or
    int8 mins), a layout dequantises and calls F.linear."""
    rng = np.random.default_rng(5)
    p = mixed(rng, 4, 256)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x, p.dequantize().to(torch.bfloat16))
    assert torch.equal(module_of(p)(x), ref)


# --- a whole file ---------------------------------------------------------------------------

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2
# Q4_K_M's choices: Q4_K for most, Q6_K for some attn_v / ffn_down and the output; a Q5_K too
TYPES = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": ("Q6_K", "Q4_K"),
         "attn_output": "Q4_K", "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": ("Q6_K", "Q5_K")}


@pytest.fixture(scope="module")
def kquant_file(tmp_path_factory):
    """A tiny LLaMA GGUF with random K-quant blocks and a byte-level BPE vocabulary of 256."""
    from tokenizers import pre_tokenizers

    path = tmp_path_factory.mktemp("gguf") / "tiny-q4_k_m.gguf"
    rng = np.random.default_rng(6)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(sorted(pre_tokenizers.ByteLevel.alphabet()))
    w.add_token_merges([])
    w.add_eos_token_id(255)

    def tensor(name: str, kind: str, n: int, k: int) -> None:
        w.add_tensor(name, raw_blocks(kind, n, k, rng, d=2e-3),
                     raw_dtype=gguf.GGMLQuantizationType[kind])

    tensor("token_embd.weight", "Q4_K", 256, HIDDEN)
    tensor("output.weight", "Q6_K", 256, HIDDEN)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    head_dim = HIDDEN // HEADS
    rows = {"attn_q": HIDDEN, "attn_k": KV_HEADS * head_dim, "attn_v": KV_HEADS * head_dim,
            "attn_output": HIDDEN, "ffn_gate": FFN, "ffn_up": FFN, "ffn_down": HIDDEN}
    for i in range(LAYERS):
        for part, kinds in TYPES.items():
            kind = kinds if isinstance(kinds, str) else kinds[i]
            tensor(f"blk.{i}.{part}.weight", kind, rows[part], FFN if part == "ffn_down" else HIDDEN)
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(HIDDEN, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_k_quant_file_keeps_its_blocks(kquant_file, tmp_path, monkeypatch):
    """Every linear is kept packed in the layout its pieces call for, and holds exactly the
    weights of the dequantised (float32) model."""
    monkeypatch.setenv("FLOVER_CACHE", str(tmp_path))  # the float32 conversion's cache
    cpu = torch.device("cpu")
    packed, _ = load_model(str(kquant_file), torch.float32, cpu, quantization="auto")
    full, _ = load_model(str(kquant_file), torch.float32, cpu, quantization="none")
    layouts = {n: m.layout for n, m in packed.named_modules() if isinstance(m, quant.QuantLinear)}
    L = quant.GGUF_LAYOUTS
    assert layouts == {
        "lm_head": L["Q6_K"],
        "model.layers.0.self_attn.qkv_proj": quant.Layout(8, 16, wide=True, mins=True),
        "model.layers.1.self_attn.qkv_proj": L["Q4_K"],
        "model.layers.0.self_attn.o_proj": L["Q4_K"], "model.layers.1.self_attn.o_proj": L["Q4_K"],
        "model.layers.0.mlp.gate_up_proj": L["Q4_K"], "model.layers.1.mlp.gate_up_proj": L["Q4_K"],
        "model.layers.0.mlp.down_proj": L["Q6_K"], "model.layers.1.mlp.down_proj": L["Q5_K"],
    }
    for name, lay in layouts.items():
        mod = packed.get_submodule(name)
        assert mod.scales.dtype == torch.float32 and (mod.mins is not None) == lay.mins
        ours = mod.packed().dequantize()
        dense = full.get_submodule(name)(torch.eye(ours.shape[1])).T  # oneDNN-packed: W exactly
        assert torch.equal(ours, dense), name
    x = torch.randn(5, HIDDEN)
    torch.testing.assert_close(packed.logits(x), full.logits(x), atol=1e-4, rtol=1e-4)


def test_a_k_quant_file_serves_fused_as_alone(kquant_file):
    """A request's greedy tokens on the packed K-quant model: alone == fused with requests
    that arrive while it decodes."""
    eng = Engine(EngineConfig(model=str(kquant_file), device="cpu", max_concurrency=4,
                              max_seq_len=64))
    assert sum(isinstance(m, quant.QuantLinear) for m in eng.model.modules()) == 4 * LAYERS + 1
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompts = [[(7 * i + 3 * j) % 256 for j in range(5 + 3 * i)] for i in range(4)]
    alone = []
    for i, p in enumerate(prompts):
        eng.add_request(f"solo{i}", p, params)
        alone.append([o for o in eng.run_until_done() if o.finished][0].token_ids)
    fused = {}
    for i, p in enumerate(prompts):
        eng.add_request(f"fused{i}", p, params)
        fused |= {o.request_id: o.token_ids for o in eng.step() if o.finished}
    fused |= {o.request_id: o.token_ids for o in eng.run_until_done() if o.finished}
    assert [fused[f"fused{i}"] for i in range(4)] == alone


def test_a_tensor_whose_bytes_are_not_its_blocks_is_refused_by_name():
    rng = np.random.default_rng(7)
    data = raw_blocks("Q4_K", 4, 512, rng)
    with pytest.raises(ValueError, match="Q4_K tensor of 4 x 512 weights needs 8 blocks of 256"):
        quant.from_gguf("Q4_K", data[:, :-1], (4, 512))
    with pytest.raises(ValueError, match="Q6_K tensor of 4 x 320"):
        quant.from_gguf("Q6_K", raw_blocks("Q6_K", 4, 512, rng), (4, 320))  # not rows of 256

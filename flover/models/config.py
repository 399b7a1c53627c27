"""ModelConfig: the shape of a model, read from an HF config.json, a GGUF header or a preset."""

from __future__ import annotations

from dataclasses import dataclass, field


class ModelFormatError(ValueError):
    """A checkpoint or model name is not what we can load; the message says what was expected."""


ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
                 "GPTJForCausalLM": "gptj"}


@dataclass(slots=True)
class ModelConfig:
    arch: str  # "llama" or "gptj"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int = 2048
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # GPT-J rotates only the first rotary_dim of each head
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def rot_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def qkv_size(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * self.qkv_size + self.num_heads * self.head_dim * h
        mlp = (3 if self.arch == "llama" else 2) * h * i
        head = 0 if self.tie_word_embeddings else v * h
        return self.num_layers * (attn + mlp) + v * h + head

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if arch is None and cfg.get("model_type") in ("llama", "mistral", "gptj"):
            arch = "gptj" if cfg["model_type"] == "gptj" else "llama"
        if arch is None:
            raise ModelFormatError(
                f"config.json architectures={archs} model_type={cfg.get('model_type')!r}: "
                f"expected one of {sorted(ARCHITECTURES)}")
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if arch == "gptj":
            heads = cfg["n_head"]
            return cls(arch="gptj", vocab_size=cfg["vocab_size"], hidden_size=cfg["n_embd"],
                       intermediate_size=cfg.get("n_inner") or 4 * cfg["n_embd"],
                       num_layers=cfg["n_layer"], num_heads=heads, num_kv_heads=heads,
                       head_dim=cfg["n_embd"] // heads, max_position=cfg.get("n_positions", 2048),
                       rotary_dim=cfg.get("rotary_dim"), norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                       tie_word_embeddings=False, bos_token_id=cfg.get("bos_token_id"),
                       eos_token_ids=eos_ids)
        scaling = cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {})
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ("default", None):
            raise ModelFormatError(f"rope_scaling type {rope_type!r} is not supported yet; "
                                   "expected the default rotary embedding")
        heads = cfg["num_attention_heads"]
        theta = cfg.get("rope_theta", scaling.get("rope_theta", 10000.0))
        return cls(arch="llama", vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                   intermediate_size=cfg["intermediate_size"],
                   num_layers=cfg["num_hidden_layers"], num_heads=heads,
                   num_kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   max_position=cfg.get("max_position_embeddings", 2048), rope_theta=float(theta),
                   norm_eps=cfg.get("rms_norm_eps", 1e-6),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   attention_bias=bool(cfg.get("attention_bias", False)),
                   mlp_bias=bool(cfg.get("mlp_bias", False)),
                   bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids)

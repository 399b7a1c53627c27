"""The LLaMA family (LLaMA 1-3, Mistral-shaped, SmolLM2): RMSNorm, rotary, SwiGLU, GQA.

Written for fused batches: tokens arrive flat ([T, hidden]) with their positions, and the
attention layer reads and writes the slot KV cache through `flover.ops.attention`.
Parameter names follow Hugging Face's, with q/k/v and gate/up stacked into one matrix each.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from flover.models.config import ModelConfig
from flover.models.layers import RMSNorm, Rotary, TiedHead, load_named_weights
from flover.ops import fused, layer_cpu
from flover.ops.attention import AttentionMetadata, attend


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.h, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.qkv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = self.d ** -0.5

    def forward(self, x, norm: RMSNorm, rotary: Rotary, meta: AttentionMetadata, k_cache,
                v_cache):
        """x + o_proj(attention(qkv_proj(norm(x)))) as `fused.linear_add`'s pair (the sum and
        None, or the product and x, whose add the next norm does); each fused op falls back
        to its reference."""
        t = x.shape[0]
        qkv, _ = fused.norm_linear(x, norm, self.qkv_proj)
        q, k, v = qkv.split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], -1)
        q = fused.rotary_write_kv(q.view(t, self.h, self.d), k.view(t, self.hkv, self.d),
                                  v.view(t, self.hkv, self.d), rotary, k_cache, v_cache, meta)
        out = attend(q, k_cache, v_cache, meta, self.scale)
        return fused.linear_add(out.view(t, self.h * self.d), self.o_proj, x)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, a, norm: RMSNorm, x):
        """The residual stream after the layer: s + down(silu_mul(gate_up(norm(s)))), where
        s = a + x (a: the attention's output; x None: a is s already)."""
        act, s = fused.norm_linear(a, norm, self.gate_up_proj, residual=x, gated=True)
        return fused.linear_residual(act, self.down_proj, s)


class LlamaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, rotary, meta, k_cache, v_cache):
        a, pending = self.self_attn(x, self.input_layernorm, rotary, meta, k_cache, v_cache)
        return self.mlp(a, self.post_attention_layernorm, pending)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.max_position, cfg.rope_theta, interleaved=False)


class LlamaForCausalLM(nn.Module):
    """forward(ids [T], meta, kv) -> hidden [T, hidden]; logits(hidden [N, hidden]) -> [N, vocab]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = (TiedHead(self.model.embed_tokens) if cfg.tie_word_embeddings
                        else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False))

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                k_caches: torch.Tensor, v_caches: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.embed_tokens(input_ids)
        prep = layer_cpu.prepare(x, meta, k_caches, v_caches)  # decode rows on the CPU
        for i, layer in enumerate(m.layers):
            y = None if prep is None else layer_cpu.decode_layer(
                layer, x, m.rotary, prep, k_caches[i], v_caches[i])
            x = layer(x, m.rotary, meta, k_caches[i], v_caches[i]) if y is None else y
        return fused.rms_norm(x, m.norm)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def norm_products(self) -> list[tuple[RMSNorm, nn.Module]]:
        """Each RMSNorm with the one product that reads its output (`fold_norms`)."""
        return [pair for layer in self.model.layers
                for pair in ((layer.input_layernorm, layer.self_attn.qkv_proj),
                             (layer.post_attention_layernorm, layer.mlp.gate_up_proj))]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        c = self.cfg
        stacked = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                   "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
        sizes = {"qkv_proj": [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                              c.num_kv_heads * c.head_dim],
                 "gate_up_proj": [c.intermediate_size, c.intermediate_size]}
        if c.tie_word_embeddings:
            weights = ((n, t) for n, t in weights if n != "lm_head.weight")
        load_named_weights(self, weights, stacked, sizes)

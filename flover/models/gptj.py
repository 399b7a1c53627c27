"""GPT-J: one LayerNorm feeding attention and MLP in parallel, partial interleaved rotary.

Same fused-batch interface as `flover.models.llama`; names follow Hugging Face's GPT-J,
with q/k/v stacked into one matrix.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from flover.models.config import ModelConfig
from flover.models.layers import Rotary, load_named_weights
from flover.ops import fused
from flover.ops.attention import AttentionMetadata, attention


class GPTJAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.h, self.d = cfg.num_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.scale = self.d ** -0.5

    def forward(self, x, rotary: Rotary, meta: AttentionMetadata, k_cache, v_cache):
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).view(t, 3, self.h, self.d).unbind(1)
        q, k = fused.rotary(q, meta.positions, rotary), fused.rotary(k, meta.positions, rotary)
        out = attention(q, k, v, k_cache, v_cache, meta, self.scale)
        return self.out_proj(out.reshape(t, self.h * self.d))


class GPTJMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class GPTJBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = GPTJAttention(cfg)
        self.mlp = GPTJMLP(cfg)

    def forward(self, x, rotary, meta, k_cache, v_cache):
        h = self.ln_1(x)
        return x + self.attn(h, rotary, meta, k_cache, v_cache) + self.mlp(h)


class GPTJForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.transformer.h = nn.ModuleList(GPTJBlock(cfg) for _ in range(cfg.num_layers))
        self.transformer.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.rotary = Rotary(cfg.rot_dim, cfg.max_position, 10000.0, interleaved=True)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                k_caches: torch.Tensor, v_caches: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        x = t.wte(input_ids)
        for i, block in enumerate(t.h):
            x = block(x, self.rotary, meta, k_caches[i], v_caches[i])
        return t.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        h = self.cfg.hidden_size
        stacked = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}
        load_named_weights(self, weights, stacked, {"qkv_proj": [h, h, h]})

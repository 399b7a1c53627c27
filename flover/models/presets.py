"""Named model shapes with random weights, for benchmarks where no checkpoint exists."""

from __future__ import annotations

from flover.models.config import ModelConfig, ModelFormatError


def _llama(hidden, inter, layers, heads, kv_heads=None, vocab=32000, max_pos=2048):
    return ModelConfig(arch="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads or heads,
                       head_dim=hidden // heads, max_position=max_pos, norm_eps=1e-6,
                       bos_token_id=1, eos_token_ids=[2])


def _gptj(hidden, layers, heads, rotary_dim, vocab=50400, max_pos=2048):
    return ModelConfig(arch="gptj", vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=4 * hidden, num_layers=layers, num_heads=heads,
                       num_kv_heads=heads, head_dim=hidden // heads, max_position=max_pos,
                       rotary_dim=rotary_dim, norm_eps=1e-5, bos_token_id=50256,
                       eos_token_ids=[50256])


PRESETS: dict[str, ModelConfig] = {
    "llama_7b": _llama(4096, 11008, 32, 32),
    "llama_13b": _llama(5120, 13824, 40, 40),
    "llama_33b": _llama(6656, 17920, 60, 52),
    "llama_65b": _llama(8192, 22016, 80, 64),
    "gptj_6b": _gptj(4096, 28, 16, 64),
    # tiny shapes for tests and CPU demos
    "tiny_llama": _llama(64, 128, 2, 4, kv_heads=2, vocab=256, max_pos=512),
    "tiny_gptj": _gptj(64, 2, 4, 8, vocab=256, max_pos=512),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ModelFormatError(f"unknown model {name!r}: expected a preset ({', '.join(PRESETS)}), "
                               "a Hugging Face checkpoint directory or a .gguf file")
    return PRESETS[name]

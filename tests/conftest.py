"""Shared fixtures: tiny random checkpoints saved by transformers, loaded through flover."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on the CPU; triton reads this when first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

transformers = pytest.importorskip("transformers")

VOCAB = 128


def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """LLaMA with grouped-query attention (4 query heads over 2 KV heads), untied head."""
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return _save(model, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def llama_tied_dir(tmp_path_factory):
    """LLaMA with tied embeddings, 1 KV head (multi-query) and rope_theta 1e5."""
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=1, max_position_embeddings=256,
        rope_theta=100000.0, tie_word_embeddings=True, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return _save(model, tmp_path_factory.mktemp("llama_tied"))


@pytest.fixture(scope="session")
def gptj_dir(tmp_path_factory):
    cfg = transformers.GPTJConfig(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(2)
    model = transformers.GPTJForCausalLM(cfg).eval()
    return _save(model, tmp_path_factory.mktemp("gptj"))


@pytest.fixture(scope="session", params=["llama", "llama_tied", "gptj"])
def checkpoint(request, llama_dir, llama_tied_dir, gptj_dir):
    return {"llama": llama_dir, "llama_tied": llama_tied_dir, "gptj": gptj_dir}[request.param]


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    """transformers' own greedy generate, EOS ignored: the reference tokens."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                             min_new_tokens=max_new, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(n: int, seed: int = 0, low: int = 3, high: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(low, high, (n,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in lens]


def _byte_of(i: int) -> int:
    """The byte token i stands for: printable ASCII, UTF-8 continuation bytes, lead bytes."""
    if i < 64:
        return 32 + i
    if i < 120:
        return 0x80 + (i - 64)
    return [0xC3, 0xC5, 0xCE, 0xD0, 0xE2, 0xE3, 0xE4, 0xF0][i - 120]


@pytest.fixture(scope="session")
def byte_tokenizer():
    """A byte-level tokenizer for the tiny models' 128 ids: random tokens make real UTF-8
    pieces, split multi-byte characters and invalid bytes, as a model's output can."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from flover.tokenizer import Tokenizer, unicode_to_bytes

    char = {b: c for c, b in unicode_to_bytes().items()}  # GPT-2's bytes_to_unicode
    order = [_byte_of(i) for i in range(VOCAB)]
    order += [b for b in range(256) if b not in order]
    tok = HFTokenizer(models.BPE(vocab={char[b]: i for i, b in enumerate(order)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return Tokenizer(tok, eos_token_ids=[2], bos_token_id=1, chat_template=None)

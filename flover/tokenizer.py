"""Text <-> token ids, and chat templates, over the `tokenizers` library.

Built from a Hugging Face `tokenizer.json` or from the vocabulary inside a GGUF file.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# llama.cpp's pre-tokenizer names for GPT-2-style BPE vocabularies, as `tokenizers` steps.
_PRE_TOKENIZERS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
}


@functools.cache
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: printable characters stand for themselves,
    the other bytes (controls, space, ...) for the characters from U+0100 on, in order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    return table


class Tokenizer:
    def __init__(self, tok: HFTokenizer, eos_token_ids: list[int], bos_token_id: int | None,
                 chat_template: str | None, add_bos: bool = False) -> None:
        self.tok = tok
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        self.add_bos = add_bos
        self._compiled = None  # the chat template, compiled at first use

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None \
                and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        bos = self.token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.token(self.eos_token_ids[0]) if self.eos_token_ids else ""
        return self._template().render(messages=messages, add_generation_prompt=add_generation_prompt,
                                       bos_token=bos, eos_token=eos)

    def _template(self):
        """The chat template compiled once (compiling costs more than rendering), sandboxed."""
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template; use generate() "
                             "with plain prompts")
        if getattr(self, "_compiled", None) is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg: str):
                raise ValueError(f"chat template: {msg}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._compiled = env.from_string(self.chat_template)
        return self._compiled

    def save_hf(self, path: Path) -> None:
        """Write tokenizer.json and tokenizer_config.json, as from_hf_dir reads them back."""
        self.tok.save(str(path / "tokenizer.json"))
        conf = {"chat_template": self.chat_template, "add_bos_token": self.add_bos,
                "bos_token": self.token(self.bos_token_id) if self.bos_token_id is not None else None,
                "eos_token": self.token(self.eos_token_ids[0]) if self.eos_token_ids else None}
        (path / "tokenizer_config.json").write_text(json.dumps(conf, indent=1))

    # --- constructors ----------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: Path, cfg) -> Tokenizer | None:
        tj = path / "tokenizer.json"
        if not tj.is_file():
            return None
        tok = HFTokenizer.from_file(str(tj))
        tc_file = path / "tokenizer_config.json"
        tc = json.loads(tc_file.read_text()) if tc_file.is_file() else {}
        template = tc.get("chat_template")
        jinja = path / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text()

        def tid(key: str) -> int | None:
            t = tc.get(key)
            t = t.get("content") if isinstance(t, dict) else t
            return tok.token_to_id(t) if t else None

        eos = list(cfg.eos_token_ids) or [i for i in [tid("eos_token")] if i is not None]
        bos = cfg.bos_token_id if cfg.bos_token_id is not None else tid("bos_token")
        return cls(tok, eos, bos, template, add_bos=bool(tc.get("add_bos_token", False))
                   and tok.post_processor is None)

    @classmethod
    def from_gguf(cls, reader, cfg) -> Tokenizer:
        def field(key, default=None):
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        kind = field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer.ggml.model={kind!r}: only 'gpt2' (BPE) is supported")
        tokens = field("tokenizer.ggml.tokens")
        types = field("tokenizer.ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
        pre = field("tokenizer.ggml.pre", "default")
        if pre not in _PRE_TOKENIZERS:
            raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r}: expected one of "
                             f"{sorted(_PRE_TOKENIZERS)}")
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
        tok.decoder = decoders.ByteLevel()
        # control (3) and user-defined (4) tokens are matched whole, never split by BPE
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types, strict=True) if ty == 3])
        tok.add_tokens([AddedToken(t, normalized=False)
                        for t, ty in zip(tokens, types, strict=True) if ty == 4])
        eos = field("tokenizer.ggml.eos_token_id")
        eos_ids = list(cfg.eos_token_ids) or ([] if eos is None else [int(eos)])
        return cls(tok, eos_ids, field("tokenizer.ggml.bos_token_id"),
                   field("tokenizer.chat_template"),
                   add_bos=bool(field("tokenizer.ggml.add_bos_token", False)))


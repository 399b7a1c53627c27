"""Tokens as the API shows them: a token's text, and the raw bytes it stands for.

Chat logprobs carry each token's `bytes` so that a client can rebuild characters whose UTF-8
is split over several tokens. Decoding such a token alone gives U+FFFD, whose UTF-8 is no
use, so the bytes come from the vocabulary itself: a byte-level BPE vocabulary (GPT-2 style:
SmolLM2, Llama 3, ...) writes each byte as one printable character (GPT-2's `bytes_to_unicode`
table), and a byte-fallback vocabulary (SentencePiece style) has tokens `<0xNN>` for single
bytes. For any other token the UTF-8 of its decoded text is the best we have.
"""

from __future__ import annotations

import json
import re

from flover.tokenizer import Tokenizer, unicode_to_bytes

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _has_decoder(state: dict, kind: str) -> bool:
    """Whether a decoder (as `tokenizers` serialises it) is, or contains, one of type `kind`."""
    if state.get("type") == kind:
        return True
    return any(_has_decoder(d, kind) for d in state.get("decoders") or [])


class TokenView:
    """One tokenizer's tokens as text and as bytes; None: a model without a tokenizer, whose
    tokens show as `token_id:N` (and their bytes as that text's)."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.byte_level = self.byte_fallback = False
        self._added: dict[int, str] = {}
        if tokenizer is None:
            return
        hf = tokenizer.tok
        if hf.decoder is not None:
            self.byte_level = _has_decoder(json.loads(hf.decoder.__getstate__()), "ByteLevel")
        self.byte_fallback = bool(getattr(hf.model, "byte_fallback", False))
        # added tokens (<|im_end|>, ...) are stored as plain text, not in the byte alphabet
        self._added = {i: t.content for i, t in hf.get_added_tokens_decoder().items()}

    def text(self, token_id: int) -> str:
        """The token decoded alone (special tokens included): what `token` fields show."""
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def bytes(self, token_id: int) -> list[int]:
        """The raw bytes the token stands for; concatenated over a sequence, they are its UTF-8."""
        tok = self.tokenizer
        if tok is not None and token_id not in self._added:
            piece = tok.token(token_id)
            if piece is not None:
                if self.byte_level:
                    table = unicode_to_bytes()
                    if all(ch in table for ch in piece):
                        return [table[ch] for ch in piece]
                elif self.byte_fallback and (m := _BYTE_TOKEN.fullmatch(piece)):
                    return [int(m.group(1), 16)]
        return list(self.text(token_id).encode())

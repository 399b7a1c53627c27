"""Text of a growing token sequence, and stop strings, at a cost per step that does not grow with it.

Decoding a row's whole output at every step costs host time proportional to its length
(~0.3 ms per row at 2,000 tokens). `IncrementalDetokenizer` instead decodes a short window
of the latest tokens, the prefix/read offset method of vLLM's `detokenize_incrementally`:

    ids:  ... | prefix ......... read ............ end
                 [ already emitted ][ held back ]

`decode(ids[prefix:])` is compared with what `decode(ids[prefix:read])` gave; the difference
becomes final once it does not end in "\\ufffd" (byte-level BPE splits one character's UTF-8
bytes over several tokens, and a decoder shows the unfinished tail as U+FFFD). The window
starts one emission back rather than at `read` because some decoders (SentencePiece's
Metaspace) decode a sequence's first token differently; the extra context keeps the window's
text consistent with the whole sequence's.

Only `tokenizer.decode(ids, skip_special_tokens=...)` is used, so any decoder works. For
byte-level decoders (GPT-2 style, SmolLM2, Llama 3) the result is exact: the concatenated
pieces equal `decode(all ids)`, and no intermediate text holds a replacement character that the
final text does not hold at the same place.

Nothing else grows with the length either: ids and text are kept as immutable chunks shared
by copies plus a short mutable tail (`self.text += piece` would copy the whole text at every
step: ~5 us at 14,000 ASCII characters, ~100 us once one emoji makes the string 4 bytes per
character). `text` joins them when read; `tail(k)` and `text_len` do not.

`StopChecker` finds stop strings in the new part of that text, looking back only as far as
a stop string can reach, and tells a streamer how much of the text's tail to hold back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_FFFD = "\ufffd"

# Held-back tokens after which a cut inside the held part is tried (see `_cut`). A byte-level
# character is at most 4 bytes, so a longer held run means tokens that straddle characters
# (CJK in some vocabularies), a literal U+FFFD repeated, or tokens that decode to nothing.
_MAX_HELD = 4
# Ids before the window move into an immutable chunk shared by copies, this many at a time.
_FREEZE = 256
# Text pieces are joined into an immutable chunk shared by copies, this many at a time.
_PIECES = 32


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """The text of one sequence, built token by token; decode windows stay a few tokens long.

    `text` is the text made final so far (a prefix of the final decode); `append` returns what
    each call added to it and `flush` the held-back rest at the end of the sequence, so that
    `"".join(pieces) + flush() == tokenizer.decode(all ids)`. Per call, `append` decodes one or
    two windows of a few tokens and costs the same at token 10 and token 100,000.
    """

    __slots__ = ("tokenizer", "skip_special_tokens", "_frozen", "_nfrozen", "_live",
                 "_prefix", "_read", "_done", "_next_cut", "_chunks", "_pieces", "_ntext", "_cache")

    def __init__(self, tokenizer: _Decoder, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # text is (joined chunks, shared and never mutated) + _pieces; _cache: text when read
        self._chunks: tuple | None = None  # (parent node, str) or None
        self._pieces: list[str] = []
        self._ntext = 0
        self._cache: str | None = ""
        # ids are (frozen chunks, shared and never mutated) + _live; copies share the chunks
        self._frozen: tuple | None = None  # (parent node, tuple of ids) or None
        self._nfrozen = 0
        self._live: list[int] = []
        # window offsets into _live: text of _live[_prefix:] up to char _done is already in text
        self._prefix = 0
        self._read = 0
        self._done = 0
        self._next_cut = _MAX_HELD  # held count at which `_cut` is next tried

    # --- reading ------------------------------------------------------------------------------

    @property
    def token_ids(self) -> list[int]:
        """Every id appended so far (a new list: O(length), for callers that need them all)."""
        chunks = []
        node = self._frozen
        while node is not None:
            node, ids = node
            chunks.append(ids)
        out: list[int] = []
        for ids in reversed(chunks):
            out.extend(ids)
        out.extend(self._live)
        return out

    def __len__(self) -> int:
        return self._nfrozen + len(self._live)

    @property
    def text(self) -> str:
        """The final text so far: O(length) to join after appends, then cached until the next."""
        if self._cache is None:
            parts = list(reversed(self._pieces))
            node = self._chunks
            while node is not None:
                node, chunk = node
                parts.append(chunk)
            self._cache = "".join(reversed(parts))
            if self._cache:  # one chunk from now on: the next join copies it once, not n pieces
                self._chunks, self._pieces = (None, self._cache), []
        return self._cache

    @property
    def text_len(self) -> int:
        """len(text), without joining it."""
        return self._ntext

    def tail(self, k: int) -> str:
        """The last k characters of text (all of it if shorter), in O(k) without joining it."""
        if k <= 0:
            return ""
        if self._cache is not None:
            return self._cache[-k:]
        parts, n = [], 0
        for piece in reversed(self._pieces):
            parts.append(piece)
            n += len(piece)
            if n >= k:
                return "".join(reversed(parts))[-k:]
        node = self._chunks
        while node is not None and n < k:
            node, chunk = node
            parts.append(chunk[-(k - n):])
            n += len(parts[-1])
        return "".join(reversed(parts))[-k:]

    def _emit(self, piece: str) -> None:
        self._pieces.append(piece)
        self._ntext += len(piece)
        self._cache = None
        if len(self._pieces) >= _PIECES:
            self._chunks = (self._chunks, "".join(self._pieces))
            self._pieces = []

    @property
    def num_held(self) -> int:
        """Tokens whose text is not final yet (the tail of an unfinished character)."""
        return len(self._live) - self._read

    # --- building -----------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the text they made final ("" while a character is unfinished)."""
        if not token_ids:
            return ""
        live = self._live
        live.extend(token_ids)
        window = self._decode(live[self._prefix:])
        if not window.endswith(_FFFD):
            piece = window[self._done:]
            if piece or len(live) - self._prefix > 2 * _MAX_HELD:
                self._advance(len(live))
            else:  # nothing new (a skipped special token): widen the window instead of decoding
                self._read, self._done = len(live), len(window)
                self._next_cut = _MAX_HELD
        else:
            piece = ""
            if len(live) - self._read >= self._next_cut:
                piece = self._cut(window)
        if piece:
            self._emit(piece)
        return piece

    def _advance(self, end: int) -> None:
        """Everything up to `end` is final: the next window starts where the last one was read."""
        self._prefix, self._read = self._read, end
        self._done = len(self._decode(self._live[self._prefix:end]))
        self._next_cut = _MAX_HELD
        if self._prefix >= _FREEZE:
            self._freeze()

    def _cut(self, window: str) -> str:
        """Make the held run's finished part final, so the window stays short.

        Every token boundary in the held run has so far ended in "\\ufffd", so none is a
        clean place to restart. A boundary `t` is still usable if decoding the two sides
        separately explains the whole window: left = A + "\\ufffd" (the unit cut in two, or a
        real U+FFFD), window = A + u + rest, right = "\\ufffd" * j + rest, with `rest`
        non-empty (so the cut unit u is closed). Then A + u is final, and the next window
        starts at `t` with its first j characters (the cut unit's orphaned tail bytes, one
        U+FFFD each under UTF-8 lossy decoding) counted as already emitted. Decoders for which
        no boundary checks out keep holding, exactly but with a longer window.
        """
        live, done = self._live, self._done
        for t in range(len(live) - 1, self._read, -1):
            left = self._decode(live[self._prefix:t])
            right = self._decode(live[t:])
            if not left.endswith(_FFFD):  # a clean boundary a multi-token append skipped over
                if len(left) >= done and window == left + right:
                    piece = left[done:]
                    self._advance(t)
                    return piece
                continue
            a = len(left) - 1
            rest = window[a + 1:]
            j = len(right) - len(rest)
            if (a >= done and rest and j >= 0 and window.startswith(left[:-1])
                    and right.endswith(rest) and right[:j] == _FFFD * j):
                piece = window[done:a + 1]
                self._prefix = self._read = t
                self._done = j
                self._next_cut = _MAX_HELD
                if self._prefix >= _FREEZE:
                    self._freeze()
                return piece
        self._next_cut = len(live) - self._read + _MAX_HELD  # back off: retry when it has grown
        return ""

    def _freeze(self) -> None:
        """Move the ids before the window into a shared immutable chunk (amortised O(1))."""
        p = self._prefix
        self._frozen = (self._frozen, tuple(self._live[:p]))
        self._nfrozen += p
        self._live = self._live[p:]
        self._prefix, self._read = 0, self._read - p

    def flush(self) -> str:
        """End of the sequence: emit the held-back text, so `text == decode(all ids)`.

        An unfinished character at the end shows as "\\ufffd", as in a whole decode. Appending
        after a flush works, but a character that the flush cut off stays cut.
        """
        if self._read == len(self._live):
            return ""
        window = self._decode(self._live[self._prefix:])
        piece = window[self._done:]
        self._advance(len(self._live))
        if piece:
            self._emit(piece)
        return piece

    def copy(self) -> IncrementalDetokenizer:
        """An independent copy (a beam continuing another beam); O(window), not O(length)."""
        new = IncrementalDetokenizer.__new__(IncrementalDetokenizer)
        new.tokenizer, new.skip_special_tokens = self.tokenizer, self.skip_special_tokens
        new._frozen, new._nfrozen = self._frozen, self._nfrozen  # immutable chunks: shared
        new._live = list(self._live)  # fewer than _FREEZE + window ids
        new._chunks, new._ntext, new._cache = self._chunks, self._ntext, self._cache
        new._pieces = list(self._pieces)  # fewer than _PIECES strings
        new._prefix, new._read, new._done = self._prefix, self._read, self._done
        new._next_cut = self._next_cut
        return new


class StopChecker:
    """Finds a request's stop strings in its growing text, scanning only the new part.

    An occurrence is new if it ends after the first `checked` characters; it can start at most
    `max_len - 1` characters before them, so each call reads the new text plus that much.
    """

    __slots__ = ("stops", "max_len", "_prefixes", "_ends")

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = list(dict.fromkeys(stops))
        self.max_len = max((len(s) for s in self.stops), default=0)
        # proper prefixes of the stop strings: text ending in one may still grow into a stop
        self._prefixes = {s[:k] for s in self.stops for k in range(1, len(s))}
        self._ends = {p[-1] for p in self._prefixes}  # most texts end in none of these: no loop

    def find(self, text: str, checked: int = 0) -> int | None:
        """Where `text` must end: the start of the first stop string ending past `checked`.

        None when no stop string ends in text[checked:]. The first occurrence wins across all
        stop strings (the one that starts earliest), as if the whole text had been searched.
        """
        m = self.match(text, checked)
        return None if m is None else m[0]

    def match(self, text: str, checked: int = 0) -> tuple[int, str] | None:
        """As `find`, with the stop string that matched (the longest one at that start)."""
        best: tuple[int, str] | None = None
        for s in self.stops:
            i = text.find(s, max(0, checked - len(s) + 1))
            if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
                best = (i, s)
        return best

    def find_in(self, detok: IncrementalDetokenizer, new: int) -> int | None:
        """`find` on a detokenizer's text whose last `new` characters are unchecked, reading
        only its tail: the cut as an index into `detok.text`, or None."""
        window = detok.tail(new + self.max_len - 1)
        i = self.find(window, len(window) - new)
        return None if i is None else detok.text_len - len(window) + i

    def held_back(self, text: str) -> int:
        """How many trailing characters of `text` could be the start of a stop string.

        A streamer sends text[:len(text) - held_back(text)] and keeps the rest until the next
        step shows whether a stop string completes there. At most max_len - 1 characters, so
        `held_back(detok.tail(max_len - 1))` gives the same answer without the whole text.
        """
        if not text or text[-1] not in self._ends:
            return 0
        for k in range(min(self.max_len - 1, len(text)), 0, -1):
            if text[-k:] in self._prefixes:
                return k
        return 0

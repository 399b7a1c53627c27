"""Incremental detokenization and stop strings, each held equal to a whole-text reference.

The reference for text is `tokenizer.decode(all ids)`; for stop strings, searching the whole
text so far. Token sequences come from the embedded model's vocabulary (SmolLM2, byte-level
BPE) and from a tiny byte-level tokenizer built here, whose single-byte tokens split every
multi-byte character and whose crafted tokens straddle characters.
"""

from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from flover.engine.detokenizer import IncrementalDetokenizer, StopChecker
from flover.tokenizer import Tokenizer
from flover.weights import convert_gguf, default_model_path, hf_config

MULTILINGUAL = [
    "日本語の文章を書きます。これは長いテストです。中文文本测试，我们看看分词的结果。",
    "🚀🚀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 emoji, mixed with text 🎉!",
    "café naïve Ελληνικά Русский עברית العربية हिन्दी ไทย 한국어",
    "Hello world, the answer is 42.\n\n\n\nMore text after four newlines.",
]


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    """The embedded model's tokenizer, from its converted checkpoint (~/.cache/flover)."""
    path = convert_gguf(default_model_path())
    tok = Tokenizer.from_hf_dir(path, hf_config(path))
    assert tok is not None and tok.vocab_size == 49152
    return tok


def _byte_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to the printable characters byte-level BPE vocabularies use."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


BYTE = _byte_unicode()
# crafted multi-byte tokens of the tiny tokenizer (ids 256...): they straddle characters
E6_97, XF_E6_97 = "旗".encode()[:2], "旗".encode()[2:] + "旗".encode()[:2]
FFFD_BYTES = "\ufffd".encode()
EXTRA = [E6_97, XF_E6_97, FFFD_BYTES]


class ByteTokenizer:
    """A tiny byte-level BPE tokenizer: id b < 256 is byte b; then EXTRA; then specials."""

    def __init__(self) -> None:
        vocab = {BYTE[b]: b for b in range(256)}
        for i, bs in enumerate(EXTRA):
            vocab["".join(BYTE[b] for b in bs)] = 256 + i
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
        self.tok = tok
        self.bos, self.eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def tiny() -> ByteTokenizer:
    return ByteTokenizer()


class Recording:
    """Wraps a tokenizer and records the length of every window passed to decode."""

    def __init__(self, tok) -> None:
        self.tok, self.lengths = tok, []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def check_stream(tok, ids: list[int], skip: bool, rng: random.Random | None = None,
                 clean: bool = False) -> IncrementalDetokenizer:
    """Feed ids (in random chunks if rng) and check the invariant at every step.

    clean: the text is valid UTF-8, so no intermediate text may hold a replacement character.
    """
    final = tok.decode(ids, skip_special_tokens=skip)
    d = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces, i = [], 0
    while i < len(ids):
        k = rng.choice([1, 1, 1, 2, 3, 5]) if rng else 1
        before = d.text
        piece = d.append(ids[i:i + k])
        i += k
        assert d.text == before + piece
        assert final.startswith(d.text), (ids[:i], d.text, final)
        if clean:
            assert "\ufffd" not in d.text
        pieces.append(piece)
    pieces.append(d.flush())
    assert "".join(pieces) == final
    assert d.text == final
    assert d.token_ids == ids and len(d) == len(ids)
    assert d.flush() == "" and d.text == final
    return d


# --- the invariant ------------------------------------------------------------------------------

def check_random_streams(tok, seed: int, streams: int, longest: int, draw, skip: bool) -> None:
    """`streams` sequences of 1..longest ids, each id from draw(rng), through check_stream."""
    rng = random.Random(seed)
    for _ in range(streams):
        ids = [draw(rng) for _ in range(rng.randrange(1, longest))]
        check_stream(tok, ids, skip, rng if rng.random() < 0.5 else None)


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_from_the_embedded_vocabulary(smol, skip):
    check_random_streams(smol, 1 + skip, 60, 120, lambda rng: rng.randrange(smol.vocab_size), skip)


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_rich_in_partial_characters(smol, skip):
    """Byte fragments (tokens that alone decode to U+FFFD) and special tokens, mixed in."""
    frag = [i for i in range(smol.vocab_size) if "\ufffd" in smol.decode([i])]
    special = list(range(17))  # <|endoftext|>, <|im_start|>, <|im_end|>, ...
    assert len(frag) > 100 and smol.decode(special) == ""
    check_random_streams(smol, 3 + skip, 60, 150, lambda rng: (
        rng.choice(frag) if rng.random() < 0.6 else
        rng.choice(special) if rng.random() < 0.1 else rng.randrange(smol.vocab_size)), skip)


@pytest.mark.parametrize("skip", [True, False])
def test_random_bytes_and_specials_of_the_tiny_tokenizer(tiny, skip):
    check_random_streams(tiny, 5 + skip, 100, 100, lambda rng: rng.randrange(tiny.vocab_size), skip)


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_multilingual_text_never_shows_a_partial_character(smol, tiny, text):
    for tok in (smol, tiny):  # tiny: one token per byte, every multi-byte character split
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        d = check_stream(tok, ids, True, clean=True)
        assert d.text == text


def test_tiny_tokenizer_splits_characters(tiny):
    ids = tiny.encode("旗🚀")
    assert ids == list("旗🚀".encode())
    assert tiny.decode(ids[:1]) == "\ufffd" and tiny.decode(ids[:4]) == "旗\ufffd"


def test_a_character_split_by_a_special_token(tiny):
    """Skipped specials vanish before the bytes are joined; kept ones cut the character."""
    ids = [*"😀".encode()[:1], tiny.eos, *"😀".encode()[1:]]
    assert check_stream(tiny, ids, True).text == "😀"
    assert check_stream(tiny, ids, False).text == "\ufffd</s>\ufffd\ufffd\ufffd"


def test_held_back_text_appears_once_the_character_completes(tiny):
    d = IncrementalDetokenizer(tiny)
    emoji = list("🚀".encode())
    assert [d.append([b]) for b in emoji] == ["", "", "", "🚀"]
    assert d.append([ord("a")]) == "a" and d.text == "🚀a"
    assert d.append(emoji[:2]) == "" and d.num_held == 2
    assert d.flush() == "\ufffd" and d.text == tiny.decode([*emoji, ord("a"), *emoji[:2]])


def test_invalid_bytes_are_final_once_followed(tiny):
    """A lone continuation byte is U+FFFD for good: it is emitted with the next character."""
    d = IncrementalDetokenizer(tiny)
    assert d.append([0x80]) == ""
    assert d.append([ord("x")]) == "\ufffdx"


# --- windows stay short -------------------------------------------------------------------------

def test_decode_windows_stay_short_over_2000_random_tokens(smol):
    rng = random.Random(7)
    ids = [rng.randrange(smol.vocab_size) for _ in range(2000)]
    for skip in (True, False):
        rec = Recording(smol)
        d = IncrementalDetokenizer(rec, skip_special_tokens=skip)
        for t in ids:
            d.append([t])
        assert max(rec.lengths) <= 16, max(rec.lengths)
        assert len(rec.lengths) <= 3 * len(ids)
        assert d.text + d.flush() == smol.decode(ids, skip_special_tokens=skip)


def test_decode_windows_stay_short_over_long_multilingual_text(smol):
    ids = smol.encode(" ".join(MULTILINGUAL) * 20)
    rec = Recording(smol)
    d = IncrementalDetokenizer(rec)
    for t in ids:
        d.append([t])
    assert max(rec.lengths) <= 16
    assert d.text + d.flush() == smol.decode(ids)


@pytest.mark.parametrize("skip", [True, False])
def test_runs_of_special_tokens_keep_the_window_short(tiny, skip):
    """Skipped specials add no text: the window moves on instead of growing."""
    ids = [ord("a")] + [tiny.eos] * 200 + [ord("b")] + [tiny.bos, ord("c")] * 50
    rec = Recording(tiny)
    d = IncrementalDetokenizer(rec, skip_special_tokens=skip)
    for t in ids:
        d.append([t])
    assert max(rec.lengths) <= 16
    assert d.text + d.flush() == tiny.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("pattern", ["straddling", "replacement"])
def test_runs_without_a_clean_token_boundary_are_cut(tiny, pattern):
    """No token boundary ends a character (or every text ends in a real U+FFFD): the text
    still comes out as it goes, exactly, over a window of bounded length."""
    if pattern == "straddling":  # E6 97 | 8F E6 97 | 8F E6 97 | ... = 旗旗旗... split mid-character
        ids, char = [256] + [257] * 300, "旗"  # and a last E6 97 unfinished
    else:
        ids, char = [258] * 300, "\ufffd"
    rec = Recording(tiny)
    d = IncrementalDetokenizer(rec)
    grew = 0
    for t in ids:
        before = len(d.text)
        d.append([t])
        grew += len(d.text) > before
        assert d.num_held <= 5
    assert grew > 50  # text came out while streaming, not only at the flush
    assert max(rec.lengths) <= 16
    assert d.text + d.flush() == tiny.decode(ids)
    assert d.text == (char * 300 + "\ufffd" if pattern == "straddling" else char * 300)


# --- copies ---------------------------------------------------------------------------------------

def test_copies_are_independent(smol):
    rng = random.Random(11)
    base = smol.encode("Beams share a prefix: 日本語 🚀") + [rng.randrange(smol.vocab_size)
                                                           for _ in range(600)]
    base += list(smol.encode("🚀"))[:1]  # end mid-character: the held state is copied too
    d = IncrementalDetokenizer(smol)
    for t in base:
        d.append([t])
    text, held = d.text, d.num_held
    assert held > 0
    tails = [smol.encode("x🚀"), smol.encode("日本"), [rng.randrange(smol.vocab_size) for _ in range(400)]]
    copies = [d.copy() for _ in tails]
    for c, tail in zip(copies, tails, strict=True):
        for t in tail:
            c.append([t])
    assert d.text == text and d.num_held == held and d.token_ids == base  # the original is intact
    for c, tail in zip(copies, tails, strict=True):
        assert c.token_ids == base + tail
        assert c.text + c.flush() == smol.decode(base + tail)
    d.append(smol.encode("!"))
    assert d.text + d.flush() == smol.decode(base + smol.encode("!"))


def test_copy_cost_does_not_grow_with_length(smol):
    rng = random.Random(13)
    d = IncrementalDetokenizer(smol)
    for _ in range(3000):
        d.append([rng.randrange(smol.vocab_size)])
    c = d.copy()
    assert len(c._live) < 300 and len(c._pieces) < 32  # the rest is shared, immutable
    assert c._frozen is d._frozen and c._chunks is d._chunks and len(c) == len(d) == 3000


def test_copies_made_before_the_text_is_ever_read(smol):
    """Copies share unjoined chunks; appending to one never shows in another."""
    rng = random.Random(23)
    ids = [rng.randrange(smol.vocab_size) for _ in range(700)]
    d = IncrementalDetokenizer(smol)
    forks = []
    for i, t in enumerate(ids):
        d.append([t])
        if i % 100 == 50:
            forks.append((i + 1, d.copy()))
    for n, c in forks:
        tail = [rng.randrange(smol.vocab_size) for _ in range(rng.randrange(1, 90))]
        for t in tail:
            c.append([t])
        assert c.text + c.flush() == smol.decode(ids[:n] + tail)
    assert d.text + d.flush() == smol.decode(ids)


def test_tail_and_length_without_reading_the_text(smol):
    rng = random.Random(29)
    ids = [rng.randrange(smol.vocab_size) for _ in range(1500)] + smol.encode(" ".join(MULTILINGUAL))
    d = IncrementalDetokenizer(smol)
    for i, t in enumerate(ids):
        d.append([t])
        if i % 97 == 0:
            k = rng.randrange(0, 300)
            whole = smol.decode(ids[:i + 1])
            assert len(whole) - 100 <= d.text_len <= len(whole)  # a few held-back tokens at most
            want = whole[:d.text_len]
            assert d.tail(k) == (want[-k:] if k else "")
    assert d.text == smol.decode(ids)[:d.text_len] and d.tail(10 ** 6) == d.text


# --- stop strings --------------------------------------------------------------------------------

def reference_cut(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def test_stop_string_spanning_tokens(smol):
    text = "Hello world, the answer is 42.\n\n\n\nMore"
    stop = "answer is 42"
    checker = StopChecker([stop])
    d = IncrementalDetokenizer(smol)
    cut = None
    for t in smol.encode(text):
        piece = d.append([t])
        assert stop not in piece  # it is found across pieces, never inside one
        cut = checker.find_in(d, len(piece))
        assert cut == checker.find(d.text, d.text_len - len(piece))
        if cut is not None:
            break
    assert cut == text.index(stop) and d.text[:cut] == "Hello world, the "


def test_streaming_with_held_back_text_never_shows_a_stop_string(smol):
    """Send text up to what could start a stop string; at the cut, the sent text is the answer."""
    stops = ["\n\n\n\n", "More text", "xyz"]
    checker = StopChecker(stops)
    text = MULTILINGUAL[3]
    d = IncrementalDetokenizer(smol)
    sent = ""
    for t in smol.encode(text):
        piece = d.append([t])
        cut = checker.find_in(d, len(piece))
        if cut is not None:
            sent += d.text[len(sent):cut]
            break
        visible = d.text_len - checker.held_back(d.tail(checker.max_len - 1))
        assert visible >= len(sent)
        sent += d.text[len(sent):visible]
        assert not any(s in sent for s in stops)
    assert sent == text[:text.index("\n\n\n\n")]


def test_stop_string_at_the_very_start():
    checker = StopChecker(["ab"])
    assert checker.find("a", 0) is None
    assert checker.find("ab", 1) == 0
    assert checker.find("abxyz", 0) == 0


def test_first_occurrence_wins_across_stops():
    checker = StopChecker(["cde", "bcdx", "e"])
    # all three end in the new part "bcde..."; "bcdx" does not occur; "cde" starts first
    assert checker.find("abcdef", 1) == 2
    assert checker.match("abcdef", 1) == (2, "cde")
    # "e" ends after 'checked', "cde" too: the earlier start wins even though "e" is shorter
    assert checker.find("xxcde", 4) == 2
    # overlapping candidates from one stop: its first occurrence
    assert StopChecker(["aa"]).find("aaaa", 0) == 0
    # a stop that ended inside the checked part is not reported again
    assert StopChecker(["ab"]).find("abxx", 3) is None


def test_incremental_stops_match_a_whole_text_search():
    """Random texts in random pieces: the first cut equals the whole-text search at that step."""
    rng = random.Random(17)
    for _ in range(500):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randrange(1, 5)))
                 for _ in range(rng.randrange(1, 4))]
        checker = StopChecker(stops)
        text = ""
        for _ in range(30):
            piece = "".join(rng.choice("abc") for _ in range(rng.randrange(0, 4)))
            text += piece
            got = checker.find(text, len(text) - len(piece))
            assert got == reference_cut(text, stops), (text, piece, stops)
            if got is not None:
                break


def test_held_back_length():
    checker = StopChecker(["\n\n\n\n", "END"])
    assert checker.held_back("abc") == 0
    assert checker.held_back("abc\n") == 1
    assert checker.held_back("abc\n\n\n") == 3
    assert checker.held_back("abcE") == 1
    assert checker.held_back("abcEN") == 2
    assert checker.held_back("ENDx") == 0
    assert checker.held_back("") == 0
    assert checker.held_back("N") == 0
    rng = random.Random(19)
    for _ in range(500):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randrange(1, 6)))
                 for _ in range(rng.randrange(1, 4))]
        text = "".join(rng.choice("ab") for _ in range(rng.randrange(0, 8)))
        want = max(k for k in range(len(text) + 1)
                   if k == 0 or any(s.startswith(text[-k:]) and k < len(s) for s in stops))
        assert StopChecker(stops).held_back(text) == want


def test_stop_scan_is_bounded_by_the_new_text():
    """Only text[checked - (max_len - 1):] is read: a long text costs nothing more."""

    class Spy(str):
        starts: list[int] = []

        def find(self, sub, start=0, *args):
            Spy.starts.append(start)
            return str.find(self, sub, start, *args)

    checker = StopChecker(["xyz", "q"])
    text = Spy("a" * 100_000 + "bxy")
    assert checker.find(text, 100_000) is None
    assert min(Spy.starts) == 100_000 - 2


def test_empty_stop_strings_are_refused():
    with pytest.raises(ValueError):
        StopChecker(["a", ""])
    assert StopChecker([]).find("anything", 0) is None and StopChecker([]).held_back("x") == 0

"""Byte-level BPE tokenizer: GPT-2's alphabet and pre-tokenization, our own merges, Hugging Face JSON on disk.

Token ids: id i < 256 is the single byte i; merge k (rank order) creates id 256 + k; special tokens come last
(`<|endoftext|>` = vocab_size - 1). Merge ranks therefore equal ids, exactly as tiktoken's `mergeable_ranks`.

Encoding splits text with the GPT-2 regex into chunks, then merges each chunk's bytes by lowest-rank pair first.
Natural text repeats a small set of chunks, so a bounded chunk -> ids cache turns most chunks into a dict hit.
Fast paths give exactly the same ids (see `encode_ordinary` and `pretokenize`): most prose skips the regex
altogether by splitting on spaces and looking whole words up in a second cache; other text is split by the
standard library's `re` (two to three times as fast as `regex`) with the pattern's classes spelled out, for
pure-ASCII text and for text within the Basic Multilingual Plane; only text with characters beyond it (emoji)
goes through `regex`.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from itertools import chain, islice
from typing import Callable, Iterable, Sequence

import regex

from tinygpt.common import EOT, TinyGPTError, atomic_open, require_file

# GPT-2's pre-tokenization regex, verbatim; llama.cpp's "gpt-2" pre-tokenizer splits text the same way.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same pattern for pure-ASCII text, where \p{L} is [A-Za-z] and \p{N} is [0-9]. Whitespace is spelled out
# because `re`'s \s also matches \x1c-\x1f, which `regex`'s \s (Unicode White_Space) does not.
_ASCII_SPACE = r"\t\n\x0b\x0c\r "
ASCII_PATTERN = (rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_ASCII_SPACE}A-Za-z0-9]+"""
                 rf"""|[{_ASCII_SPACE}]+(?![^{_ASCII_SPACE}])|[{_ASCII_SPACE}]+""")
# Splitting text at its spaces gives the same chunks as the GPT-2 pattern (each piece after a space encoded as
# " " + piece on its own) unless a space has whitespace before it and whitespace or the end of text after it:
# only then do the pattern's whitespace rules join that space to its left (e.g. "\n  x" -> "\n ", " x").
_SPACE_SPLIT_BREAKER = regex.compile(r"\s (?:\s|\Z)")
_BEYOND_BMP = re.compile("[\U00010000-\U0010ffff]")
CACHE_SIZE = 100_000  # entries per encode cache; a cache is emptied when full, which bounds memory


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are shifted to
    code points 256 and up, in byte order, so that every token is a visible string without spaces.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in mapping)
    for offset, b in enumerate(shifted):
        mapping[b] = chr(256 + offset)
    return dict(sorted(mapping.items()))


BYTE_TO_UNICODE: dict[int, str] = _bytes_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_UNICODE.items()}


@lru_cache(maxsize=None)
def compiled_pattern() -> regex.Pattern:
    return regex.compile(GPT2_PATTERN)


_ascii_pattern = re.compile(ASCII_PATTERN)


def _class_ranges(prop: str, text: str) -> str:
    """The characters of `text` that `regex` puts in class `prop`, as ranges for a `re` character class."""
    return "".join(f"\\u{m.start():04x}-\\u{m.end() - 1:04x}" for m in regex.finditer(prop + "+", text))


@lru_cache(maxsize=None)
def bmp_pattern() -> re.Pattern:
    """GPT2_PATTERN for `re`, for text without characters beyond U+FFFF (built on first use, in about 0.1 s).

    \\p{L}, \\p{N} and \\s are spelled out as the `regex` module reads them, so both agree on every such character
    whatever Unicode version each knows. `re` keeps such a class as a table with one lookup per character; with
    characters beyond U+FFFF in it, it would test range by range, slower than `regex`.
    """
    bmp = "".join(map(chr, range(0x10000)))
    letters, numbers, space = (_class_ranges(p, bmp) for p in (r"\p{L}", r"\p{N}", r"\s"))
    return re.compile(rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+| ?[^{space}{letters}{numbers}]+"""
                      rf"""|[{space}]+(?![^{space}])|[{space}]+""")


@lru_cache(maxsize=None)
def whitespace() -> frozenset[str]:
    """The characters `regex` (and so the GPT-2 pattern) calls \\s: Unicode White_Space (`re` adds \\x1c-\\x1f)."""
    return frozenset(regex.findall(r"\s", "".join(map(chr, range(0x10000)))))


def _cut_before(text: str, lo: int, hi: int) -> int:
    """The last position p in (lo, hi) where the pattern must split (see `pieces`), or lo if none is found.

    Only newlines and spaces after a character that is not whitespace are tried: a chunk with a non-whitespace
    character ends at the first whitespace after it, and the pattern has no look-behind.
    """
    space = whitespace()
    for separator in ("\n", " "):
        p = hi
        while (p := text.rfind(separator, lo + 1, p)) > lo:
            if text[p - 1] not in space:
                return p
    return lo


def _cut_after(text: str, lo: int) -> int:
    """The first position p >= lo where the pattern must split (a newline or space after a non-space), or the end."""
    space, best = whitespace(), len(text)
    for separator in ("\n", " "):
        p = lo - 1
        while 0 <= (p := text.find(separator, p + 1, best)):
            if p > 0 and text[p - 1] not in space:
                best = p
                break
    return best


def prepare_pretokenizer() -> None:
    """Build the patterns `pretokenize` builds on first use (call before forking workers, so they share them)."""
    bmp_pattern()
    whitespace()


def pretokenize(text: str) -> list[str]:
    """Split text into the chunks BPE works within (merges never cross a chunk boundary)."""
    if text.isascii():  # O(1) in CPython; `re` then gives regex's chunks in a third of the time
        return _ascii_pattern.findall(text)
    beyond = _BEYOND_BMP.search(text)
    if beyond is None:
        return bmp_pattern().findall(text)
    # Only the stretches around characters beyond U+FFFF (emoji, mostly) need `regex`: cut them out at points
    # where the pattern splits anyway, so that `re` still splits the rest.
    chunks: list[str] = []
    pos = 0
    while beyond is not None:
        start, end = _cut_before(text, pos, beyond.start()), _cut_after(text, beyond.end())
        chunks += bmp_pattern().findall(text, pos, start)
        chunks += compiled_pattern().findall(text, start, end)
        pos = end
        beyond = _BEYOND_BMP.search(text, pos)
    chunks += bmp_pattern().findall(text, pos)
    return chunks


def bytes_to_token_string(data: bytes) -> str:
    return "".join(BYTE_TO_UNICODE[b] for b in data)


def token_string_to_bytes(token: str) -> bytes:
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in token)
    except KeyError as e:
        raise TinyGPTError(f"token {token!r} has character {e.args[0]!r} outside GPT-2's byte alphabet; "
                           "only byte-level BPE tokenizers are supported") from None


class _BoundedCache(dict):
    """text -> ids; a miss calls `compute`. At most 2 * CACHE_SIZE entries: when full, the entries become the
    previous generation (and the one before is dropped); a miss looks there before computing, so what is still
    in use survives the turnover (varied text has more distinct chunks than one generation holds)."""

    def __init__(self, compute: Callable[[str], list[int]]) -> None:
        super().__init__()
        self._compute = compute
        self.previous: dict[str, list[int]] = {}

    def __missing__(self, key: str) -> list[int]:
        ids = self.previous.get(key)
        if ids is None:
            ids = self._compute(key)
        if len(self) >= CACHE_SIZE:
            self.previous = self.copy()
            self.clear()
        self[key] = ids
        return ids


class Tokenizer:
    """A byte-level BPE tokenizer defined by its merges (rank order) and its special tokens (appended last)."""

    def __init__(self, merges: Sequence[tuple[int, int]], specials: Sequence[str] = (EOT,),
                 eot_token: str = EOT) -> None:
        if eot_token not in specials:
            raise TinyGPTError(f"the special tokens {list(specials)} must include {eot_token}")
        self.merges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in merges]
        self.vocab: list[bytes] = [bytes([i]) for i in range(256)]
        for rank, (a, b) in enumerate(self.merges):
            new_id = 256 + rank
            if not (0 <= a < new_id and 0 <= b < new_id):
                raise TinyGPTError(f"merge {rank} ({a}, {b}) uses an id not defined before it")
            self.vocab.append(self.vocab[a] + self.vocab[b])
        first_special = len(self.vocab)
        self.special_tokens: dict[str, int] = {s: first_special + i for i, s in enumerate(specials)}
        self.vocab.extend(s.encode("utf-8") for s in specials)
        self.vocab_size: int = len(self.vocab)
        self.eot_id: int = self.special_tokens[eot_token]
        self._pair_rank: dict[int, int] = {a << 32 | b: rank for rank, (a, b) in enumerate(self.merges)}
        self._byte_pair_rank = [len(self.merges)] * 65536  # the same for pairs of bytes, as a table
        for rank, (a, b) in enumerate(self.merges):
            if a < 256 and b < 256:
                self._byte_pair_rank[a << 8 | b] = rank
        self._special_pattern = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")
        self._chunk_cache = _BoundedCache(self._encode_chunk)
        self._word_cache = _BoundedCache(self._encode_word)  # for the space-split fast path

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, eot_id={self.eot_id})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Tokenizer) and self.merges == other.merges
                and self.special_tokens == other.special_tokens)

    # ---- encoding -------------------------------------------------------------------------------------------

    def _merge_chunk(self, chunk: bytes) -> list[int]:
        """Apply merges to one chunk: repeatedly merge the leftmost occurrence of the lowest-ranked adjacent pair.

        (Merging one occurrence at a time equals merging all of a pair's occurrences left to right: pairs that
        hold the new id rank after it, so the next lowest pair is the pair's next occurrence, if any.)
        """
        ids = list(chunk)
        rank_of, missing, byte_pair_rank = self._pair_rank.get, len(self.merges), self._byte_pair_rank
        ranks = [byte_pair_rank[a << 8 | b] for a, b in zip(chunk, chunk[1:])]
        while ranks:
            rank = min(ranks)
            if rank == missing:
                break
            i = ranks.index(rank)
            new = 256 + rank
            ids[i:i + 2] = [new]
            del ranks[i]
            if i:
                ranks[i - 1] = rank_of(ids[i - 1] << 32 | new, missing)
            if i < len(ranks):
                ranks[i] = rank_of(new << 32 | ids[i + 1], missing)
        return ids

    def _encode_chunk(self, chunk: str) -> list[int]:
        return self._merge_chunk(chunk.encode("utf-8"))

    def _encode_word(self, word: str) -> list[int]:
        """Ids of " " + word, where word is text between two spaces of a text the space-split path may take."""
        return self._encode_chunks(" " + word)

    def _encode_chunks(self, text: str) -> list[int]:
        """The general path: pre-tokenize, then look each chunk up (unseen chunks go through BPE)."""
        # Cache hits run entirely in C (dict lookup, chain); only unseen chunks reach _BoundedCache.__missing__.
        return list(chain.from_iterable(map(self._chunk_cache.__getitem__, pretokenize(text))))

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text, treating special-token text like any other text."""
        if _SPACE_SPLIT_BREAKER.search(text):
            return self._encode_chunks(text)
        # Fast path: str.split and one dict hit per word replace the regex for all but unseen words.
        words = text.split(" ")
        rest = chain.from_iterable(map(self._word_cache.__getitem__, islice(words, 1, None)))
        return list(chain(self._encode_chunks(words[0]), rest))

    def encode(self, text: str) -> list[int]:
        """Encode text; each literal special token (e.g. <|endoftext|>) becomes its single id."""
        ids: list[int] = []
        for i, part in enumerate(self._special_pattern.split(text)):
            if i % 2:  # split() with a capture group puts the separators at odd positions
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        vocab = self.vocab
        return b"".join(vocab[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- token strings (GGUF, Hugging Face) ------------------------------------------------------------------

    def token_strings(self) -> list[str]:
        """Each id's GPT-2 byte-to-unicode string (e.g. 'Ġthe'); special tokens as their text."""
        n_ordinary = 256 + len(self.merges)
        strings = [bytes_to_token_string(t) for t in self.vocab[:n_ordinary]]
        return strings + list(self.special_tokens)

    def merge_strings(self) -> list[str]:
        """Merges as 'left right' token strings in rank order (byte-level tokens never contain a space)."""
        strings = self.token_strings()
        return [f"{strings[a]} {strings[b]}" for a, b in self.merges]

    @classmethod
    def from_token_strings(cls, tokens: Sequence[str], merges: Sequence[str], eot_token: str = EOT) -> "Tokenizer":
        """Rebuild a tokenizer from `token_strings()` and `merge_strings()` (the inverse of those two).

        The ids must follow our layout: 256 single bytes in byte order, then merge k at 256 + k, then specials.
        """
        n_merges = len(merges)
        if len(tokens) < 256 + n_merges + 1:
            raise TinyGPTError(f"{len(tokens)} tokens cannot hold 256 bytes, {n_merges} merges and {eot_token}")
        for i in range(256):
            if tokens[i] != BYTE_TO_UNICODE[i]:
                raise TinyGPTError(f"token {i} is {tokens[i]!r}, expected byte {i} ({BYTE_TO_UNICODE[i]!r}); "
                                   "the vocabulary does not use tinygpt's id layout")
        token_ids = {t: i for i, t in enumerate(tokens[:256 + n_merges])}
        pairs = []
        for rank, merge in enumerate(merges):
            left, sep, right = merge.partition(" ")
            a, b = token_ids.get(left), token_ids.get(right)
            if not sep or a is None or b is None or tokens[256 + rank] != left + right:
                raise TinyGPTError(f"merge {rank} {merge!r} does not produce token {256 + rank} "
                                   f"({tokens[256 + rank]!r}); the vocabulary does not use tinygpt's id layout")
            pairs.append((a, b))
        specials = list(tokens[256 + n_merges:])
        if eot_token not in specials:
            raise TinyGPTError(f"special token {eot_token!r} not found after the merged tokens")
        return cls(pairs, specials, eot_token)

    # ---- Hugging Face tokenizer.json -------------------------------------------------------------------------

    def to_json_str(self) -> str:
        """The Hugging Face `tokenizer.json` text: `tokenizers.Tokenizer.from_str` gives exactly our ids."""
        strings = self.token_strings()
        n_ordinary = 256 + len(self.merges)
        spec = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True}
                for s, i in self.special_tokens.items()
            ],
            "normalizer": None,
            # The GPT-2 regex splits, then ByteLevel only maps bytes to characters (its own regex is off).
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": GPT2_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {
                "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                "vocab": {s: i for i, s in enumerate(strings[:n_ordinary])},
                "merges": self.merge_strings(),
            },
        }
        return json.dumps(spec, ensure_ascii=False, indent=1)

    def save(self, path: str | os.PathLike) -> None:
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_str())

    @classmethod
    def from_json_str(cls, text: str, source: str = "tokenizer JSON") -> "Tokenizer":
        """Load a Hugging Face `tokenizer.json` (ours, or any byte-level BPE with tinygpt's id layout)."""
        try:
            spec = json.loads(text)
            model = spec["model"]
            if model.get("type") != "BPE":
                raise TinyGPTError(f"{source}: model type is {model.get('type')!r}, expected 'BPE'")
            by_id = {int(i): t for t, i in model["vocab"].items()}
            specials = [a["content"] for a in spec.get("added_tokens", []) if a.get("special")]
            for added in spec.get("added_tokens", []):
                by_id[int(added["id"])] = added["content"]
            merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise TinyGPTError(f"{source} is not a valid Hugging Face tokenizer.json ({type(e).__name__}: {e}); "
                               "re-run train_bpe to rebuild it") from None
        if sorted(by_id) != list(range(len(by_id))):
            raise TinyGPTError(f"{source}: token ids are not contiguous from 0; re-run train_bpe to rebuild it")
        tokens = [by_id[i] for i in range(len(by_id))]
        tail = tokens[256 + len(merges):]
        if sorted(tail) != sorted(specials):
            raise TinyGPTError(f"{source}: tokens after the merges must be the special tokens {specials}, "
                               f"found {tail[:5]}")
        return cls.from_token_strings(tokens, merges)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = require_file(path, "tokenizer", "run `tinygpt train_bpe` to create it")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TinyGPTError(f"cannot read tokenizer {path}: {e}") from None
        return cls.from_json_str(text, source=str(path))

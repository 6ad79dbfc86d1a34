"""Byte-level BPE tokenizer: GPT-2's alphabet and pre-tokenization, our own merges, Hugging Face JSON on disk.

Token ids: id i < 256 is the single byte i; merge k (rank order) creates id 256 + k; special tokens come last
(`<|endoftext|>` = vocab_size - 1). Merge ranks therefore equal ids, exactly as tiktoken's `mergeable_ranks`.

Encoding splits text with the GPT-2 regex into chunks, then merges each chunk's bytes by lowest-rank pair first.
Natural text repeats a small set of chunks, so a bounded chunk -> ids cache turns most chunks into a dict hit.
Two fast paths give exactly the same ids (see `encode_ordinary`): ASCII text is split by the standard library's
`re` (about twice as fast as `regex`), and most text skips the regex altogether by splitting on spaces and
looking whole words up in a second cache.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from itertools import chain, islice, repeat
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


def pretokenize(text: str) -> list[str]:
    """Split text into the chunks BPE works within (merges never cross a chunk boundary)."""
    if text.isascii():  # O(n) but very fast; `re` then gives regex's chunks in about half the time
        return _ascii_pattern.findall(text)
    return compiled_pattern().findall(text)


def bytes_to_token_string(data: bytes) -> str:
    return "".join(BYTE_TO_UNICODE[b] for b in data)


def token_string_to_bytes(token: str) -> bytes:
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in token)
    except KeyError as e:
        raise TinyGPTError(f"token {token!r} has character {e.args[0]!r} outside GPT-2's byte alphabet; "
                           "only byte-level BPE tokenizers are supported") from None


class _BoundedCache(dict):
    """text -> ids; a miss calls `compute`. Emptied when full, which bounds its memory."""

    def __init__(self, compute: Callable[[str], list[int]]) -> None:
        super().__init__()
        self._compute = compute

    def __missing__(self, key: str) -> list[int]:
        if len(self) >= CACHE_SIZE:
            self.clear()
        ids = self[key] = self._compute(key)
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
        self._ranks: dict[tuple[int, int], int] = {pair: rank for rank, pair in enumerate(self.merges)}
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
        """Apply merges to one chunk: repeatedly merge every occurrence of the lowest-ranked adjacent pair."""
        ids = list(chunk)
        ranks, missing = self._ranks, len(self._ranks)
        while len(ids) > 1:
            pairs = list(zip(ids, ids[1:]))
            rank = min(map(ranks.get, pairs, repeat(missing)))
            if rank == missing:
                break
            pair = self.merges[rank]
            starts = [pairs.index(pair)]  # left to right, non-overlapping (a run "aaa" merges as "aa a")
            while pair in pairs[starts[-1] + 2:]:
                starts.append(pairs.index(pair, starts[-1] + 2))
            for i in reversed(starts):
                ids[i:i + 2] = [256 + rank]
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

"""Byte-level BPE tokenizer: GPT-2's alphabet and pre-tokenization, our own merges, Hugging Face JSON on disk.

Token ids: id i < 256 is the single byte i; merge k (rank order) creates id 256 + k; special tokens come last:
what train_bpe writes reserves RESERVED_SPECIALS, the chat format's `<|im_start|>` and `<|im_end|>` and then
`<|endoftext|>` (= vocab_size - 1). Merge ranks therefore equal ids, exactly as tiktoken's `mergeable_ranks`.
Text encodes to a special token only through `encode`; `encode_ordinary` (what encode and chat_encode use for
text) keeps special-token text as ordinary text.

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
from array import array
from functools import cached_property, lru_cache
from typing import Callable, Iterable, Sequence

import numpy as np
import regex

from tinygpt.common import EOT, TinyGPTError, atomic_open, require_file
from tinygpt.tokenizer.chat import IM_END, IM_START
from tinygpt.tokenizer.hf_json import parse_tokenizer_json
from tinygpt.tokenizer.class_rules import ClassRules, class_table
from tinygpt.tokenizer.pipeline import (  # noqa: F401 - the byte map and GPT2_PATTERN are part of this API
    BYTE_TO_UNICODE, GPT2_PATTERN, UNICODE_TO_BYTE, Pipeline, Step, bmp_classes, bytes_to_token_string,
    token_string_to_bytes)

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
# The special tokens of every tokenizer train_bpe writes, in id order after the merges: the chat format's two
# (so that pretraining and chat share one vocabulary), then <|endoftext|> last, at vocab_size - 1.
RESERVED_SPECIALS = (IM_START, IM_END, EOT)
CACHE_SIZE = 100_000  # entries per generation of an encode cache (see _Cache), which bounds memory
# Unseen chunks in one text from which they go through BPE together (`_BatchMerge`): below it, one at a time is
# quicker than the batch's fixed cost (a few dozen numpy calls a round).
BATCH_MIN = 64
# Characters from which a text is split by numpy rules (`class_rules`) rather than by `re`: below it, the few
# dozen array operations cost more than the matches.
RULES_MIN = 4096


@lru_cache(maxsize=None)
def compiled_pattern() -> regex.Pattern:
    return regex.compile(GPT2_PATTERN)


_ascii_pattern = re.compile(ASCII_PATTERN)


@lru_cache(maxsize=None)
def bmp_pattern() -> re.Pattern:
    """GPT2_PATTERN for `re`, for text without characters beyond U+FFFF (built on first use, in about 0.1 s).

    \\p{L}, \\p{N} and \\s are spelled out as the `regex` module reads them, so both agree on every such character
    whatever Unicode version each knows. `re` keeps such a class as a table with one lookup per character; with
    characters beyond U+FFFF in it, it would test range by range, slower than `regex`.
    """
    classes = bmp_classes()
    letters, numbers, space = classes["L"], classes["N"], classes["s"]
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


class _Cache:
    """text -> packed ids, in two plain dicts: `current`, and `previous`, the generation before. When current holds
    CACHE_SIZE entries it becomes previous (the one before is dropped), which bounds memory to about
    2 * CACHE_SIZE entries plus one text's; an entry still in use moves back from previous when next looked up, so
    it survives the turnover (varied text has more distinct chunks than one generation holds). `compute` makes
    the entries of keys found in neither, all of a text's in one call (see Tokenizer._encode_unseen)."""

    def __init__(self, compute: Callable[[list[str]], list[bytes]]) -> None:
        self.current: dict[str, bytes] = {}
        self.previous: dict[str, bytes] = {}
        self._compute = compute

    def join(self, keys: list[str]) -> bytes:
        """The entries of `keys`, joined in order."""
        if len(self.current) >= CACHE_SIZE:
            self.previous, self.current = self.current, {}
        current = self.current
        # A set first (a text repeats its chunks, about five times each in code), and then a set difference with
        # the plain dict, which runs in C without a call per key; the strings keep the hashes it computes for the
        # lookups of the join, which then all hit and run in C too.
        missing = set(keys).difference(current)
        if missing:
            unseen = list(missing.difference(self.previous))
            if len(unseen) < len(missing):
                kept = missing.difference(unseen)
                current.update(zip(kept, map(self.previous.__getitem__, kept)))
            if unseen:
                current.update(zip(unseen, self._compute(unseen)))
        return b"".join(map(current.__getitem__, keys))


_NO_RANK = np.iinfo(np.int64).max


class _BatchMerge:
    """BPE of many chunks at once with numpy: each round merges, in every chunk, all occurrences of its
    lowest-ranked pair (left to right, without overlaps: x x x with the pair (x, x) merges its first two).

    That equals merging one occurrence at a time (`Tokenizer._merge_chunk`, Hugging Face's order) when each
    merge's two parts are bytes or made by earlier merges: then a pair that holds the new id ranks after the
    merge that made it, so the chunk's next lowest pair is the same pair's next occurrence. `usable` checks that
    order (train_bpe's and Hugging Face's trainer's merges have it). A Python loop over a chunk's merges costs
    about a microsecond each, 10-25 us for a chunk of code; here the cost is per round, shared by all chunks.
    """

    def __init__(self, pair_rank: dict[int, int], merged: list[int], byte_id: list[int],
                 byte_pair_rank: list[int]) -> None:
        keys = np.fromiter(pair_rank.keys(), np.int64, len(pair_rank))
        ranks = np.fromiter(pair_rank.values(), np.int64, len(pair_rank))
        order = np.argsort(keys)
        self.keys, self.ranks = keys[order], ranks[order]
        self.merged = np.asarray(merged, np.int64)
        self.byte_id = np.asarray(byte_id, np.int64)
        self.byte_pair_rank = np.asarray(byte_pair_rank, np.int64)
        self.byte_pair_rank[self.byte_pair_rank == len(merged)] = _NO_RANK
        left, right = keys >> 32, keys & 0xFFFFFFFF
        made_by = np.full(int(max(left.max(initial=0), right.max(initial=0), self.merged.max(initial=0))) + 1, -1)
        np.maximum.at(made_by, self.merged[ranks], ranks)  # the last rank that makes each id (-1: none)
        self.usable = bool(np.all(ranks > made_by[left]) and np.all(ranks > made_by[right]))

    def _ranks(self, ids: np.ndarray, chunk: np.ndarray, at: np.ndarray) -> np.ndarray:
        """The rank of the pair that starts at each position `at` (none for a chunk's last id)."""
        ranks = np.full(len(at), _NO_RANK)
        inner = np.flatnonzero(at + 1 < len(ids))
        inner = inner[chunk[at[inner] + 1] == chunk[at[inner]]]
        pairs = ids[at[inner]] << 32 | ids[at[inner] + 1]
        found = np.searchsorted(self.keys, pairs)
        found[found == len(self.keys)] = 0
        hit = self.keys[found] == pairs
        ranks[inner[hit]] = self.ranks[found[hit]]
        return ranks

    def merge(self, chunks: list[bytes], dtype: np.dtype) -> list[bytes]:
        """Each chunk's ids, packed as bytes of dtype."""
        lengths = np.fromiter(map(len, chunks), np.int64, len(chunks))
        data = np.frombuffer(b"".join(chunks), np.uint8)
        ids = self.byte_id[data]
        chunk = np.repeat(np.arange(len(chunks)), lengths)  # each id's chunk
        rank = np.full(len(ids), _NO_RANK)  # rank of the pair each id starts (a chunk's last id: none)
        rank[:-1] = np.where(chunk[1:] == chunk[:-1], self.byte_pair_rank[data[:-1].astype(np.int64) << 8 | data[1:]],
                             _NO_RANK)
        done_ids, done_chunk = [], []
        while len(ids):
            first = np.empty(len(ids), bool)  # each chunk's first id
            first[0] = True
            np.not_equal(chunk[1:], chunk[:-1], out=first[1:])
            slot = np.cumsum(first) - 1  # each id's chunk among those still merging
            lowest = np.minimum.reduceat(rank, np.flatnonzero(first))
            finished = (lowest == _NO_RANK)[slot]
            if finished.any():
                done_ids.append(ids[finished])
                done_chunk.append(chunk[finished])
            candidate = (rank == lowest[slot]) & ~finished
            position = np.arange(len(ids))
            run_start = np.maximum.accumulate(np.where(candidate & ~np.r_[False, candidate[:-1]], position, 0))
            chosen = np.flatnonzero(candidate & ((position - run_start) % 2 == 0))
            ids[chosen] = self.merged[rank[chosen]]
            keep = ~finished
            keep[chosen + 1] = False
            chosen = np.cumsum(keep)[chosen] - 1  # where the new ids are once the rest is dropped
            ids, chunk, rank = ids[keep], chunk[keep], rank[keep]
            changed = np.concatenate([chosen, chosen[chosen > 0] - 1])  # the pairs on both sides of a new id
            rank[changed] = self._ranks(ids, chunk, changed)
        ids, chunk = np.concatenate(done_ids), np.concatenate(done_chunk)
        order = np.argsort(chunk, kind="stable")  # a chunk's ids finish in one round, in order
        packed = ids[order].astype(dtype).tobytes()
        ends = (np.cumsum(np.bincount(chunk, minlength=len(chunks))) * dtype.itemsize).tolist()
        return [packed[start:end] for start, end in zip([0] + ends, ends)]


_OWN_PIPELINE = Pipeline(None, (Step("split", GPT2_PATTERN),))  # what train_bpe writes


def _token_pattern(tokens: Iterable[str], lstrip: set[str] = frozenset(), rstrip: set[str] = frozenset()):
    """One regex finding any of `tokens`, the longest at a position first (as Hugging Face's matcher does),
    with the whitespace before (lstrip) or after (rstrip) a token taken into its match."""
    parts = [("\\s*" if t in lstrip else "") + regex.escape(t) + ("\\s*" if t in rstrip else "")
             for t in sorted(tokens, key=len, reverse=True)]
    return regex.compile("(" + "|".join(parts) + ")") if parts else None


class Tokenizer:
    """A byte-level BPE tokenizer: vocabulary, merges in rank order, added (special) tokens, and the text
    pipeline (normalizer, pre-tokenizer; see `pipeline`) of a Hugging Face tokenizer.json.

    `Tokenizer(merges, specials)` is tinygpt's own layout (train_bpe passes RESERVED_SPECIALS): id i < 256 is
    byte i, merge k gives id 256 + k, the special tokens come last in the order given, GPT-2's regex splits. `from_json_str` reads any supported tokenizer.json.
    """

    def __init__(self, merges: Sequence[tuple[int, int]], specials: Sequence[str] = (EOT,),
                 eot_token: str = EOT) -> None:
        if eot_token not in specials:
            raise TinyGPTError(f"the special tokens {list(specials)} must include {eot_token}")
        merges = [(int(a), int(b)) for a, b in merges]
        vocab = [bytes([i]) for i in range(256)]
        for rank, (a, b) in enumerate(merges):
            new_id = 256 + rank
            if not (0 <= a < new_id and 0 <= b < new_id):
                raise TinyGPTError(f"merge {rank} ({a}, {b}) uses an id not defined before it")
            vocab.append(vocab[a] + vocab[b])
        added = {s: len(vocab) + i for i, s in enumerate(specials)}
        vocab += [s.encode("utf-8") for s in specials]
        self._setup(vocab, merges, list(range(256, 256 + len(merges))), added, set(specials), eot_token)

    def _setup(self, vocab: list[bytes], merges: list[tuple[int, int]], merged: list[int], added: dict[str, int],
               special: set[str], eot_token: str, pipeline: Pipeline = _OWN_PIPELINE, bos_token: str | None = None,
               ignore_merges: bool = False, spec: dict | None = None, normalized: set[str] = frozenset(),
               lstrip: set[str] = frozenset(), rstrip: set[str] = frozenset()) -> None:
        """vocab: bytes of every id (added tokens: their UTF-8 text); merges: (left, right) ids by rank and
        merged: the id each makes; added: every added token's id (special or not)."""
        self.merges, self._merged = merges, merged
        self.vocab: list[bytes] = vocab
        self.vocab_size: int = len(vocab)
        self.added_tokens: dict[str, int] = added
        self.special_tokens: dict[str, int] = {t: i for t, i in added.items() if t in special}
        self.eot_id: int = added[eot_token]
        self.bos_id: int | None = None if bos_token is None else added[bos_token]
        self.pipeline, self.ignore_merges, self._spec = pipeline, ignore_merges, spec
        n = len(merges)
        self._pair_rank: dict[int, int] = {a << 32 | b: rank for rank, (a, b) in enumerate(merges)}
        added_ids = set(added.values())
        self._id_of_bytes = {t: i for i, t in enumerate(vocab) if i not in added_ids}
        missing = [b for b in range(256) if bytes([b]) not in self._id_of_bytes]
        if missing:
            raise TinyGPTError(f"the vocabulary has no token for byte {missing[0]:#04x} (and {len(missing) - 1} "
                               "more); a byte-level BPE needs all 256 to encode any text")
        self._byte_id = [self._id_of_bytes[bytes([b])] for b in range(256)]
        self._bytes_are_ids = self._byte_id == list(range(256))
        # The same for pairs of bytes, as a table indexed by byte values (a pair merged twice: its last rank, as
        # in _pair_rank); with numpy, as a Python loop over a 128k vocabulary's merges takes a tenth of a second.
        byte_of_id = np.full(len(vocab), -1, np.int64)
        byte_of_id[self._byte_id] = np.arange(256)
        left, right = byte_of_id[np.array(merges, np.int64).reshape(-1, 2).T]
        ranks = np.flatnonzero((left >= 0) & (right >= 0))
        table = np.full(65536, -1, np.int64)
        np.maximum.at(table, left[ranks] << 8 | right[ranks], ranks)
        self._byte_pair_rank = np.where(table < 0, n, table).tolist()
        # Added tokens are found in the raw text, or (flag `normalized`, with a normalizer) in the normalized text.
        on_normalized = {t for t in normalized if pipeline.normalizer is not None}
        raw, norm = set(added) - on_normalized, {pipeline.normalize(t) for t in on_normalized}
        plain_raw = {t for t in raw if t not in special}
        plain_norm = {pipeline.normalize(t) for t in on_normalized if t not in special}
        self._patterns = {special_too: (_token_pattern(r, lstrip, rstrip), _token_pattern(m, lstrip, rstrip))
                          for special_too, r, m in ((True, raw, norm), (False, plain_raw, plain_norm))}
        self._added_ids = {**{pipeline.normalize(t): added[t] for t in on_normalized}, **added}
        self._strip = bool(lstrip or rstrip)
        fast_gpt2 = pipeline == _OWN_PIPELINE
        self._pretokenize = pretokenize if fast_gpt2 else pipeline.pretokenize
        # Splitting (normalized) text at spaces (see _encode_normalized) is proven for GPT-2's regex and
        # property-tested for the other known pipelines, each with its breaker.
        self._space_split = pipeline.known is not None
        self._breaker = (_SPACE_SPLIT_BREAKER if fast_gpt2 or not self._space_split
                         else regex.compile(pipeline.known.space_split_breaker))
        self.dtype = np.dtype(np.uint16 if self.vocab_size <= 65536 else np.uint32)  # of token files and packed ids
        self._typecode = {2: "H", 4: "I"}[self.dtype.itemsize]
        assert array(self._typecode).itemsize == self.dtype.itemsize
        self._chunk_cache = _Cache(self._encode_unseen)
        self._word_cache = _Cache(self._encode_words)  # for the space-split fast path
        # The pieces of a long text come from numpy rules (see class_rules), as UTF-8 bytes.
        self._rules = ClassRules(pipeline.known.rules) if pipeline.known is not None else None
        self._piece_cache = _Cache(self._encode_unseen_pieces)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, eot_id={self.eot_id})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Tokenizer) and self.merges == other.merges and self.vocab == other.vocab
                and self.added_tokens == other.added_tokens and self.special_tokens == other.special_tokens
                and self.pipeline == other.pipeline and self.bos_id == other.bos_id
                and self.ignore_merges == other.ignore_merges)

    @property
    def gguf_pre(self) -> str:
        """The name llama.cpp gives this pre-tokenizer (`tokenizer.ggml.pre`); TinyGPTError if it has none."""
        known = self.pipeline.known
        if known is None:
            raise TinyGPTError("this tokenizer's normalizer and pre-tokenizer are none that llama.cpp implements "
                               "(GPT-2's, SmolLM's, Llama 3's, Qwen2's), so llama.cpp would tokenize differently")
        if known.ignore_merges != self.ignore_merges:
            raise TinyGPTError(f"llama.cpp's {known.gguf_pre!r} pre-tokenizer has ignore_merges "
                               f"{known.ignore_merges}, this tokenizer {self.ignore_merges}; llama.cpp would "
                               "tokenize differently")
        return known.gguf_pre

    @property
    def safe_before(self) -> bytes | None:
        """A bytes regex class: an ASCII byte of it before ASCII whitespace is a point where text may be cut
        without changing its pieces (see `pieces`); None when no such point is known for this pipeline."""
        return None if self.pipeline.known is None else self.pipeline.known.safe_before

    # ---- encoding -------------------------------------------------------------------------------------------

    def _merge_chunk(self, chunk: bytes) -> list[int]:
        """Apply merges to one chunk: repeatedly merge the leftmost occurrence of the lowest-ranked adjacent pair.

        (Merging one occurrence at a time equals merging all of a pair's occurrences left to right: pairs that
        hold the new id rank after it, so the next lowest pair is the pair's next occurrence, if any.)
        """
        ids = list(chunk) if self._bytes_are_ids else [self._byte_id[b] for b in chunk]
        rank_of, missing, byte_pair_rank = self._pair_rank.get, len(self.merges), self._byte_pair_rank
        merged = self._merged
        ranks = [byte_pair_rank[a << 8 | b] for a, b in zip(chunk, chunk[1:])]
        while ranks:
            rank = min(ranks)
            if rank == missing:
                break
            i = ranks.index(rank)
            new = merged[rank]
            ids[i:i + 2] = [new]
            del ranks[i]
            if i:
                ranks[i - 1] = rank_of(ids[i - 1] << 32 | new, missing)
            if i < len(ranks):
                ranks[i] = rank_of(new << 32 | ids[i + 1], missing)
        return ids

    # Inside, a text's ids are packed: bytes of `dtype` (2 bytes an id up to 65,536 ids, else 4), the caches'
    # values too, so that a text's ids are one bytes.join of cache hits, all in C: as lists, chaining them and
    # then making the encode stage's array took more time than the lookups themselves.

    def pack(self, ids: Sequence[int]) -> bytes:
        return array(self._typecode, ids).tobytes()

    def _encode_chunk(self, chunk: str) -> bytes:
        return self._encode_piece(chunk.encode("utf-8"))

    def _encode_piece(self, data: bytes) -> bytes:
        if self.ignore_merges:  # a piece that is a token is that token, whatever the merges would make of it
            found = self._id_of_bytes.get(data)
            if found is not None:
                return self.pack((found,))
        return self.pack(self._merge_chunk(data))

    def _encode_words(self, words: list[str]) -> list[bytes]:
        """Ids of " " + word for each word: text between two spaces of a text the space-split path may take."""
        return [self._encode_chunks(" " + word) for word in words]

    @cached_property
    def _batch_merge(self) -> _BatchMerge | None:
        batch = _BatchMerge(self._pair_rank, self._merged, self._byte_id, self._byte_pair_rank)
        return batch if batch.usable else None

    def prepare_encoding(self) -> None:
        """Build what encoding builds on first use (call before forking workers, so they share it)."""
        prepare_pretokenizer()
        self._batch_merge
        if self._rules is not None:
            class_table()

    def _encode_unseen(self, chunks: list[str]) -> list[bytes]:
        return self._encode_unseen_pieces([chunk.encode("utf-8") for chunk in chunks])

    def _encode_unseen_pieces(self, data: list[bytes]) -> list[bytes]:
        """The ids of chunks (UTF-8) not in the cache: together through BPE (see _BatchMerge) if there are enough
        of them."""
        if len(data) < BATCH_MIN or self._batch_merge is None:
            return list(map(self._encode_piece, data))
        if not self.ignore_merges:
            return self._batch_merge.merge(data, self.dtype)
        found = list(map(self._id_of_bytes.get, data))  # a piece that is a token is that token (see _encode_chunk)
        rest = [d for d, i in zip(data, found) if i is None]
        merged = iter(self._batch_merge.merge(rest, self.dtype) if rest else ())
        return [next(merged) if i is None else self.pack((i,)) for i in found]

    def _encode_chunks(self, text: str) -> bytes:
        """The general path: pre-tokenize, then look each chunk up (unseen chunks go through BPE)."""
        if self._rules is not None and len(text) >= RULES_MIN:
            pieces = self._rules(text)
            if pieces is not None:
                return self._piece_cache.join(pieces)
        return self._chunk_cache.join(self._pretokenize(text))

    def _encode_normalized(self, text: str) -> bytes:
        """Encode normalized text without added tokens."""
        if not self._space_split or self._breaker.search(text):
            return self._encode_chunks(text)
        # Fast path: str.split and one dict hit per word replace the regex for all but unseen words.
        first, *words = text.split(" ")
        return self._encode_chunks(first) + self._word_cache.join(words)

    def _encode_with(self, text: str, special_too: bool) -> bytes:
        """Normalize and encode text; the added tokens found in it (special ones only if special_too) are kept
        whole, found in the raw text or, if their `normalized` flag says so, in the normalized text."""
        raw, normalized = self._patterns[special_too]
        parts: list[bytes] = []
        for i, part in enumerate(self._split_on(raw, text)):
            if i % 2:  # split() with a capture group puts the separators at odd positions
                parts.append(self.pack((self._added_id(part),)))
                continue
            for j, piece in enumerate(self._split_on(normalized, self.pipeline.normalize(part) if part else part)):
                if j % 2:
                    parts.append(self.pack((self._added_id(piece),)))
                elif piece:
                    parts.append(self._encode_normalized(piece))
        return b"".join(parts)

    @staticmethod
    def _split_on(pattern, text: str) -> list[str]:
        return [text] if pattern is None or not text else pattern.split(text)

    def _added_id(self, match: str) -> int:
        found = self._added_ids.get(match)
        return self._added_ids[match.strip()] if found is None and self._strip else found

    def encode_ordinary_packed(self, text: str) -> bytes:
        """encode_ordinary's ids packed as bytes of `dtype` (what the encode stage writes)."""
        if self._patterns[False] == (None, None) and self.pipeline.normalizer is None:
            return self._encode_normalized(text)
        return self._encode_with(text, special_too=False)

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text, treating special-token text like any other text (non-special added tokens stay tokens:
        Hugging Face's encode with split_special_tokens and no post-processor)."""
        return np.frombuffer(self.encode_ordinary_packed(text), self.dtype).tolist()

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Encode text; each literal added token (e.g. <|endoftext|>) becomes its single id. With bos=True the
        post-processor's beginning-of-sequence token comes first, if it has one (Hugging Face's encode with
        add_special_tokens); without it, as Hugging Face's add_special_tokens=False."""
        ids = np.frombuffer(self._encode_with(text, special_too=True), self.dtype).tolist()
        return [self.bos_id, *ids] if bos and self.bos_id is not None else ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        vocab = self.vocab
        return b"".join(vocab[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- token strings (GGUF, Hugging Face) ------------------------------------------------------------------

    def token_strings(self) -> list[str]:
        """Each id's GPT-2 byte-to-unicode string (e.g. 'Ġthe'); added tokens as their text."""
        by_id = {i: t for t, i in self.added_tokens.items()}
        return [by_id[i] if i in by_id else bytes_to_token_string(t) for i, t in enumerate(self.vocab)]

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
        if self._spec is not None:  # read from a tokenizer.json: written back as read
            return json.dumps(self._spec, ensure_ascii=False, indent=1)
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
    def from_json_str(cls, text: str, source: str = "tokenizer JSON", eot_token: str | None = None) -> "Tokenizer":
        """Load a Hugging Face `tokenizer.json`: ours, or a byte-level BPE of a supported family (see
        `tinygpt.tokenizer.hf_json`). eot_token: the end-of-text token (default: the first of EOT_NAMES)."""
        return parse_tokenizer_json(cls, text, source, eot_token)

    @classmethod
    def load(cls, path: str | os.PathLike, eot_token: str | None = None) -> "Tokenizer":
        path = require_file(path, "tokenizer", "run `tinygpt train_bpe` to create it")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TinyGPTError(f"cannot read tokenizer {path}: {e}") from None
        return cls.from_json_str(text, source=str(path), eot_token=eot_token)


_SINGLE_BYTES = frozenset(bytes([b]) for b in range(256))

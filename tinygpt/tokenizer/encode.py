"""Stage encode: tokenize a cleaned corpus into flat token files train.bin / val.bin plus meta.json.

Each document's tokens are followed by the tokenizer's end-of-text token (<|endoftext|>), and preceded by its
beginning-of-sequence token when its post-processor adds one (Llama 3's <|begin_of_text|>). The corpus is
streamed in pieces of about 1 MB (a long document is cut only where the pre-tokenizer splits anyway, so its ids
equal those of encoding it whole; see `pieces`) to a pool of worker processes, with a bounded number of pieces
in flight: memory stays flat whatever the corpus or document sizes, and the output keeps corpus order.

Which text is validation (`--split`; meta.json records the rule and what it did under "split"):
  tail (default): the last val_fraction of the corpus *by bytes*, in corpus order (as nanoGPT and llama2.c hold
    data out). Validation starts at the document start nearest to byte (1 - val_fraction) * corpus size, so it
    holds whole documents, provided that keeps its share within val_fraction / 2 of the share asked for.
    Otherwise (a corpus of one document, or documents too large for that) validation starts inside the document
    that spans that byte, at the first point at or after it where the pre-tokenizer splits anyway (else the last
    such point before it): that document's head ends train.bin and its tail begins val.bin. A document without
    any such point (no whitespace at all) cannot be split: encode then stops with an error saying what to do.
  random: a document is validation when blake2b(f'{seed}:{document index}') as a fraction of 2**64 is below
    val_fraction (deterministic, independent of --threads). If that leaves a split empty, the last document moves
    to it; a corpus of one document is split inside it as the tail rule does.
So with val_fraction > 0 neither split is ever empty. val_fraction 0 (command line only) means no validation.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import mmap
import os
import sys
from collections import deque
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from tinygpt.common import (TinyGPTError, atomic_folder, capped_threads, progress, require_file, run_cli, sha256_file,
                            worker_context, worker_pool)
from tinygpt.tokenizer.bpe import EOT, Tokenizer
from tinygpt.tokenizer.pieces import PIECE_BYTES, Piece, iter_pieces, safe_point_pattern, safe_points

SPLITS = ("tail", "random")
BATCH_BYTES = 1 << 20  # corpus text per worker task
RANDOM_RULE = "blake2b(f'{seed}:{document_index}') as a fraction of 2**64 < val_fraction"
_SCAN_BYTES = 1 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def is_val_document(seed: int, index: int, val_fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


# ---- where validation goes ---------------------------------------------------------------------------------------

class SplitPlan(NamedTuple):
    """Validation is every byte from file offset `val_start` on, or (val_start None) chosen by document."""
    rule: str
    val_fraction: float
    seed: int
    val_start: int | None
    moved_to_val: frozenset[int] = frozenset()  # random: documents moved against the hash to fill a split
    moved_to_train: frozenset[int] = frozenset()
    whole_documents: bool = True
    description: str = ""

    def is_val(self, piece: Piece) -> bool:
        if self.val_start is not None:
            return piece.offset >= self.val_start
        if piece.document in self.moved_to_val or piece.document in self.moved_to_train:
            return piece.document in self.moved_to_val
        return is_val_document(self.seed, piece.document, self.val_fraction)

    def assign(self, piece: Piece) -> Iterator[tuple[Piece, bool]]:
        """The piece with its split; a piece that holds val_start is cut there (a safe point: ids do not change)."""
        start = self.val_start
        if start is not None and piece.offset < start < piece.offset + len(piece.data):
            head = start - piece.offset
            yield Piece(piece.data[:head], piece.document, piece.offset, False), False
            yield Piece(piece.data[head:], piece.document, start, piece.ends_document), True
        else:
            yield piece, self.is_val(piece)


class _Document(NamedTuple):
    start: int  # file offset of its first byte
    end: int  # file offset after its last byte


def _documents(corpus: Path) -> Iterator[_Document]:
    start = None
    with open(corpus, "rb") as f:
        for piece in iter_pieces(f, PIECE_BYTES):
            start = piece.offset if start is None else start
            if piece.ends_document:
                yield _Document(start, piece.offset + len(piece.data))
                start = None


def _first_safe_point(f, lo: int, end: int, safe) -> int:
    """The first safe point p with lo <= p < end (a document's bytes end at `end`), or -1."""
    pos = lo - 1  # a safe point needs its byte before it
    while pos < end - 1:
        f.seek(pos)
        data = f.read(min(_SCAN_BYTES, end - pos))
        points = safe_points(data, safe)
        if points:
            return pos + points[0]
        pos += len(data) - 1  # overlap one byte: a safe point may straddle the blocks
    return -1


def _last_safe_point(f, start: int, hi: int, safe) -> int:
    """The last safe point p with start < p < hi, or -1."""
    while hi > start + 1:
        lo = max(start, hi - _SCAN_BYTES)
        f.seek(lo)
        points = safe_points(f.read(hi - lo), safe)
        if points:
            return lo + points[-1]
        hi = lo + 1
    return -1


def plan_split(corpus: Path, rule: str, val_fraction: float, seed: int, safe=safe_point_pattern()) -> SplitPlan:
    """Decide where validation goes before encoding: one quick pass that only reads the corpus. safe: the
    tokenizer's safe points (`pieces.safe_point_pattern`), where a document may be cut."""
    size = corpus.stat().st_size
    cut = round((1 - val_fraction) * size)
    n_documents, first, spanning, first_after = 0, None, None, None
    for doc in _documents(corpus):
        n_documents += 1
        first = first or doc
        if doc.start <= cut:
            spanning = doc  # the last document that starts at or before the cut
        elif first_after is None:
            first_after = doc.start
    if first is None:
        raise TinyGPTError(f"corpus {corpus} has no documents; check the clean stage's output")
    if val_fraction == 0:
        return SplitPlan(rule, val_fraction, seed, size if rule == "tail" else None,  # the hash is never < 0
                         description="val_fraction 0: no validation")
    if rule == "random" and n_documents >= 2:
        hashed = (is_val_document(seed, i, val_fraction) for i in range(n_documents))
        seen = set()
        for is_val in hashed:  # stops as soon as both splits have a document
            seen.add(is_val)
            if len(seen) == 2:
                return SplitPlan(rule, val_fraction, seed, None, description=f"random by document: {RANDOM_RULE}")
        last = frozenset({n_documents - 1})
        return SplitPlan(rule, val_fraction, seed, None, last if False in seen else frozenset(),
                         frozenset() if False in seen else last,
                         description=f"random by document: {RANDOM_RULE}; the hash left a split empty, so the last "
                                     "document moved to it")
    # tail, or random with one document: whole documents if a document start lies close enough to the cut
    starts = [b for b in (spanning and spanning.start, first_after) if b is not None and b != first.start]
    close = [b for b in starts if abs(b - cut) <= val_fraction * size / 2]
    if close:
        val_start = min(close, key=lambda b: (abs(b - cut), b))
        return SplitPlan(rule, val_fraction, seed, val_start,
                         description=f"tail by bytes: the whole documents from byte {val_start:,} of {size:,} on (the "
                                     f"document start nearest to byte {cut:,} = (1 - val_fraction) * corpus bytes)")
    doc = spanning or first
    with open(corpus, "rb") as f:
        val_start = _first_safe_point(f, max(cut, doc.start + 1), doc.end, safe)
        if val_start < 0:
            val_start = _last_safe_point(f, doc.start, min(cut, doc.end), safe)
    if val_start < 0:
        raise TinyGPTError(f"corpus {corpus}: validation would start inside the document at byte {doc.start:,}, "
                           "which has no whitespace to split it at; add documents to the corpus")
    why = "the corpus is one document" if n_documents == 1 else "no document start lies close enough to it"
    fallback = "random needs two documents, so " if rule == "random" else ""
    return SplitPlan(rule, val_fraction, seed, val_start, whole_documents=False,
                     description=f"{fallback}tail by bytes, inside a document ({why}): validation starts at byte "
                                 f"{val_start:,} of {size:,}, the first point at or after byte {cut:,} = (1 - "
                                 "val_fraction) * corpus bytes where the pre-tokenizer splits; the document's head "
                                 "ends train.bin")


# ---- encoding ----------------------------------------------------------------------------------------------------

class EncodedBatch(NamedTuple):
    train: np.ndarray
    val: np.ndarray
    n_bytes: int


_tokenizer: Tokenizer | None = None  # one per worker process, loaded once by _init_worker
_corpus: BinaryIO | None = None  # the worker's own handle on the corpus: it reads its pieces itself
_slots: mmap.mmap | None = None  # forked workers: memory shared with the parent, where they leave their tokens
SLOT_BYTES = 8 << 20  # a batch's tokens that fit in a slot go there (1 MB of text: ~1M tokens at most of 4 bytes)


class _InSlot(NamedTuple):
    """A batch's tokens left in shared slot `slot` (train first, then val), counted in tokens."""
    slot: int
    n_train: int
    n_val: int
    n_bytes: int


def _init_worker(tokenizer: Tokenizer | str, corpus: str, slots: mmap.mmap | None = None) -> None:
    """The worker's tokenizer: the parent's object, inherited by fork (parsing a 128k vocabulary's JSON again
    in every worker costs seconds), or under spawn its JSON; the corpus, opened for reading; and under fork the
    shared slots for its results.

    The parent sends where each piece is, not its bytes, and reads the tokens from shared memory: sending both
    through the pool's pipes cost the parent half a core-second per 100 MB, on cores the workers need."""
    global _tokenizer, _corpus, _slots
    _slots = slots
    _tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_json_str(tokenizer)
    if _corpus is not None:
        _corpus.close()
    _corpus = open(corpus, "rb")


def _encode_batch(batch: list[tuple[int, int, bool, bool, bool]], slot: int | None = None) -> EncodedBatch | _InSlot:
    """Encode (file offset, length, ends its document, is validation, starts its document) pieces of the corpus
    in order into the two splits' tokens; left in shared slot `slot` if given and they fit."""
    # Encoding makes no reference cycles, but its allocations would start collections that walk every list in
    # the tokenizer's caches (hundreds of thousands): 10-20% of the time on varied text. Collections run again
    # between batches, so rarely.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _encode_pieces(batch, slot)
    finally:
        if collecting:
            gc.enable()


def _encode_pieces(batch: list[tuple[int, int, bool, bool, bool]], slot: int | None) -> EncodedBatch | _InSlot:
    tok = _tokenizer
    splits: tuple[list[bytes], list[bytes]] = ([], [])  # packed ids (Tokenizer.pack), joined once at the end
    bos = None if tok.bos_id is None else tok.pack((tok.bos_id,))
    eot = tok.pack((tok.eot_id,))
    n_bytes = 0
    for offset, length, ends_document, is_val, starts_document in batch:
        data = os.pread(_corpus.fileno(), length, offset)
        if len(data) != length:
            raise TinyGPTError(f"{_corpus.name} became shorter while encode read it; run encode again")
        parts = splits[is_val]
        if starts_document and bos is not None:  # as the post-processor adds it (Llama 3)
            parts.append(bos)
        parts.append(tok.encode_ordinary_packed(data.decode("utf-8", errors="replace")))  # pieces end at ASCII
        if ends_document:
            parts.append(eot)
        n_bytes += len(data)
    assert tok.dtype == token_dtype(tok.vocab_size)
    train, val = (b"".join(parts) for parts in splits)
    if slot is not None and len(train) + len(val) <= SLOT_BYTES:
        start = slot * SLOT_BYTES
        _slots[start:start + len(train)] = train
        _slots[start + len(train):start + len(train) + len(val)] = val
        return _InSlot(slot, len(train) // tok.dtype.itemsize, len(val) // tok.dtype.itemsize, n_bytes)
    return EncodedBatch(np.frombuffer(train, tok.dtype), np.frombuffer(val, tok.dtype), n_bytes)


def _batches(pieces: Iterable[tuple[Piece, bool]]) -> Iterator[list[tuple[int, int, bool, bool, bool]]]:
    batch, size, starts = [], 0, True
    for piece, is_val in pieces:
        batch.append((piece.offset, len(piece.data), piece.ends_document, is_val, starts))
        starts = piece.ends_document  # the next piece starts a document
        size += len(piece.data)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@contextlib.contextmanager
def _batch_encoder(tokenizer: Tokenizer, corpus: Path,
                   threads: int) -> Iterator[Callable[[Iterator[list]], Iterator[EncodedBatch]]]:
    """A function that encodes batches of `corpus` in corpus order, with at most 2 * threads batches in flight
    (bounded memory). Its worker processes start here, before the caller opens a progress bar (see
    `worker_context`)."""
    global _corpus
    if threads <= 1:
        _init_worker(tokenizer, str(corpus))
        try:
            yield lambda batches: map(_encode_batch, batches)
        finally:
            _corpus.close()
            _corpus = None
        return
    tokenizer.prepare_encoding()  # once, here: forked workers inherit it
    context = worker_context()  # one decision: what the workers get depends on how they start
    forked = context.get_start_method() == "fork"
    shared = tokenizer if forked else tokenizer.to_json_str()
    in_flight_max = 2 * threads
    # Anonymous shared memory is inherited by fork only; spawned workers send their tokens through the pipe.
    slots = mmap.mmap(-1, in_flight_max * SLOT_BYTES) if forked else None
    with worker_pool(threads, _init_worker, (shared, str(corpus), slots), "encode", context) as pool:
        def encoded(batches: Iterator[list]) -> Iterator[EncodedBatch]:
            in_flight: deque = deque()  # (future, its slot or None)
            free = list(range(in_flight_max)) if slots is not None else []

            def finished() -> tuple[EncodedBatch, int | None]:
                future, slot = in_flight.popleft()
                result = future.result()
                if isinstance(result, _InSlot):
                    view = np.frombuffer(slots, tokenizer.dtype, result.n_train + result.n_val, slot * SLOT_BYTES)
                    result = EncodedBatch(view[:result.n_train], view[result.n_train:], result.n_bytes)
                return result, slot

            for batch in batches:
                slot = free.pop() if free else None
                in_flight.append((pool.submit(_encode_batch, batch, slot), slot))
                if len(in_flight) >= in_flight_max:
                    result, slot = finished()
                    yield result  # the caller has written it when it asks for the next: the slot is free again
                    if slot is not None:
                        free.append(slot)
            while in_flight:
                yield finished()[0]

        yield encoded


def encode_corpus(corpus: str | os.PathLike, tokenizer_path: str | os.PathLike, out_dir: str | os.PathLike,
                  val_fraction: float = 0.05, seed: int = 1337, threads: int = 1, split: str = "tail") -> dict:
    """Encode `corpus` with the tokenizer at `tokenizer_path` into out_dir/{train.bin,val.bin,meta.json}.

    Returns the meta dict. With val_fraction > 0 both splits are non-empty (see the module docstring).
    """
    corpus = require_file(corpus, "corpus", "run `tinygpt clean` to create it")
    tokenizer_path = require_file(tokenizer_path, "tokenizer", "run `tinygpt train_bpe` to create it")
    if not 0 <= val_fraction < 1:
        raise TinyGPTError(f"val_fraction {val_fraction} must be in [0, 1), e.g. 0.05")
    if split not in SPLITS:
        raise TinyGPTError(f"split {split!r} must be one of {', '.join(SPLITS)}")
    if threads < 1:
        raise TinyGPTError(f"threads {threads} must be >= 1")
    tok = Tokenizer.load(tokenizer_path)
    safe = safe_point_pattern(tok.safe_before)
    plan = plan_split(corpus, split, val_fraction, seed, safe)
    n_tokens, n_docs, last_doc = [0, 0], [0, 0], [-1, -1]
    corpus_digest = hashlib.sha256()

    def assigned(f) -> Iterator[tuple[Piece, bool]]:
        for piece in iter_pieces(f, PIECE_BYTES, digest=corpus_digest, safe=safe):
            for part, is_val in plan.assign(piece):
                if last_doc[is_val] != part.document:  # a document split in two counts in both
                    last_doc[is_val] = part.document
                    n_docs[is_val] += 1
                yield part, is_val

    with _batch_encoder(tok, corpus, threads) as encode_batches, atomic_folder(out_dir) as out, \
            progress(total=corpus.stat().st_size, desc="encode", unit="B", unit_scale=True) as bar:
        with open(corpus, "rb") as f, open(out / "train.bin", "wb") as train_f, open(out / "val.bin", "wb") as val_f:
            for encoded in encode_batches(_batches(assigned(f))):
                train_f.write(memoryview(encoded.train))
                val_f.write(memoryview(encoded.val))
                n_tokens[0] += len(encoded.train)
                n_tokens[1] += len(encoded.val)
                bar.update(encoded.n_bytes)
        meta = {
            "dtype": token_dtype(tok.vocab_size).name,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "bos_id": tok.bos_id,
            "tokens": {"train": n_tokens[0], "val": n_tokens[1]},
            "documents": {"train": n_docs[0], "val": n_docs[1]},
            "tokenizer_sha256": sha256_file(tokenizer_path),
            "corpus_sha256": corpus_digest.hexdigest(),
            "corpus_bytes": corpus.stat().st_size,
            "split": {"rule": plan.rule, "val_fraction": val_fraction, "seed": seed,
                      "val_start_byte": plan.val_start, "whole_documents": plan.whole_documents,
                      "description": plan.description},
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="tinygpt encode", description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True, help=f"cleaned corpus: documents each followed by a '{EOT}' line")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json from train_bpe")
    parser.add_argument("--out_dir", required=True, help="folder for train.bin, val.bin and meta.json")
    parser.add_argument("--val_fraction", type=float, default=0.05, help="share of the corpus for validation")
    parser.add_argument("--split", choices=SPLITS, default="tail",
                        help="tail: the last val_fraction of the corpus by bytes, whole documents where possible "
                             "(default); random: documents chosen by a hash of --seed and their index")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the random split")
    parser.add_argument("--threads", type=int, default=0, help="worker processes (default 0: one per usable CPU)")
    args = parser.parse_args(argv)
    if args.threads < 0:
        raise TinyGPTError(f"--threads {args.threads} must be >= 0")
    meta = encode_corpus(args.corpus, args.tokenizer, args.out_dir, args.val_fraction, args.seed,
                         capped_threads(args.threads), args.split)
    print(f"wrote {args.out_dir}: {meta['tokens']['train']:,} train and {meta['tokens']['val']:,} val tokens "
          f"({meta['documents']['train']:,} / {meta['documents']['val']:,} documents); split: "
          f"{meta['split']['description']}", file=sys.stderr)
    return meta


if __name__ == "__main__":
    run_cli(main)

"""Stage encode: tokenize a cleaned corpus into flat token files train.bin / val.bin plus meta.json.

Each document's tokens are followed by <|endoftext|>. A document goes to the validation split when a hash of
(seed, document index) falls below val_fraction: deterministic, independent of --threads, and whole documents
only. The corpus is streamed in batches of documents to a pool of worker processes, with a bounded number of
batches in flight, so memory stays flat however large the corpus is; output keeps corpus order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
from collections import deque
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple, Sequence

import numpy as np

from tinygpt.common import TinyGPTError, atomic_path, progress, require_file, run_cli, sha256_file
from tinygpt.tokenizer.bpe import EOT, Tokenizer

SEPARATOR_LINE = f"{EOT}\n".encode()
BATCH_BYTES = 1 << 20  # corpus text per worker task
SPLIT_RULE = "blake2b(f'{seed}:{document_index}') as a fraction of 2**64 < val_fraction"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def is_val_document(seed: int, index: int, val_fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


class Batch(NamedTuple):
    first_index: int
    documents: list[bytes]
    n_bytes: int  # corpus bytes consumed, separators included (for the progress bar)


def iter_document_batches(f: BinaryIO, digest) -> Iterator[Batch]:
    """Stream a cleaned corpus (documents each followed by a `<|endoftext|>` line) as batches of raw documents.

    Every line read also goes into `digest`, so the corpus checksum costs no second pass.
    """
    documents: list[bytes] = []
    lines: list[bytes] = []
    first_index, size, consumed = 0, 0, 0
    for line in f:
        digest.update(line)
        consumed += len(line)
        if line == SEPARATOR_LINE or line == SEPARATOR_LINE[:-1]:
            document = b"".join(lines)[:-1]  # the newline before the separator belongs to it
            lines = []
            if document.strip():
                documents.append(document)
                size += len(document)
        else:
            lines.append(line)
        if size >= BATCH_BYTES:
            yield Batch(first_index, documents, consumed)
            first_index += len(documents)
            documents, size, consumed = [], 0, 0
    tail = b"".join(lines).rstrip(b"\n")  # a last document without its separator still counts
    if tail.strip():
        documents.append(tail)
    if documents or consumed:
        yield Batch(first_index, documents, consumed)


class EncodedBatch(NamedTuple):
    train: np.ndarray
    val: np.ndarray
    n_train_docs: int
    n_val_docs: int
    last_doc_len: int  # tokens of the batch's last document (with its <|endoftext|>), 0 when empty
    last_doc_is_val: bool
    n_bytes: int


_tokenizer: Tokenizer | None = None  # one per worker process, loaded once by _init_worker


def _init_worker(tokenizer_json: str) -> None:
    global _tokenizer
    _tokenizer = Tokenizer.from_json_str(tokenizer_json)


def _encode_batch(batch: Batch, seed: int, val_fraction: float) -> EncodedBatch:
    tok = _tokenizer
    splits: tuple[list[int], list[int]] = ([], [])
    counts = [0, 0]
    last_len, last_is_val = 0, False
    for offset, raw in enumerate(batch.documents):
        last_is_val = is_val_document(seed, batch.first_index + offset, val_fraction)
        ids = tok.encode_ordinary(raw.decode("utf-8", errors="replace"))
        ids.append(tok.eot_id)
        splits[last_is_val].extend(ids)
        counts[last_is_val] += 1
        last_len = len(ids)
    dtype = token_dtype(tok.vocab_size)
    return EncodedBatch(np.array(splits[0], dtype=dtype), np.array(splits[1], dtype=dtype), counts[0], counts[1],
                        last_len, last_is_val, batch.n_bytes)


def _encoded_batches(batches: Iterator[Batch], tokenizer_json: str, seed: int, val_fraction: float,
                     threads: int) -> Iterator[EncodedBatch]:
    """Encode batches in corpus order, with at most 2 * threads batches in flight (bounded memory)."""
    if threads <= 1:
        _init_worker(tokenizer_json)
        for batch in batches:
            yield _encode_batch(batch, seed, val_fraction)
        return
    with multiprocessing.get_context("fork").Pool(threads, _init_worker, (tokenizer_json,)) as pool:
        in_flight: deque = deque()
        for batch in batches:
            in_flight.append(pool.apply_async(_encode_batch, (batch, seed, val_fraction)))
            if len(in_flight) >= 2 * threads:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


def _move_last_document(src: Path, dst: Path, n_tokens: int, dtype: np.dtype) -> None:
    """Move the final n_tokens of src to the end of dst (to keep both splits non-empty)."""
    n_bytes = n_tokens * dtype.itemsize
    with open(src, "r+b") as f:
        f.seek(-n_bytes, os.SEEK_END)
        tail = f.read()
        f.seek(-n_bytes, os.SEEK_END)
        f.truncate()
    with open(dst, "ab") as f:
        f.write(tail)


def encode_corpus(corpus: str | os.PathLike, tokenizer_path: str | os.PathLike, out_dir: str | os.PathLike,
                  val_fraction: float = 0.05, seed: int = 1337, threads: int = 1) -> dict:
    """Encode `corpus` with the tokenizer at `tokenizer_path` into out_dir/{train.bin,val.bin,meta.json}.

    Returns the meta dict. When there are >= 2 documents and val_fraction > 0, both splits are non-empty
    (if the hash left one empty, the last document moves to it).
    """
    corpus = require_file(corpus, "corpus", "run `tinygpt clean` to create it")
    tokenizer_path = require_file(tokenizer_path, "tokenizer", "run `tinygpt train_bpe` to create it")
    if not 0 <= val_fraction < 1:
        raise TinyGPTError(f"val_fraction {val_fraction} must be in [0, 1), e.g. 0.05")
    if threads < 1:
        raise TinyGPTError(f"threads {threads} must be >= 1")
    tok = Tokenizer.load(tokenizer_path)
    dtype = token_dtype(tok.vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    n_tokens, n_docs = [0, 0], [0, 0]
    last: EncodedBatch | None = None
    corpus_digest = hashlib.sha256()
    bar = progress(total=corpus.stat().st_size, desc="encode", unit="B", unit_scale=True)
    with (atomic_path(out_dir / "train.bin") as train_path, atomic_path(out_dir / "val.bin") as val_path,
          atomic_path(out_dir / "meta.json") as meta_path):
        with open(corpus, "rb") as f, open(train_path, "wb") as train_f, open(val_path, "wb") as val_f:
            batches = iter_document_batches(f, corpus_digest)
            for encoded in _encoded_batches(batches, tok.to_json_str(), seed, val_fraction, threads):
                train_f.write(encoded.train.tobytes())
                val_f.write(encoded.val.tobytes())
                n_tokens[0] += len(encoded.train)
                n_tokens[1] += len(encoded.val)
                n_docs[0] += encoded.n_train_docs
                n_docs[1] += encoded.n_val_docs
                if encoded.last_doc_len:
                    last = encoded
                bar.update(encoded.n_bytes)
        bar.close()
        if last is None:
            raise TinyGPTError(f"corpus {corpus} has no documents; check the clean stage's output")
        empty = [i for i in (0, 1) if n_docs[i] == 0]
        if sum(n_docs) >= 2 and val_fraction > 0 and empty:
            dst = empty[0]  # the last document is in the other split: move it over
            paths = (train_path, val_path)
            _move_last_document(paths[1 - dst], paths[dst], last.last_doc_len, dtype)
            n_tokens[1 - dst] -= last.last_doc_len
            n_tokens[dst] += last.last_doc_len
            n_docs[1 - dst] -= 1
            n_docs[dst] += 1
        meta = {
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "tokens": {"train": n_tokens[0], "val": n_tokens[1]},
            "documents": {"train": n_docs[0], "val": n_docs[1]},
            "tokenizer_sha256": sha256_file(tokenizer_path),
            "corpus_sha256": corpus_digest.hexdigest(),
            "corpus_bytes": corpus.stat().st_size,
            "split": {"val_fraction": val_fraction, "seed": seed, "rule": SPLIT_RULE},
        }
        meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="tinygpt encode", description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True, help=f"cleaned corpus: documents each followed by a '{EOT}' line")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json from train_bpe")
    parser.add_argument("--out_dir", required=True, help="folder for train.bin, val.bin and meta.json")
    parser.add_argument("--val_fraction", type=float, default=0.05, help="share of documents for validation")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the document split")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="worker processes")
    args = parser.parse_args(argv)
    meta = encode_corpus(args.corpus, args.tokenizer, args.out_dir, args.val_fraction, args.seed, args.threads)
    print(f"wrote {args.out_dir}: {meta['tokens']['train']:,} train and {meta['tokens']['val']:,} val tokens "
          f"({meta['documents']['train']:,} / {meta['documents']['val']:,} documents)", file=sys.stderr)
    return meta


if __name__ == "__main__":
    run_cli(main)

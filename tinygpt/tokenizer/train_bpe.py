"""Stage train_bpe: learn byte-level BPE merges from a corpus and save them as a Hugging Face tokenizer.json.

Counting streams the corpus: the file is read in pieces of about 1 MB (long documents cut only where the
GPT-2 pattern splits anyway, see `pieces`), worker processes pre-tokenize the pieces and each keeps one Counter
of the distinct chunks it saw; the parent adds the workers' Counters up once at the end. Memory is the distinct
chunks (a few hundred thousand for 200 MB of code), never the text.

Merging works on the distinct chunks stored as numpy arrays: one array of symbols for all chunks (a -1 between
chunks) with linked-list neighbours, each chunk's count, and for every symbol the positions where it occurs.
A merge finds its occurrences from the position list of one of its two symbols and updates the symbols and the
pair counts next to each occurrence in a few vectorized steps; a heap orders the pairs.

Tie rule: the most frequent pair wins; among pairs with equal counts the smallest (left id, right id) wins.
A pair whose bytes already form a token (by another split) is skipped, so that every token is a distinct byte
string (a Hugging Face vocab maps strings to ids, tiktoken ranks bytes); a safeguard, never seen in practice.
When the corpus runs out of pairs before vocab_size is reached, training stops early with a warning and the
tokenizer's vocab_size is smaller than requested.

The tokenizer's ids: 256 bytes, the merges, then the special tokens RESERVED_SPECIALS (<|im_start|>, <|im_end|>
for the chat format, and <|endoftext|> last); vocab_size counts them all. Chat-token text in the corpus is
counted as ordinary text, as encode_ordinary encodes it (documents end at <|endoftext|> lines).

With a pretrained model (`--from_model`), nothing is learned: the model's own tokenizer.json is checked (it
must be one tinygpt encodes exactly, see `tinygpt.tokenizer.hf_json`) and written as the stage's output.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import os
import queue
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from tinygpt.common import TinyGPTError, capped_threads, progress, require_file, run_cli, worker_context
from tinygpt.tokenizer.bpe import EOT, RESERVED_SPECIALS, Tokenizer, prepare_pretokenizer, pretokenize
from tinygpt.tokenizer.pieces import PIECE_BYTES, iter_pieces

BATCH_BYTES = 1 << 20  # text per task sent to a counting worker


def read_documents(path: str | os.PathLike, max_bytes: int | None = None) -> list[str]:
    """The documents of a cleaned corpus, up to its first max_bytes (the last one cut there, mid-document)."""
    path = require_file(path, "corpus", "run `tinygpt clean` to create it")
    documents: list[str] = []
    parts: list[bytes] = []
    start = 0  # file offset of the document being read
    with open(path, "rb") as f:
        for piece in iter_pieces(f, limit=max_bytes):
            start = start if parts else piece.offset
            parts.append(piece.data)
            if piece.ends_document:
                documents.append(_decode(b"".join(parts), path, start))
                parts = []
    return documents


def _decode(data: bytes, source: object, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TinyGPTError(f"{source} is not UTF-8 text (byte {offset + e.start}); pass a corpus written by "
                           "tinygpt clean") from None


# ---- counting -------------------------------------------------------------------------------------------------

def _count_into(counts: Counter[str], texts: Iterable[str]) -> None:
    for text in texts:
        if EOT in text:  # a special token is never part of a chunk
            for part in text.split(EOT):
                counts.update(pretokenize(part))
        else:
            counts.update(pretokenize(text))


def _count_worker(tasks, results) -> None:
    """Count the chunks of every batch of (offset, bytes or str) items until None, then send the Counter."""
    counts: Counter[str] = Counter()
    try:
        while (batch := tasks.get()) is not None:
            source, items = batch
            _count_into(counts, (text if isinstance(text, str) else _decode(text, source, offset)
                                 for offset, text in items))
        results.put(("ok", counts))
    except TinyGPTError as e:
        results.put(("error", str(e)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        results.put(("error", f"{type(e).__name__}: {e}"))


def _wait(step, workers) -> object:
    """Retry a queue operation until it succeeds; stop if a worker died (killed, out of memory) meanwhile."""
    while True:
        try:
            return step()
        except (queue.Full, queue.Empty):
            dead = [w for w in workers if w.exitcode not in (None, 0)]
            if dead:
                raise TinyGPTError(f"a counting worker exited with code {dead[0].exitcode} (out of memory?); "
                                   "retry with fewer --threads") from None


@contextlib.contextmanager
def _parallel_counter(threads: int) -> Iterator[Callable[..., Counter[str]]]:
    """A function that counts the chunks of batches in `threads` worker processes. The workers start here,
    before the caller opens a progress bar (see `worker_context`)."""
    prepare_pretokenizer()  # once, here: forked workers inherit it
    ctx = worker_context()
    tasks, results = ctx.Queue(maxsize=2 * threads), ctx.Queue()
    workers = [ctx.Process(target=_count_worker, args=(tasks, results), daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()

    def count(batches: Iterator[tuple[str, list]], bar=None) -> Counter[str]:
        for batch in batches:
            _wait(lambda: tasks.put(batch, timeout=1.0), workers)
            if bar is not None:
                bar.update(sum(len(text) for _, text in batch[1]))
        for _ in workers:
            _wait(lambda: tasks.put(None, timeout=1.0), workers)
        total: Counter[str] = Counter()
        for _ in workers:
            status, counts = _wait(lambda: results.get(timeout=1.0), workers)
            if status != "ok":
                raise TinyGPTError(counts)
            if total:
                total.update(counts)
            else:
                total = counts
            del counts
        for w in workers:
            w.join()
        return total

    try:
        yield count
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()


def _batched(items: Iterable[tuple[int, bytes | str]], source: str) -> Iterator[tuple[str, list]]:
    batch, size = [], 0
    for offset, text in items:
        batch.append((offset, text))
        size += len(text)
        if size >= BATCH_BYTES:
            yield source, batch
            batch, size = [], 0
    if batch:
        yield source, batch


def count_chunks(texts: Iterable[str], threads: int = 1) -> Counter[str]:
    """How often each pre-tokenized chunk occurs in texts (counting uses `threads` processes)."""
    if threads <= 1:
        counts: Counter[str] = Counter()
        _count_into(counts, texts)
        return counts
    with _parallel_counter(threads) as count:
        return count(_batched(((0, t) for t in texts), "text"))


def count_corpus_chunks(path: str | os.PathLike, threads: int = 1, max_bytes: int | None = None,
                        show_progress: bool = True) -> tuple[Counter[str], int]:
    """Chunk counts of a cleaned corpus (its first max_bytes), streamed; also the number of documents."""
    path = require_file(path, "corpus", "run `tinygpt clean` to create it")
    total_bytes = path.stat().st_size if max_bytes is None else min(max_bytes, path.stat().st_size)
    n_documents = 0

    def items(f) -> Iterator[tuple[int, bytes]]:
        nonlocal n_documents
        for piece in iter_pieces(f, PIECE_BYTES, limit=max_bytes):
            n_documents += piece.ends_document
            yield piece.offset, piece.data

    with contextlib.ExitStack() as stack:
        parallel_count = stack.enter_context(_parallel_counter(threads)) if threads > 1 else None
        bar = stack.enter_context(progress(total=total_bytes, desc="count chunks", unit="B", unit_scale=True,
                                           **({} if show_progress else {"disable": True})))
        f = stack.enter_context(open(path, "rb"))
        if parallel_count is None:
            counts: Counter[str] = Counter()
            for offset, data in items(f):
                _count_into(counts, [_decode(data, path, offset)])
                bar.update(len(data))
        else:
            counts = parallel_count(_batched(items(f), str(path)), bar)
    return counts, n_documents


# ---- merging --------------------------------------------------------------------------------------------------

class _Words:
    """The distinct chunks as one array of symbols with -1 between chunks; merged-away symbols become -2.

    nxt/prv link each live symbol to its live neighbours (a -1 ends a chunk) and cnt holds each position's chunk
    count. Where each pair occurs is kept in blocks: a pair (a, b) only ever appears in the merge that creates
    max(a, b) (every pair a merge creates holds its new id), or at the start if both are bytes, so block m lists
    the positions of the pairs created with id m, grouped by the pair's other id (entries may be stale).
    """

    def __init__(self, chunk_counts: Mapping[str, int]) -> None:
        n_chunks = len(chunk_counts)
        lengths = np.fromiter((len(c) if c.isascii() else len(c.encode("utf-8")) for c in chunk_counts),
                              np.int64, n_chunks)
        counts = np.fromiter(chunk_counts.values(), np.int64, n_chunks)
        data = np.frombuffer("".join(chunk_counts).encode("utf-8"), np.uint8)
        keep = (lengths > 1) & (counts > 0)  # a single byte has no pair
        data = data[np.repeat(keep, lengths)]
        lengths, counts = lengths[keep], counts[keep]
        size = len(data) + len(lengths) + 1
        self.index_type = np.int32 if size < 2**31 else np.int64
        sentinels = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths + 1, out=sentinels[1:])  # the -1 before the first chunk and after each chunk
        self.sym = np.full(size, -1, np.int32)
        is_symbol = np.ones(size, bool)
        is_symbol[sentinels] = False
        self.sym[is_symbol] = data
        del data, is_symbol
        count_type = np.int32 if counts.size == 0 or counts.max() < 2**31 else np.int64
        self.cnt = np.zeros(size, count_type)
        self.cnt[1:] = np.repeat(counts, lengths + 1)
        self.nxt = np.arange(1, size + 1, dtype=self.index_type)
        self.nxt[-1] = size - 1
        self.prv = np.arange(-1, size - 1, dtype=self.index_type)
        self.prv[0] = 0
        # block of the byte pairs: local key a * 256 + b
        left = np.flatnonzero((self.sym[:-1] >= 0) & (self.sym[1:] >= 0)).astype(self.index_type)
        local = (self.sym[left] * 256 + self.sym[left + 1]).astype(np.uint16)
        self.blocks: list[tuple[np.ndarray, np.ndarray]] = [self._block(local, left)]
        self.mark_left = np.zeros(size, bool)  # scratch: the left / right halves of this merge's occurrences
        self.mark_right = np.zeros(size, bool)

    @staticmethod
    def _block(local: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(local, kind="stable")
        return local[order], positions[order]

    def pair_counts(self) -> dict[int, int]:
        """Count of every adjacent pair of bytes, keyed by left << 32 | right."""
        local, positions = self.blocks[0]
        sums = np.bincount(local, weights=self.cnt[positions], minlength=65536)
        found = np.flatnonzero(sums)
        keys = ((found >> 8) << 32) | (found & 255)
        return dict(zip(keys.tolist(), np.rint(sums[found]).astype(np.int64).tolist()))

    def occurrences(self, a: int, b: int) -> np.ndarray:
        """Ascending positions of the non-overlapping occurrences of (a, b), leftmost first within a run."""
        top = max(a, b)
        if top < 256:
            local_keys, positions = self.blocks[0]
            local = a * 256 + b
        else:
            local_keys, positions = self.blocks[top - 255]
            local = a if b == top else top + 1 + b  # (x, top) or (top, y)
        local = local_keys.dtype.type(local)  # a Python int would make searchsorted convert the whole block
        lo, hi = local_keys.searchsorted(local, "left"), local_keys.searchsorted(local, "right")
        found = np.sort(positions[lo:hi])
        sym = self.sym
        found = found[(sym[found] == a) & (sym[self.nxt[found]] == b)]
        if a == b and len(found) > 1:  # in a run "a a a" only every second pair merges, from the left
            follows = np.zeros(len(found), bool)
            follows[1:] = self.nxt[found[:-1]] == found[1:]
            run_start = np.maximum.accumulate(np.where(follows, 0, np.arange(len(found))))
            found = found[(np.arange(len(found)) - run_start) % 2 == 0]
        return found

    def merge(self, a: int, b: int, new: int, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Merge (a, b) into `new` at positions `at`; returns the changed pair keys and their count deltas."""
        sym, nxt, prv = self.sym, self.nxt, self.prv
        right = nxt[at]
        count = self.cnt[at].astype(np.float64)
        self.mark_left[at] = True
        self.mark_right[right] = True
        # left neighbour x: (x, a) becomes (x, new), or (new, new) when x is the right half of an occurrence
        before = prv[at]
        x = sym[before]
        has = x >= 0
        x, c_left, before = x[has], count[has], before[has]
        pairs_new = self.mark_right[before]
        # right neighbour y: (b, y) becomes (new, y), unless y starts the next occurrence (counted there)
        after = nxt[right]
        y = sym[after]
        has = (y >= 0) & ~self.mark_left[after]
        y, c_right, at_right = y[has], count[has], at[has]
        self.mark_left[at] = False
        self.mark_right[right] = False
        sym[at] = new
        sym[right] = -2
        nxt[at] = after
        prv[after] = at
        # the new pairs' positions, as block `new` with local keys x for (x, new) and new + 1 + y for (new, y)
        left_positions = np.where(pairs_new, prv[before], before)
        x_new = np.where(pairs_new, new, x)
        local_type = np.uint16 if 2 * new + 2 < 65536 else np.int32  # 16 bits sort by radix sort
        self.blocks.append(self._block(np.concatenate((x_new, y + (new + 1))).astype(local_type),
                                       np.concatenate((left_positions, at_right))))
        n_ids = new + 1
        lost_left = np.bincount(x, weights=c_left, minlength=n_ids)  # (x, a)
        gained_left = np.bincount(x_new, weights=c_left, minlength=n_ids)  # (x, new)
        moved_right = np.bincount(y, weights=c_right, minlength=n_ids)  # (b, y) -> (new, y)
        keys, deltas = [], []
        for ids, sums, high, low in ((lost_left, -1, None, a), (gained_left, 1, None, new),
                                     (moved_right, -1, b, None), (moved_right, 1, new, None)):
            found = np.flatnonzero(ids)
            keys.append((found << 32) | low if high is None else (high << 32) | found)
            deltas.append(sums * np.rint(ids[found]).astype(np.int64))
        return np.concatenate(keys), np.concatenate(deltas)


_KEY_MASK = (1 << 64) - 1


def learn_merges(chunk_counts: Mapping[str, int], n_merges: int, show_progress: bool = True) -> list[tuple[int, int]]:
    """Learn up to n_merges merges from chunk counts; merge k creates id 256 + k."""
    return _learn_merges(_Words(chunk_counts), n_merges, show_progress)


def _learn_merges(words: _Words, n_merges: int, show_progress: bool) -> list[tuple[int, int]]:
    pair_count = words.pair_counts()
    # One heap entry per live pair: (-count << 64) + key orders by count, then by the smaller pair. Counts only
    # fall after a pair appears (a merge creates pairs that contain its new id), so an entry whose count is
    # above the pair's true count is stale: it is pushed again with the true one when it comes up.
    heap = [(-c << 64) + key for key, c in pair_count.items()]
    heapq.heapify(heap)
    vocab = [bytes([i]) for i in range(256)]
    known = set(vocab)
    merges: list[tuple[int, int]] = []
    bar = progress(total=n_merges, desc="bpe merges", unit="merge", **({} if show_progress else {"disable": True}))
    while len(merges) < n_merges and heap:
        entry = heapq.heappop(heap)
        key, count = entry & _KEY_MASK, -(entry >> 64)
        true_count = pair_count.get(key, 0)
        if true_count <= 0:
            continue
        if true_count != count:
            heapq.heappush(heap, (-true_count << 64) + key)
            continue
        a, b = key >> 32, key & 0xFFFFFFFF
        merged_bytes = vocab[a] + vocab[b]
        if merged_bytes in known:
            continue  # already a token by another split; see the module docstring
        new_id = 256 + len(merges)
        merges.append((a, b))
        vocab.append(merged_bytes)
        known.add(merged_bytes)
        del pair_count[key]
        keys, deltas = words.merge(a, b, new_id, words.occurrences(a, b))
        for changed, delta in zip(keys.tolist(), deltas.tolist()):  # each new pair once, after the losses
            if changed == key:
                continue
            total = pair_count.get(changed, 0) + delta
            if total > 0:
                pair_count[changed] = total
            else:
                pair_count.pop(changed, None)
            if delta > 0:  # a new pair (it holds new_id)
                heapq.heappush(heap, (-total << 64) + changed)
        bar.update()
    bar.close()
    return merges


# ---- the stage ------------------------------------------------------------------------------------------------

N_FIXED = 256 + len(RESERVED_SPECIALS)  # the ids that are not merges


def _check_vocab_size(vocab_size: int) -> int:
    """The number of merges vocab_size leaves room for."""
    if vocab_size < N_FIXED:
        raise TinyGPTError(f"vocab_size {vocab_size} is too small: it must be at least {N_FIXED} (256 byte tokens "
                           f"+ the special tokens {', '.join(RESERVED_SPECIALS)}); pick e.g. 4096")
    return vocab_size - N_FIXED


def _tokenizer_from(words: _Words, n_merges: int, vocab_size: int, show_progress: bool) -> Tokenizer:
    merges = _learn_merges(words, n_merges, show_progress)
    if len(merges) < n_merges:
        print(f"warning: the training text only supports {len(merges)} of the {n_merges} merges wanted, so the "
              f"tokenizer has vocab_size {N_FIXED + len(merges)} instead of {vocab_size}; use more text or a "
              "smaller --vocab_size", file=sys.stderr)
    return Tokenizer(merges, RESERVED_SPECIALS)


def train_bpe(texts: Iterable[str], vocab_size: int, threads: int = 1, show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE tokenizer of vocab_size ids (256 bytes + merges + RESERVED_SPECIALS) on texts.

    Stops early, with a warning on stderr, when the texts have fewer distinct pairs than merges wanted;
    the returned tokenizer's vocab_size is then smaller than requested.
    """
    n_merges = _check_vocab_size(vocab_size)
    return _tokenizer_from(_Words(count_chunks(texts, threads)), n_merges, vocab_size, show_progress)


def train_bpe_file(corpus: str | os.PathLike, vocab_size: int, threads: int = 1, max_bytes: int | None = None,
                   show_progress: bool = True) -> tuple[Tokenizer, int]:
    """train_bpe on a cleaned corpus file (its first max_bytes), streamed; also the number of documents read."""
    n_merges = _check_vocab_size(vocab_size)
    counts, n_documents = count_corpus_chunks(corpus, threads, max_bytes, show_progress)
    if not n_documents:
        raise TinyGPTError(f"corpus {corpus} has no documents; check the clean stage's output")
    words = _Words(counts)
    del counts  # the merges need only the arrays: free the chunk strings first
    return _tokenizer_from(words, n_merges, vocab_size, show_progress), n_documents


def tokenizer_from_model(source: str | os.PathLike, out: str | os.PathLike) -> Tokenizer:
    """Take a pretrained model's tokenizer instead of learning one: `source` is a Hugging Face model folder
    (its tokenizer.json is used) or a tokenizer.json file. It is checked to be a tokenizer tinygpt encodes
    exactly as Hugging Face does (TinyGPTError naming what is unsupported otherwise), then written to `out`."""
    path = Path(source)
    if path.is_dir():
        path = path / "tokenizer.json"
    path = require_file(path, "tokenizer", "pass a Hugging Face model folder (with tokenizer.json) or the file")
    tokenizer = Tokenizer.load(path)
    tokenizer.save(out)
    return tokenizer


def main(argv: Sequence[str] | None = None) -> Tokenizer:
    parser = argparse.ArgumentParser(prog="tinygpt train_bpe", description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", help=f"cleaned corpus to learn from: documents each followed by a '{EOT}' line")
    parser.add_argument("--from_model", help="take a pretrained model's tokenizer instead of learning one (--corpus "
                                             "and --vocab_size are then unused): a Hugging Face model folder or its "
                                             "tokenizer.json (GPT-2, SmolLM, Llama 3, Qwen2 families)")
    parser.add_argument("--out", required=True, help="tokenizer.json to write (Hugging Face format)")
    parser.add_argument("--vocab_size", type=int, default=4096, help="ids in all, counting 256 bytes and the "
                             f"special tokens {', '.join(RESERVED_SPECIALS)} (default 4096)")
    parser.add_argument("--max_bytes", type=int, default=0, help="train on the first N bytes of the corpus "
                                                                   "(default 0: all)")
    parser.add_argument("--threads", type=int, default=0,
                        help="processes counting chunks (default 0: one per usable CPU)")
    args = parser.parse_args(argv)
    if args.max_bytes < 0 or args.threads < 0:
        raise TinyGPTError("--max_bytes and --threads must be >= 0")
    if args.from_model:
        tokenizer = tokenizer_from_model(args.from_model, args.out)
        print(f"saved {args.out}: the tokenizer of {args.from_model}, vocab_size {tokenizer.vocab_size}",
              file=sys.stderr)
        return tokenizer
    if not args.corpus:
        raise TinyGPTError("train_bpe needs --corpus (to learn a tokenizer) or --from_model (to take a model's)")
    tokenizer, n_documents = train_bpe_file(args.corpus, args.vocab_size, capped_threads(args.threads),
                                            args.max_bytes or None)
    tokenizer.save(args.out)
    print(f"saved {args.out}: vocab_size {tokenizer.vocab_size}, {len(tokenizer.merges)} merges, "
          f"trained on {n_documents} documents", file=sys.stderr)
    return tokenizer


if __name__ == "__main__":
    run_cli(main)

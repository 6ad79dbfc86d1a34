"""Stage train_bpe: learn byte-level BPE merges from a corpus and save them as a Hugging Face tokenizer.json.

Training never looks at raw text twice: chunks from the GPT-2 regex are counted once (a Counter of unique
chunks, in parallel with --threads), then merges run on the unique chunks with incremental pair counts.

Tie rule: the most frequent pair wins; among pairs with equal counts the smallest (left id, right id) wins.
A pair whose bytes already form a token (by another split) would be skipped, so that every token is a distinct
byte string (a Hugging Face vocab maps strings to ids, tiktoken ranks bytes); a safeguard, never seen in practice.
When the corpus runs out of pairs before vocab_size is reached, training stops early with a warning and the
tokenizer's vocab_size is smaller than requested.
"""

from __future__ import annotations

import argparse
import heapq
import multiprocessing
import os
import sys
from collections import Counter, defaultdict
from typing import Iterable, Mapping, Sequence

from tinygpt.data.clean import DOC_END, iter_documents
from tinygpt.common import TinyGPTError, progress, run_cli
from tinygpt.tokenizer.bpe import EOT, Tokenizer, compiled_pattern


def read_documents(path: str | os.PathLike, max_bytes: int | None = None) -> list[str]:
    """The documents of a cleaned corpus, up to its first max_bytes (the last one cut there, mid-document)."""
    documents: list[str] = []
    budget = max_bytes
    for document in iter_documents(path):
        if not document.strip():
            continue
        if budget is not None:
            data = document.encode("utf-8")
            if len(data) >= budget:  # the cut may split a character: drop its partial bytes
                cut = data[:budget].decode("utf-8", errors="ignore")
                documents += [cut] if cut.strip() else []
                break
            budget -= len(data) + len(DOC_END)  # the separator is ASCII
        documents.append(document)
        if budget is not None and budget <= 0:
            break
    return documents


def _count_batch(texts: Sequence[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    findall = compiled_pattern().findall
    for text in texts:
        for part in text.split(EOT):  # a special token is never part of a chunk
            counts.update(findall(part))
    return counts


_forked_texts: Sequence[str] = ()  # what forked counting workers read: inherited, never pickled


def _count_range(bounds: tuple[int, int]) -> Counter[str]:
    return _count_batch(_forked_texts[bounds[0]:bounds[1]])


def _balanced_ranges(texts: Sequence[str], n_ranges: int) -> list[tuple[int, int]]:
    """Split texts into up to n_ranges consecutive index ranges holding about the same number of characters."""
    target = sum(map(len, texts)) / n_ranges
    ranges, start, size = [], 0, 0
    for i, text in enumerate(texts):
        size += len(text)
        if size >= target:
            ranges.append((start, i + 1))
            start, size = i + 1, 0
    if start < len(texts):
        ranges.append((start, len(texts)))
    return ranges


def count_chunks(texts: Iterable[str], threads: int = 1) -> Counter[str]:
    """How often each pre-tokenized chunk occurs in texts (counting uses `threads` processes)."""
    global _forked_texts
    texts = texts if isinstance(texts, Sequence) else list(texts)
    if threads <= 1 or len(texts) < 2:
        return _count_batch(texts)
    counts: Counter[str] = Counter()
    _forked_texts = texts
    try:
        with multiprocessing.get_context("fork").Pool(threads) as pool:
            for partial in pool.imap_unordered(_count_range, _balanced_ranges(texts, 2 * threads)):
                counts.update(partial)
    finally:
        _forked_texts = ()
    return counts


def learn_merges(chunk_counts: Mapping[str, int], n_merges: int, show_progress: bool = True) -> list[tuple[int, int]]:
    """Learn up to n_merges merges from chunk counts; merge k creates id 256 + k."""
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    counts = list(chunk_counts.values())
    vocab = [bytes([i]) for i in range(256)]
    known = set(vocab)

    pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    pair_words: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += count
            pair_words[pair].add(w)
    # Max-heap by (count, then smallest pair). Counts of existing pairs only ever fall (a merge creates pairs
    # that contain the new id), so an entry is stale exactly when its count is above the true one: re-push it.
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    bar = progress(total=n_merges, desc="bpe merges", unit="merge", **({} if show_progress else {"disable": True}))
    while len(merges) < n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count <= 0:
            continue
        if count != -neg_count:
            heapq.heappush(heap, (-count, pair))
            continue
        merged_bytes = vocab[pair[0]] + vocab[pair[1]]
        if merged_bytes in known:
            continue  # already a token by another split; see the module docstring
        new_id = 256 + len(merges)
        merges.append(pair)
        vocab.append(merged_bytes)
        known.add(merged_bytes)
        new_pairs = _apply_merge(pair, new_id, words, counts, pair_counts, pair_words)
        for p in new_pairs:
            heapq.heappush(heap, (-pair_counts[p], p))
        del pair_counts[pair], pair_words[pair]
        bar.update()
    bar.close()
    return merges


def _apply_merge(pair: tuple[int, int], new_id: int, words: list[list[int]], counts: list[int],
                 pair_counts: defaultdict[tuple[int, int], int],
                 pair_words: defaultdict[tuple[int, int], set[int]]) -> set[tuple[int, int]]:
    """Merge `pair` in every word indexed under it, updating only the pair counts next to each occurrence.

    Returns the new pairs (they contain new_id). The word index is add-only: a word may stay listed under a
    pair it lost, which costs one scan that finds nothing, far cheaper than keeping the index exact.
    """
    a, b = pair
    new_pairs: set[tuple[int, int]] = set()
    for w in pair_words[pair]:
        word = words[w]
        if a not in word:
            continue
        count, n, i = counts[w], len(word), 0
        merged: list[int] = []
        while i < n:
            if word[i] == a and i + 1 < n and word[i + 1] == b:
                if merged:  # left neighbour: (x, a) becomes (x, new); x is new_id after a merge just before
                    pair_counts[word[i - 1], a] -= count
                    left = (merged[-1], new_id)
                    pair_counts[left] += count
                    pair_words[left].add(w)
                    new_pairs.add(left)
                if i + 2 < n and not (word[i + 2] == a and i + 3 < n and word[i + 3] == b):
                    right_id = word[i + 2]  # right neighbour, unless the next occurrence starts there
                    pair_counts[b, right_id] -= count
                    right = (new_id, right_id)
                    pair_counts[right] += count
                    pair_words[right].add(w)
                    new_pairs.add(right)
                merged.append(new_id)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        words[w] = merged
    return new_pairs


def train_bpe(texts: Iterable[str], vocab_size: int, threads: int = 1, show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE tokenizer of vocab_size ids (256 bytes + merges + <|endoftext|>) on texts.

    Stops early, with a warning on stderr, when the texts have fewer distinct pairs than merges wanted;
    the returned tokenizer's vocab_size is then smaller than requested.
    """
    if vocab_size < 257:
        raise TinyGPTError(f"vocab_size {vocab_size} is too small: it must be at least 257 "
                           f"(256 byte tokens + {EOT}); pick e.g. 4096")
    n_merges = vocab_size - 257
    chunk_counts = count_chunks(texts, threads)
    merges = learn_merges(chunk_counts, n_merges, show_progress)
    if len(merges) < n_merges:
        print(f"warning: the training text only supports {len(merges)} of the {n_merges} merges wanted, so the "
              f"tokenizer has vocab_size {257 + len(merges)} instead of {vocab_size}; use more text or a smaller "
              "--vocab_size", file=sys.stderr)
    return Tokenizer(merges)


def main(argv: Sequence[str] | None = None) -> Tokenizer:
    parser = argparse.ArgumentParser(prog="tinygpt train_bpe", description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True, help="cleaned corpus: documents each followed by a "
                                                        f"'{EOT}' line")
    parser.add_argument("--out", required=True, help="tokenizer.json to write (Hugging Face format)")
    parser.add_argument("--vocab_size", type=int, default=4096, help="ids in all, counting 256 bytes and "
                                                                      f"{EOT} (default 4096)")
    parser.add_argument("--max_bytes", type=int, default=0, help="train on the first N bytes of the corpus "
                                                                   "(default 0: all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="processes counting chunks (default: all cores)")
    args = parser.parse_args(argv)
    if args.max_bytes < 0 or args.threads < 1:
        raise TinyGPTError("--max_bytes must be >= 0 and --threads >= 1")
    documents = read_documents(args.corpus, args.max_bytes or None)
    if not documents:
        raise TinyGPTError(f"corpus {args.corpus} has no documents; check the clean stage's output")
    tokenizer = train_bpe(documents, args.vocab_size, threads=args.threads)
    tokenizer.save(args.out)
    print(f"saved {args.out}: vocab_size {tokenizer.vocab_size}, {len(tokenizer.merges)} merges, "
          f"trained on {len(documents)} documents", file=sys.stderr)
    return tokenizer


if __name__ == "__main__":
    run_cli(main)

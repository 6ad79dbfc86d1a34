"""Benchmark: corpus encoding throughput (MB/s), ours against tiktoken built from the same merges.

    python bench/bench_encode.py [--corpus PATH | --synthetic] [--mb 10] [--vocab_size 4096] [--threads N]
Default text: the builtin stories; --synthetic: Zipf-distributed invented words (many more distinct words).
Peers on the same text: tiktoken's single-call encode_ordinary (the target: our encode_corpus with all cores
at least matches it) and, for honesty, tiktoken's encode_ordinary_batch with the same number of threads.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TINYGPT_NO_PROGRESS", "1")

from bench_bpe import make_corpus, synthesize_corpus  # noqa: E402

from tinygpt.tokenizer.encode import encode_corpus  # noqa: E402
from tinygpt.tokenizer.bpe import EOT, GPT2_PATTERN, Tokenizer  # noqa: E402
from tinygpt.tokenizer.train_bpe import read_documents, train_bpe  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    import tiktoken

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", help="cleaned corpus (default: generate one)")
    parser.add_argument("--synthetic", action="store_true", help="encode synthetic text with a larger vocabulary")
    parser.add_argument("--mb", type=float, default=10.0, help="text to encode in MB (default 10)")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        if args.corpus:  # the first --mb of it, cut after a whole document
            data = Path(args.corpus).read_bytes()[:int(args.mb * 1e6)]
            corpus.write_bytes(data[:data.rfind(f"\n{EOT}\n".encode()) + len(EOT) + 2])
        elif args.synthetic:
            synthesize_corpus(corpus, int(args.mb * 1e6))
        else:
            make_corpus(corpus, int(args.mb * 1e6))
        documents = read_documents(corpus)
        tok = train_bpe(documents[: max(1, len(documents) // 5)], args.vocab_size, show_progress=False)
        tok_path = tmp / "tokenizer.json"
        tok.save(tok_path)
        text = corpus.read_text(encoding="utf-8")
        mb = len(text.encode("utf-8")) / 1e6
        print(f"text: {mb:.1f} MB, {len(documents)} documents; vocab_size {tok.vocab_size}; threads {args.threads}")

        ranks = {tok.vocab[i]: i for i in range(256 + len(tok.merges))}
        enc = tiktoken.Encoding("tinygpt-bench", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                special_tokens={EOT: tok.eot_id})
        tt_ids, tt_s = timed(lambda: enc.encode_ordinary(text))
        _, tt_batch_s = timed(lambda: enc.encode_ordinary_batch(documents, num_threads=args.threads))
        ours_ids, ours_1_s = timed(lambda: Tokenizer.load(tok_path).encode_ordinary(text))
        assert ours_ids == tt_ids, "token ids differ from tiktoken's"
        _, ours_corpus_1_s = timed(lambda: encode_corpus(corpus, tok_path, tmp / "out1", 0.05, 1337, 1))
        _, ours_corpus_s = timed(lambda: encode_corpus(corpus, tok_path, tmp / "out", 0.05, 1337, args.threads))

    rows = [
        ("tiktoken encode_ordinary (1 call, 1 thread)", tt_s),
        (f"tiktoken encode_ordinary_batch ({args.threads} threads)", tt_batch_s),
        ("ours Tokenizer.encode_ordinary (1 thread, cold cache)", ours_1_s),
        ("ours encode_corpus (1 process, writes files)", ours_corpus_1_s),
        (f"ours encode_corpus ({args.threads} processes, writes files)", ours_corpus_s),
    ]
    for name, seconds in rows:
        print(f"{name:58s} {mb / seconds:7.2f} MB/s")
    print(f"ratio ours encode_corpus / tiktoken encode_ordinary: {tt_s / ours_corpus_s:.2f} (target >= 1); "
          f"ours 1 thread / tiktoken: {tt_s / ours_1_s:.2f}")


if __name__ == "__main__":
    main()

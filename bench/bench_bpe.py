"""Benchmark: our BPE training against Hugging Face tokenizers' BpeTrainer (same regex, same vocab size).

Prints wall time of both trainers and bytes per token of both tokenizers on held-out text.
    python bench/bench_bpe.py [--corpus PATH] [--mb 10] [--vocab_size 4096] [--threads N]
Without --corpus the text comes from tinygpt.data.stories.generator when that module exists, else from a small synthesizer.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinygpt.tokenizer.bpe import EOT, GPT2_PATTERN  # noqa: E402
from tinygpt.tokenizer.train_bpe import read_documents, train_bpe  # noqa: E402


def synthesize_corpus(path: Path, n_bytes: int, seed: int = 0) -> None:
    """English-like documents: Zipf-distributed invented words, names, numbers, punctuation, paragraphs."""
    rng = random.Random(seed)
    syllables = ["ba", "ke", "lo", "mi", "ra", "to", "su", "ne", "di", "fa", "the", "ing", "er", "and", "st",
                 "ou", "ch", "sh", "an", "el", "ion", "ly", "re", "con", "pre", "ful", "ness", "ow", "ay", "é"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.choice([1, 2, 2, 3, 3, 4, 5]))) for _ in range(60000)]
    cum_weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(words))))  # Zipf's law
    names = [w.capitalize() for w in words[100:160]]
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < n_bytes:
            paragraphs = []
            for _ in range(rng.randint(1, 4)):
                sentences = []
                for _ in range(rng.randint(2, 8)):
                    sentence = rng.choices(words, cum_weights=cum_weights, k=rng.randint(4, 16))
                    if rng.random() < 0.3:
                        sentence.insert(rng.randrange(len(sentence)), rng.choice(names))
                    if rng.random() < 0.1:
                        sentence.append(str(rng.randint(0, 2025)))
                    text = " ".join(sentence)
                    if rng.random() < 0.15:
                        text = f'"{text.capitalize()}," said {rng.choice(names)}'
                    sentences.append(text[0].upper() + text[1:] + rng.choice([".", ".", ".", "!", "?"]))
                paragraphs.append(" ".join(sentences))
            doc = "\n\n".join(paragraphs)
            f.write(f"{doc}\n{EOT}\n")
            written += len(doc) + len(EOT) + 2


def make_corpus(path: Path, n_bytes: int) -> None:
    try:
        from tinygpt.data.stories import generator as stories  # noqa: F401  (another worker's procedural story generator)
    except ImportError:
        synthesize_corpus(path, n_bytes)
        return
    import subprocess
    subprocess.run([sys.executable, "-m", "tinygpt.data.download", "--source", "builtin", "--size", str(n_bytes),
                    "--out", str(path)], check=True)


def train_hf(documents: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(documents, trainer)
    return hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", help="cleaned corpus (default: generate one)")
    parser.add_argument("--mb", type=float, default=10.0, help="training text in MB (default 10)")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    n_bytes = int(args.mb * 1e6)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(args.corpus) if args.corpus else Path(tmp) / "corpus.txt"
        if not args.corpus:
            make_corpus(corpus, int(n_bytes * 1.1))
        documents = read_documents(corpus, int(n_bytes * 1.1))
    held_out = documents[-max(1, len(documents) // 11):]
    train = documents[:len(documents) - len(held_out)]
    print(f"training text: {sum(map(len, train)) / 1e6:.1f} MB in {len(train)} documents; "
          f"vocab_size {args.vocab_size}; threads {args.threads}")

    start = time.perf_counter()
    ours = train_bpe(train, args.vocab_size, threads=args.threads, show_progress=False)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    hf = train_hf(train, args.vocab_size)
    hf_s = time.perf_counter() - start
    print(f"train time: ours {ours_s:.2f} s, HF tokenizers {hf_s:.2f} s, ratio ours/HF {ours_s / hf_s:.2f} "
          "(target <= 1; memory and larger corpora: bench_data_scale.py)")

    held_text = "\n".join(held_out)
    n_bytes_held = len(held_text.encode("utf-8"))
    ours_bpt = n_bytes_held / len(ours.encode_ordinary(held_text))
    hf_bpt = n_bytes_held / len(hf.encode(held_text).ids)
    print(f"held-out bytes/token: ours {ours_bpt:.4f}, HF {hf_bpt:.4f}, ours/HF {ours_bpt / hf_bpt:.4f} "
          f"(target >= 0.99); vocab ours {ours.vocab_size}, HF {hf.get_vocab_size()}")


if __name__ == "__main__":
    main()

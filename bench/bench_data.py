"""Throughput of the data stages against the disk they run on, measured in the same run.

    python bench/bench_data.py [--size 20MB] [--workers N] [--dir /tmp]

generate: the builtin story generator writing --size bytes (tinygpt.data.download), vs. plain sequential writes of
          the same bytes (with the same fsync the atomic output does).
clean:    tinygpt.data.clean on that corpus, vs. plain sequential reads of the same file.
A ratio of 1.0 would mean the stage runs at disk speed; the file is in the page cache for both reads.
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

from tinygpt.data.clean import clean_corpus  # noqa: E402
from tinygpt.data.download import generate_builtin, parse_size  # noqa: E402

BLOCK = 1 << 20


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def plain_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        for i in range(0, len(data), BLOCK):
            f.write(data[i : i + BLOCK])
        f.flush()
        os.fsync(f.fileno())


def plain_read(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(BLOCK << 2):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="20MB", help="corpus size (bytes, or like 20MB)")
    parser.add_argument("--workers", type=int, default=None, help="generator processes (default: all cores)")
    parser.add_argument("--dir", default=None, help="folder for the temporary files (default: system temp)")
    args = parser.parse_args()
    size = parse_size(args.size)

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        folder = Path(folder)
        corpus, copy = folder / "corpus.txt", folder / "copy.txt"
        gen_s = timed(generate_builtin, corpus, size, seed=1, workers=args.workers)
        gen1_s = timed(generate_builtin, folder / "serial.txt", size, seed=1, workers=1)
        data = corpus.read_bytes()
        write_s = min(timed(plain_write, copy, data) for _ in range(3))
        read_s = min(timed(plain_read, corpus) for _ in range(3))
        clean_s = min(timed(clean_corpus, corpus, folder / "clean.txt", folder / "stats.json") for _ in range(2))

    mb = len(data) / 1e6
    workers = args.workers or os.cpu_count()
    rows = [
        (f"generate ({workers} processes)", mb / gen_s, "plain write", mb / write_s),
        ("generate (1 process)", mb / gen1_s, "plain write", mb / write_s),
        ("clean", mb / clean_s, "plain read", mb / read_s),
    ]
    print(f"corpus: {mb:.1f} MB, {os.cpu_count()} cores")
    print(f"{'stage':<28}{'MB/s':>9}   {'peer':<12}{'MB/s':>9}   ratio")
    for stage, rate, peer, peer_rate in rows:
        print(f"{stage:<28}{rate:>9.1f}   {peer:<12}{peer_rate:>9.1f}   {rate / peer_rate:.3f}")


if __name__ == "__main__":
    main()

"""Which recipe trains the best model per CPU-minute, measured on real text held out by position.

    python bench/bench_quality.py                       # every recipe, 180 s of training each
    python bench/bench_quality.py --budget 60 --recipes baseline llama-muon

The corpus is the Python 3.11 documentation sources from Debian's python3.11-doc package (~500 .rst.txt
documents, ~11 MB), read in sorted path order: text no one here wrote that every machine can get
(`apt-get download python3.11-doc`). The last 10% of the documents are held out: neither the tokenizer nor
training sees them. Each recipe then runs the pipeline's own stages (clean, train_bpe, encode, train,
evaluate) and trains for the same wall-clock budget on this machine, one recipe after another: a short
calibration run measures its step time, which sets max_steps (the cosine schedule needs to know its end).
The table gives held-out bits per byte (every token scored with up to a full context), throughput and the
change against the first row, today's default recipe, measured in the same run.

    python bench/bench_quality.py --splits --steps 150 --tiny --split_bytes 1000000 --held_out 0.05

instead compares the two ways `tinygpt clean` reads a single text file without `<|endoftext|>` (a book, a play,
notes): the documentation sources joined into one text of about --split_bytes bytes, its last --held_out share
held out as raw text, the rest cleaned with `--split auto` (one document, paragraphs intact) and with
`--split blank_line` (each paragraph a document, the blank lines become separators), then today's default recipe
trained on each for --steps steps, the two runs side by side. It prints bits per byte on each run's own
validation tail as encoded and on the held-out raw text, with the change against blank_line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinygpt.common import EOT  # noqa: E402
from tinygpt.model.flops import matmul_peak  # noqa: E402

DOC_PACKAGE = "python3.11-doc"
SOURCES = "usr/share/doc/python3.11/html/_sources"

# The baseline is the default recipe before this benchmark chose new defaults, written out so that it stays
# the same row whatever config.yaml says today.
# (Its `amp: auto` chose bf16 on any CPU that reports AVX512-BF16; it is spelled out as bf16 here. The
# recipes below use today's `auto`, which measures bf16 against fp32 matmuls and takes the faster.)
BASELINE = {"vocab_size": 4096, "preset": "toy", "arch": "gpt2", "optimizer": "adamw", "lr": 2e-3, "min_lr": 2e-4,
            "warmup_steps": 50, "batch_size": 16, "weight_decay": 0.1, "beta2": 0.95, "dropout": 0.0, "amp": "bf16"}
AUTO = {"amp": "auto"}
RECIPES = {
    "baseline": {},
    "amp-auto": AUTO,
    "llama": {**AUTO, "arch": "llama"},
    "muon": {**AUTO, "optimizer": "muon"},
    "llama-muon": {**AUTO, "arch": "llama", "optimizer": "muon"},
    "llama-muon-lr4e-3": {**AUTO, "arch": "llama", "optimizer": "muon", "lr": 4e-3, "min_lr": 4e-4},
    "muon-lr4e-3": {**AUTO, "optimizer": "muon", "lr": 4e-3, "min_lr": 4e-4},
    "llama-muon-muonlr1e-2": {**AUTO, "arch": "llama", "optimizer": "muon", "muon_lr": 1e-2},
    "llama-muon-vocab2048": {**AUTO, "arch": "llama", "optimizer": "muon", "vocab_size": 2048},
    "llama-muon-vocab8192": {**AUTO, "arch": "llama", "optimizer": "muon", "vocab_size": 8192},
    "llama-muon-batch32": {**AUTO, "arch": "llama", "optimizer": "muon", "batch_size": 32},
    "llama-muon-block256": {**AUTO, "arch": "llama", "optimizer": "muon", "block_size": 256, "batch_size": 8},
}
# --splits --tiny: a model about a fifth of the toy's cost per token, for a slow or busy machine
TINY = {"n_layer": 2, "n_head": 4, "n_embd": 128, "batch_size": 8}
MODEL_KEYS = ("preset", "arch", "n_layer", "n_head", "n_embd", "block_size", "dropout")
TRAIN_KEYS = ("optimizer", "lr", "min_lr", "muon_lr", "warmup_steps", "batch_size", "weight_decay", "beta2", "amp")


def tinygpt(*args: str, log: Path) -> None:
    """Run one stage as the pipeline does; its output goes to `log`, which a failure shows."""
    env = {**os.environ, "TINYGPT_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as f:
        result = subprocess.run([sys.executable, "-m", "tinygpt", *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    if result.returncode:
        sys.exit(f"tinygpt {args[0]} failed:\n{log.read_text()[-3000:]}")


def doc_sources(work: Path) -> list[Path]:
    """The .rst.txt files of python3.11-doc, downloaded and unpacked once into `work`, in sorted path order."""
    unpacked = work / "python3.11-doc"
    if not (unpacked / SOURCES).is_dir():
        subprocess.run(["apt-get", "download", DOC_PACKAGE], cwd=work, check=True, capture_output=True)
        [deb] = work.glob(f"{DOC_PACKAGE}_*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    return sorted((unpacked / SOURCES).rglob("*.rst.txt"))


def prepare_corpus(work: Path, held_out: float, eval_bytes: int) -> tuple[Path, Path, dict]:
    """The training corpus (first documents) and the held-out text (the first `eval_bytes` of the last
    documents, whole documents), both cleaned as the pipeline cleans; documents end with the <|endoftext|>
    separator line, as download writes them."""
    paths = doc_sources(work)
    n_train = len(paths) - max(1, round(held_out * len(paths)))
    scored, size = [], 0
    for path in paths[n_train:]:
        if size >= eval_bytes:
            break
        scored.append(path)
        size += path.stat().st_size
    out = {}
    for name, part in (("train", paths[:n_train]), ("held_out", scored)):
        raw = work / f"{name}.raw.txt"
        with open(raw, "w", encoding="utf-8") as f:
            for path in part:
                f.write(path.read_text(encoding="utf-8").strip() + f"\n{EOT}\n")
        tinygpt("clean", "--input", str(raw), "--out", str(work / f"{name}.txt"), "--stats",
                str(work / f"{name}.stats.json"), "--split", "eot", log=work / f"clean-{name}.log")
        out[name] = work / f"{name}.txt"
    info = {"documents": len(paths), "train_documents": n_train, "held_out_documents": len(paths) - n_train,
            "scored_documents": len(scored), "train_bytes": out["train"].stat().st_size,
            "scored_bytes": out["held_out"].stat().st_size}
    return out["train"], out["held_out"], info


def tokens_dir(work: Path, corpus: Path, vocab_size: int, name: str = "") -> Path:
    """Tokenizer and token files for one vocabulary size (made once, shared by the recipes that use it)."""
    folder = work / (name or f"tokens-{vocab_size}")
    if not (folder / "meta.json").exists():
        folder.mkdir(exist_ok=True)
        tinygpt("train_bpe", "--corpus", str(corpus), "--out", str(folder / "tokenizer.json"),
                "--vocab_size", str(vocab_size), log=folder / "train_bpe.log")
        tinygpt("encode", "--corpus", str(corpus), "--tokenizer", str(folder / "tokenizer.json"),
                "--out_dir", str(folder), "--val_fraction", "0.05", "--split", "tail", log=folder / "encode.log")
    return folder


def train_args(settings: dict, data: Path, out: Path, max_steps: int, eval_interval: int) -> list[str]:
    args = ["--data_dir", str(data), "--tokenizer", str(data / "tokenizer.json"), "--out", str(out / "best.pt"),
            "--runs_dir", str(out / "runs"), "--max_steps", str(max_steps), "--eval_interval", str(eval_interval),
            "--eval_batches", "8", "--ckpt_interval", str(max_steps), "--log_interval", "5"]
    for key in (*MODEL_KEYS, *TRAIN_KEYS):
        if settings.get(key) is not None:
            args += [f"--{key}", str(settings[key])]
    return args


def step_seconds(out: Path) -> float:
    """Median seconds per training step of a finished calibration run (its logged throughput)."""
    [metrics] = (out / "runs").glob("*/metrics.jsonl")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return statistics.median(1 / r["tokens_per_s"] for r in records[1:] if "tokens_per_s" in r)


def run_recipe(name: str, settings: dict, work: Path, corpus: Path, held_out: Path, budget: float) -> dict:
    data = tokens_dir(work, corpus, settings["vocab_size"])
    folder = work / "runs" / name
    calibration = folder / "calibration"
    calibration.mkdir(parents=True, exist_ok=True)
    tinygpt("train", *train_args(settings, data, calibration, 30, 1000), log=folder / "calibration.log")
    block = settings.get("block_size") or 128
    tokens_per_step = settings["batch_size"] * block
    seconds_per_step = step_seconds(calibration) * tokens_per_step
    max_steps = max(settings["warmup_steps"] + 10, int(budget / seconds_per_step))
    started = time.perf_counter()
    tinygpt("train", *train_args(settings, data, folder, max_steps, max(1, max_steps // 5)), log=folder / "train.log")
    wall = time.perf_counter() - started
    result_path = folder / "held_out.json"
    tinygpt("evaluate", "--checkpoint", str(folder / "best.pt"), "--text", str(held_out), "--json", str(result_path),
            "--device", "cpu", "--batch_size", "16", log=folder / "evaluate.log")
    held = json.loads(result_path.read_text())
    return {"recipe": name, "settings": settings, "max_steps": max_steps, "train_wall_s": wall,
            "tokens_per_s": tokens_per_step / seconds_per_step, "held_out_bpb": held["bits_per_byte"],
            "held_out_tokens": held["tokens"]}


def prepare_single_text(work: Path, n_bytes: int, held_out: float) -> tuple[Path, Path]:
    """One text file of about n_bytes (the documentation sources joined, a blank line between them, no
    <|endoftext|>) cut at a blank line into training text and, its last `held_out` share, held-out raw text."""
    parts, size = [], 0
    for path in doc_sources(work):
        parts.append(path.read_text(encoding="utf-8").strip() + "\n\n")
        size += len(parts[-1].encode())
        if size >= n_bytes:
            break
    text = "".join(parts)
    cut = text.rfind("\n\n", 0, round((1 - held_out) * len(text))) + 2
    train, held = work / "single.train.txt", work / "single.held_out.txt"
    train.write_text(text[:cut], encoding="utf-8")
    held.write_text(text[cut:], encoding="utf-8")
    return train, held


def compare_splits(args: argparse.Namespace, work: Path) -> None:
    train_text, held_out = prepare_single_text(work, args.split_bytes, args.held_out)
    settings = {**BASELINE, **RECIPES["llama"], **(TINY if args.tiny else {})}  # today's default recipe
    splits = ("blank_line", "auto")
    data = {}
    for split in splits:
        corpus = work / f"single.{split}.txt"
        tinygpt("clean", "--input", str(train_text), "--out", str(corpus), "--stats", str(work / f"single.{split}.json"),
                "--split", split, log=work / f"clean-single-{split}.log")
        data[split] = tokens_dir(work, corpus, settings["vocab_size"], name=f"tokens-single-{split}")

    def train_and_score(split: str) -> dict:
        folder = work / "runs" / f"single-{split}"
        folder.mkdir(parents=True, exist_ok=True)
        tinygpt("train", *train_args(settings, data[split], folder, args.steps, max(1, args.steps // 5)),
                log=folder / "train.log")
        scores = {}
        for name, source in (("held_out_bpb", ["--text", str(held_out)]),
                             ("val_bpb", ["--tokens", str(data[split] / "val.bin")])):
            tinygpt("evaluate", "--checkpoint", str(folder / "best.pt"), *source, "--json", str(folder / f"{name}.json"),
                    "--device", "cpu", "--batch_size", "16", log=folder / f"evaluate-{name}.log")
            scores[name] = json.loads((folder / f"{name}.json").read_text())["bits_per_byte"]
        clean_stats = json.loads((work / f"single.{split}.json").read_text())
        block = settings.get("block_size") or 128
        return {"split": split, "documents": clean_stats["documents_out"], "steps": args.steps,
                "tokens_per_s": 1 / step_seconds(folder), "tokens_seen": args.steps * settings["batch_size"] * block,
                **scores}

    print(f"one text file of {train_text.stat().st_size / 1e6:.2f} MB for training and "
          f"{held_out.stat().st_size / 1e6:.2f} MB held out as raw text (from {DOC_PACKAGE}); today's default recipe "
          f"(llama, AdamW, amp auto{'; tiny: ' + str(TINY) if args.tiny else ''}) trained {args.steps} steps on each "
          "clean --split, the two side by side", flush=True)
    with ThreadPoolExecutor(len(splits)) as pool:  # side by side: both see the same machine, whatever its load
        results = dict(zip(splits, pool.map(train_and_score, splits)))
    print(f"{'clean --split':<14} {'documents':>9} {'steps':>6} {'tokens/s':>9} {'val bpb (as encoded)':>21} "
          f"{'held-out raw bpb':>17} {'vs blank_line':>14}")
    for split, result in results.items():
        change = result["held_out_bpb"] / results["blank_line"]["held_out_bpb"] - 1
        print(f"{split:<14} {result['documents']:>9,} {result['steps']:>6} {result['tokens_per_s']:>9,.0f} "
              f"{result['val_bpb']:>21.4f} {result['held_out_bpb']:>17.4f} {change:>+14.1%}")
    (work / "splits.json").write_text(json.dumps(results, indent=2))
    print(f"results in {work / 'splits.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=180, help="training seconds per recipe")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--work", default="bench-quality", help="folder for the corpus, tokens and runs (reused)")
    parser.add_argument("--held_out", type=float, default=0.1, help="share of the documents held out, at the end")
    parser.add_argument("--eval_bytes", type=int, default=600_000,
                        help="score the first documents of the held-out part up to about this many bytes")
    parser.add_argument("--splits", action="store_true",
                        help="compare clean --split auto and blank_line on one text file instead (see above)")
    parser.add_argument("--split_bytes", type=int, default=2_000_000, help="--splits: size of the one text file")
    parser.add_argument("--steps", type=int, default=300, help="--splits: training steps of each run")
    parser.add_argument("--tiny", action="store_true", help=f"--splits: a smaller model and batch ({TINY})")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.splits:
        compare_splits(args, work)
        return
    corpus, held_out, info = prepare_corpus(work, args.held_out, args.eval_bytes)
    peaks = {dtype: matmul_peak(getattr(torch, dtype), torch.device("cpu")) / 1e9 for dtype in ("float32", "bfloat16")}
    print(f"corpus: {DOC_PACKAGE}, {info['train_documents']} documents ({info['train_bytes'] / 1e6:.1f} MB) for "
          f"training, the last {info['held_out_documents']} held out and never seen (its first "
          f"{info['scored_documents']} documents, {info['scored_bytes'] / 1e6:.2f} MB, scored); "
          f"budget {args.budget:.0f} s of training per recipe on {torch.get_num_threads()} threads; matmul peak "
          f"{peaks['float32']:.0f} GFLOP/s fp32, {peaks['bfloat16']:.0f} GFLOP/s bf16", flush=True)
    # the baseline first, and again last: the difference shows how much the machine drifted during the run
    names = ["baseline", *[r for r in args.recipes if r != "baseline"], "baseline"]
    results = []
    print(f"{'recipe':<24} {'steps':>6} {'tokens/s':>9} {'train s':>8} {'held-out bpb':>13} {'vs baseline':>12}")
    for i, name in enumerate(names):
        label = name if i < len(names) - 1 else "baseline (again)"
        result = run_recipe(label.replace(" ", "-").replace("(", "").replace(")", ""), {**BASELINE, **RECIPES[name]},
                            work, corpus, held_out, args.budget)
        results.append(result)
        change = result["held_out_bpb"] / results[0]["held_out_bpb"] - 1
        print(f"{label:<24} {result['max_steps']:>6} {result['tokens_per_s']:>9,.0f} {result['train_wall_s']:>8.0f} "
              f"{result['held_out_bpb']:>13.4f} {change:>+12.1%}", flush=True)
    (work / "results.json").write_text(json.dumps({"corpus": info, "budget_s": args.budget, "matmul_peak_gflops": peaks,
                                                   "results": results}, indent=2))
    print(f"results in {work / 'results.json'}")


if __name__ == "__main__":
    main()

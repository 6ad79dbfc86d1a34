"""GGUF benchmark: what each quantization type costs a model trained on real text, with and without an
importance matrix, and how fast conversion is.

    python bench/bench_gguf.py                          # toy llama, ~400 steps on bench_quality's Python docs
    python bench/bench_gguf.py --max_steps 200 --types q4_k_m q8_0 --arch gpt2
    python bench/bench_gguf.py --preset small --max_steps 200 --batch_size 4 --imatrix_chunks 100 400 --threads 1
    python bench/bench_gguf.py --f16 exports/tinygpt/model-f16.gguf --tokens data/tokens --types q4_k_m

1. Train the toy (or small) preset on the Python documentation corpus of bench_quality.py (the same download,
   training documents only; the last 10% of the documents are held out and never seen), export it, convert it
   to f16. Its bits per byte are printed twice: the trainer's validation (the tail of the training text) and
   the f16 file's on the positions the KL divergence scores (held-out documents).
   Or, with --f16 and --tokens, take a model already trained (the pipeline's) and its token folder: the
   importance matrix from train.bin, the divergence on val.bin; steps 1 and 2 are skipped.
2. Conversion speed: gguf_convert f16 against numpy writing the same tensor bytes (the floor for any converter).
3. The importance matrix (tinygpt imatrix) on the first chunks of the training tokens, never the held-out text;
   one matrix for each --imatrix_chunks count, so that the calibration amount's effect shows in one run.
4. Every file type, quantized without and with the importance matrix (as far as quantize_gguf supports it), is
   compared with the f16 file on held-out text, as `llama-perplexity --kl-divergence` does (tinygpt.model.kl):
   perplexity increase over f16, mean and 99th-percentile KL divergence, top-1 agreement. The peer of every
   row is the f16 file measured in the same run; the last column is KL without / KL with the importance matrix.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_quality import BASELINE, prepare_corpus, tinygpt, tokens_dir, train_args  # noqa: E402

from tinygpt.export.gguf_convert import convert_to_gguf  # noqa: E402
from tinygpt.export.quantize import FILE_TYPES, quantize_gguf  # noqa: E402
from tinygpt.model.kl import kl_divergence  # noqa: E402
from tinygpt.weights.gguf_read import load_gguf  # noqa: E402


class ReplayedReference(torch.nn.Module):
    """The reference model whose logits are computed once for each batch of chunks and then replayed: every
    file type is compared with the same f16 model on the same chunks, so its forward passes need running once."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.config, self.logits = model, model.config, {}

    def forward(self, x: torch.Tensor):
        key = x.cpu().numpy().tobytes()
        if key not in self.logits:
            self.logits[key] = self.model(x)
        return self.logits[key]


def held_out_bpb(kl, tokens: np.ndarray, n_ctx: int, tokenizer) -> float:
    """The f16 model's bits per byte on the positions the KL divergence scores (each chunk's second half, at
    least n_ctx/2 tokens of context), from its perplexity there; special tokens count no bytes."""
    targets = tokens[: kl.chunks * n_ctx].reshape(kl.chunks, n_ctx)[:, n_ctx // 2 + 1:]
    special = set(tokenizer.special_tokens.values())
    n_bytes = sum(0 if int(t) in special else len(tokenizer.decode_bytes([int(t)])) for t in targets.ravel())
    return kl.tokens * np.log(kl.ppl_reference) / (np.log(2) * n_bytes)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def raw_write(arrays: list[np.ndarray], path: Path) -> None:
    """The GGUF file's tensor bytes, already in memory, written with numpy: no reading, no conversion."""
    with open(path, "wb") as f:
        for a in arrays:
            a.tofile(f)


def bits_per_weight(path: Path) -> float:
    """Bits of tensor data per weight, as llama.cpp reports a model's BPW."""
    tensors = gguf.GGUFReader(path).tensors
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def train_model(work: Path, corpus: Path, args) -> tuple[Path, Path]:
    """The preset trained for max_steps on the training documents; (checkpoint, token folder)."""
    preset, arch, max_steps = args.preset, args.arch, args.max_steps
    # warm-up: BASELINE's 50 steps, or an eighth of a shorter run (a small model on a busy CPU gets few steps)
    settings = {**BASELINE, "preset": preset, "arch": arch, "amp": "auto",
                "batch_size": args.batch_size or BASELINE["batch_size"],
                "warmup_steps": min(BASELINE["warmup_steps"], max(1, max_steps // 8))}
    data = tokens_dir(work, corpus, settings["vocab_size"])
    # the toy's folder with BASELINE's batch keeps its old name, so that models trained before --preset are reused
    name = f"{arch}-{max_steps}" if preset == "toy" else f"{preset}-{arch}-{max_steps}"
    folder = work / "gguf" / (name + (f"-batch{args.batch_size}" if args.batch_size else ""))
    if not (folder / "best.pt").exists():
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        tinygpt("train", *train_args(settings, data, folder, max_steps, max(1, max_steps // 4)),
                "--threads", str(args.threads), log=folder / "train.log")
        print(f"trained {arch} {preset} for {max_steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
    return folder / "best.pt", data


def trained_f16(args) -> tuple[Path, Path, Path, dict]:
    """Steps 1 and 2: train the toy on the Python docs, export, convert (timed); (f16, token folder, folder, info)."""
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    corpus, held_out, info = prepare_corpus(work, 0.1, 600_000)
    checkpoint, data = train_model(work, corpus, args)
    out = checkpoint.parent
    [metrics] = (out / "runs").glob("*/metrics.jsonl")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    speed = np.median([r["tokens_per_s"] for r in records if "tokens_per_s" in r])
    val_bpb = next(r["val_bpb"] for r in reversed(records) if "val_bpb" in r)
    print(f"{args.preset} {args.arch}: {args.max_steps} steps, median {speed:.0f} tokens/s; "
          f"validation (tail of the training text) {val_bpb:.4f} bits per byte")
    tinygpt("export", "--checkpoint", str(checkpoint), "--out_dir", str(out / "hf"), log=out / "export.log")

    f16 = out / "model-f16.gguf"
    t_convert = best_time(lambda: convert_to_gguf(out / "hf", f16, "f16"), args.repeats)
    arrays = [np.array(t.data) for t in gguf.GGUFReader(f16).tensors]
    t_raw = best_time(lambda: raw_write(arrays, out / "raw.bin"), args.repeats)
    (out / "raw.bin").unlink()
    print(f"gguf_convert f16: {t_convert * 1e3:.1f} ms, numpy writing the same bytes {t_raw * 1e3:.1f} ms "
          f"({t_convert / t_raw:.1f}x the time)")
    return f16, data, out, {**info, "held_out": held_out, "val_bpb": val_bpb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="bench-quality", help="bench_quality's folder (corpus reused)")
    parser.add_argument("--arch", default="llama", choices=["gpt2", "llama"])
    parser.add_argument("--preset", default="toy", choices=["toy", "small"], help="model shape to train")
    parser.add_argument("--max_steps", type=int, default=400, help="training steps of the model")
    parser.add_argument("--batch_size", type=int, help="sequences per step (default: BASELINE's 16)")
    parser.add_argument("--types", nargs="+", default=list(FILE_TYPES), choices=list(FILE_TYPES))
    parser.add_argument("--imatrix_chunks", type=int, nargs="+", default=[100],
                        help="training chunks of the context for the importance matrix; one matrix per count")
    parser.add_argument("--eval_chunks", type=int, default=256, help="held-out chunks of the context for KL")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats, best taken")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for training, imatrix and the KL "
                        "divergence; 0: one per usable CPU")
    parser.add_argument("--f16", help="instead of training: an f16 GGUF already trained (e.g. the pipeline's "
                        "exports/tinygpt/model-f16.gguf), with --tokens")
    parser.add_argument("--tokens", help="with --f16: its token folder (data/tokens: train.bin for the importance "
                        "matrix, val.bin held out for the KL divergence, meta.json for the dtype)")
    parser.add_argument("--out", default="bench-gguf", help="with --f16: folder for the files this writes")
    args = parser.parse_args()
    if bool(args.f16) != bool(args.tokens):
        parser.error("--f16 and --tokens go together")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.f16:
        f16, data, out = Path(args.f16).resolve(), Path(args.tokens).resolve(), Path(args.out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        meta = json.loads((data / "meta.json").read_text())
        held_out_tokens = np.fromfile(data / "val.bin", dtype=np.dtype(meta["dtype"])).astype(np.int64)
        info = {"f16": str(f16), "tokens": str(data), "held_out": "val.bin", "val_tokens": len(held_out_tokens)}
    else:
        f16, data, out, info = trained_f16(args)
        held_out_tokens = None

    imatrices = {}
    for chunks in args.imatrix_chunks:
        imatrices[chunks] = out / f"imatrix-{chunks}.gguf"
        started = time.perf_counter()
        tinygpt("imatrix", "--gguf", str(f16), "--tokens", str(data / "train.bin"), "--out", str(imatrices[chunks]),
                "--chunks", str(chunks), "--threads", str(args.threads), log=out / f"imatrix-{chunks}.log")
        print(f"imatrix: {chunks} chunks of training tokens in {time.perf_counter() - started:.1f} s")
    weighted = "imatrix" in inspect.signature(quantize_gguf).parameters
    if not weighted:
        print("quantize_gguf takes no importance matrix yet: the with-imatrix rows are skipped")

    reference, tokenizer = load_gguf(f16)
    reference = ReplayedReference(reference)
    if held_out_tokens is None:
        tokens = np.array(tokenizer.encode(info["held_out"].read_text(encoding="utf-8")), dtype=np.int64)
        what = f"{info['scored_documents']} documents never trained on"
    else:
        tokens, what = held_out_tokens, f"{data / 'val.bin'}"
    n_ctx = reference.config.block_size
    print(f"held out: {what}, {len(tokens):,} tokens; "
          f"KL over the second half of the first {args.eval_chunks} chunks of {n_ctx}")
    header = (f"{'type':<8} {'imatrix':>7} {'MiB':>6} {'bpw':>6} {'PPL':>8} {'vs f16':>8} {'mean KLD':>9} "
              f"{'99% KLD':>8} {'same top':>8} {'KLD without/with':>16}")
    print(header)
    results = []
    for qtype in ["f16", *args.types]:
        # the importance matrix of a row: None, or its number of calibration chunks
        for chunks in ([None] if qtype == "f16" else [None, *imatrices] if weighted else [None]):
            path = f16 if qtype == "f16" else out / f"model-{qtype}{f'-imatrix-{chunks}' if chunks else ''}.gguf"
            if qtype != "f16":
                weights = {"imatrix": imatrices[chunks]} if chunks else {}
                quantize_gguf(f16, path, qtype, args.threads or None, **weights)
            model = reference if qtype == "f16" else load_gguf(path)[0]
            kl = kl_divergence(model, reference, tokens, n_ctx, args.eval_chunks, show_progress=False)
            row = {"type": qtype, "imatrix": chunks or 0, "mib": path.stat().st_size / 2**20,
                   "bpw": bits_per_weight(path), **kl.__dict__}
            results.append(row)
            if qtype == "f16":
                info["held_out_bpb"] = held_out_bpb(kl, tokens, n_ctx, tokenizer)
                print(f"(f16 on the scored held-out positions: {info['held_out_bpb']:.4f} bits per byte)")
            without = next((r for r in results if r["type"] == qtype and not r["imatrix"]), row)
            gain = f"{without['mean_kld'] / row['mean_kld']:.2f}x" if chunks and row["mean_kld"] else ""
            print(f"{qtype:<8} {chunks or 'no':>7} {row['mib']:>6.2f} {row['bpw']:>6.2f} "
                  f"{kl.ppl:>8.3f} {kl.ppl_ratio - 1:>+8.2%} {kl.mean_kld:>9.5f} {kl.kld_p99:>8.4f} "
                  f"{kl.same_top:>8.2%} {gain:>16}", flush=True)
    trained = {} if args.f16 else {"preset": args.preset, "arch": args.arch, "max_steps": args.max_steps}
    (out / "results.json").write_text(json.dumps({"source": {k: str(v) for k, v in info.items()}, **trained,
                                                  "imatrix_chunks": args.imatrix_chunks, "n_ctx": n_ctx,
                                                  "threads": torch.get_num_threads(), "results": results}, indent=2))
    print(f"results in {out / 'results.json'}")


if __name__ == "__main__":
    main()

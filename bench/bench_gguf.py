"""GGUF benchmark: conversion speed against a raw write of the same bytes, and what quantization costs.

    python bench/bench_gguf.py [--arch llama]                    # random toy-sized model (speed only)
    python bench/bench_gguf.py --checkpoint checkpoints/best.pt --val_bin data/tokens/val.bin

1. export + gguf_convert f16, timed against numpy writing the same tensor bytes to a file (the floor for any
   converter): the ratio says how much reading safetensors, transposing and metadata cost on top.
2. Perplexity of the float checkpoint, the f16 file and the q4_k_m file (tinygpt.export.quantize), the GGUF files
   evaluated through our own reader (gguf-py dequantization) on the same tokens. With a trained checkpoint
   and real validation tokens this is the quality cost of 4-bit weights; on a random model only the ratios
   between the rows mean anything.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinygpt.model.checkpoint import load_model  # noqa: E402
from tinygpt.export.hf import export_hf  # noqa: E402
from tinygpt.export.gguf_convert import convert_to_gguf  # noqa: E402
from tinygpt.weights.gguf_read import load_gguf  # noqa: E402
from tinygpt.model.gpt import GPT, PRESETS, GPTConfig  # noqa: E402
from tinygpt.tokenizer.bpe import Tokenizer  # noqa: E402


def random_model(preset: str, vocab_size: int, arch: str) -> tuple[GPT, Tokenizer]:
    """A randomly initialised preset-sized GPT and a tokenizer of vocab_size ids (arbitrary byte-pair merges)."""
    pairs = [(a, b) for a in range(256) for b in range(256)][: vocab_size - 257]
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, arch=arch, **PRESETS[preset])).eval(), Tokenizer(pairs)


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


def eval_tokens(val_bin: Path | None, n_tokens: int, vocab_size: int) -> np.ndarray:
    if val_bin is None:
        return np.random.default_rng(0).integers(0, vocab_size, n_tokens)
    meta = json.loads((val_bin.parent / "meta.json").read_text())
    return np.array(np.memmap(val_bin, dtype=meta["dtype"], mode="r")[:n_tokens], dtype=np.int64)


@torch.inference_mode()
def perplexity(model: GPT, tokens: np.ndarray) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of block_size + 1 tokens."""
    span = model.config.block_size + 1
    n = (len(tokens) // span) * span
    windows = torch.from_numpy(tokens[:n].reshape(-1, span))
    losses = [model(w[None, :-1], targets=w[None, 1:])[1].item() for w in windows]
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="trained checkpoint (default: a random model)")
    parser.add_argument("--val_bin", type=Path, help="validation tokens (val.bin with meta.json beside it)")
    parser.add_argument("--preset", default="toy", choices=list(PRESETS), help="random model size (default toy)")
    parser.add_argument("--vocab_size", type=int, default=4096, help="random model vocabulary (default 4096)")
    parser.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"], help="random model architecture")
    parser.add_argument("--eval_tokens", type=int, default=16_384, help="tokens for perplexity (default 16384)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats, best taken (default 3)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        if args.checkpoint:
            model, tokenizer = load_model(args.checkpoint)
            checkpoint = args.checkpoint
        else:
            model, tokenizer = random_model(args.preset, args.vocab_size, args.arch)
            checkpoint = tmp / "random.pt"
            torch.save({"model": model.state_dict(), "model_config": asdict(model.config),
                        "tokenizer_json": tokenizer.to_json_str(), "step": 0, "val_loss": 0.0}, checkpoint)
        cfg = model.config
        print(f"model: {cfg.arch}, {model.num_params() / 1e6:.2f}M params, {cfg.n_layer} layers, n_embd {cfg.n_embd}, "
              f"vocab {cfg.vocab_size} ({'checkpoint ' + str(args.checkpoint) if args.checkpoint else 'random'})")

        t_export = best_time(lambda: export_hf(checkpoint, tmp / "hf"), args.repeats)
        f16 = tmp / "model-f16.gguf"
        t_convert = best_time(lambda: convert_to_gguf(tmp / "hf", f16, "f16"), args.repeats)
        arrays = [np.array(t.data) for t in gguf.GGUFReader(f16).tensors]
        t_raw = best_time(lambda: raw_write(arrays, tmp / "raw.bin"), args.repeats)
        size_mb = f16.stat().st_size / 1e6
        print(f"export (safetensors):   {t_export * 1e3:8.1f} ms")
        print(f"gguf_convert f16:       {t_convert * 1e3:8.1f} ms  {size_mb / t_convert:8.1f} MB/s  ({size_mb:.1f} MB)")
        print(f"raw write, same bytes:  {t_raw * 1e3:8.1f} ms  {size_mb / t_raw:8.1f} MB/s")
        print(f"convert / raw write:    {t_convert / t_raw:8.1f}x the time")

        tokens = eval_tokens(args.val_bin, args.eval_tokens, cfg.vocab_size)
        rows = {"float checkpoint": model, "f16 GGUF": load_gguf(f16)[0]}
        try:
            from tinygpt.export.quantize import quantize_gguf
        except ImportError:
            print("tinygpt.export.quantize not available: q4_k_m skipped")
        else:
            q4 = tmp / "model-q4_k_m.gguf"
            t_quant = best_time(lambda: quantize_gguf(f16, q4, "q4_k_m"), 1)
            print(f"quantize q4_k_m:        {t_quant * 1e3:8.1f} ms  ({q4.stat().st_size / 1e6:.1f} MB)")
            rows["q4_k_m GGUF"] = load_gguf(q4)[0]
        source = f"{args.val_bin}" if args.val_bin else "random tokens"
        print(f"perplexity on {len(tokens)} tokens of {source}:")
        base = None
        for name, m in rows.items():
            ppl = perplexity(m, tokens)
            base = base or ppl
            print(f"  {name:<18} {ppl:10.3f}  ({ppl / base:.4f}x the float model)")


if __name__ == "__main__":
    main()

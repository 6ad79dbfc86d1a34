"""Bits per byte of a model on any text: the number that compares across tokenizers, models and files.

    tinygpt evaluate --checkpoint checkpoints/best.pt --text held_out.txt
    tinygpt evaluate --gguf exports/tinygpt/model-q4_k_m.gguf --tokens data/tokens/val.bin
    tinygpt evaluate --hf_dir exports/tinygpt --text held_out.txt

Every token after the first is scored with as much context as the model holds: windows of block_size tokens
slide by `stride`, and each window scores only the tokens the previous one did not (the first window scores
all of its tokens). A smaller stride gives each token more context and costs more forward passes; stride 1 is
exact full context for every token. Bits per byte is the summed loss in bits over the bytes of text of the
scored tokens; <|endoftext|> separators stand for no text and count 0 bytes (their loss still counts).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tinygpt.common import TinyGPTError, atomic_open, progress, require_file, run_cli
from tinygpt.model.gpt import GPT
from tinygpt.model.hardware import AMP_CHOICES, autocast_dtype, pick_device
from tinygpt.model.kl import KLDivergence, describe, kl_divergence
from tinygpt.model.sample import load
from tinygpt.tokenizer.bpe import Tokenizer


@dataclass
class Evaluation:
    bits_per_byte: float
    loss: float  # mean nats per scored token
    tokens: int  # scored tokens
    bytes: int  # bytes of text they stand for
    block_size: int
    stride: int
    dtype: str = "float32"  # what the model computed in: float32 unless --amp asked for less


def windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored position) of each window over tokens[0:n_tokens]; together the windows score every
    position 1..n_tokens-1 exactly once, each with at least block_size - stride tokens of context."""
    spans, scored_to, start = [], 1, 0
    while scored_to < n_tokens:
        end = min(start + block_size + 1, n_tokens)  # block_size inputs, their targets one to the right
        spans.append((start, scored_to))
        scored_to = end
        start = min(start + stride, max(0, n_tokens - block_size - 1))
        if end == n_tokens:
            break
    return spans


@torch.no_grad()
def evaluate_tokens(model: GPT, tokens: np.ndarray, token_bytes: np.ndarray, stride: int | None = None,
                    batch_size: int = 8, amp: str = "off", show_progress: bool = True) -> Evaluation:
    """Bits per byte of `model` on the token ids `tokens`; token_bytes[i] is the text length of id i."""
    block = model.config.block_size
    stride = stride or max(1, block // 2)
    if not 1 <= stride <= block:
        raise TinyGPTError(f"--stride {stride} must be between 1 and the model's block_size {block}")
    if len(tokens) < 2:
        raise TinyGPTError(f"the text holds {len(tokens)} token(s); at least 2 are needed to score one")
    device = next(model.parameters()).device
    amp_dtype = autocast_dtype(amp, device)
    ids = torch.from_numpy(tokens.astype(np.int64))
    spans = windows(len(ids), block, stride)
    nats = 0.0
    scored = 0
    # every window is block_size long (the last one is moved back to fit) unless the text is shorter than that
    length = min(block, len(ids) - 1)
    bar = progress(range(0, len(spans), batch_size), desc="evaluate", unit="batch",
                   **({} if show_progress else {"disable": True}))
    for i in bar:
        batch = spans[i : i + batch_size]
        x = torch.stack([ids[start : start + length] for start, _ in batch]).to(device)
        y = torch.stack([ids[start + 1 : start + 1 + length] for start, _ in batch]).to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, _ = model(x)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view(len(batch), -1)
        for row, (start, first) in zip(losses, batch):
            keep = first - start - 1  # targets before `first` were scored by an earlier window
            nats += float(row[keep:].double().sum())
            scored += length - keep
    n_bytes = int(token_bytes[tokens[1:]].sum())
    if n_bytes == 0:
        raise TinyGPTError("the scored tokens stand for no text (only separators); give a file with text")
    return Evaluation(bits_per_byte=nats / math.log(2) / n_bytes, loss=nats / scored, tokens=scored,
                      bytes=n_bytes, block_size=block, stride=stride,
                      dtype=str(amp_dtype or torch.float32).removeprefix("torch."))


def text_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """Bytes of text each token id stands for; special tokens stand for none."""
    lengths = np.array([len(t) for t in tokenizer.vocab], dtype=np.int64)
    lengths[list(tokenizer.special_tokens.values())] = 0
    return lengths


def read_tokens(args: argparse.Namespace, tokenizer: Tokenizer) -> np.ndarray:
    if args.text:
        path = require_file(args.text, "text file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TinyGPTError(f"{path} is not UTF-8 text (byte {e.start}); convert it, e.g. with iconv") from None
        return np.array(tokenizer.encode(text), dtype=np.int64)
    path = require_file(args.tokens, "token file", "write it with tinygpt encode")
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    if path.stat().st_size % np.dtype(dtype).itemsize:
        raise TinyGPTError(f"{path} is not a whole number of {np.dtype(dtype).name} tokens; it is truncated")
    tokens = np.fromfile(path, dtype=dtype).astype(np.int64)
    if len(tokens) and tokens.max() >= tokenizer.vocab_size:
        raise TinyGPTError(f"{path} holds token id {tokens.max()}, beyond the model's {tokenizer.vocab_size} "
                           "tokens; it was encoded with another tokenizer")
    return tokens


def main(argv: Sequence[str] | None = None) -> Evaluation | KLDivergence:
    parser = argparse.ArgumentParser(prog="tinygpt evaluate", description=__doc__.split("\n\n")[0])
    model_source = parser.add_mutually_exclusive_group(required=True)
    model_source.add_argument("--checkpoint", help="a tinygpt checkpoint (e.g. checkpoints/best.pt)")
    model_source.add_argument("--gguf", help="a GGUF file (any type we write, quantized ones included)")
    model_source.add_argument("--hf_dir", help="a Hugging Face folder written by tinygpt export")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--text", help="a UTF-8 text file (tokenized with the model's tokenizer)")
    data.add_argument("--tokens", help="a token file written by tinygpt encode (e.g. data/tokens/val.bin)")
    parser.add_argument("--stride", type=int, default=None, help="window step; default block_size // 2")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    # fp32 by default: the same number on every machine (auto would pick bf16 on some and fp32 on others)
    parser.add_argument("--amp", default="off", choices=AMP_CHOICES,
                        help="off: fp32, the same number on every machine; auto, bf16, fp16: faster, less exact "
                             "(the result records the dtype)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    parser.add_argument("--reference", help="a float GGUF (model-f16.gguf): report the model's KL divergence "
                        "from it, top-1 agreement and perplexity ratio, as llama-perplexity --kl-divergence")
    args = parser.parse_args(argv)
    model, tokenizer = load(args.checkpoint, args.gguf, pick_device(args.device), args.hf_dir)
    if args.reference:
        return compare_with_reference(model, tokenizer, args)
    result = evaluate_tokens(model, read_tokens(args, tokenizer), text_lengths(tokenizer), args.stride,
                             args.batch_size, args.amp)
    print(f"{result.bits_per_byte:.4f} bits per byte ({result.loss:.4f} nats per token) over {result.tokens:,} "
          f"tokens, {result.bytes:,} bytes of text; context up to {result.block_size}, stride {result.stride}, "
          f"{result.dtype}",
          file=sys.stderr)
    if args.json:
        with atomic_open(args.json, "w", encoding="utf-8") as f:
            json.dump(asdict(result), f, indent=2)
            f.write("\n")
    return result


def compare_with_reference(model: GPT, tokenizer: Tokenizer, args: argparse.Namespace) -> KLDivergence:
    """--reference: the model's drift from the float file on the same tokens (tinygpt.model.kl)."""
    reference, _ = load(None, args.reference, next(model.parameters()).device)
    result = kl_divergence(model, reference, read_tokens(args, tokenizer), batch_size=args.batch_size)
    print(describe(result), file=sys.stderr)
    if args.json:
        with atomic_open(args.json, "w", encoding="utf-8") as f:
            json.dump(asdict(result), f, indent=2)
            f.write("\n")
    return result


if __name__ == "__main__":
    run_cli(main)

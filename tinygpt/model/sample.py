"""Generate text from a checkpoint or a GGUF file: greedy, temperature, top-k and top-p sampling with a KV cache.

    tinygpt sample --checkpoint checkpoints/best.pt --prompt "Once upon a time" --stream

Past the context window the model keeps generating on a sliding window. Positions are learned and absolute,
so sliding by one token would change every cached key and value; instead, when the window is full, it is cut
to its last half and re-encoded once (one prefill per block_size/2 new tokens). Decoding without the cache
follows the same windows, so both give the same tokens.
"""

from __future__ import annotations

import argparse
import codecs
import itertools
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import TextIO

import torch

from tinygpt.common import TinyGPTError, require_file, run_cli
from tinygpt.model.gpt import GPT
from tinygpt.model.hardware import pick_device
from tinygpt.tokenizer.bpe import Tokenizer

STOP_WORDS = ("", "quit", "exit")


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 0:
        raise TinyGPTError(f"max_tokens={max_new_tokens} must be 0 or more")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise TinyGPTError(f"temperature={temperature} must be 0 (greedy) or a positive number")
    if top_k < 0:
        raise TinyGPTError(f"top_k={top_k} must be 0 (off) or a positive number of tokens")
    if not 0 < top_p <= 1:
        raise TinyGPTError(f"top_p={top_p} must be in (0, 1]; 1 turns nucleus sampling off")


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> int:
    """Pick a token from 1-D logits. Sampling runs on the CPU so a seed gives the same draws on every device."""
    logits = logits.float().cpu()
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth_largest = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # drop a token when the more likely ones already reach top_p; the most likely one always stays
        sorted_probs[sorted_probs.cumsum(0) - sorted_probs >= top_p] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    model: GPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eot_id: int | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` token ids following `prompt_ids`; stop before yielding `eot_id`.

    temperature 0 is greedy. The prompt is cropped to its last block_size tokens. Put the model in eval mode.
    Arguments are checked here, before the first token is asked for.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    if len(prompt_ids) == 0:
        raise TinyGPTError("the prompt has no tokens; start from the <|endoftext|> id for unconditional text")
    window = [int(t) for t in prompt_ids[-model.config.block_size :]]
    return _decode(model, window, max_new_tokens, temperature, top_k, top_p, generator, eot_id, use_cache)


@torch.inference_mode()
def _decode(
    model: GPT,
    window: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
    eot_id: int | None,
    use_cache: bool,
) -> Iterator[int]:
    block_size = model.config.block_size
    keep = max(1, block_size // 2)  # tokens left in the window after it slides
    device = model.tok_emb.weight.device
    # positions this call can fill: the window and every new token but the last (at most block_size)
    cache = model.new_kv_cache(capacity=len(window) + max_new_tokens) if use_cache else None
    pending = window  # tokens the model has not seen yet: without a cache, always the whole window
    for _ in range(max_new_tokens):
        idx = torch.tensor([pending], dtype=torch.long, device=device)
        logits, _ = model(idx, kv_cache=cache, last_only=True)
        token = sample_next(logits[0, -1], temperature, top_k, top_p, generator)
        if token == eot_id:
            return
        yield token

        slides = len(window) == block_size
        if slides:
            window = window[block_size - keep + 1 :]
        window.append(token)
        if cache is None or slides:
            pending = window
            if cache is not None:
                cache.reset()
        else:
            pending = [token]


def text_pieces(tokenizer: Tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """Decode tokens to text pieces of whole UTF-8 characters, each as soon as it is complete.

    A token can end inside a multi-byte character: the incremental decoder holds those bytes back.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        if piece := decoder.decode(tokenizer.decode_bytes([token])):
            yield piece
    if tail := decoder.decode(b"", final=True):
        yield tail


def complete(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, **sampling) -> Iterator[str]:
    """The completion of `prompt` as text pieces (see text_pieces); an empty prompt starts a new document.

    `sampling` takes generate's temperature, top_k, top_p, generator and use_cache.
    """
    prompt_ids = tokenizer.encode(prompt, bos=True) or [tokenizer.eot_id]  # BOS: as llama.cpp and HF add it
    return text_pieces(tokenizer, generate(model, prompt_ids, max_new_tokens, eot_id=tokenizer.eot_id, **sampling))


def load(checkpoint: str | None, gguf: str | None, device: torch.device,
         hf_dir: str | None = None) -> tuple[GPT, Tokenizer]:
    """(model, tokenizer) from a training checkpoint, a GGUF file or a Hugging Face export folder."""
    if checkpoint is not None:
        from tinygpt.model.checkpoint import load_model

        path = require_file(checkpoint, "checkpoint", "train one with `tinygpt train`")
        model, tokenizer = load_model(path, device)
    else:  # the readers of imported models: a GGUF file or a Hugging Face folder of any family tinygpt runs
        from tinygpt.weights.read import load_pretrained

        path = hf_dir if gguf is None else require_file(gguf, "GGUF file", "make one with `tinygpt gguf_convert`")
        model, tokenizer = load_pretrained(path, device)
    return model.eval(), tokenizer


def write_pieces(pieces: Iterator[str], out: TextIO, stream: bool) -> None:
    if stream:
        for piece in pieces:
            out.write(piece)
            out.flush()
    else:
        out.write("".join(pieces))
    out.write("\n")
    out.flush()


def interact(model: GPT, tokenizer: Tokenizer, args: argparse.Namespace, generator: torch.Generator) -> None:
    """Complete one prompt per line of stdin until end of input, an empty line or 'quit'."""
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        prompt = line.rstrip("\r\n")
        if not line or prompt.strip() in STOP_WORDS:
            return
        write_pieces(complete(model, tokenizer, prompt, args.max_tokens, **sampling_kwargs(args, generator)),
                     sys.stdout, args.stream)


def sampling_kwargs(args: argparse.Namespace, generator: torch.Generator) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator,
                use_cache=not args.no_cache)


def add_model_and_sampling_args(parser: argparse.ArgumentParser, max_tokens: int, per: str) -> None:
    """The model source (--checkpoint | --gguf | --hf_dir) and the sampler's flags, shared with `tinygpt chat`."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="training checkpoint (.pt)")
    source.add_argument("--gguf", help="GGUF file (dequantized into our model)")
    source.add_argument("--hf_dir", help="Hugging Face folder written by tinygpt export")
    parser.add_argument("--max_tokens", type=int, default=max_tokens, help=f"most new tokens per {per}")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy; higher is more random")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens; 0 is off")
    parser.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling mass in (0, 1]; 1 is off")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the sampler")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--no_cache", action="store_true", help="recompute the whole context for every token")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tinygpt sample", description=__doc__.split("\n")[0])
    add_model_and_sampling_args(parser, max_tokens=200, per="completion")
    parser.add_argument("--prompt", default="", help="text to continue; empty starts a new document")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument("--interactive", action="store_true",
                        help="read one prompt per line from stdin until an empty line, 'quit' or end of input")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    check_sampling_args(args.max_tokens, args.temperature, args.top_k, args.top_p)
    device = pick_device(args.device)
    model, tokenizer = load(args.checkpoint, args.gguf, device, args.hf_dir)
    generator = torch.Generator().manual_seed(args.seed)
    if args.interactive:
        interact(model, tokenizer, args, generator)
        return
    completion = complete(model, tokenizer, args.prompt, args.max_tokens, **sampling_kwargs(args, generator))
    write_pieces(itertools.chain([args.prompt], completion), sys.stdout, args.stream)


if __name__ == "__main__":
    run_cli(main)

"""Decoding speed with the KV cache against recomputing the whole context for every token (the peer), per architecture.

    python bench/bench_decode.py [--presets toy small] [--arch gpt2 llama] [--new_tokens 128 512] [--device cpu]

Random weights, greedy decoding from a short prompt. 512 new tokens overflow the toy and small context
windows, so this also measures the cached path sliding its window (a half-window re-prefill every
block_size/2 tokens). Both paths produce the same tokens; the ratio is the speedup of the cache.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tinygpt.model.gpt import GPT, config_from_preset  # noqa: E402
from tinygpt.model.sample import generate  # noqa: E402


def tokens_per_second(model: GPT, prompt: list[int], n_new: int, use_cache: bool, device: torch.device) -> float:
    list(generate(model, prompt, 4, temperature=0, use_cache=use_cache))  # warm up kernels and allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    produced = sum(1 for _ in generate(model, prompt, n_new, temperature=0, use_cache=use_cache))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return produced / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["toy", "small"])
    parser.add_argument("--arch", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    parser.add_argument("--new_tokens", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--prompt_tokens", type=int, default=16)
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "explicit"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    print(f"device {device}, {torch.get_num_threads()} threads, vocab {args.vocab_size}, "
          f"prompt {args.prompt_tokens} tokens, attention {args.attention}, greedy")
    print(f"{'preset':<8}{'arch':<7}{'params':>9}{'block':>7}{'new':>6}{'no cache tok/s':>16}{'KV cache tok/s':>16}"
          f"{'speedup':>9}")
    for preset in args.presets:
        for arch in args.arch:
            torch.manual_seed(0)
            config = config_from_preset(preset, args.vocab_size, arch=arch, attention=args.attention)
            model = GPT(config).to(device).eval()
            prompt = torch.randint(0, args.vocab_size, (args.prompt_tokens,)).tolist()
            for n_new in args.new_tokens:
                slow = tokens_per_second(model, prompt, n_new, use_cache=False, device=device)
                fast = tokens_per_second(model, prompt, n_new, use_cache=True, device=device)
                print(f"{preset:<8}{arch:<7}{model.num_params() / 1e6:>8.1f}M{config.block_size:>7}{n_new:>6}"
                      f"{slow:>16.1f}{fast:>16.1f}{fast / slow:>8.1f}x", flush=True)


if __name__ == "__main__":
    main()

"""Training and decoding speed of the llama architecture beside gpt2, measured interleaved in one run.

    python bench/bench_arch.py [--presets toy small] [--rounds 8] [--threads N] [--clock cpu]

On a machine shared with other work the speed drifts by 2x within minutes, so timing one architecture after
the other compares the neighbours' load, not the models. Here every round runs each variant once, in turn, and
each variant keeps its fastest run (the least disturbed):

  training  Trainer.train_step as `tinygpt train` runs it (memmap batches, fused AdamW, --amp auto and off)
            for gpt2, llama, and llama with its rotary embedding replaced by the identity: the difference
            is what RoPE costs (it should stay under 15% of the step)
  decoding  greedy tokens/s with the KV cache (bench_decode.py's measurement), gpt2 and llama
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))  # run from a checkout without installing
sys.path.insert(0, str(BENCH))

import tinygpt.model.gpt as gpt  # noqa: E402
from bench_train import write_random_tokens  # noqa: E402
from tinygpt.model.gpt import GPT, config_from_preset  # noqa: E402
from tinygpt.model.hardware import Ranks  # noqa: E402
from tinygpt.model.sample import generate  # noqa: E402
from tinygpt.model.train import Trainer, TrainConfig  # noqa: E402


@contextlib.contextmanager
def without_rope():
    """llama with apply_rotary as the identity: the same step minus the rotation of queries and keys."""
    real = gpt.apply_rotary
    gpt.apply_rotary = lambda x, cos, sin: x
    try:
        yield
    finally:
        gpt.apply_rotary = real


CLOCK = time.perf_counter  # or time.process_time (--clock cpu)


def fastest(runs: dict[str, callable], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Seconds of the fastest call of each function, calling them in turn `rounds` times."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            start = CLOCK()
            run()
            best[name] = min(best[name], CLOCK() - start)
    return best


def bench_training(folder: Path, preset: str, amp: str, args) -> None:
    def trainer(arch: str) -> Trainer:
        cfg = TrainConfig(str(folder), str(folder / "tokenizer.json"), str(folder / "out.pt"),
                          runs_dir=str(folder / "runs"), preset=preset, arch=arch, batch_size=args.batch_size,
                          amp=amp, device="cpu", max_steps=10**6, eval_batches=1)
        return Trainer(cfg, Ranks(), torch.device("cpu"))

    gpt2, llama = trainer("gpt2"), trainer("llama")

    def llama_without_rope() -> None:
        with without_rope():
            llama.train_step()

    best = fastest({"gpt2": gpt2.train_step, "llama": llama.train_step, "llama, no RoPE": llama_without_rope},
                   args.rounds)
    tokens = args.batch_size * gpt2.model_config.block_size
    used = gpt2.settings["training"]["amp"]
    for name, seconds in best.items():
        note = f"{best['gpt2'] / seconds:.2f}x gpt2's speed"
        if name == "llama":
            note += f"; RoPE {1 - best['llama, no RoPE'] / seconds:.1%} of the step"
        print(f"train   {preset:<6} amp {used:<5} {name:<15} {tokens / seconds:>10,.0f} tokens/s   {note}", flush=True)


def bench_decoding(preset: str, args) -> None:
    models, prompt = {}, torch.randint(0, args.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    for arch in ("gpt2", "llama"):
        torch.manual_seed(0)
        models[arch] = GPT(config_from_preset(preset, args.vocab_size, arch=arch)).eval()
    runs = {arch: (lambda m=m: sum(1 for _ in generate(m, prompt, args.new_tokens, temperature=0)))
            for arch, m in models.items()}
    best = fastest(runs, args.rounds)
    for arch, seconds in best.items():
        print(f"decode  {preset:<6} KV cache  {arch:<15} {args.new_tokens / seconds:>10,.1f} tokens/s   "
              f"{best['gpt2'] / seconds:.2f}x gpt2's speed", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["toy", "small"])
    p.add_argument("--amp", nargs="+", default=["auto", "off"], choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--new_tokens", type=int, default=64, help="decoded tokens per run (within the context)")
    p.add_argument("--rounds", type=int, default=6, help="timed runs of each variant")
    p.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: this process's CPU time, which the neighbours' load leaves alone (use --threads 1: "
                        "with more, threads waiting for each other count too)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        global CLOCK
        CLOCK = time.process_time
    os.environ.setdefault("TINYGPT_NO_PROGRESS", "1")
    print(f"cpu, {torch.get_num_threads()} threads, batch {args.batch_size}, vocab {args.vocab_size}, "
          f"fastest of {args.rounds} interleaved runs by {args.clock} clock")
    with tempfile.TemporaryDirectory() as tmp:
        write_random_tokens(Path(tmp), args.vocab_size, n_tokens=1_000_000)
        for preset in args.presets:
            for amp in args.amp:
                bench_training(Path(tmp), preset, amp, args)
            bench_decoding(preset, args)


if __name__ == "__main__":
    main()

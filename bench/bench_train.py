"""Training throughput of tinygpt's training step against a plain fp32 PyTorch step and the machine's matmul peak.

    python bench/bench_train.py                       # toy and small presets, this machine's threads
    python bench/bench_train.py --presets toy --steps 20 --batch_size 32 --threads 2
    python bench/bench_train.py --arch gpt2 llama      # both architectures, side by side in one run

For each preset (and architecture, --arch) it times, on the same batch shape:
  ours       Trainer.train_step as `tinygpt train` runs it (memmap batches, fused AdamW, autocast --amp auto)
  ours fp32  the same with --amp off
  plain      the textbook loop: our GPT in fp32, default torch.optim.AdamW, batches already in memory
and prints tokens/s and achieved FLOP/s (model.estimate_flops_per_token) as a fraction of the fp32 and bf16
torch.matmul peak measured in the same run on large square matrices (all timings: the fastest of several).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinygpt.model.flops import matmul_peak, synchronize  # noqa: E402
from tinygpt.model.gpt import GPT, config_from_preset  # noqa: E402
from tinygpt.tokenizer.bpe import Tokenizer  # noqa: E402
from tinygpt.model.hardware import Ranks  # noqa: E402
from tinygpt.model.train import Trainer, TrainConfig  # noqa: E402


def write_random_tokens(folder: Path, vocab_size: int, n_tokens: int) -> None:
    """A data folder in the encode stage's format, with random tokens and a tokenizer of the right size."""
    merges = [divmod(k, 256) for k in range(vocab_size - 257)]  # distinct two-byte tokens: enough for timing
    Tokenizer(merges).save(folder / "tokenizer.json")
    rng = np.random.default_rng(0)
    rng.integers(0, vocab_size, n_tokens, dtype=np.uint16).tofile(folder / "train.bin")
    rng.integers(0, vocab_size, n_tokens // 10, dtype=np.uint16).tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": vocab_size, "dtype": "uint16"}))


def time_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds of the fastest of `steps` calls of `step` after `warmup` untimed ones.

    The fastest, like the matmul peak: on a machine shared with other work, that is the closest to what the
    hardware does; the slower calls measure the neighbours.
    """
    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def ours(folder: Path, preset: str, arch: str, amp: str, args, device: torch.device) -> tuple[float, str]:
    cfg = TrainConfig(str(folder), str(folder / "tokenizer.json"), str(folder / "out.pt"), runs_dir=str(folder / "runs"),
                      preset=preset, arch=arch, batch_size=args.batch_size, amp=amp, device=device.type, max_steps=10**6,
                      eval_batches=1, compile=args.compile)
    trainer = Trainer(cfg, Ranks(), device)
    return time_steps(trainer.train_step, args.steps, args.warmup, device), trainer.settings["training"]["amp"]


def plain(preset: str, arch: str, args, device: torch.device) -> float:
    config = config_from_preset(preset, args.vocab_size, arch=arch)
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = (torch.randint(0, args.vocab_size, (args.batch_size, config.block_size), device=device) for _ in range(2))

    def step() -> None:
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return time_steps(step, args.steps, args.warmup, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["toy", "small"])
    p.add_argument("--arch", nargs="+", default=["gpt2"], choices=["gpt2", "llama"], help="model architectures")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
    p.add_argument("--matmul_size", type=int, default=2048)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile our model")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TINYGPT_NO_PROGRESS", "1")
    device = torch.device(args.device)

    peak = {name: matmul_peak(dtype, device, args.matmul_size)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"device {device}, {torch.get_num_threads()} threads; matmul peak {args.matmul_size}^3: "
          f"fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    header = f"{'preset':<6} {'arch':<6} {'variant':<16} {'tokens/s':>10} {'GFLOP/s':>9} {'of fp32 peak':>13} {'of bf16 peak':>13} {'vs plain':>9}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_random_tokens(folder, args.vocab_size, n_tokens=2_000_000)
        for preset in args.presets:
            for arch in args.arch:
                config = config_from_preset(preset, args.vocab_size, arch=arch)
                tokens = args.batch_size * config.block_size
                flops_per_token = GPT(config).estimate_flops_per_token()
                plain_s = plain(preset, arch, args, device)
                rows = [("plain fp32", plain_s)]
                for amp in ("auto", "off"):
                    seconds, used = ours(folder, preset, arch, amp, args, device)
                    rows.append((f"ours amp {used}", seconds))
                for name, seconds in rows:
                    flops = flops_per_token * tokens / seconds
                    print(f"{preset:<6} {arch:<6} {name:<16} {tokens / seconds:>10,.0f} {flops / 1e9:>9.1f} "
                          f"{flops / peak['fp32']:>13.2f} {flops / peak['bf16']:>13.2f} {plain_s / seconds:>8.2f}x",
                          flush=True)


if __name__ == "__main__":
    main()

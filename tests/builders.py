"""Small models and tokenizers that several test modules build: a tiny BPE, a random GPT, a checkpoint file; and
the kill -9 then resume routine the training tests share."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from tinygpt.model.gpt import GPT, GPTConfig
from tinygpt.tokenizer.bpe import Tokenizer
from tinygpt.tokenizer.train_bpe import train_bpe

_SENTENCES = [
    "Once upon a time, a little fox named Pip lived near the river.",
    "She liked to count stones: one, two, three... 42 of them in 2024!",
    "The café served crème brûlée and naïve piñatas; Zoë said «très bien».",
    "   Indented lines,\ttabs and\n\nblank lines matter to byte-level BPE.",
    "It's what they'd said: we'll see, you're right, I'm sure, they've gone.",
    "Ünïcödé wörds, Ελληνικά γράμματα, русский текст и 日本語のテキスト.",
    "Emoji too 🙂🚀 and symbols #$%&*()[]{} <tags> /paths/to/file.txt",
]
# varied text for tokenizer parity: spaces, newlines, accents, digits, contractions, specials
PARITY_TEXTS = [
    "Once upon a time",
    " leading space and trailing space ",
    "two  spaces,   three,\n\nnew lines\r\nand\ttabs",
    "accents: café, naïve, Zoë, 日本語, 🙂",
    "numbers 1234567 and 3.14159; it's they'll we've",
    "end of doc<|endoftext|>next doc",
]


def printable(piece: bytes) -> bool:
    """A token that is whole printable characters: greedy text made of such tokens compares as text."""
    try:
        return piece.decode("utf-8").isprintable()
    except UnicodeDecodeError:
        return False


def corpus(repeats: int = 12) -> list[str]:
    """A few KB of varied text, each repeat slightly different so that BPE finds many merges."""
    return [f"{s} ({i})" for i in range(repeats) for s in _SENTENCES]


@lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 320) -> Tokenizer:
    return train_bpe(corpus(), vocab_size, show_progress=False)


def random_gpt(tokenizer: Tokenizer, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, block_size: int = 64,
               seed: int = 0, std: float = 0.02, **config) -> GPT:
    """A random GPT whose every parameter (norms and biases too) is non-trivial; `config` sets other GPTConfig
    fields (arch="llama", n_kv_head, ...).

    A larger `std` spreads the logits, so that greedy decoding has no near-ties that float rounding could flip.
    """
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                       block_size=block_size, **config)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, std)
    return model.eval()


def save_tiny_checkpoint(path: Path, model: GPT, tokenizer: Tokenizer) -> Path:
    """A checkpoint in the format of docs/formats.md#checkpoints, as tinygpt train writes it."""
    ckpt = {"model": model.state_dict(), "model_config": asdict(model.config),
            "tokenizer_json": tokenizer.to_json_str(), "step": 0, "val_loss": 0.0}
    torch.save(ckpt, path)
    return path


REPO = Path(__file__).resolve().parents[1]
TRAIN_COMMAND = [sys.executable, "-m", "tinygpt.model.train"]


def subprocess_env() -> dict:
    return {**os.environ, "TINYGPT_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}


def run_dirs(out_dir: Path) -> list[Path]:
    return sorted(p for p in (out_dir / "runs").iterdir() if p.is_dir())


def killed_and_resumed(train_args: Callable[[Path], list[str]], tmp_path: Path, max_steps: int) -> tuple[Path, Path]:
    """`tinygpt train` with train_args(out_dir) (--out out_dir/best.pt, --runs_dir out_dir/runs) run whole into
    tmp_path/whole, and into tmp_path/killed SIGKILLed at a random moment after its first last.pt (maybe mid-write
    of the next), then run again by the same command, which must resume from the step that last.pt holds.
    Returns the run folders (whole, resumed) for the caller to compare."""
    from tinygpt.model.checkpoint import load_checkpoint

    env = subprocess_env()
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(TRAIN_COMMAND + train_args(whole), env=env, check=True, capture_output=True)
    proc = subprocess.Popen(TRAIN_COMMAND + train_args(killed), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((killed / "runs").glob("*/last.pt")) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.05))  # anywhere in the following steps, maybe mid-write of the next last.pt
    assert proc.poll() is None, "training finished before it could be killed; give the test more steps"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [run_dir] = run_dirs(killed)
    killed_at = load_checkpoint(run_dir / "last.pt")["step"]
    assert 0 < killed_at < max_steps and not (killed / "best.pt").exists()
    resumed = subprocess.run(TRAIN_COMMAND + train_args(killed), env=env, check=True, capture_output=True, text=True)
    assert f"resuming run {run_dir} from step {killed_at}" in resumed.stdout
    return run_dirs(whole)[0], run_dir

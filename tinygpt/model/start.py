"""Where a training run starts (`init_from`): from scratch, a tinygpt checkpoint, a Hugging Face folder or a GGUF
file; which files identify that source (the workflow's inputs, hashed into the run's fingerprint); its shape,
for the config check before any job runs; and the fine-tuning recipe that replaces the scratch defaults.

Kept free of torch at import: the workflow and the config check read the source's files and shape from here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tinygpt.common import TinyGPTError, sha256_file

SCRATCH = "scratch"
# Schedule defaults (null in config.yaml) by starting point. The fine-tuning values are the usual small-model start;
# bench/bench_finetune.py adapt measures them against scratch (README: "Fine-tune a model you already have").
RECIPES = {
    "scratch": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 50, "max_steps": 650},
    "finetune": {"lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 20, "max_steps": 200},
}
# Training windows when the source's context is longer: a laptop-sized default (model.block_size overrides it).
# A longer model.block_size than the source's context extends a rotary (llama, qwen2) model to it (chat tuning at
# the chat context); learned positions (gpt2) cannot be extended (tinygpt.model.train: Trainer._start_config).
FINETUNE_WINDOW = 512
# An HF folder's files that make the model: configuration, weights (sharded or not, with the index), tokenizer.
HF_PATTERNS = ("config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json")


def is_scratch(init_from: str | None) -> bool:
    return init_from in (None, "", SCRATCH)


def recipe(init_from: str | None) -> dict:
    return RECIPES["scratch" if is_scratch(init_from) else "finetune"]


def source_files(init_from: str) -> list[Path]:
    """The files that make the starting model, sorted; a source that does not exist is one clear error."""
    path = Path(init_from)
    if path.is_dir():
        files = sorted({f for pattern in HF_PATTERNS for f in path.glob(pattern) if f.is_file()})
        if not (path / "config.json").is_file() or not any(f.suffix == ".safetensors" for f in files):
            raise TinyGPTError(f"train.init_from {init_from} is a folder without config.json and *.safetensors; "
                               "give a Hugging Face model folder (huggingface-cli download ... --local-dir DIR)")
        return files
    if path.is_file():
        return [path]
    raise TinyGPTError(f"train.init_from {init_from} does not exist; give `scratch`, a tinygpt checkpoint (.pt), "
                       "a Hugging Face model folder or a GGUF file")


def source_sha256(init_from: str) -> str:
    """One hash over the source's files (names within the source and contents): a new source, a new run."""
    digest = hashlib.sha256()
    root = Path(init_from)
    for f in source_files(init_from):
        digest.update(f"{f.relative_to(root) if root.is_dir() else f.name}\0{sha256_file(f)}\n".encode())
    return digest.hexdigest()


@dataclass
class Start:
    """A starting model: its GPTConfig, state dict and tokenizer.json text, and the hash that identifies it."""

    config: object  # GPTConfig (not imported here: torch-free)
    state: dict
    tokenizer_json: str
    sha256: str
    kind: str


def read_start(init_from: str) -> Start:
    """Read the starting model (tinygpt.weights's reader: any of the formats it knows)."""
    from tinygpt.weights.read import read_model

    config, state, tokenizer_json, kind = read_model(init_from)
    return Start(config, state, tokenizer_json, source_sha256(init_from), kind)


def source_shape(init_from: str) -> dict:
    """The source's GPTConfig fields, for the config check (every Snakemake start): a Hugging Face folder's from
    its config.json alone, a GGUF file's from its metadata (dequantizing the tensors would take seconds and
    gigabytes of a real model), a checkpoint by reading it."""
    from dataclasses import asdict

    path = Path(init_from)
    source_files(init_from)  # one clear error for a missing source
    if path.is_dir():
        from tinygpt.weights.hf_read import read_hf_config

        return asdict(read_hf_config(path))
    with open(path, "rb") as f:
        if f.read(4) == b"GGUF":
            from tinygpt.weights.gguf_read import gguf_config, open_gguf

            return asdict(gguf_config(open_gguf(path)))
    from tinygpt.weights.read import read_model

    return asdict(read_model(path)[0])

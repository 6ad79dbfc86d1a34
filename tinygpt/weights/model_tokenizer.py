"""Stage model_tokenizer: the tokenizer of a model to start from (train.init_from), written as the tokenizer.json
that `encode` uses in place of one that train_bpe learns.

The model is a tinygpt checkpoint (the tokenizer it was trained with), a Hugging Face folder or its tokenizer.json,
or a GGUF file (its `tokenizer.ggml.*` metadata: only the header is read, never the tensors). The tokenizer is
checked to be one tinygpt encodes exactly as Hugging Face does (see `tinygpt.tokenizer.hf_json`); it is the one
`tinygpt train --init_from` reads from the same model, so the tokens and the model agree.

A stage of its own, not a flag of train_bpe: reading checkpoints needs torch and the model code, and the scratch
tokenizer must not rerun when they change (a stage's sources are what it imports, see `tinygpt.sources`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from tinygpt.common import TinyGPTError, require_file, run_cli
from tinygpt.model.checkpoint import load_checkpoint
from tinygpt.tokenizer.bpe import Tokenizer
from tinygpt.weights.gguf_read import gguf_tokenizer, open_gguf

SOURCES = "a tinygpt checkpoint (.pt), a Hugging Face model folder (with tokenizer.json) or a GGUF file"


def model_tokenizer(source: str | os.PathLike) -> Tokenizer:
    """The tokenizer of the model at `source` (see the module docstring); one clear TinyGPTError otherwise."""
    path = Path(source)
    if path.is_dir():
        path = path / "tokenizer.json"
    path = require_file(path, "model", f"give {SOURCES}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return gguf_tokenizer(open_gguf(path))
    if magic[:2] == b"PK":  # torch.save's zip container
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt.get("tokenizer_json"), str):
            raise TinyGPTError(f"checkpoint {path} has no tokenizer_json; give a checkpoint written by tinygpt train")
        return Tokenizer.from_json_str(ckpt["tokenizer_json"], source=f"checkpoint {path}")
    if path.suffix != ".json":
        raise TinyGPTError(f"{path} is neither a tinygpt checkpoint, a GGUF file nor a tokenizer.json; give {SOURCES}")
    return Tokenizer.load(path)


def main(argv: Sequence[str] | None = None) -> Tokenizer:
    parser = argparse.ArgumentParser(prog="tinygpt model_tokenizer", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help=f"{SOURCES}, or a tokenizer.json")
    parser.add_argument("--out", required=True, help="tokenizer.json to write (Hugging Face format)")
    args = parser.parse_args(argv)
    tokenizer = model_tokenizer(args.model)
    tokenizer.save(args.out)
    print(f"saved {args.out}: the tokenizer of {args.model}, vocab_size {tokenizer.vocab_size}", file=sys.stderr)
    return tokenizer


if __name__ == "__main__":
    run_cli(main)

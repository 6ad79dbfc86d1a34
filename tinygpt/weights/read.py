"""One entry point for every model tinygpt can start from: a tinygpt checkpoint, a Hugging Face folder or a GGUF
file, each read into (GPTConfig, state dict under our names, tokenizer.json text, what kind of source it was)."""

from __future__ import annotations

from pathlib import Path

import torch

from tinygpt.common import TinyGPTError
from tinygpt.model.gpt import GPT, GPTConfig
from tinygpt.tokenizer.bpe import Tokenizer
from tinygpt.weights.gguf_read import SUPPORTED as GGUF_SUPPORTED
from tinygpt.weights.gguf_read import read_gguf_model
from tinygpt.weights.hf_read import SUPPORTED as HF_SUPPORTED
from tinygpt.weights.hf_read import read_hf_folder

KINDS = ("tinygpt", "hf", "gguf")


def read_model(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor], str, str]:
    """(config, state dict, tokenizer.json text, kind) of the model at `path`; kind is one of KINDS.

    The state dict holds every tensor GPT(config).state_dict() has (a tied head under both names), in the dtype
    the source stores (float32, or float16/bfloat16 for half-precision files: call .float() on the model to
    train). Anything else stops with one message saying what is supported."""
    path = Path(path)
    if path.is_dir():
        config, state, tokenizer_json = read_hf_folder(path)
        return config, state, tokenizer_json, "hf"
    if not path.is_file():
        raise TinyGPTError(f"{path} does not exist; give a tinygpt checkpoint (.pt), a Hugging Face model folder "
                           "or a GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        config, state, tokenizer_json = read_gguf_model(path)
        return config, state, tokenizer_json, "gguf"
    if magic[:2] == b"PK":  # torch.save's zip container
        from tinygpt.model.checkpoint import checked_model_state, load_checkpoint

        ckpt = load_checkpoint(path)
        config, state = checked_model_state(ckpt, path)
        return config, state, ckpt["tokenizer_json"], "tinygpt"
    raise TinyGPTError(f"{path} is neither a tinygpt checkpoint nor a GGUF file. {HF_SUPPORTED}; {GGUF_SUPPORTED}")


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """The model at `path` (eval mode, float32, on `device`) and its tokenizer, for sampling and evaluation."""
    config, state, tokenizer_json, _ = read_model(path)
    model = GPT(config)
    model.load_state_dict(state)
    return model.to(device).eval(), Tokenizer.from_json_str(tokenizer_json, source=str(path))

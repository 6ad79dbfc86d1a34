"""Checkpoints: plain dicts of tensors and primitive values, written atomically, read with weights_only=True.

A checkpoint never needs unpickling of arbitrary objects, so loading one from elsewhere cannot run code.
The final checkpoint (what `--out` of the train stage holds) is self-contained: "model" (state dict),
"model_config" (GPTConfig fields), "tokenizer_json" (the tokenizer.json text), "step" and "val_loss".
"""

from __future__ import annotations

import os
from dataclasses import fields

import torch

from tinygpt.common import TinyGPTError, atomic_open, require_file
from tinygpt.model import GPT, GPTConfig
from tinygpt.tokenizer import Tokenizer

MODEL_KEYS = ("model", "model_config", "tokenizer_json")


def save_checkpoint(path: str | os.PathLike, obj: dict) -> None:
    """Write `obj` to `path` so that a crash at any moment leaves either the old file or the new one."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint's dict on the CPU; TinyGPTError if the file is missing, truncated or not a checkpoint."""
    path = require_file(path, "checkpoint", "train one with `python -m tinygpt.train`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file fails anywhere in the unpickler (KeyError, EOFError, BadZipFile, ...)
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise TinyGPTError(
            f"checkpoint {path} is truncated or not a tinygpt checkpoint ({reason}); delete it and train again"
        ) from None
    if not isinstance(ckpt, dict):
        raise TinyGPTError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict; it was not written by tinygpt.train")
    return ckpt


def model_config_from_dict(config: dict, source: str | os.PathLike) -> GPTConfig:
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise TinyGPTError(f"checkpoint {source} has unknown model_config key(s) {', '.join(unknown)}; "
                           "it was written by a different version of tinygpt")
    try:
        return GPTConfig(**config)
    except TypeError as e:
        raise TinyGPTError(f"checkpoint {source} has an incomplete model_config ({e})") from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """The checkpoint's model (in eval mode, on `device`) and its tokenizer."""
    ckpt = load_checkpoint(path)
    missing = [key for key in MODEL_KEYS if key not in ckpt]
    if missing:
        raise TinyGPTError(f"checkpoint {path} lacks {', '.join(missing)}; it was not written by tinygpt.train")
    model = GPT(model_config_from_dict(ckpt["model_config"], path))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise TinyGPTError(f"checkpoint {path} does not match its model_config ({str(e).splitlines()[0]})") from None
    tokenizer = Tokenizer.from_json_str(ckpt["tokenizer_json"], source=f"checkpoint {path}")
    return model.to(device).eval(), tokenizer

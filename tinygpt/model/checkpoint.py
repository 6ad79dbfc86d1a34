"""Checkpoints: plain dicts of tensors and primitive values, written atomically, read with weights_only=True.

A checkpoint never needs unpickling of arbitrary objects, so loading one from elsewhere cannot run code.
The final checkpoint (what `--out` of the train stage holds) is self-contained: "model" (state dict),
"model_config" (GPTConfig fields, the architecture among them), "tokenizer_json" (the tokenizer.json text),
"step" and "val_loss"; a chat model's (tuned on a chat token folder) also "chat_template", the Jinja text its
prompts are rendered with (docs/formats.md), which export carries on into tokenizer_config.json and GGUF.
"""

from __future__ import annotations

import os
from dataclasses import fields

import torch

from tinygpt.common import TinyGPTError, atomic_open, require_file
from tinygpt.model.gpt import GPT, GPTConfig
from tinygpt.tokenizer.bpe import Tokenizer

MODEL_KEYS = ("model", "model_config", "tokenizer_json")
# model_config keys that older versions wrote under another name
RENAMED_KEYS = {"layer_norm_epsilon": "norm_eps"}


def save_checkpoint(path: str | os.PathLike, obj: dict) -> None:
    """Write `obj` to `path` so that a crash at any moment leaves either the old file or the new one."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint's dict on the CPU; TinyGPTError if the file is missing, truncated or not a checkpoint."""
    path = require_file(path, "checkpoint", "train one with `tinygpt train`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file fails anywhere in the unpickler (KeyError, EOFError, BadZipFile, ...)
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise TinyGPTError(
            f"checkpoint {path} is truncated or not a tinygpt checkpoint ({reason}); delete it and train again"
        ) from None
    if not isinstance(ckpt, dict):
        raise TinyGPTError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict; it was not written by tinygpt train")
    return ckpt


def model_config_from_dict(config: dict, source: str | os.PathLike) -> GPTConfig:
    """The GPTConfig a checkpoint's model_config describes. Checkpoints from before the llama architecture have
    no `arch` (GPTConfig's default, gpt2, is right for them) and call norm_eps layer_norm_epsilon."""
    config = {RENAMED_KEYS.get(key, key): value for key, value in config.items()}
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise TinyGPTError(f"checkpoint {source} has unknown model_config key(s) {', '.join(unknown)}; "
                           "it was written by a different version of tinygpt")
    try:
        return GPTConfig(**config)
    except TypeError as e:
        raise TinyGPTError(f"checkpoint {source} has an incomplete model_config ({e})") from None


def checked_model_state(ckpt: dict, source: str | os.PathLike) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The checkpoint's GPTConfig and state dict, after checking every tensor's name and shape against the config."""
    missing = [key for key in MODEL_KEYS if key not in ckpt]
    if missing:
        raise TinyGPTError(f"checkpoint {source} lacks {', '.join(missing)}; it was not written by tinygpt train")
    config = model_config_from_dict(ckpt["model_config"], source)
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        expected = {name: tuple(t.shape) for name, t in GPT(config).state_dict().items()}
    state = ckpt["model"]
    problems = [f"{name} is missing" for name in expected if name not in state]
    problems += [f"{name} is unexpected" for name in state if name not in expected]
    problems += [
        f"{name} has shape {tuple(state[name].shape)}, the config needs {shape}"
        for name, shape in expected.items()
        if name in state and tuple(state[name].shape) != shape
    ]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise TinyGPTError(
            f"checkpoint {source} does not match its model_config ({shown}); the file is corrupt or was edited: "
            "re-create it with tinygpt train"
        )
    return config, state


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """The checkpoint's model (in eval mode, on `device`) and its tokenizer."""
    ckpt = load_checkpoint(path)
    config, state = checked_model_state(ckpt, path)
    model = GPT(config)
    model.load_state_dict(state)
    tokenizer = Tokenizer.from_json_str(ckpt["tokenizer_json"], source=f"checkpoint {path}")
    return model.to(device).eval(), tokenizer

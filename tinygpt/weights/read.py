"""One entry point for every model tinygpt can start from: a tinygpt checkpoint, a Hugging Face folder or a GGUF
file, each read into (GPTConfig, state dict under our names, tokenizer.json text, what kind of source it was),
and the chat template a chat model carries (read_chat_template)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tinygpt.common import TinyGPTError
from tinygpt.model.gpt import GPT, GPTConfig
from tinygpt.tokenizer.bpe import Tokenizer
from tinygpt.weights.gguf_read import SUPPORTED as GGUF_SUPPORTED
from tinygpt.weights.gguf_read import gguf_chat_template, read_gguf_model
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
    magic = _magic(path)
    if magic == b"GGUF":
        config, state, tokenizer_json = read_gguf_model(path)
        return config, state, tokenizer_json, "gguf"
    if magic[:2] == b"PK":  # torch.save's zip container
        from tinygpt.model.checkpoint import checked_model_state, load_checkpoint

        ckpt = load_checkpoint(path)
        config, state = checked_model_state(ckpt, path)
        return config, state, ckpt["tokenizer_json"], "tinygpt"
    raise TinyGPTError(f"{path} is neither a tinygpt checkpoint nor a GGUF file. {HF_SUPPORTED}; {GGUF_SUPPORTED}")


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """The model at `path` (eval mode, float32, on `device`) and its tokenizer, for sampling and evaluation."""
    config, state, tokenizer_json, _ = read_model(path)
    model = GPT(config)
    model.load_state_dict(state)
    return model.to(device).eval(), Tokenizer.from_json_str(tokenizer_json, source=str(path))


def hf_tokenizer_config(folder: str | Path) -> dict[str, Any]:
    """The folder's tokenizer_config.json as a dict ({} when it has none: a folder needs only tokenizer.json)."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinyGPTError(f"{path} is not valid JSON ({e}); re-download or re-export the model") from None
    if not isinstance(settings, dict):
        raise TinyGPTError(f"{path} holds a {type(settings).__name__}, not an object; re-export the model")
    return settings


def read_chat_template(path: str | Path) -> str | None:
    """The Jinja chat template of the model at `path` (a checkpoint's "chat_template", a Hugging Face folder's
    tokenizer_config.json or chat_template.jinja, a GGUF file's tokenizer.chat_template); None for a base model."""
    path = Path(path)
    if path.is_dir():
        template = hf_tokenizer_config(path).get("chat_template")
        jinja = path / "chat_template.jinja"  # where newer transformers save it
        if template is None and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
    elif path.is_file() and _magic(path) == b"GGUF":
        template = gguf_chat_template(path)
    else:
        from tinygpt.model.checkpoint import load_checkpoint

        template = load_checkpoint(path).get("chat_template")
    if template is not None and not isinstance(template, str):
        raise TinyGPTError(f"{path}: the chat template is a {type(template).__name__}, not one Jinja string; "
                           "tinygpt chats with a single template")
    return template

"""Load a `gpt2` or `llama` GGUF file (ours or any with the same layout) back into our PyTorch GPT and Tokenizer.

gguf-py parses the file and dequantizes every tensor type llama.cpp writes (F16, BF16, Q8_0, Q4_K, Q6_K,
Q5_0, ...), so a quantized file runs in PyTorch with exactly the weights llama.cpp sees: this is how we
measure what quantization costs (perplexity of f16 vs q4_k_m) without llama.cpp.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from tinygpt.common import TinyGPTError, require_file
from tinygpt.weights.names import by, lm_head_name, model_dims, shape_of, tensor_names
from tinygpt.model.gpt import ARCHS, GPT, GPTConfig
from tinygpt.tokenizer.bpe import Tokenizer

def read_gguf(path: str | Path, hint: str = "re-create it with tinygpt gguf_convert") -> gguf.GGUFReader:
    """Parse a GGUF file (memory-mapped); a missing, truncated or non-GGUF file is one clear TinyGPTError."""
    path = require_file(path, "GGUF file", "create it with tinygpt gguf_convert")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as e:
        # gguf-py reports a truncated file as a short read (IndexError) or a failed reshape (ValueError)
        raise TinyGPTError(
            f"{path} is not a readable GGUF file: truncated or of another format ({type(e).__name__}: {e}); {hint}"
        ) from None


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is not None:
            return default
        raise TinyGPTError(
            f"GGUF file {reader.data.filename} has no metadata key {key!r}; it is not a tinygpt gpt2 or llama file"
        )
    return field.contents()


def _f32(value: float) -> float:
    """A value stored as f32, as the shortest decimal that round-trips in f32: 1e-05, not 9.99999974e-06."""
    return float(str(np.float32(value)))


def gguf_config(reader: gguf.GGUFReader) -> GPTConfig:
    """The GPTConfig described by the file's `gpt2.*` or `llama.*` metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise TinyGPTError(
            f"GGUF file {reader.data.filename} has architecture {arch!r}; tinygpt loads {' and '.join(ARCHS)} files"
        )
    n_embd = int(_field(reader, f"{arch}.embedding_length"))
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    settings = dict(
        vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
        arch=arch,
        n_layer=int(_field(reader, f"{arch}.block_count")),
        n_head=n_head,
        n_embd=n_embd,
        block_size=int(_field(reader, f"{arch}.context_length")),
        # a separate output.weight is an untied LM head
        tie_embeddings=not any(t.name == lm_head_name(arch).gguf for t in reader.tensors),
    )
    if arch == "gpt2":
        settings["norm_eps"] = _f32(_field(reader, "gpt2.attention.layer_norm_epsilon"))
    else:
        settings["n_kv_head"] = int(_field(reader, "llama.attention.head_count_kv", n_head))
        settings["norm_eps"] = _f32(_field(reader, "llama.attention.layer_norm_rms_epsilon"))
        settings["rope_theta"] = _f32(_field(reader, "llama.rope.freq_base", 10000.0))
        rope_dims = int(_field(reader, "llama.rope.dimension_count", n_embd // n_head))
        if rope_dims != n_embd // n_head:
            raise TinyGPTError(f"GGUF file {reader.data.filename} rotates {rope_dims} of each head's "
                               f"{n_embd // n_head} values; tinygpt's llama rotates them all")
    config = GPTConfig(**settings)
    n_ff = int(_field(reader, f"{arch}.feed_forward_length"))
    if n_ff != config.ffn_hidden:
        raise TinyGPTError(
            f"GGUF file {reader.data.filename} has feed_forward_length {n_ff}; tinygpt's {arch} MLP with "
            f"n_embd {n_embd} has {config.ffn_hidden}"
        )
    return config


def gguf_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """The byte-level BPE tokenizer stored in the file's `tokenizer.ggml.*` metadata."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise TinyGPTError(
            f"GGUF file {reader.data.filename} has tokenizer model {model!r}; expected 'gpt2' (byte-level BPE)"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    if not 0 <= eos < len(tokens):
        raise TinyGPTError(f"GGUF file {reader.data.filename} has eos_token_id {eos} outside its {len(tokens)} tokens")
    return Tokenizer.from_token_strings(tokens, _field(reader, "tokenizer.ggml.merges"), eot_token=tokens[eos])


def dequantized_tensors(reader: gguf.GGUFReader, config: GPTConfig) -> dict[str, torch.Tensor]:
    """Every tensor as float32 under our names, in our layout (numpy shape = reversed GGML shape, and the rows
    of llama's Q and K back in our rotary order)."""
    names = by("gguf", tensor_names(config.arch, config.n_layer, config.tie_embeddings))
    dims = model_dims(config.vocab_size, config.block_size, config.n_embd, config.ffn_hidden, config.n_head,
                      config.n_kv_head)
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name not in names:
            raise TinyGPTError(f"GGUF file {reader.data.filename} has tensor {t.name!r}, which is not part of a "
                               f"tinygpt {config.arch} model")
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise TinyGPTError(
                f"GGUF tensor {t.name} has type {t.tensor_type.name}, which gguf-py cannot dequantize"
            ) from None
        shape = [int(d) for d in t.shape.tolist()]
        while len(shape) > 1 and shape[-1] == 1:  # a trailing unit dim is no dim, for llama.cpp as for us
            shape.pop()
        name = names[t.name]
        expected = shape_of(name, dims)
        if tuple(reversed(shape)) != expected:
            raise TinyGPTError(f"GGUF file {reader.data.filename}: tensor {t.name} has shape "
                               f"{tuple(reversed(shape))}, the metadata needs {expected}")
        values = np.array(values, dtype=np.float32).reshape(expected)
        tensors[name.ours] = torch.from_numpy(np.ascontiguousarray(name.gguf_to_ours(values, dims)))
    return tensors


def load_gguf(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """Our GPT (eval mode, float32, on `device`) and Tokenizer from a gpt2 or llama GGUF file, weights dequantized."""
    reader = read_gguf(path)
    config, tokenizer = gguf_config(reader), gguf_tokenizer(reader)
    state = dequantized_tensors(reader, config)
    model = GPT(config)
    expected = model.state_dict()
    if config.tie_embeddings:  # llama.cpp reuses token_embd as the output
        state["lm_head.weight"] = state.get("tok_emb.weight")
    missing = [n for n in expected if state.get(n) is None]
    if missing:
        raise TinyGPTError(f"GGUF file {path} does not match its own metadata ({', '.join(missing[:3])} missing)")
    model.load_state_dict(state)
    return model.to(device).eval(), tokenizer

"""Load a `gpt2` GGUF file (ours or any with the same layout) back into our PyTorch GPT and Tokenizer.

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
from tinygpt.export.names import GPT2_HEAD, by, tensor_names
from tinygpt.model.gpt import GPT, GPTConfig
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


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        raise TinyGPTError(
            f"GGUF file {reader.data.filename} has no metadata key {key!r}; it is not a tinygpt gpt2 file"
        )
    return field.contents()


def gguf_config(reader: gguf.GGUFReader) -> GPTConfig:
    """The GPTConfig described by the file's `gpt2.*` metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "gpt2":
        raise TinyGPTError(
            f"GGUF file {reader.data.filename} has architecture {arch!r}; only 'gpt2' files can be loaded"
        )
    n_embd = int(_field(reader, "gpt2.embedding_length"))
    n_ff = int(_field(reader, "gpt2.feed_forward_length"))
    if n_ff != 4 * n_embd:
        raise TinyGPTError(
            f"GGUF file {reader.data.filename} has feed_forward_length {n_ff}; tinygpt's MLP needs 4 * {n_embd}"
        )
    return GPTConfig(
        vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
        n_layer=int(_field(reader, "gpt2.block_count")),
        n_head=int(_field(reader, "gpt2.attention.head_count")),
        n_embd=n_embd,
        block_size=int(_field(reader, "gpt2.context_length")),
        # stored as f32: the shortest decimal that round-trips in f32 gives back e.g. 1e-05, not 9.99999974e-06
        layer_norm_epsilon=float(str(np.float32(_field(reader, "gpt2.attention.layer_norm_epsilon")))),
    )


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


def our_name(name: str, n_layer: int) -> str:
    """Our state-dict name for a GGUF tensor name."""
    if name == GPT2_HEAD.gguf:
        raise TinyGPTError("the GGUF file has a separate output.weight; tinygpt's GPT ties its LM head to token_embd")
    names = by("gguf", tensor_names("gpt2", n_layer))
    if name not in names:
        raise TinyGPTError(f"the GGUF file has tensor {name!r}, which is not part of a gpt2 model")
    return names[name].ours


def dequantized_tensors(reader: gguf.GGUFReader, n_layer: int) -> dict[str, torch.Tensor]:
    """Every tensor as float32 under our names, in PyTorch layout (numpy shape = reversed GGML shape)."""
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise TinyGPTError(
                f"GGUF tensor {t.name} has type {t.tensor_type.name}, which gguf-py cannot dequantize"
            ) from None
        dims = [int(d) for d in t.shape.tolist()]
        while len(dims) > 1 and dims[-1] == 1:  # a trailing unit dim is no dim, for llama.cpp as for us
            dims.pop()
        shape = tuple(reversed(dims))
        tensors[our_name(t.name, n_layer)] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
    return tensors


def load_gguf(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """Our GPT (eval mode, float32, on `device`) and Tokenizer from a gpt2 GGUF file, weights dequantized."""
    reader = read_gguf(path)
    config, tokenizer = gguf_config(reader), gguf_tokenizer(reader)
    state = dequantized_tensors(reader, config.n_layer)
    model = GPT(config)
    expected = model.state_dict()
    state["lm_head.weight"] = state.get("tok_emb.weight")  # tied: llama.cpp reuses token_embd as the output
    problems = [f"{n} is missing" for n in expected if state.get(n) is None]
    problems += [f"{n} has shape {tuple(state[n].shape)}, the metadata needs {tuple(e.shape)}"
                 for n, e in expected.items() if state.get(n) is not None and state[n].shape != e.shape]  # fmt: skip
    if problems:
        raise TinyGPTError(f"GGUF file {path} does not match its own metadata ({'; '.join(problems[:3])})")
    model.load_state_dict(state)
    return model.to(device).eval(), tokenizer

"""Load a `gpt2`, `llama` or `qwen2` GGUF file (ours, or llama.cpp's conversion of a model of those families) back
into our PyTorch GPT and Tokenizer.

gguf-py parses the file and dequantizes every tensor type llama.cpp writes (F16, BF16, Q8_0, Q4_K, Q6_K,
Q5_0, ...), so a quantized file runs in PyTorch with exactly the weights llama.cpp sees: this is how we
measure what quantization costs (perplexity of f16 vs q4_k_m) without llama.cpp.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from tinygpt.common import TinyGPTError, require_file
from tinygpt.model.gpt import ARCHS, GPT, GPTConfig, llama3_freq_factors
from tinygpt.tokenizer.bpe import Tokenizer
from tinygpt.tokenizer.pipeline import LLAMA3_PATTERN, QWEN2_PATTERN
from tinygpt.weights.gguf_file import GGUFFile
from tinygpt.weights.names import ROPE_FREQS, by, config_dims, lm_head_name, shape_of, tensor_names

SUPPORTED = ("tinygpt reads GGUF files of architecture gpt2, llama (SmolLM, SmolLM2, Llama 3.x) or qwen2 with a "
             "byte-level BPE tokenizer (tokenizer.ggml.model gpt2)")
# Llama 3.x's rope_scaling, tried first when a file's rope_freqs.weight has to be read back as settings
LLAMA3_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


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


def open_gguf(path: str | Path, hint: str = SUPPORTED) -> GGUFFile:
    """The file's metadata and memory-mapped tensors, read in a fraction of a second even with a 150k-token
    vocabulary (gguf.GGUFReader takes minutes there); a damaged or foreign file is one clear TinyGPTError."""
    path = require_file(path, "GGUF file", "create it with tinygpt gguf_convert")
    try:
        return GGUFFile(path)
    except (ValueError, struct.error, UnicodeDecodeError, OSError) as e:
        raise TinyGPTError(
            f"{path} is not a readable GGUF file: truncated or of another format ({type(e).__name__}: {e}); {hint}"
        ) from None


def _filename(reader: gguf.GGUFReader | GGUFFile) -> str:
    return reader.filename if isinstance(reader, GGUFFile) else reader.data.filename


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is not None:
            return default
        raise TinyGPTError(
            f"GGUF file {_filename(reader)} has no metadata key {key!r}; {SUPPORTED}"
        )
    return field.contents()


def _f32(value: float) -> float:
    """A value stored as f32, as the shortest decimal that round-trips in f32: 1e-05, not 9.99999974e-06."""
    return float(str(np.float32(value)))


def gguf_config(reader: gguf.GGUFReader) -> GPTConfig:
    """The GPTConfig described by the file's `<arch>.*` metadata (and its rope_freqs.weight, Llama 3.1's scaling)."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise TinyGPTError(f"GGUF file {_filename(reader)} has architecture {arch!r}; {SUPPORTED}")
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
        settings["n_kv_head"] = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
        settings["norm_eps"] = _f32(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon"))
        settings["rope_theta"] = _f32(_field(reader, f"{arch}.rope.freq_base", 10000.0))
        rope_dims = int(_field(reader, f"{arch}.rope.dimension_count", n_embd // n_head))
        if rope_dims != n_embd // n_head:
            raise TinyGPTError(f"GGUF file {_filename(reader)} rotates {rope_dims} of each head's "
                               f"{n_embd // n_head} values; tinygpt's {arch} rotates them all")
        if reader.get_field(f"{arch}.rope.scaling.type") is not None:
            raise TinyGPTError(f"GGUF file {_filename(reader)} scales its RoPE "
                               f"({arch}.rope.scaling.type); tinygpt runs plain RoPE and Llama 3.1's rope_freqs")
    config = GPTConfig(**settings)
    n_ff = int(_field(reader, f"{arch}.feed_forward_length"))
    if n_ff != config.ffn_hidden:  # files of our own models follow the rule and stay n_ff=None, as trained
        config.n_ff = n_ff
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:
        config.rope_scaling = rope_scaling_from_factors(np.array(freqs.data, dtype=np.float32), config,
                                                        _filename(reader))
    return config


def rope_scaling_from_factors(factors: np.ndarray, config: GPTConfig, source: str) -> dict | None:
    """The llama3 rope_scaling whose frequency divisors are `factors` (llama.cpp stores only these).

    Scaling the original context and both frequency factors together leaves the divisors unchanged, so the
    settings are read as Llama 3.x's (low 1, high 4, context 8192) when those reproduce the divisors, and
    otherwise fitted with low_freq_factor 1 from the blended divisors (two or more are needed)."""
    factor = float(factors.max())
    if config.arch == "gpt2" or factors.shape != (config.head_dim // 2,):
        raise TinyGPTError(f"GGUF file {source}: {ROPE_FREQS} has shape {factors.shape}; {SUPPORTED}")
    if np.all(factors == 1.0):
        return None
    half = config.head_dim // 2
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(half, dtype=torch.float32) * 2 / config.head_dim)
    candidates = [{"rope_type": "llama3", "factor": factor, **LLAMA3_SCALING}]
    blended = (factors > 1.0) & (factors < factor)
    if blended.sum() >= 2:  # 1/f = (1 - s)/factor + s with s = context/wavelength - low (low = 1, high - low = 1/k)
        smooth = (1 / factors[blended] - 1 / factor) / (1 - 1 / factor)
        wavelen = (2 * np.pi / inv_freq.numpy())[blended]
        slope, intercept = np.polyfit(1 / wavelen, smooth, 1)  # slope = context * k, intercept = -k
        k = -intercept
        if k > 0:
            candidates.append({"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                               "high_freq_factor": float(f"{1 + 1 / k:.6g}"),  # fitted from f32 values
                               "original_max_position_embeddings": round(float(slope / k))})
    for scaling in candidates:
        if torch.allclose(llama3_freq_factors(inv_freq, scaling), torch.from_numpy(factors), rtol=1e-5):
            return scaling
    raise TinyGPTError(f"GGUF file {source}: {ROPE_FREQS} is not a Llama 3.1 rope scaling tinygpt can read back; "
                       f"{SUPPORTED}")


def gguf_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """The byte-level BPE tokenizer stored in the file's `tokenizer.ggml.*` metadata."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        kind = " (SentencePiece)" if model == "llama" else ""
        raise TinyGPTError(f"GGUF file {_filename(reader)} has tokenizer model {model!r}{kind}; {SUPPORTED}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    if not 0 <= eos < len(tokens):
        raise TinyGPTError(f"GGUF file {_filename(reader)} has eos_token_id {eos} outside its {len(tokens)} tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    try:  # tinygpt's own id layout (what train_bpe makes): rebuilt as it was trained
        return Tokenizer.from_token_strings(tokens, merges, eot_token=tokens[eos])
    except TinyGPTError:  # a family's own vocabulary order: through the tokenizer.json it came from
        return Tokenizer.from_json_str(gguf_tokenizer_json(reader), source=f"GGUF file {_filename(reader)}",
                                       eot_token=tokens[eos])


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split_then_bytes(pattern: str) -> dict:
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    return {"type": "Sequence", "pretokenizers": [split, _byte_level(False)]}


# tokenizer.ggml.pre -> (normalizer, pre-tokenizer) of that family's tokenizer.json
PRE_TOKENIZERS = {
    "gpt-2": (None, _byte_level(True)),
    "smollm": (None, {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                              _byte_level(True)]}),
    "llama-bpe": (None, _split_then_bytes(LLAMA3_PATTERN)),
    "qwen2": ({"type": "NFC"}, _split_then_bytes(QWEN2_PATTERN)),
}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


def gguf_tokenizer_json(reader: gguf.GGUFReader) -> str:
    """The Hugging Face tokenizer.json that llama.cpp's converter turned into the file's `tokenizer.ggml.*`
    metadata: vocabulary and merges, the pre-tokenizer that `tokenizer.ggml.pre` names, control tokens as special
    added tokens (user-defined ones as plain added tokens), and the BOS that `add_bos_token` asks for."""
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise TinyGPTError(f"GGUF file {_filename(reader)} has tokenizer.ggml.pre {pre!r}; tinygpt reads "
                           f"{', '.join(PRE_TOKENIZERS)}. {SUPPORTED}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
    vocab, added = {}, []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind == TOKEN_NORMAL:
            vocab[token] = i
        else:  # control, user-defined, and the converter's unused padding entries
            added.append({"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": kind != TOKEN_USER_DEFINED})
    normalizer, pre_tokenizer = PRE_TOKENIZERS[pre]
    post = None
    if _field(reader, "tokenizer.ggml.add_bos_token", False):
        bos = tokens[int(_field(reader, "tokenizer.ggml.bos_token_id"))]
        post = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [], "special_tokens": {}}
    ignore_merges = pre == "llama-bpe"  # Llama 3's tokenizer.json sets it; llama.cpp's llama-bpe follows it
    spec = {"version": "1.0", "added_tokens": added, "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
            "post_processor": post, "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "ignore_merges": ignore_merges, "vocab": vocab,
                      "merges": list(_field(reader, "tokenizer.ggml.merges"))}}
    return json.dumps(spec, ensure_ascii=False)


def dequantized_tensors(reader: gguf.GGUFReader, config: GPTConfig) -> dict[str, torch.Tensor]:
    """Every tensor under our names, in our layout (numpy shape = reversed GGML shape, and the rows of llama's Q
    and K back in our rotary order): F16 and BF16 as stored (half the memory), the rest as float32."""
    names = by("gguf", tensor_names(config.arch, config.n_layer, config.tie_embeddings))
    dims = config_dims(config)
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == ROPE_FREQS and config.rope_scaling is not None:
            continue  # read into config.rope_scaling; our model computes it
        if t.name not in names:
            raise TinyGPTError(f"GGUF file {_filename(reader)} has tensor {t.name!r}, which is not part of a "
                               f"tinygpt {config.arch} model")
        try:
            values = _stored_values(t)
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
            raise TinyGPTError(f"GGUF file {_filename(reader)}: tensor {t.name} has shape "
                               f"{tuple(reversed(shape))}, the metadata needs {expected}")
        # writable memory of its own: training writes into these tensors (load_state_dict(assign=True) keeps
        # them), and gguf.GGUFReader's arrays are views of a read-only memory map
        values = torch.from_numpy(values if values.flags.writeable else values.copy()).reshape(expected)
        if values.dtype == torch.int16:  # BF16 arrives as raw 16-bit words
            values = values.view(torch.bfloat16)
        tensors[name.ours] = name.gguf_to_ours(values, dims).contiguous()
    missing = [n.gguf for n in names.values() if n.ours not in tensors]
    if missing:
        raise TinyGPTError(f"GGUF file {_filename(reader)} lacks {', '.join(missing[:3])}; {SUPPORTED}")
    return tensors


def _stored_values(t) -> np.ndarray:
    """A tensor's values: F32 and F16 as they are, BF16 as int16 words (torch reads them as bfloat16), the
    quantized types dequantized to float32 by gguf-py."""
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(t.data)
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        return np.asarray(t.data).view(np.int16)
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


def _model_parts(reader: gguf.GGUFReader) -> tuple[GPTConfig, dict[str, torch.Tensor], Tokenizer]:
    config, tokenizer = gguf_config(reader), gguf_tokenizer(reader)
    state = dequantized_tensors(reader, config)
    if config.tie_embeddings:  # llama.cpp reuses token_embd as the output
        state["lm_head.weight"] = state["tok_emb.weight"]
    return config, state, tokenizer


def read_gguf_model(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor], str]:
    """(config, state dict under our names, tokenizer.json text) of a GGUF file."""
    config, state, tokenizer = _model_parts(open_gguf(path))
    return config, state, tokenizer.to_json_str()


def gguf_chat_template(path: str | Path) -> str | None:
    """The file's `tokenizer.chat_template` (None when it has none: a base model)."""
    field = open_gguf(path).get_field("tokenizer.chat_template")
    return None if field is None else field.contents()


def load_gguf(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """Our GPT (eval mode, float32, on `device`) and Tokenizer from a gpt2, llama or qwen2 GGUF file, weights
    dequantized."""
    config, state, tokenizer = _model_parts(open_gguf(path, hint="re-create it with tinygpt gguf_convert"))
    model = GPT(config)
    model.load_state_dict(state)
    return model.to(device).eval(), tokenizer

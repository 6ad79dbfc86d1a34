"""Convert a Hugging Face folder into a GGUF file for llama.cpp (architecture `gpt2`, `llama` or `qwen2`).

    tinygpt gguf_convert --model_dir exports/tinygpt --out exports/tinygpt/model-f16.gguf --outtype f16

Metadata and tensors follow docs/gguf.md. Which tensors keep F32 follows llama.cpp's convert_hf_to_gguf.py:
1-D tensors (biases, norms) and `position_embd.weight` stay F32 in every output type (llama.cpp's quantizer
keeps the position embedding F32 too), the other 2-D weights take the output type. A Q8_0 tensor whose rows
are not a multiple of 32 values falls back to F16, as convert_hf_to_gguf does. The tied LM head is left out:
llama.cpp reuses token_embd for the output when `output.weight` is absent. For `llama` the rows of Q and K are
reordered for llama.cpp's rotary embedding (tinygpt.weights.names.rope_rows_to_gguf); `qwen2` keeps them, as
llama.cpp rotates its heads the way we do. Llama 3.1's rope_scaling becomes `rope_freqs.weight`, as
convert_hf_to_gguf writes it.

A chat model's folder (tokenizer_config.json with a `chat_template`) gives `tokenizer.chat_template`, which
llama-server and `llama-cli -cnv` apply without flags, and its eos_token (`<|im_end|>` for tinygpt's ChatML) as
eos_token_id, as convert_hf_to_gguf reads the same file, and as eot_token_id: llama.cpp guesses the end-of-turn
token from token texts when that key is absent, and with both `<|im_end|>` and `<|endoftext|>` in the vocabulary
the guess depends on a hash map's order. Both stay end-of-generation tokens (llama.cpp marks them by their text).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import gguf
import numpy as np
import torch

from tinygpt.common import TinyGPTError, atomic_path, progress, run_cli
from tinygpt.model.gpt import GPTConfig, llama3_freq_factors
from tinygpt.tokenizer.bpe import Tokenizer
from tinygpt.weights.hf_read import hf_tensors, read_hf_config
from tinygpt.weights.read import hf_tokenizer_config
from tinygpt.weights.names import ROPE_FREQS, config_dims

F32, F16, BF16, Q8_0 = (gguf.GGMLQuantizationType[t] for t in ("F32", "F16", "BF16", "Q8_0"))

# --outtype -> (general.file_type, type of the 2-D weights)
OUTTYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q8_0),
}

TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNUSED = 1, 3, 4, 5  # gguf.TokenType


def gguf_tensors(model_dir: Path, config: GPTConfig) -> dict[str, np.ndarray]:
    """The folder's weights as float32 numpy arrays under GGUF names and layouts, in the name table's order,
    after Llama 3.1's rotary divisors (rope_freqs.weight) where the config scales its RoPE, as llama.cpp's
    converter writes them."""
    tensors: dict[str, np.ndarray] = {}
    if config.rope_scaling is not None:
        half = config.head_dim // 2
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(half, dtype=torch.float32) * 2 / config.head_dim)
        tensors[ROPE_FREQS] = llama3_freq_factors(inv_freq, config.rope_scaling).numpy()
    dims = config_dims(config)
    for name, data in hf_tensors(model_dir, config):
        tensors[name.gguf] = name.ours_to_gguf(data.float().numpy(), dims)  # often a view: encode_tensor copies it
    return tensors


def tensor_type(name: str, data: np.ndarray, weight_type: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """Storage type of one tensor, decided as llama.cpp's convert_hf_to_gguf.py decides it."""
    if data.ndim <= 1 or name.endswith("_norm.weight") or name == "position_embd.weight":
        return F32
    if weight_type == Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[Q8_0][0]:
        return F16
    return weight_type


def encode_tensor(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The stored form: float arrays for F32/F16, raw uint8 blocks for BF16 and Q8_0 (gguf-py's are bit-exact)."""
    if qtype == F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == F16:
        return data.astype(np.float16, order="C")  # transposes and converts in one pass
    return gguf.quants.quantize(np.ascontiguousarray(data), qtype)


def add_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer: Tokenizer, n_vocab: int | None = None,
                           chat_template: str | None = None, end_of_turn: int | None = None) -> None:
    """Byte-level BPE as llama.cpp's `gpt2` tokenizer reads it; arrays hold plain Python values.

    `tokenizer.ggml.pre` names llama.cpp's pre-tokenizer for the tokenizer's regex and steps (TinyGPTError when
    it has none); special tokens are CONTROL, other added tokens USER_DEFINED; the BOS is the post-processor's
    (added by llama.cpp as by Hugging Face) or else the end-of-text token, not added. A model whose embedding has
    more rows than the tokenizer has ids (n_vocab, Qwen2's) gets UNUSED [PAD<id>] tokens, as convert_hf_to_gguf
    writes them. A chat model's file (chat_template given) has the template, and `end_of_turn` (default: the
    end-of-text id) as both eos and eot.
    """
    control = set(tokenizer.special_tokens.values())
    user = set(tokenizer.added_tokens.values()) - control
    types = [TOKEN_TYPE_CONTROL if i in control else TOKEN_TYPE_USER_DEFINED if i in user else TOKEN_TYPE_NORMAL
             for i in range(tokenizer.vocab_size)]
    tokens = tokenizer.token_strings()
    padding = range(tokenizer.vocab_size, n_vocab or tokenizer.vocab_size)
    tokens += [f"[PAD{i}]" for i in padding]
    types += [TOKEN_TYPE_UNUSED] * len(padding)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer.gguf_pre)
    writer.add_key_value(gguf.Keys.Tokenizer.LIST, tokens, gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.STRING)  # fmt: skip
    writer.add_key_value(gguf.Keys.Tokenizer.TOKEN_TYPE, types, gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.INT32)  # fmt: skip
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, tokenizer.merge_strings(), gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.STRING)  # fmt: skip
    writer.add_bos_token_id(int(tokenizer.eot_id if tokenizer.bos_id is None else tokenizer.bos_id))
    if chat_template is None:
        writer.add_eos_token_id(int(tokenizer.eot_id))
    else:
        end_of_turn = int(tokenizer.eot_id if end_of_turn is None else end_of_turn)
        writer.add_eos_token_id(end_of_turn)
        writer.add_eot_token_id(end_of_turn)
        writer.add_chat_template(chat_template)
    writer.add_add_bos_token(tokenizer.bos_id is not None)


def chat_settings(model_dir: Path, tokenizer: Tokenizer) -> tuple[str | None, int | None]:
    """(chat template, id of its eos_token) from the folder's tokenizer_config.json; (None, None) for a base model.

    The eos_token must be one of the tokenizer's special tokens (tinygpt's chat export names <|im_end|>)."""
    settings = hf_tokenizer_config(model_dir)
    template = settings.get("chat_template")
    if template is None:
        return None, None
    if not isinstance(template, str):
        raise TinyGPTError(f"{model_dir}/tokenizer_config.json: chat_template is a {type(template).__name__}; "
                           "tinygpt writes one Jinja template as a string: re-run tinygpt export")
    eos = settings.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos not in tokenizer.special_tokens:
        raise TinyGPTError(f"{model_dir}/tokenizer_config.json: eos_token {eos!r} is not a special token of "
                           "tokenizer.json; a chat model's turns must end at one: re-run tinygpt export")
    return template, tokenizer.special_tokens[eos]


def add_model_metadata(writer: gguf.GGUFWriter, config: GPTConfig) -> None:
    """The `<arch>.*` keys llama.cpp reads, with their exact types (docs/gguf.md, a section per architecture);
    llama and qwen2 read the same keys under their own prefix."""
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.ffn_hidden)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    if config.arch == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
        return
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)


def convert_to_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f16", name: str = "tinygpt") -> Path:
    """Write the GGUF file `out` (atomically) from a tinygpt export folder; return its path."""
    if outtype not in OUTTYPES:
        raise TinyGPTError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    file_type, weight_type = OUTTYPES[outtype]
    model_dir, out = Path(model_dir), Path(out)
    config = read_hf_config(model_dir)
    tensors = gguf_tensors(model_dir, config)
    tokenizer = Tokenizer.load(model_dir / "tokenizer.json")
    if tokenizer.vocab_size > config.vocab_size:  # fewer is Qwen2's padded embedding: [PAD] rows
        raise TinyGPTError(
            f"{model_dir}/tokenizer.json has {tokenizer.vocab_size} tokens but config.json says "
            f"vocab_size={config.vocab_size}; re-run tinygpt export"
        )
    chat_template, end_of_turn = chat_settings(model_dir, tokenizer)

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=config.arch)
        writer.add_name(name)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_model_metadata(writer, config)
        add_tokenizer_metadata(writer, tokenizer, n_vocab=config.vocab_size, chat_template=chat_template,
                               end_of_turn=end_of_turn)
        for tensor_name, data in progress(tensors.items(), total=len(tensors), desc=f"gguf {outtype}", unit="tensor"):
            qtype = tensor_type(tensor_name, data, weight_type)
            writer.add_tensor(tensor_name, encode_tensor(data, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tinygpt gguf_convert",
        description="Convert a tinygpt export folder (Hugging Face GPT-2 or Llama) into a GGUF file for llama.cpp.",
    )
    parser.add_argument("--model_dir", required=True, help="folder written by tinygpt export")
    parser.add_argument("--out", required=True, help="GGUF file to write, e.g. exports/tinygpt/model-f16.gguf")
    parser.add_argument("--outtype", default="f16", choices=list(OUTTYPES),
                        help="type of the 2-D weights (default f16)")
    parser.add_argument("--name", default="tinygpt", help="general.name stored in the file")
    args = parser.parse_args(argv)
    out = convert_to_gguf(args.model_dir, args.out, args.outtype, args.name)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.outtype})")


if __name__ == "__main__":
    run_cli(main)

"""Convert the Hugging Face export folder into a GGUF file for llama.cpp (architecture `gpt2` or `llama`).

    tinygpt gguf_convert --model_dir exports/tinygpt --out exports/tinygpt/model-f16.gguf --outtype f16

Metadata and tensors follow docs/gguf.md. Which tensors keep F32 follows llama.cpp's convert_hf_to_gguf.py:
1-D tensors (biases, norms) and `position_embd.weight` stay F32 in every output type (llama.cpp's quantizer
keeps the position embedding F32 too), the other 2-D weights take the output type. A Q8_0 tensor whose rows
are not a multiple of 32 values falls back to F16, as convert_hf_to_gguf does. The tied LM head is left out:
llama.cpp reuses token_embd for the output when `output.weight` is absent. For `llama` the rows of Q and K are
reordered for llama.cpp's rotary embedding (tinygpt.weights.names.rope_rows_to_gguf).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import gguf
import numpy as np
from safetensors import SafetensorError, safe_open

from tinygpt.common import TinyGPTError, atomic_path, progress, require_file, run_cli
from tinygpt.weights.names import TensorName, by, lm_head_name, model_dims, shape_of, tensor_names
from tinygpt.tokenizer.bpe import Tokenizer

F32, F16, BF16, Q8_0 = (gguf.GGMLQuantizationType[t] for t in ("F32", "F16", "BF16", "Q8_0"))

# --outtype -> (general.file_type, type of the 2-D weights)
OUTTYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q8_0),
}

TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL = 1, 3


@dataclass(frozen=True)
class HParams:
    """What the converter needs from an HF config.json, for either architecture."""
    arch: str  # "gpt2" or "llama": the GGUF architecture too
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_ctx: int
    n_ff: int
    eps: float
    rope_theta: float  # llama only
    tied: bool  # LM head tied to the token embedding

    @property
    def dims(self) -> dict[str, int]:
        """The symbols of the name table's shapes (tinygpt.weights.names) for this model."""
        return model_dims(self.vocab_size, self.n_ctx, self.n_embd, self.n_ff, self.n_head, self.n_kv_head)


def read_hf_config(model_dir: Path) -> HParams:
    """The hyperparameters of an HF config.json, checked to be a network llama.cpp computes as we do."""
    path = require_file(model_dir / "config.json", "Hugging Face config", "run tinygpt export first")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinyGPTError(f"{path} is not valid JSON ({e}); re-run tinygpt export") from e
    model_type = raw.get("model_type")
    if model_type not in ("gpt2", "llama"):
        raise TinyGPTError(f"{path}: model_type is {model_type!r}, expected 'gpt2' or 'llama'")
    try:
        return _gpt2_hparams(raw, path) if model_type == "gpt2" else _llama_hparams(raw, path)
    except (KeyError, TypeError, ValueError) as e:
        raise TinyGPTError(f"{path}: missing or invalid {model_type} setting {e}; re-run tinygpt export") from e


def _gpt2_hparams(raw: dict, path: Path) -> HParams:
    if raw.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise TinyGPTError(
            f"{path}: activation_function {raw['activation_function']!r} is not the tanh GELU "
            "that llama.cpp's gpt2 uses"
        )
    n_head = int(raw["n_head"])
    return HParams(
        arch="gpt2",
        vocab_size=int(raw["vocab_size"]),
        n_embd=int(raw["n_embd"]),
        n_layer=int(raw["n_layer"]),
        n_head=n_head,
        n_kv_head=n_head,
        n_ctx=int(raw.get("n_positions", raw.get("n_ctx"))),
        n_ff=int(raw.get("n_inner") or 4 * int(raw["n_embd"])),
        eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        rope_theta=0.0,
        tied=bool(raw.get("tie_word_embeddings", True)),
    )


def _llama_hparams(raw: dict, path: Path) -> HParams:
    """Llama as llama.cpp's `llama` runs it: SiLU, no biases, plain RoPE over the whole head."""
    problems = []
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {raw['hidden_act']!r} is not silu")
    problems += [f"{key} is true" for key in ("attention_bias", "mlp_bias") if raw.get(key)]
    rope = raw.get("rope_parameters") or {}
    if raw.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        problems.append("its RoPE is scaled")
    n_embd, n_head = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    if raw.get("head_dim", n_embd // n_head) != n_embd // n_head:
        problems.append(f"head_dim {raw['head_dim']} is not hidden_size / num_attention_heads")
    if problems:
        raise TinyGPTError(f"{path}: {'; '.join(problems)}; tinygpt converts the plain Llama that it exports")
    return HParams(
        arch="llama",
        vocab_size=int(raw["vocab_size"]),
        n_embd=n_embd,
        n_layer=int(raw["num_hidden_layers"]),
        n_head=n_head,
        n_kv_head=int(raw.get("num_key_value_heads") or n_head),
        n_ctx=int(raw["max_position_embeddings"]),
        n_ff=int(raw["intermediate_size"]),
        eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
        tied=bool(raw.get("tie_word_embeddings", False)),
    )


def read_gguf_tensors(model_dir: Path, hp: HParams) -> dict[str, np.ndarray]:
    """model.safetensors as float32 numpy arrays under GGUF names and layouts, checked against the config."""
    path = require_file(model_dir / "model.safetensors", "model weights", "run tinygpt export first")
    names = tensor_names(hp.arch, hp.n_layer, hp.tied)
    by_hf = by("hf", names)
    sizes = hp.dims
    tensors: dict[str, np.ndarray] = {}
    problems, seen = [], set()
    try:
        with safe_open(str(path), framework="numpy") as f:
            for hf_name in f.keys():
                if hf_name == lm_head_name(hp.arch).hf and hp.tied:
                    continue  # a tied head is token_embd again: llama.cpp reuses it when output.weight is absent
                if hf_name not in by_hf:
                    problems.append(f"{hf_name} is unexpected")
                    continue
                name = by_hf[hf_name]
                seen.add(hf_name)
                data = f.get_tensor(hf_name).astype(np.float32, copy=False)
                if data.shape != _hf_shape(name, sizes):
                    problems.append(f"{hf_name} has shape {data.shape}, config.json needs {_hf_shape(name, sizes)}")
                    continue
                tensors[name.gguf] = name.hf_to_gguf(data, sizes)  # often a view: encode_tensor copies it
    except (SafetensorError, OSError, ValueError) as e:
        raise TinyGPTError(f"cannot read {path} ({e}); re-run tinygpt export") from e
    problems += [f"{n.hf} is missing" for n in names if n.hf not in seen]
    if problems:
        shown = "; ".join(problems[:3])
        raise TinyGPTError(f"{path} does not match config.json ({shown}); re-run tinygpt export")
    return {n.gguf: tensors[n.gguf] for n in names}  # in the table's order


def _hf_shape(name: TensorName, sizes: dict[str, int]) -> tuple[int, ...]:
    shape = shape_of(name, sizes)
    return shape[::-1] if name.hf_transposed else shape


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


def add_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer: Tokenizer) -> None:
    """Byte-level BPE as llama.cpp's `gpt2` tokenizer reads it; arrays hold plain Python values."""
    control = set(tokenizer.special_tokens.values())
    types = [TOKEN_TYPE_CONTROL if i in control else TOKEN_TYPE_NORMAL for i in range(tokenizer.vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_key_value(gguf.Keys.Tokenizer.LIST, tokenizer.token_strings(), gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.STRING)  # fmt: skip
    writer.add_key_value(gguf.Keys.Tokenizer.TOKEN_TYPE, types, gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.INT32)  # fmt: skip
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, tokenizer.merge_strings(), gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.STRING)  # fmt: skip
    writer.add_bos_token_id(int(tokenizer.eot_id))
    writer.add_eos_token_id(int(tokenizer.eot_id))
    writer.add_add_bos_token(False)


def add_model_metadata(writer: gguf.GGUFWriter, hp: HParams) -> None:
    """The `<arch>.*` keys llama.cpp reads, with their exact types (docs/gguf.md, a section per architecture)."""
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_block_count(hp.n_layer)
    writer.add_head_count(hp.n_head)
    if hp.arch == "gpt2":
        writer.add_layer_norm_eps(hp.eps)
        return
    writer.add_head_count_kv(hp.n_kv_head)
    writer.add_layer_norm_rms_eps(hp.eps)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.n_embd // hp.n_head)
    writer.add_vocab_size(hp.vocab_size)


def convert_to_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f16", name: str = "tinygpt") -> Path:
    """Write the GGUF file `out` (atomically) from a tinygpt export folder; return its path."""
    if outtype not in OUTTYPES:
        raise TinyGPTError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    file_type, weight_type = OUTTYPES[outtype]
    model_dir, out = Path(model_dir), Path(out)
    hp = read_hf_config(model_dir)
    tensors = read_gguf_tensors(model_dir, hp)
    tokenizer = Tokenizer.load(model_dir / "tokenizer.json")
    if tokenizer.vocab_size != hp.vocab_size:
        raise TinyGPTError(
            f"{model_dir}/tokenizer.json has {tokenizer.vocab_size} tokens but config.json says "
            f"vocab_size={hp.vocab_size}; re-run tinygpt export"
        )

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=hp.arch)
        writer.add_name(name)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_model_metadata(writer, hp)
        add_tokenizer_metadata(writer, tokenizer)
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

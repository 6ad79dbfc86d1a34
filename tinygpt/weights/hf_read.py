"""Read a Hugging Face model folder (config.json, model.safetensors or sharded with model.safetensors.index.json,
tokenizer.json) of the families tinygpt runs: `GPT2LMHeadModel`, `LlamaForCausalLM` (SmolLM/SmolLM2, Llama 3.x,
and our own exports) and `Qwen2ForCausalLM`. Anything else stops with one message naming what is supported.

Weights are read tensor by tensor (tinygpt.weights.safetensors_file), in the dtype they are stored in (a bf16
0.5B model stays 1 GB), under our names and in our layout (GPT-2's Conv1D weights transposed).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

import torch

from tinygpt.common import TinyGPTError, require_file
from tinygpt.model.gpt import ROPE_SCALING_KEYS, GPTConfig
from tinygpt.weights.names import TensorName, by, config_dims, lm_head_name, shape_of, tensor_names
from tinygpt.weights.safetensors_file import SafetensorsFile

# config.json "architectures" -> our arch, and back (the writer's choice)
HF_ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
SUPPORTED = ("tinygpt reads GPT2LMHeadModel, LlamaForCausalLM (SmolLM, SmolLM2, Llama 3.x) and Qwen2ForCausalLM "
             "folders with safetensors weights and a byte-level BPE tokenizer.json")
INDEX = "model.safetensors.index.json"
# The base model's prefix, which checkpoints saved from the base class leave out (the GPT-2 on the Hub stores
# `h.0.attn.c_attn.weight`, not `transformer.h.0...`), and GPT-2's causal-mask buffers that old checkpoints hold.
BASE_PREFIX = {"gpt2": "transformer.", "llama": "model.", "qwen2": "model."}
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


def _load_json(path: Path, hint: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinyGPTError(f"{path} is not valid JSON ({e}); {hint}") from None


def read_hf_config(model_dir: str | Path) -> GPTConfig:
    """Our GPTConfig for the folder's config.json, refused unless it is a network we compute exactly."""
    path = require_file(Path(model_dir) / "config.json", "Hugging Face config", "run tinygpt export first")
    raw = _load_json(path, "re-download or re-export the model")
    architectures = raw.get("architectures") or []
    model_type = raw.get("model_type")
    arch = next((HF_ARCHITECTURES[a] for a in architectures if a in HF_ARCHITECTURES), None)
    if arch is None and not architectures and model_type in HF_ARCHITECTURES.values():
        arch = model_type  # an older config without "architectures"
    if arch is None or model_type != arch:
        raise TinyGPTError(f"{path}: architectures {architectures} (model_type {model_type!r}) is not supported; "
                           f"{SUPPORTED}")
    try:
        config, problems = (_gpt2_config(raw) if arch == "gpt2" else _llama_config(raw, arch))
    except (KeyError, TypeError, ValueError) as e:
        raise TinyGPTError(f"{path}: missing or invalid {arch} setting {e}; re-download or re-export the model") from None
    if problems:
        raise TinyGPTError(f"{path}: {'; '.join(problems)}; tinygpt computes {arch} without these changes. {SUPPORTED}")
    return config


def _gpt2_config(raw: dict) -> tuple[GPTConfig, list[str]]:
    problems = []
    if raw.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function {raw['activation_function']!r} is not the tanh GELU")
    problems += [f"{key} is true" for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")
                 if raw.get(key)]
    if raw.get("scale_attn_weights") is False:
        problems.append("scale_attn_weights is false")
    n_embd = int(raw["n_embd"])
    n_ff = raw.get("n_inner")
    config = GPTConfig(
        vocab_size=int(raw["vocab_size"]), arch="gpt2", n_layer=int(raw["n_layer"]), n_head=int(raw["n_head"]),
        n_embd=n_embd, block_size=int(raw.get("n_positions") or raw["n_ctx"]),
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)), tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
        n_ff=None if n_ff in (None, 4 * n_embd) else int(n_ff),
    )
    return config, problems


def _llama_config(raw: dict, arch: str) -> tuple[GPTConfig, list[str]]:
    """Llama and Qwen2 (Llama with q/k/v biases): SiLU, no other biases, RoPE over whole heads, plain or llama3."""
    problems = []
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {raw['hidden_act']!r} is not silu")
    if arch == "llama":
        problems += [f"{key} is true" for key in ("attention_bias", "mlp_bias") if raw.get(key)]
    if raw.get("use_sliding_window"):
        problems.append("use_sliding_window is true")
    n_embd, n_head = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    if raw.get("head_dim") not in (None, n_embd // n_head):
        problems.append(f"head_dim {raw['head_dim']} is not hidden_size / num_attention_heads")
    # transformers 4 writes rope_theta and rope_scaling; 5 writes rope_parameters (theta and type together)
    rope = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    rope_scaling = None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "llama3":
            rope_scaling = {"rope_type": "llama3", **{key: scaling[key] for key in ROPE_SCALING_KEYS}}
        elif kind != "default":
            problems.append(f"rope_scaling of type {kind!r} (tinygpt runs plain RoPE and llama3's)")
    config = GPTConfig(
        vocab_size=int(raw["vocab_size"]), arch=arch, n_layer=int(raw["num_hidden_layers"]), n_head=n_head,
        n_kv_head=int(raw.get("num_key_value_heads") or n_head), n_embd=n_embd,
        block_size=int(raw["max_position_embeddings"]), norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)), rope_scaling=rope_scaling,
    )
    n_ff = int(raw["intermediate_size"])
    if n_ff != config.ffn_hidden:  # our own exports follow the rule and stay n_ff=None, as trained
        config.n_ff = n_ff
    return config, problems


def weight_files(model_dir: str | Path) -> dict[str, Path]:
    """Every stored tensor's file: model.safetensors, or the shards model.safetensors.index.json names."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX
    if index.is_file():
        weight_map = _load_json(index, "re-download the model").get("weight_map")
        if not isinstance(weight_map, dict):
            raise TinyGPTError(f"{index} has no weight_map; re-download the model")
        files = {name: model_dir / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            require_file(shard, "weight shard", f"it is listed in {index}; re-download the model")
        return files
    path = model_dir / "model.safetensors"
    if not path.is_file() and any(model_dir.glob("*.bin")):
        raise TinyGPTError(f"{model_dir} holds PyTorch .bin weights, which tinygpt does not unpickle; "
                           "download the safetensors version of the model")
    path = require_file(path, "model weights", "run tinygpt export first")
    try:
        return {name: path for name in SafetensorsFile(path).keys()}
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError, OSError) as e:
        raise TinyGPTError(f"cannot read {path} ({e}); re-download or re-export the model") from None


def hf_tensors(model_dir: str | Path, config: GPTConfig) -> Iterator[tuple[TensorName, torch.Tensor]]:
    """Each tensor of the model (name-table entry, tensor in our layout and its stored dtype), one at a time in
    the table's order, after checking that the files hold exactly the config's tensors with their shapes."""
    names = tensor_names(config.arch, config.n_layer, config.tie_embeddings)
    dims = config_dims(config)
    expected = by("hf", names)
    head = lm_head_name(config.arch).hf
    files, stored_as, problems = {}, {}, []
    for stored, path in weight_files(model_dir).items():
        name = stored if stored in expected or stored == head else BASE_PREFIX[config.arch] + stored
        mask_buffer = config.arch == "gpt2" and name.endswith(MASK_BUFFERS)
        if name in expected:
            files[name], stored_as[name] = path, stored
        elif not (name == head and config.tie_embeddings) and not mask_buffer:
            problems.append(f"{stored} is unexpected")
    problems += [f"{n.hf} is missing" for n in names if n.hf not in files]
    if problems:
        raise TinyGPTError(f"{model_dir}: the weights do not match config.json ({'; '.join(problems[:3])}); "
                           "re-download or re-export the model")
    handles: dict[Path, Any] = {}
    try:
        for name in names:
            path = files[name.hf]
            if path not in handles:
                handles[path] = SafetensorsFile(path)
            data = handles[path].get_tensor(stored_as[name.hf])
            want = shape_of(name, dims)
            if tuple(data.shape) != (want[::-1] if name.hf_transposed else want):
                raise TinyGPTError(f"{path}: tensor {name.hf} has shape {tuple(data.shape)}, config.json needs "
                                   f"{want[::-1] if name.hf_transposed else want}; re-download or re-export the model")
            yield name, (data.t().contiguous() if name.hf_transposed else data)
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError, OSError) as e:
        raise TinyGPTError(f"cannot read the weights of {model_dir} ({e}); re-download or re-export the model") from None
    finally:
        handles.clear()


def hf_tokenizer_json(model_dir: str | Path) -> str:
    """tokenizer.json's text; a SentencePiece tokenizer (Llama 2, Mistral, TinyLlama) is refused."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        kind = "a SentencePiece tokenizer.model" if (model_dir / "tokenizer.model").is_file() else "no tokenizer.json"
        raise TinyGPTError(f"{model_dir} has {kind}; {SUPPORTED}")
    text = path.read_text(encoding="utf-8")
    model = _load_json(path, "re-download the model").get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise TinyGPTError(f"{path} is a {model.get('type')} tokenizer"
                           f"{' with byte fallback (SentencePiece)' if model.get('byte_fallback') else ''}; {SUPPORTED}")
    return text


def state_with_head(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """A tied model's state dict names the one embedding twice, as GPT.state_dict() does."""
    if config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    return state


def read_hf_folder(model_dir: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor], str]:
    """(config, state dict in the stored dtype under our names, tokenizer.json text) of a Hugging Face folder."""
    config = read_hf_config(model_dir)
    tokenizer_json = hf_tokenizer_json(model_dir)
    state = {name.ours: data for name, data in hf_tensors(model_dir, config)}
    return config, state_with_head(state, config), tokenizer_json


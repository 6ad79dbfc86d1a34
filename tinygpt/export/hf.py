"""Export a checkpoint as a Hugging Face folder: `GPT2LMHeadModel` (arch gpt2), `LlamaForCausalLM` (arch llama) or
`Qwen2ForCausalLM` (arch qwen2).

    tinygpt export --checkpoint checkpoints/best.pt --out_dir exports/tinygpt

writes model.safetensors, config.json, generation_config.json, tokenizer.json and tokenizer_config.json.
Our model computes exactly what transformers' model of the same architecture computes, so only names and layouts
change (tinygpt.weights.names): HF GPT-2 keeps its attention/MLP weights in `Conv1D` modules, stored (in, out),
the transpose of our `nn.Linear` (out, in); HF Llama stores them as we do. A tied LM head is not stored
(safetensors refuses shared tensors, and transformers re-ties it from `tie_word_embeddings`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file

from tinygpt.model.checkpoint import checked_model_state, load_checkpoint
from tinygpt.common import TinyGPTError, atomic_folder, run_cli
from tinygpt.weights.names import tensor_names
from tinygpt.model.gpt import GPTConfig
from tinygpt.tokenizer.bpe import EOT, Tokenizer


def hf_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict under the HF model's names, float32, GPT-2's Conv1D weights transposed to (in, out)."""
    out = {}
    for name in tensor_names(config.arch, config.n_layer, config.tie_embeddings):
        t = state[name.ours]
        out[name.hf] = t.t() if name.hf_transposed else t
    # safetensors wants contiguous tensors that share no memory
    return {name: t.detach().to("cpu", torch.float32).contiguous().clone() for name, t in out.items()}


def hf_config(config: GPTConfig, eot_id: int) -> dict[str, Any]:
    """config.json for the HF model of `config.arch`: the same network, dropouts off (an inference export)."""
    if config.arch == "gpt2":
        return gpt2_config(config, eot_id)
    return llama_config(config, eot_id) if config.arch == "llama" else qwen2_config(config, eot_id)


def gpt2_config(config: GPTConfig, eot_id: int) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_ff,  # None means 4 * n_embd, as in our MLP
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "summary_first_dropout": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "use_cache": True,
        "dtype": "float32",
    }


def llama_config(config: GPTConfig, eot_id: int) -> dict[str, Any]:
    rope = {"rope_type": "default"} if config.rope_scaling is None else dict(config.rope_scaling)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,  # transformers 4 reads this key, 5 rope_parameters
        "rope_parameters": {**rope, "rope_theta": config.rope_theta},
        "rope_scaling": config.rope_scaling,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "use_cache": True,
        "dtype": "float32",
    }


def qwen2_config(config: GPTConfig, eot_id: int) -> dict[str, Any]:
    """Qwen2 is Llama's configuration with biases on Q, K and V (implied by the model type) and a sliding window
    that stays off."""
    llama = llama_config(config, eot_id)
    for key in ("attention_bias", "mlp_bias", "pretraining_tp", "head_dim"):
        del llama[key]
    return {**llama, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": config.n_layer}


def tokenizer_config(block_size: int) -> dict[str, Any]:
    # PreTrainedTokenizerFast runs tokenizer.json exactly as written: no BOS token is prepended (for Llama
    # either: ours is GPT-2's byte-level BPE, trained without one)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "model_max_length": block_size,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_hf(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the Hugging Face folder for `checkpoint` into `out_dir`, its files replaced together (other files
    there, such as GGUF files made from an earlier export, are kept); return out_dir."""
    ckpt = load_checkpoint(checkpoint)
    config, state = checked_model_state(ckpt, checkpoint)
    tokenizer = Tokenizer.from_json_str(ckpt["tokenizer_json"])
    if tokenizer.vocab_size > config.vocab_size:  # fewer: embedding rows no token uses (Qwen2 pads to 64)
        raise TinyGPTError(
            f"checkpoint {checkpoint}: its tokenizer has {tokenizer.vocab_size} tokens but the model has "
            f"vocab_size={config.vocab_size}; the checkpoint mixes two runs, re-create it with tinygpt train"
        )
    eot_id = tokenizer.eot_id

    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as folder:  # the five files appear together: never weights beside an old config
        save_file(hf_state_dict(state, config), str(folder / "model.safetensors"), metadata={"format": "pt"})
        _write_json(folder / "config.json", hf_config(config, eot_id))
        _write_json(
            folder / "generation_config.json",
            {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id},
        )
        (folder / "tokenizer.json").write_text(ckpt["tokenizer_json"], encoding="utf-8")
        _write_json(folder / "tokenizer_config.json", tokenizer_config(config.block_size))
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tinygpt export",
        description="Export a tinygpt checkpoint as a Hugging Face folder, GPT-2 or Llama after its architecture "
                    "(safetensors + tokenizer.json).",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint written by tinygpt train (e.g. checkpoints/best.pt)")
    parser.add_argument("--out_dir", required=True, help="folder to write (e.g. exports/tinygpt)")
    args = parser.parse_args(argv)
    out = export_hf(args.checkpoint, args.out_dir)
    architecture = json.loads((out / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    print(f"wrote Hugging Face {architecture} folder {out}")


if __name__ == "__main__":
    run_cli(main)

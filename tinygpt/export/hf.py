"""Export a checkpoint as a Hugging Face folder: `GPT2LMHeadModel` (arch gpt2), `LlamaForCausalLM` (arch llama) or
`Qwen2ForCausalLM` (arch qwen2).

    tinygpt export --checkpoint checkpoints/best.pt --out_dir exports/tinygpt

writes model.safetensors, config.json, generation_config.json, tokenizer.json and tokenizer_config.json.
A chat model (a checkpoint that carries "chat_template", as chat fine-tuning writes it) is marked as one for each
runtime: tokenizer_config.json gets the Jinja `chat_template` and `<|im_end|>` as eos_token (transformers'
apply_chat_template and llama.cpp's converter read both), generation_config.json stops at `<|im_end|>` and
`<|endoftext|>`, and an Ollama `Modelfile` (FROM ./model-q4_k_m.gguf, the same template in Ollama's syntax, the
stop tokens and the context length) lets `ollama create` run the quantized file beside it.
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
from tinygpt.tokenizer.chat import CHATML_TEMPLATE, IM_END, IM_START, OLLAMA_TEMPLATE

MODELFILE_GGUF = "model-q4_k_m.gguf"  # the file the workflow quantizes into the same folder


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


def tokenizer_config(block_size: int, chat_template: str | None = None) -> dict[str, Any]:
    """tokenizer_config.json; a chat model's ends its sequences (its turns) at <|im_end|> and has a template."""
    # PreTrainedTokenizerFast runs tokenizer.json exactly as written: no BOS token is prepended (for Llama
    # either: ours is GPT-2's byte-level BPE, trained without one)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "model_max_length": block_size,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        config.update(eos_token=IM_END, chat_template=chat_template)
    return config


def generation_config(tokenizer: Tokenizer, chat: bool) -> dict[str, Any]:
    """generation_config.json: transformers' generate stops at any of the eos ids (a chat model's reply ends at
    <|im_end|>; <|endoftext|> stays a stop, as between documents)."""
    eot_id = tokenizer.eot_id
    eos = [tokenizer.special_tokens[IM_END], eot_id] if chat else eot_id
    return {"bos_token_id": eot_id, "eos_token_id": eos, "pad_token_id": eot_id}


def modelfile(block_size: int) -> str:
    """Ollama's Modelfile for the chat model's quantized GGUF file in the same folder (`ollama create NAME -f
    Modelfile`): the ChatML template in Ollama's Go-template syntax, its stops, and the model's context (Ollama's
    default is longer, and positions past it do not exist)."""
    stops = "".join(f'PARAMETER stop "{token}"\n' for token in (IM_END, IM_START, EOT))
    return (f"# Ollama: ollama create tinygpt -f Modelfile (the chat model; the template is ChatML)\n"
            f"FROM ./{MODELFILE_GGUF}\n"
            f'TEMPLATE """{OLLAMA_TEMPLATE}"""\n'
            f"{stops}"
            f"PARAMETER num_ctx {block_size}\n")


def check_chat_model(ckpt: dict, tokenizer: Tokenizer, source: str | Path) -> str | None:
    """The checkpoint's chat template (None for a base model), refused unless it is ChatML with its tokens."""
    template = ckpt.get("chat_template")
    if template is None:
        return None
    if template != CHATML_TEMPLATE:
        raise TinyGPTError(f"checkpoint {source} carries a chat_template that is not tinygpt's ChatML template; "
                           "export writes the Ollama template and the stop tokens for ChatML only: fine-tune "
                           "it on data encoded by tinygpt chat_encode")
    missing = [t for t in (IM_START, IM_END) if t not in tokenizer.special_tokens]
    if missing:
        raise TinyGPTError(f"checkpoint {source} carries a chat template but its tokenizer has no special token "
                           f"{' or '.join(missing)}; re-train the tokenizer with tinygpt train_bpe")
    return template


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
    chat_template = check_chat_model(ckpt, tokenizer, checkpoint)

    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as folder:  # the files appear together: never weights beside an old config
        save_file(hf_state_dict(state, config), str(folder / "model.safetensors"), metadata={"format": "pt"})
        _write_json(folder / "config.json", hf_config(config, tokenizer.eot_id))
        _write_json(folder / "generation_config.json", generation_config(tokenizer, chat_template is not None))
        (folder / "tokenizer.json").write_text(ckpt["tokenizer_json"], encoding="utf-8")
        _write_json(folder / "tokenizer_config.json", tokenizer_config(config.block_size, chat_template))
        if chat_template is not None:
            (folder / "Modelfile").write_text(modelfile(config.block_size), encoding="utf-8")
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

"""Load a Hugging Face export folder (ours, or any with the same layout) back into our model and tokenizer:
the inverse of `tinygpt export`, through the GGUF converter's checked reading of config.json and the weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tinygpt.common import TinyGPTError, require_file
from tinygpt.export.gguf_convert import read_gguf_tensors, read_hf_config
from tinygpt.weights.names import by, tensor_names
from tinygpt.model.gpt import GPT, GPTConfig
from tinygpt.tokenizer.bpe import Tokenizer


def load_hf(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """Our model (eval mode, float32, on `device`) and tokenizer from an export folder: the inverse of
    export_hf, through the GGUF converter's checked reading of config.json and model.safetensors."""
    model_dir = Path(model_dir)
    hp = read_hf_config(model_dir)
    llama = {"n_kv_head": hp.n_kv_head, "rope_theta": hp.rope_theta} if hp.arch == "llama" else {}
    config = GPTConfig(vocab_size=hp.vocab_size, arch=hp.arch, n_layer=hp.n_layer, n_head=hp.n_head,
                       n_embd=hp.n_embd, block_size=hp.n_ctx, norm_eps=hp.eps, tie_embeddings=hp.tied, **llama)
    if hp.n_ff != config.ffn_hidden:
        raise TinyGPTError(f"{model_dir}/config.json has an MLP of {hp.n_ff}; tinygpt's {hp.arch} with n_embd "
                           f"{hp.n_embd} has {config.ffn_hidden}")
    names = by("gguf", tensor_names(hp.arch, hp.n_layer, hp.tied))
    state = {names[n].ours: torch.from_numpy(np.ascontiguousarray(names[n].gguf_to_ours(t, hp.dims)))
             for n, t in read_gguf_tensors(model_dir, hp).items()}
    if hp.tied:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model = GPT(config)
    model.load_state_dict(state)
    return model.to(device).eval(), Tokenizer.load(require_file(model_dir / "tokenizer.json", "tokenizer"))

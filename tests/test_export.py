"""Export to the Hugging Face GPT-2 layout, checked against transformers itself.

The builders at the top (tiny tokenizer, random GPT, checkpoint) are shared with the GGUF and llama.cpp tests.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinygpt.common import TinyGPTError
from tinygpt.export import export_hf, main
from tinygpt.model import GPT, GPTConfig
from tinygpt.tokenizer import Tokenizer
from tinygpt.train_bpe import train_bpe

EXPORT_FILES = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}

_SENTENCES = [
    "Once upon a time, a little fox named Pip lived near the river.",
    "She liked to count stones: one, two, three... 42 of them in 2024!",
    "The café served crème brûlée and naïve piñatas; Zoë said «très bien».",
    "   Indented lines,\ttabs and\n\nblank lines matter to byte-level BPE.",
    "It's what they'd said: we'll see, you're right, I'm sure, they've gone.",
    "Ünïcödé wörds, Ελληνικά γράμματα, русский текст и 日本語のテキスト.",
    "Emoji too 🙂🚀 and symbols #$%&*()[]{} <tags> /paths/to/file.txt",
]
# varied text for tokenizer parity: spaces, newlines, accents, digits, contractions, specials
PARITY_TEXTS = [
    "Once upon a time",
    " leading space and trailing space ",
    "two  spaces,   three,\n\nnew lines\r\nand\ttabs",
    "accents: café, naïve, Zoë, 日本語, 🙂",
    "numbers 1234567 and 3.14159; it's they'll we've",
    "end of doc<|endoftext|>next doc",
]


def corpus(repeats: int = 12) -> list[str]:
    """A few KB of varied text, each repeat slightly different so that BPE finds many merges."""
    return [f"{s} ({i})" for i in range(repeats) for s in _SENTENCES]


@lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 320) -> Tokenizer:
    return train_bpe(corpus(), vocab_size, show_progress=False)


def random_gpt(tokenizer: Tokenizer, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, block_size: int = 64,
               seed: int = 0, std: float = 0.02) -> GPT:
    """A random GPT whose every parameter (LayerNorms and biases too) is non-trivial.

    A larger `std` spreads the logits, so that greedy decoding has no near-ties that float rounding could flip.
    """
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                       block_size=block_size)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, std)
    return model.eval()


def save_tiny_checkpoint(path: Path, model: GPT, tokenizer: Tokenizer) -> Path:
    """A checkpoint in the INTERFACES.md format, as tinygpt.train writes it."""
    ckpt = {"model": model.state_dict(), "model_config": asdict(model.config),
            "tokenizer_json": tokenizer.to_json_str(), "step": 0, "val_loss": 0.0}
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, GPT, Tokenizer]:
    tmp = tmp_path_factory.mktemp("export")
    tokenizer = tiny_tokenizer()
    model = random_gpt(tokenizer, std=0.1)
    export_hf(save_tiny_checkpoint(tmp / "best.pt", model, tokenizer), tmp / "hf")
    return tmp / "hf", model, tokenizer


def test_writes_the_hf_gpt2_layout(exported):
    out, model, tokenizer = exported
    assert {p.name for p in out.iterdir()} == EXPORT_FILES  # no temporary files left behind
    config = json.loads((out / "config.json").read_text())
    cfg = model.config
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert config["activation_function"] == "gelu_new" and config["tie_word_embeddings"] is True
    assert (config["n_embd"], config["n_layer"], config["n_head"]) == (cfg.n_embd, cfg.n_layer, cfg.n_head)
    assert config["n_positions"] == config["n_ctx"] == cfg.block_size
    assert config["vocab_size"] == tokenizer.vocab_size
    assert config["bos_token_id"] == config["eos_token_id"] == tokenizer.eot_id
    assert all(config[k] == 0.0 for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop"))
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["model_max_length"] == cfg.block_size and tok_config["add_bos_token"] is False
    assert Tokenizer.load(out / "tokenizer.json") == tokenizer

    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in tensors and len(tensors) == 4 + 12 * cfg.n_layer
    state = model.state_dict()
    torch.testing.assert_close(tensors["transformer.wte.weight"], state["tok_emb.weight"], rtol=0, atol=0)
    torch.testing.assert_close(tensors["transformer.h.1.attn.c_attn.weight"], state["blocks.1.attn.qkv.weight"].T,
                               rtol=0, atol=0)
    torch.testing.assert_close(tensors["transformer.h.0.mlp.c_proj.weight"], state["blocks.0.mlp.proj.weight"].T,
                               rtol=0, atol=0)


def test_transformers_loads_it_cleanly_with_our_logits(exported, caplog):
    transformers = pytest.importorskip("transformers")
    out, model, _ = exported
    transformers.utils.logging.enable_propagation()  # transformers' own logger does not propagate to caplog
    try:
        with caplog.at_level(logging.WARNING):
            hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    finally:
        transformers.utils.logging.disable_propagation()
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    words = ("missing", "unexpected", "newly initialized", "not used")
    weight_warnings = [r.getMessage() for r in caplog.records if any(w in r.getMessage().lower() for w in words)]
    assert weight_warnings == []
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, not a random head

    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size), generator=generator)
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf.eval()(idx).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_transformers_tokenizer_gives_our_ids(exported):
    transformers = pytest.importorskip("transformers")
    out, _, tokenizer = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.eos_token == hf_tok.bos_token == "<|endoftext|>" and hf_tok.eos_token_id == tokenizer.eot_id
    for text in PARITY_TEXTS + corpus(1):
        ids = hf_tok(text)["input_ids"]
        assert ids == tokenizer.encode(text), text
        assert hf_tok.decode(ids) == text


def test_mismatched_checkpoint_is_one_clear_error(tmp_path):
    tokenizer = tiny_tokenizer()
    model = random_gpt(tokenizer)
    path = save_tiny_checkpoint(tmp_path / "bad.pt", model, tokenizer)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"]["n_embd"] = 128  # shapes now disagree with the config
    torch.save(ckpt, path)
    with pytest.raises(TinyGPTError, match=r"bad\.pt does not match its model_config .*tok_emb\.weight has shape"):
        main(["--checkpoint", str(path), "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(TinyGPTError, match="checkpoint not found"):
        export_hf(tmp_path / "nope.pt", tmp_path / "out")

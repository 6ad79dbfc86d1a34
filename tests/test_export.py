"""Export to the Hugging Face GPT-2 layout, checked against transformers itself."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinygpt.common import TinyGPTError
from tinygpt.export.hf import export_hf, main
from tinygpt.model.gpt import GPT
from tinygpt.tokenizer.bpe import Tokenizer

from builders import PARITY_TEXTS, corpus, random_gpt, save_tiny_checkpoint, tiny_tokenizer

EXPORT_FILES = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}


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

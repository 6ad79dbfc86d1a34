"""Export to the Hugging Face GPT-2 and Llama layouts, checked against transformers itself."""

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
from tinygpt.model.sample import generate
from tinygpt.tokenizer.bpe import Tokenizer

from builders import PARITY_TEXTS, corpus, random_gpt, save_tiny_checkpoint, tiny_tokenizer

EXPORT_FILES = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}


# llama with grouped-query attention and a rope_theta of its own, so that config.json must carry both
LLAMA = dict(arch="llama", n_kv_head=2, rope_theta=5000.0)


def export_random(tmp: Path, std: float = 0.1, **config) -> tuple[Path, GPT, Tokenizer]:
    tokenizer = tiny_tokenizer()
    model = random_gpt(tokenizer, std=std, **config)
    export_hf(save_tiny_checkpoint(tmp / "best.pt", model, tokenizer), tmp / "hf")
    return tmp / "hf", model, tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, GPT, Tokenizer]:
    return export_random(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def exported_llama(tmp_path_factory) -> tuple[Path, GPT, Tokenizer]:
    return export_random(tmp_path_factory.mktemp("export_llama"), std=0.15, **LLAMA)


@pytest.fixture(params=["exported", "exported_llama"])
def each_export(request) -> tuple[Path, GPT, Tokenizer]:
    return request.getfixturevalue(request.param)


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


def load_cleanly(out: Path, caplog):
    """transformers' model for the folder, after checking that no weight was missing, unused or initialized."""
    transformers = pytest.importorskip("transformers")
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
    return hf.eval()


def test_transformers_loads_it_cleanly_with_our_logits(each_export, caplog):
    out, model, _ = each_export
    hf = load_cleanly(out, caplog)
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[model.config.arch]
    # tied, not a random head
    assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()

    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size), generator=generator)
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_transformers_greedy_generate_gives_our_text(each_export, caplog):
    transformers = pytest.importorskip("transformers")
    out, model, tokenizer = each_export
    hf, hf_tok = load_cleanly(out, caplog), transformers.AutoTokenizer.from_pretrained(out)
    prompt = "Once upon a time, a little"
    ours = tokenizer.decode(generate(model, tokenizer.encode(prompt), 24, temperature=0.0, eot_id=tokenizer.eot_id))
    assert len(ours) > 10
    inputs = hf_tok(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = hf.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eot_id)
    theirs = hf_tok.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert theirs == ours


def test_writes_the_hf_llama_layout(exported_llama):
    out, model, tokenizer = exported_llama
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    config = json.loads((out / "config.json").read_text())
    cfg = model.config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    expected = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": cfg.block_size, "rms_norm_eps": 1e-5,
                "rope_theta": 5000.0, "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
                "hidden_act": "silu", "vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.eot_id,
                "eos_token_id": tokenizer.eot_id}
    assert {k: config[k] for k in expected} == expected
    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in tensors and len(tensors) == 2 + 9 * cfg.n_layer
    state = model.state_dict()
    # Llama keeps Linear's (out, in) and Hugging Face's rotary order: the weights are ours, renamed
    for hf_name, ours in (("model.layers.1.self_attn.k_proj.weight", "blocks.1.attn.k.weight"),
                          ("model.layers.0.mlp.down_proj.weight", "blocks.0.mlp.proj.weight"),
                          ("model.norm.weight", "ln_f.weight")):
        torch.testing.assert_close(tensors[hf_name], state[ours], rtol=0, atol=0)


def test_untied_llama_exports_its_head(tmp_path, caplog):
    out, model, _ = export_random(tmp_path, arch="llama", tie_embeddings=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(load_file(out / "model.safetensors")["lm_head.weight"], model.lm_head.weight.detach(),
                               rtol=0, atol=0)
    hf = load_cleanly(out, caplog)
    assert hf.lm_head.weight.data_ptr() != hf.get_input_embeddings().weight.data_ptr()
    idx = torch.randint(0, model.config.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=0, atol=1e-4)


def test_transformers_tokenizer_gives_our_ids(each_export):
    transformers = pytest.importorskip("transformers")
    out, _, tokenizer = each_export
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


def test_a_kill_while_exporting_leaves_the_old_folder_whole(tmp_path, monkeypatch):
    """The five files are one set: weights never sit beside another model's config. A kill after the new weights
    and config are written keeps the old export, and files of later stages in the folder are kept."""
    import tinygpt.export.hf as hf

    tokenizer = tiny_tokenizer()
    old, new = (save_tiny_checkpoint(tmp_path / f"{name}.pt", random_gpt(tokenizer, seed=seed), tokenizer)
                for name, seed in (("old", 0), ("new", 1)))
    out = tmp_path / "hf"
    export_hf(old, out)
    (out / "model-f16.gguf").write_bytes(b"a later stage's file")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    written, real_write = [], hf._write_json

    def killed_after_two(path, obj):
        written.append(path.name)
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        real_write(path, obj)

    monkeypatch.setattr(hf, "_write_json", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        export_hf(new, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    export_hf(new, out)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(after) == EXPORT_FILES | {"model-f16.gguf"} and after["model-f16.gguf"] == b"a later stage's file"
    assert after["model.safetensors"] != before["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "new.pt", "old.pt"], "no temporary folder left"

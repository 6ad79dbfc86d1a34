"""Checkpoints: atomic writes, safe (weights_only) loading, clear errors, and load_model round trips."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from tinygpt.model.checkpoint import load_checkpoint, load_model, save_checkpoint
from tinygpt.common import TinyGPTError
from tinygpt.model.gpt import GPT, GPTConfig
from tinygpt.tokenizer.bpe import Tokenizer

class Foreign:
    """Stands for any class a pickle could smuggle in (and run code from when unpickled)."""


CONFIG = GPTConfig(vocab_size=259, n_layer=2, n_head=2, n_embd=16, block_size=8)


def final_checkpoint() -> dict:
    torch.manual_seed(0)
    model = GPT(CONFIG)
    tokenizer = Tokenizer(merges=[(104, 105), (32, 256)])  # "hi", " hi": 256 bytes + 2 merges + <|endoftext|>
    return {"model": model.state_dict(), "model_config": asdict(CONFIG), "tokenizer_json": tokenizer.to_json_str(),
            "step": 7, "val_loss": 1.5}


def test_load_model_round_trip_gives_the_same_logits_and_tokenizer(tmp_path):
    ckpt = final_checkpoint()
    save_checkpoint(tmp_path / "best.pt", ckpt)
    model, tokenizer = load_model(tmp_path / "best.pt")
    assert not model.training and model.config == CONFIG
    original = GPT(CONFIG)
    original.load_state_dict(ckpt["model"])
    idx = torch.randint(0, CONFIG.vocab_size, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], original.eval()(idx)[0])
    assert model.lm_head.weight is model.tok_emb.weight  # the tie survives loading
    assert tokenizer.encode("hi! hi") == [256, 33, 257] and tokenizer.vocab_size == 259


def test_training_state_survives_weights_only_loading(tmp_path):
    model = GPT(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "rng": [{"torch": torch.get_rng_state()}],
             "sampler": {"generator": torch.Generator().manual_seed(1).get_state()}, "best_val_loss": float("inf"),
             "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict()}
    save_checkpoint(tmp_path / "last.pt", state)
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(loaded["rng"][0]["torch"], state["rng"][0]["torch"])
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    optimizer.load_state_dict(loaded["optimizer"])


def test_missing_truncated_and_foreign_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(TinyGPTError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    save_checkpoint(tmp_path / "good.pt", final_checkpoint())
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(TinyGPTError, match="cut.pt is truncated or not a tinygpt checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(TinyGPTError, match="text.pt is truncated or not a tinygpt checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    # an arbitrary pickled object is refused (weights_only), never unpickled
    torch.save({"model": Foreign()}, tmp_path / "pickle.pt")
    with pytest.raises(TinyGPTError, match="pickle.pt is truncated or not a tinygpt checkpoint"):
        load_checkpoint(tmp_path / "pickle.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(TinyGPTError, match="holds a list, not a dict"):
        load_checkpoint(tmp_path / "list.pt")


def test_load_model_rejects_incomplete_or_mismatched_checkpoints(tmp_path):
    ckpt = final_checkpoint()
    save_checkpoint(tmp_path / "a.pt", {k: v for k, v in ckpt.items() if k != "tokenizer_json"})
    with pytest.raises(TinyGPTError, match="lacks tokenizer_json"):
        load_model(tmp_path / "a.pt")
    save_checkpoint(tmp_path / "b.pt", {**ckpt, "model_config": {**ckpt["model_config"], "n_embd": 32}})
    with pytest.raises(TinyGPTError, match="does not match its model_config"):
        load_model(tmp_path / "b.pt")
    save_checkpoint(tmp_path / "c.pt", {**ckpt, "model_config": {**ckpt["model_config"], "rope": True}})
    with pytest.raises(TinyGPTError, match="unknown model_config key"):
        load_model(tmp_path / "c.pt")


def test_interrupted_save_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})

    def dying_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_checkpoint_from_before_llama_loads_as_gpt2(tmp_path):
    """Old checkpoints have no `arch` and call norm_eps layer_norm_epsilon."""
    ckpt = final_checkpoint()
    old_config = {k: v for k, v in ckpt["model_config"].items()
                  if k not in ("arch", "n_kv_head", "norm_eps", "rope_theta", "tie_embeddings")}
    old_config["layer_norm_epsilon"] = 1e-4
    save_checkpoint(tmp_path / "old.pt", {**ckpt, "model_config": old_config})
    model, _ = load_model(tmp_path / "old.pt")
    assert model.config.arch == "gpt2" and model.config.norm_eps == 1e-4 and model.config.n_kv_head == 2
    assert model.blocks[0].ln_1.eps == 1e-4


def test_llama_checkpoint_round_trip_keeps_arch_and_untied_head(tmp_path):
    config = GPTConfig(vocab_size=259, arch="llama", n_layer=2, n_head=2, n_kv_head=1, n_embd=16, block_size=8,
                       rope_theta=1000.0, tie_embeddings=False)
    torch.manual_seed(0)
    original = GPT(config).eval()
    save_checkpoint(tmp_path / "llama.pt", {**final_checkpoint(), "model": original.state_dict(),
                                            "model_config": asdict(config)})
    model, _ = load_model(tmp_path / "llama.pt")
    assert model.config == config and model.lm_head.weight is not model.tok_emb.weight
    idx = torch.randint(0, 259, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], original(idx)[0])
    # a gpt2 state dict under a llama config is refused by name
    save_checkpoint(tmp_path / "mixed.pt", {**final_checkpoint(), "model_config": asdict(config)})
    with pytest.raises(TinyGPTError, match="does not match its model_config.*is missing"):
        load_model(tmp_path / "mixed.pt")

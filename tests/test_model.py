import math
from dataclasses import replace

import pytest
import torch

from tinygpt.common import TinyGPTError
from tinygpt.model.gpt import GPT, PRESETS, GPTConfig, config_from_preset

TINY = dict(vocab_size=97, n_layer=2, n_head=4, n_embd=32, block_size=16)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def randomize_layer_norms(model: GPT) -> None:
    """Fresh LayerNorms are the identity; random ones make parity tests see their weights and biases."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.normal_(0.0, 0.5).add_(1.0 if name.endswith("weight") else 0.0)


def to_hf_gpt2(model: GPT):
    """The same weights in transformers' GPT2LMHeadModel (its Conv1D stores (in, out): transpose ours)."""
    transformers = pytest.importorskip("transformers")
    cfg = model.config
    hf_config = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, activation_function="gelu_new", layer_norm_epsilon=cfg.layer_norm_epsilon,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    ours = model.state_dict()
    renames = {"tok_emb": "wte", "pos_emb": "wpe", "blocks": "h", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
               "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
    hf_state = {}
    for name, tensor in ours.items():
        if name == "lm_head.weight":
            continue
        hf_name = name
        for a, b in renames.items():
            hf_name = hf_name.replace(a, b)
        is_conv1d = any(k in name for k in ("qkv.weight", "attn.proj.weight", "fc.weight", "mlp.proj.weight"))
        hf_state["transformer." + hf_name] = tensor.t().contiguous() if is_conv1d else tensor
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected and all("lm_head" in k or "attn.bias" in k or "masked_bias" in k for k in missing)
    hf.tie_weights()
    return hf


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_logits_equal_transformers_gpt2(attention):
    model = tiny_model(attention=attention)
    randomize_layer_norms(model)
    hf = to_hf_gpt2(model)
    idx = torch.randint(0, TINY["vocab_size"], (3, TINY["block_size"]))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert ours.shape == theirs.shape == (3, TINY["block_size"], TINY["vocab_size"])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_loss_equals_transformers_gpt2_loss():
    model = tiny_model()
    hf = to_hf_gpt2(model)
    idx = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        hf_loss = hf(idx, labels=idx).loss  # transformers shifts the labels itself
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=1e-5)


def test_loss_ignores_minus_one_targets():
    model = tiny_model()
    idx = torch.randint(0, TINY["vocab_size"], (1, 8))
    targets = torch.randint(0, TINY["vocab_size"], (1, 8))
    masked = targets.clone()
    masked[0, 4:] = -1
    logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[0, :4], targets[0, :4])
    torch.testing.assert_close(loss, expected)


def test_sdpa_and_explicit_attention_agree_with_grads():
    sdpa, explicit = tiny_model(attention="sdpa"), tiny_model(attention="explicit")
    explicit.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, TINY["vocab_size"], (2, 12))
    targets = torch.randint(0, TINY["vocab_size"], (2, 12))
    (l1, loss1), (l2, loss2) = sdpa(idx, targets), explicit(idx, targets)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    loss1.backward()
    loss2.backward()
    for (name, p1), p2 in zip(sdpa.named_parameters(), explicit.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny_model()
    idx = torch.randint(0, TINY["vocab_size"], (1, 10))
    changed = idx.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_kv_cache_matches_full_forward(attention):
    model = tiny_model(attention=attention)
    idx = torch.randint(0, TINY["vocab_size"], (2, TINY["block_size"]))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(batch_size=2)
        chunks = [idx[:, :5], idx[:, 5:6], idx[:, 6:11], idx[:, 11:12], idx[:, 12:]]  # prefill, steps, chunks
        pieces = [model(chunk, kv_cache=cache)[0] for chunk in chunks]
    assert cache.length == TINY["block_size"]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(TinyGPTError, match="block_size"):
        model(idx[:, :1], kv_cache=cache)


def test_last_only_returns_last_position():
    model = tiny_model()
    idx = torch.randint(0, TINY["vocab_size"], (2, 7))
    with torch.no_grad():
        full, _ = model(idx)
        last, _ = model(idx, last_only=True)
    assert last.shape == (2, 1, TINY["vocab_size"])
    torch.testing.assert_close(last, full[:, -1:])


def test_too_long_sequence_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(TinyGPTError, match="block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_state_dict_names_and_tie():
    model = tiny_model()
    sd = model.state_dict()
    assert sd["tok_emb.weight"].shape == (97, 32) and sd["pos_emb.weight"].shape == (16, 32)
    assert sd["blocks.1.attn.qkv.weight"].shape == (96, 32) and sd["blocks.1.attn.qkv.bias"].shape == (96,)
    assert sd["blocks.0.mlp.fc.weight"].shape == (128, 32) and sd["blocks.0.mlp.proj.weight"].shape == (32, 128)
    expected = {"ln_f.weight", "ln_f.bias", "blocks.0.ln_1.bias", "blocks.0.ln_2.weight", "blocks.0.attn.proj.bias"}
    assert expected <= set(sd)
    assert not any("mask" in name for name in sd)
    assert sd["lm_head.weight"].data_ptr() == sd["tok_emb.weight"].data_ptr()
    fresh = GPT(model.config)
    fresh.load_state_dict(sd)
    assert fresh.lm_head.weight is fresh.tok_emb.weight


def test_initialization_follows_gpt2():
    torch.manual_seed(0)
    config = config_from_preset("toy", 4096, n_layer=8)
    model = GPT(config)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.02)
    residual_std = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks:
        assert block.attn.proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.mlp.proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert torch.all(block.mlp.fc.bias == 0)
        assert torch.all(block.ln_1.weight == 1) and torch.all(block.ln_1.bias == 0)


def test_num_params_counts_tied_weights_once():
    model = tiny_model()
    C, V, T, L = 32, 97, 16, 2
    per_block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    non_embedding = L * per_block + 2 * C
    assert model.num_params(non_embedding=True) == non_embedding
    assert model.num_params() == non_embedding + V * C + T * C
    assert model.estimate_flops_per_token() == 6 * (non_embedding + V * C) + 12 * L * C * T


def test_presets_and_overrides():
    assert PRESETS["toy"] == dict(n_layer=4, n_head=4, n_embd=256, block_size=128)
    small = config_from_preset("small", 4096)
    assert (small.n_layer, small.n_head, small.n_embd, small.block_size) == (8, 8, 512, 256)
    assert 20e6 < GPT(small).num_params() < 30e6
    cfg = config_from_preset("toy", 500, n_layer=2, dropout=0.1, attention="explicit", block_size=None)
    assert cfg == replace(config_from_preset("toy", 500), n_layer=2, dropout=0.1, attention="explicit")


@pytest.mark.parametrize(
    "preset, overrides, message",
    [
        ("huge", {}, "unknown model preset 'huge'"),
        ("toy", {"n_layers": 3}, "unknown model config field.*n_layers"),
        ("toy", {"n_head": 3}, "n_embd=256 is not divisible by n_head=3"),
        ("toy", {"attention": "flash"}, "attention='flash'"),
        ("toy", {"block_size": 0}, "block_size=0"),
        ("toy", {"dropout": 1.5}, "dropout=1.5"),
    ],
)
def test_bad_configs_are_clear_errors(preset, overrides, message):
    with pytest.raises(TinyGPTError, match=message):
        config_from_preset(preset, 100, **overrides)

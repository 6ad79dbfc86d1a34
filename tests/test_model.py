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
        n_head=cfg.n_head, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
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
    _, loss = model(idx, masked)
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[0, :4], targets[0, :4])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sdpa_and_explicit_attention_agree_with_grads(arch):
    build = tiny_model if arch == "gpt2" else tiny_llama
    sdpa, explicit = build(attention="sdpa"), build(attention="explicit")
    explicit.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, TINY["vocab_size"], (2, 12))
    targets = torch.randint(0, TINY["vocab_size"], (2, 12))
    (_, loss1), (_, loss2) = sdpa(idx, targets), explicit(idx, targets)
    torch.testing.assert_close(sdpa(idx)[0], explicit(idx)[0], atol=1e-5, rtol=1e-5)
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


# ------------------------------------------------------------------------------------------------- llama

LLAMA = dict(TINY, arch="llama", n_kv_head=2)  # grouped-query attention: two query heads per key/value head


def tiny_llama(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**LLAMA, **overrides})).eval()
    randomize_layer_norms(model)  # RMSNorm weights start at 1: random ones make parity tests see them
    return model


def to_hf_llama(model: GPT):
    """The same weights in transformers' LlamaForCausalLM (its Linear layers store (out, in), as ours do)."""
    transformers = pytest.importorskip("transformers")
    cfg = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu",
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    renames = {"tok_emb": "model.embed_tokens", "ln_f": "model.norm", "blocks.": "model.layers.",
               "ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.q.": "self_attn.q_proj.",
               "attn.k.": "self_attn.k_proj.", "attn.v.": "self_attn.v_proj.", "attn.proj": "self_attn.o_proj",
               "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.proj": "mlp.down_proj"}
    hf_state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        for a, b in renames.items():
            name = name.replace(a, b)
        hf_state[name] = tensor
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if cfg.tie_embeddings:
        hf.tie_weights()
    return hf


@pytest.mark.parametrize("overrides", [dict(attention="sdpa"), dict(attention="explicit"),
                                       dict(n_kv_head=4, rope_theta=500.0, norm_eps=1e-6),
                                       dict(n_kv_head=1, tie_embeddings=False)])
def test_llama_logits_equal_transformers_llama(overrides):
    model = tiny_llama(**overrides)
    hf = to_hf_llama(model)
    if not model.config.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()
    idx = torch.randint(0, TINY["vocab_size"], (3, TINY["block_size"]))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_llama_loss_equals_transformers_loss():
    model = tiny_llama()
    hf = to_hf_llama(model)
    idx = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        hf_loss = hf(idx, labels=idx).loss
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_llama_kv_cache_holds_kv_heads_and_matches_full_forward(attention):
    model = tiny_llama(attention=attention)
    idx = torch.randint(0, TINY["vocab_size"], (2, TINY["block_size"]))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(batch_size=2)
        chunks = [idx[:, :5], idx[:, 5:6], idx[:, 6:11], idx[:, 11:12], idx[:, 12:]]
        pieces = [model(chunk, kv_cache=cache)[0] for chunk in chunks]
    assert cache.keys[0].shape == (2, LLAMA["n_kv_head"], TINY["block_size"], TINY["n_embd"] // TINY["n_head"])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_llama_is_causal_and_position_aware():
    model = tiny_llama()
    idx = torch.randint(0, TINY["vocab_size"], (1, 10))
    changed = idx.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % TINY["vocab_size"]
    swapped = idx.clone()
    swapped[0, [1, 2]] = idx[0, [2, 1]]
    with torch.no_grad():
        a, b, c = model(idx)[0], model(changed)[0], model(swapped)[0]
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])
    assert not torch.allclose(a[:, 3:], c[:, 3:])  # with no position embedding, only RoPE can tell the order


def test_rotary_scores_depend_only_on_relative_position():
    """RoPE's defining property: the score of query position m with key position n is a function of m - n."""
    from tinygpt.model.gpt import Rotary, apply_rotary

    rotary = Rotary(GPTConfig(**LLAMA))
    q, k = torch.randn(1, 1, 1, 8).expand(1, 1, 16, 8), torch.randn(1, 1, 1, 8).expand(1, 1, 16, 8)
    cos, sin = rotary(0, 16, torch.float32)
    scores = apply_rotary(q, cos, sin)[0, 0] @ apply_rotary(k, cos, sin)[0, 0].T  # (m, n)
    for offset in range(-5, 6):
        diagonal = torch.diagonal(scores, offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(torch.diagonal(scores, 0)[0], torch.diagonal(scores, 3)[0])
    bf16 = rotary(2, 4, torch.bfloat16)
    assert bf16[0].dtype == torch.bfloat16 and bf16[0].shape == (4, 4)  # tables in the autocast dtype


def test_llama_state_dict_names_and_shapes():
    model = tiny_llama()
    sd = model.state_dict()
    C, F, KV = 32, 256, 2 * 8
    assert model.config.ffn_hidden == F
    assert sd["blocks.0.attn.q.weight"].shape == (C, C) and sd["blocks.0.attn.proj.weight"].shape == (C, C)
    assert sd["blocks.0.attn.k.weight"].shape == sd["blocks.1.attn.v.weight"].shape == (KV, C)
    assert sd["blocks.0.mlp.gate.weight"].shape == sd["blocks.0.mlp.up.weight"].shape == (F, C)
    assert sd["blocks.0.mlp.proj.weight"].shape == (C, F) and sd["ln_f.weight"].shape == (C,)
    assert not any(name.endswith("bias") or "pos_emb" in name or "cos" in name or "sin" in name for name in sd)
    assert sd["lm_head.weight"].data_ptr() == sd["tok_emb.weight"].data_ptr()
    untied = tiny_llama(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight
    fresh = GPT(untied.config)
    fresh.load_state_dict(untied.state_dict())
    torch.testing.assert_close(fresh.lm_head.weight, untied.lm_head.weight)


@pytest.mark.parametrize("n_embd, hidden", [(64, 256), (96, 256), (256, 768), (512, 1536), (4096, 11008)])
def test_swiglu_hidden_size_is_rounded_like_llama(n_embd, hidden):
    assert GPTConfig(vocab_size=10, arch="llama", n_embd=n_embd, n_head=4).ffn_hidden == hidden  # 4096: Llama 2 7B


def test_llama_initialization_and_parameter_count():
    torch.manual_seed(0)
    model = GPT(config_from_preset("toy", 4096, arch="llama", n_layer=8))
    assert model.blocks[0].attn.q.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.blocks[0].mlp.gate.weight.std().item() == pytest.approx(0.02, rel=0.02)
    residual_std = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks:
        assert block.attn.proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.mlp.proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert torch.all(block.ln_1.weight == 1) and torch.all(block.ln_2.weight == 1)
    C, V, F, L, T = 256, 4096, 768, 8, 128
    non_embedding = L * (2 * C + 4 * C * C + 3 * C * F) + C
    assert model.num_params(non_embedding=True) == non_embedding
    assert model.num_params() == non_embedding + V * C
    assert model.estimate_flops_per_token() == 6 * (non_embedding + V * C) + 12 * L * C * T
    untied = GPT(config_from_preset("toy", 4096, arch="llama", n_layer=8, tie_embeddings=False))
    assert untied.num_params() == non_embedding + 2 * V * C
    assert untied.estimate_flops_per_token() == model.estimate_flops_per_token()  # the lookup costs no matmul
    # a shorter training window (fine-tuning a long-context model) attends over fewer positions
    assert model.estimate_flops_per_token(T // 2) == 6 * (non_embedding + V * C) + 12 * L * C * (T // 2)


def test_presets_keep_their_shapes_for_llama():
    for preset in ("toy", "small"):
        gpt2, llama = config_from_preset(preset, 4096), config_from_preset(preset, 4096, arch="llama")
        shape = ("n_layer", "n_head", "n_embd", "block_size")
        assert [getattr(llama, k) for k in shape] == [getattr(gpt2, k) for k in shape]
        assert llama.n_kv_head == llama.n_head and llama.tie_embeddings
    assert 20e6 < GPT(config_from_preset("small", 4096, arch="llama")).num_params() < 30e6


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"arch": "mamba"}, "arch='mamba' must be one of gpt2, llama"),
        ({"arch": "llama", "n_kv_head": 3}, "n_head=4 is not a multiple of n_kv_head=3"),
        ({"n_kv_head": 2}, "gpt2 has no grouped-query attention"),
        ({"arch": "llama", "n_embd": 36, "n_head": 4}, "head size n_embd/n_head=9 is odd"),
        ({"arch": "llama", "rope_theta": 0.0}, "rope_theta=0.0 must be positive"),
        ({"norm_eps": -1e-5}, "norm_eps=-1e-05 must be positive"),
    ],
)
def test_bad_llama_configs_are_clear_errors(overrides, message):
    with pytest.raises(TinyGPTError, match=message):
        config_from_preset("toy", 100, **overrides)

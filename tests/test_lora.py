"""LoRA: a wrapped layer computes base + alpha/rank * B A; merging gives the adapted model's logits in a plain GPT;
training leaves the frozen weights bit-identical, keeps only the adapters in last.pt, and resumes after SIGKILL to
identical adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from builders import killed_and_resumed
from test_train import metrics, run_dirs, write_token_dir
from tinygpt.common import TinyGPTError
from tinygpt.model.checkpoint import load_checkpoint, load_model, save_checkpoint
from tinygpt.model.gpt import GPT, GPTConfig
from tinygpt.model.lora import LoRALinear, adapter_state, apply_lora, merge_lora
from tinygpt.model.hardware import Ranks
from tinygpt.model.train import Trainer, TrainConfig, build_parser, main

TINY = dict(vocab_size=320, n_layer=2, n_head=2, n_embd=32, block_size=16)


def randomized_adapters(model: GPT) -> None:
    """B starts at zero (the adapted model is the base); give every adapter values so that it matters."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in adapter_state(model).items():
            t.copy_(torch.randn(t.shape, generator=gen) * 0.1)


def test_a_wrapped_layer_adds_the_scaled_low_rank_update():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 7)
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoRALinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(5, 12)
    a_, b_ = layer.lora_a.detach(), layer.lora_b.detach()
    expected = x @ w.T + b + 2.0 * (x @ a_.T) @ b_.T  # alpha / rank = 2
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.merged()(x), expected)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad and layer.lora_a.requires_grad


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_model_is_a_plain_gpt_with_the_adapted_logits(arch):
    torch.manual_seed(0)
    config = GPTConfig(arch=arch, **TINY)
    model = GPT(config)
    plain_names = set(model.state_dict())
    wrapped = apply_lora(model, rank=4, alpha=8.0, targets=["q", "v", "o", "gate", "up", "down"])
    expected_layers = {"llama": ["attn.proj", "attn.q", "attn.v", "mlp.gate", "mlp.proj", "mlp.up"],
                       "gpt2": ["attn.proj", "attn.qkv", "mlp.fc", "mlp.proj"]}[arch]
    assert wrapped == [f"blocks.{i}.{p}" for i in range(2) for p in expected_layers]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter_state(model))
    idx = torch.randint(0, 320, (2, 16))
    before, _ = model(idx)
    randomized_adapters(model)
    adapted, _ = model(idx)
    assert not torch.allclose(adapted, before)
    merge_lora(model)
    assert set(model.state_dict()) == plain_names
    fresh = GPT(config)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(idx)[0], adapted, atol=1e-5, rtol=1e-5)


def test_a_bf16_base_is_the_bf16_rounded_weight_computed_in_float32():
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="llama", **TINY))
    weight = model.blocks[0].attn.q.weight.detach().clone()
    apply_lora(model, rank=2, alpha=2.0, targets=["q"], base_dtype=torch.bfloat16)
    layer = model.blocks[0].attn.q
    assert layer.weight.dtype is torch.bfloat16 and layer.lora_a.dtype is torch.float32
    x = torch.randn(2, 3, 32, requires_grad=True)  # (batch, time, channels), as blocks call it
    rounded = weight.bfloat16().float()
    out = layer(x)  # B is zero: the base alone, the float32 product with the rounded weight
    torch.testing.assert_close(out, x @ rounded.T, atol=1e-6, rtol=1e-6)
    out.square().sum().backward()
    torch.testing.assert_close(x.grad, (2 * out.detach()) @ rounded, atol=1e-5, rtol=1e-5)
    assert layer.weight.grad is None and layer.lora_b.grad is not None


def test_layers_sharing_one_widening_buffer_train_as_float32_layers_would():
    """Every bf16-held layer of a shape widens into the same buffer: the adapters' gradients over the whole model
    must equal those of a float32 model holding the rounded weights (a buffer read after another layer had
    overwritten it would change them)."""
    torch.manual_seed(0)
    config = GPTConfig(arch="llama", n_kv_head=1, **TINY)  # grouped-query: k and v have a shape of their own
    model = GPT(config)
    for weight in model.parameters():
        weight.data = weight.data.bfloat16().float()
    reference = GPT(config)
    reference.load_state_dict(model.state_dict())
    targets = ["q", "k", "v", "o", "gate", "up", "down"]
    apply_lora(model, rank=2, alpha=4.0, targets=targets)
    apply_lora(reference, rank=2, alpha=4.0, targets=targets, base_dtype=torch.float32)
    randomized_adapters(model)
    reference.load_state_dict(model.state_dict())  # the same adapters; bf16 weights widen exactly on loading
    widen = model.blocks[0].attn.q.widen
    assert all(m.widen is widen for m in model.modules() if isinstance(m, LoRALinear))
    assert model.blocks[1].mlp.up.weight.dtype is torch.bfloat16
    idx = torch.randint(0, 320, (2, 16))
    model(idx, idx)[1].backward()
    reference(idx, idx)[1].backward()
    assert len(widen.buffers) == 4  # (C, C), (C, kv), (ffn, C), (C, ffn): one buffer per shape, not per layer
    grads, expected = adapter_state(model), adapter_state(reference)
    for name in grads:
        got = dict(model.named_parameters())[name].grad
        torch.testing.assert_close(got, dict(reference.named_parameters())[name].grad, atol=1e-6, rtol=1e-5)


def test_frozen_weights_are_held_in_bf16_only_where_that_is_exact():
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="llama", **TINY))
    model.blocks[0].attn.q.weight.data = model.blocks[0].attn.q.weight.data.bfloat16().float()  # a bf16 source
    kept = model.blocks[0].attn.v.weight.detach().clone()
    apply_lora(model, rank=2, alpha=2.0, targets=["q", "v"])
    assert model.blocks[0].attn.q.weight.dtype is torch.bfloat16
    assert model.blocks[0].attn.v.weight.dtype is torch.float32 and torch.equal(model.blocks[0].attn.v.weight, kept)


def test_unknown_targets_are_a_clear_error():
    model = GPT(GPTConfig(arch="gpt2", **TINY))
    with pytest.raises(TinyGPTError, match="choose from q, k, v, o, gate, up, down"):
        apply_lora(model, rank=2, alpha=2.0, targets=["q_proj"])
    with pytest.raises(TinyGPTError, match="name no layer of a gpt2 model"):
        apply_lora(model, rank=2, alpha=2.0, targets=["gate"])


# --- training with LoRA -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_token_dir(tmp_path_factory.mktemp("tokens"))


def args(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["--data_dir", str(data_dir), "--tokenizer", str(data_dir / "tokenizer.json"),
            "--out", str(out_dir / "best.pt"), "--runs_dir", str(out_dir / "runs"), "--batch_size", "4",
            "--eval_batches", "2", "--threads", "1", "--amp", "off", *extra]


@pytest.fixture(scope="module")
def base(data_dir, tmp_path_factory) -> Path:
    """A tiny trained llama checkpoint to adapt."""
    out = tmp_path_factory.mktemp("base")
    main(args(data_dir, out, "--arch", "llama", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
              "--block_size", "16", "--max_steps", "4", "--eval_interval", "4"))
    return out / "best.pt"


LORA = ["--lora_rank", "4", "--lora_alpha", "8", "--lora_targets", "q,v,down", "--lr", "1e-2", "--warmup_steps", "2"]


def test_lora_trains_adapters_only_and_the_final_checkpoint_holds_merged_weights(data_dir, base, tmp_path):
    main(args(data_dir, tmp_path, "--init_from", str(base), *LORA, "--max_steps", "6", "--eval_interval", "3"))
    [run_dir] = run_dirs(tmp_path)
    last, best = load_checkpoint(run_dir / "last.pt"), load_checkpoint(run_dir / "best.pt")
    assert "model" not in last and set(last["adapters"]) == {
        f"blocks.{i}.{p}.{ab}" for i in range(2) for p in ("attn.q", "attn.v", "mlp.proj") for ab in ("lora_a", "lora_b")}
    assert any(t.abs().sum() > 0 for n, t in last["adapters"].items() if n.endswith("lora_b")), "B was trained"
    start = load_checkpoint(base)["model"]
    final = load_checkpoint(tmp_path / "best.pt")
    assert set(final["model"]) == set(start)
    for name, tensor in start.items():
        layer = name.removesuffix(".weight")
        if f"{layer}.lora_a" in best["adapters"]:  # merged: the untouched base plus alpha/rank * B A
            delta = 2.0 * (best["adapters"][f"{layer}.lora_b"] @ best["adapters"][f"{layer}.lora_a"])
            assert torch.equal(final["model"][name], tensor + delta), name
        else:  # frozen and not adapted: bit-identical to the start
            assert torch.equal(final["model"][name], tensor), name
    # the merged checkpoint is a plain model; its validation loss is the one the run logged for its best step
    model, _ = load_model(tmp_path / "best.pt")
    assert [m["val_loss"] for m in metrics(run_dir) if m["step"] == final["step"]] == [final["val_loss"]]
    assert model.config.n_layer == 2


def test_a_bf16_start_is_widened_exactly_and_not_kept_beside_the_model(data_dir, base, tmp_path):
    """The source's bf16 tensors become the model's float32 weights exactly, the head stays the embedding, and the
    trainer keeps no copy of the source's state dict for the run (it would hold half the model's memory again)."""
    ckpt = load_checkpoint(base)
    ckpt["model"] = {name: t.bfloat16() for name, t in ckpt["model"].items()}
    save_checkpoint(tmp_path / "bf16.pt", ckpt)
    flags = args(data_dir, tmp_path, "--init_from", str(tmp_path / "bf16.pt"), *LORA)
    trainer = Trainer(TrainConfig(**vars(build_parser().parse_args(flags))), Ranks(), torch.device("cpu"))
    assert trainer.start.state == {}
    model = trainer.model
    assert model.lm_head.weight is model.tok_emb.weight
    weights = model.state_dict()
    adapted = {f"blocks.{i}.{p}.weight" for i in range(2) for p in ("attn.q", "attn.v", "mlp.proj")}
    for name, tensor in ckpt["model"].items():  # the adapted layers' frozen weights stay in bf16, which is exact
        assert weights[name].dtype is (torch.bfloat16 if name in adapted else torch.float32), name
        assert torch.equal(weights[name].float(), tensor.float()), name


@pytest.mark.slow
def test_killed_lora_run_resumes_to_identical_adapters(data_dir, base, tmp_path):
    settings = ["--init_from", str(base), *LORA, "--max_steps", "150", "--ckpt_interval", "7", "--eval_interval", "50",
                "--lora_dropout", "0.1"]
    whole_run, run_dir = killed_and_resumed(lambda out: args(data_dir, out, *settings), tmp_path, 150)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    last_whole, last_resumed = (load_checkpoint(d / "last.pt") for d in (whole_run, run_dir))
    for name, tensor in last_whole["adapters"].items():
        assert torch.equal(tensor, last_resumed["adapters"][name]), name
    final_whole, final_resumed = load_checkpoint(whole / "best.pt"), load_checkpoint(killed / "best.pt")
    assert all(torch.equal(t, final_resumed["model"][n]) for n, t in final_whole["model"].items())

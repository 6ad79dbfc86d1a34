"""Our GGUF reader: GGUF -> PyTorch GPT + Tokenizer (gpt2 and llama), checked against the checkpoint it came from."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from builders import PARITY_TEXTS, random_gpt, save_tiny_checkpoint, tiny_tokenizer

from tinygpt.common import TinyGPTError
from tinygpt.export.hf import export_hf
from tinygpt.export import quantize
from tinygpt.export.gguf_convert import convert_to_gguf
from tinygpt.weights.gguf_read import load_gguf
from tinygpt.model.gpt import GPT


LLAMA = dict(arch="llama", n_kv_head=2)  # grouped-query attention: the reader un-permutes Q and K per head count


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """f32/f16/q8_0 files of width-64 models, f16 of width-256 ones (K-quants need rows of 256), gpt2 and llama;
    and an f32 file of a llama with an untied head."""
    tmp = tmp_path_factory.mktemp("gguf_model")
    tokenizer = tiny_tokenizer()
    models = {"narrow": random_gpt(tokenizer, n_embd=64, block_size=32, std=0.1),
              "wide": random_gpt(tokenizer, n_embd=256, block_size=32, seed=1, std=0.05),
              "llama_narrow": random_gpt(tokenizer, n_embd=64, block_size=32, std=0.1, rope_theta=500.0, **LLAMA),
              "llama_wide": random_gpt(tokenizer, n_embd=256, block_size=32, seed=1, std=0.03, **LLAMA),
              "llama_untied": random_gpt(tokenizer, n_embd=64, block_size=32, seed=2, std=0.1, tie_embeddings=False,
                                         **LLAMA)}
    outtypes = {"narrow": ("f32", "f16", "q8_0"), "llama_narrow": ("f32", "f16", "q8_0"), "llama_untied": ("f32",)}
    paths = {}
    for kind, model in models.items():
        export_hf(save_tiny_checkpoint(tmp / f"{kind}.pt", model, tokenizer), tmp / kind)
        for outtype in outtypes.get(kind, ("f16",)):
            paths[kind, outtype] = convert_to_gguf(tmp / kind, tmp / f"{kind}-{outtype}.gguf", outtype)
    return models, tokenizer, paths


def logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


def batch(config, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, config.block_size), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["narrow", "llama_narrow", "llama_untied"])
def test_f32_file_gives_the_checkpoint_exactly(files, kind):
    models, tokenizer, paths = files
    model, tok = load_gguf(paths[kind, "f32"])
    original = models[kind]
    assert model.config == original.config and not model.training
    assert tok == tokenizer and [tok.encode(t) for t in PARITY_TEXTS] == [tokenizer.encode(t) for t in PARITY_TEXTS]
    for name, value in original.state_dict().items():  # llama's Q and K rows back in our order
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    # still tied after loading (or still untied)
    assert (model.lm_head.weight is model.tok_emb.weight) == original.config.tie_embeddings


@pytest.mark.parametrize("kind", ["narrow", "wide", "llama_narrow", "llama_wide"])
def test_f16_file_logits_match_the_checkpoint(files, kind):
    models, _, paths = files
    model, _ = load_gguf(paths[kind, "f16"])
    original = models[kind]
    idx = batch(original.config)
    # exact against the checkpoint with its 2-D weights rounded to fp16 as the file stores them ...
    rounded = GPT(original.config).eval()
    rounded.load_state_dict({n: (p.half().float() if p.ndim == 2 and n != "pos_emb.weight" else p)
                             for n, p in original.state_dict().items()})
    torch.testing.assert_close(logits(model, idx), logits(rounded, idx), rtol=0, atol=1e-5)
    # ... and within fp16 tolerance of the original
    torch.testing.assert_close(logits(model, idx), logits(original, idx), rtol=0, atol=2e-2)


@pytest.mark.parametrize("kind", ["narrow", "llama_narrow"])
def test_q8_0_file_is_close(files, kind):
    models, _, paths = files
    model, _ = load_gguf(paths[kind, "q8_0"])
    idx = batch(models[kind].config)
    ours, theirs = logits(model, idx), logits(models[kind], idx)
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()


@pytest.mark.parametrize("kind", ["wide", "llama_wide"])
def test_q4_k_m_file_loads_with_k_quant_types(files, tmp_path, kind):
    models, tokenizer, paths = files
    out = tmp_path / "wide-q4_k_m.gguf"
    quantize.quantize_gguf(paths[kind, "f16"], out, "q4_k_m", threads=1)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q4_K
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q6_K
    model, tok = load_gguf(out)
    assert tok == tokenizer
    original = models[kind]
    idx = batch(original.config)
    ours, theirs = logits(model, idx), logits(original, idx)
    # 4-bit weights: logits stay strongly correlated with the float model's, and most argmaxes agree
    # (not all: a random model has near-ties that any rounding flips)
    corr = np.corrcoef(ours.flatten().numpy(), theirs.flatten().numpy())[0, 1]
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean()
    assert corr > 0.97 and agree > 0.5


def test_bad_files_are_one_clear_error(files, tmp_path):
    _, _, paths = files
    data = paths["narrow", "f16"].read_bytes()
    for name, content in {"truncated.gguf": data[: len(data) - 1000], "header.gguf": data[:100],
                          "text.gguf": b"hello, not a model\n" * 10, "empty.gguf": b""}.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(TinyGPTError, match=rf"{name} is not a readable GGUF file: truncated or of another format"):
            load_gguf(path)
    with pytest.raises(TinyGPTError, match="GGUF file not found"):
        load_gguf(tmp_path / "missing.gguf")


def test_quantize_threads_never_exceed_the_usable_cpus(files, tmp_path, monkeypatch):
    """--threads 8 (or none) on a process allowed one CPU quantizes with one thread, not eight."""
    import os

    _, _, paths = files
    seen, convert = [], quantize._convert
    monkeypatch.setattr(quantize, "_convert", lambda t, qtype, threads, imp: seen.append(threads) or convert(t, qtype, threads, imp))
    # Threads in this process, not forked workers (whose calls this process would not see): the count is the same.
    monkeypatch.setattr(quantize, "_forking", lambda threads, n_converted: seen.append(threads) and None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    for i, asked in enumerate((8, None)):
        quantize.quantize_gguf(paths["narrow", "f16"], tmp_path / f"q{i}.gguf", "q8_0", threads=asked)
    assert seen and set(seen) == {1}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    seen.clear()
    quantize.quantize_gguf(paths["narrow", "f16"], tmp_path / "q2.gguf", "q8_0", threads=2)
    assert seen and set(seen) == {2}

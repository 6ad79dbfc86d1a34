"""tinygpt evaluate: sliding windows score every token once, the result equals a token-by-token reference with
full context, a GGUF file scores as its checkpoint does, and bad input is one clear error."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from builders import corpus, random_gpt, save_tiny_checkpoint, tiny_tokenizer
from tinygpt.common import TinyGPTError
from tinygpt.model.evaluate import evaluate_tokens, main, text_lengths, windows


@pytest.mark.parametrize("n, block, stride", [(10, 4, 2), (5, 8, 4), (21, 4, 1), (2, 4, 2), (100, 16, 5), (17, 16, 16)])
def test_windows_score_every_position_once_with_enough_context(n, block, stride):
    scored = []
    for start, first in windows(n, block, stride):
        end = start + min(block, n - 1 - start)  # the last target of the window
        assert end <= n - 1 and start < first
        assert first - start >= min(block - stride, first)  # context of the first scored target
        scored += range(first, end + 1)
    assert scored == list(range(1, n))


def reference_nats(model, tokens: np.ndarray) -> float:
    """Each target scored on its own, with the whole preceding context up to block_size: the definition."""
    block, total = model.config.block_size, 0.0
    ids = torch.from_numpy(tokens)
    with torch.no_grad():
        for t in range(1, len(ids)):
            context = ids[max(0, t - block) : t][None]
            logits, _ = model(context)
            total += float(F.cross_entropy(logits[0, -1:].double(), ids[t : t + 1]))
    return total


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_stride_one_equals_scoring_each_token_with_full_context(arch):
    tokenizer = tiny_tokenizer()
    model = random_gpt(tokenizer, block_size=16, std=0.1, arch=arch)
    tokens = np.array(tokenizer.encode(" ".join(corpus(2))[:600]), dtype=np.int64)
    result = evaluate_tokens(model, tokens, text_lengths(tokenizer), stride=1, show_progress=False)
    text_bytes = sum(len(tokenizer.vocab[i]) for i in tokens[1:] if i != tokenizer.eot_id)
    assert result.tokens == len(tokens) - 1 and result.bytes == text_bytes
    assert result.bits_per_byte == pytest.approx(reference_nats(model, tokens) / math.log(2) / text_bytes, rel=1e-5)
    # a longer stride gives some tokens less context: a different, usually higher, figure
    coarse = evaluate_tokens(model, tokens, text_lengths(tokenizer), stride=16, show_progress=False)
    assert coarse.tokens == result.tokens and coarse.bits_per_byte != result.bits_per_byte


def test_cli_scores_text_and_token_files_of_a_checkpoint_alike(tmp_path):
    tokenizer = tiny_tokenizer()
    model = random_gpt(tokenizer, block_size=32)
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt", model, tokenizer)
    text = "\n".join(corpus(3))
    (tmp_path / "held_out.txt").write_text(text, encoding="utf-8")
    np.array(tokenizer.encode(text), dtype=np.uint16).tofile(tmp_path / "val.bin")
    from_text = main(["--checkpoint", str(checkpoint), "--text", str(tmp_path / "held_out.txt"), "--device", "cpu",
                      "--json", str(tmp_path / "eval.json")])
    from_tokens = main(["--checkpoint", str(checkpoint), "--tokens", str(tmp_path / "val.bin"), "--device", "cpu"])
    assert from_text == from_tokens
    assert json.loads((tmp_path / "eval.json").read_text())["bits_per_byte"] == from_text.bits_per_byte


def test_evaluation_is_fp32_by_default_and_records_its_dtype(tmp_path, monkeypatch):
    """The default does not depend on the machine: fp32 even where `auto` would choose bf16 (faked here), and the
    JSON says which dtype computed it."""
    from tinygpt.model import hardware

    monkeypatch.setattr(hardware, "cpu_bf16_is_faster", lambda: True)  # a CPU where auto takes bf16
    tokenizer = tiny_tokenizer()
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt", random_gpt(tokenizer, block_size=32, std=0.1), tokenizer)
    (tmp_path / "held_out.txt").write_text("\n".join(corpus(2)), encoding="utf-8")
    args = ["--checkpoint", str(checkpoint), "--text", str(tmp_path / "held_out.txt"), "--device", "cpu"]
    default = main([*args, "--json", str(tmp_path / "default.json")])
    fp32, bf16 = main([*args, "--amp", "off"]), main([*args, "--amp", "auto", "--json", str(tmp_path / "bf16.json")])
    assert default == fp32 and default.dtype == "float32" and bf16.dtype == "bfloat16"
    assert bf16.bits_per_byte != fp32.bits_per_byte
    assert json.loads((tmp_path / "default.json").read_text())["dtype"] == "float32"
    assert json.loads((tmp_path / "bf16.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_an_export_folder_and_a_gguf_file_score_as_their_checkpoint(tmp_path, arch):
    from tinygpt.export.gguf_convert import convert_to_gguf
    from tinygpt.export.hf import export_hf

    tokenizer = tiny_tokenizer()
    model = random_gpt(tokenizer, block_size=32, arch=arch, **({"n_kv_head": 2} if arch == "llama" else {}))
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt", model, tokenizer)
    export_hf(checkpoint, tmp_path / "hf")
    gguf = convert_to_gguf(tmp_path / "hf", tmp_path / "model-f32.gguf", "f32")
    (tmp_path / "text.txt").write_text(" ".join(corpus(2)), encoding="utf-8")
    args = ["--text", str(tmp_path / "text.txt"), "--device", "cpu"]
    ours = main(["--checkpoint", str(checkpoint), *args])
    assert main(["--gguf", str(gguf), *args]).bits_per_byte == pytest.approx(ours.bits_per_byte, rel=1e-5)
    assert main(["--hf_dir", str(tmp_path / "hf"), *args]).bits_per_byte == pytest.approx(ours.bits_per_byte, rel=1e-5)


def test_bad_input_is_one_clear_error(tmp_path):
    tokenizer = tiny_tokenizer()
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt", random_gpt(tokenizer, block_size=32), tokenizer)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(TinyGPTError, match=r"latin1.txt is not UTF-8 text"):
        main(["--checkpoint", str(checkpoint), "--text", str(tmp_path / "latin1.txt")])
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(TinyGPTError, match=r"odd.bin is not a whole number of uint16 tokens"):
        main(["--checkpoint", str(checkpoint), "--tokens", str(tmp_path / "odd.bin")])
    (tmp_path / "one.txt").write_text("a", encoding="utf-8")
    with pytest.raises(TinyGPTError, match=r"at least 2 are needed"):
        main(["--checkpoint", str(checkpoint), "--text", str(tmp_path / "one.txt")])
    with pytest.raises(TinyGPTError, match=r"--stride 99 must be between 1 and the model's block_size 32"):
        main(["--checkpoint", str(checkpoint), "--text", str(tmp_path / "latin1.txt").replace("latin1", "one"),
              "--stride", "99"])

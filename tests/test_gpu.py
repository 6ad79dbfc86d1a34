"""Training on a CUDA GPU: what only a GPU reaches. bf16 autocast and fp16 with its gradient scaler, the CUDA random
state across a kill -9 and resume, torch.compile, MFU against the GPU's measured peak, and LoRA on a bf16 base
imported from a Hugging Face folder. Skipped where torch sees no CUDA device (CI); on a GPU machine:

    python -m pytest tests/test_gpu.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import killed_and_resumed, tiny_tokenizer
from test_train import metrics, run_dirs, write_token_dir
from tinygpt.model.checkpoint import load_checkpoint, load_model
from tinygpt.model.train import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY_LLAMA = ["--arch", "llama", "--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "32"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_token_dir(tmp_path_factory.mktemp("tokens"))


def args(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["--data_dir", str(data_dir), "--tokenizer", str(data_dir / "tokenizer.json"),
            "--out", str(out_dir / "best.pt"), "--runs_dir", str(out_dir / "runs"), "--batch_size", "8",
            "--eval_batches", "2", "--device", "cuda", *extra]


def max_difference(a: dict, b: dict) -> float:
    return max((x.float() - b[n].float()).abs().max().item() for n, x in a.items())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_killed_cuda_run_resumes_to_the_uninterrupted_result(data_dir, tmp_path, amp):
    """Killed at a random moment and rerun, a GPU run ends where the uninterrupted one does: the CUDA random state
    (dropout) and, in fp16, the gradient scaler's state come back from last.pt. The explicit attention keeps the
    kernels deterministic, so equal means bit-identical."""
    settings = [*TINY_LLAMA, "--max_steps", "200", "--ckpt_interval", "7", "--eval_interval", "40", "--dropout", "0.1",
                "--amp", amp, "--attention", "explicit"]
    whole_run, run_dir = killed_and_resumed(lambda out: args(data_dir, out, *settings), tmp_path, 200)
    final_whole, final_resumed = (load_checkpoint(tmp_path / d / "best.pt") for d in ("whole", "killed"))
    assert final_whole["step"] == final_resumed["step"]
    difference = max_difference(final_whole["model"], final_resumed["model"])
    assert difference == 0.0, f"resumed weights differ by up to {difference:.3g}"
    assert [m["step"] for m in metrics(run_dir)] == [m["step"] for m in metrics(whole_run)]
    scaler = load_checkpoint(run_dir / "last.pt")["scaler"]
    if amp == "fp16":  # the scaler's state is in last.pt (the equal weights above say it was restored)
        assert 0 < scaler["scale"] < float("inf")
    assert json.loads((run_dir / "config.json").read_text())["amp_chosen"] == amp


def test_compiled_training_picks_bf16_and_reports_mfu(data_dir, tmp_path, capsys):
    """amp auto is bf16 on a GPU that computes it (compute capability 8 and up); the compiled model trains, its
    validation loss falls, and MFU is the achieved rate over the measured matmul peak, at most 1."""
    main(args(data_dir, tmp_path, *TINY_LLAMA, "--compile", "--amp", "auto", "--max_steps", "60",
              "--eval_interval", "20", "--log_interval", "20"))
    [run_dir] = run_dirs(tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    if torch.cuda.get_device_capability()[0] >= 8:
        assert config["amp_chosen"] == "bf16"
    lines = metrics(run_dir)
    assert lines[-1]["val_loss"] < lines[0]["val_loss"]
    assert all(0 < m["mfu"] <= 1 for m in lines[1:]), [m["mfu"] for m in lines[1:]]


def test_lora_on_a_hugging_face_model_trains_on_the_gpu_and_exports_its_logits(tmp_path):
    """LoRA from a transformers-made Qwen2 folder on the GPU (the frozen base in bf16 there): the adapters train,
    and the exported folder gives transformers the logits of our merged checkpoint."""
    transformers = pytest.importorskip("transformers")
    from test_import import hf_model, logits_of, save_folder
    from tinygpt.export.hf import export_hf

    folder = save_folder(hf_model("qwen2"), tmp_path / "hf")
    tokenizer = tiny_tokenizer()
    data = write_token_dir(tmp_path / "tokens", tokenizer=tokenizer)  # stories in the model's own tokenizer

    main(args(data, tmp_path, "--init_from", str(folder), "--lora_rank", "4", "--lora_alpha", "8", "--lr", "1e-2",
              "--warmup_steps", "2", "--max_steps", "12", "--eval_interval", "6", "--amp", "bf16", "--block_size", "32"))
    [run_dir] = run_dirs(tmp_path)
    adapters = load_checkpoint(run_dir / "last.pt")["adapters"]
    assert any(t.abs().sum() > 0 for n, t in adapters.items() if n.endswith("lora_b")), "B was trained"
    export = export_hf(tmp_path / "best.pt", tmp_path / "export")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.float32).eval()
    model, _ = load_model(tmp_path / "best.pt")
    ids = tokenizer.encode("Once upon a time, a little fox")
    np.testing.assert_allclose(logits_of(theirs, ids), logits_of(model.float().eval(), ids), atol=1e-4, rtol=1e-4)

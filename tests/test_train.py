"""Training stage: LR schedule, optimizer groups, batch sampling, exact resume after SIGKILL, fresh runs on
changed settings, DDP parity with one process, and clear errors on bad input."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import killed_and_resumed, run_dirs, subprocess_env
from tinygpt.model.checkpoint import load_checkpoint
from tinygpt.common import TinyGPTError
from tinygpt.model.batches import RandomBatches, TokenFile, fixed_batches
from tinygpt.model.gpt import GPT, GPTConfig
from tinygpt.data.stories.generator import story
from tinygpt.model.hardware import autocast_dtype
from tinygpt.model.optim import configure_optimizers, cosine_lr
from tinygpt.model.train import main
from tinygpt.tokenizer.bpe import Tokenizer
from tinygpt.tokenizer.train_bpe import train_bpe

TINY_MODEL = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "16"]


def write_token_dir(path: Path, n_stories: int = 120, vocab_size: int = 320,
                    tokenizer: Tokenizer | None = None) -> Path:
    """A tiny encoded data folder in the encode stage's format: tokenizer.json, train.bin, val.bin, meta.json; the
    stories in `tokenizer`, or in one of `vocab_size` learned from them."""
    path.mkdir(parents=True, exist_ok=True)
    docs = [story(random.Random(i)) for i in range(n_stories)]
    tokenizer = tokenizer or train_bpe(docs, vocab_size, show_progress=False)
    tokenizer.save(path / "tokenizer.json")
    ids = np.array([i for doc in docs for i in tokenizer.encode(doc + "\n<|endoftext|>\n")], dtype=np.uint16)
    split = int(0.9 * len(ids))
    ids[:split].tofile(path / "train.bin")
    ids[split:].tofile(path / "val.bin")
    (path / "meta.json").write_text(json.dumps({"vocab_size": tokenizer.vocab_size, "dtype": "uint16"}))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_token_dir(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("TINYGPT_NO_PROGRESS", "1")


def train_args(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["--data_dir", str(data_dir), "--tokenizer", str(data_dir / "tokenizer.json"),
            "--out", str(out_dir / "best.pt"), "--runs_dir", str(out_dir / "runs"), *TINY_MODEL,
            "--batch_size", "4", "--eval_batches", "2", "--warmup_steps", "3", *extra]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- schedule, optimizer, precision ---------------------------------------------------------------------


def test_cosine_lr_warms_up_linearly_then_decays_to_min_lr():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert [cosine_lr(s, **kw) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert cosine_lr(10, **kw) == pytest.approx(1.0)
    assert cosine_lr(60, **kw) == pytest.approx(0.55)  # half way down the cosine: the mean of lr and min_lr
    assert cosine_lr(110, **kw) == pytest.approx(0.1) and cosine_lr(500, **kw) == pytest.approx(0.1)
    decay = [cosine_lr(s, **kw) for s in range(10, 111)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert cosine_lr(0, lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=10) == pytest.approx(1.0)


def test_weight_decay_applies_to_weight_matrices_only():
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=8))
    [optimizer] = configure_optimizers(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, device=torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    others = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    expected = {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert decayed == expected
    assert decayed | others == set(names.values()) and not decayed & others
    assert "tok_emb.weight" in others and "pos_emb.weight" in others and "blocks.0.ln_1.weight" in others


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=8))
    adamw, muon = configure_optimizers(model, optimizer="muon", lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                       device=torch.device("cpu"), muon_lr=0.02)
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    matrices = {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert {names[id(p)] for g in muon.param_groups for p in g["params"]} == matrices
    rest = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert rest == set(names.values()) - matrices and "tok_emb.weight" in rest
    assert [g["peak_lr"] for g in muon.param_groups] == [0.02]
    assert all(g["weight_decay"] == 0.0 for g in adamw.param_groups)  # no AdamW matrix left to decay


def test_autocast_dtype_choices(monkeypatch):
    from tinygpt.model import hardware

    cpu = torch.device("cpu")
    assert autocast_dtype("off", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    # auto on a CPU: bf16 only where its matmuls measure clearly faster than fp32's
    for bf16, fp32, expected in [(200e9, 100e9, torch.bfloat16), (55e9, 100e9, None), (110e9, 100e9, None)]:
        monkeypatch.setattr(hardware, "matmul_peak", lambda dtype, device, n=None: bf16 if dtype is torch.bfloat16 else fp32)
        assert autocast_dtype("auto", cpu) is expected
    with pytest.raises(TinyGPTError, match="fp16 needs a CUDA device"):
        autocast_dtype("fp16", cpu)


# --- batches --------------------------------------------------------------------------------------------


def test_batches_are_windows_of_the_token_file_and_ranks_split_the_global_batch(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) * 7 % 65000
    tokens.tofile(tmp_path / "t.bin")
    file = TokenFile.open(tmp_path / "t.bin", np.dtype(np.uint16), min_tokens=17)
    single = RandomBatches(file, batch_size=6, block_size=16, seed=3)
    ranks = [RandomBatches(file, batch_size=3, block_size=16, seed=3, rank=r, world_size=2) for r in range(2)]
    cpu = torch.device("cpu")
    for _ in range(3):
        x, y, segments = single.next(cpu)
        parts = [r.next(cpu) for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
        assert x.shape == (6, 16) and x.dtype == torch.int64 and segments is None  # plain text is not packed
        for row_x, row_y in zip(x, y):  # each row is a contiguous slice of the file, targets shifted by one
            start = np.flatnonzero(tokens == row_x[0].item())[0]
            assert row_x.tolist() == tokens[start : start + 16].tolist()
            assert row_y.tolist() == tokens[start + 1 : start + 17].tolist()
    # the generator state restores the stream exactly
    state = single.state_dict()
    expected = single.next(cpu)[0]
    single.load_state_dict(state)
    assert torch.equal(single.next(cpu)[0], expected)


def test_validation_batches_are_fixed_and_in_range(tmp_path):
    np.zeros(100, dtype=np.uint16).tofile(tmp_path / "v.bin")
    file = TokenFile.open(tmp_path / "v.bin", np.dtype(np.uint16), min_tokens=17)
    batches = fixed_batches(file, num_batches=3, batch_size=4, block_size=16)
    assert [len(b) for b in batches] == [4, 4, 4]
    offsets = torch.cat(batches)
    assert offsets.min() == 0 and offsets.max() == 100 - 17
    assert all(torch.equal(a, b) for a, b in zip(batches, fixed_batches(file, 3, 4, 16)))


# --- runs: resume, fingerprints, final checkpoint -------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_killed_run_resumes_to_bit_identical_weights(data_dir, tmp_path, optimizer):
    # amp pinned: `auto` measures at each start, and two runs under load could choose differently
    settings = ["--max_steps", "200", "--ckpt_interval", "7", "--eval_interval", "40", "--threads", "1", "--dropout", "0.1",
                "--optimizer", optimizer, "--amp", "off"]
    whole_run, run_dir = killed_and_resumed(lambda out: train_args(data_dir, out, *settings), tmp_path, 200)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    final_whole, final_resumed = load_checkpoint(whole / "best.pt"), load_checkpoint(killed / "best.pt")
    assert final_whole["step"] == final_resumed["step"] and final_whole["val_loss"] == final_resumed["val_loss"]
    for name, tensor in final_whole["model"].items():
        assert torch.equal(tensor, final_resumed["model"][name]), name
    last_whole, last_resumed = (load_checkpoint(d / "last.pt") for d in (whole_run, run_dir))
    assert len(last_whole["optimizers"]) == (2 if optimizer == "muon" else 1)
    for opt_whole, opt_resumed in zip(last_whole["optimizers"], last_resumed["optimizers"]):
        for a, b in zip(opt_whole["state"].values(), opt_resumed["state"].values()):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "optimizer state"
    # the log holds each step once, as the uninterrupted run wrote it
    assert [m["step"] for m in metrics(run_dir)] == [m["step"] for m in metrics(whole_run)]


def test_changed_setting_starts_a_fresh_run_and_same_command_resumes(data_dir, tmp_path, capsys):
    main(train_args(data_dir, tmp_path, "--max_steps", "4", "--eval_interval", "2", "--log_interval", "2"))
    first = capsys.readouterr().out
    n_params = GPT(GPTConfig(vocab_size=320, n_layer=1, n_head=2, n_embd=32, block_size=16)).num_params()
    assert "starting run" in first and f"model: {n_params:,} parameters" in first
    [run_dir] = run_dirs(tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["fingerprint"] == run_dir.name and config["training"]["max_steps"] == 4
    assert config["model"]["n_embd"] == 32 and config["data"]["train_tokens"] > 0
    lines = metrics(run_dir)
    assert [m["step"] for m in lines] == [0, 2, 4] and all(math.isfinite(m["val_bpb"]) for m in lines)
    assert "step 0: validation" in first and "train_loss" not in lines[0]  # where the run starts from
    lines = lines[1:]
    peaks = [m["flops_per_s"] / m["mfu"] for m in lines]  # KeyError if a logged step lacks them
    assert max(peaks) == pytest.approx(min(peaks)) and all(0 < m["mfu"] < 2 for m in lines), \
        "MFU: achieved FLOP/s over one measured peak"
    assert "measured matmul peak" in first

    main(train_args(data_dir, tmp_path, "--max_steps", "4", "--eval_interval", "2", "--ckpt_interval", "1"))
    again = capsys.readouterr().out
    assert f"resuming run {run_dir} from step 4" in again  # ckpt_interval does not change the result

    main(train_args(data_dir, tmp_path, "--max_steps", "4", "--eval_interval", "2", "--lr", "1e-3"))
    fresh = capsys.readouterr().out
    assert "starting a fresh run" in fresh and "(training.lr 0.002 -> 0.001)" in fresh
    assert len(run_dirs(tmp_path)) == 2


def test_final_checkpoint_is_the_best_model_without_training_state(data_dir, tmp_path, monkeypatch):
    main(train_args(data_dir, tmp_path, "--max_steps", "6", "--eval_interval", "3", "--lr", "3e-3"))
    final = load_checkpoint(tmp_path / "best.pt")
    assert set(final) == {"model", "model_config", "tokenizer_json", "step", "val_loss", "run"}
    [run_dir] = run_dirs(tmp_path)
    best = load_checkpoint(run_dir / "best.pt")
    assert final["step"] == best["step"] and final["val_loss"] == min(m["val_loss"] for m in metrics(run_dir)[1:])
    assert all(torch.equal(final["model"][k], best["model"][k]) for k in best["model"])
    assert final["tokenizer_json"] == (data_dir / "tokenizer.json").read_text()
    assert {"optimizers", "scaler", "sampler", "rng", "best_val_loss"} <= set(best)


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(data_dir, tmp_path):
    common = ["--max_steps", "6", "--eval_interval", "3", "--log_interval", "1", "--grad_accum", "2",
              "--amp", "off", "--threads", "1"]
    env = subprocess_env()
    single = train_args(data_dir, tmp_path / "single", *common)
    single[single.index("--batch_size") + 1] = "4"
    subprocess.run([sys.executable, "-m", "tinygpt.model.train", *single], env=env, check=True, capture_output=True)
    pair = train_args(data_dir, tmp_path / "ddp", *common)
    pair[pair.index("--batch_size") + 1] = "2"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "tinygpt.model.train", *pair], env=env, check=True, capture_output=True)
    one, two = metrics(run_dirs(tmp_path / "single")[0]), metrics(run_dirs(tmp_path / "ddp")[0])
    assert [m["step"] for m in one] == [m["step"] for m in two] == [0, 1, 2, 3, 4, 5, 6]
    assert [m.get("train_loss") for m in two[1:]] == pytest.approx([m.get("train_loss") for m in one[1:]], rel=1e-5)
    val_one, val_two = ([m["val_loss"] for m in run if "val_loss" in m] for run in (one, two))
    assert len(val_one) == 3 and val_two == pytest.approx(val_one, rel=1e-5)


# --- bad input ------------------------------------------------------------------------------------------


def copy_data(data_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json"):
        (dest / name).write_bytes((data_dir / name).read_bytes())
    return dest


def test_token_file_shorter_than_one_block_is_a_clear_error(data_dir, tmp_path):
    bad = copy_data(data_dir, tmp_path / "data")
    np.arange(10, dtype=np.uint16).tofile(bad / "val.bin")
    result = subprocess.run([sys.executable, "-m", "tinygpt.model.train", *train_args(bad, tmp_path, "--max_steps", "2")],
                            env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "val.bin holds 10 tokens, fewer than the 17" in result.stderr
    assert not (tmp_path / "best.pt").exists()


def test_vocab_size_disagreeing_with_meta_json_is_a_clear_error(data_dir, tmp_path):
    bad = copy_data(data_dir, tmp_path / "data")
    (bad / "meta.json").write_text(json.dumps({"vocab_size": 999}))
    with pytest.raises(TinyGPTError, match=r"meta.json says vocab_size=999.*rerun the encode stage"):
        main(train_args(bad, tmp_path, "--max_steps", "2"))


def test_token_id_beyond_vocab_is_a_clear_error(data_dir, tmp_path):
    bad = copy_data(data_dir, tmp_path / "data")
    np.full(100, 5000, dtype=np.uint16).tofile(bad / "val.bin")
    with pytest.raises(TinyGPTError, match="val.bin holds token id 5000, beyond vocab_size"):
        main(train_args(bad, tmp_path, "--max_steps", "2"))


def test_truncated_last_checkpoint_is_a_clear_error(data_dir, tmp_path):
    main(train_args(data_dir, tmp_path, "--max_steps", "2", "--eval_interval", "2"))
    [run_dir] = run_dirs(tmp_path)
    last = run_dir / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(TinyGPTError, match=r"last.pt is truncated"):
        main(train_args(data_dir, tmp_path, "--max_steps", "2", "--eval_interval", "2"))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    forward, calls = GPT.forward, []

    def poisoned_forward(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        if self.training:
            calls.append(1)
            if len(calls) > 5:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned_forward)
    with pytest.raises(TinyGPTError, match=r"training loss is nan at step 5; stopped, keeping the last good checkpoint"):
        main(train_args(data_dir, tmp_path, "--max_steps", "10", "--ckpt_interval", "2", "--eval_interval", "100"))
    [run_dir] = run_dirs(tmp_path)
    last = load_checkpoint(run_dir / "last.pt")
    assert last["step"] == 4 and all(torch.isfinite(t).all() for t in last["model"].values())
    assert not (tmp_path / "best.pt").exists()


def test_a_resumed_run_keeps_what_amp_auto_chose(data_dir, tmp_path, monkeypatch):
    """`auto` measures; the measurement may differ at the next start, but a resumed run computes as it began."""
    from tinygpt.model import flops, hardware
    from tinygpt.model import train as train_module

    real_save = train_module.save_checkpoint

    def stop_after_step_2(path, state):
        real_save(path, state)
        if state["step"] == 2 and path.name == "last.pt":
            raise KeyboardInterrupt

    monkeypatch.setattr(hardware, "cpu_bf16_is_faster", lambda: True)
    monkeypatch.setattr(flops, "matmul_peak", lambda *args, **kwargs: 1e12)  # minutes in bf16 on some CPUs
    monkeypatch.setattr(train_module, "save_checkpoint", stop_after_step_2)
    args = train_args(data_dir, tmp_path, "--max_steps", "4", "--ckpt_interval", "2", "--amp", "auto")
    with pytest.raises(KeyboardInterrupt):
        main(args)
    [run_dir] = run_dirs(tmp_path)
    assert json.loads((run_dir / "config.json").read_text())["amp_chosen"] == "bf16"
    monkeypatch.setattr(hardware, "cpu_bf16_is_faster", lambda: False)  # the next start measures otherwise
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    main(args)
    assert run_dirs(tmp_path) == [run_dir] and load_checkpoint(tmp_path / "best.pt")["step"] == 4
    assert json.loads((run_dir / "config.json").read_text())["amp_chosen"] == "bf16"


def test_nan_validation_loss_stops_with_the_divergence_error(data_dir, tmp_path, monkeypatch):
    forward = GPT.forward

    trained = []

    def poisoned_eval(self, idx, targets=None, **kw):  # validation after the first step (step 0's is fine)
        logits, loss = forward(self, idx, targets, **kw)
        trained.append(self.training)
        return logits, (loss if self.training or not any(trained) else loss * float("nan"))

    monkeypatch.setattr(GPT, "forward", poisoned_eval)
    with pytest.raises(TinyGPTError, match=r"validation loss is nan at step 4; stopped"):
        main(train_args(data_dir, tmp_path, "--max_steps", "8", "--eval_interval", "4"))


@pytest.mark.parametrize("dies_at", [4, 2])
def test_a_kill_at_a_checkpoint_write_loses_no_metrics_line(data_dir, tmp_path, monkeypatch, dies_at):
    """The step's metrics line is written before last.pt: dying while the checkpoint is written leaves the
    line (a resumed run trims what it repeats), never a checkpoint past a lost line. Dying at the first last.pt
    (step 2), the next start is a fresh one: it logs step 0's validation once, not twice."""
    from tinygpt.model import train as train_module

    real_save = train_module.save_checkpoint

    def dies(path, state):
        if state["step"] == dies_at and path.name == "last.pt":
            raise KeyboardInterrupt  # stands for SIGKILL in the middle of the write
        real_save(path, state)

    monkeypatch.setattr(train_module, "save_checkpoint", dies)
    args = train_args(data_dir, tmp_path, "--max_steps", "6", "--ckpt_interval", "2", "--log_interval", "1",
                      "--eval_interval", "100")
    with pytest.raises(KeyboardInterrupt):
        main(args)
    [run_dir] = run_dirs(tmp_path)
    assert [m["step"] for m in metrics(run_dir)] == list(range(dies_at + 1))
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    main(args)  # resumes from step 2, or starts afresh
    assert [m["step"] for m in metrics(run_dir)] == [0, 1, 2, 3, 4, 5, 6]


def test_a_stop_signal_saves_the_step_and_the_same_command_resumes_to_the_same_weights(data_dir, tmp_path):
    """SIGUSR1 (SLURM's --signal) or SIGTERM: last.pt at the next step boundary, exit 75, then an exact resume."""
    settings = ["--max_steps", "60", "--ckpt_interval", "50", "--eval_interval", "30", "--threads", "1", "--amp", "off"]
    command = [sys.executable, "-m", "tinygpt", "train"]
    env = subprocess_env()
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    subprocess.run(command + train_args(data_dir, whole, *settings), env=env, check=True, capture_output=True)
    marker = tmp_path / "stopped-marker"  # what the SLURM launcher asks for: torchrun turns exit 75 into 1
    assert not marker.exists()
    proc = subprocess.Popen(command + train_args(data_dir, stopped, *settings, "--log_interval", "1"),
                            env={**env, "TINYGPT_STOPPED_FILE": str(marker)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((stopped / "runs").glob("*/metrics.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    [run_dir] = run_dirs(stopped)
    stopped_at = load_checkpoint(run_dir / "last.pt")["step"]
    assert f"stopped by SIGUSR1 at step {stopped_at}" in err and 0 < stopped_at < 60 and marker.exists()
    subprocess.run(command + train_args(data_dir, stopped, *settings, "--log_interval", "1"), env=env, check=True,
                   capture_output=True)
    a, b = load_checkpoint(whole / "best.pt")["model"], load_checkpoint(stopped / "best.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tensorboard_event_files_hold_the_metrics(data_dir, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    main(train_args(data_dir, tmp_path, "--max_steps", "6", "--eval_interval", "3", "--log_interval", "2",
                    "--optimizer", "muon", "--tensorboard"))
    [run_dir] = run_dirs(tmp_path)
    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    logged = metrics(run_dir)
    assert {"loss/train", "loss/val", "bits_per_byte/val", "lr/adamw", "lr/muon", "speed/tokens_per_s"} <= set(scalars)
    assert [s for s, _ in scalars["loss/train"]] == [m["step"] for m in logged if "train_loss" in m]
    assert [v for _, v in scalars["bits_per_byte/val"]] == pytest.approx([m["val_bpb"] for m in logged if "val_bpb" in m])


def test_threads_never_exceed_the_usable_cpus(data_dir, tmp_path, monkeypatch):
    from tinygpt.common import capped_threads, usable_cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert usable_cpus() == 2
    assert [capped_threads(n) for n in (None, 0, 1, 2, 4, 64)] == [2, 2, 1, 2, 2, 2]
    before = torch.get_num_threads()
    try:
        main(train_args(data_dir, tmp_path, "--max_steps", "1", "--threads", "4"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_device_choice_prefers_cuda_then_mps_then_cpu(monkeypatch):
    from tinygpt.model import hardware

    def machine(cuda: bool, mps: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)

    machine(cuda=False, mps=True)
    assert hardware.pick_device("auto") == torch.device("mps")
    assert hardware.pick_device("mps") == torch.device("mps")
    assert hardware.pick_device("cpu") == torch.device("cpu")
    assert hardware.autocast_dtype("auto", torch.device("mps")) is None  # fp32: MPS autocast is partial
    with pytest.raises(TinyGPTError, match="no CUDA GPU"):
        hardware.pick_device("cuda")
    machine(cuda=True, mps=True)
    assert hardware.pick_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert hardware.pick_device("cuda:3") == torch.device("cuda", 3)
    machine(cuda=False, mps=False)
    assert hardware.pick_device("auto") == torch.device("cpu")
    with pytest.raises(TinyGPTError, match="MPS .* not available"):
        hardware.pick_device("mps")
    with pytest.raises(TinyGPTError, match="choose auto, cpu, cuda, cuda:N or mps"):
        hardware.pick_device("tpu")


def test_bad_flag_values_are_clear_errors(data_dir, tmp_path):
    with pytest.raises(TinyGPTError, match="--min_lr=0.1 must lie between 0 and --lr=0.01"):
        main(train_args(data_dir, tmp_path, "--lr", "0.01", "--min_lr", "0.1"))
    with pytest.raises(TinyGPTError, match="--batch_size=0 must be at least 1"):
        main(train_args(data_dir, tmp_path, "--batch_size", "0"))


# --- precision, processes and numbers that depend on the machine ----------------------------------------


def test_a_resumed_run_whose_precision_this_device_lacks_stops_with_a_clear_message(data_dir, tmp_path, monkeypatch):
    """A run that `--amp auto` began in fp16 on an older GPU, resumed on a CPU: a clear stop, no CPU fp16 with a
    gradient scaler, no silent new run folder, nothing in the run folder changed."""
    from tinygpt.model import hardware

    monkeypatch.setattr(hardware, "cpu_bf16_is_faster", lambda: False)
    args = train_args(data_dir, tmp_path, "--max_steps", "2", "--eval_interval", "2", "--amp", "auto")
    main(args)
    [run_dir] = run_dirs(tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "amp_chosen": "fp16"}))  # as chosen on a T4
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(TinyGPTError, match=rf"run folder {run_dir} computes in fp16 .*but on cpu fp16 \(with a "
                                           r"gradient scaler\) needs a CUDA device; resume it on .*--amp off"):
        main(args)
    assert run_dirs(tmp_path) == [run_dir]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_which_precisions_a_device_can_compute_in(monkeypatch):
    from tinygpt.model.hardware import amp_unsupported

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert amp_unsupported(None, cpu) is None and amp_unsupported(torch.bfloat16, cpu) is None
    assert "needs a CUDA device" in amp_unsupported(torch.float16, cpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a V100 or a T4
    assert amp_unsupported(torch.bfloat16, gpu) == "this GPU has no bf16"
    assert amp_unsupported(torch.float16, gpu) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_unsupported(torch.bfloat16, gpu) is None


def test_torchrun_processes_share_the_usable_cpus(data_dir, tmp_path, monkeypatch):
    """torchrun sets OMP_NUM_THREADS=1 and LOCAL_WORLD_SIZE; each of N CPU processes takes 1/N of the CPUs."""
    from tinygpt.model.hardware import threads_per_process

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert [threads_per_process(n, 4) for n in (0, 1, 2, 3, 8)] == [2, 1, 2, 2, 2]
    assert threads_per_process(0, 1) == 8 and threads_per_process(0, 16) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # one process of four on this machine (RANK etc. unset: no DDP)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    try:
        main(train_args(data_dir, tmp_path, "--max_steps", "1", "--threads", "0", "--amp", "off"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("remeasured", [1e15, 1e3])
def test_mfu_stays_at_or_below_one_when_the_first_peak_measured_low(data_dir, tmp_path, monkeypatch, remeasured):
    """The start's matmul peak measured under load (1 kFLOP/s here): the peak is measured again once the model
    seems to beat it, and never taken below what the model reached."""
    from tinygpt.model import flops

    readings = []

    def peak(dtype, device, n=None, repeats=3):
        readings.append(1e3 if not readings else remeasured)
        return readings[-1]

    monkeypatch.setattr(flops, "matmul_peak", peak)
    main(train_args(data_dir, tmp_path, "--max_steps", "4", "--log_interval", "2", "--amp", "off"))
    logged = [m for m in metrics(run_dirs(tmp_path)[0]) if "mfu" in m]
    assert len(logged) == 2 and all(0 < m["mfu"] <= 1 for m in logged)
    assert len(readings) == 2  # at the start, then once more: when the model first seemed to beat it
    if remeasured > 1e3:
        assert logged[0]["mfu"] == pytest.approx(logged[0]["flops_per_s"] / remeasured)


def test_gradient_accumulation_trains_like_the_whole_batch_at_once(data_dir, tmp_path, monkeypatch):
    """grad_accum k with batch b reads the same sequences as batch k*b in one micro-step (one sampler stream), so in
    fp32 the two runs agree to rounding (~1e-7). The gradient norm before clipping is compared too: AdamW and
    clipping forgive a gradient k times too large (a missing 1/k), so the weights alone would not show it."""
    norms, clip = [], torch.nn.utils.clip_grad_norm_

    def recorded_clip(parameters, max_norm, *args, **kwargs):
        norm = clip(parameters, max_norm, *args, **kwargs)
        norms.append(float(norm))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recorded_clip)
    common = ["--max_steps", "6", "--eval_interval", "100", "--log_interval", "1", "--amp", "off", "--threads", "1"]
    whole = train_args(data_dir, tmp_path / "whole", *common)
    whole[whole.index("--batch_size") + 1] = "4"
    main(whole)
    accumulated = train_args(data_dir, tmp_path / "accum", *common, "--grad_accum", "2")
    accumulated[accumulated.index("--batch_size") + 1] = "2"
    main(accumulated)
    assert len(norms) == 12 and norms[6:] == pytest.approx(norms[:6], rel=1e-5)
    one, two = (metrics(run_dirs(tmp_path / name)[0]) for name in ("whole", "accum"))
    assert [m.get("train_loss") for m in two[1:]] == pytest.approx([m.get("train_loss") for m in one[1:]], rel=1e-5)
    a, b = (load_checkpoint(run_dirs(tmp_path / name)[0] / "last.pt")["model"] for name in ("whole", "accum"))
    difference = math.sqrt(sum(float((a[k] - b[k]).square().sum()) for k in a))
    assert difference < 1e-5 * math.sqrt(sum(float(a[k].square().sum()) for k in a))


# Runs `tinygpt train` under torchrun with what differs between machines faked per rank: the CPU's measured bf16
# speed (rank 0: faster, the others: not), and run folders that are local to each rank ("RANK_DIR" in a flag
# becomes rank0, rank1, ...), as on nodes without a shared file system. Each rank writes the dtype it trains in.
RANK_LOCAL_LAUNCHER = """
import os, sys
from pathlib import Path
from tinygpt.model import flops, hardware, train

rank = int(os.environ["RANK"])
hardware.cpu_bf16_is_faster = lambda: rank == 0
flops.matmul_peak = lambda *args, **kwargs: 1e12  # MFU's yardstick: minutes in bf16 on a CPU without it
choose = train.Trainer._choose_amp

def recorded(self):
    dtype = choose(self)
    Path(sys.argv[1], f"amp-rank{rank}.txt").write_text(str(dtype))
    return dtype

train.Trainer._choose_amp = recorded
train.run_cli(train.main, [arg.replace("RANK_DIR", f"rank{rank}") for arg in sys.argv[2:]])
"""


def test_ranks_take_rank_0s_precision_and_stop_when_they_disagree_about_resuming(data_dir, tmp_path):
    launcher = tmp_path / "launcher.py"
    launcher.write_text(RANK_LOCAL_LAUNCHER)
    args = train_args(data_dir, tmp_path, "--max_steps", "2", "--eval_interval", "2", "--amp", "auto", "--threads", "1")
    args[args.index("--runs_dir") + 1] = str(tmp_path / "RANK_DIR")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher),
               str(tmp_path), *args]
    first = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    # rank 1 measured bf16 as slower, but computes in what rank 0 chose
    assert [(tmp_path / f"amp-rank{r}.txt").read_text() for r in (0, 1)] == ["torch.bfloat16"] * 2
    # only rank 0 writes last.pt: in rank-local folders rank 0 would resume and rank 1 start afresh
    [run_dir] = [p for p in (tmp_path / "rank0").iterdir() if p.is_dir()]
    assert (run_dir / "last.pt").exists() and not list((tmp_path / "rank1").glob("*/last.pt"))
    again = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode != 0
    # each rank says it (its own folder), none hangs in a collective
    assert again.stderr.count("error: the processes disagree about resuming run") == 2, again.stderr[-3000:]
    assert "(rank 0: step 2, rank 1: no last.pt)" in again.stderr


def test_model_fields_added_for_imported_models_leave_a_scratch_runs_fingerprint_as_before(data_dir, tmp_path):
    """n_ff and rope_scaling came with imported models; unset, they are not hashed, so a run folder started by
    an older tinygpt is still found and resumed after an upgrade."""
    main(train_args(data_dir, tmp_path, "--max_steps", "1", "--eval_interval", "1"))
    [run_dir] = run_dirs(tmp_path)
    recorded = json.loads((run_dir / "config.json").read_text())["model"]
    assert not {"n_ff", "rope_scaling"} & set(recorded)
    assert {"vocab_size", "n_layer", "n_embd", "arch", "tie_embeddings"} <= set(recorded)

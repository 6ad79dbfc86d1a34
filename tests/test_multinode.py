"""Two nodes on one machine: two torchrun launchers with `--nnodes 2 --nproc_per_node 1` and a c10d rendezvous on
127.0.0.1, as the README's by-hand lines start them on two machines (and the train rule starts them under SLURM),
train like one process with the same global batch; stopping one launcher stops both nodes at the same step with
the state saved, and the same two commands resume to the uninterrupted two-node run's weights bit for bit."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from test_train import metrics, run_dirs, subprocess_env, train_args, write_token_dir
from test_workflow import copy_project, edit_config
from tinygpt.model.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

SETTINGS = ["--max_steps", "40", "--eval_interval", "20", "--ckpt_interval", "20", "--log_interval", "1",
            "--grad_accum", "2", "--amp", "off", "--threads", "1"]
GLOBAL_BATCH = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_token_dir(tmp_path_factory.mktemp("tokens"))


def with_batch(args: list[str], batch_size: int) -> list[str]:
    args = list(args)
    args[args.index("--batch_size") + 1] = str(batch_size)
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_nodes(data_dir: Path, out_dir: Path) -> list[subprocess.Popen]:
    """Two launchers, one "node" each, half the global batch per process; either may host the rendezvous. Their
    output goes to files (a pipe left unread while waiting for the other launcher could fill up)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", out_dir.name,
                "-m", "tinygpt", "train", *with_batch(train_args(data_dir, out_dir, *SETTINGS), GLOBAL_BATCH // 2)]
    procs = []
    for _ in range(2):
        output = tempfile.TemporaryFile()
        procs.append(subprocess.Popen(launcher, env=subprocess_env(), stdout=output, stderr=subprocess.STDOUT))
        procs[-1].output = output
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    """Each launcher's exit code and output."""
    results = []
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        proc.output.seek(0)
        results.append((proc.returncode, proc.output.read().decode(errors="replace")))
        proc.output.close()
    return results


def run_two_nodes(data_dir: Path, out_dir: Path) -> str:
    output = ""
    for returncode, out in finish(start_two_nodes(data_dir, out_dir)):
        assert returncode == 0, out[-4000:]
        output += out
    return output


def test_two_nodes_train_like_one_process_and_resume_after_a_stop(data_dir, tmp_path):
    """One test, as the uninterrupted two-node run serves both halves (pytest-xdist would run a module fixture
    once per worker)."""
    whole, single, stopped = tmp_path / "whole", tmp_path / "single", tmp_path / "stopped"
    run_two_nodes(data_dir, whole)
    subprocess.run([sys.executable, "-m", "tinygpt", "train",
                    *with_batch(train_args(data_dir, single, *SETTINGS), GLOBAL_BATCH)],
                   env=subprocess_env(), check=True, capture_output=True)
    one, two = metrics(run_dirs(single)[0]), metrics(run_dirs(whole)[0])
    assert [m["step"] for m in one] == [m["step"] for m in two] == list(range(41))
    assert two[0]["val_loss"] == pytest.approx(one[0]["val_loss"], rel=1e-5)  # step 0: the untrained model
    one, two = one[1:], two[1:]
    # the same batches, summed in another order: equal to float rounding, which grows a little step by step
    assert [m["train_loss"] for m in two] == pytest.approx([m["train_loss"] for m in one], rel=1e-4)
    assert [m["train_loss"] for m in two[:6]] == pytest.approx([m["train_loss"] for m in one[:6]], rel=1e-5)
    val_one, val_two = ([m["val_loss"] for m in run if "val_loss" in m] for run in (one, two))
    assert len(val_one) == 2 and val_two == pytest.approx(val_one, rel=1e-4)

    # SIGTERM to one launcher (Ctrl-C, or a scheduler, on one machine): torchrun passes it to its training
    # process, all processes agree to stop after the same step (the per-step all-reduce), rank 0 saves last.pt.
    procs = start_two_nodes(data_dir, stopped)
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size for p in (stopped / "runs").glob("*/metrics.jsonl")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no training progress"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    results = finish(procs)
    assert all(returncode != 0 for returncode, _ in results), results
    output = "".join(out for _, out in results)
    [run_dir] = run_dirs(stopped)
    stopped_at = load_checkpoint(run_dir / "last.pt")["step"]
    assert f"stopped by SIGTERM at step {stopped_at}" in output and 0 < stopped_at < 40, output[-4000:]
    assert not (stopped / "best.pt").exists()
    # The same two commands resume to the uninterrupted run's weights.
    assert f"resuming run {run_dir} from step {stopped_at}" in run_two_nodes(data_dir, stopped)
    a, b = load_checkpoint(whole / "best.pt"), load_checkpoint(stopped / "best.pt")
    assert a["step"] == b["step"] and a["val_loss"] == b["val_loss"]
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in a["model"])
    assert [m["train_loss"] for m in metrics(run_dir)[1:]] == [m["train_loss"] for m in two]


def test_more_than_one_node_without_slurm_is_refused_with_the_way_to_run_it(data_dir, tmp_path):
    """train.nodes > 1 needs a launcher on each node: outside a SLURM allocation the train rule says how."""
    project = copy_project(tmp_path)
    edit_config(project, "train", "nodes", 2)
    for name, folder in (("tokenizer.json", "data/tokenizer"), ("train.bin", "data/tokens"),
                         ("val.bin", "data/tokens"), ("meta.json", "data/tokens")):
        (project / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / name, project / folder / name)
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("SLURM_")}
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "checkpoints/best.pt"], cwd=project,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    log = (project / "logs" / "train.log").read_text()
    assert log.startswith("train.nodes: 2 needs a SLURM allocation: run snakemake with --workflow-profile "
                          "workflow/profiles/slurm, or start torchrun on each machine by hand (README)"), log
    assert not (project / "checkpoints" / "best.pt").exists()

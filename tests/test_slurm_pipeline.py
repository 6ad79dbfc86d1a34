"""The SLURM profile really run: the tiny pipeline through `snakemake --workflow-profile workflow/profiles/slurm` on
a real two-node SLURM cluster on this machine (tests/slurm_cluster.py), beside the same pipeline run locally.

Every rule but download (a localrule) runs as a SLURM job; the results equal the local run's byte for byte (the
tokenizer and tokens) and tensor for tensor (the final checkpoint, on CPU), although the training job was told to
stop once (SIGUSR1 to its job step, what the profile's --signal=USR1@120 does before the time limit): it saved
last.pt and exited 75, and the profile's retries resubmitted it, which resumed. Training runs as two processes
(train.gpus: 2, torchrun on one node); with train.nodes: 2 and one process per node the train rule starts one
torchrun per node (c10d rendezvous on the first node), and the weights are the same again.

Skipped where `slurmctld` is not installed (apt-get install slurmctld slurmd slurmdbd munge mariadb-server); needs
snakemake-executor-plugin-slurm (`pip install -e ".[slurm]"`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from slurm_cluster import SlurmCluster, local_slurm
from test_workflow import ROOT, copy_project, edit_config

pytestmark = pytest.mark.slow

TARGET = "checkpoints/best.pt"
SLURM_RULES = ["clean", "train_bpe", "encode", "train"]  # what TARGET needs, download aside (a localrule)
# Two processes (torchrun on one node, DistributedDataParallel with gloo) of half the tiny batch; long enough that a
# stop sent when training starts lands mid-run, also on a fast machine.
TRAIN = {"device": "cpu", "gpus": 2, "batch_size": 2, "max_steps": 40, "eval_interval": 20, "ckpt_interval": 20}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> SlurmCluster:
    with local_slurm(tmp_path_factory.mktemp("slurm"), nodes=2) as cluster:
        yield cluster


def slurm_profile(cluster: SlurmCluster, dest: Path) -> Path:
    """workflow/profiles/slurm with what belongs to a cluster set for this one: account and partitions (the
    placeholders a user edits), memory, time and threads a 2-CPU node grants, status checks after 2 s instead of
    40 s, and one retry of the train rule (the one stop this test makes) so that a broken run fails soon."""
    profile = yaml.safe_load((ROOT / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    profile["default-resources"].update(slurm_account=cluster.account, slurm_partition=cluster.partition,
                                        runtime=10, mem_mb=1000)
    profile["set-resources"]["train"].update(slurm_partition=cluster.partition, runtime=10, mem_mb=1000)
    cpus = len(os.sched_getaffinity(0))
    profile["set-threads"] = {rule: min(threads, cpus) for rule, threads in profile["set-threads"].items()}
    profile.update({"slurm-init-seconds-before-status-checks": 2, "latency-wait": 5, "preemptible-retries": 1})
    dest.mkdir(parents=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


def start_snakemake(workdir: Path, env: dict, *args: str) -> subprocess.Popen:
    log = open(workdir / "snakemake.out", "w")
    return subprocess.Popen([sys.executable, "-m", "snakemake", *args, TARGET], cwd=workdir,
                            env={**env, "TINYGPT_NO_PROGRESS": "1"}, stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, workdir: Path, cluster: SlurmCluster, timeout: float = 400) -> None:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    out = (workdir / "snakemake.out").read_text()
    assert proc.returncode == 0, f"snakemake in {workdir} exited {proc.returncode}:\n{out[-6000:]}\n{cluster.log_tails()}"


def metrics(workdir: Path) -> list[dict]:
    """metrics.jsonl of the run folder the final checkpoint came from."""
    run_dir = workdir / "checkpoints" / "runs" / torch.load(workdir / TARGET, weights_only=True)["run"]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def stop_training_once_started(workdir: Path, cluster: SlurmCluster, timeout: float = 300) -> str:
    """Wait until the train job starts its steps (the "model: ..." line in the rule's log), then SIGUSR1 to the
    job's steps (not the batch shell, as the profile's --signal does); returns the job id."""
    log = workdir / "logs" / "train.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and "model: " in log.read_text():
            jobs = cluster.run("squeue", "--noheader", "--format=%i %k").stdout.split("\n")
            [job_id] = [line.split()[0] for line in jobs if line.split()[1:] == ["rule_train"]]
            cluster.run("scancel", "--signal=USR1", job_id)
            return job_id
        time.sleep(0.1)
    raise AssertionError(f"no training progress in {workdir} after {timeout} s\n{cluster.log_tails()}")


def slurm_jobs(cluster: SlurmCluster) -> list[dict]:
    """Every job and step sacct knows, oldest first: id, the plugin's comment (rule_<name>), state, exit code."""
    fields = ["JobID", "Comment", "State", "ExitCode", "NNodes", "NTasks"]
    out = cluster.run("sacct", "--allusers", "--starttime", "now-1hours", "--noheader", "--parsable2",
                      f"--format={','.join(fields)}").stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line]


@dataclass
class Runs:
    local: Path
    slurm: Path
    stopped_job: str
    seconds: float


@pytest.fixture(scope="module")
def runs(slurm, tmp_path_factory) -> Runs:
    """The tiny pipeline to the final checkpoint twice at the same time (most of the SLURM run is waiting):
    locally, and through the SLURM profile, whose training job is told to stop once it has started."""
    folders = {}
    for name in ("local", "slurm"):
        folders[name] = copy_project(tmp_path_factory.mktemp(name))
        for key, value in TRAIN.items():
            edit_config(folders[name], "train", key, value)
    profile = slurm_profile(slurm, tmp_path_factory.mktemp("profile") / "slurm")
    start = time.monotonic()
    local = start_snakemake(folders["local"], os.environ, "--cores", "2")
    remote = start_snakemake(folders["slurm"], slurm.env, "--workflow-profile", str(profile))
    try:
        stopped = stop_training_once_started(folders["slurm"], slurm)
        finish(remote, folders["slurm"], slurm)
        finish(local, folders["local"], slurm)
    finally:
        for proc in (local, remote):
            if proc.poll() is None:
                proc.kill()
    seconds = time.monotonic() - start
    print(f"local and SLURM pipelines to {TARGET}: {seconds:.0f} s")
    return Runs(folders["local"], folders["slurm"], stopped, seconds)


def test_every_rule_but_download_ran_as_a_slurm_job(runs, slurm):
    jobs = [job for job in slurm_jobs(slurm) if "." not in job["JobID"]]
    completed = [job["Comment"] for job in jobs if job["State"] == "COMPLETED"]
    assert sorted(completed) == sorted(f"rule_{rule}" for rule in SLURM_RULES)
    assert [job["Comment"] for job in jobs if job["State"] != "COMPLETED"] == ["rule_train"]  # the stopped one
    assert "Job stats" in (runs.slurm / "snakemake.out").read_text()


def test_results_equal_the_local_run(runs):
    for path in ["data/clean/corpus.txt", "data/tokenizer/tokenizer.json", "data/tokens/train.bin",
                 "data/tokens/val.bin", "data/tokens/meta.json"]:
        assert (runs.slurm / path).read_bytes() == (runs.local / path).read_bytes(), path
    ours, theirs = (torch.load(run / TARGET, weights_only=True) for run in (runs.slurm, runs.local))
    assert ours["step"] == theirs["step"] == TRAIN["max_steps"] and ours["val_loss"] == theirs["val_loss"]
    assert ours["model"].keys() == theirs["model"].keys()
    assert all(torch.equal(ours["model"][name], theirs["model"][name]) for name in theirs["model"])


def test_stopped_training_saved_and_its_retry_resumed(runs, slurm):
    by_id = {job["JobID"]: job for job in slurm_jobs(slurm)}
    stopped, step = by_id[runs.stopped_job], by_id[f"{runs.stopped_job}.0"]
    assert (stopped["Comment"], stopped["State"]) == ("rule_train", "FAILED")
    assert step["State"] == "FAILED"  # the srun step: torchrun exits 1 when its processes exit 75
    log = (runs.slurm / ".snakemake" / "slurm_logs" / "rule_train" / f"{runs.stopped_job}.log").read_text()
    assert "stopped by SIGUSR1 at step" in log and "run the same command to resume" in log
    stopped_at = int(log.split("stopped by SIGUSR1 at step ")[1].split(",")[0])
    assert 0 < stopped_at < TRAIN["max_steps"]
    assert f"from step {stopped_at}\n" in (runs.slurm / "logs" / "train.log").read_text()  # the retry's log
    # The retry continued the same run folder: every logged step once, with the local run's losses exactly.
    ours, theirs = metrics(runs.slurm), metrics(runs.local)
    assert [m["step"] for m in ours] == [m["step"] for m in theirs]
    assert [m["train_loss"] for m in ours] == [m["train_loss"] for m in theirs]
    assert [m.get("val_loss") for m in ours] == [m.get("val_loss") for m in theirs]


def test_two_nodes_under_slurm_equal_two_processes_on_one(runs, slurm, tmp_path):
    """train.nodes: 2 with one process each: one torchrun per node in one SLURM job, c10d rendezvous on the first
    node; the same two ranks with the same batches as the one-node run's two processes, so the same weights."""
    project = tmp_path / "project"
    shutil.copytree(runs.slurm, project, symlinks=True, copy_function=shutil.copy2)
    for folder in (".snakemake/slurm_logs", "checkpoints", "logs"):  # the one-node job's logs and run folder
        shutil.rmtree(project / folder)
    edit_config(project, "train", "nodes", 2)
    edit_config(project, "train", "gpus", 1)
    profile = slurm_profile(slurm, tmp_path / "profile" / "slurm")
    before = {job["JobID"] for job in slurm_jobs(slurm)}
    finish(start_snakemake(project, slurm.env, "--workflow-profile", str(profile)), project, slurm)
    jobs = {job["JobID"]: job for job in slurm_jobs(slurm) if job["JobID"] not in before}
    [job_id] = [job_id for job_id in jobs if "." not in job_id]
    assert (jobs[job_id]["Comment"], jobs[job_id]["State"], jobs[job_id]["NNodes"]) == ("rule_train", "COMPLETED", "2")
    assert (jobs[f"{job_id}.0"]["NNodes"], jobs[f"{job_id}.0"]["NTasks"]) == ("2", "2")  # one torchrun per node
    ours, theirs = (torch.load(run / TARGET, weights_only=True) for run in (project, runs.local))
    assert ours["step"] == theirs["step"] and ours["val_loss"] == theirs["val_loss"]
    assert all(torch.equal(ours["model"][name], theirs["model"][name]) for name in theirs["model"])
    assert [m["train_loss"] for m in metrics(project)] == [m["train_loss"] for m in metrics(runs.local)]

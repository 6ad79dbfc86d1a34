"""The SLURM profile really run: the tiny pipeline through `snakemake --workflow-profile workflow/profiles/slurm` on
a real two-node SLURM cluster on this machine (tests/slurm_cluster.py), beside the same pipeline run locally.

Every rule but download (a localrule) runs as a SLURM job; the results equal the local run's byte for byte (the
tokenizer and tokens) and tensor for tensor (the final checkpoint, on CPU), although the training job was told to
stop once (SIGUSR1 to its job step, what the profile's --signal=USR1@120 does before the time limit): it saved
last.pt and exited 75, and the profile's retries resubmitted it, which resumed. With train.nodes: 2 the train rule
starts one torchrun per node (c10d rendezvous on the first node) and follows the one-process run's losses.

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
# Long enough that a stop sent once the first metrics line is written lands mid-run, also on a fast machine.
TRAIN = {"device": "cpu", "max_steps": 100, "eval_interval": 50, "ckpt_interval": 50}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> SlurmCluster:
    with local_slurm(tmp_path_factory.mktemp("slurm"), nodes=2) as cluster:
        yield cluster


def slurm_profile(cluster: SlurmCluster, dest: Path, train_threads: int | None = None) -> Path:
    """workflow/profiles/slurm with what belongs to a cluster set for this one: account and partitions (the
    placeholders a user edits), memory, time and threads a 2-CPU node grants, status checks after 5 s instead of
    40 s, and one retry of the train rule (the one stop this test makes) so that a broken run fails soon."""
    profile = yaml.safe_load((ROOT / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    profile["default-resources"].update(slurm_account=cluster.account, slurm_partition=cluster.partition,
                                        runtime=10, mem_mb=1000)
    profile["set-resources"]["train"].update(slurm_partition=cluster.partition, runtime=10, mem_mb=1000)
    cpus = len(os.sched_getaffinity(0))
    profile["set-threads"] = {rule: min(threads, cpus) for rule, threads in profile["set-threads"].items()}
    if train_threads:
        profile["set-threads"]["train"] = train_threads
    profile.update({"slurm-init-seconds-before-status-checks": 5, "latency-wait": 5, "preemptible-retries": 1})
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
    """Wait until the train job has logged its first steps, then SIGUSR1 to its steps (not the batch shell, as
    the profile's --signal does); returns the job id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = workdir / "checkpoints" / "runs"
        if runs.is_dir() and any(p.stat().st_size for p in runs.glob("*/metrics.jsonl")):
            jobs = cluster.run("squeue", "--noheader", "--format=%i %k").stdout.split("\n")
            [job_id] = [line.split()[0] for line in jobs if line.split()[1:] == ["rule_train"]]
            cluster.run("scancel", "--signal=USR1", job_id)
            return job_id
        time.sleep(0.1)
    raise AssertionError(f"no training progress in {workdir} after {timeout} s\n{cluster.log_tails()}")


def slurm_jobs(cluster: SlurmCluster) -> list[dict]:
    """Every job and step sacct knows, oldest first: id, the plugin's comment (rule_<name>), state, exit code."""
    fields = ["JobID", "Comment", "State", "ExitCode", "NNodes", "NTasks", "NodeList"]
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
    assert step["ExitCode"] == "75:0"  # training's own exit code reached SLURM through srun
    log = (runs.slurm / ".snakemake" / "slurm_logs" / "rule_train" / f"{runs.stopped_job}.log").read_text()
    assert "stopped by SIGUSR1 at step" in log and "run the same command to resume" in log
    stopped_at = int(log.split("stopped by SIGUSR1 at step ")[1].split(",")[0])
    assert 0 < stopped_at < TRAIN["max_steps"]
    # The retry continued the same run folder: every logged step once, with the local run's losses exactly.
    ours, theirs = metrics(runs.slurm), metrics(runs.local)
    assert [m["step"] for m in ours] == [m["step"] for m in theirs]
    assert [m["train_loss"] for m in ours] == [m["train_loss"] for m in theirs]
    assert [m.get("val_loss") for m in ours] == [m.get("val_loss") for m in theirs]


def test_two_nodes_under_slurm_follow_the_one_process_run(runs, slurm, tmp_path):
    """train.nodes: 2 with half the batch per process: one torchrun per node in one SLURM job (gloo on CPU), stopped
    once and resumed like the one-node run, with the one-process run's losses: to 1e-4 up to the first validation
    (the stop and resume included), later to 1e-2, as rounding differences grow step by step (1e-3 by step 80)."""
    project = tmp_path / "project"
    shutil.copytree(runs.slurm, project, symlinks=True, copy_function=shutil.copy2)
    for folder in (".snakemake/slurm_logs", "checkpoints"):  # the one-node job's logs and run folder
        shutil.rmtree(project / folder)
    edit_config(project, "train", "nodes", 2)
    batch_size = yaml.safe_load((runs.local / "config.yaml").read_text())["train"]["batch_size"]
    edit_config(project, "train", "batch_size", batch_size // 2)
    # one thread per training process: the two "nodes" share this machine's CPUs
    profile = slurm_profile(slurm, tmp_path / "profile" / "slurm", train_threads=1)
    proc = start_snakemake(project, slurm.env, "--workflow-profile", str(profile))
    try:
        stopped = stop_training_once_started(project, slurm)
        finish(proc, project, slurm)
    finally:
        if proc.poll() is None:
            proc.kill()
    by_id = {job["JobID"]: job for job in slurm_jobs(slurm)}
    resumed = [job for job_id, job in by_id.items() if "." not in job_id and int(job_id) > int(stopped)]
    assert [(job["Comment"], job["State"]) for job in resumed] == [("rule_train", "COMPLETED")]
    for job_id in (stopped, resumed[0]["JobID"]):
        assert by_id[job_id]["NNodes"] == "2" and by_id[f"{job_id}.0"]["NTasks"] == "2", by_id[job_id]
    assert by_id[stopped]["State"] == "FAILED"
    log = (project / ".snakemake" / "slurm_logs" / "rule_train" / f"{stopped}.log").read_text()
    stopped_at = int(log.split("stopped by SIGUSR1 at step ")[1].split(",")[0])
    first_eval = TRAIN["eval_interval"]
    assert 0 < stopped_at < first_eval, "the stop came too late to check the resumed steps closely"
    two, one = metrics(project), metrics(runs.local)
    assert [m["step"] for m in two] == [m["step"] for m in one]
    for tolerance, part in ((1e-4, lambda m: m["step"] <= first_eval), (1e-2, lambda m: m["step"] > first_eval)):
        for key in ("train_loss", "val_loss"):
            ours, theirs = ([m[key] for m in run if part(m) and key in m] for run in (two, one))
            assert len(ours) == len(theirs) > 0 and ours == pytest.approx(theirs, rel=tolerance), (key, tolerance)

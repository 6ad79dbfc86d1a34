"""The SLURM profile really run: the tiny pipeline through `snakemake --workflow-profile workflow/profiles/slurm` on
a real two-node SLURM cluster on this machine (tests/slurm_cluster.py), beside the same pipeline run locally.

Every rule but download (a localrule) runs as a SLURM job; the results equal the local run's byte for byte (the
tokenizer and tokens) and tensor for tensor (the final checkpoint, on CPU), although the training job was told to
stop once (SIGUSR1 to its job step, what the profile's --signal=USR1@120 does before the time limit): it saved
last.pt and stopped, the job requeued itself (same job id), and its second start resumed. A deterministic failure
(a setting training refuses) is submitted once and fails with its message: nothing retries it. Training runs as two processes
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
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from slurm_cluster import SlurmCluster, local_slurm
from test_workflow import ROOT, copy_project, edit_config

pytestmark = pytest.mark.slow

TARGET = "checkpoints/best.pt"
SLURM_RULES = ["clean", "train_bpe", "encode", "train"]  # what TARGET needs, download aside (a localrule)
# Two processes (torchrun on one node, DistributedDataParallel with gloo) of half the tiny batch; long enough that a
# stop sent when training starts lands mid-run, also on a fast machine. amp pinned: `auto` measures at each start,
# and the two runs compared bit for bit could choose differently under load.
TRAIN = {"device": "cpu", "gpus": 2, "batch_size": 2, "max_steps": 40, "eval_interval": 20, "ckpt_interval": 20,
         "amp": "off"}


@pytest.fixture
def slurm(tmp_path_factory) -> SlurmCluster:
    with local_slurm(tmp_path_factory.mktemp("slurm"), nodes=2) as cluster:
        yield cluster


def slurm_profile(cluster: SlurmCluster, dest: Path) -> Path:
    """workflow/profiles/slurm with what belongs to a cluster set for this one: account and partitions (the
    placeholders a user edits), memory, time and threads a 2-CPU node grants, status checks after 2 s instead of
    40 s."""
    profile = yaml.safe_load((ROOT / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    profile["default-resources"].update(slurm_account=cluster.account, slurm_partition=cluster.partition,
                                        runtime=10, mem_mb=1000)
    profile["set-resources"]["train"].update(slurm_partition=cluster.partition, runtime=10, mem_mb=1000)
    cpus = len(os.sched_getaffinity(0))
    profile["set-threads"] = {rule: min(threads, cpus) for rule, threads in profile["set-threads"].items()}
    profile.update({"slurm-init-seconds-before-status-checks": 2, "latency-wait": 5})
    dest.mkdir(parents=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


def start_snakemake(workdir: Path, env: dict, *args: str) -> subprocess.Popen:
    with open(workdir / "snakemake.out", "w") as log:
        return subprocess.Popen([sys.executable, "-m", "snakemake", *args, TARGET], cwd=workdir,
                                env={**env, "TINYGPT_NO_PROGRESS": "1"}, stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, workdir: Path, cluster: SlurmCluster, timeout: float = 900) -> None:
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


def stop_training_once_started(workdir: Path, cluster: SlurmCluster, timeout: float = 900) -> str:
    """Wait until the train job starts its steps (the "model: ..." line in the rule's log), then SIGUSR1 to the
    job's steps (not the batch shell, as the profile's --signal does); returns the job id. The wait covers the
    stages before training too (minutes on a loaded 2-core machine)."""
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


def slurm_jobs(cluster: SlurmCluster, *options: str) -> list[dict]:
    """Every job and step sacct knows, oldest first: id, the plugin's comment (rule_<name>), state, exit code.
    `--duplicates` adds each earlier start of a requeued job."""
    fields = ["JobID", "Comment", "State", "ExitCode", "NNodes", "NTasks"]
    out = cluster.run("sacct", "--allusers", "--starttime", "now-1hours", "--noheader", "--parsable2",
                      f"--format={','.join(fields)}", *options).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line]


def run_both(cluster: SlurmCluster, tmp_path: Path) -> tuple[Path, Path, str]:
    """The tiny pipeline to the final checkpoint twice at the same time (most of the SLURM run is waiting):
    locally, and through the SLURM profile, whose training job is told to stop once it has started. Returns the
    two project folders and the stopped job's id."""
    folders = {}
    for name in ("local", "slurm"):
        (tmp_path / name).mkdir()
        folders[name] = copy_project(tmp_path / name)
        for key, value in TRAIN.items():
            edit_config(folders[name], "train", key, value)
    profile = slurm_profile(cluster, tmp_path / "profile" / "slurm")
    # (not inside an allocation of some other SLURM that runs these tests: the train rule would srun into it)
    outside_slurm = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "SBATCH_"))}
    local = start_snakemake(folders["local"], outside_slurm, "--cores", "2")
    remote = start_snakemake(folders["slurm"], cluster.env, "--workflow-profile", str(profile))
    try:
        stopped = stop_training_once_started(folders["slurm"], cluster)
        finish(remote, folders["slurm"], cluster)
        finish(local, folders["local"], cluster)
    finally:
        for proc in (local, remote):
            if proc.poll() is None:
                proc.kill()
    return folders["local"], folders["slurm"], stopped


def check_every_rule_but_download_ran_as_a_slurm_job(cluster: SlurmCluster) -> None:
    jobs = [job for job in slurm_jobs(cluster) if "." not in job["JobID"]]
    completed = [job["Comment"] for job in jobs if job["State"] == "COMPLETED"]
    assert sorted(completed) == sorted(f"rule_{rule}" for rule in SLURM_RULES)
    assert [job["Comment"] for job in jobs if job["State"] != "COMPLETED"] == []  # the stopped one requeued itself


def check_same_results(ours: Path, theirs: Path, paths=("data/clean/corpus.txt", "data/tokenizer/tokenizer.json",
                       "data/tokens/train.bin", "data/tokens/val.bin", "data/tokens/meta.json")) -> None:
    """The same bytes, the same final weights, the same losses at every logged step."""
    for path in paths:
        assert (ours / path).read_bytes() == (theirs / path).read_bytes(), path
    a, b = (torch.load(run / TARGET, weights_only=True) for run in (ours, theirs))
    assert a["step"] == b["step"] == TRAIN["max_steps"] and a["val_loss"] == b["val_loss"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in b["model"])
    ours_metrics, theirs_metrics = metrics(ours), metrics(theirs)  # every logged step once, after the resume too
    assert [m["step"] for m in ours_metrics] == [m["step"] for m in theirs_metrics]
    for key in ("train_loss", "val_loss"):
        assert [m.get(key) for m in ours_metrics] == [m.get(key) for m in theirs_metrics], key


def check_stopped_and_resumed(cluster: SlurmCluster, project: Path, job_id: str) -> int:
    """The stopped job put itself back in the queue (only the train launcher requeues, and only when training
    stopped on request), and its second start, the same job id, resumed from the step the stop saved. (The first
    start's output is not kept: logs/train.log holds the second start's, and the executor removes the SLURM log
    of a job that succeeded.)"""
    starts = [job for job in slurm_jobs(cluster, "--duplicates") if job["JobID"] == job_id]
    assert [(job["Comment"], job["State"]) for job in starts] == [("rule_train", "REQUEUED"), ("rule_train", "COMPLETED")]
    log = (project / "logs" / "train.log").read_text()
    assert log.count("resuming run ") == 1
    stopped_at = int(log.split("resuming run ")[1].split(" from step ")[1].split()[0])
    assert 0 < stopped_at < TRAIN["max_steps"]
    assert not list((project / ".snakemake").glob("train-stopped-*"))  # the launcher's marker, removed
    return stopped_at


def two_nodes(cluster: SlurmCluster, built: Path, tmp_path: Path) -> Path:
    """The built project again with train.nodes: 2 and one process per node: only training reruns, as one SLURM
    job of two nodes, one torchrun each."""
    project = tmp_path / "two_nodes"
    shutil.copytree(built, project, symlinks=True, copy_function=shutil.copy2)
    for folder in (".snakemake/slurm_logs", "checkpoints", "logs"):  # the one-node job's logs and run folder
        shutil.rmtree(project / folder, ignore_errors=True)  # (the executor removes a succeeded job's log)
    edit_config(project, "train", "nodes", 2)
    edit_config(project, "train", "gpus", 1)
    profile = slurm_profile(cluster, tmp_path / "profile2" / "slurm")
    before = {job["JobID"] for job in slurm_jobs(cluster)}
    finish(start_snakemake(project, cluster.env, "--workflow-profile", str(profile)), project, cluster)
    jobs = {job["JobID"]: job for job in slurm_jobs(cluster) if job["JobID"] not in before}
    [job_id] = [job_id for job_id in jobs if "." not in job_id]
    assert (jobs[job_id]["Comment"], jobs[job_id]["State"], jobs[job_id]["NNodes"]) == ("rule_train", "COMPLETED", "2")
    assert (jobs[f"{job_id}.0"]["NNodes"], jobs[f"{job_id}.0"]["NTasks"]) == ("2", "2")  # one torchrun per node
    return project


def check_a_deterministic_failure_is_submitted_once(cluster: SlurmCluster, built: Path, tmp_path: Path) -> None:
    """Validation tokens training refuses (ids beyond the vocabulary, as from another tokenizer): one train job,
    failed, its message in the log; no resubmission (the old profile retried any failure of the train rule 20
    times). (A bad setting would be refused before any job, by the config checks.)"""
    project = tmp_path / "refused"
    shutil.copytree(built, project, symlinks=True, copy_function=shutil.copy2)
    np.full(100, 5000, dtype=np.uint16).tofile(project / "data" / "tokens" / "val.bin")  # newer: train reruns
    profile = slurm_profile(cluster, tmp_path / "profile3" / "slurm")
    before = {job["JobID"] for job in slurm_jobs(cluster)}
    proc = start_snakemake(project, cluster.env, "--workflow-profile", str(profile))
    proc.wait(timeout=300)
    assert proc.returncode != 0
    jobs = [job for job in slurm_jobs(cluster, "--duplicates") if job["JobID"] not in before and "." not in job["JobID"]]
    assert [(job["Comment"], job["State"]) for job in jobs] == [("rule_train", "FAILED")]
    assert "val.bin holds token id 5000, beyond vocab_size" in (project / "logs" / "train.log").read_text()


def test_slurm_profile_builds_what_a_local_run_builds_and_resumes_a_stopped_training(slurm, tmp_path):
    """One test, as its runs are shared: pytest-xdist would run a module fixture once per worker."""
    start = time.monotonic()
    local, remote, stopped_job = run_both(slurm, tmp_path)
    both = time.monotonic()
    check_every_rule_but_download_ran_as_a_slurm_job(slurm)
    check_stopped_and_resumed(slurm, remote, stopped_job)
    check_same_results(remote, local)
    # Two nodes of one process each: the same two ranks with the same batches as the two processes on one node.
    check_same_results(two_nodes(slurm, remote, tmp_path), local)
    check_a_deterministic_failure_is_submitted_once(slurm, remote, tmp_path)
    print(f"local and SLURM pipelines: {both - start:.0f} s; two-node training: {time.monotonic() - both:.0f} s")

"""A real one-node SLURM cluster (tests/slurm_cluster.py): jobs run, `sacct` reports their states the way the
Snakemake SLURM executor asks for them, signals reach jobs, and `snakemake --executor slurm` runs a workflow.

Skipped where `slurmctld` is not installed (apt-get install slurmctld slurmd slurmdbd munge mariadb-server); the
Snakemake tests also need snakemake-executor-plugin-slurm (`pip install -e ".[slurm]"`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, local_slurm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> SlurmCluster:
    """One cluster for this module (it takes ~10 s to start); each test uses its own job names and folders."""
    with local_slurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def wait_for(condition, timeout: float, what: str, cluster: SlurmCluster, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{cluster.log_tails()}")


def sacct_states(cluster: SlurmCluster, name: str) -> dict[str, str]:
    """Job id -> state for the jobs called `name`: the query snakemake-executor-plugin-slurm makes
    (query_job_status_sacct in its job_status_query.py), with the run's UUID as the job name."""
    starttime = f"{datetime.now() - timedelta(days=2):%Y-%m-%dT%H:00}"
    out = cluster.run(
        "sacct", "-X", "--parsable2", "--clusters", "all", "--noheader", "--format=JobIdRaw,State",
        "--starttime", starttime, "--endtime", "now", "--name", name,
    ).stdout
    return dict(line.split("|")[:2] for line in out.splitlines() if line.strip())


def job_state(cluster: SlurmCluster, job_id: str) -> str:
    return cluster.run("squeue", "--noheader", "--states=all", "--jobs", job_id, "--format=%T").stdout.strip()


def test_srun_runs_on_the_node(slurm):
    assert slurm.startup_seconds < 30
    assert slurm.run("srun", "hostname").stdout.strip() == slurm.node
    assert slurm.run("sinfo", "--noheader", "--format=%P %t").stdout.split() == [f"{slurm.partition}*", "idle"]


def test_sbatch_job_completes_and_sacct_reports_it(slurm, tmp_path):
    name = uuid.uuid4().hex
    out = tmp_path / "out.txt"
    job_id = slurm.run(
        "sbatch", "--parsable", f"--job-name={name}", f"--account={slurm.account}", f"--partition={slurm.partition}",
        f"--output={tmp_path / 'slurm-%j.out'}", "--wrap", f"echo hello from $SLURM_JOB_ID > {out}",
    ).stdout.strip()
    # slurmctld hands the job record to slurmdbd asynchronously: sacct may lag squeue by a second or two.
    wait_for(lambda: sacct_states(slurm, name).get(job_id) == "COMPLETED", 30, f"{job_id} COMPLETED in sacct", slurm)
    assert out.read_text() == f"hello from {job_id}\n"
    fields = slurm.run("sacct", "-j", job_id, "-X", "--noheader", "--parsable2",
                       "--format=State,ExitCode,Account,Partition").stdout.split("|")
    assert [f.strip() for f in fields] == ["COMPLETED", "0:0", slurm.account, slurm.partition]


def test_failed_job_is_reported_failed(slurm, tmp_path):
    name = uuid.uuid4().hex
    job_id = slurm.run("sbatch", "--parsable", f"--job-name={name}", f"--output={tmp_path / 'slurm-%j.out'}",
                       "--wrap", "exit 3").stdout.strip()
    wait_for(lambda: sacct_states(slurm, name).get(job_id) == "FAILED", 30, f"job {job_id} FAILED in sacct", slurm)


def test_unknown_account_is_refused(slurm):
    result = slurm.run("sbatch", "--account=no_such_account", "--wrap", "true", check=False)
    assert result.returncode != 0
    assert "Invalid account" in result.stderr


TRAP_SCRIPT = """\
#!/bin/bash
# Writes `ready` once the trap is set, and `got_usr1` when SIGUSR1 arrives.
trap 'echo USR1 > {folder}/got_usr1; exit 0' USR1
touch {folder}/ready
sleep 120 & wait $!
"""


def submit_trap_job(slurm: SlurmCluster, folder: Path, *sbatch_args: str, in_step: bool = False) -> str:
    script = folder / "trap.sh"
    script.write_text(TRAP_SCRIPT.format(folder=folder))
    script.chmod(0o755)
    # As the batch script itself (not under --wrap, whose sh would take the signal), or as an srun step.
    job = ["--wrap", f"srun {script}"] if in_step else [str(script)]
    job_id = slurm.run("sbatch", "--parsable", f"--output={folder / 'slurm-%j.out'}", *sbatch_args,
                       *job).stdout.strip()
    wait_for(lambda: (folder / "ready").exists(), 30, f"job {job_id} to set its trap", slurm, interval=0.2)
    return job_id


def test_scancel_signal_reaches_the_batch_script(slurm, tmp_path):
    job_id = submit_trap_job(slurm, tmp_path)
    # Without --batch, scancel signals only the job's steps (srun), not the batch shell.
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    wait_for(lambda: (tmp_path / "got_usr1").exists(), 15, "USR1 in the batch script", slurm, interval=0.2)
    wait_for(lambda: job_state(slurm, job_id) == "COMPLETED", 15, f"job {job_id} to complete", slurm)


def test_scancel_signal_reaches_a_job_step(slurm, tmp_path):
    """The Snakemake jobstep executor runs each rule as an `srun` step inside the batch job."""
    job_id = submit_trap_job(slurm, tmp_path, in_step=True)
    slurm.run("scancel", "--signal=USR1", job_id)
    wait_for(lambda: (tmp_path / "got_usr1").exists(), 15, "USR1 in the job step", slurm, interval=0.2)
    wait_for(lambda: job_state(slurm, job_id) == "COMPLETED", 15, f"job {job_id} to complete", slurm)


def test_time_limit_warning_signal_reaches_the_job_steps_only(slurm, tmp_path):
    """`--signal=USR1@50` on a 1-minute job (as the slurm profile asks for training, without `B:`): slurmctld
    checks time limits every 30 s, so the signal comes between 10 and ~40 s after the start, to the job's steps;
    the batch shell (a plain sh under --wrap, which USR1 would kill) is spared, and the job completes."""
    start = time.monotonic()
    job_id = submit_trap_job(slurm, tmp_path, "--time=1", "--signal=USR1@50", in_step=True)
    wait_for(lambda: (tmp_path / "got_usr1").exists(), 50, "USR1 before the time limit", slurm, interval=0.5)
    assert time.monotonic() - start < 60
    wait_for(lambda: job_state(slurm, job_id) == "COMPLETED", 15, f"job {job_id} to complete", slurm)


SNAKEFILE = """\
rule all:
    input: "a.txt", "b.txt"

rule a:
    output: "a.txt"
    shell: "echo a from $SLURM_JOB_ID > {output}"

rule b:
    output: "b.txt"
    shell: "echo b from $SLURM_JOB_ID > {output}"
"""


def snakemake_slurm(cluster: SlurmCluster, workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    """`snakemake --executor slurm` on a two-rule workflow in `workdir`, as the SLURM profile would run it."""
    (workdir / "Snakefile").write_text(SNAKEFILE)
    snakemake = [sys.executable, "-m", "snakemake"] if shutil.which("snakemake") is None else ["snakemake"]
    command = [
        *snakemake, "--executor", "slurm", "--jobs", "2",
        "--default-resources", f"slurm_account={cluster.account}", f"slurm_partition={cluster.partition}",
        "runtime=5", "mem_mb=200",
        # The plugin waits 40 s before its first status query, and 10 s more after each query that finds no job
        # finished; a short first wait keeps these tests short.
        "--slurm-init-seconds-before-status-checks", "2",
        "--latency-wait", "5",
        *extra,
    ]
    return subprocess.run(command, cwd=workdir, env=cluster.env, capture_output=True, text=True, timeout=120)


def test_snakemake_slurm_executor_runs_a_workflow(slurm, tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    start = time.monotonic()
    result = snakemake_slurm(slurm, tmp_path)
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}\n{slurm.log_tails()}"
    elapsed = time.monotonic() - start
    job_ids = {}
    for rule in ("a", "b"):
        text = (tmp_path / f"{rule}.txt").read_text().split()
        assert text[:2] == [rule, "from"] and text[2].isdigit(), text
        job_ids[rule] = text[2]
    # sacct knows both jobs, COMPLETED, under the given account and partition.
    for job_id in job_ids.values():
        fields = slurm.run("sacct", "-j", job_id, "-X", "--noheader", "--parsable2",
                           "--format=State,Account,Partition").stdout.strip().split("|")
        assert fields == ["COMPLETED", slurm.account, slurm.partition]
    print(f"snakemake --executor slurm took {elapsed:.1f} s")


def test_snakemake_slurm_executor_refuses_an_unknown_account(slurm, tmp_path):
    """The plugin checks slurm_account with `sacctmgr` (which needs slurmdbd) before it submits anything."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    result = snakemake_slurm(slurm, tmp_path, "--default-resources", "slurm_account=no_such_account")
    assert result.returncode != 0
    assert "no_such_account appears to be invalid" in result.stderr, result.stderr
    assert not (tmp_path / "a.txt").exists()


def test_snakemake_without_accounting_needs_squeue_status(tmp_path):
    """Without slurmdbd `sacct` fails ("Slurm accounting storage is disabled") and the plugin's default sacct
    status query loses the jobs (snakemake then waits forever); `--slurm-status-command squeue` works, as long
    as the jobs finish less than MinJobAge (300 s) before the query."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    with local_slurm(tmp_path / "slurm", accounting=False) as cluster:
        assert "accounting storage is disabled" in cluster.run("sacct", check=False).stderr
        workdir = tmp_path / "workflow"
        workdir.mkdir()
        result = snakemake_slurm(cluster, workdir, "--slurm-status-command", "squeue")
        assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}\n{cluster.log_tails()}"
        assert (workdir / "a.txt").read_text().startswith("a from ")
        assert (workdir / "b.txt").read_text().startswith("b from ")

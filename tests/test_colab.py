"""The notebook's Drive cell: local checkpoints/ and exports/ merged into Drive's by run folder and step."""

from __future__ import annotations

import os

import pytest
import torch

from tinygpt.colab import keep_on_drive
from tinygpt.common import TinyGPTError

RUN = "runs/3f2a9c1d0b7e"


def fake_run(root, step: int, mtime: float = 1_000_000.0):
    """A run folder as training leaves it: last.pt at `step`, its metrics, and best.pt beside the runs."""
    run = root / "checkpoints" / RUN
    run.mkdir(parents=True)
    torch.save({"step": step, "model": {"w": torch.full((2,), float(step))}}, run / "last.pt")
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in range(0, step + 1, 10)))
    best = root / "checkpoints" / "best.pt"
    best.write_text(f"best of step {step}")
    os.utime(best, (mtime, mtime))
    return run


def state(root) -> dict:
    folder = root / "checkpoints"
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("newer", ["drive", "local"])
def test_the_further_advanced_run_is_kept_whole(tmp_path, newer):
    """The issue's case: a new session ran the pipeline before the Drive cell, so checkpoints/ holds a younger
    run than Drive's; the reverse, a session that trained further before mounting Drive, must win instead."""
    local, drive = tmp_path / "content", tmp_path / "drive"
    steps = {"local": 30 if newer == "local" else 10, "drive": 30 if newer == "drive" else 10}
    fake_run(local, steps["local"], mtime=2_000_000.0)  # this session's files are the newer ones on disk
    fake_run(drive, steps["drive"])
    expected = state(local if newer == "local" else drive)
    report = keep_on_drive(local / "checkpoints", drive / "checkpoints")

    assert (local / "checkpoints").is_symlink() and (local / "checkpoints").resolve() == drive / "checkpoints"
    kept = state(drive)
    assert {k: v for k, v in kept.items() if k.startswith("runs/")} == {
        k: v for k, v in expected.items() if k.startswith("runs/")}
    assert torch.load(drive / "checkpoints" / RUN / "last.pt", weights_only=True)["step"] == 30
    assert kept["best.pt"] == b"best of step " + str(steps["local"]).encode(), "the newer output file wins"
    assert any(f"step 30; the other had reached step 10" in line for line in report), report
    assert [p.name for p in (drive / "checkpoints" / "runs").iterdir()] == [RUN.split("/")[1]], "no leftovers"


def test_runs_and_files_on_one_side_only_are_all_kept(tmp_path):
    local, drive = tmp_path / "content", tmp_path / "drive"
    fake_run(local, 20)
    (drive / "checkpoints" / "runs" / "older-run").mkdir(parents=True)
    torch.save({"step": 500}, drive / "checkpoints" / "runs" / "older-run" / "last.pt")
    (local / "exports" / "tinygpt").mkdir(parents=True)
    (local / "exports" / "tinygpt" / "config.json").write_text("{}")
    keep_on_drive(local / "checkpoints", drive / "checkpoints")
    keep_on_drive(local / "exports", drive / "exports")
    assert sorted(p.name for p in (drive / "checkpoints" / "runs").iterdir()) == ["3f2a9c1d0b7e", "older-run"]
    assert (local / "exports" / "tinygpt" / "config.json").read_text() == "{}"  # through the link, on Drive
    assert keep_on_drive(local / "exports", drive / "exports") == [f"exports/ -> {drive / 'exports'}"]  # again: no-op


def test_an_unreadable_state_stops_before_anything_changes(tmp_path):
    local, drive = tmp_path / "content", tmp_path / "drive"
    fake_run(local, 10)
    fake_run(drive, 30)
    (drive / "checkpoints" / RUN / "last.pt").write_bytes(b"cut short")
    before = state(local), state(drive)
    with pytest.raises(TinyGPTError, match=r"cannot read the step of .*last\.pt .*move the other run folder"):
        keep_on_drive(local / "checkpoints", drive / "checkpoints")
    assert (state(local), state(drive)) == before and not (local / "checkpoints").is_symlink()


def test_a_file_where_drive_has_a_folder_is_refused(tmp_path):
    local, drive = tmp_path / "content", tmp_path / "drive"
    (local / "checkpoints").mkdir(parents=True)
    (local / "checkpoints" / "runs").write_text("not a folder")
    (drive / "checkpoints" / "runs").mkdir(parents=True)
    with pytest.raises(TinyGPTError, match="is a file but .* is not; move one of them away"):
        keep_on_drive(local / "checkpoints", drive / "checkpoints")
    assert (local / "checkpoints" / "runs").read_text() == "not a folder"

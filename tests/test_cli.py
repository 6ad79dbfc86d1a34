"""The `tinygpt` command: every stage is reachable, and its errors are one line with a non-zero exit."""

import subprocess
import sys

import pytest

from tinygpt.cli import COMMANDS


def tinygpt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinygpt.cli", *args], capture_output=True, text=True, timeout=120)


def test_usage_lists_every_stage():
    result = tinygpt("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_stage_has_help(name):
    result = tinygpt(name, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_unknown_command():
    result = tinygpt("trian")
    assert result.returncode == 2
    assert "unknown command 'trian'" in result.stderr


def test_bad_input_is_one_line_and_exit_1(tmp_path):
    result = tinygpt("clean", "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "c.txt"),
                     "--stats", str(tmp_path / "s.json"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "missing.txt" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "c.txt").exists()


@pytest.mark.parametrize("name", sorted(name for name in COMMANDS if "_" in name))
def test_hyphenated_command_names_run_the_same_stage(name):
    """`tinygpt gguf-convert` is `tinygpt gguf_convert`: through `python -m tinygpt`, as a user types it."""
    result = subprocess.run([sys.executable, "-m", "tinygpt", name.replace("_", "-"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: tinygpt {name}")

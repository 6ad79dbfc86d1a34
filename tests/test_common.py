"""Atomic outputs: a finished file appears whole with the usual permissions; a failed write leaves nothing."""

import os

import pytest

from tinygpt.common import TinyGPTError, atomic_open, atomic_path, run_cli


def test_atomic_open_writes_whole_file_with_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_open(target, "w") as f:
        f.write("hello")
        assert not target.exists(), "the target appears only when the block ends"
    assert target.read_text() == "hello"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_run_cli_turns_errors_into_one_line_and_exit_1(capsys):
    def main(argv):
        raise TinyGPTError("corpus not found: x.txt")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: corpus not found: x.txt\n"


def test_declared_torch_floor_has_every_feature_the_code_uses():
    """pyproject.toml's torch floor is at least the release that brought each feature we rely on."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floor = tuple(int(x) for x in re.search(r'"torch>=(\d+)\.(\d+)', text).groups())
    needs = {
        "torch.optim.Muon with adjust_lr_fn": (2, 9),
        "AdamW(fused=True) on the CPU": (2, 4),
        "torch.amp.GradScaler(device_type)": (2, 3),
    }
    assert {feature: v for feature, v in needs.items() if v > floor} == {}

"""Atomic outputs: a finished file appears whole with the usual permissions; a failed write leaves nothing."""

import os

import pytest

from tinygpt.common import TinyGPTError, atomic_folder, atomic_open, atomic_path, run_cli


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


def fsync_log(monkeypatch) -> list[tuple[str, str]]:
    """Record each os.fsync (of a file or a folder) and each rename, in order."""
    import stat

    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.basename(dst)))
        real_replace(src, dst)

    def rename(src, dst):
        events.append(("rename", os.path.basename(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return events


def test_atomic_path_flushes_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = fsync_log(monkeypatch)
    with atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"data")
    assert events == [("fsync", "file"), ("rename", "out.bin"), ("fsync", "folder")]


def write_set(folder, version: str) -> None:
    for name in SET:
        (folder / name).write_text(f"{name} {version}")


def set_version(folder) -> str | None:
    """'old' or 'new' when `folder` holds one whole set, None when it holds no set; a mix fails the test."""
    if not folder.exists():
        return None
    versions = {(folder / name).read_text().split()[1] for name in SET if (folder / name).exists()}
    assert len(versions) == 1 and all((folder / name).exists() for name in SET), f"a mix: {versions}"
    return versions.pop()


SET = ("meta.json", "val.bin", "train.bin")


def test_atomic_folder_replaces_the_set_keeps_other_files_and_flushes(tmp_path, monkeypatch):
    out = tmp_path / "tokens"
    out.mkdir()
    write_set(out, "old")
    (out / "later-stage.gguf").write_text("kept")
    events = fsync_log(monkeypatch)
    with atomic_folder(out) as tmp:
        write_set(tmp, "new")
        assert set_version(out) == "old"
    assert set_version(out) == "new"
    assert (out / "later-stage.gguf").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens"], "no temporary folder left"
    assert events.count(("fsync", "file")) >= len(SET) and events[-1] == ("fsync", "folder")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("fail_at", [0, 1, 2, 3])
def test_a_kill_while_writing_a_set_leaves_the_old_set_or_the_new_one(tmp_path, monkeypatch, exchange, fail_at):
    """A failure at any step (while writing, or at the n-th rename) leaves one whole set, never a mix."""
    import tinygpt.common as common

    out = tmp_path / "tokens"
    out.mkdir()
    write_set(out, "old")
    if not exchange:  # a file system without renameat2's exchange
        monkeypatch.setattr(common, "_exchange", lambda a, b: False)
    calls, real_rename, real_replace = [], os.rename, os.replace

    def failing(real):
        def rename(src, dst):
            calls.append(dst)
            if len(calls) == fail_at:
                raise KeyboardInterrupt("killed")
            real(src, dst)
        return rename

    monkeypatch.setattr(os, "rename", failing(real_rename))
    monkeypatch.setattr(os, "replace", failing(real_replace))
    try:
        with atomic_folder(out) as tmp:
            for i, name in enumerate(SET):
                (tmp / name).write_text(f"{name} new")
                if fail_at == 0 and i == 1:
                    raise KeyboardInterrupt("killed between two files")
    except KeyboardInterrupt:
        assert set_version(out) == "old"
    else:
        assert set_version(out) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens"], "no temporary folder left"


def test_atomic_folder_makes_a_new_folder_and_refuses_one_that_holds_folders(tmp_path):
    with atomic_folder(tmp_path / "a" / "tokens") as tmp:
        write_set(tmp, "new")
    assert set_version(tmp_path / "a" / "tokens") == "new"
    (tmp_path / "a" / "tokens" / "sub").mkdir()
    with pytest.raises(TinyGPTError, match="holds folders"):
        with atomic_folder(tmp_path / "a" / "tokens"):
            pass
    with pytest.raises(TinyGPTError, match="is a file"):
        with atomic_folder(tmp_path / "a" / "tokens" / "meta.json"):
            pass


def test_progress_bars_start_no_thread():
    """tqdm's monitor thread would keep stages from forking their workers (worker_context): our bars start none."""
    import io
    import threading

    from tqdm import tqdm

    from tinygpt.common import progress

    if tqdm.monitor is not None:  # one another test started on purpose (tests/forks.py)
        tqdm.monitor.exit()
        tqdm.monitor = None
    before = threading.active_count()
    bar = progress(total=3, disable=False, file=io.StringIO())
    bar.update(3)
    bar.close()
    assert tqdm.monitor is None and threading.active_count() == before

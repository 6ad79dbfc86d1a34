"""Keep checkpoints/ and exports/ on Google Drive in Colab, never replacing a run's state with an older one.

The notebook's Drive cell calls `keep_on_drive(checkout / name, drive / name)` for both folders: the local folder
becomes a link to the one on Drive, so that a new session finds every run where the last one left it. A local
folder written before Drive was mounted (the pipeline cell run first in a new session) is merged into Drive's
first, and only then removed:
  - a run folder (one holding last.pt: `checkpoints/runs/<fingerprint>/`) is one unit, judged by the step its
    last.pt reached: the further-advanced copy is kept whole and the other dropped (Drive's on a tie);
  - any other file is a Snakemake output, judged as Snakemake judges it, by modification time: the newer copy
    wins (copies keep their times, so Snakemake still sees what is stale).
Where that cannot decide (a last.pt that cannot be read, a file on one side where the other has a folder), it
stops with a message saying what to move by hand, before changing anything.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tinygpt.common import TinyGPTError

RUN_STATE = "last.pt"


def run_step(run_dir: Path) -> int:
    """The step a run folder's last.pt reached (-1 without one), read without unpickling any code."""
    import torch

    path = run_dir / RUN_STATE
    if not path.is_file():
        return -1
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception as e:  # a truncated copy, another program's file: any reader error
        raise TinyGPTError(f"cannot read the step of {path} ({type(e).__name__}: {e}); keep the copy of run "
                           f"{run_dir.name} you want: move the other run folder out of the way by hand, then run "
                           "this cell again") from None


def _is_run(folder: Path) -> bool:
    return (folder / RUN_STATE).is_file()


def _plan(local: Path, kept: Path, actions: list[tuple[str, Path, Path]]) -> None:
    """What merging `local` into `kept` does, as (action, source, target) steps; raises before anything changes."""
    for source in sorted(local.iterdir()):
        target = kept / source.name
        if target.exists() and source.is_dir() != target.is_dir():
            raise TinyGPTError(f"{source} is a {'folder' if source.is_dir() else 'file'} but {target} is not; move "
                               "one of them away by hand, then run this cell again")
        if not target.exists():
            actions.append(("copy", source, target))
        elif source.is_dir() and (_is_run(source) or _is_run(target)):
            local_step, kept_step = run_step(source), run_step(target)
            actions.append(("replace run" if local_step > kept_step else "keep run", source, target, local_step,
                            kept_step))
        elif source.is_dir():
            _plan(source, target, actions)
        else:
            mine, theirs = source.stat(), target.stat()
            if (mine.st_size, mine.st_mtime) != (theirs.st_size, theirs.st_mtime):  # else the same file: skip
                actions.append(("replace file" if mine.st_mtime > theirs.st_mtime else "keep file", source, target))


def _copy_in(source: Path, target: Path) -> None:
    """Copy `source` (file or folder, times kept) to `target` on Drive, replacing what is there in one rename."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".incoming", dir=target.parent)) / "copy"
    try:
        if source.is_dir():
            shutil.copytree(source, tmp, symlinks=True)
        else:
            shutil.copy2(source, tmp)
        if target.is_dir():  # a folder cannot be renamed over a full one: move the old one aside first
            old = tmp.parent / "old"
            os.rename(target, old)
            os.rename(tmp, target)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def merge_into(local: Path, kept: Path) -> list[str]:
    """Merge folder `local` into folder `kept` as the module docstring says; return what was done, one line each."""
    actions: list[tuple] = []
    _plan(local, kept, actions)
    report = []
    for action, source, target, *steps in actions:
        if action in ("copy", "replace run", "replace file"):
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy_in(source, target)
        if action.endswith("run"):
            local_step, kept_step = steps
            which = "this session's" if action == "replace run" else "Drive's"
            report.append(f"run {target.name}: kept {which} copy (step {max(local_step, kept_step)}; the other had "
                          f"reached step {min(local_step, kept_step)})")
        elif action != "copy":
            which = "this session's" if action == "replace file" else "Drive's"
            report.append(f"{target}: kept {which} newer copy")
    return report


def keep_on_drive(local: str | os.PathLike, kept: str | os.PathLike) -> list[str]:
    """Make `local` a link to folder `kept` on Drive, first merging a local folder into it; return what was done."""
    local, kept = Path(local), Path(kept)
    kept.mkdir(parents=True, exist_ok=True)
    report = []
    if local.is_symlink():
        if local.resolve() == kept.resolve():
            return [f"{local.name}/ -> {kept}"]
        local.unlink()  # a link to another Drive folder: follow the setting
    elif local.is_dir():  # written before Drive was mounted: merge it in, then remove it
        report = merge_into(local, kept)
        shutil.rmtree(local)
    elif local.exists():
        raise TinyGPTError(f"{local} is a file, not a folder; move it away, then run this cell again")
    local.symlink_to(kept, target_is_directory=True)
    return report + [f"{local.name}/ -> {kept}"]

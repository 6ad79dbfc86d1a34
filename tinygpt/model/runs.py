"""Run folders: a fingerprint of the settings names the folder; what a fresh run says; metrics on resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tinygpt.common import atomic_open


def run_fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def announce_run(run_dir: Path, settings: dict, resumed_step: int | None) -> None:
    """Say whether this resumes a run or starts one, and if so which settings changed since the latest run."""
    if resumed_step is not None:
        print(f"resuming run {run_dir} from step {resumed_step}")
        return
    others = sorted(run_dir.parent.glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    others = [p for p in others if p.parent != run_dir]
    if not others:
        print(f"starting run {run_dir}")
        return
    previous = json.loads(others[-1].read_text())
    previous.pop("fingerprint", None)  # the folder name, stored beside the settings: not a setting itself
    flat_new, flat_old = _flatten(settings), _flatten(previous)
    changes = [f"{k} {flat_old.get(k)} -> {flat_new.get(k)}" for k in sorted(flat_new.keys() | flat_old.keys())
               if flat_new.get(k) != flat_old.get(k)]
    print(f"starting a fresh run {run_dir}: settings or data differ from run {others[-1].parent.name} "
          f"({'; '.join(changes) or 'no visible change'})")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past `last_step`: a killed run logged steps that its resumption will log again."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by the kill
            continue
    with atomic_open(path, "w") as f:
        f.write("".join(f"{line}\n" for line in kept))

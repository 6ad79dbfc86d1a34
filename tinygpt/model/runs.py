"""Run folders: a fingerprint of the settings names the folder; what a fresh run says; metrics on resume."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from tinygpt.common import TinyGPTError, atomic_open


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
    for beside in ("fingerprint", "amp_chosen"):  # stored beside the settings, not settings themselves
        previous.pop(beside, None)
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


def last_logged(path: Path, key: str) -> float:
    """The latest value of `key` in metrics.jsonl (nan when none): a resumed run's progress bar starts with it."""
    values = [math.nan]
    if path.exists():
        values += [record[key] for record in map(json.loads, path.read_text().splitlines()) if key in record]
    return values[-1]


# metrics.jsonl key -> TensorBoard tag (flops_per_s stays in the JSON only: mfu says it better)
TENSORBOARD_TAGS = {
    "train_loss": "loss/train", "val_loss": "loss/val", "val_bpb": "bits_per_byte/val",
    "lr": "lr/adamw", "muon_lr": "lr/muon", "tokens_per_s": "speed/tokens_per_s", "mfu": "speed/mfu",
}  # fmt: skip


class MetricsLog:
    """The run's metrics: one JSON line per record in metrics.jsonl and, when asked, TensorBoard event files.

    `open(step)` after trimming: TensorBoard then hides events past `step` that a killed run had written.
    """

    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        self.path, self.tensorboard_dir, self.writer = path, tensorboard_dir, None

    def open(self, step: int) -> None:
        if self.tensorboard_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TinyGPTError("train.tensorboard is on but the tensorboard package is missing; "
                               "pip install tensorboard (or set tensorboard: false)") from None
        self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=step + 1 if step else None)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key in TENSORBOARD_TAGS:
                    self.writer.add_scalar(TENSORBOARD_TAGS[key], value, record["step"])
            self.writer.flush()  # the notebook's %tensorboard shows the curve live

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()

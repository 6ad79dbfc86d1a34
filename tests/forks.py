"""Watch how a stage starts its worker processes: which other threads were alive at each fork (a thread holding
a lock at that moment leaves the lock held forever in the child), and how many processes it started."""

from __future__ import annotations

import contextlib
import io
import multiprocessing.process
import os
import threading
from typing import Iterator

from tqdm import tqdm

_forks: list[list[str]] | None = None


def _before_fork() -> None:
    if _forks is not None:
        _forks.append(sorted(type(t).__name__ for t in threading.enumerate() if t is not threading.current_thread()))


os.register_at_fork(before=_before_fork)


@contextlib.contextmanager
def watched_forks() -> Iterator[list[list[str]]]:
    """A list that gets, for each fork in the block, the class names of the other threads alive then."""
    global _forks
    _forks = []
    try:
        yield _forks
    finally:
        _forks = None


def started_processes(monkeypatch) -> list[str]:
    """A list that gets the start method of every worker process started from now on."""
    started, real_start = [], multiprocessing.process.BaseProcess.start

    def start(self):
        started.append(self._start_method or "fork")
        real_start(self)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start)
    return started


def progress_bars_on(monkeypatch, monitor: bool) -> None:
    """Progress bars shown, as in a real run (the tests hide them); with or without tqdm's monitor thread,
    which tinygpt switches off (tinygpt.common) but another library may switch on: it starts with the next
    bar and then lives as long as the process."""
    monkeypatch.setenv("TINYGPT_NO_PROGRESS", "0")
    if monitor:
        monkeypatch.setattr(tqdm, "monitor_interval", 10)  # tqdm's default
        tqdm(total=1, file=io.StringIO()).close()
        assert tqdm.monitor is not None and tqdm.monitor.is_alive()
    elif tqdm.monitor is not None:
        tqdm.monitor.exit()
        tqdm.monitor = None

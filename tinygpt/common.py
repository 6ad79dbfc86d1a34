"""Helpers every stage shares: one error type, atomic outputs, checksums, progress bars, CLI entry."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from tqdm import tqdm


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; done once, at import, before any threads
    os.umask(mask)
    return mask


_UMASK = _read_umask()


# Ends every document in our text files and is the tokenizer's one special token (id vocab_size - 1).
EOT = "<|endoftext|>"


class TinyGPTError(Exception):
    """Bad input or a failed stage: the message is one sentence naming the file, key or value and what to do."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds.

    The temporary file lives in the same folder so that the final `os.replace` is atomic: an interrupted
    stage never leaves a file that looks finished.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp makes 0600 (and some writers recreate the file): give the output the usual permissions
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator:
    """Open a temporary file beside `path` for writing; it replaces `path` only when closed without error."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (which containers, `taskset` and SLURM narrow),
    not the machine's core count that os.cpu_count() reports."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # macOS: no affinity masks


def capped_threads(requested: int | None) -> int:
    """`requested` threads or processes (None or 0: one per usable CPU), never more than the usable CPUs:
    `snakemake --cores 4` on a 2-core machine asks for 4, and two threads per core made training 20% slower."""
    return max(1, min(requested or usable_cpus(), usable_cpus()))


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def require_file(path: str | os.PathLike, what: str, hint: str = "") -> Path:
    """Return `path` as a Path, or raise a TinyGPTError that says which file is missing and how to make it."""
    path = Path(path)
    if not path.is_file():
        raise TinyGPTError(f"{what} not found: {path}" + (f"; {hint}" if hint else ""))
    return path


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar on stderr that stays quiet in logs: it refreshes at most every few seconds off a terminal."""
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.2 if sys.stderr.isatty() else 5.0)
    kwargs.setdefault("disable", os.environ.get("TINYGPT_NO_PROGRESS") == "1")
    return tqdm(iterable, **kwargs)


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a stage's `main`, turning a TinyGPTError into one line on stderr and exit status 1."""
    prog = Path(sys.argv[0]).stem if argv is None else "tinygpt"
    try:
        main(argv)
    except TinyGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 1))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)

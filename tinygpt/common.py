"""Helpers every stage shares: one error type, atomic outputs, checksums, progress bars, CLI entry."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Iterator, Sequence

from tqdm import tqdm

# No monitor thread behind progress bars (it only retunes a bar's refresh): with it alive, worker processes
# could not be forked safely (see worker_context). tqdm's class attribute: bars of other libraries too.
tqdm.monitor_interval = 0


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; done once, at import, before any threads
    os.umask(mask)
    return mask


_UMASK = _read_umask()


# Ends every document in our text files; the last of the tokenizer's special tokens (id vocab_size - 1).
EOT = "<|endoftext|>"


class TinyGPTError(Exception):
    """Bad input or a failed stage: the message is one sentence naming the file, key or value and what to do."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds.

    The temporary file lives in the same folder so that the final `os.replace` is atomic: an interrupted
    stage never leaves a file that looks finished. The file is flushed to disk before the rename and the
    folder after it, so that a power cut cannot leave a renamed but empty file either.
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
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator:
    """Open a temporary file beside `path` for writing; it replaces `path` only when closed without error."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries (a rename in it), to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its renames need no folder fsync
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system without fsync on folders (some network mounts): nothing more to do
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` for a set of files (meta.json beside the token files it
    describes, a model folder); if the block succeeds, the set replaces `path` in one step, so readers see the
    old set or the new one, never a mix. Other files in `path` (a later stage's outputs) are kept: they are
    hard-linked into the new folder before the swap; a folder in `path` is refused (it is no place for a set).

    The swap is one atomic exchange of the two folders (Linux renameat2); where the file system has no such
    exchange, the old folder is renamed aside first, and a failure between the two renames puts it back.
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()  # swap the folder it points to, not the link
    path = Path(os.path.abspath(path))
    if path.exists() and not path.is_dir():
        raise TinyGPTError(f"{path} is a file, not a folder; give a folder for these files")
    folders = [p.name for p in path.iterdir() if p.is_dir()] if path.is_dir() else []
    if folders:
        raise TinyGPTError(f"{path} holds folders ({', '.join(sorted(folders)[:3])}); give a folder of its own for "
                           "these files, since they are replaced together")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        yield tmp
        written = {p.name for p in tmp.iterdir()}
        for name in written:  # some writers make 0600 files (safetensors' save_file writes a temporary file and
            file = tmp / name  # renames it): the set gets the usual permissions, as atomic_path gives a file
            if file.is_file() and not file.is_symlink():
                os.chmod(file, 0o666 & ~_UMASK)
        if path.is_dir():
            for kept in path.iterdir():
                if kept.name not in written:
                    _link_or_copy(kept, tmp / kept.name)
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700
        for file in tmp.iterdir():
            fsync_path(file)
        fsync_path(tmp)
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            old = tmp  # the exchange left the old folder at the temporary name
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old)  # over the empty folder mkdtemp made
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                old = None
                raise
        fsync_path(path.parent)
    finally:
        for leftover in {tmp, old} - {None}:
            if leftover.exists() and leftover != path:
                shutil.rmtree(leftover, ignore_errors=True)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target, follow_symlinks=False)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc before 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):  # the file system cannot exchange
        return False
    raise OSError(error, os.strerror(error), str(a), None, str(b))


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


def set_malloc(*, mmap_threshold: int, trim_threshold: int | None = None) -> None:
    """Fix glibc malloc's thresholds for the whole process: blocks of `mmap_threshold` bytes and more are mapped
    on their own (and handed back to the kernel when freed), and a free heap top beyond `trim_threshold` is
    handed back. Fixing them also stops glibc from raising them as it goes. No-op where the C library has no
    mallopt (macOS, Windows, musl)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):
        return
    mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
    if trim_threshold is not None:
        mallopt(-1, trim_threshold)  # M_TRIM_THRESHOLD


def worker_context() -> multiprocessing.context.BaseContext:
    """How to start worker processes: fork (fast: workers inherit what is loaded) when this process runs no
    other thread, else spawn. A fork copies every lock as it is at that instant, so a lock that another thread
    holds stays locked in the worker forever. tqdm's monitor thread, which would live on once a progress bar
    was shown, is switched off (below), so a process that ran one stage can fork for the next."""
    alone = threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if alone else "spawn")


@contextlib.contextmanager
def worker_pool(processes: int, initializer: Callable, initargs: tuple, stage: str,
                context: multiprocessing.context.BaseContext | None = None) -> Iterator[ProcessPoolExecutor]:
    """Worker processes for `stage`, started here (by fork where that is safe, all of them: see worker_context;
    or by `context`), before the caller opens a progress bar; under spawn more start as tasks wait.

    Not multiprocessing.Pool: it replaces a worker that dies (the out-of-memory killer's SIGKILL, say) and then
    waits forever for the task that worker held. Here a dead worker is one TinyGPTError at the next result, and
    on any error the tasks not yet started are dropped instead of finished."""
    pool = ProcessPoolExecutor(processes, mp_context=context or worker_context(), initializer=initializer,
                               initargs=initargs)
    try:
        pool.submit(int).result()  # a first task starts the workers now, not at the caller's first task
        yield pool
    except BrokenProcessPool:
        raise TinyGPTError(f"a worker process of {stage} died before it finished (killed by the system, perhaps for "
                           "want of memory); its output was not written: run it again with fewer threads") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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

"""Stage 1: get raw text. `tinygpt download --source builtin --out data/raw/corpus.txt`.

Sources:
  builtin      our procedural children's stories (tinygpt.data.stories.generator); needs no network, deterministic for --seed.
  tinystories  the public TinyStories file; a --size smaller than the file fetches only a prefix (HTTP Range).
  url          any http(s) files (--url repeated, optional --sha256 each), concatenated.
  file         local files, folders or globs (--path repeated), concatenated.

url and file read plain text, JSON lines, Parquet, and any of them compressed (.gz .bz2 .xz .zst), each file's
format told from its name unless --format forces one (see tinygpt.data.formats). Every source writes one file
of documents separated by a line `<|endoftext|>`: a JSON line or a Parquet row is one document.

Downloads stream to a hidden `.part` file beside the output, retry transient failures with exponential backoff,
resume a partial file with a Range request, verify sha256, and rename into place only when complete: a failed
run leaves any previous output untouched. (Interrupted with Ctrl-C, the `.part` file stays, and the same command resumes it.)
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from tinygpt import __version__
from tinygpt.common import EOT, TinyGPTError, atomic_open, atomic_path, progress, run_cli, sha256_file
from tinygpt.data.formats import FORMATS, SEPARATOR, expand_paths, read_as_corpus
from tinygpt.data.stories.generator import iter_story_chunks

SOURCES = ("builtin", "tinystories", "url", "file")
SIZE_PRESETS = {"tiny": 5_000_000, "small": 50_000_000, "medium": 200_000_000}
TINYSTORIES_URL = (
    "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt"
)
BLOCK = 1 << 20
MAX_BACKOFF_S = 60.0


# ------------------------------------------------------------------------------------------------ sizes


def parse_size(size: str | int | None) -> int | None:
    """A byte count from a preset name, a number (`50000000`, `20MB`, `1.5G`), or 'full'/None (no cap)."""
    if size is None or isinstance(size, int):
        return size
    text = size.strip().lower()
    if text == "full":
        return None
    if text in SIZE_PRESETS:
        return SIZE_PRESETS[text]
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)b?", text)
    if not match:
        presets = "|".join(SIZE_PRESETS)
        raise TinyGPTError(f"--size {size!r} is not a size; use {presets}|full or a byte count like 20000000 or 20MB")
    number, unit = match.groups()
    return int(float(number) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[unit])


def document_prefix(data: bytes, limit: int) -> bytes:
    """The longest prefix of `data`, at most `limit` bytes, that ends just after a separator line."""
    end = data.rfind(SEPARATOR, 0, limit)
    return data[: end + len(SEPARATOR)] if end >= 0 else b""


def truncate_to_last_document(path: Path, what: str) -> None:
    """Cut `path` just after its last complete separator line (the file may end mid-document)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        end = size
        while end > 0:  # scan backwards block by block; overlap so a separator across blocks is seen
            start = max(0, end - BLOCK)
            f.seek(start)
            block = f.read(min(end + len(SEPARATOR), size) - start)
            found = block.rfind(SEPARATOR)
            if found >= 0:
                f.truncate(start + found + len(SEPARATOR))
                return
            end = start
    raise TinyGPTError(f"{what} holds no complete document (no '{EOT}' line); use a larger --size")


# ---------------------------------------------------------------------------------------------- builtin


def generate_builtin(out: str | os.PathLike, size: int, seed: int = 1337, workers: int | None = None) -> Path:
    """Write `size` bytes (at most, whole documents) of procedural stories to `out`, atomically."""
    out = Path(out)
    written = 0
    with atomic_open(out, "wb") as f, progress(total=size, unit="B", unit_scale=True, desc="stories") as bar:
        for chunk in iter_story_chunks(seed, workers=workers if size > 4 * BLOCK else 1):
            if written + len(chunk) > size:
                chunk = document_prefix(chunk, size - written)
                if not chunk and not written:
                    raise TinyGPTError(f"--size {size} is smaller than one story; use at least a few kB")
                f.write(chunk)
                bar.update(len(chunk))
                break
            f.write(chunk)
            written += len(chunk)
            bar.update(len(chunk))
    return out


# ----------------------------------------------------------------------------------------------- fetch


class _Transient(Exception):
    """A failure worth retrying: connection trouble, timeout, 5xx or 429. `retry_after` is the server's hint."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _part_path(dest: Path, url: str, max_bytes: int | None) -> Path:
    """Where a download of `url` accumulates; named by URL and cap, so a resume never mixes two downloads."""
    key = hashlib.sha1(f"{url} {max_bytes}".encode()).hexdigest()[:12]
    return dest.with_name(f".{dest.name}.{key}.part")


def _open(url: str, offset: int, max_bytes: int | None, timeout: float) -> http.client.HTTPResponse | None:
    """Send the request (with a Range header to resume or to fetch a prefix); None means nothing is left to get."""
    headers = {"User-Agent": f"tinygpt/{__version__}"}
    if offset or max_bytes is not None:
        headers["Range"] = f"bytes={offset}-{'' if max_bytes is None else max_bytes - 1}"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # the range starts at or past the end: what we already have is the whole file
            return None
        if e.code >= 500 or e.code == 429:
            retry_after = e.headers.get("Retry-After", "")
            raise _Transient(f"HTTP {e.code} {e.reason}", float(retry_after) if retry_after.isdigit() else None)
        raise TinyGPTError(f"download of {url} failed with HTTP {e.code} {e.reason}; check the URL") from None
    except urllib.error.URLError as e:
        raise _Transient(f"cannot connect ({e.reason})") from None
    except (OSError, http.client.HTTPException) as e:  # the server hung up or timed out before answering
        raise _Transient(f"no answer ({str(e) or type(e).__name__})") from None
    except ValueError as e:
        raise TinyGPTError(f"--url {url!r} is not a valid URL ({e})") from None


def _download_attempt(url: str, part: Path, max_bytes: int | None, timeout: float, bar) -> None:
    """One try at completing `part`: resume from its current size; raise _Transient if cut short."""
    offset = part.stat().st_size if part.exists() else 0
    if max_bytes is not None and offset >= max_bytes:
        return
    response = _open(url, offset, max_bytes, timeout)
    if response is None:
        return
    with response:
        if response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            match = re.match(r"bytes (\d+)-", content_range)
            if not match or int(match.group(1)) != offset:
                part.unlink(missing_ok=True)  # the server answered another range: start over cleanly
                raise _Transient(f"server answered range {content_range!r} to a request from byte {offset}")
        else:  # 200: the server ignored the Range header and sends the whole file, so start over
            offset = 0
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        if max_bytes is not None and (expected is None or offset + expected > max_bytes):
            expected = max_bytes - offset
        bar.reset(total=None if expected is None else offset + expected)
        bar.update(offset)
        received = 0
        with open(part, "ab" if offset else "wb") as f:
            while expected is None or received < expected:
                want = BLOCK if expected is None else min(BLOCK, expected - received)
                try:
                    data = response.read(want)
                except (OSError, http.client.HTTPException) as e:  # reset, timeout, incomplete read
                    raise _Transient(f"connection lost after {offset + received} bytes ({str(e) or type(e).__name__})")
                if not data:
                    break
                f.write(data)
                received += len(data)
                bar.update(len(data))
        if expected is not None and received < expected:
            raise _Transient(f"connection closed after {offset + received} of {offset + expected} bytes")


def fetch(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    max_bytes: int | None = None,
    timeout: float = 30.0,
    retries: int = 5,
    backoff: float = 1.0,
) -> Path:
    """Download `url` (only its first `max_bytes` if given) to a part file beside `dest`; return the part path.

    Transient failures are retried with exponential backoff (`backoff` seconds, doubling); `retries` counts
    consecutive failed attempts that made no progress. The caller renames the returned file into place.
    """
    if not url.startswith(("http://", "https://")):
        raise TinyGPTError(f"--url {url!r} is not an http(s) URL")
    part = _part_path(Path(dest), url, max_bytes)
    part.parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    try:
        with progress(unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1][:40] or url) as bar:
            while True:
                before = part.stat().st_size if part.exists() else 0
                try:
                    _download_attempt(url, part, max_bytes, timeout, bar)
                    break
                except _Transient as e:
                    progressed = part.exists() and part.stat().st_size > before
                    failures = 0 if progressed else failures + 1
                    if failures > retries:
                        raise TinyGPTError(
                            f"download of {url} failed after {retries + 1} attempts: {e}; "
                            "check the URL and your connection, then run again"
                        ) from None
                    delay = min(backoff * 2 ** max(failures - 1, 0), MAX_BACKOFF_S)
                    time.sleep(min(e.retry_after, MAX_BACKOFF_S) if e.retry_after is not None else delay)
        part.touch()  # an empty remote file still yields a (empty) part file
        if sha256:
            actual = sha256_file(part)
            if actual != sha256.lower():
                raise TinyGPTError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual}; "
                                   "check --sha256 or the URL")
    except TinyGPTError:
        part.unlink(missing_ok=True)
        raise
    return part


# ------------------------------------------------------------------------------------------- concatenate


def concatenate(files: Sequence[Path], out: Path, max_bytes: int | None, what: str, *, urls: Sequence[str] = (),
                format: str = "auto", text_field: str = "text") -> Path:
    """Join `files` (downloaded from `urls`, if given), each read as its format says, into `out` (atomically),
    with a separator line between files that do not end with one."""
    with atomic_path(out) as tmp:
        written = 0
        with open(tmp, "wb") as f:
            for i, (path, url) in enumerate(zip(files, urls or [None] * len(files))):
                if max_bytes is not None and written >= max_bytes:
                    break
                copied, tail = 0, b""  # the last few bytes show how the file ended
                for block in read_as_corpus(path, format, text_field, url=url):
                    if max_bytes is not None:
                        block = block[: max_bytes - written - copied]
                    f.write(block)
                    copied += len(block)
                    tail = (tail + block)[-len(SEPARATOR) - 2 :]
                    if max_bytes is not None and written + copied >= max_bytes:
                        break
                written += copied
                if i + 1 < len(files) and copied and not tail.rstrip().endswith(EOT.encode()):
                    joint = (b"" if tail.endswith(b"\n") else b"\n") + SEPARATOR
                    f.write(joint)
                    written += len(joint)
        if max_bytes is not None and written >= max_bytes:
            truncate_to_last_document(tmp, what)
    return out


# ---------------------------------------------------------------------------------------------- sources


def download(
    source: str,
    out: str | os.PathLike,
    *,
    size: str | int | None = None,
    seed: int = 1337,
    urls: Sequence[str] = (),
    sha256s: Sequence[str] = (),
    paths: Sequence[str] = (),
    timeout: float = 30.0,
    retries: int = 5,
    backoff: float = 1.0,
    workers: int | None = None,
    format: str = "auto",
    text_field: str = "text",
) -> Path:
    """Write the raw corpus for `source` to `out` (see the module docstring); return `out`.

    `size` caps the output (whole documents only); builtin and tinystories default to 'tiny', url and file
    to everything.
    """
    out = Path(out)
    if source not in SOURCES:
        raise TinyGPTError(f"--source {source!r} is unknown; use one of {', '.join(SOURCES)}")
    if urls and source not in ("tinystories", "url"):
        raise TinyGPTError(f"--url does not apply to --source {source}; use --source url or tinystories")
    if paths and source != "file":
        raise TinyGPTError(f"--path does not apply to --source {source}; use --source file")
    if format not in FORMATS:
        raise TinyGPTError(f"--format {format!r} is unknown; use one of {', '.join(FORMATS)}")
    if (format != "auto" or text_field != "text") and source not in ("url", "file"):
        raise TinyGPTError(f"--format and --text_field do not apply to --source {source}; use --source url or file")
    if not text_field:
        raise TinyGPTError("--text_field is empty; give the JSON field or Parquet column that holds the text")
    reading = dict(format=format, text_field=text_field)
    for digest in sha256s:
        if digest != "-" and not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise TinyGPTError(f"--sha256 {digest!r} is not a sha256 hex digest (64 hex digits, or - for none)")
    if sha256s and len(sha256s) != len(urls or [TINYSTORIES_URL]):
        raise TinyGPTError(f"got {len(sha256s)} --sha256 for {len(urls)} --url; give one per URL, in the same order")
    checksums = [None if digest == "-" else digest for digest in sha256s] or [None] * max(len(urls), 1)
    max_bytes = parse_size("tiny" if size is None and source in ("builtin", "tinystories") else size)
    if max_bytes is not None and max_bytes <= 0:
        raise TinyGPTError(f"--size {size} must be more than 0 bytes")
    net = dict(timeout=timeout, retries=retries, backoff=backoff)

    if source == "builtin":
        if max_bytes is None:
            raise TinyGPTError("--size full does not apply to --source builtin; give a preset or a byte count")
        return generate_builtin(out, max_bytes, seed=seed, workers=workers)

    if source == "tinystories":
        if len(urls) > 1:
            raise TinyGPTError("--source tinystories takes at most one --url (the TinyStories text file)")
        url = urls[0] if urls else TINYSTORIES_URL
        if checksums[0] and max_bytes is not None:
            raise TinyGPTError("--sha256 checks a whole file, but --size fetches a prefix; use --size full with it")
        part = fetch(url, out, sha256=checksums[0], max_bytes=max_bytes, **net)
        try:
            if max_bytes is not None and part.stat().st_size >= max_bytes:
                truncate_to_last_document(part, f"the first {max_bytes} bytes of {url}")
            os.replace(part, out)
        finally:
            part.unlink(missing_ok=True)
        return out

    if source == "url":
        if not urls:
            raise TinyGPTError("--source url needs at least one --url")
        parts: list[Path] = []
        try:
            for url, checksum in zip(urls, checksums):
                parts.append(fetch(url, out, sha256=checksum, **net))
            return concatenate(parts, out, max_bytes, what=f"the first {max_bytes} bytes of {', '.join(urls)}",
                               urls=urls, **reading)
        finally:
            for part in parts:
                part.unlink(missing_ok=True)

    if not paths:
        raise TinyGPTError("--source file needs at least one --path")
    files = expand_paths(paths)
    if out.resolve() in {f.resolve() for f in files}:
        raise TinyGPTError(f"--out {out} is also an input --path; write the corpus somewhere else")
    return concatenate(files, out, max_bytes, what=f"the first {max_bytes} bytes of {', '.join(paths)}", **reading)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tinygpt download",
        description="Get raw text (builtin stories, TinyStories, URLs or local files) into one corpus file.")
    parser.add_argument("--source", choices=SOURCES, default="builtin", help="where the text comes from (builtin)")
    parser.add_argument("--out", required=True, help="the raw corpus file to write")
    parser.add_argument("--size", default=None,
                        help="cap in bytes, whole documents: tiny (5 MB), small (50 MB), medium (200 MB), full, "
                             "or a count like 20000000 or 20MB (tiny for builtin and tinystories, else full)")
    parser.add_argument("--seed", type=int, default=1337, help="builtin: generator seed (1337)")
    parser.add_argument("--url", action="append", default=[],
                        help=f"url: a file URL (repeat); tinystories: instead of {TINYSTORIES_URL}")
    parser.add_argument("--sha256", action="append", default=[], help="expected sha256 of each --url, same order (- for none)")
    parser.add_argument("--path", action="append", default=[], help="file: a file, folder or glob (repeat)")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="url, file: how to read each file: auto (from its name: .jsonl/.json/.ndjson, .parquet, "
                             "else text; any of them may end in .gz/.bz2/.xz/.zst), text, jsonl or parquet")
    parser.add_argument("--text_field", default="text",
                        help="url, file: the JSON field or Parquet column that holds the text (text)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a connection or data (30)")
    parser.add_argument("--retries", type=int, default=5, help="retries of a failing download (5)")
    parser.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry, doubling (1)")
    parser.add_argument("--workers", type=int, default=None, help="builtin: generator processes (default and at most: the usable CPUs)")
    args = parser.parse_args(argv)
    out = download(args.source, args.out, size=args.size, seed=args.seed, urls=args.url, sha256s=args.sha256,
                   paths=args.path, timeout=args.timeout, retries=args.retries, backoff=args.backoff,
                   workers=args.workers, format=args.format, text_field=args.text_field)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    run_cli(main)

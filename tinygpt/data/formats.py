"""The files a user keeps text in, read as raw-corpus bytes for `tinygpt download` (sources `file` and `url`).

Which files: a `--path` is a file, a folder (every file under it, recursively, in sorted order, hidden files
and folders skipped) or a glob (its matches sorted; a matched folder counts as its files).

How each file is read is told by its name, `<stem>.<format>[.<compression>]`, unless a format is forced:
  text     anything else (.txt, .md, no suffix, ...): the bytes as they are. `<|endoftext|>` in a text file ends a
           document (it is our corpus format); a text file without one is one document, paragraphs intact
           (`tinygpt clean --split blank_line` cuts it at blank lines instead).
  jsonl    .jsonl, .ndjson, .json: one JSON object per line, the document in a string field (`text` unless
           told); blank lines are skipped.
  parquet  .parquet: one document per row of a string column (`text` unless told), read a batch of rows at a
           time so that memory stays bounded.
  compression  .gz, .bz2, .xz, .zst/.zstd over any of these, decompressed as a stream, never to disk. (Parquet
           keeps its index at the end of the file, so a compressed Parquet file is decompressed into memory;
           Parquet compresses its pages itself, so such files are rare.)

Each jsonl/parquet document is written as the document, a newline and a `<|endoftext|>` line, so `tinygpt clean`
keeps it as one document whatever blank lines it holds. A document containing the literal string `<|endoftext|>`
would be cut in two there, so the string is removed from it (a warning on stderr says how often, and where first).

Bad input is one TinyGPTError naming the file (and line or row): a line that is not JSON, an object without the
field or whose field is not a string, a Parquet file without the column, a truncated or corrupt compressed
stream, a folder without files.
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import io
import json
import lzma
import os
import sys
import urllib.parse
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from tinygpt.common import EOT, TinyGPTError

FORMATS = ("auto", "text", "jsonl", "parquet")
FORMAT_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
ARCHIVES = (".tar", ".tgz", ".zip", ".7z", ".rar")  # many files in one: read as text they would be garbage
SEPARATOR = f"{EOT}\n".encode()  # ends every document in the raw corpus
DOC_END = b"\n" + SEPARATOR  # what follows a jsonl/parquet document
BLOCK = 1 << 20
PARQUET_BATCH_ROWS = 256
ZSTD_READ = 1 << 14  # compressed bytes fed to zstd at a time: bounds what one call can expand to


# ------------------------------------------------------------------------------------------------ which files


def _folder_files(folder: Path) -> list[Path]:
    """Every file under `folder`, recursively, sorted by path; hidden files and folders (a leading dot) skipped."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root, name) for name in files if not name.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def matching_files(pattern: str) -> list[Path]:
    """The files one `--path` names (see the module docstring), in order; empty if none."""
    pattern = os.path.expanduser(pattern)
    files: list[Path] = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        files += _folder_files(Path(match)) if os.path.isdir(match) else [Path(match)] if os.path.isfile(match) else []
    return list(dict.fromkeys(files))  # `**` matches a folder and also the files in it


def expand_paths(patterns: Iterable[str]) -> list[Path]:
    """The files of each `--path` in order; a path that names no file is an error."""
    files: list[Path] = []
    for pattern in patterns:
        matches = matching_files(pattern)
        if not matches:
            if os.path.isdir(os.path.expanduser(pattern)):
                raise TinyGPTError(f"--path {pattern!r} is a folder without files (hidden ones are skipped); "
                                   "put text files in it or check the path")
            raise TinyGPTError(f"--path {pattern!r} matches no file; check the path or glob")
        files.extend(matches)
    return files


# ----------------------------------------------------------------------------------------------- which format


def detect(name: str, format: str = "auto") -> tuple[str, str | None]:
    """(format, compression) of a file called `name`: `x.jsonl.gz` -> ('jsonl', 'gzip'); a forced `format`
    wins over the name, while compression always comes from the last suffix."""
    if format not in FORMATS:
        raise TinyGPTError(f"--format {format!r} is unknown; use one of {', '.join(FORMATS)}")
    path = Path(name)
    compression = COMPRESSIONS.get(path.suffix.lower())
    if compression:
        path = path.with_suffix("")
    if path.suffix.lower() in ARCHIVES:
        raise TinyGPTError(f"{name} is an archive of files; unpack it and give the folder as --path")
    if format == "auto":
        format = FORMAT_SUFFIXES.get(path.suffix.lower(), "text")
    return format, compression


# ---------------------------------------------------------------------------------------------- decompression


class _ZstdReader(io.RawIOBase):
    """A zstd stream of one or more frames; unlike zstandard's own readers, an input that ends inside a frame is
    an EOFError (as gzip, bz2 and lzma do), not a silent early end."""

    def __init__(self, raw: BinaryIO):
        import zstandard  # only needed for .zst files

        self._raw, self._dctx = raw, zstandard.ZstdDecompressor()
        self._frame = None  # the decompressor of the frame being read
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        """Decompress until there is output; False at the end of the last whole frame."""
        while self._pos == len(self._out):
            leftover = b""
            if self._frame is not None and self._frame.eof:  # a frame ended: what follows starts the next
                leftover, self._frame = self._frame.unused_data, None
            data = leftover or self._raw.read(ZSTD_READ)
            if not data:
                if self._frame is not None:
                    raise EOFError("compressed file ended before the end of its last zstd frame")
                return False
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            self._out, self._pos = self._frame.decompress(data), 0
        return True

    def readinto(self, buffer) -> int:
        if not self._fill():
            return 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n


@contextlib.contextmanager
def open_decompressed(path: Path, compression: str | None) -> Iterator[BinaryIO]:
    """`path` opened for reading bytes, decompressed on the fly."""
    if compression is None:
        with open(path, "rb") as f:
            yield f
    elif compression == "zstd":
        with open(path, "rb") as raw, io.BufferedReader(_ZstdReader(raw), BLOCK) as f:
            yield f
    else:
        opener = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}[compression]
        with opener(path, "rb") as f:
            yield f


def _stream_errors() -> tuple[type[BaseException], ...]:
    """What a truncated or corrupt compressed stream (or an unreadable file) raises while being read."""
    errors: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error, lzma.LZMAError)
    if "zstandard" in sys.modules:
        errors += (sys.modules["zstandard"].ZstdError,)
    return errors


# ------------------------------------------------------------------------------------------------- documents


class _EotRemover:
    """Removes the literal separator from documents (it would cut them in two) and warns once per file."""

    def __init__(self, path: Path | str, unit: str):
        self.path, self.unit, self.count, self.first = path, unit, 0, None

    def __call__(self, doc: str, where: int) -> str:
        while EOT in doc:  # removing one occurrence can join the halves of another
            self.count += doc.count(EOT)
            self.first = self.first or where
            doc = doc.replace(EOT, "")
        return doc

    def report(self) -> None:
        if self.count:
            print(f"warning: {self.path}: removed {self.count} literal '{EOT}' string(s) from its documents "
                  f"(first in {self.unit} {self.first}), since that string ends a document in our corpus files",
                  file=sys.stderr)


def _document_bytes(doc: str) -> bytes:
    # A lone surrogate (a JSON escape such as "\ud800") is not a character: it is kept as its (invalid UTF-8)
    # bytes, so that `tinygpt clean` counts and reports it like any other invalid byte.
    return doc.encode("utf-8", "surrogatepass") + DOC_END


TEXT_FIELD_HINT = "set download.text_field (--text_field) to the field that holds the text"


def _jsonl_values(stream: BinaryIO, path: Path | str, field: str, what: str = "text",
                  hint: str = TEXT_FIELD_HINT) -> Iterator[tuple[int, object]]:
    """(line number, the value of `field`) of each JSON object in a JSON lines stream; blank lines are skipped.
    Messages call the value `what`; `hint` says how to name another field when a line has none by that name."""
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TinyGPTError(
                f"{path} line {number} is not valid JSON ({e.msg}, column {e.colno}); give one JSON object per "
                "line (JSON lines), or --format text to read the file as plain text") from None
        except UnicodeDecodeError as e:
            raise TinyGPTError(f"{path} line {number} is not UTF-8 (byte {e.start} of the line is invalid); "
                               "JSON must be UTF-8, so convert the file first") from None
        if not isinstance(record, dict):
            raise TinyGPTError(f"{path} line {number} is a JSON {type(record).__name__}, not an object; give one "
                               f"object per line with the {what} in field {field!r}")
        if field not in record:
            fields = ", ".join(map(repr, list(record)[:8])) or "none"
            raise TinyGPTError(f"{path} line {number} has no field {field!r} (its fields: {fields}); {hint}")
        yield number, record[field]


def _jsonl_documents(stream: BinaryIO, path: Path | str, field: str) -> Iterator[bytes]:
    remover = _EotRemover(path, "line")
    for number, text in _jsonl_values(stream, path, field):
        if not isinstance(text, str):
            kind = "null" if text is None else type(text).__name__
            raise TinyGPTError(f"{path} line {number}: field {field!r} is {kind}, not a string; every line needs "
                               "its text in that field")
        yield _document_bytes(remover(text, number))
    remover.report()


def _check_text_column(schema, path: Path | str, column: str) -> None:
    import pyarrow as pa

    if schema.get_field_index(column) < 0:
        names = ", ".join(map(repr, schema.names[:8])) or "none"
        raise TinyGPTError(f"{path} has no column {column!r} (its columns: {names}); set download.text_field "
                           "(--text_field) to the column that holds the text")
    kind = schema.field(column).type
    value_kind = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(value_kind) or pa.types.is_large_string(value_kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(value_kind)):
        raise TinyGPTError(f"{path}: column {column!r} holds {kind}, not strings; set download.text_field "
                           "(--text_field) to a text column")


def _parquet_values(source, path: Path | str, column: str, check_column: Callable[[object, Path | str, str], None],
                    what: str = "a string") -> Iterator[tuple[int, object]]:
    """(row number from 1, the value of `column`) of each row of a Parquet file, a batch of rows at a time;
    `check_column(schema, path, column)` refuses a file without a fitting column; a null value (messages call the
    value `what`) is an error."""
    import pyarrow as pa  # only needed for Parquet files
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source)
    except (pa.ArrowException, OSError) as e:
        raise TinyGPTError(f"{path} is not a readable Parquet file ({e}); check the file, or force "
                           "--format text/jsonl if it is not Parquet") from None
    row = 0
    with parquet:
        check_column(parquet.schema_arrow, path, column)
        try:
            # one thread: the download rule is given one CPU, and pyarrow's pool would take them all
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column], use_threads=False):
                values = batch.column(0)
                if values.null_count:
                    first = next(i for i, valid in enumerate(values.is_valid().to_pylist()) if not valid)
                    raise TinyGPTError(f"{path} row {row + first + 1}: column {column!r} is null, not {what}; "
                                       "drop or fill those rows")
                for value in values.to_pylist():
                    row += 1
                    yield row, value
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise TinyGPTError(f"{path} is a damaged Parquet file (error after row {row}: {e}); check the file") from None


def _parquet_documents(source, path: Path | str, column: str) -> Iterator[bytes]:
    remover = _EotRemover(path, "row")
    for row, text in _parquet_values(source, path, column, _check_text_column):
        yield _document_bytes(remover(text, row))
    remover.report()


def _text_blocks(stream: BinaryIO) -> Iterator[bytes]:
    while block := stream.read(BLOCK):
        yield block


def url_file_name(url: str) -> str:
    """The file name at the end of a URL's path (the query left out)."""
    return urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]


@contextlib.contextmanager
def _reading(file: Path, compression: str | None, path: Path | str) -> Iterator[BinaryIO]:
    """`file` opened (see open_decompressed); a truncated or unreadable stream becomes one TinyGPTError naming `path`."""
    try:
        with open_decompressed(file, compression) as stream:
            yield stream
    except _stream_errors() as e:
        if compression is None:
            raise TinyGPTError(f"cannot read {path} ({e}); check the file and its permissions") from None
        raise TinyGPTError(f"{path} is not a complete {compression} stream ({e}); the file is truncated or "
                           "corrupt: fetch or compress it again") from None


def read_as_corpus(file: str | os.PathLike, format: str = "auto", text_field: str = "text",
                   url: str | None = None) -> Iterator[bytes]:
    """The bytes that `file` adds to the raw corpus, in blocks (see the module docstring). A file downloaded from
    `url` is named by it in messages, and its format is told from the URL's file name."""
    file = Path(file)
    format, compression = detect(url_file_name(url) if url else file.name, format)
    path = url or file  # what messages call it
    with _reading(file, compression, path) as stream:
        if format == "text":
            yield from _text_blocks(stream)
        elif format == "jsonl":
            yield from _jsonl_documents(stream, path, text_field)
        else:  # Parquet needs random access: a compressed file is decompressed into memory
            yield from _parquet_documents(file if compression is None else io.BytesIO(stream.read()),
                                          path, text_field)


def read_records(file: str | os.PathLike, field: str, check_column: Callable[[object, Path | str, str], None],
                 format: str = "auto", what: str = "data", hint: str = "") -> Iterator[tuple[str, object]]:
    """(where, value) of `field` in each record of a JSON lines or Parquet file (compressed or not, told as in
    read_as_corpus), where = "<file> line N" or "<file> row N" for messages about that value. The value is
    whatever JSON or Arrow holds (a list of dicts, ...), checked by the caller. `check_column(schema, path,
    column)` refuses a Parquet file without a fitting column; `what` and `hint` word the errors about the field."""
    file = Path(file)
    format, compression = detect(file.name, format)
    if format == "text":
        raise TinyGPTError(f"{file} is neither JSON lines nor Parquet (by its name); give .jsonl or .parquet "
                           "files, or force --format jsonl or parquet")
    with _reading(file, compression, file) as stream:
        if format == "jsonl":
            for number, value in _jsonl_values(stream, file, field, what, hint or f"give every line a {field!r} field"):
                yield f"{file} line {number}", value
        else:
            source = file if compression is None else io.BytesIO(stream.read())
            for row, value in _parquet_values(source, file, field, check_column, what):
                yield f"{file} row {row}", value

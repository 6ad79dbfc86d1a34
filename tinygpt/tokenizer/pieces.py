"""Stream a cleaned corpus as bounded pieces of its documents, cut only where the pre-tokenizer splits anyway.

The corpus format (what `tinygpt clean` writes): documents, each followed by a separator line that is exactly
`<|endoftext|>` (ending in "\\n" or at the end of the file). The newline before a separator line ends the
document's last line and is not part of the document; a document of nothing but ASCII whitespace is skipped
(it gets no index); a last document without a separator line loses its trailing newlines.

Documents of any size are read in pieces of about `piece_bytes`, so memory stays bounded even for a corpus
that is one 2 GB document. A long document is cut only at a *safe point*: an ASCII whitespace byte right after
an ASCII byte that is not whitespace. Of the GPT-2 pattern's alternatives only the whitespace ones cross
whitespace, and they start at whitespace, so the chunk holding the byte before a safe point ends there; and the
pattern has no look-behind, so the text after a safe point splits as it does inside the whole text. Encoding the
pieces one by one therefore gives exactly the document's ids. A stretch longer than `piece_bytes` without a
safe point (no whitespace at all) is read whole.

That is the rule for GPT-2's pattern (tinygpt's own tokenizer). Other pre-tokenizers allow fewer safe points
(Llama 3's and Qwen2's regexes keep newlines after punctuation, so only a letter or digit may come before the
whitespace): the functions here take the tokenizer's `safe_before` class, see `safe_point_pattern`; a tokenizer
with no known safe points (None) gets none, and its documents are read whole.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import BinaryIO, Iterator, NamedTuple

from tinygpt.common import EOT
from tinygpt.tokenizer.pipeline import ASCII_SPACE_BYTES as _SPACE, GPT2_SAFE_BEFORE

PIECE_BYTES = 1 << 20
READ_BYTES = 1 << 22
SEPARATOR = EOT.encode()


@lru_cache(maxsize=None)
def safe_point_pattern(safe_before: bytes | None = GPT2_SAFE_BEFORE) -> re.Pattern:
    """The safe points of a tokenizer whose `safe_before` class is given (None: a pattern that never matches)."""
    if safe_before is None:
        return re.compile(rb"(?!)")
    return re.compile(safe_before + rb"(?=[" + _SPACE + rb"])")


# GPT-2's: the byte before a safe point is ASCII and not whitespace (a byte >= 0x80 may end U+00A0, U+3000, ...).
_SAFE_POINT = safe_point_pattern(GPT2_SAFE_BEFORE)
_SEPARATOR_LINE = b"\n" + SEPARATOR + b"\n"
_SPLIT = re.compile(re.escape(b"\n" + SEPARATOR) + rb"(?=\n)")  # leaves the line's newline to the next part


class Piece(NamedTuple):
    data: bytes
    document: int  # index of its document among the non-empty documents, from 0
    offset: int  # where `data` starts in the file
    ends_document: bool  # the last piece of its document (<|endoftext|> follows it)


def safe_points(text: bytes, safe: re.Pattern = _SAFE_POINT) -> list[int]:
    """Every safe point of `text`, in order (see the module docstring)."""
    return [m.end() for m in safe.finditer(text)]


def last_safe_point(data: bytes | bytearray, start: int, end: int, safe: re.Pattern = _SAFE_POINT) -> int:
    """The largest safe point p of data with start < p <= end, or -1 (end < len(data) is needed to see data[end])."""
    window = 256
    while True:
        lo = max(start, end - window)
        found = -1
        for match in safe.finditer(data, lo, end + 1):
            found = match.end()
        if found > start:
            return found
        if lo == start:
            return -1
        window *= 16


def _cuts(data: bytes, piece_bytes: int, safe: re.Pattern) -> Iterator[tuple[int, int]]:
    """(start, end) of the pieces of a whole document held in memory."""
    start = 0
    while len(data) - start > piece_bytes:
        cut = last_safe_point(data, start, start + piece_bytes, safe)
        if cut < 0:
            match = safe.search(data, start + piece_bytes)
            if match is None:
                break
            cut = match.end()
        yield start, cut
        start = cut
    yield start, len(data)


def _complete_utf8(data: bytes) -> bytes:
    """data without an incomplete UTF-8 character at its end (a byte limit may cut one)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return data
        if byte >= 0xC0:  # a lead byte: keep its character only if all its continuation bytes are there
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data if back >= need else data[:-back]
    return data


class _Reader:
    """A growing window on a binary file: `buf[pos:]` is unread; bytes before `pos` are dropped as it advances."""

    def __init__(self, f: BinaryIO, limit: int | None, digest) -> None:
        self.f, self.remaining, self.digest = f, limit, digest
        self.buf = bytearray()
        self.base = 0  # file offset of buf[0]
        self.pos = 0
        self.eof = False

    def fill(self, until: int) -> None:
        """Read until len(buf) >= until or the end of the file (or of the limit)."""
        if self.pos > (1 << 16) and self.pos > len(self.buf) // 2:
            drop = self.pos - 1  # keep the byte before pos: it tells whether pos starts a line
            del self.buf[:drop]
            self.base += drop
            until -= drop
            self.pos -= drop
        while len(self.buf) < until and not self.eof:
            size = READ_BYTES if self.remaining is None else min(READ_BYTES, self.remaining)
            block = self.f.read(size) if size else b""
            if self.remaining is not None:
                self.remaining -= len(block)
            if self.digest is not None:
                self.digest.update(block)
            self.buf += block
            self.eof = not block

    def find_separator(self, line_start: bool, end: int) -> int:
        """Index s of the first separator line starting in [pos, end], or -1; buf must reach end + len + 1."""
        buf, start = self.buf, self.pos
        while True:
            s = buf.find(SEPARATOR, start, end + len(SEPARATOR))
            if s < 0:
                return -1
            at_line_start = buf[s - 1] == 10 if s > self.pos else line_start
            after = s + len(SEPARATOR)
            if at_line_start and (after == len(buf) and self.eof or buf[after:after + 1] == b"\n"):
                return s
            start = s + 1


def iter_pieces(f: BinaryIO, piece_bytes: int = PIECE_BYTES, limit: int | None = None,
                digest=None, safe: re.Pattern = _SAFE_POINT) -> Iterator[Piece]:
    """The pieces of every document of the corpus file `f` (binary), in order, each at most about piece_bytes.

    limit: read only the first `limit` bytes of the file; the document they cut ends there (a partial separator
    line or UTF-8 character at the cut is dropped). digest: a hashlib object that is fed every byte read.
    safe: the tokenizer's safe points (`safe_point_pattern`; GPT-2's by default).
    """
    reader = _Reader(f, limit, digest)
    document, continued, line_start = 0, False, True
    window = max(1, piece_bytes)
    while True:
        reader.fill(reader.pos + window + len(SEPARATOR) + 2)
        buf, pos = reader.buf, reader.pos
        if line_start and pos > 0:  # buf[pos - 1] is the newline of a separator line
            last = buf.rfind(_SEPARATOR_LINE, pos - 1)
            if last >= 0:  # fast path: split every whole document up to that separator line at once
                offset = reader.base + pos
                for part in _SPLIT.split(bytes(buf[pos - 1:last + len(_SEPARATOR_LINE)]))[:-1]:
                    data = part[1:]  # each part is the newline before it (ending a separator line) + a document
                    if data.strip():
                        for start, end in _cuts(data, piece_bytes, safe):
                            yield Piece(data[start:end], document, offset + start, end == len(data))
                        document += 1
                    offset += len(part) + len(SEPARATOR) + 1
                reader.pos = last + len(_SEPARATOR_LINE)
                continue
        s = reader.find_separator(line_start, pos + window + 1)
        if s >= 0:  # the document ends within the window
            data = bytes(buf[pos:max(pos, s - 1)])  # the newline before the separator line is not text
            if continued or data.strip():
                yield Piece(data, document, reader.base + pos, True)
                document += 1
            end = s + len(SEPARATOR) + 1
            reader.pos = min(end, len(buf))
            continued, line_start, window = False, True, max(1, piece_bytes)
            continue
        if reader.eof and len(buf) - pos <= window:  # the last document, without a separator line
            data = bytes(buf[pos:])
            if limit is not None and reader.remaining == 0:  # cut by the limit: drop a partial separator line
                head, newline, last_line = data.rpartition(b"\n")
                if newline and SEPARATOR.startswith(last_line):
                    data = head
                data = _complete_utf8(data)
            else:
                data = data.rstrip(b"\n")
            if continued or data.strip():
                yield Piece(data, document, reader.base + pos, True)
            return
        end = min(pos + window, len(buf) - 1)  # (a safe point must see the byte after it)
        cut = last_safe_point(buf, pos, min(pos + piece_bytes, end), safe)
        if cut < 0:  # none within piece_bytes: the first one after, or else widen the window
            match = safe.search(buf, pos + piece_bytes, end + 1)
            if match is None:
                window *= 2
                continue
            cut = match.end()
        yield Piece(bytes(buf[pos:cut]), document, reader.base + pos, False)
        reader.pos = cut
        continued, line_start, window = True, False, max(1, piece_bytes)

"""Stage 2: raw text -> a clean corpus of unique documents.

`tinygpt clean --input data/raw/corpus.txt --out data/clean/corpus.txt --stats data/clean/corpus.stats.json`

What cleaning does, in order, streaming block by block (memory holds about two blocks and an 8-byte hash per
unique document, whatever the document sizes: a document longer than a block goes to the output in pieces, and is
cut back off the output if it turns out empty, a duplicate or over a cap):
  1. Reject binary input: a NUL byte anywhere.
  2. Decode UTF-8 (a leading BOM is dropped); each invalid byte becomes U+FFFD and is counted
     (`replaced_characters` in the stats). Text that is not UTF-8 is never cleaned silently: over 1% invalid
     bytes (checked after the first block, then over the whole file) is an error that names the file, the first
     bad line and byte, and suggests `iconv` ("looks binary" when over a quarter is invalid); fewer is a
     warning on stderr with the count.
  3. Drop invisible junk, counted: control characters (category Cc) except tab and newline, and the format
     characters (category Cf) that carry no meaning in running text: soft hyphen, zero-width space, word joiner,
     BOM, invisible math operators, bidirectional embeddings/overrides/isolates, and interlinear annotation marks.
     Kept on purpose: ZWJ (joins emoji sequences like the family emoji) and ZWNJ (shapes Persian and Indic
     words), the LRM/RLM/ALM marks (needed to render mixed-direction text), and emoji tag characters (flags).
  4. Newlines become "\\n": CRLF, CR, VT, FF, NEL and U+2028 (U+2029, a paragraph separator, becomes a blank line).
  5. Split into documents: `eot` at every `<|endoftext|>`, so a text without one (a book, a play, notes) is one
     document with its paragraphs intact; `blank_line` at blank lines (and at any `<|endoftext|>`, so no document
     contains one), for a file that is a list of short texts one paragraph each. `auto` (the default) is `eot`.
  6. Per document: Unicode NFC, strip, collapse runs of blank lines to one; drop empty documents and exact
     duplicates (by hash). A long document is normalised piece by piece, cut only where a run of whitespace
     starts after other text (else between two ASCII characters that are not whitespace): NFC, stripping and
     collapsing give there exactly what they give on the whole document.
  7. Write each document followed by "\\n<|endoftext|>\\n", stopping before a document that would pass
     --max_lines or --max_bytes (counted on the output, separator lines included; a document that ends exactly
     on the cap is kept). The UTF-8 check of step 2 then runs on all that was read, so a cap never lets text in
     another encoding through.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import os
import re
import sys
import unicodedata
from pathlib import Path
from typing import Iterator, Sequence

from tinygpt.common import EOT, TinyGPTError, atomic_open, atomic_path, progress, require_file, run_cli

DOC_END = f"\n{EOT}\n"
SPLITS = ("auto", "eot", "blank_line")
BLOCK = 1 << 22
# One UTF-8 check, on the share of invalid bytes read so far: after the first block (at least UTF8_PROBE bytes,
# so a wrong file fails fast) and at the end. Over MAX_INVALID_FRACTION is an error: a few stray bytes (a cut
# character, a mojibake'd name) stay well below it, while text in an 8-bit encoding (Latin-1, cp1252: every
# accented letter is invalid) is far above it. Over BINARY_INVALID_FRACTION only words the error differently:
# text in a wrong 8-bit encoding stays far below 25%, random bytes are far above it.
UTF8_PROBE, MAX_INVALID_FRACTION, BINARY_INVALID_FRACTION = 1 << 16, 0.01, 0.25
ICONV_HINT = "convert it to UTF-8 first, e.g. for Latin-1 text `iconv -f latin1 -t utf-8 in.txt > out.txt`"

# Pure-ASCII blocks (the common case) drop their control characters at the byte level, which is much faster.
# (Not done on other blocks: dropping a byte between two invalid fragments could glue them into a character.)
_CONTROL_BYTES = bytes([*range(0x01, 0x09), *range(0x0E, 0x20), 0x7F])
_INVALID = re.compile("[\udc80-\udcff]")  # invalid bytes, as decoded by errors="surrogateescape"
_JUNK = re.compile(
    "[\x01-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u00ad\u200b\u2060-\u2064\u206a-\u206f\ufeff"
    "\u202a-\u202e\u2066-\u2069\ufff9-\ufffb\U000e0001]"
)
_UNICODE_BREAKS = re.compile("[\x0b\x0c\x85\u2028]")
_BLANK_LINES = re.compile(r"\n\s*\n")  # two or more newlines with only whitespace between
_BLANK_LINE_SPLIT = re.compile(r"\n(?:[^\S\n]*\n)+|" + re.escape(EOT))
_EOT_SPLIT = re.compile(re.escape(EOT))
# Where a long document may be cut (see step 6): before a run of whitespace that follows other text, else between
# two ASCII characters that are not whitespace (neither composes with the other under NFC).
_CUT_AT_SPACE = re.compile(r"\S(?=\s)")
_CUT_IN_ASCII = re.compile(r"[!-~](?=[!-~])")


def _first_invalid_byte(path: Path) -> tuple[int, int]:
    """(line, byte offset) of the first byte of `path` that is not UTF-8, counted from 1 and 0; (0, -1) if none."""
    decoder = codecs.getincrementaldecoder("utf-8")()  # strict
    offset, line = 0, 1
    with open(path, "rb") as f:
        while True:
            raw = f.read(BLOCK)
            held = len(decoder.getstate()[0])  # an unfinished character from the previous block
            try:
                decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:  # e.start counts from the held bytes
                return line + raw[: max(0, e.start - held)].count(b"\n"), offset - held + e.start
            if not raw:
                return 0, -1
            offset += len(raw)
            line += raw.count(b"\n")


def _check_utf8(path: Path, invalid: int, seen: int, whole: bool) -> None:
    """Refuse text whose share of invalid UTF-8 bytes, `invalid` of the `seen` read so far, is over the limit."""
    if invalid <= MAX_INVALID_FRACTION * seen:
        return
    part = "its" if whole else "its first"
    if invalid > BINARY_INVALID_FRACTION * seen:
        raise TinyGPTError(f"{path} looks binary ({invalid} of {part} {seen} bytes are not UTF-8); give a UTF-8 "
                           f"text file, or if it is text in another encoding, {ICONV_HINT}")
    line, offset = _first_invalid_byte(path)
    raise TinyGPTError(f"{path} is not UTF-8 text: {invalid:,} of {part} {seen:,} bytes are invalid (over "
                       f"{MAX_INVALID_FRACTION:.0%}; the first at line {line}, byte {offset}); {ICONV_HINT}")


def _text_blocks(path: Path, stats: dict) -> Iterator[str]:
    """`path` decoded and normalised (steps 1-4 of the module docstring), in blocks of about BLOCK bytes."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="surrogateescape")
    with open(path, "rb") as f, progress(total=path.stat().st_size, unit="B", unit_scale=True, desc="clean") as bar:
        probed, held_cr = False, ""
        while True:
            raw = f.read(BLOCK)
            nul = raw.find(b"\x00")
            if nul >= 0:
                raise TinyGPTError(
                    f"{path} looks binary (NUL byte at offset {stats['bytes_in'] + nul}); give a UTF-8 text file "
                    "(UTF-16 text must be converted to UTF-8 first)"
                )
            stats["bytes_in"] += len(raw)
            bar.update(len(raw))
            if raw.isascii():
                kept = raw.translate(None, _CONTROL_BYTES)
                stats["control_characters_dropped"] += len(raw) - len(kept)
                text = decoder.decode(kept, final=not raw)
                ascii_done = text.isascii()  # not if a character cut at the previous block's end was invalid
            else:
                text = decoder.decode(raw, final=not raw)
                ascii_done = False
            if not ascii_done:
                text, invalid = _INVALID.subn("\ufffd", text)
                stats["replaced_characters"] += invalid
                text, junk = _JUNK.subn("", text)
                stats["control_characters_dropped"] += junk
            text, held_cr = held_cr + text, ""
            if raw and text.endswith("\r"):  # it may be half of a CRLF pair: decide with the next block
                text, held_cr = text[:-1], "\r"
            if "\r" in text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            if ascii_done:
                text = text.replace("\x0b", "\n").replace("\x0c", "\n")
            else:
                text = _UNICODE_BREAKS.sub("\n", text).replace("\u2029", "\n\n")
            if not raw or (not probed and stats["bytes_in"] >= UTF8_PROBE):
                probed = True
                _check_utf8(path, stats["replaced_characters"], stats["bytes_in"], whole=not raw)
            yield text
            if not raw:
                return


def _split(blocks: Iterator[str], split: str) -> Iterator[tuple[str, bool]]:
    """Documents from text blocks, as (text, ends its document) pieces (not yet stripped): all but the last
    document of a block come whole, and of the last the part that cannot begin a separator; a separator cut by
    a block boundary is rejoined."""
    pattern = _BLANK_LINE_SPLIT if split == "blank_line" else _EOT_SPLIT
    pending, started = "", False  # started: a piece of the pending document was yielded
    for text in blocks:
        *documents, pending = pattern.split(pending + text)
        for document in documents:
            yield document, True
        started = started and not documents
        # hold back what could begin a separator: trailing whitespace (a blank line) or a cut <|endoftext|>
        keep = min(len(pending.rstrip()), len(pending) - len(EOT) + 1)
        if keep > 0:
            yield pending[:keep], False
            pending, started = pending[keep:], True
    if started or pending.strip():  # text after the last separator; whitespace there is not an empty document
        yield pending, True


def _normalize(doc: str) -> str:
    if not doc.isascii():
        doc = unicodedata.normalize("NFC", doc)
    if "\n" in doc:
        doc = _BLANK_LINES.sub("\n\n", doc)
    return doc


def _last_cut(text: str) -> int:
    """The last point where a document may be cut (see step 6), or 0 if there is none."""
    for pattern in (_CUT_AT_SPACE, _CUT_IN_ASCII):
        window = 256
        while True:
            lo = max(0, len(text) - window)
            found = [m.end() for m in pattern.finditer(text, lo)]
            if found and found[-1] > lo:
                return found[-1]
            if lo == 0:
                break
            window *= 16
    return 0


class _DocumentNormalizer:
    """Step 6 on a document that arrives in pieces: NFC, strip, collapse blank lines, piece by piece."""

    def __init__(self) -> None:
        self.held, self.started = "", False

    def feed(self, text: str, last: bool) -> str:
        text = self.held + text
        if last:
            self.held = ""
            return self._normalize(text.rstrip())
        cut = _last_cut(text)
        self.held = text[cut:]
        return self._normalize(text[:cut])

    def _normalize(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        return _normalize(text)


class _Document:
    """A document on its way to the output, normalized as its pieces arrive: its bytes are held in memory until
    they pass a block, then written as they come (`spilled`); its hash, size and line count grow with each piece."""

    def __init__(self, offset: int) -> None:
        self.offset = offset  # where it starts in the output
        self.normalizer = _DocumentNormalizer()
        self.hash = hashlib.blake2b(digest_size=8)
        self.held: list[bytes] = []
        self.held_bytes = self.size = self.lines = 0
        self.spilled, self.key = False, 0

    def add(self, text: str, last: bool) -> None:
        text = self.normalizer.feed(text, last)
        if text:
            data = text.encode()
            self.hash.update(data)
            self.held.append(data)
            self.held_bytes += len(data)
            self.size += len(data)
            self.lines += text.count("\n")

    def spill(self, f) -> None:
        f.write(b"".join(self.held))
        self.held, self.held_bytes, self.spilled = [], 0, True

    def kept(self, seen: set[int], counts: dict) -> bool:
        """Whether the finished document is kept: not empty and not a duplicate (each counted in `counts`)."""
        if not self.size:
            counts["empty"] += 1
            return False
        self.key = int.from_bytes(self.hash.digest(), "little")
        if self.key in seen:
            counts["duplicates"] += 1
            return False
        return True


def clean_corpus(
    input: str | os.PathLike,
    out: str | os.PathLike,
    stats: str | os.PathLike | None = None,
    split: str = "auto",
    max_lines: int | None = None,
    max_bytes: int | None = None,
) -> dict:
    """Clean `input` into `out` (and the stats JSON `stats`, if given), atomically; return the stats."""
    input_path = require_file(input, "raw corpus", "run `tinygpt download` first")
    out = Path(out)
    if split not in SPLITS:
        raise TinyGPTError(f"--split {split!r} is unknown; use one of {', '.join(SPLITS)}")
    if out.resolve() == input_path.resolve():
        raise TinyGPTError(f"--out {out} is the same file as --input; write the clean corpus elsewhere")
    for flag, cap in (("--max_lines", max_lines), ("--max_bytes", max_bytes)):
        if cap is not None and cap <= 0:
            raise TinyGPTError(f"{flag} {cap} must be a positive number (or left out for no cap)")
    split = "eot" if split == "auto" else split

    counts = dict(documents_in=0, documents_out=0, duplicates=0, empty=0, bytes_in=0, bytes_out=0, lines_out=0,
                  replaced_characters=0, control_characters_dropped=0)
    seen: set[int] = set()
    truncated = False
    doc_end = DOC_END.encode()

    def over_cap(size: int, lines: int) -> bool:
        return (max_bytes is not None and counts["bytes_out"] + size > max_bytes) or (
            max_lines is not None and counts["lines_out"] + lines > max_lines)

    with atomic_open(out, "wb") as f:
        document = None  # the document being read
        for text, ends in _split(_text_blocks(input_path, counts), split):
            if document is None:
                counts["documents_in"] += 1
                document = _Document(counts["bytes_out"])
            document.add(text, ends)
            if document.spilled or document.held_bytes >= BLOCK:
                document.spill(f)  # a long document goes to the output in pieces, to be cut back off if need be
            if not ends:
                continue
            kept = document.kept(seen, counts)
            if kept and over_cap(document.size + len(doc_end), document.lines + 2):
                truncated = True
            if truncated or not kept:
                if document.spilled:
                    f.seek(document.offset)
                    f.truncate()
                if truncated:
                    break
            else:
                seen.add(document.key)
                document.spill(f)
                f.write(doc_end)
                counts["documents_out"] += 1
                counts["bytes_out"] += document.size + len(doc_end)
                counts["lines_out"] += document.lines + 2
            document = None
        if truncated:  # the cap stopped reading: the UTF-8 rule still holds for what was read
            _check_utf8(input_path, counts["replaced_characters"], counts["bytes_in"],
                        whole=counts["bytes_in"] == input_path.stat().st_size)
        if not counts["documents_out"]:
            if truncated:
                hint = " or --split blank_line to cut a text without <|endoftext|> at its blank lines" * (split == "eot")
                raise TinyGPTError(f"the first document of {input_path} is already over --max_bytes/--max_lines; "
                                   f"raise the cap{hint}")
            raise TinyGPTError(f"{input_path} cleans to nothing ({counts['documents_in']} documents, all empty or "
                               "duplicates); check that it is the right file")

    result = {"input": str(input_path), "output": str(out), "split": split, **counts, "truncated": truncated}
    if counts["replaced_characters"]:
        line, offset = _first_invalid_byte(input_path)
        print(f"warning: {input_path}: {counts['replaced_characters']:,} of its {counts['bytes_in']:,} bytes are "
              f"not UTF-8 (the first at line {line}, byte {offset}) and became U+FFFD; if the file is in another "
              "encoding, convert it to UTF-8 first (iconv)", file=sys.stderr)
    if stats is not None:
        with atomic_path(stats) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result


def iter_documents(path: str | os.PathLike) -> Iterator[str]:
    """Stream the documents of a cleaned corpus (each was written as doc + "\\n<|endoftext|>\\n")."""
    path = require_file(path, "clean corpus", "run `tinygpt clean` first")
    pending = ""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            while block := f.read(BLOCK):
                # a separator on the very first line ends an empty first document (DOC_END wants a newline before)
                pending = (pending or "\n" * block.startswith(DOC_END[1:])) + block
                docs = pending.split(DOC_END)
                pending = docs.pop()
                yield from docs
    except UnicodeDecodeError as e:
        raise TinyGPTError(f"{path} is not UTF-8 text (byte {e.start}); pass a corpus written by tinygpt clean") from None
    if pending.strip():  # a file cut short, or not from tinygpt clean: its last document has no separator
        yield pending.strip()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tinygpt clean",
        description="Clean raw text into a corpus of unique documents: UTF-8, NFC, \\n newlines, no control "
                    "characters, no empty or duplicate documents; each document ends with a line <|endoftext|>.")
    parser.add_argument("--input", required=True, help="raw UTF-8 text, e.g. from tinygpt download")
    parser.add_argument("--out", required=True, help="the clean corpus to write")
    parser.add_argument("--stats", default=None, help="where to write the cleaning statistics (JSON)")
    parser.add_argument("--split", choices=SPLITS, default="auto",
                        help="where documents end: at <|endoftext|> (a text without one is one document, its "
                             "paragraphs intact), at blank lines too, or auto (the default: the same as eot)")
    parser.add_argument("--max_lines", type=int, default=None, help="stop before the output passes this many lines (whole documents)")
    parser.add_argument("--max_bytes", type=int, default=None, help="stop before the output passes this many bytes (whole documents)")
    args = parser.parse_args(argv)
    result = clean_corpus(args.input, args.out, args.stats, args.split, args.max_lines, args.max_bytes)
    print(f"wrote {result['output']}: {result['documents_out']:,} documents, {result['bytes_out']:,} bytes "
          f"({result['duplicates']:,} duplicates, {result['empty']:,} empty dropped; split={result['split']})")


if __name__ == "__main__":
    run_cli(main)

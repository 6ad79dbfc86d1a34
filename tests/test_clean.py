import json
import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygpt.data import clean
from tinygpt.data.clean import EOT, clean_corpus, iter_documents, main
from tinygpt.common import TinyGPTError, run_cli

# The format characters cleaning drops, listed independently of the module's regular expression.
DROPPED_FORMAT = {0xAD, 0x200B, 0x2060, 0x2061, 0x2062, 0x2063, 0x2064, 0xFEFF, 0x202A, 0x202B, 0x202C, 0x202D,
                  0x202E, 0x2066, 0x2067, 0x2068, 0x2069, 0xFFF9, 0xFFFA, 0xFFFB, 0xE0001, *range(0x206A, 0x2070)}


def reference_clean(raw: bytes, split: str) -> tuple[bytes, dict]:
    """Whole-file, character-by-character cleaning: slow and obvious, to check the streaming version against."""
    text = raw.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    replaced = sum(1 for ch in text if "\udc80" <= ch <= "\udcff")
    text = "".join("\ufffd" if "\udc80" <= ch <= "\udcff" else ch for ch in text)

    def junk(ch: str) -> bool:
        return (unicodedata.category(ch) == "Cc" and ch not in "\t\n\r\x0b\x0c\x85") or ord(ch) in DROPPED_FORMAT

    dropped = sum(map(junk, text))
    text = "".join(ch for ch in text if not junk(ch))
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2029", "\n\n")
    for ch in "\x0b\x0c\x85\u2028":
        text = text.replace(ch, "\n")
    if split == "auto":
        split = "eot"
    pieces = text.split(EOT)
    if split == "eot":
        docs = pieces
    else:  # group runs of non-blank lines
        docs = []
        for piece in pieces:
            current: list[str] = []
            for line in piece.split("\n") + [""]:
                if line.strip():
                    current.append(line)
                elif current:
                    docs.append("\n".join(current))
                    current = []
    out, seen, duplicates = [], set(), 0
    for doc in docs:
        doc = unicodedata.normalize("NFC", doc).strip()
        lines: list[str] = []
        for line in doc.split("\n"):  # collapse runs of blank lines to one empty line
            if line.strip() or not lines or lines[-1] != "":
                lines.append(line if line.strip() else "")
        doc = "\n".join(lines)
        if not doc:
            continue
        if doc in seen:
            duplicates += 1
            continue
        seen.add(doc)
        out.append(doc)
    data = "".join(d + f"\n{EOT}\n" for d in out).encode()
    stats = dict(documents_out=len(out), duplicates=duplicates, replaced_characters=replaced,
                 control_characters_dropped=dropped, bytes_out=len(data), split=split,
                 lines_out=sum(d.count("\n") + 2 for d in out))
    return data, stats


PIECES = [
    "Once", "upon", "a", "time", " ", " ", "\t", ".", "\n", "\n", "\n\n", "\r\n", "\r", " \n", "\n  \n",
    EOT, f"\n{EOT}\n", "<|endof", "text|>", "café", "e\u0301", "\u0301", "日本", "😀", "👨\u200d👩\u200d👧",
    "\x01", "\x1b", "\x7f", "\x0c", "\x0b", "\x85", "\u2028", "\u2029", "\u00ad", "\u200b", "\ufeff", "\u202e",
    "\u200c", "\u200d", "\u200f", "🏴\U000e0067\U000e0062\U000e007f", "\ufffd",
]
INVALID = [b"\xff", b"\xfe", b"\x80", b"\xe2\x82"]


@st.composite
def raw_texts(draw) -> bytes:
    parts = draw(st.lists(st.one_of(st.sampled_from(PIECES).map(str.encode), st.sampled_from(INVALID)), max_size=60))
    return b"".join(parts)


@settings(max_examples=300, deadline=None)
@given(raw=raw_texts(), split=st.sampled_from(["auto", "eot", "blank_line"]), block=st.sampled_from([3, 7, 64, 1 << 22]),
       limit=st.sampled_from([0.01, 0.2, 1.0]))
def test_streaming_clean_matches_the_whole_file_reference(tmp_path_factory, raw, split, block, limit):
    folder = tmp_path_factory.mktemp("c")
    (folder / "raw.txt").write_bytes(raw)
    expected, expected_stats = reference_clean(raw, split)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(clean, "BLOCK", block)  # small blocks cut separators, CRLF and characters apart
        mp.setattr(clean, "MAX_INVALID_FRACTION", limit)  # 1.0 never refuses, so the replacement is tested too
        if expected_stats["replaced_characters"] > limit * len(raw):
            with pytest.raises(TinyGPTError, match="is not UTF-8 text|looks binary"):
                clean_corpus(folder / "raw.txt", folder / "clean.txt", None, split)
            assert not (folder / "clean.txt").exists()
            return
        if not expected_stats["documents_out"]:
            with pytest.raises(TinyGPTError, match="cleans to nothing"):
                clean_corpus(folder / "raw.txt", folder / "clean.txt", None, split)
            assert not (folder / "clean.txt").exists()
            return
        stats = clean_corpus(folder / "raw.txt", folder / "clean.txt", None, split)
    assert (folder / "clean.txt").read_bytes() == expected
    assert {k: stats[k] for k in expected_stats} == expected_stats
    assert stats["bytes_in"] == len(raw)
    assert list(iter_documents(folder / "clean.txt")) == expected.decode().split(f"\n{EOT}\n")[:-1]


def write(tmp_path, data: str | bytes, name="raw.txt"):
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def test_known_answer_and_stats_file(tmp_path):
    raw = write(tmp_path, f"  Hello\r\nworld\x07  \n{EOT}\n\n{EOT}\nHello\r\nworld\n{EOT}\nCafe\u0301\n\n\n\nend\n{EOT}\n")
    stats = clean_corpus(raw, tmp_path / "clean.txt", tmp_path / "stats.json")
    assert (tmp_path / "clean.txt").read_text() == f"Hello\nworld\n{EOT}\nCafé\n\nend\n{EOT}\n"
    assert json.loads((tmp_path / "stats.json").read_text()) == stats
    assert stats | {} == dict(
        input=str(raw), output=str(tmp_path / "clean.txt"), split="eot", documents_in=4, documents_out=2,
        duplicates=1, empty=1, bytes_in=raw.stat().st_size, bytes_out=(tmp_path / "clean.txt").stat().st_size,
        lines_out=7, replaced_characters=0, control_characters_dropped=1, truncated=False)


@pytest.mark.parametrize("block", [1, 2, 3, 4, 1 << 22])
def test_crlf_and_separators_cut_by_block_boundaries(tmp_path, monkeypatch, block):
    monkeypatch.setattr(clean, "BLOCK", block)
    raw = write(tmp_path, f"ab\r\x01\ncd\r\n{EOT}\r\ncafé\r".encode())
    stats = clean_corpus(raw, tmp_path / "clean.txt")
    assert list(iter_documents(tmp_path / "clean.txt")) == ["ab\ncd", "café"]
    assert stats["control_characters_dropped"] == 1 and stats["split"] == "eot"


def test_auto_split_keeps_a_text_without_separators_as_one_document(tmp_path):
    """A book or notes given as one file keep their paragraph breaks (issue 19: blank_line erased every one);
    blank_line, chosen, still makes each paragraph a document."""
    raw = write(tmp_path, "one\ntwo\n\n\nthree\n \t\nfour")
    stats = clean_corpus(raw, tmp_path / "clean.txt")
    assert stats["split"] == "eot" and stats["documents_out"] == 1
    assert list(iter_documents(tmp_path / "clean.txt")) == ["one\ntwo\n\nthree\n\nfour"]
    stats = clean_corpus(raw, tmp_path / "clean.txt", split="blank_line")
    assert stats["split"] == "blank_line"
    assert list(iter_documents(tmp_path / "clean.txt")) == ["one\ntwo", "three", "four"]


def test_one_huge_document_is_cleaned_in_bounded_memory(tmp_path, monkeypatch):
    """A document 64 blocks long is normalised piece by piece: peak memory stays a few blocks (a block is held
    in several forms at once: bytes, decoded, normalised), and the output is the whole-file reference's, NFC,
    stripped lines and collapsed blank lines included."""
    import tracemalloc

    block = 1 << 14
    monkeypatch.setattr(clean, "BLOCK", block)
    paragraph = "  Cafe\u0301 au lait,\tnaïve Zoë\u0308 — 東京 e\u0301 \n  second line   \n\n \n\n"
    text = "\n\n " + paragraph * (64 * block // len(paragraph.encode())) + "x" * 3 * block + " y\n \n"
    raw = write(tmp_path, text)
    expected, expected_stats = reference_clean(raw.read_bytes(), "auto")
    assert expected_stats["documents_out"] == 1 and len(expected) > 60 * block
    del text
    tracemalloc.start()
    try:
        stats = clean_corpus(raw, tmp_path / "clean.txt")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (tmp_path / "clean.txt").read_bytes() == expected
    assert {k: stats[k] for k in expected_stats} == expected_stats
    assert peak < 32 * block, f"peak {peak:,} bytes for a {len(expected):,}-byte document"


@pytest.mark.parametrize("cap", ["max_bytes", "max_lines"])
def test_a_document_exactly_on_the_cap_is_kept_one_past_it_is_not(tmp_path, cap):
    docs = ["first doc\nline two", "second\n\nparagraph", "third"]
    raw = write(tmp_path, "".join(d + f"\n{EOT}\n" for d in docs))
    sizes = {"max_bytes": [len(d.encode()) + len(f"\n{EOT}\n") for d in docs],
             "max_lines": [d.count("\n") + 2 for d in docs]}[cap]
    exact = sizes[0] + sizes[1]
    for limit, kept in ((exact, 2), (exact - 1, 1), (exact + sizes[2] - 1, 2), (exact + sizes[2], 3)):
        stats = clean_corpus(raw, tmp_path / "clean.txt", **{cap: limit})
        assert list(iter_documents(tmp_path / "clean.txt")) == docs[:kept], limit
        assert stats["truncated"] == (kept < 3)
        assert stats[{"max_bytes": "bytes_out", "max_lines": "lines_out"}[cap]] == sum(sizes[:kept])


def test_a_few_invalid_bytes_are_replaced_counted_and_reported(tmp_path, capsys):
    text = b"".join(b"line %d is fine\n" % i for i in range(30))  # 470 bytes of UTF-8, then 3 bad ones
    raw = write(tmp_path, text + b"caf\xc3 ok \xff\xfe end")
    stats = clean_corpus(raw, tmp_path / "clean.txt", tmp_path / "stats.json")
    assert (tmp_path / "clean.txt").read_bytes() == text.strip() + f"\ncaf\ufffd ok \ufffd\ufffd end\n{EOT}\n".encode()
    assert stats["replaced_characters"] == 3 == json.loads((tmp_path / "stats.json").read_text())["replaced_characters"]
    warning = capsys.readouterr().err
    size = raw.stat().st_size
    assert f"warning: {raw}: 3 of its {size} bytes are not UTF-8 (the first at line 31, byte {len(text) + 3})" in warning


def test_valid_utf8_gives_no_warning(tmp_path, capsys):
    clean_corpus(write(tmp_path, "café ✓\n"), tmp_path / "clean.txt")
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("bad, refused", [(10, False), (11, True)])
def test_more_than_one_percent_invalid_is_refused(tmp_path, bad, refused):
    # 1000 bytes, `bad` of them invalid and all at the end: the whole-file check sees them, the first block's not.
    raw = write(tmp_path, b"a" * (1000 - bad - 1) + b"\n" + b"\xe9" * bad)
    if not refused:
        assert clean_corpus(raw, tmp_path / "clean.txt")["replaced_characters"] == bad
        return
    with pytest.raises(TinyGPTError, match=re.escape(f"{raw} is not UTF-8 text: 11 of its 1,000 bytes are invalid "
                                                      "(over 1%; the first at line 2, byte 989)")):
        clean_corpus(raw, tmp_path / "clean.txt")
    assert not (tmp_path / "clean.txt").exists()


@pytest.mark.parametrize("block", [1, 2, 5, 1 << 22])
def test_first_invalid_byte_is_found_across_block_boundaries(tmp_path, monkeypatch, block):
    monkeypatch.setattr(clean, "BLOCK", block)
    data = "ab\nçé\n€\n".encode()
    # a stray continuation byte; a character cut short before a newline; one cut short at the very end
    for bad in [data + b"\n\x80x", data[:-2] + b"\nz", data[:4] + b"\nz\n", data[:-2]]:
        raw = write(tmp_path, bad)
        with pytest.raises(UnicodeDecodeError) as e:  # the one-shot decoder, as the independent answer
            bad.decode("utf-8")
        assert clean._first_invalid_byte(raw) == (bad[: e.value.start].count(b"\n") + 1, e.value.start)
    assert clean._first_invalid_byte(write(tmp_path, data)) == (0, -1)


@pytest.mark.parametrize("data, message", [
    (b"text\x00more", "looks binary \\(NUL byte at offset 4\\)"),
    (bytes(range(128, 256)) * 4, "looks binary \\(512 of its 512 bytes are not UTF-8\\).*iconv"),
    (bytes(range(128, 256)) * 1024, "looks binary \\(65536 of its first 65536 bytes"),
])
def test_binary_input_is_rejected(tmp_path, monkeypatch, data, message):
    monkeypatch.setattr(clean, "BLOCK", 1 << 16)  # the first check comes after the first 64 kB, not at the end
    raw = write(tmp_path, data)
    with pytest.raises(TinyGPTError, match=message):
        clean_corpus(raw, tmp_path / "clean.txt")
    assert not (tmp_path / "clean.txt").exists()


def test_latin1_text_is_refused_with_the_conversion_to_run(tmp_path, capsys):
    # Issue 8: this was cleaned with every accented letter silently turned into U+FFFD, and exit status 0.
    raw = write(tmp_path, ("Le café était très bon, à côté de la forêt.\n\n" * 13).encode("latin-1"))
    (tmp_path / "clean.txt").write_text("previous")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--input", str(raw), "--out", str(tmp_path / "clean.txt")])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert f"error: {raw} is not UTF-8 text: 91 of its 585 bytes are invalid (over 1%; the first at line 1, byte 6)" in error
    assert "looks binary" not in error and "iconv -f latin1 -t utf-8 in.txt > out.txt" in error
    assert (tmp_path / "clean.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.txt", "raw.txt"]
    # converted as the message says, the same text cleans without a word about encodings
    write(tmp_path, raw.read_bytes().decode("latin-1").encode())
    stats = clean_corpus(raw, tmp_path / "clean.txt")
    assert stats["replaced_characters"] == 0 and stats["documents_out"] == 1  # one text, paragraphs intact
    assert "UTF-8" not in capsys.readouterr().err


@pytest.mark.parametrize("split", ["auto", "blank_line"])
@pytest.mark.parametrize("cap", [None, ["--max_bytes", "200"], ["--max_lines", "5"]])
def test_a_cap_does_not_let_latin1_through(tmp_path, capsys, cap, split):
    """Issue 19: with a cap, reading stopped before the 1% rule was checked (after 64 KiB or at the end of the
    file), so this 676-byte Latin-1 file was cleaned with U+FFFD in it and exit status 0."""
    data = "".join(f"Le café {i} était très bon, à côté.\nThe cat sat on the mat number {i} today.\n\n"
                   for i in range(20))
    data = data.encode("latin-1")[:675] + b"\n"
    invalid = sum(byte >= 0x80 for byte in data)
    assert len(data) == 676 and 0.07 < invalid / len(data) < 0.09
    raw = write(tmp_path, data)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--input", str(raw), "--out", str(tmp_path / "clean.txt"), "--split", split, *(cap or [])])
    assert exit_info.value.code == 1
    assert f"error: {raw} is not UTF-8 text: {invalid} of its 676 bytes are invalid" in capsys.readouterr().err
    assert not (tmp_path / "clean.txt").exists()


def test_input_that_cleans_to_nothing_is_an_error(tmp_path):
    raw = write(tmp_path, f" \n{EOT}\n\x01\n{EOT}\n")
    with pytest.raises(TinyGPTError, match="cleans to nothing"):
        clean_corpus(raw, tmp_path / "clean.txt")


@pytest.mark.parametrize("cap", ["max_lines", "max_bytes"])
def test_caps_keep_whole_documents(tmp_path, cap):
    docs = [f"doc {i}\nline two" for i in range(100)]
    raw = write(tmp_path, "".join(d + f"\n{EOT}\n" for d in docs))
    one = len((docs[0] + f"\n{EOT}\n").encode())
    limit = {"max_lines": 3 * 10 + 2, "max_bytes": 10 * one + one // 2}[cap]
    stats = clean_corpus(raw, tmp_path / "clean.txt", **{cap: limit})
    assert list(iter_documents(tmp_path / "clean.txt")) == docs[:10]
    assert stats["truncated"] and stats["documents_out"] == 10 and stats["lines_out"] == 30


def test_first_document_over_the_cap_is_an_error(tmp_path):
    raw = write(tmp_path, "a long document\n")
    with pytest.raises(TinyGPTError, match="over --max_bytes"):
        clean_corpus(raw, tmp_path / "clean.txt", max_bytes=5)


def test_missing_input_and_same_output_are_clear_errors(tmp_path):
    with pytest.raises(TinyGPTError, match="raw corpus not found"):
        clean_corpus(tmp_path / "nope.txt", tmp_path / "clean.txt")
    raw = write(tmp_path, "x")
    with pytest.raises(TinyGPTError, match="same file as --input"):
        clean_corpus(raw, raw)
    with pytest.raises(TinyGPTError, match="--split 'lines'"):
        clean_corpus(raw, tmp_path / "clean.txt", split="lines")


def test_a_failed_clean_keeps_the_previous_output(tmp_path):
    (tmp_path / "clean.txt").write_text("previous")
    raw = write(tmp_path, b"\x00\x01")
    with pytest.raises(TinyGPTError):
        clean_corpus(raw, tmp_path / "clean.txt")
    assert (tmp_path / "clean.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.txt", "raw.txt"]


def test_cli(tmp_path, capsys):
    raw = write(tmp_path, f"a\n{EOT}\nb\n{EOT}\na\n")
    main(["--input", str(raw), "--out", str(tmp_path / "c.txt"), "--stats", str(tmp_path / "s.json"),
          "--split", "eot", "--max_lines", "100", "--max_bytes", "1000"])
    assert re.search(r"2 documents.*1 duplicates", capsys.readouterr().out)
    assert json.loads((tmp_path / "s.json").read_text())["documents_out"] == 2


def test_iter_documents_on_a_generated_corpus_roundtrips(tmp_path):
    docs = ["first\n\nparagraph", "second ✓", "x"]
    path = write(tmp_path, "".join(d + f"\n{EOT}\n" for d in docs), "clean.txt")
    assert list(iter_documents(path)) == docs
    # a separator on the first line ends an empty document; it never becomes text
    path = write(tmp_path, f"{EOT}\n" + "".join(d + f"\n{EOT}\n" for d in docs), "leading.txt")
    assert list(iter_documents(path)) == ["", *docs]
    with pytest.raises(TinyGPTError, match="clean corpus not found"):
        next(iter_documents(tmp_path / "missing.txt"))

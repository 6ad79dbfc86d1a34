"""Reading the formats users keep text in: the same documents give the same clean corpus whatever the container,
and each kind of bad input is one clear error that names the file and leaves no output."""

import bz2
import gzip
import json
import lzma
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from tinygpt.common import EOT, TinyGPTError, run_cli
from tinygpt.data import formats
from tinygpt.data.clean import clean_corpus
from tinygpt.data.download import download, main
from tinygpt.data.formats import detect, expand_paths, read_as_corpus

# Already clean documents (stripped, NFC, unique), so the expected corpus is simply each one and a separator.
# Blank lines inside a document must not split it: only the container says where documents end.
DOCS = [
    "Once upon a time there was a fox.\n\nThe fox liked jam.",
    "Café, naïve, 日本語 and 😀 are all fine.",
    "A short one.",
    "Tabs\tstay.\nLines stay.\n\nParagraphs stay.",
    "The last document.",
]
EXPECTED_CORPUS = "".join(f"{doc}\n{EOT}\n" for doc in DOCS).encode()
COMPRESS = {"": lambda data: data, ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
            ".zst": lambda data: zstandard.ZstdCompressor().compress(data)}


def text_bytes(docs) -> bytes:
    return "".join(f"{doc}\n{EOT}\n" for doc in docs).encode()


def jsonl_bytes(docs, field="text") -> bytes:
    return "".join(json.dumps({"id": i, field: doc}) + "\n" for i, doc in enumerate(docs)).encode()


def parquet_bytes(tmp_path: Path, docs, column="text", **table) -> bytes:
    path = tmp_path / "_made.parquet"
    pq.write_table(pa.table({"id": list(range(len(docs))), column: docs, **table}), path, row_group_size=2)
    data = path.read_bytes()
    path.unlink()
    return data


def make(tmp_path: Path, name: str, docs=DOCS) -> Path:
    """Write `docs` to tmp_path/name in the format and compression its name says (written independently of
    the readers: the standard library, zstandard and pyarrow)."""
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, suffix = (name[: -len(s)], s) if (s := Path(name).suffix) in COMPRESS else (name, "")
    kind = Path(stem).suffix
    data = (jsonl_bytes(docs) if kind in (".jsonl", ".json", ".ndjson")
            else parquet_bytes(tmp_path, docs) if kind == ".parquet" else text_bytes(docs))
    path.write_bytes(COMPRESS[suffix](data))
    return path


def corpus_of(tmp_path: Path, paths, **options) -> bytes:
    raw = download("file", tmp_path / "out" / "raw.txt", paths=[str(p) for p in paths], **options)
    clean_corpus(raw, tmp_path / "out" / "corpus.txt")
    return (tmp_path / "out" / "corpus.txt").read_bytes()


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("name, forced, expected", [
    ("x.jsonl.gz", "auto", ("jsonl", "gzip")),
    ("x.json.zst", "auto", ("jsonl", "zstd")),
    ("x.ndjson.zstd", "auto", ("jsonl", "zstd")),
    ("x.parquet", "auto", ("parquet", None)),
    ("x.txt.bz2", "auto", ("text", "bzip2")),
    ("X.JSONL.XZ", "auto", ("jsonl", "xz")),
    ("x.md", "auto", ("text", None)),
    ("README", "auto", ("text", None)),
    ("x.txt.gz", "jsonl", ("jsonl", "gzip")),
    ("x.jsonl", "text", ("text", None)),
    ("x.data", "parquet", ("parquet", None)),
])
def test_format_and_compression_come_from_the_name_unless_forced(name, forced, expected):
    assert detect(name, forced) == expected


@pytest.mark.parametrize("name", ["books.tar.gz", "books.tgz", "books.zip", "books.tar"])
def test_an_archive_is_an_error_not_garbage_text(tmp_path, name):
    (tmp_path / name).write_bytes(gzip.compress(b"not really a tar"))
    expect_error(tmp_path, [tmp_path / name], re.escape(f"{name} is an archive of files; unpack it"))


def test_unknown_format_is_an_error(tmp_path):
    with pytest.raises(TinyGPTError, match="--format 'csv' is unknown"):
        download("file", tmp_path / "raw.txt", paths=[str(make(tmp_path, "a.txt"))], format="csv")


# ------------------------------------------------------------------------------------- the same documents


@pytest.mark.parametrize("kind", [".txt", ".md", ".jsonl", ".json", ".ndjson", ".parquet"])
@pytest.mark.parametrize("compression", ["", ".gz", ".bz2", ".xz", ".zst"])
def test_every_container_gives_the_same_corpus(tmp_path, kind, compression):
    assert corpus_of(tmp_path, [make(tmp_path, f"docs{kind}{compression}")]) == EXPECTED_CORPUS


def test_a_mixed_list_a_folder_and_a_glob_give_the_same_corpus(tmp_path):
    parts = [make(tmp_path, "mixed/a.jsonl.gz", DOCS[:2]), make(tmp_path, "mixed/b.parquet", DOCS[2:3]),
             make(tmp_path, "mixed/c.txt.zst", DOCS[3:4]), make(tmp_path, "mixed/d.md", DOCS[4:])]
    assert corpus_of(tmp_path, parts) == EXPECTED_CORPUS
    assert corpus_of(tmp_path, [tmp_path / "mixed"]) == EXPECTED_CORPUS
    assert corpus_of(tmp_path, [f"{tmp_path}/mixed/*"]) == EXPECTED_CORPUS


def test_a_text_file_without_separators_is_one_document_when_joined(tmp_path):
    (tmp_path / "notes.txt").write_text("no separator here\n\nbut two paragraphs")
    corpus = corpus_of(tmp_path, [make(tmp_path, "a.jsonl", DOCS[:1]), tmp_path / "notes.txt"])
    assert corpus == text_bytes([DOCS[0], "no separator here\n\nbut two paragraphs"])


def test_folders_are_read_recursively_in_sorted_order_without_hidden_files(tmp_path):
    make(tmp_path, "data/b/z.txt", ["third"])
    make(tmp_path, "data/b/a.jsonl", ["second"])
    make(tmp_path, "data/a.parquet", ["first"])
    make(tmp_path, "data/c.txt", ["fourth"])
    make(tmp_path, "data/.DS_Store", ["hidden file"])
    make(tmp_path, "data/.git/HEAD", ["hidden folder"])
    data = tmp_path / "data"
    assert expand_paths([str(data)]) == [data / "a.parquet", data / "b/a.jsonl", data / "b/z.txt", data / "c.txt"]
    # `**` matches folders and the files inside them: each file once, in order
    assert expand_paths([f"{data}/**"]) == expand_paths([str(data)])
    assert corpus_of(tmp_path, [data]) == text_bytes(["first", "second", "third", "fourth"])


def test_zstd_files_of_several_frames_are_read_whole(tmp_path):
    compressor = zstandard.ZstdCompressor()
    (tmp_path / "two.jsonl.zst").write_bytes(compressor.compress(jsonl_bytes(DOCS[:2]))
                                             + compressor.compress(jsonl_bytes(DOCS[2:])))
    assert corpus_of(tmp_path, [tmp_path / "two.jsonl.zst"]) == EXPECTED_CORPUS


def test_text_field_and_forced_format(tmp_path):
    (tmp_path / "posts.dat").write_bytes(jsonl_bytes(DOCS, field="body") + b"\n\n")  # blank lines are skipped
    assert corpus_of(tmp_path, [tmp_path / "posts.dat"], format="jsonl", text_field="body") == EXPECTED_CORPUS
    (tmp_path / "table.bin").write_bytes(parquet_bytes(tmp_path, DOCS, column="content"))
    assert corpus_of(tmp_path, [tmp_path / "table.bin"], format="parquet", text_field="content") == EXPECTED_CORPUS
    # forced text: the JSON lines themselves become the text, one document (the file has no separator)
    raw = download("file", tmp_path / "raw.txt", paths=[str(tmp_path / "posts.dat")], format="text")
    assert raw.read_bytes() == (tmp_path / "posts.dat").read_bytes()


def test_the_separator_inside_a_document_is_removed_with_a_warning(tmp_path, capsys):
    docs = [f"Models end text with {EOT} tokens.", "<|endof" + EOT + "text|> nested", "plain"]
    for name in ("docs.jsonl", "docs.parquet"):
        corpus = corpus_of(tmp_path, [make(tmp_path, name, docs)])
        assert corpus == text_bytes(["Models end text with  tokens.", "nested", "plain"])
        unit = "line" if name.endswith("jsonl") else "row"
        assert f"{tmp_path / name}: removed 3 literal '{EOT}' string(s) from its documents (first in {unit} 1)" in (
            capsys.readouterr().err)


def test_a_lone_surrogate_in_json_is_counted_by_clean_as_invalid_utf8(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"line {i} is plain"}) + "\n" for i in range(40))
                                      + '{"text": "half an emoji \\ud83d here"}\n')
    raw = download("file", tmp_path / "raw.txt", paths=[str(tmp_path / "a.jsonl")])
    stats = clean_corpus(raw, tmp_path / "corpus.txt")
    assert stats["replaced_characters"] == 3 and "\ufffd" * 3 in (tmp_path / "corpus.txt").read_text()
    assert "3 of its" in capsys.readouterr().err


def test_a_size_cap_keeps_whole_documents_of_any_format(tmp_path):
    path = make(tmp_path, "docs.parquet.gz")
    cap = len(text_bytes(DOCS[:3])) + 5
    raw = download("file", tmp_path / "raw.txt", paths=[str(path)], size=cap)
    assert raw.read_bytes() == text_bytes(DOCS[:3])


def test_parquet_is_read_in_bounded_memory(tmp_path):
    docs = [f"document {i} " * 100 for i in range(8000)]  # about 11 MB of text, in 80 row groups
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": docs}), path, row_group_size=100)
    del docs
    whole_start = pa.total_allocated_bytes()
    table = pq.read_table(path)  # the peer: the whole column at once
    whole = pa.total_allocated_bytes() - whole_start
    del table
    start, peak, total = pa.total_allocated_bytes(), 0, 0
    for block in read_as_corpus(path):
        total += len(block)
        peak = max(peak, pa.total_allocated_bytes() - start)
    assert total > 10_000_000 and whole > 10_000_000
    assert peak < whole / 4, (peak, whole)  # (about 1 MB against 11 MB: a batch of rows at a time)


# ------------------------------------------------------------------------------------------------ bad input


def expect_error(tmp_path: Path, paths, message: str, **options) -> None:
    """The download fails with `message`, keeps the previous output, and leaves no temporary file."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "raw.txt").write_text("previous corpus")
    with pytest.raises(TinyGPTError, match=message):
        download("file", out / "raw.txt", paths=[str(p) for p in paths], **options)
    assert (out / "raw.txt").read_text() == "previous corpus" and files_in(out) == ["raw.txt"]


def write_lines(tmp_path: Path, name: str, *lines: str) -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"text": "fine"})


@pytest.mark.parametrize("line, message", [
    ('{"text": "unterminated', "line 3 is not valid JSON"),
    ('["text", "a list"]', "line 3 is a JSON list, not an object"),
    ('{"body": "x", "id": 1}', "line 3 has no field 'text' \\(its fields: 'body', 'id'\\); set download.text_field"),
    ('{"text": 42}', "line 3: field 'text' is int, not a string"),
    ('{"text": null}', "line 3: field 'text' is null, not a string"),
])
def test_bad_json_lines_name_the_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path, "bad.jsonl", GOOD, GOOD, line, GOOD)
    expect_error(tmp_path, [path], re.escape(str(path)) + " " + message)


def test_json_lines_that_are_not_utf8_name_the_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes((GOOD + "\n" + json.dumps({"text": "café"}, ensure_ascii=False) + "\n").encode("latin-1"))
    expect_error(tmp_path, [path], re.escape(f"{path} line 2 is not UTF-8"))


def test_parquet_without_the_column_names_the_columns(tmp_path):
    path = tmp_path / "t.parquet"
    path.write_bytes(parquet_bytes(tmp_path, DOCS, column="content"))
    expect_error(tmp_path, [path], re.escape(f"{path} has no column 'text' (its columns: 'id', 'content')"))


def test_parquet_column_of_numbers_or_with_nulls(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), path)
    expect_error(tmp_path, [path], re.escape(f"{path}: column 'text' holds int64, not strings"))
    pq.write_table(pa.table({"text": ["a", "b", None, "d"]}), path, row_group_size=2)
    expect_error(tmp_path, [path], re.escape(f"{path} row 3: column 'text' is null"))


def test_a_parquet_file_damaged_in_the_middle(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": [f"document {i} " * 30 for i in range(2000)]}), path, row_group_size=500)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # inside a compressed page of a later row group
    path.write_bytes(data)
    expect_error(tmp_path, [path], re.escape(f"{path} is a damaged Parquet file (error after row ") + "[1-9]")


def test_a_file_that_is_not_parquet(tmp_path):
    path = tmp_path / "t.parquet"
    path.write_text("just text")
    expect_error(tmp_path, [path], re.escape(f"{path} is not a readable Parquet file"))


@pytest.mark.parametrize("name", ["docs.txt.gz", "docs.jsonl.bz2", "docs.json.xz", "docs.jsonl.zst", "docs.txt.zst",
                                  "docs.parquet.gz"])
def test_a_truncated_compressed_file_is_an_error(tmp_path, name):
    path = make(tmp_path, name, [f"document {i} " * 30 for i in range(200)])
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    expect_error(tmp_path, [path], re.escape(f"{path} is not a complete ") + ".*truncated or corrupt")


def test_a_file_named_gz_that_is_not_gzip(tmp_path):
    path = tmp_path / "plain.txt.gz"
    path.write_text("not compressed at all")
    expect_error(tmp_path, [path], re.escape(f"{path} is not a complete gzip stream"))


def test_an_error_in_a_later_file_keeps_the_previous_output(tmp_path):
    good = make(tmp_path, "a.jsonl")
    bad = write_lines(tmp_path, "b.jsonl", GOOD, "{oops")
    expect_error(tmp_path, [good, bad], re.escape(f"{bad} line 2 is not valid JSON"))


def test_empty_folder_and_hidden_only_folder_and_empty_glob(tmp_path):
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path, [tmp_path / "empty"], re.escape(f"--path '{tmp_path / 'empty'}' is a folder without files"))
    make(tmp_path, "hidden/.notes.txt")
    expect_error(tmp_path, [tmp_path / "hidden"], "is a folder without files \\(hidden ones are skipped\\)")
    expect_error(tmp_path, [f"{tmp_path}/*.jsonl"], re.escape(f"--path '{tmp_path}/*.jsonl' matches no file"))


def test_cli_reads_formats_and_exits_1_on_bad_input(tmp_path, capsys):
    good = make(tmp_path, "a.json.gz")
    main(["--source", "file", "--path", str(good), "--out", str(tmp_path / "raw.txt"), "--format", "jsonl",
          "--text_field", "text"])
    assert (tmp_path / "raw.txt").read_bytes() == text_bytes(DOCS)
    bad = write_lines(tmp_path, "b.jsonl", '{"content": "x"}')
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--source", "file", "--path", str(bad), "--out", str(tmp_path / "raw.txt")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith(f"error: {bad} line 1 has no field 'text'")
    assert (tmp_path / "raw.txt").read_bytes() == text_bytes(DOCS)


def test_zstd_reader_reads_in_small_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "ZSTD_READ", 7)  # frame ends and block ends fall inside a read
    compressor = zstandard.ZstdCompressor()
    data = text_bytes(DOCS)
    (tmp_path / "a.txt.zst").write_bytes(compressor.compress(data[:50]) + compressor.compress(data[50:]))
    assert b"".join(read_as_corpus(tmp_path / "a.txt.zst")) == data

"""Gaps that mutation testing (tools/mutation.py, docs/testing.md#mutation-testing) found: a mutant that changed
this behaviour survived the rest of the suite."""

from __future__ import annotations

import pytest

from tinygpt.common import TinyGPTError
from tinygpt.data import clean
from tinygpt.tokenizer.bpe import Tokenizer


@pytest.mark.parametrize("missing", ["--input", "--out"])
def test_clean_without_a_required_path_is_a_usage_error_naming_it(tmp_path, capsys, missing):
    # mutant: `--input` became optional, and clean then failed later without saying which flag was missing
    args = {"--input": str(tmp_path / "raw.txt"), "--out": str(tmp_path / "clean.txt")}
    (tmp_path / "raw.txt").write_text("hello\n", encoding="utf-8")
    del args[missing]
    with pytest.raises(SystemExit) as stop:
        clean.main([part for pair in args.items() for part in pair])
    assert stop.value.code == 2
    assert missing in capsys.readouterr().err
    assert not (tmp_path / "clean.txt").exists()


def test_a_missing_tokenizer_says_which_file_and_how_to_make_it(tmp_path):
    # mutant: the hint's text changed (upper case) and no test read it
    missing = tmp_path / "tokenizer.json"
    with pytest.raises(TinyGPTError, match=r"tokenizer not found: .*tokenizer\.json; run `tinygpt train_bpe`"):
        Tokenizer.load(missing)


def cleaned(path) -> list[str]:
    return list(clean.iter_documents(path))


def test_a_last_document_followed_by_much_whitespace_is_kept(tmp_path):
    # mutant: `_split` forgot that it had passed on a piece of the last document (`started`), so when the file
    # ended in 12 or more whitespace characters (what a cut <|endoftext|> needs held back) that document was
    # never finished and vanished from the output
    raw = tmp_path / "raw.txt"
    for tail in ["\n" * 12, " \n" * 20, "\n"]:
        raw.write_text(f"A first story.\n<|endoftext|>\nThe last story.{tail}", encoding="utf-8")
        clean.clean_corpus(raw, tmp_path / "clean.txt", split="eot")
        assert cleaned(tmp_path / "clean.txt") == ["A first story.", "The last story."], repr(tail)


@pytest.mark.parametrize("case", ["duplicate", "over the cap"])
def test_a_long_document_that_is_dropped_leaves_none_of_its_bytes(tmp_path, monkeypatch, case):
    # mutant: a document longer than a block, written to the output as it came (`spilled`), was not cut back
    # off when it turned out to be a duplicate or over --max_bytes: its text stayed in the corpus
    monkeypatch.setattr(clean, "BLOCK", 64)  # "longer than a block" without megabytes of test data
    long_story = " ".join(f"word{i}" for i in range(100))
    docs = ["short one", long_story, "short two"] + ([long_story, "short three"] if case == "duplicate" else [])
    raw = tmp_path / "raw.txt"
    raw.write_text("".join(f"{doc}\n<|endoftext|>\n" for doc in docs), encoding="utf-8")
    cap = {"max_bytes": 100} if case == "over the cap" else {}
    stats = clean.clean_corpus(raw, tmp_path / "clean.txt", split="eot", **cap)
    expected = ["short one", long_story, "short two", "short three"] if case == "duplicate" else ["short one"]
    assert cleaned(tmp_path / "clean.txt") == expected
    assert (tmp_path / "clean.txt").stat().st_size == stats["bytes_out"]


def test_a_first_document_over_the_cap_says_how_to_split_a_plain_text(tmp_path):
    # mutants: the `--split blank_line` hint garbled, or never shown (compared with "EOT")
    raw = tmp_path / "raw.txt"
    raw.write_text("One long paragraph of a book.\n\nAnother paragraph.\n" * 20, encoding="utf-8")
    with pytest.raises(TinyGPTError, match=r"already over --max_bytes/--max_lines; raise the cap or --split "
                                           r"blank_line to cut a text without <\|endoftext\|> at its blank lines$"):
        clean.clean_corpus(raw, tmp_path / "clean.txt", split="eot", max_bytes=100)
    with pytest.raises(TinyGPTError, match=r"raise the cap$"):  # blank_line: the hint would be no help
        clean.clean_corpus(raw, tmp_path / "clean.txt", split="blank_line", max_bytes=10)


def test_a_missing_raw_corpus_says_which_file_and_how_to_get_it(tmp_path):
    # mutant: the hint's text changed (upper case) and no test read it
    with pytest.raises(TinyGPTError, match=r"raw\.txt.*run `tinygpt download` first"):
        clean.clean_corpus(tmp_path / "raw.txt", tmp_path / "clean.txt")

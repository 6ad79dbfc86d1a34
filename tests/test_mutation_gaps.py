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

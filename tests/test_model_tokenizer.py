"""model_tokenizer: the tokenizer of a starting model, from each kind of source, is the one the model was made with
and the one `train --init_from` reads from it (so the encoded tokens and the model agree); anything else is one
clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_lora import base, data_dir  # noqa: F401 (fixtures: the token folder and a tiny trained llama)
from tinygpt.common import TinyGPTError
from tinygpt.export.gguf_convert import convert_to_gguf
from tinygpt.export.hf import export_hf
from tinygpt.model.checkpoint import load_checkpoint
from tinygpt.tokenizer.bpe import Tokenizer
from tinygpt.weights.model_tokenizer import main, model_tokenizer
from tinygpt.weights.read import read_model


@pytest.fixture(scope="module")
def sources(base, tmp_path_factory) -> dict[str, Path]:
    """The tiny llama as each kind of source: checkpoint, Hugging Face folder, its tokenizer.json, GGUF (q8_0)."""
    out = tmp_path_factory.mktemp("sources")
    folder = export_hf(base, out / "hf")
    return {"checkpoint": base, "hf": folder, "json": folder / "tokenizer.json",
            "gguf": convert_to_gguf(folder, out / "model.gguf", "q8_0")}


@pytest.mark.parametrize("kind", ["checkpoint", "hf", "json", "gguf"])
def test_each_source_gives_the_tokenizer_the_model_was_trained_with(base, sources, kind):
    trained_with = Tokenizer.from_json_str(load_checkpoint(base)["tokenizer_json"])
    assert model_tokenizer(sources[kind]) == trained_with
    if kind != "json":  # what train --init_from reads: the encoded tokens pass its check
        assert model_tokenizer(sources[kind]) == Tokenizer.from_json_str(read_model(sources[kind])[2])


def test_the_command_writes_tokenizer_json(sources, tmp_path, capsys):
    out = tmp_path / "tokenizer.json"
    tokenizer = main(["--model", str(sources["gguf"]), "--out", str(out)])
    assert Tokenizer.load(out) == tokenizer
    assert f"the tokenizer of {sources['gguf']}" in capsys.readouterr().err


def test_what_is_no_model_is_one_clear_error(tmp_path):
    with pytest.raises(TinyGPTError, match="missing.pt"):
        model_tokenizer(tmp_path / "missing.pt")
    with pytest.raises(TinyGPTError, match="tokenizer.json"):  # a folder without one
        model_tokenizer(tmp_path)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\x00" * 64)
    with pytest.raises(TinyGPTError, match="weights.bin is neither a tinygpt checkpoint, a GGUF file nor"):
        model_tokenizer(other)

"""The encode stage: token files decode back to the corpus, splits are deterministic, errors are clean."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest

from tinygpt.tokenizer import encode as encode_module
from tinygpt.common import TinyGPTError
from tinygpt.tokenizer.encode import encode_corpus, is_val_document, iter_document_batches, main, token_dtype
from tinygpt.tokenizer.bpe import EOT, Tokenizer
from tinygpt.tokenizer.train_bpe import read_documents, train_bpe

DOCUMENTS = [f"Story {i}: the cat named Über sat on mat number {i * 7}.\n\nThe end, 猫 {'🎉' * (i % 3)}."
             for i in range(40)]


def write_corpus(path, documents):
    path.write_text("".join(f"{doc}\n{EOT}\n" for doc in documents), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(DOCUMENTS, 320, show_progress=False).save(path)
    return path


def read_split(out_dir, name, meta):
    return np.fromfile(out_dir / f"{name}.bin", dtype=meta["dtype"])


def split_documents(tok, ids):
    """Decode a token file into its documents (each ends with <|endoftext|>)."""
    assert len(ids) == 0 or ids[-1] == tok.eot_id
    text = tok.decode(ids.tolist())
    return text.split(EOT)[:-1]


@pytest.mark.parametrize("threads", [1, 2])
def test_encode_roundtrip_and_split(tmp_path, tokenizer_path, threads, monkeypatch):
    monkeypatch.setattr(encode_module, "BATCH_BYTES", 300)  # many small batches: exercises ordering
    corpus = write_corpus(tmp_path / "corpus.txt", DOCUMENTS)
    meta = encode_corpus(corpus, tokenizer_path, tmp_path / "out", val_fraction=0.2, seed=7, threads=threads)
    tok = Tokenizer.load(tokenizer_path)
    train, val = read_split(tmp_path / "out", "train", meta), read_split(tmp_path / "out", "val", meta)
    is_val = [is_val_document(7, i, 0.2) for i in range(len(DOCUMENTS))]
    assert split_documents(tok, train) == [d for d, v in zip(DOCUMENTS, is_val) if not v]
    assert split_documents(tok, val) == [d for d, v in zip(DOCUMENTS, is_val) if v]
    assert 0 < sum(is_val) < len(DOCUMENTS)
    expected = [tok.encode(d) + [tok.eot_id] for d, v in zip(DOCUMENTS, is_val) if not v]
    assert train.tolist() == [i for ids in expected for i in ids]
    assert meta == json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size and meta["eot_id"] == tok.eot_id
    assert meta["tokens"] == {"train": len(train), "val": len(val)}
    assert meta["documents"] == {"train": len(DOCUMENTS) - sum(is_val), "val": sum(is_val)}
    assert meta["corpus_sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert meta["tokenizer_sha256"] == hashlib.sha256(tokenizer_path.read_bytes()).hexdigest()
    assert meta["split"]["seed"] == 7 and meta["split"]["val_fraction"] == 0.2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_threads_and_reruns_give_identical_files(tmp_path, tokenizer_path):
    corpus = write_corpus(tmp_path / "corpus.txt", DOCUMENTS)
    encode_corpus(corpus, tokenizer_path, tmp_path / "a", 0.1, 1, threads=1)
    encode_corpus(corpus, tokenizer_path, tmp_path / "b", 0.1, 1, threads=2)
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    encode_corpus(corpus, tokenizer_path, tmp_path / "c", 0.1, 2, threads=1)
    assert (tmp_path / "a" / "val.bin").read_bytes() != (tmp_path / "c" / "val.bin").read_bytes()


@pytest.mark.parametrize("val_fraction", [1e-12, 0.999999])
def test_both_splits_non_empty_with_two_documents(tmp_path, tokenizer_path, val_fraction):
    corpus = write_corpus(tmp_path / "corpus.txt", DOCUMENTS[:2])
    meta = encode_corpus(corpus, tokenizer_path, tmp_path / "out", val_fraction, 0, threads=1)
    assert meta["documents"] == {"train": 1, "val": 1}
    tok = Tokenizer.load(tokenizer_path)
    docs = split_documents(tok, read_split(tmp_path / "out", "train", meta))
    docs += split_documents(tok, read_split(tmp_path / "out", "val", meta))
    assert sorted(docs) == sorted(DOCUMENTS[:2])
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == sum(len(tok.encode(d)) + 1 for d in DOCUMENTS[:2])


def test_document_stream_matches_train_bpe_reader(tmp_path):
    data = "".join(f"{d}\n{EOT}\n" for d in DOCUMENTS[:5]) + f"  \n{EOT}\ntrailing doc\nwithout separator\n"
    digest = hashlib.sha256()
    batches = list(iter_document_batches(io.BytesIO(data.encode()), digest))
    docs = [d.decode() for b in batches for d in b.documents]
    assert docs == DOCUMENTS[:5] + ["trailing doc\nwithout separator"]
    assert sum(b.n_bytes for b in batches) == len(data.encode()) and digest.digest() == hashlib.sha256(
        data.encode()).digest()
    corpus = tmp_path / "c.txt"
    corpus.write_text(data, encoding="utf-8")
    assert read_documents(corpus)[:5] == docs[:5]


def test_token_dtype():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_errors_leave_no_outputs(tmp_path, tokenizer_path):
    out = tmp_path / "out"
    with pytest.raises(TinyGPTError, match="corpus not found"):
        encode_corpus(tmp_path / "missing.txt", tokenizer_path, out)
    corpus = write_corpus(tmp_path / "corpus.txt", DOCUMENTS[:3])
    with pytest.raises(TinyGPTError, match="tokenizer not found"):
        encode_corpus(corpus, tmp_path / "missing.json", out)
    empty = tmp_path / "empty.txt"
    empty.write_text(f"\n{EOT}\n", encoding="utf-8")
    with pytest.raises(TinyGPTError, match="no documents"):
        encode_corpus(empty, tokenizer_path, out)
    with pytest.raises(TinyGPTError, match="val_fraction"):
        encode_corpus(corpus, tokenizer_path, out, val_fraction=1.0)
    assert not out.exists() or list(out.iterdir()) == []


def test_cli(tmp_path, tokenizer_path):
    corpus = write_corpus(tmp_path / "corpus.txt", DOCUMENTS)
    meta = main(["--corpus", str(corpus), "--tokenizer", str(tokenizer_path), "--out_dir", str(tmp_path / "t"),
                 "--val_fraction", "0.05", "--seed", "1337", "--threads", "2"])
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(DOCUMENTS)
    assert meta["documents"]["val"] >= 1

"""The encode stage: token files decode back to the corpus, both split rules, bounded pieces, clean errors."""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import multiprocessing
import os
import signal

import numpy as np
import pytest
import regex
from hypothesis import given, settings, strategies as st

from tinygpt.common import TinyGPTError
from tinygpt.tokenizer import encode as encode_module, pieces as pieces_module
from tinygpt.tokenizer.bpe import EOT, GPT2_PATTERN, Tokenizer
from tinygpt.tokenizer.encode import encode_corpus, is_val_document, main, token_dtype
from tinygpt.tokenizer.pieces import iter_pieces, safe_points
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


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Tokenizer.load(tokenizer_path)


def read_split(out_dir, name, meta):
    return np.fromfile(out_dir / f"{name}.bin", dtype=meta["dtype"])


def split_documents(tok, ids):
    """Decode a token file into its documents (each ends with <|endoftext|>)."""
    assert len(ids) == 0 or ids[-1] == tok.eot_id
    return tok.decode(ids.tolist()).split(EOT)[:-1]


def expected_ids(tok, documents):
    return [i for doc in documents for i in tok.encode_ordinary(doc) + [tok.eot_id]]


# ---- the corpus reader ------------------------------------------------------------------------------------------

def reference_documents(data: bytes) -> list[bytes]:
    """The corpus format read line by line, the obvious way (the module docstring of `pieces`)."""
    documents, lines = [], []
    for line in io.BytesIO(data):
        if line in (EOT.encode() + b"\n", EOT.encode()):
            documents.append(b"".join(lines)[:-1])
            lines = []
        else:
            lines.append(line)
    documents.append(b"".join(lines).rstrip(b"\n"))
    return [d for d in documents if d.strip()]


corpus_bytes = st.lists(st.sampled_from(
    [b"a", b"bc", b" ", b"  ", b"\n", b"\t", b"\xc3\xa9", b"\xf0\x9f\x8e\x89", EOT.encode(), EOT.encode() + b"\n",
     b"\n" + EOT.encode() + b"\n", b"x.y"]), max_size=40).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(corpus_bytes, st.sampled_from([1, 2, 5, 1000]), st.sampled_from([1, 3, 64, 1 << 20]))
def test_pieces_rebuild_the_documents(data, piece_bytes, read_bytes):
    pieces_module.READ_BYTES = read_bytes  # small reads exercise the buffer's turnover
    try:
        pieces = list(iter_pieces(io.BytesIO(data), piece_bytes))
    finally:
        pieces_module.READ_BYTES = 1 << 22
    documents: dict[int, list] = {}
    for piece in pieces:
        assert data[piece.offset:piece.offset + len(piece.data)] == piece.data
        documents.setdefault(piece.document, []).append(piece)
    assert list(documents) == list(range(len(documents)))
    assert [b"".join(p.data for p in ps) for ps in documents.values()] == reference_documents(data)
    for parts in documents.values():
        assert [p.ends_document for p in parts] == [False] * (len(parts) - 1) + [True]
        for p in parts[:-1]:  # a document is cut only at a safe point, and only when it is too long
            end = p.offset + len(p.data)
            assert end - p.offset <= piece_bytes or not safe_points(data[p.offset:end])
            assert end - p.offset in safe_points(data[p.offset:end + 1])


text_with_spaces = st.lists(st.sampled_from(list("ab é日1.'s") + [" ", "  ", "\n", "\t", "\xa0", "\u3000", "🎉",
                                                                    "\x1c"]), max_size=50).map("".join)


@settings(max_examples=400, deadline=None)
@given(text_with_spaces)
def test_text_splits_into_the_same_chunks_on_either_side_of_a_safe_point(text):
    data = text.encode()
    whole = regex.findall(GPT2_PATTERN, text)
    for point in safe_points(data):
        head, tail = data[:point].decode(), data[point:].decode()
        assert regex.findall(GPT2_PATTERN, head) + regex.findall(GPT2_PATTERN, tail) == whole


def test_a_byte_limit_cuts_the_corpus_there(tmp_path):
    docs = ["first doc\n\nwith a paragraph", "second", "third ünïcode"]
    corpus = write_corpus(tmp_path / "corpus.txt", docs)
    data, sep = corpus.read_bytes(), len(f"\n{EOT}\n")
    cases = {len(docs[0]): docs[:1],  # the cut ends the first document...
             len(docs[0]) + 1: docs[:1], len(docs[0]) + 6: docs[:1],  # ...or a partial separator line after it
             len(docs[0]) + sep + 2: docs[:1] + ["se"],
             len(data) - sep - 1: docs[:2] + ["third ünïcod"], len(data) - 2: docs, len(data): docs,
             data.index("ï".encode()) + 1: docs[:2] + ["third ün"]}  # half a character is dropped
    for limit, expected in cases.items():
        assert read_documents(corpus, limit) == expected, limit


# ---- encoding and the splits ------------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 2])
def test_random_split_roundtrip(tmp_path, tokenizer_path, tok, threads, monkeypatch):
    monkeypatch.setattr(encode_module, "BATCH_BYTES", 300)  # many small batches: exercises ordering
    corpus = write_corpus(tmp_path / "corpus.txt", DOCUMENTS)
    meta = encode_corpus(corpus, tokenizer_path, tmp_path / "out", 0.2, seed=7, threads=threads, split="random")
    train, val = read_split(tmp_path / "out", "train", meta), read_split(tmp_path / "out", "val", meta)
    is_val = [is_val_document(7, i, 0.2) for i in range(len(DOCUMENTS))]
    assert 0 < sum(is_val) < len(DOCUMENTS)
    assert split_documents(tok, train) == [d for d, v in zip(DOCUMENTS, is_val) if not v]
    assert split_documents(tok, val) == [d for d, v in zip(DOCUMENTS, is_val) if v]
    assert train.tolist() == expected_ids(tok, [d for d, v in zip(DOCUMENTS, is_val) if not v])
    assert meta == json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size and meta["eot_id"] == tok.eot_id
    assert meta["tokens"] == {"train": len(train), "val": len(val)}
    assert meta["documents"] == {"train": len(DOCUMENTS) - sum(is_val), "val": sum(is_val)}
    assert meta["corpus_sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert meta["tokenizer_sha256"] == hashlib.sha256(tokenizer_path.read_bytes()).hexdigest()
    assert meta["split"]["rule"] == "random" and meta["split"]["seed"] == 7 and meta["split"]["val_fraction"] == 0.2
    assert "blake2b" in meta["split"]["description"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "train.bin", "val.bin"]


@pytest.mark.parametrize("val_fraction", [0.05, 0.2, 0.45])
def test_tail_split_holds_out_the_last_whole_documents(tmp_path, tokenizer_path, tok, val_fraction):
    corpus = write_corpus(tmp_path / "corpus.txt", DOCUMENTS)
    meta = encode_corpus(corpus, tokenizer_path, tmp_path / "out", val_fraction, threads=2)  # tail: the default
    train, val = read_split(tmp_path / "out", "train", meta), read_split(tmp_path / "out", "val", meta)
    n_val = meta["documents"]["val"]
    assert 0 < n_val < len(DOCUMENTS) and meta["documents"]["train"] == len(DOCUMENTS) - n_val
    assert train.tolist() == expected_ids(tok, DOCUMENTS[:-n_val])
    assert val.tolist() == expected_ids(tok, DOCUMENTS[-n_val:])
    # validation starts at the document start nearest to the cut, within val_fraction / 2 of the share asked for
    size = corpus.stat().st_size
    starts = [corpus.read_bytes().index(d.encode()) for d in DOCUMENTS]
    nearest = min(starts[1:], key=lambda s: abs(s - (1 - val_fraction) * size))
    assert meta["split"]["val_start_byte"] == nearest == starts[-n_val]
    assert abs((size - nearest) / size - val_fraction) <= val_fraction / 2
    assert meta["split"]["rule"] == "tail" and meta["split"]["whole_documents"] is True


def test_one_document_is_split_inside_with_identical_ids(tmp_path, tokenizer_path, tok, monkeypatch):
    """Issue 8: a corpus of one document used to give an empty validation split without a word."""
    monkeypatch.setattr(pieces_module, "PIECE_BYTES", 64)  # the one document streams as many small pieces
    monkeypatch.setattr(encode_module, "PIECE_BYTES", 64)
    document = " ".join(DOCUMENTS).replace("\n\n", " ")  # no blank line: one document
    corpus = write_corpus(tmp_path / "corpus.txt", [document])
    for split in ("tail", "random"):
        meta = encode_corpus(corpus, tokenizer_path, tmp_path / split, 0.1, threads=2, split=split)
        train, val = read_split(tmp_path / split, "train", meta), read_split(tmp_path / split, "val", meta)
        assert len(train) and len(val) and meta["documents"] == {"train": 1, "val": 1}
        assert train.tolist() + val.tolist() == tok.encode_ordinary(document) + [tok.eot_id]
        assert meta["split"]["whole_documents"] is False and "inside a document" in meta["split"]["description"]
        start = meta["split"]["val_start_byte"]
        assert tok.decode(val.tolist()) == corpus.read_bytes()[start:-len(f"\n{EOT}\n")].decode() + EOT
        assert 0.09 <= (corpus.stat().st_size - start) / corpus.stat().st_size <= 0.11


def test_tail_splits_a_document_too_large_for_whole_documents(tmp_path, tokenizer_path, tok):
    big = " ".join(DOCUMENTS[:20]).replace("\n", " ")
    docs = ["a short first document", big, "a short last document"]  # the last one is far below 20%
    corpus = write_corpus(tmp_path / "corpus.txt", docs)
    meta = encode_corpus(corpus, tokenizer_path, tmp_path / "out", 0.2, threads=1)
    train, val = read_split(tmp_path / "out", "train", meta), read_split(tmp_path / "out", "val", meta)
    assert meta["split"]["whole_documents"] is False and meta["documents"] == {"train": 2, "val": 2}
    assert train.tolist() + val.tolist() == expected_ids(tok, docs)
    assert val.tolist()[-len(tok.encode(docs[2])) - 1:] == expected_ids(tok, docs[2:])


def test_a_document_without_whitespace_cannot_be_split(tmp_path, tokenizer_path):
    corpus = write_corpus(tmp_path / "corpus.txt", ["x" * 500])
    with pytest.raises(TinyGPTError, match="no whitespace to split it at; add documents"):
        encode_corpus(corpus, tokenizer_path, tmp_path / "out", 0.1)
    assert not (tmp_path / "out" / "val.bin").exists()


@pytest.mark.parametrize("val_fraction", [1e-12, 0.999999])
def test_random_split_moves_the_last_document_into_an_empty_split(tmp_path, tokenizer_path, tok, val_fraction):
    corpus = write_corpus(tmp_path / "corpus.txt", DOCUMENTS[:2])
    meta = encode_corpus(corpus, tokenizer_path, tmp_path / "out", val_fraction, 0, threads=1, split="random")
    assert meta["documents"] == {"train": 1, "val": 1} and "moved" in meta["split"]["description"]
    moved = DOCUMENTS[1]  # the last document goes to the split the hash left empty
    kept = DOCUMENTS[0]
    train = split_documents(tok, read_split(tmp_path / "out", "train", meta))
    val = split_documents(tok, read_split(tmp_path / "out", "val", meta))
    assert sorted([train, val]) == sorted([[kept], [moved]])


def test_long_documents_stream_in_pieces_with_identical_ids(tmp_path, tokenizer_path, tok, monkeypatch):
    monkeypatch.setattr(pieces_module, "PIECE_BYTES", 50)
    monkeypatch.setattr(encode_module, "PIECE_BYTES", 50)
    monkeypatch.setattr(encode_module, "BATCH_BYTES", 120)
    docs = ["\n".join(DOCUMENTS[i:i + 8]) for i in range(0, 40, 8)]  # long documents with newlines and emoji
    corpus = write_corpus(tmp_path / "corpus.txt", docs)
    seen = []
    real = encode_module._encode_batch
    monkeypatch.setattr(encode_module, "_encode_batch", lambda batch: seen.extend(batch) or real(batch))
    meta = encode_corpus(corpus, tokenizer_path, tmp_path / "out", 0.2, threads=1)
    assert max(length for _, length, *_ in seen) <= 50 * 2 and len(seen) > 5 * len(docs)
    train, val = read_split(tmp_path / "out", "train", meta), read_split(tmp_path / "out", "val", meta)
    assert train.tolist() + val.tolist() == expected_ids(tok, docs)


def test_a_batch_that_fits_its_slot_is_left_there(tmp_path, tokenizer_path, tok, monkeypatch):
    """A worker leaves a batch's tokens (train, then val) in its shared slot; too many come back as arrays."""
    corpus = write_corpus(tmp_path / "corpus.txt", DOCUMENTS[:3])
    size = corpus.stat().st_size
    batch = [(0, size // 2, False, False, True), (size // 2, size - size // 2, True, True, False)]  # (cut anywhere)
    slots = mmap.mmap(-1, 2 * encode_module.SLOT_BYTES)
    monkeypatch.setattr(encode_module, "_slots", None)
    monkeypatch.setattr(encode_module, "_corpus", None)
    encode_module._init_worker(tok, str(corpus), slots)
    try:
        piped = encode_module._encode_batch(batch)
        in_slot = encode_module._encode_batch(batch, 1)
        assert isinstance(piped, encode_module.EncodedBatch) and isinstance(in_slot, encode_module._InSlot)
        assert (in_slot.slot, in_slot.n_train, in_slot.n_val, in_slot.n_bytes) == (1, len(piped.train),
                                                                                  len(piped.val), size)
        tokens = np.frombuffer(slots, tok.dtype, in_slot.n_train + in_slot.n_val, encode_module.SLOT_BYTES)
        assert tokens.tolist() == piped.train.tolist() + piped.val.tolist()
        monkeypatch.setattr(encode_module, "SLOT_BYTES", 2 * (len(piped.train) + len(piped.val)) - 1)
        assert isinstance(encode_module._encode_batch(batch, 0), encode_module.EncodedBatch)
    finally:
        encode_module._corpus.close()


def test_results_too_large_for_a_slot_come_through_the_pipe(tmp_path, tokenizer_path, monkeypatch):
    """Forked workers leave a batch's tokens in shared memory where they fit, else send them; in order."""
    monkeypatch.setattr(encode_module, "worker_context", lambda: multiprocessing.get_context("fork"))
    monkeypatch.setattr(encode_module, "BATCH_BYTES", 200)
    corpus = write_corpus(tmp_path / "corpus.txt", DOCUMENTS)
    encode_corpus(corpus, tokenizer_path, tmp_path / "single", 0.1, threads=1)
    for slot_bytes in (1 << 20, 100):  # every batch fits; some do (a batch of 200 bytes: ~60 tokens of 2 bytes)
        monkeypatch.setattr(encode_module, "SLOT_BYTES", slot_bytes)
        encode_corpus(corpus, tokenizer_path, tmp_path / f"slots{slot_bytes}", 0.1, threads=2)
        for name in ("train.bin", "val.bin"):
            assert (tmp_path / "single" / name).read_bytes() == (tmp_path / f"slots{slot_bytes}" / name).read_bytes()


def test_threads_and_reruns_give_identical_files(tmp_path, tokenizer_path):
    corpus = write_corpus(tmp_path / "corpus.txt", DOCUMENTS)
    for split in ("tail", "random"):
        encode_corpus(corpus, tokenizer_path, tmp_path / f"a{split}", 0.1, 1, threads=1, split=split)
        encode_corpus(corpus, tokenizer_path, tmp_path / f"b{split}", 0.1, 1, threads=2, split=split)
        for name in ("train.bin", "val.bin", "meta.json"):
            assert (tmp_path / f"a{split}" / name).read_bytes() == (tmp_path / f"b{split}" / name).read_bytes()
    encode_corpus(corpus, tokenizer_path, tmp_path / "c", 0.1, 2, threads=1, split="random")
    assert (tmp_path / "arandom" / "val.bin").read_bytes() != (tmp_path / "c" / "val.bin").read_bytes()


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
    with pytest.raises(TinyGPTError, match="split 'middle' must be one of tail, random"):
        encode_corpus(corpus, tokenizer_path, out, split="middle")
    assert not out.exists() or list(out.iterdir()) == []


def test_cli(tmp_path, tokenizer_path):
    corpus = write_corpus(tmp_path / "corpus.txt", DOCUMENTS)
    meta = main(["--corpus", str(corpus), "--tokenizer", str(tokenizer_path), "--out_dir", str(tmp_path / "t"),
                 "--val_fraction", "0.05", "--seed", "1337", "--split", "random", "--threads", "2"])
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(DOCUMENTS)
    assert meta["documents"]["val"] >= 1 and meta["split"]["rule"] == "random"
    meta = main(["--corpus", str(corpus), "--tokenizer", str(tokenizer_path), "--out_dir", str(tmp_path / "u")])
    assert meta["split"]["rule"] == "tail" and meta["documents"]["val"] == 2


# ---- a set of files, workers, CPUs --------------------------------------------------------------------------------

@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_a_kill_while_writing_leaves_the_old_set_whole(tmp_path, tokenizer_path, monkeypatch, fail_at):
    """meta.json always describes the token files beside it: a kill at the n-th file operation of a rerun
    (writing a file, renaming one) leaves the whole old set."""
    corpus = write_corpus(tmp_path / "corpus.txt", DOCUMENTS)
    out = tmp_path / "out"
    encode_corpus(corpus, tokenizer_path, out, 0.1, threads=1)
    old = {name: (out / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")}
    calls = []

    def killed(real):
        def step(*args, **kwargs):
            calls.append(args)
            if len(calls) == fail_at:
                raise KeyboardInterrupt("killed")
            return real(*args, **kwargs)
        return step

    import os

    import tinygpt.common as common

    monkeypatch.setattr(common, "_exchange", lambda a, b: False, raising=False)  # the most steps: two renames
    monkeypatch.setattr(os, "replace", killed(os.replace))
    monkeypatch.setattr(os, "rename", killed(os.rename))
    monkeypatch.setattr(encode_module, "sha256_file", killed(encode_module.sha256_file))  # between files
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(corpus, tokenizer_path, out, 0.3, threads=1)
    assert {name: (out / name).read_bytes() for name in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "out"]


@pytest.mark.parametrize("monitor", [False, True], ids=["alone", "tqdm-monitor-thread"])
def test_workers_never_fork_beside_a_thread_nor_exceed_the_usable_cpus(tmp_path, tokenizer_path, monkeypatch,
                                                                       monitor):
    """A stage run alone forks its workers before its progress bar starts tqdm's monitor thread; beside a live
    thread it spawns them. --threads above the CPUs this process may use is cut to them."""
    import tinygpt.common as common
    from forks import progress_bars_on, started_processes, watched_forks

    progress_bars_on(monkeypatch, monitor)
    monkeypatch.setattr(common, "usable_cpus", lambda: 2)
    monkeypatch.setattr(encode_module, "BATCH_BYTES", 64)  # many tasks: spawned workers start as tasks wait
    started = started_processes(monkeypatch)
    corpus = write_corpus(tmp_path / "corpus.txt", DOCUMENTS)
    with watched_forks() as forks:
        main(["--corpus", str(corpus), "--tokenizer", str(tokenizer_path), "--out_dir", str(tmp_path / "out"),
              "--threads", "8"])
    assert started == ["spawn" if monitor else "fork"] * 2, "one worker per usable CPU"
    assert forks == ([] if monitor else [[], []]), "no other thread alive at a fork"
    assert (tmp_path / "out" / "meta.json").exists()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_worker_that_dies_is_one_clear_error_and_leaves_no_outputs(tmp_path, tokenizer_path, monkeypatch):
    """A worker killed mid-batch (as the out-of-memory killer would) stops the stage with one message, where
    multiprocessing.Pool would wait forever for its batch; nothing is written."""
    monkeypatch.setattr(encode_module, "worker_context", lambda: multiprocessing.get_context("fork"))
    monkeypatch.setattr(encode_module, "BATCH_BYTES", 300)
    caller, encode_pieces = os.getpid(), encode_module._encode_pieces

    def killed_in_a_worker(batch, slot):
        if os.getpid() != caller:
            os.kill(os.getpid(), signal.SIGKILL)
        return encode_pieces(batch, slot)

    monkeypatch.setattr(encode_module, "_encode_pieces", killed_in_a_worker)  # before the fork: inherited
    corpus = write_corpus(tmp_path / "corpus.txt", DOCUMENTS)
    with pytest.raises(TinyGPTError, match="worker process of encode died"):
        encode_corpus(corpus, tokenizer_path, tmp_path / "out", threads=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


def test_chat_token_text_in_the_corpus_stays_text(tmp_path, tokenizer_path, tok):
    """The tokenizer reserves <|im_start|> and <|im_end|> (train_bpe); corpus text never becomes them."""
    documents = ["A chat: <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>", "plain text"] * 4
    meta = encode_corpus(write_corpus(tmp_path / "c.txt", documents), tokenizer_path, tmp_path / "out")
    ids = np.concatenate([read_split(tmp_path / "out", name, meta) for name in ("train", "val")]).tolist()
    assert {"<|im_start|>", "<|im_end|>"} <= set(tok.special_tokens)
    assert set(ids).isdisjoint(tok.special_tokens[t] for t in ("<|im_start|>", "<|im_end|>"))
    assert ids == expected_ids(tok, documents)

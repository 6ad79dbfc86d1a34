"""BPE training: the incremental trainer against a naive full-recount trainer, edge cases and the CLI."""

from __future__ import annotations

from collections import Counter

import pytest

from tinygpt.common import TinyGPTError
from tinygpt.tokenizer import train_bpe as train_bpe_module
from tinygpt.tokenizer.bpe import EOT, Tokenizer, pretokenize
from tinygpt.tokenizer.train_bpe import (count_chunks, count_corpus_chunks, learn_merges, main, read_documents,
                                         train_bpe, train_bpe_file)

TEXTS = [
    "the cat sat on the mat. the cat ate the rat! aaaaaaa abababab aaaa",
    "Über café naïve 東京 東京 🎉🎉 12345 123 45   spaces\n\n\nnewlines\t\ttabs",
    "It's the dog's bone; they're here, we've won. the end the end",
]


def naive_merges(texts: list[str], n_merges: int) -> list[tuple[int, int]]:
    """Reference trainer: recount every pair of every chunk before each merge (slow, obviously right)."""
    words = [list(chunk.encode()) for text in texts for part in text.split(EOT) for chunk in pretokenize(part)]
    vocab = {i: bytes([i]) for i in range(256)}
    merges: list[tuple[int, int]] = []
    banned: set[tuple[int, int]] = set()
    while len(merges) < n_merges:
        counts = Counter(p for w in words for p in zip(w, w[1:]) if p not in banned)
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))  # most frequent, then smallest pair
        if vocab[pair[0]] + vocab[pair[1]] in vocab.values():
            banned.add(pair)
            continue
        new_id = 256 + len(merges)
        merges.append(pair)
        vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
        for k, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = out
    return merges


def test_incremental_trainer_matches_naive_trainer():
    texts = TEXTS * 2 + ["the theme there then", "abab ab aba bab"]
    ours = learn_merges(count_chunks(texts), 90, show_progress=False)
    assert len(ours) == 90 and ours == naive_merges(texts, 90)


def test_runs_ties_and_repeats_match_naive_trainer():
    """Runs of one symbol ("aaaa" merges as "aa aa"), pairs like (x, x) after merges, and many equal counts."""
    texts = ["aaaaaaa aaaa aaa aa a", "abababab abab ab", "xyxyxy yxyx", "    \n\n    \n        indented",
             "zzz qqq zzz qqq ==== ---- ___"] * 3 + ["éé 日日日 🎉🎉🎉"]
    ours = learn_merges(count_chunks(texts), 120, show_progress=False)
    assert ours == naive_merges(texts, 120) and len(ours) > 40


def test_threads_do_not_change_the_result():
    texts = TEXTS * 5
    assert count_chunks(texts, threads=2) == count_chunks(texts, threads=1)
    assert train_bpe(texts, 400, threads=2, show_progress=False) == train_bpe(texts, 400, show_progress=False)


def test_training_encodes_its_text_compactly():
    tok = train_bpe(TEXTS * 3, 400, show_progress=False)
    text = TEXTS[0]
    assert len(tok.encode(text)) < len(text.encode()) / 2
    assert tok.decode(tok.encode(text)) == text


def test_vocab_size_too_small():
    with pytest.raises(TinyGPTError, match="at least 259"):  # 256 bytes + <|im_start|>, <|im_end|>, <|endoftext|>
        train_bpe(TEXTS, 258)
    tok = train_bpe(TEXTS, 259, show_progress=False)
    assert tok.vocab_size == 259 and not tok.merges


def test_small_corpus_stops_early_with_a_warning(capsys):
    tok = train_bpe(["abc abc"], 1000, show_progress=False)
    # Chunks "abc" and " abc" allow merges ab, abc, " a"/" ab"... far fewer than 741.
    assert tok.vocab_size == 259 + len(tok.merges) < 1000
    err = capsys.readouterr().err
    assert f"only supports {len(tok.merges)} of the 741 merges" in err and f"vocab_size {tok.vocab_size}" in err


def test_special_token_is_never_merged():
    tok = train_bpe([f"hello{EOT}hello {EOT}"] * 20, 320, show_progress=False)
    merged = tok.vocab[256:256 + len(tok.merges)]
    assert merged and all(t.strip() in b"hello" for t in merged)


def write_corpus(path, documents):
    path.write_text("".join(f"{doc}\n{EOT}\n" for doc in documents), encoding="utf-8")


def test_streamed_counts_equal_counts_of_whole_documents(tmp_path, monkeypatch):
    """The corpus is counted in pieces (here of ~16 bytes), even a document of many pieces: same counts."""
    monkeypatch.setattr(train_bpe_module, "PIECE_BYTES", 16)
    monkeypatch.setattr(train_bpe_module, "BATCH_BYTES", 40)
    docs = TEXTS + [" ".join(TEXTS * 4), f"a special {EOT} inside", "   \t\n spaces  around  "]
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, docs)
    for threads in (1, 2):
        counts, n_documents = count_corpus_chunks(corpus, threads, show_progress=False)
        assert n_documents == len(docs) and counts == count_chunks(docs)
    tok, n_documents = train_bpe_file(corpus, 400, threads=2, show_progress=False)
    assert tok == train_bpe(docs, 400, show_progress=False) and n_documents == len(docs)
    half = corpus.stat().st_size // 2
    counts, _ = count_corpus_chunks(corpus, 2, max_bytes=half, show_progress=False)
    assert counts == count_chunks(read_documents(corpus, half))


def test_read_documents(tmp_path):
    corpus = tmp_path / "corpus.txt"
    docs = ["first doc\n\nwith a paragraph", "second", "third ünïcode"]
    write_corpus(corpus, docs)
    assert read_documents(corpus) == docs
    assert read_documents(corpus, max_bytes=len(docs[0]) + len(f"\n{EOT}\n") + 2) == docs[:1] + ["se"]
    with pytest.raises(TinyGPTError, match="corpus not found"):
        read_documents(tmp_path / "missing.txt")


def test_cli_trains_and_saves_a_loadable_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    corpus, out = tmp_path / "corpus.txt", tmp_path / "tok" / "tokenizer.json"
    write_corpus(corpus, TEXTS * 4)
    tok = main(["--corpus", str(corpus), "--out", str(out), "--vocab_size", "300", "--threads", "2"])
    assert Tokenizer.load(out) == tok and tok.vocab_size == 300
    assert not any(b"<|" in t or b"|>" in t for t in tok.vocab[:256 + len(tok.merges)])  # separators are not text
    hf = tokenizers.Tokenizer.from_file(str(out))
    text = corpus.read_text(encoding="utf-8")
    assert hf.encode(text).ids == tok.encode(text)


def test_cli_errors(tmp_path):
    with pytest.raises(TinyGPTError, match="corpus not found"):
        main(["--corpus", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "t.json")])
    empty = tmp_path / "empty.txt"
    empty.write_text(f"{EOT}\n", encoding="utf-8")
    with pytest.raises(TinyGPTError, match="no documents"):
        main(["--corpus", str(empty), "--out", str(tmp_path / "t.json")])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(f"fine\n{EOT}\ncaf\xe9\n{EOT}\n".encode("latin-1"))
    for threads in ("1", "2"):
        with pytest.raises(TinyGPTError, match=r"latin1.txt is not UTF-8 text \(byte 22\)"):
            main(["--corpus", str(latin1), "--out", str(tmp_path / "t.json"), "--threads", threads])
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("monitor", [False, True], ids=["alone", "tqdm-monitor-thread"])
def test_workers_never_fork_beside_a_thread_nor_exceed_the_usable_cpus(tmp_path, monkeypatch, monitor):
    """As in encode: workers fork before the progress bar starts tqdm's monitor thread, or spawn beside a live
    thread; --threads above the CPUs this process may use is cut to them."""
    import tinygpt.common as common
    from forks import progress_bars_on, started_processes, watched_forks

    progress_bars_on(monkeypatch, monitor)
    monkeypatch.setattr(common, "usable_cpus", lambda: 2)
    started = started_processes(monkeypatch)
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, TEXTS * 4)
    with watched_forks() as forks:
        tok = main(["--corpus", str(corpus), "--out", str(tmp_path / "t.json"), "--vocab_size", "300",
                    "--threads", "8"])
    assert started == ["spawn" if monitor else "fork"] * 2, "one worker per usable CPU"
    assert forks == ([] if monitor else [[], []]), "no other thread alive at a fork"
    assert tok == train_bpe(TEXTS * 4, 300, show_progress=False)

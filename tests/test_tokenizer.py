"""The tokenizer against independent implementations: Hugging Face tokenizers and tiktoken, same merges."""

from __future__ import annotations

import json
import re

import pytest
import regex
from hypothesis import given, settings, strategies as st

from tinygpt.tokenizer import bpe as tokenizer_module
from tinygpt.common import TinyGPTError
from tinygpt.tokenizer.bpe import ASCII_PATTERN, BYTE_TO_UNICODE, EOT, GPT2_PATTERN, Tokenizer, pretokenize
from tinygpt.tokenizer.chat import IM_END, IM_START
from tinygpt.tokenizer.train_bpe import train_bpe

tokenizers = pytest.importorskip("tokenizers")
tiktoken = pytest.importorskip("tiktoken")

TRAINING_TEXT = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine.",
    "One day, she saw a big, red ball in the park! \"Can I play?\" she asked. Her mom said, \"Yes, you can.\"",
    "Café, naïve, résumé, façade, jalapeño, Ångström, Übermäßig, smörgåsbord, crème brûlée.",
    "東京は日本の首都です。私は猫が好きです。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji time 🎉🎉 🐱 🚀🚀🚀 👩‍👩‍👧 ❤️ done.",
    "Numbers 12345 and 3.14159 and 2024-01-01, 1,000,000 or 42nd.",
    "def f(x):\n    return x  +  1\n\n\n\tindented\ttabs   and   spaces    end",
    "It's, they're, we've, I'm, you'll, he'd: contractions'S and 'T too.",
]
SAMPLES = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Café naïve résumé — «guillemets» and ‘quotes’ ÀÉÎÕÜ",
    "日本語のテキストと中文文本，还有한국어.",
    "🎉 party 🐱‍👤 👍🏽 🇫🇷 flags",
    "π ≈ 3.14159, e = 2.71828; 10000000 and ٣٤٥ and ⅷ",
    "   leading spaces\n\n\ntrailing   \n \n\t\t mixed\r\nwindows\r\n",
    "two docs<|endoftext|>glued <|endoftext|> and spaced\n<|endoftext|>\n",
    "<|endoftext|>",
    "<|endoftext",
    "'s 'S 't 're 've 'm 'll 'd don't I'LL",
    "",
    " ",
    "\n",
    "a" * 300,
    "\x00\x01\x7f control \u200b zero-width \ufeff bom",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(TRAINING_TEXT * 3 + [t.upper() for t in TRAINING_TEXT], vocab_size=700, show_progress=False)


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(path)
    return tokenizers.Tokenizer.from_file(str(path))


@pytest.fixture(scope="module")
def tiktoken_enc(tok):
    ranks = {tok.vocab[i]: i for i in range(256 + len(tok.merges))}
    return tiktoken.Encoding("tinygpt-test", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=tok.special_tokens)


def test_byte_alphabet_matches_hf_bytelevel():
    assert len(set(BYTE_TO_UNICODE.values())) == 256
    assert set(BYTE_TO_UNICODE.values()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    assert BYTE_TO_UNICODE[ord(" ")] == "Ġ" and BYTE_TO_UNICODE[ord("\n")] == "Ċ" and BYTE_TO_UNICODE[65] == "A"


def test_id_layout(tok):
    assert tok.vocab_size == 700 and len(tok.merges) == 700 - 259
    # after the merges: the chat format's two special tokens, then <|endoftext|> last
    assert tok.special_tokens == {IM_START: 697, IM_END: 698, EOT: 699} and tok.eot_id == tok.vocab_size - 1
    assert tok.vocab[:256] == [bytes([i]) for i in range(256)]
    for rank, (a, b) in enumerate(tok.merges):
        assert a < 256 + rank and b < 256 + rank and tok.vocab[256 + rank] == tok.vocab[a] + tok.vocab[b]
    assert len(set(tok.vocab)) == tok.vocab_size  # every token is a distinct byte string


@pytest.mark.parametrize("text", SAMPLES + TRAINING_TEXT)
def test_pretokenize_matches_hf_split(text):
    split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(GPT2_PATTERN), behavior="isolated")
    assert pretokenize(text) == [piece for piece, _ in split.pre_tokenize_str(text)]


@pytest.mark.parametrize("text", SAMPLES + TRAINING_TEXT)
def test_matches_hf_tokenizers(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text).ids


@pytest.mark.parametrize("text", SAMPLES + TRAINING_TEXT)
def test_matches_tiktoken(tok, tiktoken_enc, text):
    assert tok.encode(text) == tiktoken_enc.encode(text, allowed_special="all")
    assert tok.encode_ordinary(text) == tiktoken_enc.encode_ordinary(text)


@pytest.mark.parametrize("special", [EOT, IM_START, IM_END])
def test_special_token(tok, hf_tok, special):
    token = tok.special_tokens[special]
    assert tok.encode(f"a{special}b") == tok.encode("a") + [token] + tok.encode("b")
    assert tok.encode(f"a{special}b") == hf_tok.encode(f"a{special}b").ids
    assert set(tok.encode_ordinary(f"x{special} {special}")).isdisjoint(tok.special_tokens.values())
    assert tok.decode(tok.encode_ordinary(special)) == special
    assert tok.decode([token]) == special


def test_token_strings_match_hf(tok, hf_tok):
    strings = tok.token_strings()
    assert strings == [hf_tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert strings[ord(" ")] == "Ġ" and strings[-1] == EOT
    assert all(" " not in s for s in strings[:-1])


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_roundtrip_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode_bytes(tok.encode_ordinary(text)) == text.encode("utf-8")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(list("ab é日🎉1 \n\t'sS.,") + [EOT, "  ", "\n\n"]), max_size=40).map("".join))
def test_parity_random_text(tok, hf_tok, tiktoken_enc, text):
    ours = tok.encode(text)
    assert ours == hf_tok.encode(text).ids == tiktoken_enc.encode(text, allowed_special="all")


def test_decode_invalid_utf8_replaces(tok):
    assert tok.decode_bytes([0xC3]) == b"\xc3"  # the first byte of "é" alone
    assert tok.decode([0xC3, ord("a")]) == "\ufffda"


def test_save_load_roundtrip(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded == tok and loaded.vocab == tok.vocab and loaded.eot_id == tok.eot_id
    assert Tokenizer.from_json_str(tok.to_json_str()) == tok
    spec = json.loads(path.read_text(encoding="utf-8"))
    assert spec["model"]["type"] == "BPE" and spec["model"]["merges"] == tok.merge_strings()
    assert [(a["id"], a["content"], a["special"]) for a in spec["added_tokens"]] == [
        (697, IM_START, True), (698, IM_END, True), (699, EOT, True)]


def test_load_accepts_pair_style_merges(tok):
    spec = json.loads(tok.to_json_str())
    spec["model"]["merges"] = [m.split(" ") for m in spec["model"]["merges"]]
    assert Tokenizer.from_json_str(json.dumps(spec)) == tok


def test_from_token_strings_roundtrip(tok):
    rebuilt = Tokenizer.from_token_strings(tok.token_strings(), tok.merge_strings())
    assert rebuilt == tok and rebuilt.eot_id == tok.eot_id


def test_load_errors(tok, tmp_path):
    with pytest.raises(TinyGPTError, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(TinyGPTError, match="not a valid"):
        Tokenizer.load(bad)
    spec = json.loads(tok.to_json_str())
    vocab = spec["model"]["vocab"]
    first, second = list(vocab)[:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # GPT-2's own layout orders bytes differently
    with pytest.raises(TinyGPTError, match="id layout"):
        Tokenizer.from_json_str(json.dumps(spec))
    tokens, merges = tok.token_strings(), tok.merge_strings()
    with pytest.raises(TinyGPTError, match="id layout"):
        Tokenizer.from_token_strings(tokens, merges[1:] + merges[:1])
    with pytest.raises(TinyGPTError, match="not found"):
        Tokenizer.from_token_strings(tokens[:-1] + ["<|other|>"], merges)


def test_cache_is_bounded_and_transparent(tok, monkeypatch):
    fresh = Tokenizer(tok.merges)
    monkeypatch.setattr(tokenizer_module, "CACHE_SIZE", 3)
    for text in TRAINING_TEXT * 2:
        assert fresh.encode(text) == tok.encode(text)
        for cache in (fresh._chunk_cache, fresh._word_cache):  # a generation: CACHE_SIZE, and one text's keys
            assert len(cache.current) < 3 + len(text) and len(cache.previous) < 3 + max(map(len, TRAINING_TEXT))


def test_cache_keeps_what_is_still_in_use(tok, monkeypatch):
    fresh = Tokenizer(tok.merges)
    monkeypatch.setattr(tokenizer_module, "CACHE_SIZE", 2)
    computed = []
    real = fresh._chunk_cache._compute
    fresh._chunk_cache._compute = lambda chunks: computed.extend(chunks) or real(chunks)
    for chunk in ["a", "b", "c", "a", "d", "a"]:  # "a" is found in the previous generation, never recomputed
        assert fresh._chunk_cache.join([chunk]) == fresh.pack(tok.encode(chunk))
    assert computed == ["a", "b", "c", "d"]
    assert fresh._chunk_cache.join(["d", "a", "e", "a"]) == fresh.pack([*map(ord, "daea")])  # one text, turned over
    assert computed == ["a", "b", "c", "d", "e"]


# ---- fast paths against the reference pre-tokenization (the `regex` module with GPT2_PATTERN) -----------------

def reference_chunks(text: str) -> list[str]:
    return regex.findall(GPT2_PATTERN, text)


# Characters where the fast paths could go wrong: letters and numbers beyond ASCII, every kind of whitespace
# (including \x1c-\x1f and \x85, which `re` and str.isspace call whitespace and `regex` does not, or the reverse),
# contraction pieces, punctuation.
TRICKY = (list("aZé日ß1٣ⅷ'stredvmlSTD.,!-\"_") + [" ", "  ", "\n", "\r", "\t", "\x0b", "\x0c", "\x1c", "\x1f",
          "\x85", "\xa0", "\u2000", "\u3000", "\u2028", " \n", "'s", "'t", "'re", "'ll", "'S", "\x00", "🎉",
          "\U0001d538", "\U00020000", "\U0001d7d8"])  # beyond U+FFFF: emoji, a letter (𝔸, 𠀀) and a digit (𝟘)
tricky_text = st.lists(st.sampled_from(TRICKY), max_size=40).map("".join)


def test_ascii_classes_match_regex_exhaustively():
    """For each ASCII character, ASCII_PATTERN's classes agree with \\s, \\p{L} and \\p{N} as `regex` reads them."""
    for code in range(128):
        c = chr(code)
        for ours, theirs in [(r"[\t\n\x0b\x0c\r ]", r"\s"), ("[A-Za-z]", r"\p{L}"), ("[0-9]", r"\p{N}")]:
            assert bool(re.fullmatch(ours, c)) == bool(regex.fullmatch(theirs, c)), (hex(code), theirs)
    every_pair = "".join(chr(a) + chr(b) + chr(a) for a in range(128) for b in range(128))
    assert re.findall(ASCII_PATTERN, every_pair) == reference_chunks(every_pair)


def test_bmp_classes_match_regex_exhaustively():
    """For every character up to U+FFFF, the `re` pattern's spelled-out classes agree with `regex`'s."""
    bmp = "".join(map(chr, range(0x10000)))
    pattern = tokenizer_module.bmp_pattern().pattern
    classes = re.findall(r"\[\^?((?:\\u[0-9a-f]{4}-\\u[0-9a-f]{4})+)\]", pattern)
    letters, numbers, space = classes[0], classes[1], classes[3]
    for ours, theirs in [(letters, r"\p{L}"), (numbers, r"\p{N}"), (space, r"\s")]:
        assert re.findall(f"[{ours}]+", bmp) == regex.findall(theirs + "+", bmp)
    assert set(regex.findall(r"\s", bmp)) == tokenizer_module.whitespace()
    assert tokenizer_module.bmp_pattern().findall(bmp) == reference_chunks(bmp)


@settings(max_examples=300, deadline=None)
@given(tricky_text)
def test_pretokenize_matches_regex(text):
    """ASCII, BMP and beyond-BMP text (where only the stretches around emoji go through `regex`)."""
    assert pretokenize(text) == reference_chunks(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127)) | tricky_text.filter(str.isascii))
def test_ascii_pretokenize_matches_regex(text):
    assert text.isascii() and pretokenize(text) == reference_chunks(text)


def space_split_chunks(text: str) -> list[str]:
    words = text.split(" ")
    return reference_chunks(words[0]) + [c for w in words[1:] for c in reference_chunks(" " + w)]


@settings(max_examples=500, deadline=None)
@given(tricky_text)
def test_space_split_rule(text):
    """Splitting at spaces gives the reference chunks exactly when the breaker pattern finds nothing."""
    if not tokenizer_module._SPACE_SPLIT_BREAKER.search(text):
        assert space_split_chunks(text) == reference_chunks(text)


@pytest.mark.parametrize("text", ["a\n  b", "a\n ", "a   b", "x\t \t", "\xa0 \xa0"])
def test_space_split_breaker_is_needed(text):
    assert tokenizer_module._SPACE_SPLIT_BREAKER.search(text)
    assert space_split_chunks(text) != reference_chunks(text)


@settings(max_examples=300, deadline=None)
@given(tricky_text)
def test_fast_paths_match_tiktoken(tok, tiktoken_enc, text):
    fresh = Tokenizer(tok.merges)  # cold caches: every word and chunk takes the miss path once
    expected = tiktoken_enc.encode_ordinary(text)
    assert fresh.encode_ordinary(text) == expected
    assert fresh.encode_ordinary(text) == expected  # warm caches
    assert tok.encode_ordinary(text) == expected


# ---- BPE of many unseen chunks at once (numpy) against one chunk at a time ---------------------------------------

@pytest.fixture(scope="module")
def runs_tok() -> Tokenizer:
    """Merges of repeated bytes (x x x: overlapping occurrences of the pair (x, x)) besides ordinary text."""
    text = ["a" * 64 + " " + "ab" * 40, "    " * 20 + "\n\n\n\n", "=" * 50, "aaa bbb aaaa" * 5] + TRAINING_TEXT
    return train_bpe(text * 3, vocab_size=400, show_progress=False)


chunk_bytes = st.binary(min_size=1, max_size=40) | tricky_text.filter(bool).map(str.encode) \
    | st.sampled_from([b"a" * 300, b"aaa", b"ab" * 7 + b"a", b" " * 33, b"=" * 17, b"\n" * 5])


@settings(max_examples=200, deadline=None)
@given(st.lists(chunk_bytes, min_size=1, max_size=60))
def test_batch_merge_matches_one_at_a_time(tok, runs_tok, chunks):
    for t in (tok, runs_tok):
        assert t._batch_merge is not None  # train_bpe's merges are ordered so that the batch may merge
        assert t._batch_merge.merge(chunks, t.dtype) == [t.pack(t._merge_chunk(c)) for c in chunks]


def test_batch_path_matches_tiktoken(tok, tiktoken_enc):
    """Texts long enough for their unseen chunks to go through BPE together, from cold caches."""
    fresh = Tokenizer(tok.merges)
    computed_alone = []
    real = fresh._encode_chunk
    fresh._encode_chunk = lambda chunk: computed_alone.append(chunk) or real(chunk)
    text = "\n".join(SAMPLES + TRAINING_TEXT + [t.upper() for t in SAMPLES])
    assert len(pretokenize(text)) >= tokenizer_module.BATCH_MIN
    assert fresh.encode_ordinary(text) == tiktoken_enc.encode_ordinary(text)
    assert not computed_alone  # every chunk came from the batch


def test_batch_merge_refuses_merges_out_of_order(tok):
    """A merge that uses a token made by a later merge: pairs holding a new id may then rank before the merge
    that made it, so the batch (all occurrences of a pair per round) would differ; one at a time it is."""
    vocab = {BYTE_TO_UNICODE[b]: b for b in range(256)}
    spec = json.loads(tok.to_json_str())
    spec["model"]["vocab"] = {**vocab, "ab": 256, "abc": 257, "bc": 258}
    spec["model"]["merges"] = ["ab c", "a b", "b c"]
    spec["added_tokens"] = [{**t, "id": 259} for t in spec["added_tokens"] if t["content"] == EOT]
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    out_of_order = Tokenizer.from_json_str(json.dumps(spec))
    assert out_of_order._batch_merge is None
    hf = tokenizers.Tokenizer.from_str(json.dumps(spec))
    text = "abc ab bc abcabc " * 20
    assert out_of_order.encode_ordinary(text) == hf.encode(text, add_special_tokens=False).ids


# ---- known pipelines: text cut around characters beyond U+FFFF, SmolLM's fused regex -------------------------------

def reference_pieces(key, text: str) -> list[str]:
    """The pieces of a known pipeline by `regex` alone, step by step (Digits: each digit a piece)."""
    _normalizer, steps = key
    pieces = [text] if text else []
    for step in steps:
        if step.kind == "digits":
            pieces = [p for piece in pieces for p in regex.split(r"(\p{N})", piece) if p]
        else:
            pieces = [p for piece in pieces for p in regex.findall(step.pattern, piece)]
    return pieces


family_text = st.lists(st.sampled_from(TRICKY + ["x\n", "):\n", "  12 ", "3.5", "a\t", "\r\n"]), max_size=60)


@settings(max_examples=300, deadline=None)
@given(family_text.map("".join))
def test_known_pipelines_match_regex_step_by_step(text):
    from tinygpt.tokenizer.pipeline import KNOWN, Pipeline
    for key, known in KNOWN.items():
        assert Pipeline(*key).pretokenize(text) == reference_pieces(key, text), known.gguf_pre


@pytest.mark.parametrize("family", ["gpt2", "smollm", "llama3", "qwen2"])
def test_batch_path_matches_hf_for_each_family(family):
    """Each family's tokenizer (foreign id order; Llama 3's ignore_merges) through the batch path, cold caches."""
    from test_hf_tokenizers import HELD_OUT, TRAINING_TEXT as FAMILY_TEXT, build, hf_ids
    hf = build(family)
    ours = Tokenizer.from_json_str(hf.to_str())
    assert ours._batch_merge is not None
    text = "\n".join(HELD_OUT + FAMILY_TEXT + [t.upper() for t in FAMILY_TEXT] + SAMPLES)
    assert len(ours.pipeline.pretokenize(text)) >= tokenizer_module.BATCH_MIN
    assert ours.encode_ordinary(text) == hf_ids(hf, text, special=False)

"""Other families' tokenizers: `tokenizers` trains a small BPE with each family's real normalizer, pre-tokenizer
and post-processor, and our Tokenizer, reading its tokenizer.json, must give the same ids on any text."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pytest
import regex
import torch
from hypothesis import example, given, settings, strategies as st

from tinygpt.common import TinyGPTError
from tinygpt.tokenizer.bpe import RULES_MIN, Tokenizer
from tinygpt.tokenizer.class_rules import ClassRules
from tinygpt.tokenizer.pipeline import GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, SMOLLM_PATTERN, Splitter

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import (AddedToken, Regex, decoders, models, normalizers, pre_tokenizers,  # noqa: E402
                        processors, trainers)

FAMILIES = ("gpt2", "smollm", "llama3", "qwen2")
TRAINING_TEXT = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine.",
    "Numbers 12345 and 3.14159 and 2024-01-01, 1,000,000 or 42nd; 007 and 9999999.",
    "Café, naïve, résumé, façade, jalapeño, Ångström, Übermäßig, smörgåsbord, crème brûlée.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다. Ελληνικά, русский текст.",
    "Emoji time 🎉🎉 🐱 🚀🚀🚀 👩‍👩‍👧 ❤️ done.",
    "def f(x):\n    return x  +  1\n\n\n\tindented\ttabs   and   spaces    end\r\n",
    "It's, they're, we've, I'm, you'll, he'd: contractions'S and 'T, DON'T and I'LL too.",
    "First line.\nSecond line.\nThird line!\n\nNew paragraph.\n(Quoted.)\n\n",
]
SPECIALS = {
    "gpt2": ["<|endoftext|>"],
    "smollm": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}
EOT_OF = {"gpt2": "<|endoftext|>", "smollm": "<|endoftext|>", "llama3": "<|end_of_text|>", "qwen2": "<|endoftext|>"}
HELD_OUT = [
    "The year 1987 had 365 days; pi is 3.14159265 and 1,234,567 is big.",
    "Unicode: Zoë, Ñandú, Ærøskøbing, 東京都, Привет, مرحبا, 😀👍🏽, ﬁ ligature, Ⅻ, ٣٤٥.",
    "whitespace   runs\n\n\n  and\t\ttabs \r\n\r\n    indented\n \n end   ",
    "they'RE here, it'S fine, we'LL see<|endoftext|> and <|im_start|>user\nhi<|im_end|>",
    "",
]


@lru_cache(maxsize=None)
def build(family: str, vocab_size: int = 600) -> tokenizers.Tokenizer:
    """A tokenizer of `family`'s configuration (as its tokenizer.json has it), trained on TRAINING_TEXT."""
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=family == "llama3"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if family == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif family == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        pattern = LLAMA3_PATTERN if family == "llama3" else QWEN2_PATTERN
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False), byte_level])
    if family == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    # Llama 3 and Qwen2 add their special tokens after the learned vocabulary, the others before it.
    first = SPECIALS[family] if family in ("gpt2", "smollm") else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=first, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_TEXT * 3, trainer)
    if not first:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS[family]])
    if family == "qwen2":
        tok.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    if family == "llama3":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    hf = build(request.param)
    return request.param, hf, Tokenizer.from_json_str(hf.to_str(), source=f"{request.param} tokenizer.json")


def hf_ids(hf, text: str, special: bool = True, bos: bool = False) -> list[int]:
    hf.encode_special_tokens = not special
    try:
        return hf.encode(text, add_special_tokens=bos).ids
    finally:
        hf.encode_special_tokens = False


def assert_same_ids(family, text: str) -> None:
    name, hf, ours = family
    assert ours.encode(text, bos=True) == hf_ids(hf, text, bos=True), name
    assert ours.encode(text) == hf_ids(hf, text), name
    assert ours.encode_ordinary(text) == hf_ids(hf, text, special=False), name


@pytest.mark.parametrize("text", HELD_OUT + TRAINING_TEXT)
def test_equals_hf_on_samples(family, text):
    assert_same_ids(family, text)


def test_family_settings_are_read(family):
    name, hf, ours = family
    assert ours.vocab_size == hf.get_vocab_size(with_added_tokens=True)
    assert ours.eot_id == hf.token_to_id(EOT_OF[name])
    assert ours.bos_id == (hf.token_to_id("<|begin_of_text|>") if name == "llama3" else None)
    assert ours.ignore_merges == (name == "llama3")
    assert ours.gguf_pre == {"gpt2": "gpt-2", "smollm": "smollm", "llama3": "llama-bpe", "qwen2": "qwen2"}[name]
    assert set(ours.special_tokens) == set(SPECIALS[name])
    assert ("<tool_call>" in ours.added_tokens) == (name == "qwen2") and "<tool_call>" not in ours.special_tokens
    assert Tokenizer.from_json_str(ours.to_json_str()) == ours


SPECIAL_TEXT = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
                "<tool_call>", "<|endoftext", "im_end|>"]
PIECES = list("aZé日ß1234567890٣ⅷ'sStTdDlLmMrReEvV.,!-\"_") + [
    " ", "  ", "   ", "\n", "\n\n", "\r\n", "\r", "\t", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u2000", "\u3000",
    "\u2028", " \n", "'s", "'T", "'re", "'LL", "ſ", "K", "🎉", "\U0001d538", "\U0001d7d8", "e\u0301", "\u212b",
    "ﬁ", "123456", "  12 ", "\x00"] + SPECIAL_TEXT
tricky_text = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=tricky_text)
def test_equals_hf_on_tricky_text(family, text):
    assert_same_ids(family, text)


# Characters assigned in Python's Unicode (14.0): `regex` knows a newer Unicode than `tokenizers`' regex
# engine, so characters assigned since may count as letters for one and not the other
# (docs/formats.md#other-families-tokenizers).
assigned_text = st.text(st.characters(exclude_categories=("Cn", "Cs")))


@settings(max_examples=150, deadline=None)
@given(text=assigned_text)
def test_equals_hf_on_random_unicode(family, text):
    assert_same_ids(family, text)


@settings(max_examples=100, deadline=None)
@given(text=st.text() | tricky_text)
def test_decode_round_trips(family, text):
    name, hf, ours = family
    expected = ours.pipeline.normalize(text)  # Qwen2 normalizes to NFC first
    assert ours.decode(ours.encode(text)) == expected
    assert ours.decode(ours.encode_ordinary(text)) == expected


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, r"\p{N}"])
def test_re_translation_matches_regex_on_every_bmp_character(pattern):
    """The `re` form of each family's regex splits all of U+0000..U+FFFF exactly as `regex` does."""
    splitter = Splitter(pattern)
    assert splitter.bmp is not None
    bmp = "".join(map(chr, range(0x10000)))
    for text in (bmp, " ".join(bmp[::7]), "\n".join(bmp[::13]), "'" + "'S".join(bmp[:5000:3])):
        assert splitter.bmp.findall(text) == regex.findall(pattern, text)


RULES_PATTERNS = {"gpt2": GPT2_PATTERN, "smollm": SMOLLM_PATTERN, "llama3": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}


RULES_EDGES = ["x  1 \n 2\t's", ".\n \nx", ".\n\n  \n  y", "x.\n  z", "(a 'b\t(c", "it's 'S 'sa\u3000x ſ'ſ", "\n  \n", "1234567 x12",
              "a  \n", " \t", "x 'll 're'VE", "\r\n\t\x0b \x85y", "..\n\n", "a\n", "\u3000'd"]


@pytest.mark.parametrize("name", FAMILIES)
@settings(max_examples=300, deadline=None)
@given(text=tricky_text | assigned_text | st.lists(st.sampled_from(RULES_EDGES), max_size=4).map("".join))
@example(text="".join(RULES_EDGES))
def test_numpy_pieces_equal_the_regex(name, text):
    """class_rules gives exactly the pieces of each family's regex (SmolLM's: Digits and GPT-2's in one), as
    `regex` finds them."""
    assert ClassRules(name)(text) == [piece.encode() for piece in regex.findall(RULES_PATTERNS[name], text)]


def long_text(seed: int, size: int = 3 * RULES_MIN) -> str:
    rng = np.random.default_rng(seed)
    plain = [p for p in PIECES + TRAINING_TEXT + HELD_OUT if not any(t in p for t in SPECIAL_TEXT)]  # one text
    parts = [str(p) for p in rng.choice(np.array(plain, dtype=object), size // 4)]
    return "".join(parts)[:size]


@pytest.mark.parametrize("seed", range(3))
def test_long_texts_split_by_numpy_equal_hf(family, seed):
    """Texts of RULES_MIN characters and more take the numpy path, with its own cache of UTF-8 pieces; the ids
    still equal Hugging Face's, and on a text that holds every marker byte too (which `re` splits)."""
    name, hf, ours = family
    text = long_text(seed)
    assert_same_ids(family, text)
    assert ours._piece_cache.current  # the numpy path encoded it
    every_marker = text + "".join(map(chr, (*range(0, 9), *range(14, 32), 127)))
    assert ours._rules(every_marker) is None
    assert_same_ids(family, every_marker)


def space_split_pieces(tok: Tokenizer, text: str) -> list[str]:
    words = text.split(" ")
    return tok.pipeline.pretokenize(words[0]) + [p for w in words[1:] for p in tok.pipeline.pretokenize(" " + w)]


@settings(max_examples=150, deadline=None)
@given(text=tricky_text)
def test_space_split_rule(family, text):
    """Splitting at spaces (encode's fast path: each word after a space is " " + word on its own) gives the
    pipeline's pieces whenever the family's breaker finds nothing in the text."""
    name, hf, ours = family
    if ours._space_split and not ours._breaker.search(text):
        words = text.split(" ")
        assert space_split_pieces(ours, text) == ours.pipeline.pretokenize(text)


@pytest.mark.parametrize("text", ["a\n  b", "x\t \t", "a  12", "  1"])
def test_space_split_breaker_is_needed(text):
    """For each text the breaker fires on for some family, splitting at spaces would be wrong there."""
    wrong = 0
    for name in FAMILIES:
        ours = Tokenizer.from_json_str(build(name).to_str())
        if ours._space_split and ours._breaker.search(text):
            wrong += space_split_pieces(ours, text) != ours.pipeline.pretokenize(text)
    assert wrong


def test_unsupported_tokenizers_stop_with_one_message():
    spec = json.loads(build("gpt2").to_str())
    sentencepiece = json.loads(json.dumps(spec))
    sentencepiece["model"]["byte_fallback"] = True
    sentencepiece["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
                                      "split": False}
    with pytest.raises(TinyGPTError, match="SentencePiece.*Llama 2, Mistral, TinyLlama.*GPT-2, SmolLM"):
        Tokenizer.from_json_str(json.dumps(sentencepiece))
    unigram = json.loads(json.dumps(spec))
    unigram["model"] = {"type": "Unigram", "vocab": [["a", 0.0]]}
    with pytest.raises(TinyGPTError, match="model type is 'Unigram'"):
        Tokenizer.from_json_str(json.dumps(unigram))
    merged = json.loads(json.dumps(spec))
    merged["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "a"}, "behavior": "MergedWithNext", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    with pytest.raises(TinyGPTError, match="behavior 'MergedWithNext' is not supported"):
        Tokenizer.from_json_str(json.dumps(merged))
    no_eot = json.loads(json.dumps(spec))
    no_eot["added_tokens"][0]["content"] = "<|other|>"
    with pytest.raises(TinyGPTError, match="no end-of-text token"):
        Tokenizer.from_json_str(json.dumps(no_eot))


@pytest.mark.parametrize("family", ["gpt2", "llama3"])
def test_merges_read_in_either_layout_and_bad_ones_are_named(family):
    spec = json.loads(build(family).to_str())
    as_lists = [m.split(" ") if isinstance(m, str) else m for m in spec["model"]["merges"]]
    text = "def f(x):\n    return x + 12345  # naïve ünïcode\n"
    expected = Tokenizer.from_json_str(json.dumps(spec)).encode(text)
    for merges in (as_lists, [" ".join(m) for m in as_lists]):  # newer files write lists, older "left right"
        spec["model"]["merges"] = merges
        assert Tokenizer.from_json_str(json.dumps(spec)).encode(text) == expected
    for bad, message in (([*as_lists[:5], ["a", "b", "c"]], r"merge 5 \['a', 'b', 'c'\] is not two tokens"),
                         ([*as_lists[:3], "ab"], "merge 3 'ab' is not two tokens"),
                         ([*as_lists[:2], ["a", 7]], r"merge 2 \['a', 7\] is not two tokens"),
                         ([*as_lists[:4], ["a", "\u2603"]], "merge 4 .*'\u2603'.* not in the vocabulary")):
        spec["model"]["merges"] = bad
        with pytest.raises(TinyGPTError, match=message):
            Tokenizer.from_json_str(json.dumps(spec))


def test_other_split_settings_equal_hf():
    """Settings the families do not use but tokenizer.json allows: Removed, invert, add_prefix_space, non-
    individual digits, NFKC, lstrip/rstrip and normalized added tokens, merges as [a, b] lists."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.normalizer = normalizers.NFKC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s*-+\s*"), behavior="removed", invert=False),
        pre_tokenizers.Split(Regex(r"[.;]"), behavior="isolated", invert=True),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)])
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(TRAINING_TEXT * 3, trainer)
    hf.add_tokens([AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False),
                   AddedToken("ﬁne", normalized=True, special=False)])
    ours = Tokenizer.from_json_str(hf.to_str())
    assert ours.safe_before is None  # no known cut points: long documents are encoded whole
    texts = HELD_OUT + TRAINING_TEXT + ["a - b -- c;d.e 12ab34  <mask> x<mask>  \t<mask>y fine ﬁne"]
    for text in texts:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
    spec = json.loads(hf.to_str())
    assert isinstance(spec["model"]["merges"][0], list)  # tokenizers writes pairs; strings load the same
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    assert Tokenizer.from_json_str(json.dumps(spec)).merges == ours.merges


# ---- the pipeline with a model's tokenizer: train_bpe --from_model, then encode -------------------------------

LONG_DOCUMENTS = [
    "Chapter 1.\nIt was 1987; the end.\n\n" * 8 + "Numbers 1234567890 and words, words, words!\n" * 6,
    "日本語の文。\n\n  indented 42.\n\t-- dashes --\r\nend." * 10,
]


def test_from_model_then_encode_equals_hf(family, tmp_path, monkeypatch):
    """train_bpe --from_model takes the model folder's tokenizer.json; encode then writes, for each document in
    small pieces, the beginning token (if any), HF's ids and the end-of-text token."""
    from tinygpt.tokenizer import encode as encode_module, pieces as pieces_module
    from tinygpt.tokenizer.train_bpe import main as train_bpe_main

    name, hf, ours = family
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text(hf.to_str(), encoding="utf-8")
    tokenizer_path = tmp_path / "tokenizer.json"
    assert train_bpe_main(["--from_model", str(model), "--out", str(tokenizer_path)]) == ours
    monkeypatch.setattr(pieces_module, "PIECE_BYTES", 40)  # cut documents at the family's safe points
    monkeypatch.setattr(encode_module, "PIECE_BYTES", 40)
    docs = LONG_DOCUMENTS + [t for t in HELD_OUT + TRAINING_TEXT if t and "<|" not in t]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{doc}\n<|endoftext|>\n" for doc in docs), encoding="utf-8")
    meta = encode_module.encode_corpus(corpus, tokenizer_path, tmp_path / "out", 0.2, threads=2)
    ids = np.concatenate([np.fromfile(tmp_path / "out" / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")])
    bos = [ours.bos_id] if ours.bos_id is not None else []
    expected = [i for doc in docs for i in bos + hf_ids(hf, doc, special=False) + [ours.eot_id]]
    assert ids.tolist() == expected
    assert meta["dtype"] == "uint16" and meta["bos_id"] == ours.bos_id and meta["eot_id"] == ours.eot_id


def test_from_model_refuses_what_it_cannot_encode(tmp_path):
    from tinygpt.tokenizer.train_bpe import main as train_bpe_main

    with pytest.raises(TinyGPTError, match="tokenizer not found"):
        train_bpe_main(["--from_model", str(tmp_path), "--out", str(tmp_path / "t.json")])
    spec = json.loads(build("gpt2").to_str())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(TinyGPTError, match="SentencePiece"):
        train_bpe_main(["--from_model", str(tmp_path), "--out", str(tmp_path / "t.json")])
    assert not (tmp_path / "t.json").exists()
    with pytest.raises(TinyGPTError, match="--corpus .* or --from_model"):
        train_bpe_main(["--out", str(tmp_path / "t.json")])


def test_vocabulary_above_65535_gives_uint32_token_files(tmp_path):
    """A Llama-3-like vocabulary whose end-of-text id is above 65,535: encode writes uint32, and training's
    reader (batches) and the report read the ids back."""
    from itertools import product

    from tinygpt.model.batches import TokenFile, read_meta, token_dtype
    from tinygpt.tokenizer.encode import encode_corpus
    from tinygpt.tokenizer.pipeline import BYTE_TO_UNICODE

    spec = json.loads(build("llama3").to_str())
    vocab = spec["model"]["vocab"]
    alphabet = list(BYTE_TO_UNICODE.values())
    filler = ("".join(p) for p in product(alphabet, repeat=3))  # unused tokens, as a large vocabulary has
    next_id = len(vocab)
    for token in filler:
        if next_id == 65_600:
            break
        if token not in vocab:
            vocab[token] = next_id
            next_id += 1
    for i, added in enumerate(spec["added_tokens"]):
        added["id"] = 65_600 + i
    for item in spec["post_processor"]["processors"][1]["special_tokens"].values():
        item["ids"] = [65_600]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    ours = Tokenizer.load(path)
    assert ours.eot_id == 65_601 and ours.bos_id == 65_600
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{t}\n<|endoftext|>\n" for t in TRAINING_TEXT), encoding="utf-8")
    meta = encode_corpus(corpus, path, tmp_path / "out", 0.2, threads=1)
    assert meta["dtype"] == "uint32" == token_dtype(read_meta(tmp_path / "out")["vocab_size"]).name
    tokens = TokenFile.open(tmp_path / "out" / "train.bin", np.dtype(meta["dtype"]), 1)
    first = tokens.windows(torch.tensor([0]), 3)[0].tolist()
    assert first == [65_600] + ours.encode_ordinary(TRAINING_TEXT[0])[:2]
    assert tokens.token_counts(ours.vocab_size)[65_601] == meta["documents"]["train"]
    meta["dtype"] = "uint16"  # a meta.json that disagrees with its vocabulary is refused, not misread
    (tmp_path / "out" / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(TinyGPTError, match="says dtype 'uint16' but 65603 ids are stored as uint32"):
        read_meta(tmp_path / "out")


# ---- llama.cpp reads our GGUF tokenizer metadata and tokenizes as we do ---------------------------------------

LLAMA_HELD_OUT = [  # held-out text (not in TRAINING_TEXT), NFC as real text is (llama.cpp does not normalize)
    "In 2031 the 12,500 visitors paid 7.25 each; call 555-0199 or 0800 123 456.",
    "Ünïcödé: Ærøskøbing, Ñandú, 東京の夜景, Привет мир, مرحبا, 🙂🚀 and ٣٤٥ ⅷ.",
    "whitespace    runs\n\n\n   indented\t\ttabs  \r\n\r\n  \n end   ",
    "quote's 'RE here, they'LL go<|endoftext|> then <|im_start|>user\nhi<|im_end|> and <tool_call> x",
]


def write_vocab_gguf(path, tokenizer: Tokenizer, arch: str) -> None:
    """A GGUF with a tiny model's metadata and the tokenizer, no tensors: all llama.cpp's vocab-only load reads."""
    import gguf

    from tinygpt.export.gguf_convert import add_model_metadata, add_tokenizer_metadata
    from tinygpt.model.gpt import GPTConfig

    config = GPTConfig(vocab_size=tokenizer.vocab_size, arch=arch, n_layer=1, n_head=2, n_embd=16, block_size=32)
    writer = gguf.GGUFWriter(path, arch=arch)
    add_model_metadata(writer, config)
    add_tokenizer_metadata(writer, tokenizer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_tokenizer(path):
    """(text, add_bos, parse_special) -> ids, by llama-tokenize if built, else llama-cpp-python."""
    import subprocess

    from llama_tools import find_llama_tool, llama_tool

    if find_llama_tool("llama-tokenize") is None:
        try:
            import llama_cpp
        except ImportError:
            llama_tool("llama-tokenize")  # skips here, fails under CI
        model = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        return lambda text, bos, special: model.tokenize(text.encode(), add_bos=bos, special=special)

    def tokenize(text: str, bos: bool, special: bool) -> list[int]:
        prompt = path.with_suffix(".txt")
        prompt.write_text(text, encoding="utf-8")
        command = [str(llama_tool("llama-tokenize")), "-m", str(path), "--file", str(prompt), "--ids",
                   "--no-escape", "--log-disable"] + ([] if bos else ["--no-bos"]) + (
                   [] if special else ["--no-parse-special"])
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    return tokenize


def test_llama_cpp_tokenizes_held_out_text_to_our_ids(family, tmp_path):
    name, hf, ours = family
    path = tmp_path / f"{name}.gguf"
    write_vocab_gguf(path, ours, {"gpt2": "gpt2", "qwen2": "qwen2"}.get(name, "llama"))
    tokenize = llama_cpp_tokenizer(path)
    for text in LLAMA_HELD_OUT + HELD_OUT:
        assert tokenize(text, True, True) == ours.encode(text, bos=True), (name, text)
        bos = [ours.bos_id] if ours.bos_id is not None else []
        assert tokenize(text, True, False) == bos + ours.encode_ordinary(text), (name, text)


def test_gguf_refuses_a_pipeline_llama_cpp_does_not_know(tmp_path):
    import gguf

    from tinygpt.export.gguf_convert import add_tokenizer_metadata

    spec = json.loads(build("llama3").to_str())
    spec["model"]["ignore_merges"] = False  # llama.cpp's llama-bpe always ignores merges
    writer = gguf.GGUFWriter(tmp_path / "x.gguf", arch="llama")
    with pytest.raises(TinyGPTError, match="'llama-bpe' pre-tokenizer has ignore_merges True"):
        add_tokenizer_metadata(writer, Tokenizer.from_json_str(json.dumps(spec)))
    spec = json.loads(build("gpt2").to_str())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{N}{1,2}"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    with pytest.raises(TinyGPTError, match="none that llama.cpp implements"):
        add_tokenizer_metadata(writer, Tokenizer.from_json_str(json.dumps(spec)))


def test_sampling_prompts_start_with_the_beginning_token(family, monkeypatch):
    """As HF's encode and llama.cpp do: a Llama 3 prompt starts with <|begin_of_text|>, others with the text."""
    from tinygpt.model import sample as sample_module

    name, hf, ours = family
    seen = []
    monkeypatch.setattr(sample_module, "generate", lambda model, ids, *args, **kwargs: seen.append(ids) or iter(()))
    list(sample_module.complete(None, ours, "Once upon a time", 5))
    assert seen == [hf_ids(hf, "Once upon a time", bos=True)]

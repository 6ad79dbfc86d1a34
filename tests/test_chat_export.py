"""A chat model's files: the Hugging Face folder (template, stops, Modelfile) and the GGUF's chat metadata, checked
with transformers, gguf-py and llama.cpp's own converter's reading (gguf.SpecialVocab)."""

from __future__ import annotations

import json
import os
import re
from functools import cache
from pathlib import Path

import gguf
import pytest
import torch
from builders import printable, random_gpt, save_tiny_checkpoint, tiny_tokenizer

from tinygpt.common import EOT, TinyGPTError
from tinygpt.export.gguf_convert import convert_to_gguf
from tinygpt.export.hf import MODELFILE_GGUF, export_hf
from tinygpt.model.chat import ChatSession
from tinygpt.model.gpt import GPT
from tinygpt.model.sample import generate
from tinygpt.tokenizer.bpe import Tokenizer
from tinygpt.tokenizer.chat import CHATML_TEMPLATE, IM_END, IM_START, OLLAMA_TEMPLATE, encode_chat
from tinygpt.weights.read import read_chat_template

BASE_FILES = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
CONVERSATIONS = [
    [{"role": "user", "content": "Tell me a story about a fox named Pip."}],
    [{"role": "system", "content": "You tell short stories."},
     {"role": "user", "content": "A story, please: a girl, her dog Max, a river."},
     {"role": "assistant", "content": "Once upon a time, a girl walked with Max by the river."},
     {"role": "user", "content": "Who walked by the river?"}],
    [{"role": "user", "content": "  leading spaces,\ttabs and\n\nnew lines; café, 日本語 🙂"},
     {"role": "assistant", "content": "\nIt's what they'd said: 42!"},
     {"role": "user", "content": "end"}],
]


def chat_tokenizer() -> Tokenizer:
    """The tiny test tokenizer with the chat format's special tokens (train_bpe reserves them)."""
    base = tiny_tokenizer()
    if IM_START in base.special_tokens:
        return base
    return Tokenizer(base.merges, specials=(IM_START, IM_END, EOT))


def chat_model(tokenizer: Tokenizer, block_size: int = 256, **config) -> GPT:
    """A random model whose greedy replies are printable text that does not end at once: tokens that are not whole
    printable characters and the special tokens get small embeddings (the head is tied: small logits)."""
    model = random_gpt(tokenizer, n_embd=64, block_size=block_size, std=0.15, **config)
    with torch.no_grad():
        for i, piece in enumerate(tokenizer.vocab):
            if not printable(piece) or i in tokenizer.special_tokens.values():
                model.tok_emb.weight[i] *= 0.1
                model.lm_head.weight[i] *= 0.1 if not model.config.tie_embeddings else 1.0
    return model


def save_chat_checkpoint(path: Path, model: GPT, tokenizer: Tokenizer, template: str | None = CHATML_TEMPLATE) -> Path:
    """A checkpoint as chat fine-tuning writes it: a base checkpoint plus "chat_template"."""
    save_tiny_checkpoint(path, model, tokenizer)
    if template is not None:
        ckpt = torch.load(path, weights_only=True)
        torch.save({**ckpt, "chat_template": template}, path)
    return path


def build_chat_files(tmp: Path, **config) -> dict:
    """checkpoint, export folder and f16 GGUF of a tiny chat model."""
    tokenizer = chat_tokenizer()
    model = chat_model(tokenizer, **config)
    ckpt = save_chat_checkpoint(tmp / "chat.pt", model, tokenizer)
    export = export_hf(ckpt, tmp / "tinygpt-chat")
    f16 = convert_to_gguf(export, export / "model-f16.gguf", "f16")
    return dict(tokenizer=tokenizer, model=model, checkpoint=ckpt, export=export, f16=f16, tmp=tmp)


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory) -> dict:
    return build_chat_files(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def base_files(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("base")
    tokenizer = chat_tokenizer()
    ckpt = save_chat_checkpoint(tmp / "base.pt", chat_model(tokenizer), tokenizer, template=None)
    export = export_hf(ckpt, tmp / "tinygpt")
    return dict(tokenizer=tokenizer, checkpoint=ckpt, export=export,
                f16=convert_to_gguf(export, export / "model-f16.gguf", "f16"))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_chat_export_has_template_stops_and_modelfile(chat_files):
    export, tokenizer = chat_files["export"], chat_files["tokenizer"]
    assert {p.name for p in export.iterdir()} == BASE_FILES | {"Modelfile", "model-f16.gguf"}
    settings = read_json(export / "tokenizer_config.json")
    assert settings["chat_template"] == CHATML_TEMPLATE and settings["eos_token"] == IM_END
    assert settings["bos_token"] == EOT and settings["add_bos_token"] is False
    generation = read_json(export / "generation_config.json")
    assert generation["eos_token_id"] == [tokenizer.special_tokens[IM_END], tokenizer.eot_id]


def test_base_export_is_as_before(base_files):
    export, tokenizer = base_files["export"], base_files["tokenizer"]
    assert {p.name for p in export.iterdir()} == BASE_FILES | {"model-f16.gguf"}
    settings = read_json(export / "tokenizer_config.json")
    assert "chat_template" not in settings and settings["eos_token"] == EOT
    assert read_json(export / "generation_config.json") == {"bos_token_id": tokenizer.eot_id,
                                                            "eos_token_id": tokenizer.eot_id,
                                                            "pad_token_id": tokenizer.eot_id}


@pytest.mark.parametrize("files", ["chat_files", "base_files"])
def test_every_exported_file_has_the_usual_permissions(files, request):
    """model.safetensors too (safetensors writes a 0600 temporary file and renames it)."""
    umask = os.umask(0)
    os.umask(umask)
    export = request.getfixturevalue(files)["export"]
    modes = {p.name: p.stat().st_mode & 0o777 for p in export.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_transformers_renders_our_prompt_ids(chat_files):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(chat_files["export"])
    assert theirs.eos_token == IM_END
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            ids = theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True,
                                             return_dict=False)
            assert list(ids) == encode_chat(chat_files["tokenizer"], messages, add_generation_prompt=prompt)[0]


@cache
def hf_model(folder: Path):
    """transformers' model for an exported folder (loaded once per folder)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def hf_greedy_reply(folder: Path, tokenizer: Tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """transformers' greedy reply with the folder's generation_config (its eos ids stop it)."""
    hf = hf_model(folder)
    out = hf.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)[0, len(ids):].tolist()
    if out and out[-1] in hf.generation_config.eos_token_id:
        out = out[:-1]
    return tokenizer.decode(out)


def our_reply(model: GPT, tokenizer: Tokenizer, messages: list[dict], max_tokens: int) -> str:
    """Our session's greedy reply to the last message of `messages` (a system prompt first, then turns)."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    session = ChatSession(model, tokenizer, system, max_tokens, dict(temperature=0))
    session.turns = messages[1 if system else 0:-1]
    return "".join(session.reply(messages[-1]["content"]))


def test_transformers_greedy_reply_equals_ours(chat_files):
    tokenizer, messages = chat_files["tokenizer"], CONVERSATIONS[1]
    ids = encode_chat(tokenizer, messages, add_generation_prompt=True)[0]
    ours = our_reply(chat_files["model"], tokenizer, messages, 12)
    assert len(tokenizer.encode_ordinary(ours)) >= 8  # a real reply, not an immediate <|im_end|>
    assert hf_greedy_reply(chat_files["export"], tokenizer, ids, 12) == ours


def stopping_model(tokenizer: Tokenizer, messages: list[dict]) -> tuple[GPT, str]:
    """An untied model whose head rows of <|im_end|> and of a greedy reply token (the 4th to 6th, one not said
    before) are swapped, and the reply it gives to `messages`: the tokens before that one, then <|im_end|>."""
    model = chat_model(tokenizer, tie_embeddings=False)
    ids = encode_chat(tokenizer, messages, add_generation_prompt=True)[0]
    reply = list(generate(model, ids, 6, temperature=0))
    k = next(i for i in range(3, 6) if reply[i] not in reply[:i])
    im_end = tokenizer.special_tokens[IM_END]
    with torch.no_grad():
        model.lm_head.weight[[reply[k], im_end]] = model.lm_head.weight[[im_end, reply[k]]].clone()
    return model, tokenizer.decode(reply[:k])


def test_replies_stop_at_im_end(tmp_path):
    """Our session and transformers (through generation_config) both end the reply at <|im_end|>."""
    tokenizer, messages = chat_tokenizer(), CONVERSATIONS[0]
    model, expected = stopping_model(tokenizer, messages)
    assert len(expected) >= 3 and expected.isprintable()  # whole characters: comparable as text everywhere
    assert our_reply(model, tokenizer, messages, 12) == expected
    export = export_hf(save_chat_checkpoint(tmp_path / "stops.pt", model, tokenizer), tmp_path / "hf")
    ids = encode_chat(tokenizer, messages, add_generation_prompt=True)[0]
    assert hf_greedy_reply(export, tokenizer, ids, 12) == expected


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(instruction, argument) pairs as Ollama's parser reads them: `#` comments, one instruction per line, an
    argument in triple quotes may span lines."""
    commands = []
    for match in re.finditer(r'^(?:#[^\n]*|(\w+) ("""(.*?)"""|[^\n]*))\n?', text, re.S | re.M):
        if match.group(1):
            commands.append((match.group(1).upper(), match.group(3) if match.group(3) is not None
                             else match.group(2)))
    return commands


def test_modelfile_runs_the_quantized_file_with_the_template_and_stops(chat_files):
    text = (chat_files["export"] / "Modelfile").read_text(encoding="utf-8")
    commands = parse_modelfile(text)
    assert commands[0] == ("FROM", f"./{MODELFILE_GGUF}") and MODELFILE_GGUF == "model-q4_k_m.gguf"
    assert [arg for cmd, arg in commands if cmd == "TEMPLATE"] == [OLLAMA_TEMPLATE]
    parameters = [arg.split(" ", 1) for cmd, arg in commands if cmd == "PARAMETER"]
    stops = [json.loads(value) for name, value in parameters if name == "stop"]
    assert IM_END in stops and EOT in stops
    assert ["num_ctx", str(chat_files["model"].config.block_size)] in parameters
    assert {cmd for cmd, _ in commands} == {"FROM", "TEMPLATE", "PARAMETER"}
    # every line belongs to an instruction or a comment: nothing Ollama would refuse
    assert "".join(m.group(0) for m in re.finditer(r'^(?:#[^\n]*|\w+ (?:"""(?:.*?)"""|[^\n]*))\n?', text,
                                                   re.S | re.M)) == text


def test_gguf_carries_the_template_and_ends_turns_at_im_end(chat_files):
    tokenizer = chat_files["tokenizer"]
    reader = gguf.GGUFReader(chat_files["f16"])
    value = lambda key: reader.get_field(key).contents()  # noqa: E731
    im_end = tokenizer.special_tokens[IM_END]
    assert value("tokenizer.chat_template") == CHATML_TEMPLATE
    assert value("tokenizer.ggml.eos_token_id") == value("tokenizer.ggml.eot_token_id") == im_end
    assert value("tokenizer.ggml.bos_token_id") == tokenizer.eot_id and value("tokenizer.ggml.add_bos_token") is False
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    assert {tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == {IM_START, IM_END, EOT}
    # what llama.cpp's own converter (convert_hf_to_gguf.py) reads from the same folder
    special = gguf.SpecialVocab(chat_files["export"], load_merges=False, n_vocab=tokenizer.vocab_size)
    assert special.chat_template == value("tokenizer.chat_template")
    assert special.special_token_ids["eos"] == im_end and special.special_token_ids["bos"] == tokenizer.eot_id


def test_base_gguf_has_no_chat_keys(base_files):
    reader = gguf.GGUFReader(base_files["f16"])
    assert reader.get_field("tokenizer.chat_template") is None
    assert reader.get_field("tokenizer.ggml.eot_token_id") is None
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == base_files["tokenizer"].eot_id


def test_read_chat_template_from_each_kind_of_file(chat_files, base_files):
    for key in ("checkpoint", "export", "f16"):
        assert read_chat_template(chat_files[key]) == CHATML_TEMPLATE, key
        assert read_chat_template(base_files[key]) is None, key


def test_a_foreign_template_or_a_missing_end_token_is_refused(chat_files, tmp_path):
    tokenizer, model = chat_files["tokenizer"], chat_files["model"]
    other = save_chat_checkpoint(tmp_path / "other.pt", model, tokenizer, template="{{ messages }}")
    with pytest.raises(TinyGPTError, match="not tinygpt's ChatML"):
        export_hf(other, tmp_path / "other")
    plain = tiny_tokenizer() if IM_START not in tiny_tokenizer().special_tokens else Tokenizer(tokenizer.merges)
    no_specials = save_chat_checkpoint(tmp_path / "plain.pt", random_gpt(plain), plain)
    with pytest.raises(TinyGPTError, match=r"no special token <\|im_start\|> or <\|im_end\|>"):
        export_hf(no_specials, tmp_path / "plain")
    assert not (tmp_path / "other").exists() and not (tmp_path / "plain").exists()

    folder = tmp_path / "edited"
    export_hf(chat_files["checkpoint"], folder)
    settings = read_json(folder / "tokenizer_config.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "eos_token": "</s>"}))
    with pytest.raises(TinyGPTError, match=r"eos_token '</s>' is not a special token"):
        convert_to_gguf(folder, folder / "model-f16.gguf")
    assert not (folder / "model-f16.gguf").exists()

"""`tinygpt chat`: scripted turns, the interactive loop (/reset, /system, /quit, end of input), streaming, and the
history kept within the context; replies checked against transformers' greedy replies on the same messages."""

from __future__ import annotations

import io
import sys
from functools import cache

import pytest
import torch
from test_chat_export import (chat_model, chat_tokenizer, hf_greedy_reply, save_chat_checkpoint)

from tinygpt.common import TinyGPTError
from tinygpt.export.hf import export_hf
from tinygpt.model.chat import ChatSession, converse, main
from tinygpt.tokenizer.bpe import Tokenizer
from tinygpt.tokenizer.chat import encode_chat

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("chat_cli")
    tokenizer = chat_tokenizer()
    model = chat_model(tokenizer)
    checkpoint = save_chat_checkpoint(tmp / "chat.pt", model, tokenizer)
    return dict(tokenizer=tokenizer, model=model, checkpoint=checkpoint, hf=export_hf(checkpoint, tmp / "hf"),
                tmp=tmp)


@cache
def hf_tokenizer(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(folder)


def hf_reply(files: dict, messages: list[dict]) -> str:
    """transformers' greedy reply to `messages` (prompt ids from apply_chat_template, as a user of the folder
    would make them)."""
    ids = hf_tokenizer(files["hf"]).apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False)
    return hf_greedy_reply(files["hf"], files["tokenizer"], list(ids), MAX_TOKENS)


def session(files: dict, system: str | None = None, model=None) -> ChatSession:
    return ChatSession(model or files["model"], files["tokenizer"], system, MAX_TOKENS, dict(temperature=0))


def test_scripted_turns_carry_the_history(files, capsys):
    main(["--checkpoint", str(files["checkpoint"]), "--system", "Be kind.", "--message", "Hello there.",
          "--message", "And then?", "--temperature", "0", "--max_tokens", str(MAX_TOKENS)])
    out, err = capsys.readouterr()
    first, second, end = out.split("\n")
    assert end == "" and err == ""
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello there."}]
    assert first == hf_reply(files, messages) and len(first) >= 5
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    assert second == hf_reply(files, messages)


def test_interactive_commands(files):
    lines = ["Hello there.\n", "\n", "/reset\n", "Hello there.\n", "/system Be brief.\n", "Hi!\n", "/nope\n",
             "/quit\n", "never read\n"]
    out, notes = io.StringIO(), io.StringIO()
    chat = session(files, system="Be kind.")
    converse(chat, lines, out, notes)
    kind = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello there."}]
    brief = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    # /reset forgets the first exchange, so the same message gets the same greedy reply; /system starts anew
    assert out.getvalue().split("\n") == [hf_reply(files, kind)] * 2 + [hf_reply(files, brief), ""]
    assert chat.messages() == brief + [{"role": "assistant", "content": hf_reply(files, brief)}]
    assert "(new conversation)" in notes.getvalue() and "unknown command /nope" in notes.getvalue()
    chat.set_system("")
    assert chat.messages() == []


def test_the_reply_streams_while_it_is_generated(files):
    """The reply is written in several pieces, each flushed, the first before the model's last forward pass."""
    events = []

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            events.append(("write", text))
            return super().write(text)

        def flush(self) -> None:
            events.append(("flush", None))

    model = chat_model(files["tokenizer"])
    model.register_forward_hook(lambda *_: events.append(("forward", None)))
    out = Recorder()
    converse(session(files, model=model), ["Hello there.\n"], out, io.StringIO())
    writes = [i for i, (kind, _) in enumerate(events) if kind == "write"]
    forwards = [i for i, (kind, _) in enumerate(events) if kind == "forward"]
    assert len(forwards) == MAX_TOKENS and len(writes) > 3
    assert writes[0] < forwards[1] and writes[-2] > forwards[-1]  # text after each token; the newline last
    assert all(events[i + 1][0] == "flush" for i in writes)
    assert out.getvalue() == hf_reply(files, [{"role": "user", "content": "Hello there."}]) + "\n"


def test_ctrl_c_stops_the_reply_not_the_chat(files):
    model = chat_model(files["tokenizer"])
    calls = []

    def interrupt_once(*_):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    model.register_forward_hook(interrupt_once)
    chat, out, notes = session(files, model=model), io.StringIO(), io.StringIO()
    converse(chat, ["Hello there.\n", "Hello there.\n"], out, notes)
    partial, full, end = out.getvalue().split("\n")
    expected = hf_reply(files, [{"role": "user", "content": "Hello there."}])
    assert expected.startswith(partial) and len(partial) < len(expected) and full == expected and end == ""
    assert "reply interrupted" in notes.getvalue()
    assert chat.messages() == [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": full}]


def test_history_stays_within_the_context_and_keeps_the_system_prompt(files):
    tokenizer = files["tokenizer"]
    model = chat_model(tokenizer, block_size=96)  # reply_room = MAX_TOKENS: prompts up to 86 tokens
    chat = session(files, system="Tell stories.", model=model)
    limit = model.config.block_size - MAX_TOKENS
    history = []
    for n in range(6):
        message = f"Story {n}, please."
        chat_turns_before = list(chat.turns)
        reply = "".join(chat.reply(message))
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]
        kept = chat.turns
        assert kept == history[len(history) - len(kept):] and kept[0]["role"] == "user"  # whole oldest exchanges go
        prompt = encode_chat(tokenizer, chat.messages(kept[:-1]), add_generation_prompt=True)[0]
        assert len(prompt) <= limit and chat.messages()[0] == {"role": "system", "content": "Tell stories."}
        dropped = chat_turns_before[:len(chat_turns_before) - (len(kept) - 2)]
        if dropped:  # the prompt with one more exchange would not have fitted
            longer = encode_chat(tokenizer, chat.messages(dropped[-2:] + kept[:-1]), add_generation_prompt=True)[0]
            assert len(longer) > limit
    assert len(history) > len(chat.turns)  # some turns were dropped

    too_long = "word " * 100
    with pytest.raises(TinyGPTError, match="send a shorter message or set a shorter /system"):
        list(chat.reply(too_long))
    notes = io.StringIO()
    converse(chat, [too_long + "\n", "Story 9.\n"], io.StringIO(), notes)  # the conversation goes on
    assert notes.getvalue().startswith("error: the message and the system prompt take")
    assert chat.turns[-2]["content"] == "Story 9."


def test_end_of_input_exits_cleanly(files, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there.\n"))  # then the end of input, no /quit
    main(["--checkpoint", str(files["checkpoint"]), "--temperature", "0", "--max_tokens", str(MAX_TOKENS)])
    out, err = capsys.readouterr()
    assert err == "" and out == hf_reply(files, [{"role": "user", "content": "Hello there."}]) + "\n"


def test_checkpoint_folder_and_gguf_give_the_same_reply(files, capsys):
    """The three sources of one model, each with its chat template (no warning): the same greedy reply."""
    from tinygpt.export.gguf_convert import convert_to_gguf

    f32 = convert_to_gguf(files["hf"], files["tmp"] / "chat-f32.gguf", "f32")
    replies = set()
    for flag, path in (("--checkpoint", files["checkpoint"]), ("--hf_dir", files["hf"]), ("--gguf", f32)):
        main([flag, str(path), "--message", "Hello there.", "--temperature", "0", "--max_tokens", str(MAX_TOKENS)])
        out, err = capsys.readouterr()
        assert err == "", flag
        replies.add(out)
    assert replies == {hf_reply(files, [{"role": "user", "content": "Hello there."}]) + "\n"}


def test_a_base_model_gets_one_warning_and_chatml(files, capsys):
    base = save_chat_checkpoint(files["tmp"] / "base.pt", files["model"], files["tokenizer"], template=None)
    main(["--checkpoint", str(base), "--message", "Hello there.", "--message", "Again.", "--temperature", "0",
          "--max_tokens", str(MAX_TOKENS)])
    out, err = capsys.readouterr()
    assert err.count("warning:") == 1 and "carries no chat template" in err
    assert out.split("\n")[0] == hf_reply(files, [{"role": "user", "content": "Hello there."}])


def test_a_tokenizer_without_chat_tokens_is_refused(files):
    plain = Tokenizer(files["tokenizer"].merges)
    with pytest.raises(TinyGPTError, match="no special token"):
        ChatSession(torch.nn.Module(), plain)

"""llama.cpp chats with our chat GGUF using the template from the file: llama-server's /v1/chat/completions (with
its Jinja engine and with its built-in ChatML) and `llama-cli` in conversation mode give our prompt tokens and our
greedy replies, and end a reply at <|im_end|>."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from llama_tools import llama_tool
from test_chat_export import (CONVERSATIONS, build_chat_files, chat_model, chat_tokenizer, save_chat_checkpoint,
                              stopping_model)

from tinygpt.export.gguf_convert import convert_to_gguf
from tinygpt.export.hf import export_hf
from tinygpt.model.chat import main as chat_main
from tinygpt.model.gpt import GPT
from tinygpt.model.sample import generate
from tinygpt.tokenizer.bpe import Tokenizer
from tinygpt.tokenizer.chat import CHATML_TEMPLATE, IM_END, encode_chat, render_chat

MAX_TOKENS = 16
SYSTEM, MESSAGE, FOLLOW_UP = "You tell short stories.", "Tell me a story about a fox named Pip.", "Who is Pip?"


# the default model is llama (grouped-query attention here); gpt2 is the seed's
ARCHS = {"llama": dict(arch="llama", n_kv_head=2), "gpt2": {}}
# llama.cpp computes the f16 file's matmuls with f16 activations: its logits differ from ours by up to ~0.015
# here, so a greedy step whose best two tokens are closer than this could go either way
MARGIN = 0.04


def greedy_margin(model: GPT, tokenizer: Tokenizer) -> float:
    """The smallest gap between the best and second-best logit over the greedy replies the tests ask for."""
    gaps = []
    model.register_forward_hook(lambda _m, _i, out: gaps.append(float(out[0][0, -1].topk(2).values.diff().abs())))
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": MESSAGE}]
    for _ in range(2):
        ids = encode_chat(tokenizer, messages, add_generation_prompt=True)[0]
        reply = tokenizer.decode(generate(model, ids, MAX_TOKENS, temperature=0,
                                          eot_id=tokenizer.special_tokens[IM_END]))
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": FOLLOW_UP}]
    return min(gaps)


@pytest.fixture(scope="module", params=list(ARCHS))
def chat_files(tmp_path_factory, request) -> dict:
    """The chat model of the first seed without a near tie in the replies compared (random weights have them)."""
    tokenizer, arch = chat_tokenizer(), ARCHS[request.param]
    seed = next((s for s in range(40) if greedy_margin(chat_model(tokenizer, seed=s, **arch), tokenizer) > MARGIN),
                None)
    assert seed is not None, f"no seed gives greedy replies without near ties (margin {MARGIN})"
    return build_chat_files(tmp_path_factory.mktemp(f"chat_llama_{request.param}"), seed=seed, **arch)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode("utf-8")
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as response:
        return json.loads(response.read())


def start_server(model: Path, log: Path, flags: list[str]) -> tuple[subprocess.Popen, int]:
    """llama-server on 127.0.0.1 and a free port, once /health answers (its log, verbose, in `log`)."""
    binary = llama_tool("llama-server")
    port = free_port()
    proc = subprocess.Popen([str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", "1",
                             "-np", "1", "-lv", "4", *flags], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"llama-server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-2000:]}")
        try:
            if request(port, "/health").get("status") == "ok":
                return proc, port
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail("llama-server did not answer /health within 60 s")


@pytest.fixture(scope="module", params=[[], ["--no-jinja"]], ids=["jinja", "builtin-chatml"])
def server(chat_files, request):
    log = chat_files["tmp"] / f"server{'-'.join(request.param)}.log"
    proc, port = start_server(chat_files["f16"], log, request.param)
    yield port, log
    proc.terminate()
    proc.wait(timeout=30)


def our_cli_replies(capsys, gguf: Path, messages: list[str], system: str | None = SYSTEM) -> list[str]:
    """`tinygpt chat --gguf F [--system S] --message M ... --temperature 0`: one reply per message."""
    args = ["--gguf", str(gguf), "--temperature", "0", "--max_tokens", str(MAX_TOKENS), "--device", "cpu"]
    args += ["--system", system] if system else []
    for message in messages:
        args += ["--message", message]
    capsys.readouterr()
    chat_main(args)
    out, err = capsys.readouterr()
    assert err == ""  # the file carries a chat template: no warning
    replies = out.split("\n")
    assert replies[-1] == "" and len(replies) == len(messages) + 1, out  # these replies hold no newline
    return replies[:-1]


def test_server_reads_chatml_and_end_of_turn_from_the_file(chat_files, server):
    port, log = server
    props = request(port, "/props")
    assert props["eos_token"] == "<|im_end|>" and props["bos_token"] == "<|endoftext|>"
    assert props["chat_template"] == CHATML_TEMPLATE
    text = log.read_text(errors="replace")
    tokenizer = chat_files["tokenizer"]
    im_end, eot = tokenizer.special_tokens["<|im_end|>"], tokenizer.eot_id
    assert f"EOT token             = {im_end} '<|im_end|>'" in text
    assert f"EOG token             = {im_end} '<|im_end|>'" in text
    assert f"EOG token             = {eot} '<|endoftext|>'" in text
    # the template in use, rendered on llama.cpp's example conversation, is ChatML
    assert "chat template, example_format: '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n" in text
    messages = CONVERSATIONS[1]
    assert request(port, "/apply-template", {"messages": messages})["prompt"] == render_chat(messages, True)


def test_server_reply_and_prompt_tokens_equal_ours(chat_files, server, capsys):
    """Two turns: the second request carries our first reply as the assistant's turn, as a client would."""
    port, _ = server
    first, second = our_cli_replies(capsys, chat_files["f16"], [MESSAGE, FOLLOW_UP])
    tokenizer = chat_files["tokenizer"]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": MESSAGE}]
    for ours in (first, second):
        answer = request(port, "/v1/chat/completions", {"messages": messages, "temperature": 0,
                                                         "max_tokens": MAX_TOKENS, "seed": 1})
        assert answer["usage"]["prompt_tokens"] == len(encode_chat(tokenizer, messages, True)[0])
        assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == MAX_TOKENS
        assert len(tokenizer.encode_ordinary(ours)) >= MAX_TOKENS // 2  # a real reply of arbitrary tokens
        assert answer["choices"][0]["message"]["content"] == ours
        messages += [{"role": "assistant", "content": ours}, {"role": "user", "content": FOLLOW_UP}]


def llama_cli_reply(gguf: Path, message: str, system: str | None = None) -> str:
    """`llama-cli -m F [-sys S] -p M -st --temp 0`: the chat template from the file, one turn, the reply text."""
    args = [str(llama_tool("llama-cli")), "-m", str(gguf), "-p", message, "-st", "--temp", "0", "-n", str(MAX_TOKENS),
            "-t", "1"] + (["-sys", system] if system else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    after = done.stdout.split(f"> {message}\n", 1)[1]
    return after.split("\n\n[ Prompt:", 1)[0]


def test_llama_cli_conversation_gives_our_reply(chat_files, capsys):
    ours = our_cli_replies(capsys, chat_files["f16"], [MESSAGE])[0]
    assert llama_cli_reply(chat_files["f16"], MESSAGE, SYSTEM) == ours


def test_llama_cpp_ends_the_reply_at_im_end(tmp_path, capsys):
    tokenizer = chat_tokenizer()
    model, expected = stopping_model(tokenizer, [{"role": "user", "content": MESSAGE}])
    export = export_hf(save_chat_checkpoint(tmp_path / "stops.pt", model, tokenizer), tmp_path / "hf")
    gguf = convert_to_gguf(export, tmp_path / "stops-f16.gguf", "f16")
    assert our_cli_replies(capsys, gguf, [MESSAGE], system=None) == [expected]
    assert llama_cli_reply(gguf, MESSAGE) == expected
    proc, port = start_server(gguf, tmp_path / "server.log", [])
    try:
        answer = request(port, "/v1/chat/completions", {"messages": [{"role": "user", "content": MESSAGE}],
                                                         "temperature": 0, "max_tokens": MAX_TOKENS})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["choices"][0]["message"]["content"] == expected


def test_q4_k_m_equals_llama_quantize_and_is_served(chat_files, tmp_path):
    """Our q4_k_m of the chat model is byte for byte llama-quantize's (the chat keys copied like the others), and
    llama-server answers a chat completion from it."""
    from tinygpt.export.quantize import quantize_gguf

    ours, theirs = chat_files["tmp"] / "model-q4_k_m.gguf", tmp_path / "llama-q4_k_m.gguf"
    quantize_gguf(chat_files["f16"], ours, "q4_k_m", threads=1)
    done = subprocess.run([str(llama_tool("llama-quantize")), str(chat_files["f16"]), str(theirs), "Q4_K_M", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ours.read_bytes() == theirs.read_bytes()
    proc, port = start_server(ours, tmp_path / "server-q4.log", [])
    try:
        answer = request(port, "/v1/chat/completions", {"messages": [{"role": "user", "content": MESSAGE}],
                                                         "temperature": 0, "max_tokens": MAX_TOKENS})
        assert request(port, "/props")["chat_template"] == CHATML_TEMPLATE
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert answer["usage"]["prompt_tokens"] == len(encode_chat(chat_files["tokenizer"],
                                                               [{"role": "user", "content": MESSAGE}], True)[0])
    assert answer["usage"]["completion_tokens"] > 0 and answer["choices"][0]["message"]["role"] == "assistant"

"""llama.cpp runs our GGUF files, gpt2 and llama: same token ids, same logits, same greedy text as our PyTorch model."""

from __future__ import annotations

import os
import stat
import sys

import numpy as np
import pytest
import torch
from gguf import GGUFValueType
from builders import PARITY_TEXTS, corpus, printable, random_gpt, save_tiny_checkpoint, tiny_tokenizer

from tinygpt.common import TinyGPTError
from tinygpt.export.hf import export_hf
from tinygpt.export.gguf_convert import convert_to_gguf
from tinygpt.weights.gguf_read import load_gguf, open_gguf
from tinygpt.export.gguf_raw import encode_value, read_raw_gguf, write_raw_gguf
from tinygpt.export.llama_cpp import _check_fits, main, prompt_tokens, run_llama
from tinygpt.export.quantize import quantize_gguf
from tinygpt.model.sample import generate

PROMPT = "Once upon a time, a little"


# llama with grouped-query attention: the converter permutes Q and K rows with different head counts
ARCHS = {"gpt2": {}, "llama": dict(arch="llama", n_kv_head=2)}


@pytest.fixture(scope="module", params=list(ARCHS))
def gguf_files(tmp_path_factory, request):
    """For each architecture: f16 of a width-64 model with spread-out logits (no greedy near-ties) and q4_k_m of
    a width-256 one."""
    tmp = tmp_path_factory.mktemp(f"llama-{request.param}")
    tokenizer = tiny_tokenizer()
    files = {}
    arch = ARCHS[request.param]
    narrow = random_gpt(tokenizer, n_embd=64, block_size=64, std=0.15, **arch)
    with torch.no_grad():  # shrink tokens that are not whole printable characters: greedy text is then comparable
        for i, piece in enumerate(tokenizer.vocab):
            if not printable(piece):
                narrow.tok_emb.weight[i] *= 0.1
    for kind, model in {"narrow": narrow,
                        "wide": random_gpt(tokenizer, n_embd=256, block_size=64, seed=1, std=0.05, **arch)}.items():
        export_hf(save_tiny_checkpoint(tmp / f"{kind}.pt", model, tokenizer), tmp / kind)
        files[kind] = convert_to_gguf(tmp / kind, tmp / f"{kind}-f16.gguf", "f16")
    files["q4_k_m"] = tmp / "wide-q4_k_m.gguf"
    quantize_gguf(files["wide"], files["q4_k_m"], "q4_k_m", threads=1)
    return tokenizer, files


def llama_logits(path, ids: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, n_threads=1, n_threads_batch=1,
                           verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def our_logits(path, ids: list[int]) -> np.ndarray:
    model, _ = load_gguf(path)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].numpy()


def test_llama_cpp_tokenizes_exactly_like_us(gguf_files):
    llama_cpp = pytest.importorskip("llama_cpp")
    tokenizer, files = gguf_files
    llm = llama_cpp.Llama(str(files["narrow"]), vocab_only=True, verbose=False)
    for text in PARITY_TEXTS + corpus(1):
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)  # add_bos_token=false: no BOS
        assert ids == tokenizer.encode(text), text
        assert llm.detokenize(ids, special=True) == text.encode("utf-8")


def test_llama_cpp_logits_match_ours_on_f16(gguf_files):
    tokenizer, files = gguf_files
    ids = tokenizer.encode(" ".join(corpus(1)))[:64]
    theirs, ours = llama_logits(files["narrow"], ids), our_logits(files["narrow"], ids)
    # same fp16 weights; llama.cpp rounds activations to fp16 inside its matmuls
    tolerance = 5e-3 * np.abs(ours).max()
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=tolerance)
    # the same top token wherever ours leads by more than the two may differ (a random model has near ties)
    top2 = np.sort(ours, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tolerance
    assert clear.mean() > 0.5 and (theirs.argmax(-1) == ours.argmax(-1))[clear].all()


def test_llama_cpp_greedy_continuation_equals_ours(gguf_files):
    pytest.importorskip("llama_cpp")
    tokenizer, files = gguf_files
    model, _ = load_gguf(files["narrow"])
    prompt_ids = tokenizer.encode(PROMPT)
    ours = tokenizer.decode(generate(model, prompt_ids, 24, temperature=0.0, eot_id=tokenizer.eot_id))
    assert len(ours) > 10 and "\ufffd" not in ours  # a real continuation, not an immediate <|endoftext|>
    assert run_llama(files["narrow"], PROMPT, n_predict=24, temperature=0.0, backend="python", threads=1) == ours


def test_cli_prints_prompt_and_continuation(gguf_files, capsys):
    pytest.importorskip("llama_cpp")
    _, files = gguf_files
    expected = run_llama(files["narrow"], PROMPT, n_predict=8, temperature=0.0, backend="python", threads=1)
    main(["--model", str(files["narrow"]), "--prompt", PROMPT, "-n", "8", "--temperature", "0", "--backend", "python",
          "--threads", "1"])
    assert capsys.readouterr().out == PROMPT + expected + "\n"


def test_llama_cpp_runs_our_q4_k_m_file(gguf_files):
    tokenizer, files = gguf_files
    ids = tokenizer.encode(" ".join(corpus(1)))[:64]
    theirs, ours = llama_logits(files["q4_k_m"], ids), our_logits(files["q4_k_m"], ids)
    # same dequantized weights; llama.cpp also rounds activations to 8 bits for K-quant matmuls
    assert np.corrcoef(theirs.ravel(), ours.ravel())[0, 1] > 0.99
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() > 0.9
    text = run_llama(files["q4_k_m"], PROMPT, n_predict=16, temperature=0.8, seed=3, backend="python", threads=1)
    assert isinstance(text, str)


def fake_program(tmp_path, name: str) -> None:
    """A stand-in llama.cpp CLI: advertises the optional flags in --help and echoes its arguments."""
    script = tmp_path / name
    script.write_text('#!/bin/sh\nif [ "$1" = "--help" ]; then echo "-no-cnv --no-display-prompt --no-repack"; '
                      'exit 0; fi\necho "ARGS $*"; echo " [end of text]"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_cli_backend_builds_a_completion_command(gguf_files, tmp_path, monkeypatch):
    _, files = gguf_files
    fake_program(tmp_path, "llama-cli")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    out = run_llama(files["narrow"], PROMPT, n_predict=5, temperature=0.0, seed=7, backend="cli")
    assert out.startswith(f"ARGS -m {files['narrow']} -p {PROMPT} -n 5 --temp 0.0 ")
    assert "-s 7" in out and "-no-cnv" in out and "--no-repack" in out and "--no-display-prompt" in out
    assert not out.endswith("[end of text]")


def test_no_llama_cpp_at_all_says_how_to_install(gguf_files, tmp_path, monkeypatch):
    _, files = gguf_files
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-cli / llama-completion
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now fails
    with pytest.raises(TinyGPTError, match="pip install llama-cpp-python"):
        run_llama(files["narrow"], PROMPT, n_predict=5)
    with pytest.raises(TinyGPTError, match="no llama.cpp program"):
        run_llama(files["narrow"], PROMPT, n_predict=5, backend="cli")


def test_prompt_plus_generation_must_fit_the_context(gguf_files):
    _, files = gguf_files
    with pytest.raises(TinyGPTError, match=r"plus -n 100 exceeds the context .* \(64 tokens\)"):
        run_llama(files["narrow"], PROMPT, n_predict=100)


def with_bos(path, out):
    """A copy of a GGUF file whose tokenizer asks for a BOS before every prompt, as Llama 3's does."""
    raw = read_raw_gguf(path, "")
    metadata = {**raw.metadata, "tokenizer.ggml.add_bos_token": encode_value(True, GGUFValueType.BOOL)}
    write_raw_gguf(out, metadata, [(t.name, t.ne, t.type) for t in raw.tensors], lambda i: raw.tensors[i].data)
    return out


def test_the_prompt_counts_the_bos_llama_cpp_adds(gguf_files, tmp_path):
    """A file with add_bos_token: llama.cpp puts a BOS before the prompt, so a request that would just fit
    without it is one token too long (the off-by-one of counting our encoding alone)."""
    _, files = gguf_files
    bos_file = with_bos(files["narrow"], tmp_path / "bos.gguf")
    n_plain = prompt_tokens(open_gguf(files["narrow"]), PROMPT)
    assert prompt_tokens(open_gguf(bos_file), PROMPT) == n_plain + 1
    assert _check_fits(files["narrow"], PROMPT, 64 - n_plain) == 64  # exactly fills the context
    with pytest.raises(TinyGPTError, match=rf"the prompt \({n_plain + 1} tokens\) plus -n {64 - n_plain} exceeds"):
        _check_fits(bos_file, PROMPT, 64 - n_plain)
    llama_cpp = pytest.importorskip("llama_cpp")
    for path in (files["narrow"], bos_file):  # llama.cpp's own count, as llama-cli tokenizes a prompt
        llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        assert prompt_tokens(open_gguf(path), PROMPT) == len(llm.tokenize(PROMPT.encode(), add_bos=True, special=True))


def test_a_chat_only_llama_cli_is_passed_over(gguf_files, tmp_path, monkeypatch):
    """New llama.cpp builds' llama-cli only chats (no -no-cnv): auto falls back to the Python bindings and
    backend="cli" says no completion program was found, instead of starting a conversation."""
    _, files = gguf_files
    script = tmp_path / "llama-cli"
    script.write_text('#!/bin/sh\nif [ "$1" = "--help" ]; then echo "-st, --single-turn"; exit 0; fi\necho CHAT\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(TinyGPTError, match="no llama.cpp program"):
        run_llama(files["narrow"], PROMPT, n_predict=5, backend="cli")
    with pytest.raises(TinyGPTError, match="pip install llama-cpp-python"):
        run_llama(files["narrow"], PROMPT, n_predict=5)

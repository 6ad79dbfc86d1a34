"""Run a GGUF file with llama.cpp: the proof that our files work outside our own code.

    tinygpt llama --model exports/tinygpt/model-q4_k_m.gguf --prompt "Once upon a time" -n 64

Uses llama.cpp's command-line program when one is on PATH (`llama-completion`, or `llama-cli` in builds
from before the chat-only llama-cli), else the `llama-cpp-python` package. Before llama.cpp sees the file we
read its metadata ourselves, so that a broken file or a prompt too long for the context is a clear error
rather than a llama.cpp assertion.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from tinygpt.common import TinyGPTError, run_cli
from tinygpt.weights.gguf_file import GGUFFile
from tinygpt.weights.gguf_read import gguf_config, gguf_tokenizer, open_gguf

BACKENDS = ("auto", "cli", "python")
CLI_PROGRAMS = ("llama-completion", "llama-cli")  # llama-completion is the plain-completion tool in new builds
INSTALL_HINT = (
    "install llama.cpp (put llama-cli on PATH) or the Python bindings: "
    'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python'
)


def prompt_tokens(reader: GGUFFile, prompt: str) -> int:
    """How many tokens llama.cpp makes of `prompt`: our encoding, plus the BOS (and EOS) that the file's
    tokenizer.ggml.add_bos_token (add_eos_token) asks for, which llama_tokenize adds around a prompt (Llama 3)."""
    added = sum(bool(reader.fields.get(f"tokenizer.ggml.add_{kind}_token", False)) for kind in ("bos", "eos"))
    return len(gguf_tokenizer(reader).encode(prompt)) + added


def _check_fits(model: Path, prompt: str, n_predict: int) -> int:
    """The model's context length, after checking the request fits in it: llama.cpp would assert instead."""
    if not prompt:
        raise TinyGPTError("the prompt is empty; give --prompt some text")
    reader = open_gguf(model, "re-create it with tinygpt gguf_convert")
    context = gguf_config(reader).block_size
    n_prompt = prompt_tokens(reader, prompt)
    if n_prompt + n_predict > context:
        raise TinyGPTError(
            f"the prompt ({n_prompt} tokens) plus -n {n_predict} exceeds the context of {model} ({context} tokens); "
            f"use -n {max(context - n_prompt, 0)} or a shorter prompt"
        )
    return context


def cli_command(program: str, help_text: str, model: Path, prompt: str, n_predict: int, temperature: float,
                top_k: int, top_p: float, seed: int, threads: int | None) -> list[str]:
    """The llama.cpp command line for a plain completion; flags that only some builds know are added when
    the program's --help lists them."""
    cmd = [program, "-m", str(model), "-p", prompt, "-n", str(n_predict), "--temp", str(temperature),
           "--top-k", str(top_k), "--top-p", str(top_p), "--min-p", "0", "--repeat-penalty", "1", "-s", str(seed)]
    if threads:
        cmd += ["-t", str(threads)]
    optional = (
        "-no-cnv",  # plain completion, not a chat session
        "--no-display-prompt",  # print only the continuation
        "--no-repack",  # AMX weight repacking in native builds has crashed on K-quant files (docs/gguf.md#build-flags)
        "--no-warmup",
    )
    return cmd + [flag for flag in optional if flag in help_text]


def _completion_program() -> str | None:
    """The first llama.cpp program on PATH that does a plain completion. New builds' llama-cli is chat-only
    (no -no-cnv in its --help): it would start a conversation, so it is passed over for llama-completion."""
    for program in CLI_PROGRAMS:
        if shutil.which(program) is None:
            continue
        if program == "llama-completion":
            return program
        help_text = subprocess.run([program, "--help"], capture_output=True, text=True).stdout
        if "-no-cnv" in help_text:
            return program
    return None


def _run_cli(program: str, model: Path, prompt: str, n_predict: int, temperature: float, top_k: int, top_p: float,
             seed: int, threads: int | None) -> str:
    help_text = subprocess.run([program, "--help"], capture_output=True, text=True).stdout
    cmd = cli_command(program, help_text, model, prompt, n_predict, temperature, top_k, top_p, seed, threads)
    result = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        last_lines = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise TinyGPTError(f"{program} failed on {model} (exit {result.returncode}): {last_lines}")
    text = result.stdout
    if "--no-display-prompt" not in help_text and text.startswith(prompt):
        text = text[len(prompt):]
    return text.removesuffix("\n").removesuffix(" [end of text]")


_GGML_LOG_LEVEL_ERROR = 4
_log_callback = None  # kept referenced: llama.cpp calls it from C


def _show_only_llama_errors(llama_cpp) -> None:
    """Show only llama.cpp's errors: it warns e.g. that it padded a small context to 256 tokens."""
    global _log_callback
    if _log_callback is None:
        @llama_cpp.llama_log_callback
        def _log_callback(level: int, text: bytes, user_data) -> None:
            if level == _GGML_LOG_LEVEL_ERROR:
                sys.stderr.write(text.decode("utf-8", errors="replace"))

        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


def _run_python(model: Path, context: int, prompt: str, n_predict: int, temperature: float, top_k: int, top_p: float,
                seed: int, threads: int | None) -> str:
    try:
        import llama_cpp
    except ImportError:
        raise TinyGPTError(f"neither llama.cpp's CLI nor the llama_cpp package is available; {INSTALL_HINT}") from None
    _show_only_llama_errors(llama_cpp)
    try:
        llm = llama_cpp.Llama(model_path=str(model), n_ctx=context, seed=seed, n_threads=threads,
                              n_threads_batch=threads, verbose=False)
    except ValueError as e:
        raise TinyGPTError(
            f"llama.cpp could not load {model} ({e}); check that it loads in tinygpt "
            f"(tinygpt sample --gguf {model}) and that this llama.cpp build knows its tensor types"
        ) from None
    # sampling as ours: no repetition penalty, no min-p; temperature 0 is greedy in llama.cpp too
    out = llm.create_completion(prompt, max_tokens=n_predict, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=0.0, repeat_penalty=1.0, seed=seed)
    return out["choices"][0]["text"]


def run_llama(model: str | Path, prompt: str, n_predict: int = 64, temperature: float = 0.8, top_k: int = 50,
              top_p: float = 0.95, seed: int = 1, backend: str = "auto", threads: int | None = None) -> str:
    """llama.cpp's continuation of `prompt` (without the prompt): stops after n_predict tokens or at <|endoftext|>.

    backend: "cli" (llama-completion / llama-cli on PATH), "python" (llama-cpp-python) or "auto" (CLI if found).
    top_k 0 means no top-k cut; top_p 1 means no nucleus cut.
    """
    if backend not in BACKENDS:
        raise TinyGPTError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if n_predict < 1:
        raise TinyGPTError(f"-n {n_predict} must be at least 1")
    model = Path(model)
    context = _check_fits(model, prompt, n_predict)
    program = _completion_program()
    if backend == "cli" and program is None:
        raise TinyGPTError(f"no llama.cpp program for plain completion (llama-completion, or a llama-cli that "
                           f"has -no-cnv) on PATH; {INSTALL_HINT}")
    if program is not None and backend != "python":
        return _run_cli(program, model, prompt, n_predict, temperature, top_k, top_p, seed, threads)
    return _run_python(model, context, prompt, n_predict, temperature, top_k, top_p, seed, threads)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tinygpt llama",
        description="Generate text from a GGUF file with llama.cpp (llama-cli on PATH, else llama-cpp-python).",
    )
    parser.add_argument("--model", required=True, help="GGUF file, e.g. exports/tinygpt/model-q4_k_m.gguf")
    parser.add_argument("--prompt", default="Once upon a time", help="text to continue")
    parser.add_argument("-n", "--n_predict", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    parser.add_argument("--top_k", type=int, default=50, help="keep the k most likely tokens; 0 keeps all (default 50)")
    parser.add_argument("--top_p", type=float, default=0.95,
                        help="nucleus sampling threshold; 1 disables (default 0.95)")
    parser.add_argument("--seed", type=int, default=1, help="sampling seed (default 1)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="auto: the CLI when on PATH (default)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: llama.cpp's choice)")
    args = parser.parse_args(argv)
    text = run_llama(args.model, args.prompt, args.n_predict, args.temperature, args.top_k, args.top_p, args.seed,
                     args.backend, args.threads)
    print(args.prompt + text)


if __name__ == "__main__":
    run_cli(main)

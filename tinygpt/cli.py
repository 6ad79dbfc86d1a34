"""`tinygpt <command> ...` (or `python -m tinygpt <command> ...`): one entry point for every stage.

The command names are the stable interface (the Snakefile and the README use them); the modules behind
them may move.
"""

from __future__ import annotations

import importlib
import sys

from tinygpt.common import run_cli

# command -> (module, one-line description), in pipeline order
COMMANDS = {
    "download": ("tinygpt.data.download", "fetch or generate raw text (builtin stories, TinyStories, URLs, local files)"),
    "clean": ("tinygpt.data.clean", "normalize, split into documents, deduplicate"),
    "train_bpe": ("tinygpt.tokenizer.train_bpe", "learn a byte-level BPE tokenizer (tokenizer.json)"),
    "model_tokenizer": ("tinygpt.weights.model_tokenizer", "take a model's tokenizer (checkpoint, HF folder, GGUF)"),
    "encode": ("tinygpt.tokenizer.encode", "tokenize the corpus into train.bin / val.bin memmaps"),
    "chat_data": ("tinygpt.data.chat", "conversations for chat fine-tuning (builtin or JSON lines/Parquet)"),
    "chat_encode": ("tinygpt.tokenizer.encode_chat", "render conversations (ChatML) into token files and a loss mask"),
    "train": ("tinygpt.model.train", "train the GPT (resumable)"),
    "evaluate": ("tinygpt.model.evaluate", "bits per byte of a checkpoint or GGUF file on any text"),
    "sample": ("tinygpt.model.sample", "generate text from a checkpoint or a GGUF file"),
    "chat": ("tinygpt.model.chat", "talk to a chat model (checkpoint, GGUF or Hugging Face folder)"),
    "chat_eval": ("tinygpt.model.chat_eval", "score a chat model on held-out requests and questions"),
    "export": ("tinygpt.export.hf", "write a Hugging Face folder, GPT-2 or Llama (safetensors)"),
    "gguf_convert": ("tinygpt.export.gguf_convert", "convert the export folder to a GGUF file"),
    "imatrix": ("tinygpt.export.calibrate", "importance matrix of the float model on training text"),
    "quantize": ("tinygpt.export.quantize", "quantize a GGUF file (q4_k_m, q6_k, q8_0, ...)"),
    "llama": ("tinygpt.export.llama_cpp", "run a GGUF file with llama.cpp (llama-cli or llama-cpp-python)"),
    "report": ("tinygpt.report", "write the report pages (loss curve, data, GGUF sizes, timings)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: tinygpt <command> [options]   (tinygpt <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    name = argv[0].replace("-", "_")
    if name not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name][0])
    run_cli(module.main, argv[1:])


if __name__ == "__main__":
    main()

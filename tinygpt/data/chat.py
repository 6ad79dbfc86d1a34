"""`tinygpt chat_data`: the conversations for chat fine-tuning, in one JSON lines file.

Sources:
  builtin  `--count` conversations made by tinygpt.data.stories.chat_tasks for `--seed` (story requests and
           questions about stories); each line also carries "task" and "check" (how to score each assistant turn).
  file     JSON lines or Parquet files (`--path`, repeatable: a file, folder or glob, read as `tinygpt download`
           reads them, compressed or not) with a `messages` field or column: a list of {"role", "content"}, the
           chat format of the Hugging Face hub. Other fields and keys are left out.

Output: one JSON object per line, {"messages": [{"role": ..., "content": ...}, ...]} (plus "task" and "check" for
builtin), written atomically. Every conversation is checked (`check_messages`): roles system, user or assistant,
text content, at least one assistant turn, a system message only first; the first bad one stops the stage with one
error naming its file and line (JSON lines) or row (Parquet). Conversations longer than the context are dropped
later, by `tinygpt chat_encode`, which knows the tokenizer.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from tinygpt.common import TinyGPTError, atomic_open, progress, run_cli
from tinygpt.data.formats import FORMATS, expand_paths, read_records
from tinygpt.data.stories.chat_tasks import conversations
from tinygpt.tokenizer.chat import ROLES

SOURCES = ("builtin", "file")
MESSAGES_FIELD = "messages"


def check_messages(messages: object, where: str) -> list[dict]:
    """One conversation as [{"role", "content"}, ...] (other keys left out), or one TinyGPTError naming `where`
    (e.g. "data/x.jsonl line 17") and what is wrong with it."""
    if not isinstance(messages, list) or not messages:
        what = "empty" if isinstance(messages, list) else "null" if messages is None else type(messages).__name__
        raise TinyGPTError(f"{where}: {MESSAGES_FIELD!r} is {what}, not a list of messages; give each conversation "
                           'as a list of {"role": ..., "content": ...}')
    checked = []
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise TinyGPTError(f"{where}: message {number} is not an object with 'role' and 'content' "
                               f"({json.dumps(message, ensure_ascii=False, default=str)[:80]})")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise TinyGPTError(f"{where}: message {number} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            kind = "null" if content is None else type(content).__name__
            raise TinyGPTError(f"{where}: message {number} ({role}) has content that is {kind}, not text; give "
                               "each message's content as one string")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise TinyGPTError(f"{where}: message {number} ({role}) holds a lone surrogate (a broken \\ud800-style "
                               "escape), which is not text; fix the file") from None
        if role == "system" and number > 1:
            raise TinyGPTError(f"{where}: message {number} is a system message after the first; a conversation may "
                               "only start with one")
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in checked):
        raise TinyGPTError(f"{where}: the conversation has no assistant message, so there is nothing to learn from "
                           "it; drop it or add the reply")
    return checked


def _check_messages_column(schema, path: Path | str, column: str) -> None:
    import pyarrow as pa

    if schema.get_field_index(column) < 0:
        names = ", ".join(map(repr, schema.names[:8])) or "none"
        raise TinyGPTError(f"{path} has no column {column!r} (its columns: {names}); chat data needs a "
                           f"{column!r} column of {{role, content}} lists")
    kind = schema.field(column).type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        raise TinyGPTError(f"{path}: column {column!r} holds {kind}, not lists of messages; give a column of "
                           "{role, content} lists")


def file_conversations(paths: Sequence[str], format: str = "auto") -> Iterator[dict]:
    """The checked conversations of every file that `paths` name, in order."""
    for file in expand_paths(paths):
        for where, messages in read_records(file, MESSAGES_FIELD, _check_messages_column, format=format,
                                            what="conversation",
                                            hint=f"chat data needs a {MESSAGES_FIELD!r} list in every line"):
            yield {"messages": check_messages(messages, where)}


def chat_data(source: str, out: str | Path, count: int = 20000, seed: int = 1337, paths: Sequence[str] = (),
              format: str = "auto") -> Counter:
    """Write the conversations of `source` to `out` (see the module docstring); the count per task."""
    out = Path(out)
    if source == "builtin":
        if count < 1:
            raise TinyGPTError(f"--count {count} must be at least 1")
        if paths:
            raise TinyGPTError("--path does not apply to --source builtin; use --source file to read files")
        stream, total = conversations(seed, count), count
    elif source == "file":
        if not paths:
            raise TinyGPTError("--source file needs at least one --path (JSON lines or Parquet with a "
                               f"{MESSAGES_FIELD!r} column)")
        if out.resolve() in {f.resolve() for f in expand_paths(paths)}:
            raise TinyGPTError(f"--out {out} is also an input --path; write the conversations somewhere else")
        stream, total = file_conversations(paths, format), None
    else:
        raise TinyGPTError(f"--source {source!r} is unknown; use one of {', '.join(SOURCES)}")
    tasks: Counter = Counter()
    with atomic_open(out, "w", encoding="utf-8") as f:
        for conv in progress(stream, total=total, unit=" conversations", desc="chat_data"):
            f.write(json.dumps(conv, ensure_ascii=False) + "\n")
            tasks[conv.get("task", "file")] += 1
        if not tasks:  # inside: no empty output
            raise TinyGPTError(f"{', '.join(paths)} hold no conversation; give files with a {MESSAGES_FIELD!r} field")
    return tasks


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tinygpt chat_data",
        description="Write the conversations for chat fine-tuning (built-in tasks, or JSON lines/Parquet files).")
    parser.add_argument("--source", choices=SOURCES, default="builtin", help="where the conversations come from (builtin)")
    parser.add_argument("--out", required=True, help="the JSON lines file to write")
    parser.add_argument("--count", type=int, default=20000, help="builtin: how many conversations (20000)")
    parser.add_argument("--seed", type=int, default=1337, help="builtin: generator seed (1337)")
    parser.add_argument("--path", action="append", default=[], help="file: a file, folder or glob (repeat)")
    parser.add_argument("--format", choices=[f for f in FORMATS if f != "text"], default="auto",
                        help="file: auto (from the name: .jsonl/.json/.ndjson or .parquet, maybe .gz/.bz2/.xz/.zst), "
                             "jsonl or parquet")
    args = parser.parse_args(argv)
    tasks = chat_data(args.source, args.out, count=args.count, seed=args.seed, paths=args.path, format=args.format)
    summary = ", ".join(f"{task} {n:,}" for task, n in sorted(tasks.items()))
    print(f"wrote {args.out}: {sum(tasks.values()):,} conversations ({summary})")


if __name__ == "__main__":
    run_cli(main)

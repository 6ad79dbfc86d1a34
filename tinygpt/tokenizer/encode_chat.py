"""Stage chat_encode: render conversations (ChatML) into token files plus a loss mask, for chat fine-tuning.

Input: a JSON lines file, one conversation per line, {"messages": [{"role": ..., "content": ...}, ...]} (what
`tinygpt chat_data` writes; other fields are ignored), read line by line. Each conversation is checked
(`tinygpt.data.chat.check_messages`); a line that is not such a conversation stops the stage with one error
naming the file and line. Each is encoded with `tinygpt.tokenizer.chat.encode_chat` (ids and loss mask).

Output folder (docs/formats.md#chat-token-folder), written as one set:
  meta.json                    kind "chat", the chat template, block_size, counts, what was dropped
  train.bin / val.bin          token ids (uint16, uint32 above 65,536 ids), the conversations back to back
  train.mask.bin / val.mask.bin   uint8 per token: 1 = a training target (assistant content and its <|im_end|>)
  train.starts.bin / val.starts.bin   little-endian int64 offset of each conversation's first token
Each token file ends with <|endoftext|> padding (mask 0) so that every start has block_size + 1 tokens after it.

A conversation longer than block_size + 1 tokens (one training window) is dropped, and counted. Validation is
the tail: the last val_fraction of the kept conversations, in order (at least one, and at least one is left to
train on). Kept conversations are streamed to the train files and the tail moved to the val files at the end, so
memory stays flat whatever the number of conversations.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from tinygpt.common import TinyGPTError, atomic_folder, progress, require_file, run_cli, sha256_file
from tinygpt.data.chat import check_messages
from tinygpt.tokenizer.bpe import Tokenizer
from tinygpt.tokenizer.chat import CHATML_TEMPLATE, chat_token_ids, encode_chat
from tinygpt.tokenizer.encode import token_dtype

SPLITS = ("train", "val")
FLUSH_TOKENS = 1 << 20  # tokens gathered before a write


def read_conversations(path: str | os.PathLike, bar=None) -> Iterator[list[dict]]:
    """The conversations of a JSON lines file, in order (blank lines skipped); one TinyGPTError naming the file and
    line for a line that is not a JSON object with a valid "messages" list. `bar` (a progress bar) counts bytes."""
    path = require_file(path, "conversations", "run `tinygpt chat_data` to create them")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path} line {number}"
            if bar is not None:
                bar.update(len(raw))
            try:
                line = raw.decode("utf-8")
                record = json.loads(line) if line.strip() else None
            except UnicodeDecodeError as e:
                raise TinyGPTError(f"{where} is not UTF-8 text (byte {e.start}); write the file as UTF-8") from None
            except json.JSONDecodeError as e:
                raise TinyGPTError(f"{where} is not JSON ({e.msg}, column {e.colno}); give one JSON object per "
                                   "line") from None
            if record is None and not line.strip():
                continue
            if not isinstance(record, dict) or "messages" not in record:
                raise TinyGPTError(f"{where} is not a JSON object with a \"messages\" field; give each conversation "
                                   'as {"messages": [{"role": ..., "content": ...}, ...]}')
            yield check_messages(record["messages"], where)


class _SplitWriter:
    """Appends conversations (ids, mask) to the three files of one split, buffered."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype) -> None:
        self.paths = {kind: folder / f"{split}{suffix}" for kind, suffix in
                      (("tokens", ".bin"), ("mask", ".mask.bin"), ("starts", ".starts.bin"))}
        self.files = {kind: open(path, "wb") for kind, path in self.paths.items()}
        self.dtype = dtype
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.starts: list[int] = []
        self.n_tokens = 0  # written and buffered

    def add(self, ids: list[int], mask: list[int]) -> None:
        self.starts.append(self.n_tokens)
        self.ids += ids
        self.mask += mask
        self.n_tokens += len(ids)
        if len(self.ids) >= FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        self.files["tokens"].write(np.array(self.ids, self.dtype).tobytes())
        self.files["mask"].write(np.array(self.mask, np.uint8).tobytes())
        self.files["starts"].write(np.array(self.starts, "<i8").tobytes())
        self.ids, self.mask, self.starts = [], [], []

    def close(self) -> None:
        self.flush()
        for f in self.files.values():
            f.close()


def _move_tail(train: dict[str, Path], val: dict[str, Path], n_val: int, dtype: np.dtype) -> None:
    """Move the last n_val conversations of the train files to the (empty) val files."""
    starts = np.fromfile(train["starts"], "<i8")
    boundary = int(starts[len(starts) - n_val])
    for kind, offset in (("tokens", boundary * dtype.itemsize), ("mask", boundary),
                         ("starts", (len(starts) - n_val) * 8)):
        with open(train[kind], "r+b") as source, open(val[kind], "wb") as target:
            source.seek(offset)
            if kind == "starts":  # offsets into the val file
                target.write((np.frombuffer(source.read(), "<i8") - boundary).astype("<i8").tobytes())
            else:
                shutil.copyfileobj(source, target, 1 << 20)
            source.truncate(offset)


def _pad(paths: dict[str, Path], block_size: int, pad_id: int, dtype: np.dtype) -> int:
    """Append pad_id tokens (mask 0) so that the last start has block_size + 1 tokens after it; how many."""
    starts = np.fromfile(paths["starts"], "<i8")
    n_tokens = paths["tokens"].stat().st_size // dtype.itemsize
    n_pad = max(0, int(starts[-1]) + block_size + 1 - n_tokens)
    with open(paths["tokens"], "ab") as f:
        f.write(np.full(n_pad, pad_id, dtype).tobytes())
    with open(paths["mask"], "ab") as f:
        f.write(bytes(n_pad))
    return n_pad


def encode_conversations(conversations: str | os.PathLike, tokenizer_path: str | os.PathLike,
                         out_dir: str | os.PathLike, block_size: int = 512, val_fraction: float = 0.05) -> dict:
    """Encode the conversations file into out_dir (see the module docstring); returns meta.json's dict."""
    conversations = require_file(conversations, "conversations", "run `tinygpt chat_data` to create them")
    tokenizer_path = require_file(tokenizer_path, "tokenizer", "run `tinygpt train_bpe` to create it")
    if block_size < 1:
        raise TinyGPTError(f"block_size {block_size} must be >= 1, e.g. 512")
    if not 0 < val_fraction < 1:
        raise TinyGPTError(f"val_fraction {val_fraction} must be in (0, 1), e.g. 0.05 (validation holds at least "
                           "one conversation)")
    tok = Tokenizer.load(tokenizer_path)
    im_start, im_end = chat_token_ids(tok)
    dtype = token_dtype(tok.vocab_size)
    kept = dropped = n_targets = 0
    with atomic_folder(out_dir) as out, \
            progress(total=conversations.stat().st_size, desc="chat_encode", unit="B", unit_scale=True) as bar:
        writers = {split: _SplitWriter(out, split, dtype) for split in SPLITS}
        train = writers["train"]
        for messages in read_conversations(conversations, bar):
            ids, mask = encode_chat(tok, messages)
            if len(ids) > block_size + 1:
                dropped += 1
            else:
                train.add(ids, mask)
                kept += 1
                n_targets += sum(mask)
        for writer in writers.values():
            writer.close()
        if kept < 2:
            raise TinyGPTError(f"{conversations}: {kept} of {kept + dropped} conversations fit in block_size "
                               f"{block_size} + 1 tokens ({dropped} longer ones dropped); training needs at least "
                               "two (one to train on, one to validate); raise --block_size or give shorter "
                               "conversations")
        n_val = min(kept - 1, max(1, round(val_fraction * kept)))
        _move_tail(train.paths, writers["val"].paths, n_val, dtype)
        counts, tokens, targets, padding = {}, {}, {}, {}
        for split, writer in writers.items():
            tokens[split] = writer.paths["tokens"].stat().st_size // dtype.itemsize
            counts[split] = writer.paths["starts"].stat().st_size // 8
            targets[split] = int(np.fromfile(writer.paths["mask"], np.uint8).sum(dtype=np.int64))
            padding[split] = _pad(writer.paths, block_size, tok.eot_id, dtype)
        assert sum(targets.values()) == n_targets
        meta = {
            "kind": "chat",
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "bos_id": tok.bos_id,
            "im_start_id": im_start,
            "im_end_id": im_end,
            "chat_template": CHATML_TEMPLATE,
            "block_size": block_size,
            "conversations": counts,
            "dropped": dropped,
            "tokens": tokens,
            "targets": targets,
            "padding": padding,
            "split": {"rule": "tail", "val_fraction": val_fraction,
                      "description": f"the last {counts['val']} of {kept} kept conversations, in order"},
            "tokenizer_sha256": sha256_file(tokenizer_path),
            "conversations_sha256": sha256_file(conversations),
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="tinygpt chat_encode", description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", required=True, help="JSON lines of {\"messages\": [...]} (chat_data)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json with <|im_start|> and <|im_end|> "
                                                           "(train_bpe reserves them)")
    parser.add_argument("--block_size", type=int, default=512,
                        help="context of the chat model: longer conversations (over block_size + 1 tokens) are "
                             "dropped (default 512)")
    parser.add_argument("--val_fraction", type=float, default=0.05,
                        help="share of the conversations, from the end, for validation (default 0.05)")
    parser.add_argument("--out_dir", required=True, help="folder for the token, mask and start files and meta.json")
    args = parser.parse_args(argv)
    meta = encode_conversations(args.conversations, args.tokenizer, args.out_dir, args.block_size, args.val_fraction)
    counts, tokens = meta["conversations"], meta["tokens"]
    print(f"wrote {args.out_dir}: {counts['train']:,} train and {counts['val']:,} val conversations "
          f"({tokens['train']:,} / {tokens['val']:,} tokens, {meta['targets']['train']:,} / "
          f"{meta['targets']['val']:,} targets); dropped {meta['dropped']:,} longer than block_size "
          f"{meta['block_size']} + 1 tokens", file=sys.stderr)
    return meta


if __name__ == "__main__":
    run_cli(main)

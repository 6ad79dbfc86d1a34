"""Training batches read from the encoded token files (train.bin / val.bin / meta.json) through memmaps.

A batch is `batch_size` windows of `block_size + 1` tokens at random offsets: inputs are the first
`block_size` tokens of a window, targets the last `block_size`. Offsets come from a seeded torch.Generator
whose state goes into the checkpoint, so a resumed run reads exactly the batches it would have read.

A chat token folder (meta.json "kind": "chat", written by chat_encode; docs/formats.md) adds a loss mask and the
conversations' first tokens: its windows start at conversations (the generator draws which one) and are packed:
a window holds that conversation and the whole ones after it that fit, each a segment of its own that attends only
to itself, at positions from 0 (GPT.forward's `segments`), so a row computes what the conversations would alone.
Targets the mask does not count, or in a conversation the window cuts, are -1, which the model's loss ignores.
Both kinds are window sources: `num_windows(block_size)` and `batch(indices, block_size, device)` -> inputs,
targets and segments (None for plain tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import torch

from tinygpt.common import TinyGPTError, require_file

ENCODE_HINT = "run the encode stage (tinygpt encode) first"


def token_dtype(vocab_size: int) -> np.dtype:
    """The token file's element type: uint16 while every id fits, uint32 above (docs/formats.md#token-files)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


CHAT_HINT = "run the chat_encode stage (tinygpt chat_encode) again"
IGNORE = -1  # a target the loss skips (GPT.forward's ignore_index)


def read_meta(data_dir: str | Path) -> dict:
    """meta.json of an encoded data folder, checked for the keys training needs (vocab_size; a chat folder's
    chat_template and block_size)."""
    path = require_file(Path(data_dir) / "meta.json", "token metadata", ENCODE_HINT)
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TinyGPTError(f"{path} is not valid JSON ({e}); rerun the encode stage") from None
    vocab_size = meta.get("vocab_size") if isinstance(meta, dict) else None
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise TinyGPTError(f"{path} has no positive integer 'vocab_size'; rerun the encode stage")
    if meta.get("dtype", token_dtype(vocab_size).name) != token_dtype(vocab_size).name:  # uint32 above 65,536 ids
        raise TinyGPTError(f"{path} says dtype {meta['dtype']!r} but {vocab_size} ids are stored as "
                           f"{token_dtype(vocab_size).name}; rerun the encode stage")
    if is_chat(meta):
        for key, kind in (("chat_template", str), ("block_size", int)):
            if not isinstance(meta.get(key), kind):
                raise TinyGPTError(f"{path} says kind chat but has no {kind.__name__} {key!r}; {CHAT_HINT}")
    elif meta.get("kind", "tokens") != "tokens":
        raise TinyGPTError(f"{path} has kind {meta['kind']!r}; training reads plain token folders (encode) and "
                           "chat folders (kind chat, chat_encode)")
    return meta


def is_chat(meta: dict) -> bool:
    return meta.get("kind") == "chat"


@dataclass(frozen=True)
class TokenFile:
    """A flat file of token ids, opened as a fresh memmap for every read.

    Holding one np.memmap open for a whole run lets the pages it touched pile up in the process's memory;
    a memmap per read is cheap and keeps the footprint flat however large the file is.
    """

    path: Path
    dtype: np.dtype

    @classmethod
    def open(cls, path: str | Path, dtype: np.dtype, min_tokens: int) -> "TokenFile":
        path = require_file(path, "token file", ENCODE_HINT)
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise TinyGPTError(
                f"{path} is {size} bytes, not a whole number of {dtype.name} tokens; it is truncated, rerun the encode stage"
            )
        tokens = cls(path, dtype)
        if len(tokens) < min_tokens:
            raise TinyGPTError(
                f"{path} holds {len(tokens)} tokens, fewer than the {min_tokens} (block_size + 1) one training window "
                "needs; use a larger corpus or validation fraction, or a smaller --block_size"
            )
        return tokens

    def __len__(self) -> int:
        return self.path.stat().st_size // self.dtype.itemsize

    def num_windows(self, block_size: int) -> int:
        return len(self) - block_size  # a window needs block_size + 1 tokens

    def batch(self, offsets: torch.Tensor, block_size: int, device: torch.device) -> Batch:
        """Inputs and targets of the windows at `offsets` (window indices are token offsets here)."""
        return Batch(*split_batch(self.windows(offsets, block_size + 1), device))

    def windows(self, offsets: torch.Tensor, length: int) -> torch.Tensor:
        """The `length` tokens from each offset, as an int64 tensor (len(offsets), length)."""
        tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        rows = np.stack([tokens[o : o + length] for o in offsets.tolist()])
        return torch.from_numpy(rows.astype(np.int64))

    def token_counts(self, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
        """How often each id occurs in the file (streamed in chunks); TinyGPTError on an id >= vocab_size."""
        tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        counts = np.zeros(vocab_size, dtype=np.int64)
        for start in range(0, len(tokens), chunk):
            chunk_counts = np.bincount(tokens[start : start + chunk], minlength=vocab_size)
            if len(chunk_counts) > vocab_size:
                raise TinyGPTError(
                    f"{self.path} holds token id {len(chunk_counts) - 1}, beyond vocab_size={vocab_size}; "
                    "it was encoded with another tokenizer, rerun the encode stage"
                )
            counts += chunk_counts
        return counts

    def bytes_per_token(self, vocab: list[bytes], special_ids: Iterable[int]) -> float:
        """Mean bytes of text per token: what turns nats per token into bits per byte, which compares across
        vocabularies. Special tokens (the <|endoftext|> between documents) stand for no text: they count
        0 bytes, so the cost of predicting them is charged to the text's bytes."""
        return mean_bytes(self.token_counts(len(vocab)), vocab, special_ids)


def mean_bytes(counts: np.ndarray, vocab: list[bytes], special_ids: Iterable[int]) -> float:
    """Mean bytes of text per token, for tokens occurring `counts` times (per id); special tokens count 0 bytes."""
    lengths = np.array([len(token) for token in vocab], dtype=np.int64)
    lengths[list(special_ids)] = 0
    return float(counts @ lengths / counts.sum())


PACK_LOOKAHEAD = 16  # conversations after a window's first that may fill its room (first fit, in file order)


@dataclass(frozen=True)
class ChatTokens:
    """One split of a chat token folder: the tokens, their loss mask (uint8, 1 = a target the loss counts), the
    offsets where conversations start (int64, increasing) and their lengths, and the id the files are padded
    with. A window index picks a conversation."""

    tokens: TokenFile
    mask_path: Path
    starts: np.ndarray
    lengths: np.ndarray
    pad_id: int

    @classmethod
    def open(cls, data_dir: Path, split: str, dtype: np.dtype, block_size: int, padded_for: int) -> "ChatTokens":
        """Open `split` (train or val) for windows of block_size + 1 tokens; chat_encode padded each file so
        that every start has `padded_for` + 1 tokens after it."""
        if block_size > padded_for:
            raise TinyGPTError(f"--block_size {block_size} is longer than the windows {data_dir / 'meta.json'} was "
                               f"encoded for (block_size {padded_for}); rerun chat_encode with --block_size "
                               f"{block_size}, or train with --block_size at most {padded_for}")
        tokens = TokenFile.open(data_dir / f"{split}.bin", dtype, block_size + 1)
        mask_path = require_file(data_dir / f"{split}.mask.bin", "loss mask", CHAT_HINT)
        if mask_path.stat().st_size != len(tokens):
            raise TinyGPTError(f"{mask_path} has {mask_path.stat().st_size} entries for {len(tokens)} tokens in "
                               f"{tokens.path}; the folder is not one set, {CHAT_HINT}")
        starts_path = require_file(data_dir / f"{split}.starts.bin", "conversation starts", CHAT_HINT)
        starts = np.fromfile(starts_path, dtype="<i8") if starts_path.stat().st_size % 8 == 0 else None
        if starts is None or len(starts) == 0 or starts[0] < 0 or np.any(np.diff(starts) <= 0) \
                or starts[-1] + padded_for + 1 > len(tokens):
            raise TinyGPTError(f"{starts_path} is not a list of increasing int64 conversation starts, each with "
                               f"{padded_for} + 1 tokens after it in {tokens.path}; {CHAT_HINT}")
        # the end padding is <|endoftext|>, which no conversation holds: the last one ends after its last other token
        pad_id = read_meta(data_dir)["eot_id"]
        tail = np.memmap(tokens.path, dtype=dtype, mode="r")[starts[-1]:]
        last = len(tail) - int(np.argmax(tail[::-1] != pad_id)) if np.any(tail != pad_id) else len(tail)
        return cls(tokens, mask_path, starts, np.diff(np.append(starts, starts[-1] + last)), pad_id)

    def __len__(self) -> int:
        return len(self.tokens)

    def num_windows(self, block_size: int) -> int:
        return len(self.starts)

    def batch(self, indices: torch.Tensor, block_size: int, device: torch.device) -> Batch:
        """Packed windows from conversations `indices` (see `windows`)."""
        windows, counted, segments = self.windows(indices, block_size)
        targets = torch.where(counted, windows, IGNORE)
        return Batch(to_device(windows[:, :-1], device), to_device(targets[:, 1:], device),
                     to_device(segments[:, :-1], device))

    def windows(self, indices: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Windows of block_size + 1 tokens (int64), packed: conversation i (cut at the window's end if longer),
        then, first fit, the following conversations that fit whole into the room left; the rest is padding.
        Also which tokens are counted targets (bool: in the mask, never a conversation's first token), and each
        token's segment (int64: 0 for conversation i, 1 for the next one packed, ...; the padding one more)."""
        length = block_size + 1
        tokens = np.memmap(self.tokens.path, dtype=self.tokens.dtype, mode="r")
        mask = np.memmap(self.mask_path, dtype=np.uint8, mode="r")
        rows = np.full((len(indices), length), self.pad_id, dtype=np.int64)
        counted = np.zeros((len(indices), length), dtype=bool)
        segments = np.empty((len(indices), length), dtype=np.int64)
        for row, first in enumerate(indices.tolist()):
            filled = 0
            for segment, c in enumerate(self.packed(first, length)):
                start, n = self.starts[c], min(int(self.lengths[c]), length - filled)
                rows[row, filled : filled + n] = tokens[start : start + n]
                counted[row, filled + 1 : filled + n] = mask[start + 1 : start + n] == 1
                segments[row, filled : filled + n] = segment
                filled += n
            segments[row, filled:] = segment + 1
        return torch.from_numpy(rows), torch.from_numpy(counted), torch.from_numpy(segments)

    def packed(self, first: int, length: int) -> list[int]:
        """The conversations a window of `length` tokens from conversation `first` holds, in order."""
        chosen, room = [first], length - int(self.lengths[first])
        for c in range(first + 1, min(first + 1 + PACK_LOOKAHEAD, len(self.starts))):
            if self.lengths[c] <= room:
                chosen.append(c)
                room -= int(self.lengths[c])
        return chosen


class Batch(NamedTuple):
    """Model inputs (B, T), next-token targets (B, T; IGNORE where not counted) and, for packed chat windows,
    each input's segment (B, T), else None."""

    x: torch.Tensor
    y: torch.Tensor
    segments: torch.Tensor | None = None


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device` (pinned and asynchronous on CUDA)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def split_batch(windows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of a batch of windows, on `device`."""
    windows = to_device(windows, device)
    return windows[:, :-1], windows[:, 1:]


class RandomBatches:
    """Random training windows, split over the ranks of a data-parallel run.

    Every rank draws the offsets of the whole global batch (batch_size * world_size) from the same seeded
    generator and keeps its own slice, so N ranks with batch B read exactly what one process with batch
    N * B reads, and the generator state is the same on every rank (one copy in the checkpoint suffices).
    """

    def __init__(
        self, tokens: TokenFile | ChatTokens, batch_size: int, block_size: int, seed: int, rank: int = 0,
        world_size: int = 1
    ) -> None:
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.rank, self.world_size = rank, world_size
        self.num_offsets = tokens.num_windows(block_size)
        self.generator = torch.Generator().manual_seed(seed)

    def next(self, device: torch.device) -> Batch:
        offsets = torch.randint(self.num_offsets, (self.batch_size * self.world_size,), generator=self.generator)
        mine = offsets[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.tokens.batch(mine, self.block_size, device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def fixed_batches(tokens: TokenFile | ChatTokens, num_batches: int, batch_size: int, block_size: int) -> list[torch.Tensor]:
    """Window indices of `num_batches` evaluation batches spread evenly over the file (a chat file: over its
    conversations): the same set at every evaluation."""
    count = num_batches * batch_size
    offsets = torch.linspace(0, tokens.num_windows(block_size) - 1, count).round().long()
    return list(offsets.split(batch_size))

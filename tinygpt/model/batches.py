"""Training batches read from the encoded token files (train.bin / val.bin / meta.json) through memmaps.

A batch is `batch_size` windows of `block_size + 1` tokens at random offsets: inputs are the first
`block_size` tokens of a window, targets the last `block_size`. Offsets come from a seeded torch.Generator
whose state goes into the checkpoint, so a resumed run reads exactly the batches it would have read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from tinygpt.common import TinyGPTError, require_file

ENCODE_HINT = "run the encode stage (tinygpt encode) first"


def token_dtype(vocab_size: int) -> np.dtype:
    """The token file's element type: uint16 while every id fits, uint32 above (docs/formats.md#token-files)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def read_meta(data_dir: str | Path) -> dict:
    """meta.json of an encoded data folder, checked for the one key training needs (vocab_size)."""
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
    return meta


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
        lengths = np.array([len(token) for token in vocab], dtype=np.int64)
        lengths[list(special_ids)] = 0
        counts = self.token_counts(len(vocab))
        return float(counts @ lengths / counts.sum())


def split_batch(windows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of a batch of windows, on `device` (pinned and asynchronous on CUDA)."""
    if device.type == "cuda":
        windows = windows.pin_memory().to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


class RandomBatches:
    """Random training windows, split over the ranks of a data-parallel run.

    Every rank draws the offsets of the whole global batch (batch_size * world_size) from the same seeded
    generator and keeps its own slice, so N ranks with batch B read exactly what one process with batch
    N * B reads, and the generator state is the same on every rank (one copy in the checkpoint suffices).
    """

    def __init__(
        self, tokens: TokenFile, batch_size: int, block_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.rank, self.world_size = rank, world_size
        self.num_offsets = len(tokens) - block_size  # a window needs block_size + 1 tokens
        self.generator = torch.Generator().manual_seed(seed)

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = torch.randint(self.num_offsets, (self.batch_size * self.world_size,), generator=self.generator)
        mine = offsets[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return split_batch(self.tokens.windows(mine, self.block_size + 1), device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def fixed_batches(tokens: TokenFile, num_batches: int, batch_size: int, block_size: int) -> list[torch.Tensor]:
    """Offsets of `num_batches` evaluation batches spread evenly over the file: the same set at every evaluation."""
    count = num_batches * batch_size
    offsets = torch.linspace(0, len(tokens) - block_size - 1, count).round().long()
    return list(offsets.split(batch_size))

"""Importance matrices in llama.cpp's file formats: read them as llama-quantize does, write them as llama-imatrix does.

An importance matrix holds, for each weight matrix W of a model, the sum over calibration tokens of the square of
each input channel's activation (the x in W @ x), and how many tokens were summed. llama-quantize divides one by
the other and weighs each weight's quantization error by the mean square of the input it multiplies: errors on
channels that are driven hard cost more. docs/gguf.md#importance-matrix says more.

The GGUF format (llama.cpp's tools/imatrix, `general.type = imatrix`) stores the raw sums and counts per matrix:
`<name>.in_sum2` (F32, one row of ne0 values per expert; a dense matrix has one) and `<name>.counts` (F32, one per
expert), plus `imatrix.datasets`, `imatrix.chunk_count` and `imatrix.chunk_size`. The legacy `.dat` format stores
mean squares scaled by the number of chunks (`ncall`).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from tinygpt.common import TinyGPTError, atomic_path, require_file
from tinygpt.weights.gguf_file import GGUFFile

IN_SUM2, COUNTS = ".in_sum2", ".counts"
HINT = "make it with tinygpt imatrix (or llama-imatrix)"


@dataclass
class ImatrixData:
    """What an importance-matrix file holds: per tensor, the raw sums (n_mat, ne0) and counts (n_mat,)."""
    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False  # read from a .dat file: sums are mean squares times ncall, counts hold ncall


# ------------------------------------------------------------------------------------------------ reading

def read_imatrix(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Per GGUF tensor name, the importance of each input column (float32, n_mat * ne0 values), exactly as
    llama-quantize derives it from the file (tools/quantize/quantize.cpp, load_imatrix).

    GGUF files: in_sum2 / count in float32, per expert; an expert with count 0 gets all ones.
    Legacy .dat files: the stored values / ncall (kept as they are when ncall is 0)."""
    return imatrix_values(load_imatrix(path))


def imatrix_values(data: ImatrixData) -> dict[str, np.ndarray]:
    """read_imatrix's per-column importance from a loaded file (load_imatrix)."""
    result: dict[str, np.ndarray] = {}
    for name, sums in data.sums.items():
        counts = data.counts[name]
        if data.legacy:
            ncall = int(counts[0]) if len(counts) else 0
            result[name] = sums.reshape(-1) / np.float32(ncall) if ncall > 0 else sums.reshape(-1).copy()
            continue
        rows = sums.reshape(len(counts), -1)
        counts32 = counts.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            values = rows / counts32[:, None]
        values[counts32 <= 0] = np.float32(1.0)
        result[name] = values.reshape(-1).astype(np.float32)
    return result


def _is_legacy(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(4) != b"GGUF"


def load_imatrix(path: str | os.PathLike) -> ImatrixData:
    """The raw contents of a GGUF or legacy importance-matrix file (llama.cpp's common_imatrix_load)."""
    path = require_file(path, "importance-matrix file", HINT)
    if _is_legacy(path):
        return _load_legacy(path)
    try:
        reader = GGUFFile(path)  # the package's header reader: gguf.GGUFReader makes a numpy view of every field
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError, struct.error) as e:
        raise TinyGPTError(f"{path} is not a readable GGUF importance matrix ({type(e).__name__}: {e}); {HINT}") from None

    def value(key: str):
        f = reader.get_field(key)
        return None if f is None else f.contents()

    missing = [k for k in (gguf.Keys.IMatrix.DATASETS, gguf.Keys.IMatrix.CHUNK_COUNT, gguf.Keys.IMatrix.CHUNK_SIZE)
               if reader.get_field(k) is None]
    if missing:  # llama-quantize refuses such a file ("missing imatrix metadata")
        raise TinyGPTError(f"{path} lacks the key {missing[0]}: it is not an importance matrix; {HINT}")
    pairs: dict[str, dict[str, object]] = {}
    for t in reader.tensors:
        for suffix in (IN_SUM2, COUNTS):
            if t.name.endswith(suffix):
                pairs.setdefault(t.name[: -len(suffix)], {})[suffix] = t
    if not pairs:
        raise TinyGPTError(f"{path} holds no importance data (no *.in_sum2 tensors); {HINT}")
    sums, counts = {}, {}
    for name, pair in sorted(pairs.items()):
        if len(pair) != 2:
            raise TinyGPTError(f"{path}: {name} has {'in_sum2' if IN_SUM2 in pair else 'counts'} but not the other; "
                               f"the file is damaged, {HINT}")
        s, c = pair[IN_SUM2], pair[COUNTS]
        if s.tensor_type != gguf.GGMLQuantizationType.F32 or c.tensor_type != gguf.GGMLQuantizationType.F32:
            raise TinyGPTError(f"{path}: the sums and counts of {name} must be F32; {HINT}")
        n_counts = int(np.prod(c.shape))
        n_values = int(np.prod(s.shape))
        if n_counts < 1 or n_values % n_counts:
            raise TinyGPTError(f"{path}: {name} has {n_values} sums for {n_counts} counts; the file is damaged")
        sums[name] = np.array(s.data, dtype=np.float32).reshape(n_counts, -1)
        # llama.cpp rounds the stored float counts to integers (std::lround: half away from zero)
        c_values = np.array(c.data, dtype=np.float64).reshape(-1)
        counts[name] = (np.sign(c_values) * np.floor(np.abs(c_values) + 0.5)).astype(np.int64)
    return ImatrixData(sums, counts, [str(d) for d in (value(gguf.Keys.IMatrix.DATASETS) or [])],
                       int(value(gguf.Keys.IMatrix.CHUNK_COUNT)), int(value(gguf.Keys.IMatrix.CHUNK_SIZE)))


def _load_legacy(path: Path) -> ImatrixData:
    """llama.cpp's older binary format: int32 entry count; per entry int32 name length, name, int32 ncall,
    int32 value count, float32 values (mean squares times ncall); optionally int32 chunk count and the dataset."""
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise TinyGPTError(f"{path} is neither a GGUF file nor a complete legacy importance matrix "
                               f"(it ends at byte {len(raw)}); {HINT}")
        values = struct.unpack_from(fmt, raw, pos)
        pos += size
        return values

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise TinyGPTError(f"{path} is neither a GGUF file nor a legacy importance matrix (entry count "
                           f"{n_entries}); {HINT}")
    sums, counts = {}, {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length <= 4096:
            raise TinyGPTError(f"{path} is not a legacy importance matrix (a name of {length} bytes); {HINT}")
        name = take(f"<{length}s")[0].decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise TinyGPTError(f"{path}: entry {name} has {nval} values; the file is damaged")
        sums[name] = np.array(take(f"<{nval}f"), dtype=np.float32).reshape(1, -1)
        counts[name] = np.array([ncall], dtype=np.int64)
    datasets, chunk_count = [], 0
    if pos + 4 <= len(raw):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(raw):
            (length,) = take("<i")
            if length > 0 and pos + length <= len(raw):
                datasets.append(take(f"<{length}s")[0].decode("utf-8", "replace"))
    return ImatrixData(sums, counts, datasets, chunk_count, 0, legacy=True)


# ------------------------------------------------------------------------------------------------ writing

def write_imatrix(path: str | os.PathLike, data: ImatrixData) -> None:
    """Write `data` in llama-imatrix's GGUF layout: general.type, the three imatrix.* keys, then per tensor
    (sorted by name) `<name>.in_sum2` and `<name>.counts`, F32; dense matrices as 1-D tensors, as ggml stores a
    matrix with one row."""
    if not data.datasets:  # gguf-py writes no empty arrays, and llama-quantize refuses a file without the key
        raise TinyGPTError(f"{path}: an importance matrix names the calibration text it was computed on; none given")
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="")
        # llama-imatrix writes no general.architecture: an importance matrix belongs to no architecture
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
        writer.add_type(gguf.GGUFType.IMATRIX)
        writer.add_array(gguf.Keys.IMatrix.DATASETS, list(data.datasets))
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, data.chunk_count)
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, data.chunk_size)
        for name in sorted(data.sums):
            sums = np.asarray(data.sums[name], dtype=np.float32)
            counts = np.asarray(data.counts[name], dtype=np.float32).reshape(-1)
            n_mat = len(counts)
            sums = sums.reshape(n_mat, -1)
            writer.add_tensor(name + IN_SUM2, sums.reshape(-1) if n_mat == 1 else sums)
            writer.add_tensor(name + COUNTS, counts if n_mat == 1 else counts.reshape(n_mat, 1))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

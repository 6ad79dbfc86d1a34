"""GGUF files as the quantizer needs them: metadata kept as raw bytes, tensors as memory-mapped bytes, and a
writer that streams tensors out one at a time, or puts each at its offset, in llama.cpp's layout.

gguf-py's reader decodes every metadata value into numpy views (a vocabulary of 50k tokens is 50k small
arrays), which costs as much as quantizing a small model to Q8_0; the quantize stage only copies those values.
So the header is read by tinygpt.weights.gguf_file (plain `struct`, which also keeps each value's encoded
bytes) and the tensors are memory-mapped.
The layout (docs/gguf.md#file-layout) is: magic, version 3, tensor and key counts, the keys, the tensor infos
(name, dimensions in ggml order, type, offset into the data), padding to the alignment, then each tensor's data
padded to the alignment.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from tinygpt.common import TinyGPTError, require_file
from tinygpt.weights.gguf_file import GGUFFile

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_FORMAT = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
           GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
           GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}


@dataclass(frozen=True)
class RawTensor:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    type: GGMLQuantizationType
    data: np.ndarray  # the stored bytes (uint8, memory-mapped)

    @property
    def shape(self) -> tuple[int, ...]:
        """The numpy shape (reverse of ggml's)."""
        return tuple(reversed(self.ne))


@dataclass
class RawGGUF:
    metadata: dict[str, bytes]  # key -> encoded value (type tag included), in file order
    tensors: list[RawTensor]

    def value(self, key: str):
        """The decoded value of a scalar or string key (None when absent)."""
        raw = self.metadata.get(key)
        if raw is None:
            return None
        vtype = GGUFValueType(struct.unpack_from("<I", raw)[0])
        if vtype == GGUFValueType.STRING:
            return raw[12:].decode("utf-8", "replace")
        if vtype in _FORMAT:
            return struct.unpack_from(_FORMAT[vtype], raw, 4)[0]
        raise TinyGPTError(f"metadata key {key} is an array, not a single value")


def encode_value(value, vtype: GGUFValueType) -> bytes:
    """A scalar or string value as GGUF encodes it, type tag first."""
    if vtype == GGUFValueType.STRING:
        data = value if isinstance(value, bytes) else str(value).encode()
        return struct.pack("<IQ", vtype, len(data)) + data
    return struct.pack("<I", vtype) + struct.pack(_FORMAT[vtype], value)


def read_raw_gguf(path: str | os.PathLike, hint: str) -> RawGGUF:
    """The metadata (raw) and tensors (memory-mapped) of a GGUF file; a broken file is one TinyGPTError.
    The header is parsed by tinygpt.weights.gguf_file, the package's one GGUF header reader."""
    path = require_file(path, "GGUF file", "create it with tinygpt gguf_convert")
    try:
        header = GGUFFile(path)
        # a plain ndarray view of the map: arrays derived from an np.memmap stay memmaps, and each numpy operation
        # on one then runs memmap's Python __array_finalize__ (thousands of calls in a quantization)
        data = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
        tensors = []
        for t in header.tensors:
            ne = tuple(int(n) for n in t.shape)
            if not 1 <= len(ne) <= 4:  # GGML_MAX_DIMS
                raise ValueError(f"tensor {t.name} has {len(ne)} dimensions")
            end = t.offset + tensor_nbytes(ne, t.tensor_type)
            tensors.append(RawTensor(t.name, ne, t.tensor_type, data[t.offset:end]))
        return RawGGUF(dict(header.raw_fields), tensors)
    except (ValueError, IndexError, KeyError, UnicodeDecodeError, struct.error) as e:
        raise TinyGPTError(
            f"{path} is not a readable GGUF file: truncated or of another format ({type(e).__name__}: {e}); {hint}"
        ) from None


def tensor_nbytes(ne: Iterable[int], qtype: GGMLQuantizationType) -> int:
    ne = tuple(ne)
    block, size = GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(ne[1:], dtype=np.int64)) if len(ne) > 1 else 1
    return rows * (ne[0] // block) * size


@dataclass(frozen=True)
class Layout:
    """Where everything of a GGUF file goes: the header (padded to the alignment), then each tensor at its offset."""
    header: bytes
    offsets: list[int]  # tensor i's data starts here, counted from the start of the file
    sizes: list[int]  # tensor i's bytes, without its padding
    end: int  # the file's size: the last tensor padded to the alignment


def gguf_layout(metadata: dict[str, bytes], tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType]]) -> Layout:
    """The layout of a GGUF file with `metadata` (encoded values, in order) and `tensors` (name, ne, type)."""
    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = RawGGUF(metadata, []).value("general.alignment")
    pad = lambda n: -(-n // alignment) * alignment  # noqa: E731
    head = [MAGIC, struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, value in metadata.items():
        name = key.encode()
        head += [struct.pack("<Q", len(name)), name, value]
    offset = 0
    offsets, sizes = [], []
    for name, ne, qtype in tensors:
        encoded = name.encode()
        head += [struct.pack("<Q", len(encoded)), encoded, struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, qtype, offset)]
        offsets.append(offset)
        sizes.append(tensor_nbytes(ne, qtype))
        offset += pad(sizes[-1])
    header = b"".join(head)
    header += bytes(pad(len(header)) - len(header))
    return Layout(header, [len(header) + o for o in offsets], sizes, len(header) + offset)


def tensor_view(layout: Layout, i: int, name: str, data: np.ndarray | bytes) -> memoryview:
    """Tensor i's bytes as one flat view, checked against the size its type and shape need."""
    view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8)) if isinstance(data, np.ndarray) \
        else memoryview(data)
    if view.nbytes != layout.sizes[i]:
        raise ValueError(f"tensor {name}: {view.nbytes} bytes for the {layout.sizes[i]} its type and shape need")
    return view


def write_tensor_at(fd: int, layout: Layout, i: int, name: str, data: np.ndarray | bytes) -> None:
    """Write tensor i's bytes at its offset in a file already `layout.end` bytes long (its padding stays zero).
    Positioned writes: processes sharing the file descriptor write their tensors in any order."""
    view = tensor_view(layout, i, name, data)
    offset = layout.offsets[i]
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def write_raw_gguf(path: Path, metadata: dict[str, bytes], tensors: list[tuple[str, tuple[int, ...],
                   GGMLQuantizationType]], tensor_bytes: Callable[[int], np.ndarray | bytes]) -> None:
    """Write a GGUF file: `metadata` (encoded values, in order), then the tensor infos of `tensors` (name, ne,
    type), then tensor i's bytes as `tensor_bytes(i)` returns them, called in order, one at a time."""
    layout = gguf_layout(metadata, tensors)
    with open(path, "wb") as f:
        f.write(layout.header)
        for i, (name, _, _) in enumerate(tensors):
            f.write(tensor_view(layout, i, name, tensor_bytes(i)))
            end = layout.offsets[i + 1] if i + 1 < len(tensors) else layout.end
            f.write(bytes(end - layout.offsets[i] - layout.sizes[i]))

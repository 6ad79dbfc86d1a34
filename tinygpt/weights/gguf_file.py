"""A fast reader of a GGUF file's metadata and tensor table; each tensor read on demand into fresh memory.

gguf-py's GGUFReader builds numpy views for every item of every array: on a file with a 150k-token vocabulary
(Qwen2.5, Llama 3) opening it takes minutes. Reading the same layout (docs/gguf.md#the-container) with
`struct` takes a fraction of a second. The objects answer the part of GGUFReader's interface that the model
reader uses (`get_field(key).contents()`, `tensors` with name, shape, tensor_type, data), so either works.

Tensor data is read with plain file reads, not through a memory map: a mapped file's pages count in the
process's resident memory on top of the copies the model keeps, which doubled the peak of reading a model.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# GGUF value types: struct format of the scalars; 8 is a string, 9 an array
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
         7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9


@dataclass
class Value:
    value: Any

    def contents(self) -> Any:
        return self.value


@dataclass
class Tensor:
    name: str
    shape: np.ndarray  # GGML order: the row length first
    tensor_type: GGMLQuantizationType
    path: str
    offset: int

    @property
    def data(self) -> np.ndarray:
        """The stored values (F32, F16) or bytes (uint8, every other type), read now into a writable array."""
        block, size = GGML_QUANT_SIZES[self.tensor_type]
        n_values = int(np.prod(self.shape))
        dtype = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}.get(self.tensor_type)
        data = np.empty(n_values if dtype else n_values // block * size, dtype or np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            if f.readinto(memoryview(data).cast("B")) != data.nbytes:
                raise ValueError(f"tensor {self.name} runs past the end of {self.path}")
        return data


class GGUFFile:
    """Metadata (key -> Python value, arrays as lists; `raw_fields`: key -> the value's encoded bytes) and tensors
    of a GGUF file; ValueError if malformed."""

    def __init__(self, path: str | Path) -> None:
        self.filename = str(path)
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._read_header()
        finally:
            self._map.close()  # the header is parsed into Python values: nothing refers to the map

    def _read_header(self) -> None:
        self._pos, size = 0, len(self._map)
        magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", self._map, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"not a GGUF v2/v3 file (magic {magic!r}, version {version})")
        self._pos = 24
        self.fields: dict[str, Any] = {}
        self.raw_fields: dict[str, bytes] = {}  # each value as encoded, type tag first: a writer copies it as is
        for _ in range(n_kv):
            key = self._string()
            start = self._pos
            self.fields[key] = self._value(self._unpack("I"))
            self.raw_fields[key] = self._map[start:self._pos]
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._unpack("Q") for _ in range(self._unpack("I"))]
            infos.append((name, dims, GGMLQuantizationType(self._unpack("I")), self._unpack("Q")))
        alignment = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // alignment) * alignment
        self.tensors = [Tensor(name, np.array(dims), qtype, self.filename, start + offset)
                        for name, dims, qtype, offset in infos]
        for t in self.tensors:
            block, bytes_per_block = GGML_QUANT_SIZES[t.tensor_type]
            if t.offset + int(np.prod(t.shape)) // block * bytes_per_block > size:
                raise ValueError(f"tensor {t.name} runs past the end of the file")

    def get_field(self, key: str) -> Value | None:
        return Value(self.fields[key]) if key in self.fields else None

    def _unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("Q")
        self._pos += n
        return self._map[self._pos - n : self._pos].decode("utf-8")

    def _value(self, kind: int) -> Any:
        if kind == STRING:
            return self._string()
        if kind in SCALARS:
            return self._unpack(SCALARS[kind])
        if kind != ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        item, n = self._unpack("I"), self._unpack("Q")
        if item in NUMPY:  # numbers in one read
            values = np.frombuffer(self._map, NUMPY[item], n, self._pos)
            self._pos += values.nbytes
            return values.tolist()
        return [self._value(item) for _ in range(n)]

"""A fast reader of a GGUF file's metadata and tensor table, the tensors memory-mapped.

gguf-py's GGUFReader builds numpy views for every item of every array: on a file with a 150k-token vocabulary
(Qwen2.5, Llama 3) opening it takes minutes. Reading the same layout (GGUF_SPEC.md, the container) with
`struct` takes a fraction of a second. The objects answer the part of GGUFReader's interface that the model
reader uses (`get_field(key).contents()`, `tensors` with name, shape, tensor_type, data), so either works.
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
    data: np.ndarray  # the stored bytes as uint8, or the values for F32 and F16


class GGUFFile:
    """Metadata (key -> Python value, arrays as lists) and tensors of a GGUF file; ValueError if malformed."""

    def __init__(self, path: str | Path) -> None:
        self.filename = str(path)
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf, self._pos = self._map, 0
        magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"not a GGUF v2/v3 file (magic {magic!r}, version {version})")
        self._pos = 24
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._unpack("I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._unpack("Q") for _ in range(self._unpack("I"))]
            infos.append((name, dims, GGMLQuantizationType(self._unpack("I")), self._unpack("Q")))
        alignment = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // alignment) * alignment
        self.tensors = [self._tensor(name, dims, qtype, start + offset) for name, dims, qtype, offset in infos]

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

    def _tensor(self, name: str, dims: list[int], qtype: GGMLQuantizationType, offset: int) -> Tensor:
        block, size = GGML_QUANT_SIZES[qtype]
        n_values = int(np.prod(dims))
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = np.frombuffer(self._map, np.float32 if qtype == GGMLQuantizationType.F32 else np.float16,
                                 n_values, offset)
        else:
            data = np.frombuffer(self._map, np.uint8, n_values // block * size, offset)
        return Tensor(name, np.array(dims), qtype, data)

"""Read a safetensors file tensor by tensor with plain file reads into fresh memory.

safetensors' own `safe_open` memory-maps the file: every page a tensor was read from stays in the process's
resident memory while the file is open, on top of the tensors the model keeps, which doubled the peak of
reading a model (bench/bench_import.py). The format is simple (an 8-byte header length, a JSON header of
name -> dtype, shape, data_offsets, then the data), so reading it ourselves keeps the peak at the model.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class SafetensorsFile:
    """The header of a safetensors file; ValueError if it is malformed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(n))
            size = f.seek(0, 2)
        if not isinstance(self.header, dict):
            raise ValueError("the header is not a JSON object")
        self.header.pop("__metadata__", None)
        self.start = 8 + n
        for name, info in self.header.items():
            if info.get("dtype") not in DTYPES:
                raise ValueError(f"tensor {name} has dtype {info.get('dtype')}; tinygpt reads {', '.join(DTYPES)}")
            begin, end = info["data_offsets"]
            numel = 1
            for d in info["shape"]:
                numel *= d
            if end - begin != numel * DTYPES[info["dtype"]].itemsize or self.start + end > size:
                raise ValueError(f"tensor {name}'s data_offsets do not fit its shape or the file")

    def keys(self) -> list[str]:
        return list(self.header)

    def get_tensor(self, name: str) -> torch.Tensor:
        info = self.header[name]
        tensor = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
        with open(self.path, "rb") as f:
            f.seek(self.start + info["data_offsets"][0])
            buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            if f.readinto(buffer) != buffer.nbytes:
                raise ValueError(f"tensor {name} runs past the end of the file")
        return tensor

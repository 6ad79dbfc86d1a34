"""Where training runs: the device, the mixed-precision dtype it is fast at, and the data-parallel ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tinygpt.common import TinyGPTError


AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AMX or AVX512-BF16); elsewhere bf16 is emulated, slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return bool({"amx_bf16", "avx512_bf16"} & set(flags)) or "AMX" in torch.backends.cpu.get_cpu_capability()


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--amp` on `device`; None means full fp32.

    auto: bf16 where the hardware is fast at it (CUDA compute capability 8+, CPUs with AMX / AVX512-BF16: on
    the 2-core AVX512-BF16 machine this was written on, a toy-model training step runs 2-3x faster in bf16),
    fp16 with a gradient scaler on older GPUs, fp32 elsewhere (MPS included).
    """
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise TinyGPTError("--amp fp16 needs a CUDA device; on a CPU use --amp bf16 or --amp off")
        return torch.float16
    if device.type == "cuda":
        fast_bf16 = torch.cuda.is_bf16_supported() and torch.cuda.get_device_capability(device)[0] >= 8
        return torch.bfloat16 if fast_bf16 else torch.float16
    if device.type == "mps":
        return None  # MPS autocast is young and partial across macOS versions: fp32 unless asked for bf16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in a (possibly one-process) data-parallel run started by torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "Ranks":
        return cls(*(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1))))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def gather(self, obj: object) -> list:
        """`obj` from every rank, in rank order (a collective: every rank must call it)."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` takes CUDA, then Apple silicon's MPS, then the CPU; `cuda:N` names one GPU. Asking for a device
    this machine lacks is an error, not a silent fallback."""
    kind, _, index = requested.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise TinyGPTError(f"--device {requested!r}: choose auto, cpu, cuda, cuda:N or mps")
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if kind == "cuda" and not cuda:
        raise TinyGPTError(f"--device {requested}: PyTorch sees no CUDA GPU here; use --device cpu or auto")
    if kind == "mps" and not mps:
        raise TinyGPTError(f"--device {requested}: MPS (Apple silicon) is not available here; use --device cpu or auto")
    if kind == "cuda" or (kind == "auto" and cuda):
        device = torch.device("cuda", int(index) if index else local_rank)
        torch.cuda.set_device(device)
        return device
    if kind == "mps" or (kind == "auto" and mps):
        return torch.device("mps")
    return torch.device("cpu")

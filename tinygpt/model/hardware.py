"""Where training runs: the device, the mixed-precision dtype it is fast at, and the data-parallel ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tinygpt.common import TinyGPTError, usable_cpus
from tinygpt.model.flops import matmul_peak


AMP_CHOICES = ("auto", "bf16", "fp16", "off")


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_bf16_is_faster(n: int = 1024) -> bool:
    """Whether bf16 matmuls clearly beat fp32 ones on this CPU, measured. CPUs with AMX or AVX512-BF16 usually
    run them about 2x faster, but a flag is no proof: a 2-core AVX512-BF16 virtual machine ran bf16 at half
    its fp32 speed, and training there in bf16 would have wasted half of every minute."""
    cpu = torch.device("cpu")
    return matmul_peak(torch.bfloat16, cpu, n) > 1.2 * matmul_peak(torch.float32, cpu, n)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--amp` on `device`; None means full fp32.

    auto: bf16 where the hardware is fast at it (CUDA compute capability 8+; a CPU whose bf16 matmuls measure
    faster than fp32 ones), fp16 with a gradient scaler on older GPUs, fp32 elsewhere (MPS included). The
    measurement can differ between two starts, so training records what `auto` chose in the run folder and a
    resumed run keeps it.
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
    return torch.bfloat16 if cpu_bf16_is_faster() else None


def amp_unsupported(dtype: torch.dtype | None, device: torch.device) -> str | None:
    """Why `device` cannot compute in autocast `dtype`, or None where it can. A run folder records its dtype,
    and a run resumed on another machine must compute as it began or not at all."""
    if dtype is torch.float16 and device.type != "cuda":
        return "fp16 (with a gradient scaler) needs a CUDA device"
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    if dtype is torch.bfloat16 and device.type == "mps":
        try:
            torch.ones(1, dtype=torch.bfloat16, device=device)
        except (RuntimeError, TypeError):
            return "MPS has no bf16 before macOS 14"
    return None


def threads_per_process(requested: int | None, local_processes: int) -> int:
    """Threads for each of `local_processes` processes on this machine (torchrun's LOCAL_WORLD_SIZE): the usable
    CPUs shared among them, `requested` (0 or None: the whole share) never more than the share. torchrun's
    OMP_NUM_THREADS=1 would leave all but N CPUs idle; one process's full count each would oversubscribe N-fold."""
    share = max(1, usable_cpus() // max(1, local_processes))
    return max(1, min(requested or share, share))


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in a (possibly one-process) data-parallel run started by torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # processes on this machine

    @classmethod
    def from_env(cls) -> "Ranks":
        return cls(*(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1),
                                                            ("LOCAL_WORLD_SIZE", 1))))

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

    def broadcast(self, obj: object) -> object:
        """Rank 0's `obj` on every rank (a collective: every rank must call it)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

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

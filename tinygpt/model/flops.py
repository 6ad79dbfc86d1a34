"""The hardware's own matmul peak, measured: the yardstick for model FLOPs utilization (MFU)."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int | None = None, repeats: int = 3) -> float:
    """Best FLOP/s of an n x n matmul in `dtype` over a few repeats.

    Constant inputs: timing must not draw from the random generators, or a resumed training run would not
    replay the same random numbers as an uninterrupted one (and a constant keeps clear of denormals).
    """
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)
    b = torch.full((n, n), 0.25, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, caches
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class MatmulPeak:
    """The yardstick of MFU (model FLOPs utilization): the FLOP/s this device's matmuls reach in the training
    dtype, times the processes. Measured at the start as the best of a few repeats; a measurement taken while
    something else loaded the device reads low, so the first time the model seems to beat it, it is measured
    again (once: a measurement costs seconds), and it is never below the rate the model itself reached: MFU is at
    most 100% by construction."""

    def __init__(self, dtype: torch.dtype, device: torch.device, processes: int = 1) -> None:
        self.dtype, self.device, self.processes = dtype, device, processes
        self.flops, self.remeasured = self.measure(), False

    def measure(self) -> float:
        return matmul_peak(self.dtype, self.device) * self.processes

    def mfu(self, flops_per_s: float) -> float:
        if flops_per_s > self.flops and not self.remeasured:
            self.flops, self.remeasured = max(self.flops, self.measure()), True
        self.flops = max(self.flops, flops_per_s)
        return flops_per_s / self.flops

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

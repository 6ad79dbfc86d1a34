"""The measured matmul peak that MFU is reported against."""

import time

import torch

from tinygpt.model.flops import matmul_peak


def test_peak_is_a_plausible_rate_and_draws_no_random_numbers():
    state = torch.get_rng_state()
    started = time.perf_counter()
    peak = matmul_peak(torch.float32, torch.device("cpu"), n=256, repeats=2)
    elapsed = time.perf_counter() - started
    assert torch.equal(state, torch.get_rng_state()), "a resumed run must replay the same random numbers"
    # at least the FLOPs of one 256^3 matmul per second of the whole call, and below 100 TFLOP/s for a CPU
    assert 2 * 256**3 / elapsed < peak < 1e14

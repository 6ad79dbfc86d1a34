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


def test_mfu_is_measured_again_once_and_never_exceeds_one(monkeypatch):
    """A first peak measured under load (1 kFLOP/s): the first rate above it triggers one more measurement; a
    rate above that too becomes the peak (MFU 1), without measuring again."""
    from tinygpt.model import flops

    readings = iter([1e3, 1e6])
    monkeypatch.setattr(flops, "matmul_peak", lambda dtype, device: next(readings))
    peak = flops.MatmulPeak(torch.float32, torch.device("cpu"), processes=2)
    assert peak.flops == 2e3 and peak.mfu(1e3) == 0.5
    assert peak.mfu(1e5) == 1e5 / 2e6  # measured again: 1e6 per process
    assert peak.mfu(4e6) == 1.0 and peak.flops == 4e6  # no third reading (next() would raise)
    assert peak.mfu(2e6) == 0.5

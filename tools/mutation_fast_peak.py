"""pytest plugin for tools/mutation.py's model group: MFU's yardstick and the bf16 speed probe as a constant.

Every training run measures a 2048x2048 matmul peak (and `--amp auto` a bf16 one too): about 10 s of a 2-core
CPU per run, and most of the time of test_train.py. Under mutation testing every mutant reruns those runs, so
the group loads this plugin (`-p mutation_fast_peak`): the peak is a constant, so `--amp auto` picks fp32, as
on a machine whose bf16 is not faster. Tests that fake the peak or the probe themselves still do (their
monkeypatch comes after this fixture's)."""

from __future__ import annotations

import pytest

PEAK = 1e12  # FLOP/s; any positive number: only MFU's value depends on it


@pytest.fixture(autouse=True)
def constant_matmul_peak(monkeypatch):
    from tinygpt.model import flops, hardware

    monkeypatch.setattr(flops, "matmul_peak", lambda *args, **kwargs: PEAK)
    monkeypatch.setattr(hardware, "matmul_peak", lambda *args, **kwargs: PEAK)

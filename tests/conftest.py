"""Shared test settings: quiet progress bars, and one torch thread per test process (pytest-xdist runs several)."""

import os

os.environ.setdefault("TINYGPT_NO_PROGRESS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

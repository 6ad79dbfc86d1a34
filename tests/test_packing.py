"""Packed rows (GPT.forward's `segments`): several sequences in one row give exactly what each gives alone, for
every architecture and both attention paths, and the layout (positions, mask) is the expected one."""

from __future__ import annotations

import pytest
import torch

from tinygpt.common import TinyGPTError
from tinygpt.model.gpt import GPT, GPTConfig, segment_layout


def tiny(arch: str, attention: str) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(arch=arch, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2 if arch != "gpt2" else 4,
                       n_embd=32, block_size=40, attention=attention)
    return GPT(config).eval()


def test_segment_layout_restarts_positions_and_blocks_other_segments():
    positions, mask = segment_layout(torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]]))
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert mask.shape == (2, 1, 6, 6)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0],
                                         [1, 1, 0, 0, 0, 0],
                                         [1, 1, 1, 0, 0, 0],
                                         [0, 0, 0, 1, 0, 0],
                                         [0, 0, 0, 1, 1, 0],
                                         [0, 0, 0, 0, 0, 1]]
    assert torch.equal(mask[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_a_packed_row_computes_each_sequence_as_if_alone(arch, attention):
    model = tiny(arch, attention)
    g = torch.Generator().manual_seed(1)
    lengths = [[13, 9, 18], [40], [1, 25, 14]]
    rows, segments, alone = [], [], []
    for row in lengths:
        parts = [torch.randint(0, 97, (n,), generator=g) for n in row]
        rows.append(torch.cat(parts))
        segments.append(torch.cat([torch.full((n,), k) for k, n in enumerate(row)]))
        with torch.no_grad():
            alone.append(torch.cat([model(p[None])[0][0] for p in parts]))
    x, seg = torch.stack(rows), torch.stack(segments)
    with torch.no_grad():
        packed = model(x, segments=seg)[0]
        unpacked = model(x)[0]
    assert torch.allclose(packed, torch.stack(alone), atol=1e-5)
    assert not torch.allclose(unpacked, packed, atol=1e-3)  # without segments the later sequences see the earlier

    targets = torch.randint(0, 97, x.shape, generator=g)
    targets[0, 5] = -1
    summed = model(x, targets, reduction="sum", segments=seg)[1]
    expected = torch.nn.functional.cross_entropy(torch.stack(alone).flatten(0, 1), targets.flatten(),
                                                 ignore_index=-1, reduction="sum")
    assert summed.item() == pytest.approx(expected.item(), rel=1e-5)


def test_packed_rows_are_not_for_the_decoding_cache():
    model = tiny("llama", "sdpa")
    with pytest.raises(TinyGPTError, match="packed segments"):
        model(torch.zeros(1, 4, dtype=torch.long), segments=torch.zeros(1, 4, dtype=torch.long),
              kv_cache=model.new_kv_cache())

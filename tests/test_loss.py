"""The chunked LM-head cross-entropy equals torch's plain `F.cross_entropy(x @ W.T, ...)`: its value and its
gradients for x and the weight, mean and sum, ignored targets, any chunk size; and training saves no
vocabulary-sized tensor for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinygpt.model.gpt import GPT, GPTConfig
from tinygpt.model.loss import linear_cross_entropy


def plain_and_chunked(reduction: str, chunk_values: int, autocast: bool = False):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 13, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (3, 13), generator=gen)
    targets[:, ::4] = -1
    results = []
    for chunked in (False, True):
        x.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if chunked:
                loss = linear_cross_entropy(x, weight, targets, reduction=reduction, chunk_values=chunk_values)
            else:
                loss = F.cross_entropy(F.linear(x, weight).view(-1, 50).float(), targets.view(-1), ignore_index=-1,
                                       reduction=reduction)
        (2.5 * loss).backward()  # an incoming gradient other than 1 (loss scaling, micro-batch averaging)
        results.append((loss.detach(), x.grad, weight.grad))
    return results


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_values", [1, 50 * 7, 10**9])  # one row, 7 rows (uneven), all at once
def test_chunked_loss_and_gradients_equal_plain_cross_entropy(reduction, chunk_values):
    (loss, gx, gw), (ours, ox, ow) = plain_and_chunked(reduction, chunk_values)
    torch.testing.assert_close(ours, loss)
    torch.testing.assert_close(ox, gx)
    torch.testing.assert_close(ow, gw)


def test_chunked_loss_under_bf16_autocast_equals_the_plain_form_under_it():
    (loss, gx, gw), (ours, ox, ow) = plain_and_chunked("mean", 50 * 7, autocast=True)
    torch.testing.assert_close(ours, loss, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ox, gx, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ow, gw, atol=2e-2, rtol=2e-2)


def test_without_gradients_only_the_loss_is_computed():
    x, weight = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8)
    targets = torch.tensor([1, -1, 3, 10, 0])
    with torch.no_grad():
        loss = linear_cross_entropy(x, weight, targets, chunk_values=22)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(x @ weight.T, targets, ignore_index=-1))
    none_counted = torch.full((5,), -1)
    assert linear_cross_entropy(x, weight, none_counted, reduction="sum").item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, weight, targets, reduction="none")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_saves_no_vocabulary_sized_tensor(arch):
    """Autograd keeps nothing of (tokens, vocabulary) size for backward: no logits, no log-softmax."""
    torch.manual_seed(0)
    vocab, tokens = 4096, 2 * 32
    model = GPT(GPTConfig(vocab_size=vocab, arch=arch, n_layer=1, n_head=2, n_embd=32, block_size=32))
    idx = torch.randint(0, vocab, (2, 32))
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, idx)
    assert sizes and max(sizes) < tokens * vocab / 4
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, _ = model(idx)
        plain = F.cross_entropy(logits.view(-1, vocab), idx.view(-1))
    assert max(sizes) >= tokens * vocab  # the plain form does (the check can fail)
    torch.testing.assert_close(loss, plain)

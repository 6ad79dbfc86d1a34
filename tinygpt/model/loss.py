"""The LM head and its cross-entropy in row chunks: the (tokens, vocabulary) logits never exist whole.

A plain `F.cross_entropy(lm_head(x), targets)` keeps the logits, the log-softmax (saved for backward) and, in
backward, two more tensors of that size: at 512 tokens and Qwen2.5's 151,936-token vocabulary that is 4 x 311 MB
in float32. Here each chunk of rows gets its logits, its loss and at once its gradient (the loss is the end of
the graph, so d loss / d logits = softmax - one-hot is known in the forward); the chunk's logits are then
dropped. Backward only scales the gradients already summed (by the loss's incoming gradient: loss scaling,
micro-batch averaging). Same FLOPs as the plain form: one matmul for the logits, one for the gradient of x, one
for the weight's when it trains; nothing is recomputed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# logits per chunk: at most 2**26 values, 256 MB in float32 (441 rows of Qwen2.5's vocabulary); a quarter of that
# (110 rows) made the head's matmuls ~40% slower than the plain form on 2 cores, this is about as fast
CHUNK_VALUES = 2**26
REDUCTIONS = ("mean", "sum")


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -1,
                         reduction: str = "mean", chunk_values: int = CHUNK_VALUES) -> torch.Tensor:
    """`F.cross_entropy(x @ weight.T, targets, ignore_index=..., reduction=...)` for x (..., C), weight (V, C)
    and targets (...), in chunks of about `chunk_values` logits. Under autocast the logits are computed in its
    dtype and the softmax in float32, as autocast computes the plain form."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} must be one of {', '.join(REDUCTIONS)}")
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    # rows per chunk: at most chunk_values logits, the rows shared out evenly (512 rows: 2 x 256, not 441 + 71)
    most = max(1, chunk_values // weight.size(0))
    chunks = max(1, -(-x.size(0) // most))
    rows, summed = -(-x.size(0) // chunks), reduction == "sum"
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, ignore_index, summed, rows)
    return chunked_loss_and_grads(x, weight, targets, ignore_index, summed, rows, False, False)[0]


def chunked_loss_and_grads(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                           summed: bool, rows: int, want_x: bool, want_weight: bool):
    """The loss, and the gradients of x and weight asked for (else None), `rows` rows at a time."""
    counted = targets != ignore_index
    safe_targets = targets.masked_fill(~counted, 0)  # ignored rows: any valid index, weighed by 0 below
    # mean: over the counted targets (none counted: 0/0 = nan, as F.cross_entropy gives)
    scale = x.new_ones((), dtype=torch.float32) if summed else 1.0 / counted.sum().float()
    total = x.new_zeros((), dtype=torch.float32)
    grad_x = torch.empty_like(x) if want_x else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
    for start in range(0, x.size(0), rows):
        part = slice(start, start + rows)
        xs, ts, weights = x[part], safe_targets[part], counted[part].float()
        logits = F.linear(xs, weight).float()  # computed in autocast's dtype under autocast
        picked = logits.gather(1, ts[:, None]).squeeze(1)
        peak = logits.amax(dim=-1, keepdim=True)
        exps = logits.sub_(peak).exp_()  # in place: one (rows, vocabulary) tensor a chunk, no logsumexp temporaries
        sums = exps.sum(dim=-1)
        total += ((sums.log() + peak.squeeze(1) - picked) * weights).sum()
        if not (want_x or want_weight):
            continue
        grad = exps.div_(sums[:, None])  # the softmax
        grad[torch.arange(grad.size(0), device=grad.device), ts] -= 1.0
        grad.mul_((weights * scale)[:, None])
        if want_x:  # the matmuls in autocast's dtype under autocast, as the plain form's backward
            grad_x[part] = (grad @ weight).to(x.dtype)
        if want_weight:
            grad_weight += (grad.T @ xs).float()
    return total * scale, grad_x, None if grad_weight is None else grad_weight.to(weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, summed, rows):
        loss, *ctx.grads = chunked_loss_and_grads(x, weight, targets, ignore_index, summed, rows,
                                                  *ctx.needs_input_grad[:2])
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
        return *scaled, None, None, None, None

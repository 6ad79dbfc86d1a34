"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math

import torch

from tinygpt.model.gpt import GPT


def cosine_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to `lr`, then cosine decay to `min_lr`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress_ = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress_)) * (lr - min_lr)


def configure_optimizer(model: GPT, *, lr: float, betas: tuple[float, float], weight_decay: float,
                        device: torch.device) -> torch.optim.AdamW:
    """AdamW that decays weight matrices only: not biases, LayerNorm parameters or the (tied) embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():  # a tied tensor is yielded once
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for the whole update on CPU and CUDA (also bit-reproducible, which resuming needs)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type in ("cpu", "cuda"))

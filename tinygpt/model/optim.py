"""The optimizers and their learning-rate schedule.

`adamw`: AdamW for everything, weight decay on the weight matrices only.
`muon`: Muon (momentum, then Newton-Schulz orthogonalization of each update) for the hidden weight matrices of
the blocks, AdamW for what Muon is not made for: the embedding, an untied LM head, norms and biases. Muon's
update is rescaled to AdamW's RMS (Moonshot's `match_rms_adamw`), so it shares AdamW's learning rate and
weight decay unless `muon_lr` says otherwise. Both follow one schedule: warmup, then cosine decay.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

OPTIMIZERS = ("adamw", "muon")


def cosine_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to `lr`, then cosine decay to `min_lr`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress_ = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress_)) * (lr - min_lr)


def split_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameters by role: "hidden" weight matrices of the blocks, embedding "tables", an untied "head",
    and "vectors" (norms, biases). A tied head is the embedding table, counted once."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    roles: dict[str, list[nn.Parameter]] = {"hidden": [], "tables": [], "head": [], "vectors": []}
    for param in model.parameters():
        if not param.requires_grad:  # frozen (LoRA's base weights): nothing to optimize
            continue
        if param.dim() < 2:
            roles["vectors"].append(param)
        elif id(param) in tables:
            roles["tables"].append(param)
        else:
            roles["head" if param is head else "hidden"].append(param)
    return roles


def configure_optimizers(model: nn.Module, *, optimizer: str = "adamw", lr: float, betas: tuple[float, float],
                         weight_decay: float, device: torch.device, muon_lr: float | None = None,
                         muon_momentum: float = 0.95) -> list[torch.optim.Optimizer]:
    """The optimizers of `model`; every param group carries its peak learning rate as "peak_lr"."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    roles = split_parameters(model)
    # weight decay on weight matrices (an untied head is one), not on embeddings, norms and biases
    decay = roles["head"] + (roles["hidden"] if optimizer == "adamw" else [])
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": roles["tables"] + roles["vectors"], "weight_decay": 0.0}]
    groups = [{**g, "peak_lr": lr} for g in groups if g["params"]]
    # fused: one kernel for the whole update on CPU and CUDA (also bit-reproducible, which resuming needs);
    # MPS and others take the portable implementation
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type in ("cpu", "cuda"))
    ]
    if optimizer == "muon":
        peak = lr if muon_lr is None else muon_lr
        optimizers.append(torch.optim.Muon([{"params": roles["hidden"], "peak_lr": peak}], lr=peak,
                                           weight_decay=weight_decay, momentum=muon_momentum,
                                           adjust_lr_fn="match_rms_adamw"))
    return optimizers


def set_learning_rates(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    """Each group at `factor` times its peak learning rate (the schedule's value for this step)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * factor

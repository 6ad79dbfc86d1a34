"""LoRA (Hu et al., 2021): low-rank adapters on chosen linear layers, trained while every base weight stays frozen.

A wrapped layer computes `base(x) + alpha/rank * B(A(dropout(x)))` with A (rank, in) and B (out, rank); B starts
at zero, so training starts from exactly the base model. The base weight and bias keep their names
(`blocks.0.attn.q.weight`), the adapters add `lora_a` and `lora_b` beside them, so `adapter_state` is the small
part a checkpoint must hold, and `merge_lora` folds `alpha/rank * B @ A` into the weight and puts plain
`nn.Linear` layers back: every file written after that is a plain model that transformers and llama.cpp run.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.common import TinyGPTError

# target name -> where that layer sits in a block, per architecture (gpt2's q, k and v are one fused layer)
TARGET_LAYERS = {
    "llama": {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.proj",
              "gate": "mlp.gate", "up": "mlp.up", "down": "mlp.proj"},
    "gpt2": {"q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv", "o": "attn.proj", "up": "mlp.fc", "down": "mlp.proj"},
}  # fmt: skip
TARGET_LAYERS["qwen2"] = TARGET_LAYERS["llama"]  # llama's layers, its q, k, v with biases
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class Widener:
    """Frozen narrow weights widened for a product, into one buffer per shape that every layer of the shape
    reuses: the widened copy lives only for one product (it is not saved for the backward), and a fresh
    float32 copy per layer and pass would be gigabytes a step for the allocator (and, with memory handed back
    to the kernel as `train.hand_back_freed_memory` asks, page-zeroing) on a 0.5B model."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def __call__(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (weight.shape, dtype, weight.device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        return self.buffers[key].copy_(weight)


class _WidenedLinear(torch.autograd.Function):
    """x @ W.T + b with a frozen W (and b) stored narrower than x: widened to x's dtype for the product in the
    forward and again in the backward, one layer at a time, so the model holds the narrow copy only (half the
    memory of float32) and computes in float32 (a CPU without fast bf16 matmuls runs them at a fraction of
    float32's speed). A bf16 weight widens exactly, so the result is x's product with the very weight stored."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, widen: Widener) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.widen = widen
        return F.linear(x, widen(weight, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ ctx.widen(weight, grad.dtype), None, None, None  # the frozen weight and bias get no gradient


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update. The base weight may be held in a narrower dtype
    (bf16) than the adapters: it is only read, so it needs no fp32 master copy. Outside autocast the product
    is still computed in the input's dtype (`_WidenedLinear`); under autocast, autocast chooses."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 widen: Widener | None = None) -> None:
        super().__init__()
        self.widen = widen or Widener()  # apply_lora gives every layer of a model the same one
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear (and peft) initialise A
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            # on rows: F.linear of a 3-d input returns a view, which the in-place update below may not modify
            # when a custom Function made it
            rows = _WidenedLinear.apply(x.reshape(-1, self.in_features), w, self.bias, self.widen)
            base = rows.view(*x.shape[:-1], self.out_features)
        else:
            base = F.linear(x, w, self.bias)
        down = F.linear(self.dropout(x), self.lora_a)
        # the update added into the base output in place (the frozen linear's backward does not read its
        # output): one output-sized tensor per layer instead of four (base, B(A(x)), scaled, sum)
        flat = base.view(-1, self.out_features)
        flat.addmm_(down.reshape(-1, down.size(-1)).to(base.dtype), self.lora_b.T.to(base.dtype), alpha=self.scale)
        return base

    def merged(self) -> nn.Linear:
        """A plain nn.Linear (float32) computing what this layer computes (without dropout)."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device)
        with torch.no_grad():
            delta = self.scale * (self.lora_b.float() @ self.lora_a.float())
            layer.weight.copy_(self.weight.float() + delta)
            if self.bias is not None:
                layer.bias.copy_(self.bias.float())
        return layer


def held_exactly(weight: torch.Tensor) -> torch.Tensor:
    """`weight` as bf16 if bf16 holds it exactly (a source stored in bf16, as most released models are), else
    unchanged: a frozen weight then costs half the memory, and training and the merged export see the same
    values as before."""
    narrow = weight.bfloat16()
    return narrow if torch.equal(narrow.to(weight.dtype), weight) else weight


def apply_lora(model: nn.Module, *, rank: int, alpha: float, targets: list[str] | tuple[str, ...],
               dropout: float = 0.0, base_dtype: torch.dtype | None = None) -> list[str]:
    """Freeze every parameter of `model` (a GPT) and wrap the `targets` layers of each block with adapters;
    return the wrapped layers' names. Targets an architecture lacks (gpt2 has no gate) are skipped.
    The wrapped layers' weights become `base_dtype`, or with None, bf16 wherever that is exact."""
    if rank < 1:
        raise TinyGPTError(f"train.lora.rank={rank} must be at least 1")
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise TinyGPTError(f"train.lora.targets {list(targets)}: choose from {', '.join(TARGETS)}")
    layers = TARGET_LAYERS[model.config.arch]
    paths = sorted({layers[t] for t in targets if t in layers})
    if not paths:
        raise TinyGPTError(f"train.lora.targets {list(targets)} name no layer of a {model.config.arch} model; "
                           f"it has {', '.join(sorted(layers))}")
    model.requires_grad_(False)
    wrapped, widen = [], Widener()
    for i, block in enumerate(model.blocks):
        for path in paths:
            parent_name, name = path.split(".")
            parent = getattr(block, parent_name)
            base = getattr(parent, name)
            weight = base.weight.data
            base.weight.data = held_exactly(weight) if base_dtype is None else weight.to(base_dtype)
            setattr(parent, name, LoRALinear(base, rank, alpha, dropout, widen))
            wrapped.append(f"blocks.{i}.{path}")
    return wrapped


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors only: what training changes."""
    return {name: t for name, t in model.state_dict().items() if name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}


def load_adapters(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put saved adapters back; every adapter of the model must be in `state` and nothing else."""
    expected = adapter_state(model)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"adapters differ: missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict(state, strict=False)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight (in place, float32); the model is then a plain GPT."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model

"""The GPT-2 transformer: exactly what Hugging Face `GPT2LMHeadModel` and llama.cpp's `gpt2` architecture compute.

Token + learned position embeddings, pre-LayerNorm blocks of causal multi-head attention and a 4x MLP with
tanh-approximated GELU, a final LayerNorm and an LM head tied to the token embedding. A `KVCache` makes
decoding incremental: `forward` then processes only the new tokens, at positions that continue from the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.common import TinyGPTError
from tinygpt.model.presets import PRESETS

ATTENTION_KINDS = ("sdpa", "explicit")


@dataclass
class GPTConfig:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 128
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    attention: str = "sdpa"  # "sdpa" (F.scaled_dot_product_attention) or "explicit" (masked softmax)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TinyGPTError(f"model config {name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise TinyGPTError(
                f"model config n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "pick n_embd a multiple of n_head"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise TinyGPTError(f"model config dropout={self.dropout} must be in [0, 1)")
        if self.attention not in ATTENTION_KINDS:
            raise TinyGPTError(f"model config attention={self.attention!r} must be one of {', '.join(ATTENTION_KINDS)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def config_from_preset(preset: str, vocab_size: int, **overrides) -> GPTConfig:
    """A preset's config with `overrides` applied; overrides that are None are ignored (unset CLI flags)."""
    if preset not in PRESETS:
        raise TinyGPTError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(GPTConfig)} - {"vocab_size"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TinyGPTError(
            f"unknown model config field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
        )
    settings = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return GPTConfig(vocab_size=vocab_size, **settings)


class KVCache:
    """Keys and values of the positions seen so far, preallocated per layer as (B, n_head, block_size, head_dim).

    Each layer writes its new keys/values at `length`; `GPT.forward` advances `length` once all layers ran.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (batch_size, config.n_head, config.block_size, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.block_size = config.block_size
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values after the cached ones; return all of them (views, no copies)."""
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reset(self) -> None:
        self.length = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.layer_idx = layer_idx
        self.attention = config.attention
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)  # rows: Q, K, V (GPT-2's c_attn, transposed)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        # mask[i, j]: may position i attend to position j; a buffer so it follows .to(device), never saved
        mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        start = 0
        if kv_cache is not None:
            start = kv_cache.length
            k, v = kv_cache.append(self.layer_idx, k, v)
        # new queries sit at positions start..start+T-1 and see every key up to their own position
        mask = self.causal_mask[start : start + T, : start + T]

        if self.attention == "sdpa":
            dropout_p = self.dropout if self.training else 0.0
            if start == 0:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            elif T == 1:  # one new query sees every key: no mask keeps the fastest kernels available
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            scores = scores.masked_fill(~mask, float("-inf"))
            y = self.attn_dropout(F.softmax(scores, dim=-1)) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's "gelu_new" is the tanh approximation; llama.cpp's ggml_gelu computes the same
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied, as in GPT-2: one (V, C) matrix
        self.apply(self._init_weights)
        # GPT-2 scales the projections that add into the residual stream, which grows by two per layer
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        # nn.LayerNorm already starts at weight 1, bias 0

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for the token ids `idx` (B, T), and the mean cross-entropy when `targets` is given.

        With `kv_cache`, `idx` holds only the new tokens: they take positions from `kv_cache.length` on and
        are appended to the cache. `last_only` returns logits (B, 1, V) for the last position only, which
        spares the vocabulary-sized head on a prompt when decoding.
        """
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise TinyGPTError(
                f"sequence of {start + T} tokens exceeds the model's block_size={self.config.block_size}; "
                "crop the context to the last block_size tokens"
            )
        positions = torch.arange(start, start + T, device=idx.device)
        x = self.dropout(self.tok_emb(idx) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.ln_f(x)

        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            return logits, loss
        return self.lm_head(x[:, -1:] if last_only else x), None

    def new_kv_cache(self, batch_size: int = 1) -> KVCache:
        """An empty cache on the model's device, in its parameter dtype."""
        weight = self.tok_emb.weight
        return KVCache(self.config, batch_size, weight.device, weight.dtype)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, the tied token embedding / LM head counted once.

        `non_embedding=True` leaves out the token and position embeddings (Kaplan et al.'s N).
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if non_embedding:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        return n

    def estimate_flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward) at full context, for MFU (PaLM paper, appendix B).

        6 * N for the matmuls, where N counts every weight but the position embedding (a lookup; the tied
        token embedding is counted because it is the LM head's matmul), plus 12 * n_layer * n_embd * block_size
        for the attention scores and the weighted sum of values.
        """
        cfg = self.config
        n_matmul = self.num_params() - self.pos_emb.weight.numel()
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

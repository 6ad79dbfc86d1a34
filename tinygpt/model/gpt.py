"""The transformer, in two architectures that differ by three small pieces (norm, positions, MLP).

- `gpt2`: token + learned position embeddings, pre-LayerNorm blocks with biases, a 4x MLP with tanh-approximated
  GELU, a final LayerNorm. Exactly Hugging Face `GPT2LMHeadModel` and llama.cpp's `gpt2`.
- `llama`: token embedding only, pre-RMSNorm blocks without biases, rotary position embeddings (RoPE) on queries
  and keys, optional grouped-query attention (n_kv_head key/value heads shared by groups of query heads), a
  SwiGLU MLP, a final RMSNorm. Exactly Hugging Face `LlamaForCausalLM` and llama.cpp's `llama`; with
  `rope_scaling` of type llama3, Llama 3.1/3.2's stretched rotary frequencies.
- `qwen2`: `llama` with biases on the query, key and value projections. Exactly Hugging Face `Qwen2ForCausalLM`
  and llama.cpp's `qwen2`.

Both tie the LM head to the token embedding unless `tie_embeddings` is off. A `KVCache` makes decoding
incremental: `forward` then processes only the new tokens, at positions that continue from the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.common import TinyGPTError
from tinygpt.model.loss import linear_cross_entropy
from tinygpt.model.presets import PRESETS

ARCHS = ("gpt2", "llama", "qwen2")
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
ATTENTION_KINDS = ("sdpa", "explicit")


@dataclass
class GPTConfig:
    vocab_size: int
    arch: str = "gpt2"  # "gpt2", "llama" or "qwen2"
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # llama: key/value heads (grouped-query attention); None: n_head
    n_embd: int = 256
    block_size: int = 128
    dropout: float = 0.0
    norm_eps: float = 1e-5  # LayerNorm (gpt2) or RMSNorm (llama) epsilon
    rope_theta: float = 10000.0  # llama: base of the rotary frequencies
    tie_embeddings: bool = True  # the LM head is the token embedding
    n_ff: int | None = None  # the MLP's hidden width; None: the architecture's rule (ffn_hidden); imported models set it
    rope_scaling: dict | None = None  # llama/qwen2: Hugging Face's {"rope_type": "llama3", factor, ...}; None: plain RoPE
    attention: str = "sdpa"  # "sdpa" (F.scaled_dot_product_attention) or "explicit" (masked softmax)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise TinyGPTError(f"model config arch={self.arch!r} must be one of {', '.join(ARCHS)}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "n_ff"):
            value = getattr(self, name)
            if name == "n_ff" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TinyGPTError(f"model config {name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise TinyGPTError(
                f"model config n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "pick n_embd a multiple of n_head"
            )
        if self.arch == "gpt2" and self.n_kv_head != self.n_head:
            raise TinyGPTError(f"model config n_kv_head={self.n_kv_head}: gpt2 has no grouped-query attention; "
                               "leave n_kv_head unset or use arch llama")
        if self.n_head % self.n_kv_head:
            raise TinyGPTError(f"model config n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}; "
                               "each key/value head serves an equal group of query heads")
        if self.arch != "gpt2" and self.head_dim % 2:
            raise TinyGPTError(f"model config head size n_embd/n_head={self.head_dim} is odd; "
                               "rotary embeddings rotate pairs of values, pick an even head size")
        if not 0.0 <= self.dropout < 1.0:
            raise TinyGPTError(f"model config dropout={self.dropout} must be in [0, 1)")
        for name in ("norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise TinyGPTError(f"model config {name}={getattr(self, name)} must be positive")
        if self.attention not in ATTENTION_KINDS:
            raise TinyGPTError(f"model config attention={self.attention!r} must be one of {', '.join(ATTENTION_KINDS)}")
        if self.rope_scaling is not None:
            self._check_rope_scaling()

    def _check_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if self.arch == "gpt2":
            raise TinyGPTError("model config rope_scaling is set but gpt2 has no rotary embeddings; leave it unset")
        if not isinstance(scaling, dict) or scaling.get("rope_type") != "llama3":
            raise TinyGPTError(f"model config rope_scaling={scaling!r}: tinygpt knows only rope_type 'llama3' "
                               "(Llama 3.1/3.2); leave it unset for plain RoPE")
        missing = [key for key in ROPE_SCALING_KEYS if not isinstance(scaling.get(key), (int, float))]
        if missing or not scaling["high_freq_factor"] > scaling["low_freq_factor"] > 0 or scaling["factor"] <= 0:
            raise TinyGPTError(f"model config rope_scaling={scaling!r} needs positive numbers {', '.join(ROPE_SCALING_KEYS)} "
                               "with high_freq_factor > low_freq_factor")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_hidden(self) -> int:
        """The MLP's hidden width: 4 * n_embd for gpt2; for llama 2/3 of that (SwiGLU has three matrices, not
        two) rounded up to a multiple of 256, as Llama does (256 for n_embd 64, 768 for 256, 1536 for 512)."""
        if self.n_ff is not None:
            return self.n_ff
        if self.arch == "gpt2":
            return 4 * self.n_embd
        return 256 * math.ceil(int(2 * 4 * self.n_embd / 3) / 256)


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
    """Keys and values of the positions seen so far, preallocated per layer as (B, n_kv_head, capacity, head_dim):
    capacity is block_size, or fewer positions when the caller knows it needs fewer (imported models have
    contexts of 32k-128k tokens, whose full cache would not fit a laptop).

    Each layer writes its new keys/values at `length`; `GPT.forward` advances `length` once all layers ran.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device | str, dtype: torch.dtype,
                 capacity: int | None = None) -> None:
        capacity = config.block_size if capacity is None else min(capacity, config.block_size)
        shape = (batch_size, config.n_kv_head, capacity, config.head_dim)
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


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without centring and without a bias (llama)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.arch == "gpt2":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps)
    return RMSNorm(config.n_embd, config.norm_eps)


class Rotary(nn.Module):
    """cos and sin of RoPE's angles (position * theta^(-2i/head_dim)) for every position, computed once.

    Hugging Face's layout: value i of a head is rotated together with value i + head_dim/2 (llama.cpp pairs
    neighbours instead; the GGUF converter permutes the rows of Q and K to match, see tinygpt.weights.names).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        half = config.head_dim // 2
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(half, dtype=torch.float32) * 2 / config.head_dim)
        if config.rope_scaling is not None:
            inv_freq = inv_freq / llama3_freq_factors(inv_freq, config.rope_scaling)
        angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq)  # (block_size, half)
        # buffers follow .to(device) and are never saved: the state dict and GGUF tensor count stay the weights
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables of positions start..start+length-1 in `dtype` (the attention's, autocast's under autocast)."""
        return self.cos[start : start + length].to(dtype), self.sin[start : start + length].to(dtype)

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables of each row's own `positions` (B, T), shaped (B, 1, T, d/2) to broadcast over the heads."""
        return self.cos[positions][:, None].to(dtype), self.sin[positions][:, None].to(dtype)


def llama3_freq_factors(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's divisors of the rotary frequencies: 1 for wavelengths shorter than the original context /
    high_freq_factor, `factor` for those longer than context / low_freq_factor, a smooth blend between.
    llama.cpp stores these divisors as the tensor rope_freqs.weight (tinygpt.weights.names)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (context / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelen < context / high, torch.ones_like(inv_freq),
                       torch.where(wavelen > context / low, torch.full_like(inv_freq, factor), blended))


def segment_layout(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of packed sequences (`segments` (B, T): equal values in a run mark one sequence): each token's
    position within its sequence (B, T), and the attention mask (B, 1, T, T) that lets a token see the earlier
    tokens of its own sequence only."""
    t = torch.arange(segments.shape[1], device=segments.device)
    first = torch.ones_like(segments, dtype=torch.bool)
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]
    positions = t - torch.where(first, t, 0).cummax(dim=1).values
    same = segments[:, :, None] == segments[:, None, :]
    return positions, (same & (t[:, None] >= t[None, :]))[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + d/2]) of every head of x (B, heads, T, d) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.layer_idx = layer_idx
        self.attention = config.attention
        self.dropout = config.dropout
        C, kv_width = config.n_embd, config.n_kv_head * config.head_dim
        self.fused = config.arch == "gpt2"
        if self.fused:
            self.qkv = nn.Linear(C, 3 * C)  # rows: Q, K, V (GPT-2's c_attn, transposed)
        else:  # separate, as Llama stores them: K and V have only n_kv_head heads
            bias = config.arch == "qwen2"  # Qwen2 adds biases to Q, K and V (and nowhere else)
            self.q = nn.Linear(C, C, bias=bias)
            self.k = nn.Linear(C, kv_width, bias=bias)
            self.v = nn.Linear(C, kv_width, bias=bias)
        self.proj = nn.Linear(C, C, bias=self.fused)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache: KVCache | None = None, segment_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2) if self.fused else (self.q(x), self.k(x), self.v(x))
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        start = 0
        if kv_cache is not None:
            start = kv_cache.length
            k, v = kv_cache.append(self.layer_idx, k, v)
        # new queries sit at positions start..start+T-1 and see every key up to their own position (made when
        # needed: a (block_size, block_size) table per layer would take GBs at the contexts of imported models)
        mask = segment_mask  # packed rows: (B, 1, T, T), causal within each segment
        if mask is None and (self.attention == "explicit" or (start and T > 1)):
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        grouped = self.n_kv_head != self.n_head  # query head h reads key/value head h // (n_head / n_kv_head)

        if self.attention == "sdpa":
            kwargs = dict(dropout_p=self.dropout if self.training else 0.0, enable_gqa=grouped)
            if start == 0 and mask is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
            elif T == 1:  # one new query sees every key: no mask keeps the fastest kernels available
                y = F.scaled_dot_product_attention(q, k, v, **kwargs)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
        else:
            if grouped:
                group = self.n_head // self.n_kv_head
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            scores = scores.masked_fill(~mask, float("-inf"))
            y = self.attn_dropout(F.softmax(scores, dim=-1)) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """GPT-2's: up to 4x the width, tanh-approximated GELU, back down."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.ffn_hidden)
        self.proj = nn.Linear(config.ffn_hidden, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's "gelu_new" is the tanh approximation; llama.cpp's ggml_gelu computes the same
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class SwiGLU(nn.Module):
    """Llama's: a SiLU-activated gate multiplies the up projection, then down (`proj`), no biases."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.up = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.silu(self.gate(x)) * self.up(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config) if config.arch == "gpt2" else SwiGLU(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache: KVCache | None = None, segment_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv_cache, segment_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        # where positions come in: added at the input (gpt2) or rotating queries and keys (llama)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.arch == "gpt2" else None
        self.rotary = Rotary(config) if config.arch != "gpt2" else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one (V, C) matrix, as in GPT-2
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
        # nn.LayerNorm already starts at weight 1, bias 0, and RMSNorm at weight 1

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
        reduction: str = "mean",
        segments: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, V) for the token ids `idx` (B, T); or, when `targets` is given, no logits and the
        cross-entropy (`reduction` mean or sum over the targets that are not -1), computed in row chunks so that
        the vocabulary-sized logits never exist whole (tinygpt.model.loss).

        With `kv_cache`, `idx` holds only the new tokens: they take positions from `kv_cache.length` on and
        are appended to the cache. `last_only` returns logits (B, 1, V) for the last position only, which
        spares the vocabulary-sized head on a prompt when decoding.

        `segments` (B, T) packs several sequences into a row (chat tuning, tinygpt.model.batches): each run of
        equal values is a sequence of its own, at positions from 0, attending only to itself.
        """
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise TinyGPTError(
                f"sequence of {start + T} tokens exceeds the model's block_size={self.config.block_size}; "
                "crop the context to the last block_size tokens"
            )
        positions, segment_mask = (None, None) if segments is None else segment_layout(segments)
        if positions is not None and kv_cache is not None:
            raise TinyGPTError("packed segments are for training: decoding with a cache takes one sequence a row")
        x = self.tok_emb(idx)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device) if positions is None else positions)
        else:  # the tables once per forward, in the dtype the attention computes in
            device_type = idx.device.type
            dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else self.tok_emb.weight.dtype)
            rope = self.rotary(start, T, dtype) if positions is None else self.rotary.at(positions, dtype)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, rope, kv_cache, segment_mask)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.ln_f(x)

        if targets is not None:
            return None, linear_cross_entropy(x, self.lm_head.weight, targets, ignore_index=-1, reduction=reduction)
        return self.lm_head(x[:, -1:] if last_only else x), None

    def new_kv_cache(self, batch_size: int = 1, capacity: int | None = None) -> KVCache:
        """An empty cache on the model's device, in its parameter dtype, for `capacity` positions (default and
        at most block_size)."""
        weight = self.tok_emb.weight
        return KVCache(self.config, batch_size, weight.device, weight.dtype, capacity)

    def _lookup_params(self) -> int:
        """Weights used by lookup rather than matmul: the position embedding, and an untied token embedding."""
        n = self.pos_emb.weight.numel() if self.pos_emb is not None else 0
        return n if self.config.tie_embeddings else n + self.tok_emb.weight.numel()

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, a tied token embedding / LM head counted once.

        `non_embedding=True` leaves out the token and position embeddings (Kaplan et al.'s N).
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if non_embedding:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return n

    def estimate_flops_per_token(self, context: int | None = None) -> int:
        """Training FLOPs per token (forward + backward) at a context of `context` tokens (default: block_size,
        the full context), for MFU (PaLM paper, appendix B).

        6 * N for the matmuls, where N counts every weight but those only looked up (the position embedding;
        a tied token embedding counts because it is the LM head's matmul), plus 12 * n_layer * n_embd *
        context for the attention scores and the weighted sum of values.
        """
        cfg = self.config
        n_matmul = self.num_params() - self._lookup_params()
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_embd * (context or cfg.block_size)

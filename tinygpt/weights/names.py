"""The one table of tensor names: each tensor of a model under our, Hugging Face's and GGUF's names.

The HF exporter, the GGUF converter, the GGUF reader and the tests all read names from here, so a new
architecture is one new table. `{i}` stands for the block number. Shapes are written with symbols that
`dims` fills in (V vocabulary, T context, C width, F MLP hidden size, KV key/value width, ...). Two fields say
how a layout differs from ours:

- `hf_transposed`: Hugging Face GPT-2 keeps the weight in a `Conv1D` module, stored (in, out), the transpose of
  our `nn.Linear` (out, in) and of GGUF's layout.
- `gguf_rope_heads`: the rows of Q and K are permuted for llama.cpp's rotary embedding, per head (the symbol
  of the head count: H or KV_H). Ours and Hugging Face's rotate value i of a head with value i + d/2; llama.cpp
  rotates neighbours (2i, 2i + 1). Its own HF converter reorders the rows so that both compute the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TypeVar

from tinygpt.common import TinyGPTError

Array = TypeVar("Array")  # a numpy array or a torch tensor: both reshape and swapaxes alike


@dataclass(frozen=True)
class TensorName:
    ours: str  # our state-dict name
    hf: str  # the Hugging Face model's name
    gguf: str  # llama.cpp's name
    shape: tuple[str, ...]  # numpy shape (out, in) in symbols of the architecture's dims
    hf_transposed: bool = False  # stored (in, out) by Hugging Face
    gguf_rope_heads: str | None = None  # rows permuted for llama.cpp's RoPE, with this many heads (a dims symbol)

    def block(self, i: int) -> TensorName:
        return replace(self, ours=self.ours.format(i=i), hf=self.hf.format(i=i), gguf=self.gguf.format(i=i))

    def hf_to_gguf(self, data: Array, dims: dict[str, int]) -> Array:
        """A weight in Hugging Face's layout -> GGUF's (numpy shape, rows in llama.cpp's order)."""
        data = data.T if self.hf_transposed else data
        return rope_rows_to_gguf(data, dims[self.gguf_rope_heads]) if self.gguf_rope_heads else data

    def ours_to_gguf(self, data: Array, dims: dict[str, int]) -> Array:
        """A weight in our state dict's layout -> GGUF's (only llama's Q and K rows move)."""
        return rope_rows_to_gguf(data, dims[self.gguf_rope_heads]) if self.gguf_rope_heads else data

    def gguf_to_ours(self, data: Array, dims: dict[str, int]) -> Array:
        """A weight in GGUF's layout -> our state dict's (the inverse row order; our Linear layout is GGUF's)."""
        return rope_rows_from_gguf(data, dims[self.gguf_rope_heads]) if self.gguf_rope_heads else data


T = TensorName

GPT2_TOP = (
    T("tok_emb.weight", "transformer.wte.weight", "token_embd.weight", ("V", "C")),
    T("pos_emb.weight", "transformer.wpe.weight", "position_embd.weight", ("T", "C")),
    T("ln_f.weight", "transformer.ln_f.weight", "output_norm.weight", ("C",)),
    T("ln_f.bias", "transformer.ln_f.bias", "output_norm.bias", ("C",)),
)
GPT2_BLOCK = (
    T("blocks.{i}.ln_1.weight", "transformer.h.{i}.ln_1.weight", "blk.{i}.attn_norm.weight", ("C",)),
    T("blocks.{i}.ln_1.bias", "transformer.h.{i}.ln_1.bias", "blk.{i}.attn_norm.bias", ("C",)),
    T("blocks.{i}.attn.qkv.weight", "transformer.h.{i}.attn.c_attn.weight", "blk.{i}.attn_qkv.weight", ("3C", "C"), True),
    T("blocks.{i}.attn.qkv.bias", "transformer.h.{i}.attn.c_attn.bias", "blk.{i}.attn_qkv.bias", ("3C",)),
    T("blocks.{i}.attn.proj.weight", "transformer.h.{i}.attn.c_proj.weight", "blk.{i}.attn_output.weight", ("C", "C"), True),
    T("blocks.{i}.attn.proj.bias", "transformer.h.{i}.attn.c_proj.bias", "blk.{i}.attn_output.bias", ("C",)),
    T("blocks.{i}.ln_2.weight", "transformer.h.{i}.ln_2.weight", "blk.{i}.ffn_norm.weight", ("C",)),
    T("blocks.{i}.ln_2.bias", "transformer.h.{i}.ln_2.bias", "blk.{i}.ffn_norm.bias", ("C",)),
    T("blocks.{i}.mlp.fc.weight", "transformer.h.{i}.mlp.c_fc.weight", "blk.{i}.ffn_up.weight", ("F", "C"), True),
    T("blocks.{i}.mlp.fc.bias", "transformer.h.{i}.mlp.c_fc.bias", "blk.{i}.ffn_up.bias", ("F",)),
    T("blocks.{i}.mlp.proj.weight", "transformer.h.{i}.mlp.c_proj.weight", "blk.{i}.ffn_down.weight", ("C", "F"), True),
    T("blocks.{i}.mlp.proj.bias", "transformer.h.{i}.mlp.c_proj.bias", "blk.{i}.ffn_down.bias", ("C",)),
)  # fmt: skip
# An untied LM head; left out of the HF file and the GGUF file when it is tied to the token embedding.
GPT2_HEAD = T("lm_head.weight", "lm_head.weight", "output.weight", ("V", "C"))


LLAMA_TOP = (
    T("tok_emb.weight", "model.embed_tokens.weight", "token_embd.weight", ("V", "C")),
    T("ln_f.weight", "model.norm.weight", "output_norm.weight", ("C",)),
)
LLAMA_BLOCK = (
    T("blocks.{i}.ln_1.weight", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", ("C",)),
    T("blocks.{i}.attn.q.weight", "model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", ("C", "C"),
      gguf_rope_heads="H"),
    T("blocks.{i}.attn.k.weight", "model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight", ("KV", "C"),
      gguf_rope_heads="KV_H"),
    T("blocks.{i}.attn.v.weight", "model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight", ("KV", "C")),
    T("blocks.{i}.attn.proj.weight", "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", ("C", "C")),
    T("blocks.{i}.ln_2.weight", "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", ("C",)),
    T("blocks.{i}.mlp.gate.weight", "model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", ("F", "C")),
    T("blocks.{i}.mlp.up.weight", "model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", ("F", "C")),
    T("blocks.{i}.mlp.proj.weight", "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", ("C", "F")),
)  # fmt: skip
LLAMA_HEAD = T("lm_head.weight", "lm_head.weight", "output.weight", ("V", "C"))

# Qwen2: Llama's tensors plus biases on Q, K and V. llama.cpp runs qwen2 with the "neox" rotary embedding, which
# pairs (i, i + d/2) as we and Hugging Face do, so no rows are permuted.
QWEN2_BLOCK = (
    *LLAMA_BLOCK[:1],
    *(replace(t, gguf_rope_heads=None) for t in LLAMA_BLOCK[1:4]),
    T("blocks.{i}.attn.q.bias", "model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias", ("C",)),
    T("blocks.{i}.attn.k.bias", "model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias", ("KV",)),
    T("blocks.{i}.attn.v.bias", "model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias", ("KV",)),
    *LLAMA_BLOCK[4:],
)  # fmt: skip

TABLES = {"gpt2": (GPT2_TOP, GPT2_BLOCK, GPT2_HEAD), "llama": (LLAMA_TOP, LLAMA_BLOCK, LLAMA_HEAD),
          "qwen2": (LLAMA_TOP, QWEN2_BLOCK, LLAMA_HEAD)}
# Llama 3.1's rope_scaling as llama.cpp stores it: the divisor of each rotary frequency (head_dim / 2 values).
ROPE_FREQS = "rope_freqs.weight"


def tensor_names(arch: str, n_layer: int, tied: bool = True) -> list[TensorName]:
    """Every stored tensor of an `arch` model with `n_layer` blocks: the top-level tensors, the blocks in
    order, and the LM head when it is not tied (the order the GGUF converter writes)."""
    if arch not in TABLES:
        raise TinyGPTError(f"unknown architecture {arch!r}; tinygpt knows {', '.join(TABLES)}")
    top, block, head = TABLES[arch]
    names = [*top, *(t.block(i) for i in range(n_layer) for t in block)]
    return names if tied else [*names, head]


def lm_head_name(arch: str) -> TensorName:
    """The untied LM head's names (absent from HF and GGUF files when the head is tied)."""
    return TABLES[arch][2]


def model_dims(vocab_size: int, n_ctx: int, n_embd: int, n_ff: int, n_head: int, n_kv_head: int) -> dict[str, int]:
    """The values of the shape symbols used in the tables."""
    kv_width = n_kv_head * (n_embd // n_head)
    return {"V": vocab_size, "T": n_ctx, "C": n_embd, "3C": 3 * n_embd, "F": n_ff, "H": n_head, "KV_H": n_kv_head,
            "KV": kv_width}


def config_dims(config) -> dict[str, int]:
    """model_dims of a GPTConfig (duck-typed: this module imports no model code)."""
    return model_dims(config.vocab_size, config.block_size, config.n_embd, config.ffn_hidden, config.n_head,
                      config.n_kv_head)


def rope_rows_to_gguf(w: Array, n_head: int) -> Array:
    """Reorder the rows of each head's block from Hugging Face's rotary pairs (i, i + d/2) to llama.cpp's
    (2i, 2i + 1): row i goes to 2i and row i + d/2 to 2i + 1, as llama.cpp's convert_hf_to_gguf permutes."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_rows_from_gguf(w: Array, n_head: int) -> Array:
    """The inverse of rope_rows_to_gguf."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def shape_of(name: TensorName, dims: dict[str, int]) -> tuple[int, ...]:
    """The numeric numpy shape of `name`, given the model's dims (V, T, C, F, KV, ...)."""
    return tuple(dims[symbol] for symbol in name.shape)


def by(field: str, names: list[TensorName]) -> dict[str, TensorName]:
    """Index a list of names by one of its fields: by("gguf", names)["blk.0.attn_qkv.weight"]."""
    return {getattr(t, field): t for t in names}

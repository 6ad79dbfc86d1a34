"""The one table of tensor names: each tensor of a model under our, Hugging Face's and GGUF's names.

The HF exporter, the GGUF converter, the GGUF reader and the tests all read names from here, so a new
architecture is one new table. `{i}` stands for the block number. Shapes are written with symbols that the
architecture's `dims` fills in (V vocabulary, T context, C width, F MLP hidden size, ...); `hf_transposed`
marks weights that Hugging Face GPT-2 keeps in `Conv1D` modules, stored (in, out), the transpose of our
`nn.Linear` (out, in) and of GGUF's layout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tinygpt.common import TinyGPTError


@dataclass(frozen=True)
class TensorName:
    ours: str  # our state-dict name
    hf: str  # the Hugging Face model's name
    gguf: str  # llama.cpp's name
    shape: tuple[str, ...]  # numpy shape (out, in) in symbols of the architecture's dims
    hf_transposed: bool = False  # stored (in, out) by Hugging Face

    def block(self, i: int) -> TensorName:
        return replace(self, ours=self.ours.format(i=i), hf=self.hf.format(i=i), gguf=self.gguf.format(i=i))


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

TABLES = {"gpt2": (GPT2_TOP, GPT2_BLOCK, GPT2_HEAD)}


def tensor_names(arch: str, n_layer: int, tied: bool = True) -> list[TensorName]:
    """Every stored tensor of an `arch` model with `n_layer` blocks: the top-level tensors, the blocks in
    order, and the LM head when it is not tied (the order the GGUF converter writes)."""
    if arch not in TABLES:
        raise TinyGPTError(f"unknown architecture {arch!r}; tinygpt knows {', '.join(TABLES)}")
    top, block, head = TABLES[arch]
    names = [*top, *(t.block(i) for i in range(n_layer) for t in block)]
    return names if tied else [*names, head]


def shape_of(name: TensorName, dims: dict[str, int]) -> tuple[int, ...]:
    """The numeric numpy shape of `name`, given the architecture's dims (V, T, C, F, ...)."""
    return tuple(dims[symbol] for symbol in name.shape)


def by(field: str, names: list[TensorName]) -> dict[str, TensorName]:
    """Index a list of names by one of its fields: by("gguf", names)["blk.0.attn_qkv.weight"]."""
    return {getattr(t, field): t for t in names}

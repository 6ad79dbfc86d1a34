"""GGUF conversion, checked with gguf-py's reader against docs/gguf.md and against the PyTorch weights."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from builders import random_gpt, save_tiny_checkpoint, tiny_tokenizer

from tinygpt.common import TinyGPTError
from tinygpt.export.hf import export_hf
from tinygpt.export.gguf_convert import convert_to_gguf, main, tensor_type

T = gguf.GGMLQuantizationType
V = gguf.GGUFValueType
# GGML type of the 2-D weights and general.file_type for each --outtype
OUTTYPES = {"f32": (T.F32, 0), "f16": (T.F16, 1), "bf16": (T.BF16, 32), "q8_0": (T.Q8_0, 7)}
# GGUF name -> our state-dict name, per block
BLOCK_NAMES = {
    "attn_norm": "ln_1", "attn_qkv": "attn.qkv", "attn_output": "attn.proj",
    "ffn_norm": "ln_2", "ffn_up": "mlp.fc", "ffn_down": "mlp.proj",
}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf_convert")
    tokenizer = tiny_tokenizer()
    model = random_gpt(tokenizer, n_embd=64, n_layer=2, n_head=4, block_size=48)
    export_hf(save_tiny_checkpoint(tmp / "best.pt", model, tokenizer), tmp / "hf")
    return tmp / "hf", model, tokenizer


@pytest.fixture(scope="module")
def converted(model_dir, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf_files")
    return {t: convert_to_gguf(model_dir[0], out / f"model-{t}.gguf", t, name="tiny") for t in OUTTYPES}


def reference_q8_0(x: np.ndarray) -> np.ndarray:
    """Q8_0 round trip as ggml's reference: d = amax/127 stored as fp16, q = roundf(x/d) (half away from zero)."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        scaled = blocks * np.where(d == 0, np.float32(0), np.float32(1) / d)
    magnitude = np.abs(scaled)
    q = np.sign(scaled) * (np.floor(magnitude) + (magnitude - np.floor(magnitude) >= 0.5))
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def our_state_name(gguf_name: str) -> str:
    top = {"token_embd.weight": "tok_emb.weight", "position_embd.weight": "pos_emb.weight",
           "output_norm.weight": "ln_f.weight", "output_norm.bias": "ln_f.bias"}
    if gguf_name in top:
        return top[gguf_name]
    _, i, kind, leaf = gguf_name.split(".")
    return f"blocks.{i}.{BLOCK_NAMES[kind]}.{leaf}"



def assert_fields(reader: gguf.GGUFReader, expected: dict) -> None:
    """Each metadata key present, with exactly the value type and the value expected."""
    for key, (vtype, value) in expected.items():
        field = reader.get_field(key)
        assert field is not None, key
        assert field.types == [vtype], key
        assert field.contents() == value, key

@pytest.mark.parametrize("outtype", list(OUTTYPES))
def test_metadata_has_every_key_with_its_exact_type(converted, model_dir, outtype):
    _, model, tokenizer = model_dir
    cfg = model.config
    reader = gguf.GGUFReader(converted[outtype])
    expected = {
        "general.architecture": (V.STRING, "gpt2"),
        "general.name": (V.STRING, "tiny"),
        "general.file_type": (V.UINT32, OUTTYPES[outtype][1]),
        "general.quantization_version": (V.UINT32, 2),
        "gpt2.context_length": (V.UINT32, cfg.block_size),
        "gpt2.embedding_length": (V.UINT32, cfg.n_embd),
        "gpt2.feed_forward_length": (V.UINT32, 4 * cfg.n_embd),
        "gpt2.block_count": (V.UINT32, cfg.n_layer),
        "gpt2.attention.head_count": (V.UINT32, cfg.n_head),
        "gpt2.attention.layer_norm_epsilon": (V.FLOAT32, pytest.approx(cfg.norm_eps)),
        "tokenizer.ggml.model": (V.STRING, "gpt2"),
        "tokenizer.ggml.pre": (V.STRING, "gpt-2"),
        "tokenizer.ggml.bos_token_id": (V.UINT32, tokenizer.eot_id),
        "tokenizer.ggml.eos_token_id": (V.UINT32, tokenizer.eot_id),
        "tokenizer.ggml.add_bos_token": (V.BOOL, False),
    }
    assert_fields(reader, expected)

    arrays = {
        "tokenizer.ggml.tokens": (V.STRING, tokenizer.token_strings()),
        "tokenizer.ggml.merges": (V.STRING, tokenizer.merge_strings()),
        "tokenizer.ggml.token_type": (V.INT32, [3 if i in tokenizer.special_tokens.values() else 1  # CONTROL
                                                for i in range(tokenizer.vocab_size)]),
    }
    for key, (vtype, value) in arrays.items():
        field = reader.get_field(key)
        assert field.types == [V.ARRAY, vtype], key
        assert field.contents() == value, key
    assert "<|endoftext|>" == reader.get_field("tokenizer.ggml.tokens").contents(tokenizer.eot_id)
    assert set(reader.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"} == set(expected) | set(arrays)


@pytest.mark.parametrize("outtype", list(OUTTYPES))
def test_tensors_names_shapes_types_and_values(converted, model_dir, outtype):
    _, model, _ = model_dir
    cfg = model.config
    weight_type = OUTTYPES[outtype][0]
    reader = gguf.GGUFReader(converted[outtype])
    assert reader.get_field("GGUF.version").contents() == 3
    assert len(reader.tensors) == 4 + 12 * cfg.n_layer  # no output.weight: the head is tied
    state = model.state_dict()
    names = set()
    for t in reader.tensors:
        names.add(t.name)
        ours = state[our_state_name(t.name)].numpy()
        assert tuple(reversed(t.shape.tolist())) == ours.shape, t.name  # GGML dims are numpy's reversed
        # as convert_hf_to_gguf.py: 1-D, norms and the position embedding stay F32
        keep_f32 = ours.ndim == 1 or t.name == "position_embd.weight"
        assert t.tensor_type == (T.F32 if keep_f32 else weight_type), t.name
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
        if t.tensor_type == T.F32:
            np.testing.assert_array_equal(values, ours, err_msg=t.name)
        elif t.tensor_type == T.F16:
            np.testing.assert_array_equal(values, ours.astype(np.float16).astype(np.float32), err_msg=t.name)
        elif t.tensor_type == T.BF16:  # torch's bf16 rounding is an independent reference
            expected = torch.from_numpy(ours).to(torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(values, expected, err_msg=t.name)
        else:
            np.testing.assert_array_equal(values, reference_q8_0(ours), err_msg=t.name)
    assert "blk.1.attn_qkv.weight" in names and "output.weight" not in names


def test_q8_0_rows_not_a_multiple_of_32_fall_back_to_f16():
    assert tensor_type("blk.0.ffn_up.weight", np.zeros((192, 48), np.float32), T.Q8_0) == T.F16
    assert tensor_type("blk.0.ffn_up.weight", np.zeros((192, 64), np.float32), T.Q8_0) == T.Q8_0
    assert tensor_type("blk.0.ffn_up.bias", np.zeros(192, np.float32), T.Q8_0) == T.F32


def test_output_is_atomic_and_cli_works(model_dir, tmp_path):
    out = tmp_path / "model.gguf"
    main(["--model_dir", str(model_dir[0]), "--out", str(out), "--outtype", "f16"])
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    assert gguf.GGUFReader(out).get_field("general.name").contents() == "tinygpt"


def test_bad_inputs_are_one_clear_error(model_dir, tmp_path):
    with pytest.raises(TinyGPTError, match=r"config\.json.*tinygpt export"):
        convert_to_gguf(tmp_path / "empty", tmp_path / "x.gguf")
    with pytest.raises(TinyGPTError, match="unknown --outtype 'q3'"):
        convert_to_gguf(model_dir[0], tmp_path / "x.gguf", "q3")

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir[0].iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    with pytest.raises(TinyGPTError, match=r"cannot read .*model\.safetensors"):
        convert_to_gguf(broken, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".*tmp"))


# ------------------------------------------------------------------------------------------------- llama

LLAMA_BLOCK_NAMES = {
    "attn_norm": "ln_1", "attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v", "attn_output": "attn.proj",
    "ffn_norm": "ln_2", "ffn_gate": "mlp.gate", "ffn_up": "mlp.up", "ffn_down": "mlp.proj",
}  # fmt: skip


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory):
    """f32 and f16 files of a width-64 llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    tmp = tmp_path_factory.mktemp("gguf_llama")
    tokenizer = tiny_tokenizer()
    model = random_gpt(tokenizer, n_embd=64, n_layer=2, n_head=4, block_size=48, arch="llama", n_kv_head=2,
                       rope_theta=5000.0, norm_eps=1e-6)
    export_hf(save_tiny_checkpoint(tmp / "best.pt", model, tokenizer), tmp / "hf")
    files = {t: convert_to_gguf(tmp / "hf", tmp / f"llama-{t}.gguf", t, name="tiny") for t in ("f32", "f16")}
    return files, model, tokenizer


def test_llama_metadata_has_every_key_with_its_exact_type(llama_files):
    files, model, tokenizer = llama_files
    reader = gguf.GGUFReader(files["f16"])
    expected = {
        "general.architecture": (V.STRING, "llama"),
        "general.file_type": (V.UINT32, 1),
        "llama.context_length": (V.UINT32, 48),
        "llama.embedding_length": (V.UINT32, 64),
        "llama.feed_forward_length": (V.UINT32, 256),
        "llama.block_count": (V.UINT32, 2),
        "llama.attention.head_count": (V.UINT32, 4),
        "llama.attention.head_count_kv": (V.UINT32, 2),
        "llama.attention.layer_norm_rms_epsilon": (V.FLOAT32, pytest.approx(1e-6)),
        "llama.rope.freq_base": (V.FLOAT32, 5000.0),
        "llama.rope.dimension_count": (V.UINT32, 16),
        "llama.vocab_size": (V.UINT32, tokenizer.vocab_size),
        "tokenizer.ggml.model": (V.STRING, "gpt2"),
        "tokenizer.ggml.pre": (V.STRING, "gpt-2"),
        "tokenizer.ggml.add_bos_token": (V.BOOL, False),
    }
    assert_fields(reader, expected)
    assert not any(key.startswith("gpt2.") for key in reader.fields)


def adjacent_pair_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Independent of the converter: head h's rows i and i + d/2 (rotated together by us and Hugging Face) become
    rows 2i and 2i + 1, the neighbours llama.cpp rotates together."""
    d = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for i in range(d // 2):
            out[h * d + 2 * i] = w[h * d + i]
            out[h * d + 2 * i + 1] = w[h * d + i + d // 2]
    return out


def test_llama_tensors_names_shapes_types_and_permuted_rows(llama_files):
    files, model, _ = llama_files
    state = model.state_dict()
    reader = gguf.GGUFReader(files["f32"])
    names = [t.name for t in reader.tensors]
    assert len(names) == 2 + 9 * 2 and "output.weight" not in names and "position_embd.weight" not in names
    for t in reader.tensors:
        if t.name in ("token_embd.weight", "output_norm.weight"):
            ours = state[{"token_embd.weight": "tok_emb.weight", "output_norm.weight": "ln_f.weight"}[t.name]]
        else:
            _, i, kind, leaf = t.name.split(".")
            ours = state[f"blocks.{i}.{LLAMA_BLOCK_NAMES[kind]}.{leaf}"]
        ours = ours.numpy()
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            ours = adjacent_pair_rows(ours, 4 if "attn_q" in t.name else 2)
        assert tuple(reversed(t.shape.tolist())) == ours.shape, t.name
        assert t.tensor_type == T.F32
        np.testing.assert_array_equal(np.asarray(t.data).reshape(ours.shape), ours, err_msg=t.name)
    f16_types = {t.name: t.tensor_type for t in gguf.GGUFReader(files["f16"]).tensors}
    assert f16_types["blk.1.attn_k.weight"] == f16_types["token_embd.weight"] == T.F16
    assert f16_types["blk.1.ffn_norm.weight"] == f16_types["output_norm.weight"] == T.F32


def test_llama_config_the_converter_cannot_run_is_refused(llama_files, tmp_path):
    files, _, _ = llama_files
    source = files["f32"].parent / "hf"
    for change, message in [({"hidden_act": "gelu"}, "hidden_act 'gelu' is not silu"),
                            ({"attention_bias": True}, "attention_bias is true"),
                            ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling of type 'linear'")]:
        folder = tmp_path / "changed"
        folder.mkdir(exist_ok=True)
        for f in source.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(TinyGPTError, match=message):
            convert_to_gguf(folder, tmp_path / "x.gguf")
        assert not (tmp_path / "x.gguf").exists()

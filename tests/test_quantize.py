"""The quantize stage against llama.cpp: the files llama_model_quantize wrote from the same inputs (golden sha256
in tests/data/quantize_golden.json, made by tools/make_golden.py), plus the type rules and bad-input handling."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader

from tinygpt.common import TinyGPTError
from tinygpt.export import quantize
from tinygpt.export.quantize import FILE_TYPES, main, plan_tensor_types, quantize_gguf, use_more_bits

ROOT = Path(__file__).parents[1]
GOLDEN = json.loads((ROOT / "tests" / "data" / "quantize_golden.json").read_text())


def load_make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", ROOT / "tools" / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


make_golden = load_make_golden()
MODELS = {m.name: m for m in make_golden.TEST_MODELS}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """The test models of tools/make_golden.py, rebuilt bit for bit."""
    folder = tmp_path_factory.mktemp("models")
    files = {}
    for name, spec in MODELS.items():
        files[name] = folder / f"{name}.gguf"
        make_golden.write_test_model(spec, files[name])
        assert make_golden.file_sha256(files[name]) == GOLDEN["models"][name]["input_sha256"], \
            f"test model {name} no longer matches the one the golden file was made from"
    return files


def types_of(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("file_type", list(FILE_TYPES))
@pytest.mark.parametrize("model", list(MODELS))
def test_same_file_as_llama_quantize(model_files, tmp_path, model, file_type):
    out = tmp_path / "out.gguf"
    quantize_gguf(model_files[model], out, file_type, threads=2)
    expected = GOLDEN["models"][model]["types"][file_type]
    got = make_golden.tensor_digests(out)
    differing = {n: (got.get(n), e) for n, e in expected["tensors"].items() if got.get(n) != e}
    assert not differing, f"tensors (ours, llama.cpp) differ: {differing}"
    assert set(got) == set(expected["tensors"])
    # metadata, tensor order, offsets and padding too: the whole file is llama.cpp's
    assert make_golden.file_sha256(out) == expected["file_sha256"]


def test_q4_k_m_mix_follows_the_spec(model_files, tmp_path):
    out = tmp_path / "q.gguf"
    quantize_gguf(model_files["k256"], out, "q4_k_m")
    types = types_of(out)
    meta = GGUFReader(out).fields
    assert meta["general.file_type"].contents() == 15
    assert meta["general.quantization_version"].contents() == 2
    assert types["token_embd.weight"] == "Q6_K"  # tied: it is the output layer too
    assert types["position_embd.weight"] == "F16"  # never quantized, copied as it came
    assert types["output_norm.weight"] == types["blk.0.attn_qkv.bias"] == "F32"
    for i in range(4):  # use_more_bits(i, 4): layers 2 and 3
        more = "Q6_K" if i >= 2 else "Q4_K"
        assert types[f"blk.{i}.attn_qkv.weight"] == types[f"blk.{i}.ffn_down.weight"] == more
        assert types[f"blk.{i}.attn_output.weight"] == types[f"blk.{i}.ffn_up.weight"] == "Q4_K"


def test_q4_k_m_mix_for_llama(model_files, tmp_path):
    """llama's own tensors: attn_v counted on its own (use_more_bits over the attn_v tensors), ffn_gate like
    ffn_up, attn_q and the grouped-query attn_k (128 rows of 256) plain Q4_K."""
    out = tmp_path / "q.gguf"
    quantize_gguf(model_files["llama256"], out, "q4_k_m")
    types = types_of(out)
    assert types["token_embd.weight"] == "Q6_K" and "output.weight" not in types
    assert types["output_norm.weight"] == types["blk.0.attn_norm.weight"] == types["blk.3.ffn_norm.weight"] == "F32"
    for i in range(4):  # use_more_bits(i, 4): layers 2 and 3
        more = "Q6_K" if i >= 2 else "Q4_K"
        assert types[f"blk.{i}.attn_v.weight"] == types[f"blk.{i}.ffn_down.weight"] == more
        for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert types[f"blk.{i}.{kind}.weight"] == "Q4_K", kind
    out = tmp_path / "narrow.gguf"
    quantize_gguf(model_files["llama96"], out, "q4_k_m")  # rows of 96 and 320: 32-block fallbacks
    types = types_of(out)
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q5_0"  # untied: Q4_K -> Q5_0
    assert types["blk.2.attn_v.weight"] == types["blk.5.ffn_down.weight"] == "Q8_0"  # Q6_K -> Q8_0
    assert types["blk.0.attn_v.weight"] == types["blk.0.ffn_gate.weight"] == "Q5_0"


def test_fallbacks_for_narrow_rows(model_files, tmp_path):
    out = tmp_path / "q.gguf"
    quantize_gguf(model_files["w80"], out, "q4_k_m")
    types = types_of(out)
    assert types["blk.0.attn_qkv.weight"] == "F16"  # rows of 80: no 32-block type fits (F32 input -> F16)
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 160, Q6_K wanted (layer 0 of 8) -> Q8_0
    assert types["blk.1.ffn_down.weight"] == "Q5_0"  # Q4_K wanted -> Q5_0
    assert types["output.weight"] == "F16"
    assert types["token_embd.weight"] == "F16"  # untied: Q4_K -> Q5_0 -> F16


@pytest.mark.parametrize("n,layers", [(4, {2, 3}), (6, {2, 5}), (8, {0, 3, 6, 7}), (12, {0, 3, 6, 9, 10, 11})])
def test_use_more_bits_examples(n, layers):
    assert {i for i in range(n) if use_more_bits(i, n)} == layers


def test_plan_keeps_vectors_and_counts_layers_in_order():
    from tinygpt.export.quantize import TensorInfo, llama_order

    names = llama_order([f"blk.{i}.ffn_down.weight" for i in range(12)] + ["blk.3.ffn_down.bias", "token_embd.weight"])
    assert names[0] == "token_embd.weight" and names[1:4] == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight",
                                                            "blk.2.ffn_down.weight"]  # numeric, not text, order
    infos = [TensorInfo(n, QT.F32 if n.endswith("bias") else QT.F16, (512,) if n.endswith("bias") else (512, 512))
             for n in names]
    plan = plan_tensor_types(infos, "q5_k_m", 12)
    assert plan["blk.3.ffn_down.bias"] == QT.F32
    assert [plan[f"blk.{i}.ffn_down.weight"].name for i in (0, 1, 2, 3, 9, 10)] == \
        ["Q6_K", "Q5_K", "Q5_K", "Q6_K", "Q6_K", "Q6_K"]


def test_unknown_type_names_the_supported_ones(model_files, tmp_path):
    with pytest.raises(TinyGPTError, match="q3_k_s.*supported: q4_k_m, q5_k_m, q6_k, q8_0, q5_0, q4_0"):
        quantize_gguf(model_files["w96"], tmp_path / "x.gguf", "q3_k_s")


@pytest.mark.parametrize("keep", [0, 10, 3000, -100])
def test_truncated_or_foreign_input_is_one_clear_error(model_files, tmp_path, keep):
    data = model_files["w96"].read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:keep] if keep else b"not a gguf at all, just some text\n" * 4)
    with pytest.raises(TinyGPTError, match="bad.gguf is not a readable GGUF"):
        quantize_gguf(bad, tmp_path / "out.gguf", "q8_0")
    assert os.listdir(tmp_path) == ["bad.gguf"]  # no output, no temporary file left behind


def test_failed_conversion_leaves_no_file(model_files, tmp_path):
    q8 = tmp_path / "q8.gguf"
    quantize_gguf(model_files["w96"], q8, "q8_0")
    out = tmp_path / "out.gguf"
    with pytest.raises(TinyGPTError, match="already Q8_0"):
        quantize_gguf(q8, out, "q4_k_m")
    assert sorted(os.listdir(tmp_path)) == ["q8.gguf"]


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_worker_processes_write_llama_quantizes_file(model_files, tmp_path, monkeypatch):
    """With threads, whole tensors are converted in forked worker processes (each on one thread): the same file,
    and a tensor's error reaches the caller as it would from one process, leaving no file."""
    monkeypatch.setattr(quantize, "worker_context", lambda: multiprocessing.get_context("fork"))
    convert = quantize._convert

    def in_a_worker(t, qtype, threads, importance):
        assert threads == 1, "converted by the caller's threads, not by worker processes"
        return convert(t, qtype, threads, importance)

    monkeypatch.setattr(quantize, "_convert", in_a_worker)  # before the fork: the workers inherit it
    for file_type in ("q4_k_m", "q5_0", "q6_k"):
        out = tmp_path / f"{file_type}.gguf"
        quantize_gguf(model_files["w96"], out, file_type, threads=2)
        assert make_golden.file_sha256(out) == GOLDEN["models"]["w96"]["types"][file_type]["file_sha256"]
    q8 = tmp_path / "q8_0.gguf"
    quantize_gguf(model_files["w96"], q8, "q8_0", threads=1)
    with pytest.raises(TinyGPTError, match="already Q8_0"):
        quantize_gguf(q8, tmp_path / "again.gguf", "q4_k_m", threads=2)
    assert not (tmp_path / "again.gguf").exists()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_worker_that_dies_is_one_clear_error_and_leaves_no_file(model_files, tmp_path, monkeypatch):
    """A worker killed mid-tensor (as the out-of-memory killer would) stops the stage with one message instead of
    leaving it waiting forever for that tensor, as multiprocessing.Pool would."""
    monkeypatch.setattr(quantize, "worker_context", lambda: multiprocessing.get_context("fork"))
    caller, convert = os.getpid(), quantize._convert

    def killed_in_a_worker(t, qtype, threads, importance):
        if os.getpid() != caller and t.name == "blk.1.ffn_up.weight":
            os.kill(os.getpid(), signal.SIGKILL)
        return convert(t, qtype, threads, importance)

    monkeypatch.setattr(quantize, "_convert", killed_in_a_worker)
    out = tmp_path / "q4_k_m.gguf"
    with pytest.raises(TinyGPTError, match="worker process of quantize died"):
        quantize_gguf(model_files["w96"], out, "q4_k_m", threads=2)
    assert os.listdir(tmp_path) == []


def test_missing_input_and_same_output(tmp_path, model_files):
    with pytest.raises(TinyGPTError, match="input GGUF not found"):
        quantize_gguf(tmp_path / "nope.gguf", tmp_path / "out.gguf")
    with pytest.raises(TinyGPTError, match="is the input file"):
        quantize_gguf(model_files["w96"], model_files["w96"])


def test_bf16_input_quantizes_like_its_f32_widening(tmp_path):
    """BF16 is widened exactly, so a BF16 file and the F32 file of the same values quantize alike."""
    from gguf import GGUFWriter

    values = (np.random.default_rng(0).standard_normal((64, 256)) * 0.02).astype(np.float32)
    bf16_bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncation is fine: any bf16 will do
    widened = (bf16_bits.astype(np.uint32) << 16).view(np.float32)
    files = {}
    for kind in ("bf16", "f32"):
        w = GGUFWriter(tmp_path / f"{kind}.gguf", "gpt2")
        w.add_block_count(1)
        if kind == "bf16":
            w.add_tensor("blk.0.ffn_up.weight", bf16_bits.view(np.uint8), raw_dtype=QT.BF16)
        else:
            w.add_tensor("blk.0.ffn_up.weight", widened)
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        files[kind] = tmp_path / f"{kind}.q.gguf"
        quantize_gguf(tmp_path / f"{kind}.gguf", files[kind], "q4_k_m")
    a, b = (make_golden.tensor_digests(files[k]) for k in ("bf16", "f32"))
    assert a == b and a["blk.0.ffn_up.weight"][0] == "Q4_K"


@pytest.mark.parametrize("model", list(MODELS))
def test_bf16_input_against_live_llama_quantize(tmp_path, model):
    """With llama-cpp-python installed: a BF16 input (no golden file for it) quantized by both sides."""
    pytest.importorskip("llama_cpp")
    src = tmp_path / "bf16.gguf"
    make_golden.write_test_model(dataclasses.replace(MODELS[model], float_type=QT.BF16), src)
    for file_type in ("q4_k_m", "q8_0"):
        quantize_gguf(src, tmp_path / "ours.gguf", file_type)
        make_golden.llama_quantize_file(src, tmp_path / "llama.gguf", file_type)
        assert make_golden.file_sha256(tmp_path / "ours.gguf") == make_golden.file_sha256(tmp_path / "llama.gguf")


def test_pure_gives_every_matrix_the_one_type(model_files, tmp_path):
    quantize_gguf(model_files["k256"], tmp_path / "pure.gguf", "q4_k_m", pure=True)
    types = types_of(tmp_path / "pure.gguf")
    assert types["token_embd.weight"] == types["blk.3.ffn_down.weight"] == types["blk.0.attn_qkv.weight"] == "Q4_K"
    assert types["position_embd.weight"] == "F16" and types["output_norm.weight"] == "F32"


@pytest.mark.parametrize("model", list(MODELS))
def test_pure_against_live_llama_quantize(model_files, tmp_path, model):
    pytest.importorskip("llama_cpp")
    for file_type in ("q4_k_m", "q6_k"):
        quantize_gguf(model_files[model], tmp_path / "ours.gguf", file_type, pure=True)
        make_golden.llama_quantize_file(model_files[model], tmp_path / "llama.gguf", file_type, pure=True)
        assert make_golden.file_sha256(tmp_path / "ours.gguf") == make_golden.file_sha256(tmp_path / "llama.gguf")


def test_cli(model_files, tmp_path):
    env = dict(os.environ, TINYGPT_NO_PROGRESS="1")
    out = tmp_path / "model-q6_k.gguf"
    cmd = [sys.executable, "-m", "tinygpt.export.quantize", "--input", str(model_files["w96"]), "--out", str(out)]
    done = subprocess.run(cmd + ["--type", "q6_k", "--threads", "2"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert make_golden.file_sha256(out) == GOLDEN["models"]["w96"]["types"]["q6_k"]["file_sha256"]
    bad = subprocess.run(cmd + ["--type", "q2_k"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert bad.returncode == 1 and bad.stderr.startswith("error: unknown quantization type 'q2_k'")
    assert "Traceback" not in bad.stderr


def test_main_in_process(model_files, tmp_path, capsys):
    main(["--input", str(model_files["w80"]), "--out", str(tmp_path / "q.gguf"), "--type", "Q5_0"])
    assert "wrote" in capsys.readouterr().out
    assert make_golden.file_sha256(tmp_path / "q.gguf") == GOLDEN["models"]["w80"]["types"]["q5_0"]["file_sha256"]

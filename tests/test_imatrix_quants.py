"""Quantizing with an importance matrix, against llama.cpp: ggml's weighted quantizers (golden row hashes from
ggml_quantize_chunk with quant_weights) and whole files (golden sha256 of `llama-quantize --imatrix`), both in
tests/data/quantize_golden_imatrix.json made by tools/make_golden.py; plus live comparisons when llama.cpp is
installed, the type rule an importance matrix changes, the metadata it adds, and bad importance matrices."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType

from llama_tools import llama_tool
from test_quantize import MODELS, make_golden
from tinygpt.common import TinyGPTError
from tinygpt.export import quants
from tinygpt.export.quantize import FILE_TYPES, ImatrixInfo, TensorInfo, plan_tensor_types, quantize_gguf

GOLDEN = json.loads((Path(__file__).parent / "data" / "quantize_golden_imatrix.json").read_text())
IMATRIX = make_golden.IMATRIX_FILE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The test models and their importance matrices, rebuilt bit for bit in one folder (the name of the
    importance-matrix file, recorded in the output, is the same relative name llama-quantize was given)."""
    folder = tmp_path_factory.mktemp("imatrix_models")
    for name, spec in MODELS.items():
        make_golden.write_test_model(spec, folder / f"{name}.gguf")
        make_golden.write_test_imatrix(make_golden.imatrix_entries(folder / f"{name}.gguf"), folder / f"{name}.imatrix")
        expected = GOLDEN["models"][name]
        assert make_golden.file_sha256(folder / f"{name}.gguf") == expected["input_sha256"]
        assert make_golden.file_sha256(folder / f"{name}.imatrix") == expected["imatrix_sha256"], \
            f"the importance matrix of {name} no longer matches the one the golden file was made from"
    return folder


def quantize_with(folder: Path, model: str, out: Path, file_type: str, monkeypatch) -> None:
    """Quantize `model` with its importance matrix passed as the relative name `imatrix.gguf`."""
    monkeypatch.chdir(folder)
    if not (folder / IMATRIX).exists() or (folder / IMATRIX).read_bytes() != (folder / f"{model}.imatrix").read_bytes():
        (folder / IMATRIX).write_bytes((folder / f"{model}.imatrix").read_bytes())
    quantize_gguf(f"{model}.gguf", out, file_type, threads=2, imatrix=IMATRIX)


def quantized_digests(path: Path) -> dict[str, str]:
    return {n: f"{t}:{h[:16]}" for n, (t, h) in make_golden.tensor_digests(path).items() if t not in ("F32", "F16")}


# --------------------------------------------------------------------------------------------- kernels

@pytest.mark.parametrize("kind", make_golden.IMATRIX_KINDS)
@pytest.mark.parametrize("qtype", make_golden.IMATRIX_VECTOR_TYPES, ids=lambda t: t.name)
def test_weighted_quantizers_match_ggml_golden_rows(kind, qtype):
    x = make_golden.edge_case_rows()
    ours = quants.quantize(x, qtype, imatrix=make_golden.importance_vector(kind, x.shape[1]))
    expected = GOLDEN["vectors"][kind][qtype.name]
    bad = [i for i, (a, b) in enumerate(zip(make_golden.row_digests(ours), expected)) if a != b]
    assert not bad, f"{qtype.name} with {kind} importance: rows {bad} differ from ggml"


@pytest.mark.parametrize("qtype", make_golden.IMATRIX_VECTOR_TYPES + [QT.Q8_0], ids=lambda t: t.name)
def test_weighted_quantizers_match_live_ggml(qtype):
    """With llama-cpp-python installed: ggml itself on data and importance no golden file fixed."""
    pytest.importorskip("llama_cpp")
    rng = np.random.default_rng(int(qtype) + 100)
    x = np.concatenate([
        (rng.standard_normal((12, 768)) * 0.02).astype(np.float16).astype(np.float32),
        (rng.standard_t(2, (6, 768)) * 0.05).astype(np.float32),
        (rng.standard_normal((6, 768)) * (rng.random((6, 768)) < 0.1)).astype(np.float32),
    ])
    qw = (rng.gamma(0.4, 2.0, 768) * (rng.random(768) < 0.9)).astype(np.float32)
    np.testing.assert_array_equal(quants.quantize(x, qtype, imatrix=qw), make_golden.ggml_quantize_rows(x, qtype, qw))


def test_importance_changes_the_bytes_and_threads_do_not(monkeypatch):
    x = make_golden.edge_case_rows()[:24]
    qw = make_golden.importance_vector("spread", x.shape[1])
    for qtype in (QT.Q4_K, QT.Q5_0):
        weighted = quants.quantize(x, qtype, imatrix=qw)
        assert (weighted != quants.quantize(x, qtype)).any()
        monkeypatch.setattr(quants, "CHUNK_VALUES", 1000)  # several chunks of one row each
        np.testing.assert_array_equal(quants.quantize(x, qtype, threads=3, imatrix=qw), weighted)
        monkeypatch.undo()


def test_importance_must_fit_the_rows():
    with pytest.raises(ValueError, match="512 values for 1 matrices of rows of 256"):
        quants.quantize(np.zeros((4, 256), np.float32), QT.Q4_K, imatrix=np.ones(512, np.float32))


# --------------------------------------------------------------------------------------------- files

@pytest.mark.parametrize("file_type", list(FILE_TYPES))
@pytest.mark.parametrize("model", list(MODELS))
def test_same_file_as_llama_quantize_imatrix(model_dir, tmp_path, monkeypatch, model, file_type):
    out = tmp_path / "out.gguf"
    quantize_with(model_dir, model, out, file_type, monkeypatch)
    expected = GOLDEN["models"][model]["types"][file_type]
    got = quantized_digests(out)
    differing = {n: (got.get(n), e) for n, e in expected["tensors"].items() if got.get(n) != e}
    assert not differing, f"tensors (ours, llama.cpp) differ: {differing}"
    assert set(got) == set(expected["tensors"])
    assert make_golden.file_sha256(out) == expected["file_sha256"]  # metadata, order and padding too


@pytest.mark.parametrize("model", ["k256", "llama256", "w80"])
def test_against_live_llama_quantize_imatrix(tmp_path, monkeypatch, model):
    """A BF16 input and an importance matrix no golden file holds, quantized by both sides."""
    tool = llama_tool("llama-quantize")
    src = tmp_path / "bf16.gguf"
    make_golden.write_test_model(dataclasses.replace(MODELS[model], float_type=QT.BF16), src)
    entries = {name: v[::-1] * np.float32(3.5) for name, v in make_golden.imatrix_entries(src).items()}
    make_golden.write_test_imatrix(entries, tmp_path / IMATRIX)
    for file_type in ("q4_k_m", "q5_0", "q6_k"):
        done = subprocess.run([str(tool), "--imatrix", IMATRIX, "bf16.gguf", "llama.gguf", file_type.upper(), "2"],
                              cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        monkeypatch.chdir(tmp_path)
        quantize_gguf("bf16.gguf", "ours.gguf", file_type, imatrix=IMATRIX)
        assert make_golden.file_sha256(tmp_path / "ours.gguf") == make_golden.file_sha256(tmp_path / "llama.gguf")


def test_q4_0_and_q5_0_give_the_first_ffn_down_a_min_with_an_imatrix():
    """llama-quant.cpp: with an importance matrix, ffn_down of layers i < n_layer/8 becomes Q4_1 (Q5_1)."""
    names = [f"blk.{i}.{kind}.weight" for i in range(16) for kind in ("ffn_down", "ffn_up")]
    infos = [TensorInfo(n, QT.F16, (512, 512)) for n in names]
    for file_type, with_min in (("q4_0", QT.Q4_1), ("q5_0", QT.Q5_1)):
        plan = plan_tensor_types(infos, file_type, 16, has_imatrix=True)
        assert [plan[f"blk.{i}.ffn_down.weight"] for i in range(3)] == [with_min, with_min, FILE_TYPES[file_type].default]
        assert plan["blk.0.ffn_up.weight"] == FILE_TYPES[file_type].default
        assert plan_tensor_types(infos, file_type, 16)["blk.0.ffn_down.weight"] == FILE_TYPES[file_type].default
    assert plan_tensor_types(infos, "q4_k_m", 16, has_imatrix=True) == plan_tensor_types(infos, "q4_k_m", 16)


def test_metadata_records_the_importance_matrix(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "q.gguf"
    quantize_with(model_dir, "k256", out, "q4_0", monkeypatch)
    fields = GGUFReader(out).fields
    keys = [k for k in fields if not k.startswith("GGUF.")]
    assert keys[-6:] == ["general.quantization_version", "general.file_type", "quantize.imatrix.file",
                         "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                         "quantize.imatrix.chunks_count"]
    n_entries = len(make_golden.imatrix_entries(model_dir / "k256.gguf"))
    assert fields["quantize.imatrix.file"].contents() == IMATRIX
    assert fields["quantize.imatrix.dataset"].contents() == make_golden.IMATRIX_DATASET
    assert fields["quantize.imatrix.entries_count"].contents() == n_entries
    assert fields["quantize.imatrix.chunks_count"].contents() == make_golden.IMATRIX_CHUNKS
    assert fields["quantize.imatrix.entries_count"].types == [GGUFValueType.UINT32]

    # values without a file, as llama_model_quantize takes them (the file's sums over its token count, as
    # llama-quantize divides them): the same tensors, and no quantize.imatrix.* keys
    n_tokens = np.float32(make_golden.IMATRIX_CHUNKS * make_golden.IMATRIX_CHUNK_SIZE)
    values = {n: (v * n_tokens) / n_tokens for n, v in make_golden.imatrix_entries(model_dir / "k256.gguf").items()}
    quantize_gguf(model_dir / "k256.gguf", tmp_path / "values.gguf", "q4_0", imatrix=values)
    assert quantized_digests(tmp_path / "values.gguf") == quantized_digests(out)
    assert not [k for k in GGUFReader(tmp_path / "values.gguf").fields if k.startswith("quantize.")]
    info = ImatrixInfo("x" * 300, None, 0)  # long names are cut as llama-quantize's 128-byte buffer cuts them
    assert [k for k, _, _ in info.metadata(9)] == ["quantize.imatrix.file", "quantize.imatrix.entries_count"]
    assert info.metadata(1)[0][1] == b"x" * 127


def test_bad_importance_matrices_are_one_clear_error(model_dir, tmp_path):
    src = model_dir / "w96.gguf"
    entries = make_golden.imatrix_entries(src)
    bad = dict(entries, **{"blk.1.ffn_up.weight": np.full(96, np.nan, np.float32)})
    with pytest.raises(TinyGPTError, match="non-finite value.*blk.1.ffn_up.weight"):
        quantize_gguf(src, tmp_path / "out.gguf", "q4_0", imatrix=bad)
    wrong = dict(entries, **{"blk.2.attn_output.weight": np.ones(128, np.float32)})
    with pytest.raises(TinyGPTError, match="128 values for blk.2.attn_output.weight, which has rows of 96"):
        quantize_gguf(src, tmp_path / "out.gguf", "q4_0", imatrix=wrong)
    assert not list(tmp_path.iterdir())  # no output, no temporary file left behind
    # llama.cpp lets a token embedding with a wrong-sized entry through, quantized without it
    quantize_gguf(src, tmp_path / "out.gguf", "q4_0", imatrix=dict(entries, **{"token_embd.weight": np.ones(3)}))
    with pytest.raises(TinyGPTError, match="importance-matrix file not found"):
        quantize_gguf(src, tmp_path / "out2.gguf", "q4_0", imatrix=tmp_path / "missing.gguf")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_real_llama_imatrix_file_gives_llama_quantizes_bytes(tmp_path, monkeypatch, arch):
    """An importance matrix as llama-imatrix measures it on text (not a synthetic one), on a model whose rows fit
    the K-quants: our file equals llama-quantize's for the K-quant mixes and a legacy type."""
    from builders import corpus, random_gpt, save_tiny_checkpoint, tiny_tokenizer

    from tinygpt.export.gguf_convert import convert_to_gguf
    from tinygpt.export.hf import export_hf

    imatrix_tool, quantize_tool = llama_tool("llama-imatrix"), llama_tool("llama-quantize")
    extra = {} if arch == "gpt2" else dict(arch="llama", n_kv_head=2)
    model = random_gpt(tiny_tokenizer(), n_embd=256, n_layer=2, block_size=32, std=0.1, tie_embeddings=False, **extra)
    export_hf(save_tiny_checkpoint(tmp_path / "model.pt", model, tiny_tokenizer()), tmp_path / "hf")
    convert_to_gguf(tmp_path / "hf", tmp_path / "model-f16.gguf", "f16")
    (tmp_path / "text.txt").write_text(" ".join(corpus(4)), encoding="utf-8")
    done = subprocess.run([str(imatrix_tool), "-m", "model-f16.gguf", "-f", "text.txt", "-o", IMATRIX, "-c", "32",
                           "-b", "32", "--no-ppl", "-t", "1", "--process-output"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    monkeypatch.chdir(tmp_path)
    for file_type in ("q4_k_m", "q6_k", "q4_0"):
        done = subprocess.run([str(quantize_tool), "--imatrix", IMATRIX, "model-f16.gguf", "llama.gguf",
                               file_type.upper(), "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        quantize_gguf("model-f16.gguf", "ours.gguf", file_type, imatrix=IMATRIX)
        assert make_golden.file_sha256(tmp_path / "ours.gguf") == make_golden.file_sha256(tmp_path / "llama.gguf"), \
            file_type

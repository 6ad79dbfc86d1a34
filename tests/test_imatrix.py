"""Importance matrices: our file is llama.cpp's format (llama-quantize accepts it, read_imatrix derives what
llama-quantize derives), our values agree with llama-imatrix on the same f16 file and tokens, and the workflow's
imatrix rule reruns exactly when the model or the calibration text changes."""

from __future__ import annotations

import re
import struct
import subprocess

import gguf
import numpy as np
import pytest
import torch
from builders import corpus, random_gpt, save_tiny_checkpoint, tiny_tokenizer
from llama_tools import llama_tool

from tinygpt.common import TinyGPTError
from tinygpt.export.calibrate import collect_imatrix, covered_matrices, main
from tinygpt.export.gguf_convert import convert_to_gguf
from tinygpt.export.hf import export_hf
from tinygpt.export.imatrix import ImatrixData, load_imatrix, read_imatrix, write_imatrix
from tinygpt.weights.gguf_read import load_gguf

ARCHS = {"gpt2": {}, "llama": dict(arch="llama", n_kv_head=2)}
N_CTX = 32


def calibration_text() -> str:
    # no <|endoftext|>: llama-imatrix tokenizes its text without parsing special tokens
    return " ".join(corpus(4))


@pytest.fixture(scope="module", params=list(ARCHS))
def model_files(tmp_path_factory, request):
    """A random model of each architecture, untied (so that output.weight exists), as a checkpoint and f16 GGUF."""
    tmp = tmp_path_factory.mktemp(f"imatrix-{request.param}")
    tokenizer = tiny_tokenizer()
    model = random_gpt(tokenizer, n_embd=64, block_size=64, std=0.15, tie_embeddings=False, **ARCHS[request.param])
    checkpoint = save_tiny_checkpoint(tmp / "model.pt", model, tokenizer)
    export_hf(checkpoint, tmp / "hf")
    f16 = convert_to_gguf(tmp / "hf", tmp / "model-f16.gguf", "f16")
    text = tmp / "calibration.txt"
    text.write_text(calibration_text(), encoding="utf-8")
    return tmp, checkpoint, f16, text


# ------------------------------------------------------------------------------------------------ file format

def test_written_file_has_llama_imatrix_layout_and_reads_back(tmp_path):
    sums = {"blk.1.ffn_up.weight": np.array([[2.0, 4.0, 6.0]], np.float32),
            "blk.0.attn_q.weight": np.array([[1.0, 0.5, 0.0]], np.float32)}
    counts = {"blk.1.ffn_up.weight": np.array([4]), "blk.0.attn_q.weight": np.array([0])}
    path = tmp_path / "im.gguf"
    write_imatrix(path, ImatrixData(sums, counts, ["train.bin"], 3, 128))
    reader = gguf.GGUFReader(path)
    keys = [f.name for f in reader.fields.values() if not f.name.startswith("GGUF.")]
    assert keys == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("imatrix.chunk_count").types == [gguf.GGUFValueType.UINT32]
    # sorted by name, sums then counts, F32, a dense matrix as one row (ggml drops its trailing dimension of 1)
    assert [(t.name, t.shape.tolist(), t.tensor_type) for t in reader.tensors] == [
        ("blk.0.attn_q.weight.in_sum2", [3], gguf.GGMLQuantizationType.F32),
        ("blk.0.attn_q.weight.counts", [1], gguf.GGMLQuantizationType.F32),
        ("blk.1.ffn_up.weight.in_sum2", [3], gguf.GGMLQuantizationType.F32),
        ("blk.1.ffn_up.weight.counts", [1], gguf.GGMLQuantizationType.F32),
    ]
    values = read_imatrix(path)
    np.testing.assert_array_equal(values["blk.1.ffn_up.weight"], [0.5, 1.0, 1.5])
    np.testing.assert_array_equal(values["blk.0.attn_q.weight"], [1.0, 1.0, 1.0])  # count 0: ones, as llama.cpp


def test_reads_the_legacy_dat_format(tmp_path):
    """llama.cpp's older format stores mean squares times the chunk count (ncall); the importance divides it out."""
    path = tmp_path / "old.dat"
    name = b"blk.0.ffn_down.weight"
    raw = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 5, 2)
    raw += struct.pack("<2f", 10.0, 2.5) + struct.pack("<i", 5) + struct.pack("<i", 9) + b"train.txt"
    path.write_bytes(raw)
    np.testing.assert_allclose(read_imatrix(path)["blk.0.ffn_down.weight"], [2.0, 0.5])
    data = load_imatrix(path)
    assert data.legacy and data.chunk_count == 5 and data.datasets == ["train.txt"]


@pytest.mark.parametrize("content, message", [
    (b"", "neither a GGUF file nor"),
    (struct.pack("<i", 3) + b"xx", "neither a GGUF file nor"),
])
def test_a_damaged_file_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.dat"
    path.write_bytes(content)
    with pytest.raises(TinyGPTError, match=message):
        read_imatrix(path)


def test_a_model_gguf_is_not_an_importance_matrix(model_files):
    _, _, f16, _ = model_files
    with pytest.raises(TinyGPTError, match="lacks the key imatrix.datasets"):
        read_imatrix(f16)


# ------------------------------------------------------------------------------------------------ collecting

def test_sums_are_the_squared_inputs_of_each_matrix(model_files):
    """An independent computation: the inputs of each matrix captured by running the blocks by hand."""
    _, checkpoint, _, _ = model_files
    from tinygpt.model.checkpoint import load_model

    model, tokenizer = load_model(checkpoint)
    tokens = np.array(tokenizer.encode(calibration_text()), dtype=np.int64)
    data = collect_imatrix(model, tokens, n_ctx=N_CTX, chunks=3, process_output=True, show_progress=False)
    assert data.chunk_count == 3 and data.chunk_size == N_CTX
    x_all = {}
    with torch.no_grad():
        for name, module in covered_matrices(model, process_output=True).items():
            captured = []
            handle = module.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
            model(torch.from_numpy(tokens[: 3 * N_CTX]).view(3, N_CTX))
            handle.remove()
            x_all[name] = captured[0].reshape(-1, module.in_features).double()
    assert "output.weight" in x_all and len(x_all) == 1 + model.config.n_layer * (4 if model.config.arch == "gpt2" else 7)
    for name, x in x_all.items():
        assert int(data.counts[name][0]) == 3 * N_CTX
        np.testing.assert_allclose(data.sums[name][0], (x**2).sum(0).numpy(), rtol=1e-5)


def test_calibration_needs_two_chunks(model_files):
    _, checkpoint, _, _ = model_files
    from tinygpt.model.checkpoint import load_model

    model, _ = load_model(checkpoint)
    with pytest.raises(TinyGPTError, match="needs at least 64"):
        collect_imatrix(model, np.zeros(63, dtype=np.int64), n_ctx=N_CTX)


def run_llama_imatrix(f16, text, out, *extra):
    result = subprocess.run(
        [str(llama_tool("llama-imatrix")), "-m", str(f16), "-f", str(text), "-o", str(out), "-c", str(N_CTX),
         "-b", str(N_CTX), "--no-ppl", "-t", "1", *extra],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_values_agree_with_llama_imatrix_on_the_f16_file(model_files):
    """Same f16 file, same tokens, same chunks: the same tensors, counts and chunks, and close sums.

    Our model runs float32 on the f16 weights; llama.cpp's F16 matrix products round their input to f16 first.
    So the inputs of block 0's first matrices (embedding and norm only, no product before them) agree to float
    summation order (measured 3e-6 relative), and every later input carries f16 rounding from the products
    before it: measured at most 1.3e-3 relative (ffn_down, behind the MLP's nonlinearity), required 5e-3."""
    tmp, _, f16, text = model_files
    theirs = run_llama_imatrix(f16, text, tmp / "theirs.gguf", "--process-output")
    ours = tmp / "ours.gguf"
    main(["--gguf", str(f16), "--text", str(text), "--out", str(ours), "--ctx", str(N_CTX), "--process_output"])
    a, b = load_imatrix(ours), load_imatrix(theirs)
    assert sorted(a.sums) == sorted(b.sums)
    assert (a.chunk_count, a.chunk_size, a.datasets) == (b.chunk_count, b.chunk_size, b.datasets)
    for name in b.sums:
        assert a.counts[name].tolist() == b.counts[name].tolist(), name
        first = re.fullmatch(r"blk\.0\.attn_(qkv|q|k|v)\.weight", name)
        np.testing.assert_allclose(a.sums[name], b.sums[name], rtol=1e-5 if first else 5e-3, err_msg=name)
    values_a, values_b = read_imatrix(ours), read_imatrix(theirs)
    for name in values_b:
        np.testing.assert_allclose(values_a[name], values_b[name], rtol=5e-3, err_msg=name)


def test_special_token_text_is_its_token_as_llama_imatrix_parse_special(model_files):
    """`--text` reads <|endoftext|> as its one token, as training tokens hold it; llama-imatrix does so only with
    --parse-special (by default it tokenizes the tag's characters). Measured on a trained gpt2 (400 steps, 60 kB
    of Python docs with 7 tags): against plain llama-imatrix a median 0.5-6% per column, up to 22% over 133
    chunks (blk.0's first matrix included: other tokens, shifted chunks); with --parse-special at most 1.3e-4."""
    tmp, _, f16, _ = model_files
    text = tmp / "documents.txt"
    text.write_text("<|endoftext|>".join(corpus(4)), encoding="utf-8")
    ours = tmp / "ours-special.gguf"
    main(["--gguf", str(f16), "--text", str(text), "--out", str(ours), "--ctx", str(N_CTX)])
    parsed = run_llama_imatrix(f16, text, tmp / "theirs-special.gguf", "--parse-special")
    literal = run_llama_imatrix(f16, text, tmp / "theirs-literal.gguf")
    a, b, c = read_imatrix(ours), read_imatrix(parsed), read_imatrix(literal)
    assert sorted(a) == sorted(b)
    for name in b:
        np.testing.assert_allclose(a[name], b[name], rtol=5e-3, err_msg=name)
    first = "blk.0.attn_qkv.weight" if "blk.0.attn_qkv.weight" in c else "blk.0.attn_q.weight"
    assert not np.allclose(a[first], c[first], rtol=5e-3)  # the text does hold tags that the two readings split


def test_llama_quantize_accepts_our_file(model_files):
    tmp, _, f16, text = model_files
    ours = tmp / "ours-q.gguf"
    main(["--gguf", str(f16), "--text", str(text), "--out", str(ours), "--ctx", str(N_CTX)])
    out = tmp / "quantized.gguf"
    result = subprocess.run([str(llama_tool("llama-quantize")), "--imatrix", str(ours), str(f16), str(out), "Q4_K_M",
                             "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    n_matrices = len(read_imatrix(ours))
    assert f"loaded {n_matrices} importance matrix entries" in result.stdout + result.stderr
    reader = gguf.GGUFReader(out)
    assert reader.get_field("quantize.imatrix.entries_count").contents() == n_matrices


# ------------------------------------------------------------------------------------------------ workflow

IMATRIX = "exports/tinygpt/imatrix.gguf"


@pytest.fixture(scope="module")
def imatrix_project(tmp_path_factory):
    """The tiny pipeline of test_workflow with quantize.imatrix on, built to the quantized file."""
    from test_workflow import TARGET, copy_project, edit_config, snakemake

    workdir = copy_project(tmp_path_factory.mktemp("imatrix-workflow"))
    edit_config(workdir, "quantize", "imatrix", True)
    edit_config(workdir, "quantize", "imatrix_chunks", 4)
    snakemake(workdir, TARGET)
    return workdir


@pytest.fixture
def imatrix_copy(imatrix_project, tmp_path):
    import shutil

    dest = tmp_path / "project"
    shutil.copytree(imatrix_project, dest, symlinks=True, copy_function=shutil.copy2)
    return dest


def stale(workdir) -> set[str]:
    from test_workflow import jobs_that_would_run

    return jobs_that_would_run(workdir)


def test_workflow_quantizes_with_the_imatrix_of_the_training_tokens(imatrix_project):
    from test_workflow import TARGET

    data = load_imatrix(imatrix_project / IMATRIX)
    assert data.datasets == ["data/tokens/train.bin"] and data.chunk_count == 4 and data.chunk_size == 32
    assert (imatrix_project / "logs/imatrix.log").exists() and (imatrix_project / "benchmarks/imatrix.tsv").exists()
    reader = gguf.GGUFReader(imatrix_project / TARGET)
    assert reader.get_field("quantize.imatrix.file").contents() == IMATRIX
    assert stale(imatrix_project) == set()


def test_workflow_file_is_llama_quantizes_with_our_imatrix(imatrix_project):
    """The issue's measure of done: the workflow's q4_k_m file equals llama-quantize --imatrix on our f16 file with
    our importance matrix, byte for byte (run from the project folder, so that the recorded path is the same)."""
    import hashlib

    from test_workflow import TARGET

    out = imatrix_project / "llama-q4_k_m.gguf"
    result = subprocess.run([str(llama_tool("llama-quantize")), "--imatrix", IMATRIX, "exports/tinygpt/model-f16.gguf",
                             out.name, "Q4_K_M", "1"], cwd=imatrix_project, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ours, theirs = gguf.GGUFReader(imatrix_project / TARGET), gguf.GGUFReader(out)
    assert [(t.name, t.tensor_type, bytes(t.data)) for t in ours.tensors] == \
        [(t.name, t.tensor_type, bytes(t.data)) for t in theirs.tensors]
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (imatrix_project / TARGET, out)]
    assert digest[0] == digest[1]


@pytest.mark.parametrize("section, key, value, expected", [
    ("quantize", "pure", True, {"quantize"}),  # a quantizer setting: the importance matrix stays
    ("quantize", "imatrix_chunks", 3, {"imatrix", "quantize"}),
    ("export", "name", "renamed", {"gguf_convert", "imatrix", "quantize"}),  # another model file
    ("encode", "val_fraction", 0.1, {"encode", "train", "export", "gguf_convert", "imatrix", "quantize"}),
])
def test_imatrix_reruns_only_when_the_model_or_the_calibration_text_changes(imatrix_copy, section, key, value,
                                                                            expected):
    from test_workflow import edit_config

    edit_config(imatrix_copy, section, key, value)
    assert stale(imatrix_copy) == expected


def test_imatrix_reruns_when_its_code_changes(imatrix_copy):
    source = imatrix_copy / "tinygpt/export/calibrate.py"
    source.write_text(source.read_text() + "\n# edited\n")
    assert stale(imatrix_copy) == {"imatrix", "quantize"}


def test_without_imatrix_the_quantizer_neither_needs_nor_gets_one(imatrix_copy):
    from test_workflow import TARGET, edit_config, snakemake

    edit_config(imatrix_copy, "quantize", "imatrix", False)
    printed = snakemake(imatrix_copy, "-n", "-p", TARGET).stdout
    assert "--imatrix" not in printed and stale(imatrix_copy) == {"quantize"}

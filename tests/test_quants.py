"""tinygpt.export.quants against llama.cpp's bytes (golden vectors from ggml), gguf-py's exact quantizers, and gguf-py's
K-quant dequantizers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import gguf.quants
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from tinygpt.export import quants

DATA = Path(__file__).parent / "data"
ALL_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K]
K_TYPES = [QT.Q4_K, QT.Q5_K, QT.Q6_K]


def load_make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", Path(__file__).parents[1] / "tools" / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vectors():
    with np.load(DATA / "quant_vectors.npz") as f:
        return {k: f[k] for k in f.files}


def weights(seed: int, rows: int, cols: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) * 0.02
    x[rng.random((rows, cols)) < 0.01] *= 10
    return x.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("columns", [1, 2, 7, 300])
def test_seq_sum_adds_left_to_right(columns):
    # The bit-exactness of every K-quant rests on this: numpy must not sum the rows pairwise.
    terms = (np.random.default_rng(columns).standard_normal((32, columns)) ** 3).astype(np.float32)
    expected = terms[0].copy()
    for row in terms[1:]:
        expected += row
    np.testing.assert_array_equal(quants._seq_sum(terms).view(np.int32), expected.view(np.int32))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matches_ggml_golden_vectors(vectors, qtype):
    ours = quants.quantize(vectors["input"], qtype)
    expected = vectors[qtype.name]
    bad_rows = np.flatnonzero((ours != expected).any(axis=1))
    assert bad_rows.size == 0, f"{qtype.name}: rows {bad_rows.tolist()} differ from ggml"


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q5_1], ids=lambda t: t.name)
def test_matches_gguf_py_exact_quantizers(qtype):
    x = weights(1, 64, 512)
    x[3] = 0.0  # (not -0.0: gguf-py then stores d = -0.0 where ggml stores +0.0; the golden vectors cover it)
    x[7] = np.round(x[7] * 256) / 256  # rounding ties
    np.testing.assert_array_equal(quants.quantize(x, qtype), gguf.quants.quantize(x, qtype))


@pytest.mark.parametrize("qtype,max_rel_rms", [(QT.Q4_K, 0.12), (QT.Q5_K, 0.06), (QT.Q6_K, 0.03)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_k_quant_round_trip_with_gguf_py_dequantize(qtype, max_rel_rms):
    x = weights(2, 32, 1024)
    q = quants.quantize(x, qtype)
    back = gguf.quants.dequantize(q, qtype)
    assert back.shape == x.shape
    rel_rms = np.sqrt(np.mean((back - x) ** 2) / np.mean(x ** 2))
    assert rel_rms < max_rel_rms
    # quantizing what we dequantized lands on (nearly) the same grid: the scales and layout agree
    again = gguf.quants.dequantize(quants.quantize(back, qtype), qtype)
    assert np.sqrt(np.mean((again - back) ** 2) / np.mean(back ** 2)) < max_rel_rms / 4


def test_zero_tensor_round_trips_to_zero():
    x = np.zeros((2, 512), np.float32)
    for qtype in ALL_TYPES:
        assert not gguf.quants.dequantize(quants.quantize(x, qtype), qtype).any()


def test_threads_and_chunks_do_not_change_bytes(monkeypatch):
    x = weights(3, 40, 768)
    single = quants.quantize(x, QT.Q4_K)
    monkeypatch.setattr(quants, "CHUNK_VALUES", 1000)  # several chunks of a few rows each
    np.testing.assert_array_equal(quants.quantize(x, QT.Q4_K, threads=3), single)


def test_keeps_leading_shape_and_rejects_bad_rows():
    x = weights(4, 6, 256).reshape(2, 3, 256)
    assert quants.quantize(x, QT.Q6_K).shape == (2, 3, 210)
    assert quants.quantize(x, QT.F16).dtype == np.float16
    with pytest.raises(ValueError, match="not a multiple"):
        quants.quantize(np.zeros((2, 96), np.float32), QT.Q4_K)
    with pytest.raises(ValueError, match="supported"):
        quants.quantize(x, QT.IQ2_XS)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matches_live_ggml_on_fresh_data(qtype):
    """With llama-cpp-python installed, compare against ggml itself on data no golden file fixed."""
    pytest.importorskip("llama_cpp")
    make_golden = load_make_golden()
    rng = np.random.default_rng(int(qtype))
    x = np.concatenate([
        weights(5, 16, 512),
        (rng.standard_t(2, (8, 512)) * 0.05).astype(np.float32),
        (rng.standard_normal((8, 512)) * (rng.random((8, 512)) < 0.1)).astype(np.float32),
        rng.uniform(-3, 3, (8, 512)).astype(np.float32),
    ])
    np.testing.assert_array_equal(quants.quantize(x, qtype), make_golden.ggml_quantize_rows(x, qtype))

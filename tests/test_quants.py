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


def test_fp16_rows_widen_to_float32_exactly():
    # every fp16 bit pattern (subnormals, zeros, infinities, NaNs) against numpy's own conversion
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(256, 256)
    np.testing.assert_array_equal(quants._widen(every).view(np.uint32), every.astype(np.float32).view(np.uint32))
    finite = every[np.isfinite(every)]  # the fast path, without the fallback infinities take
    np.testing.assert_array_equal(quants._widen(finite).view(np.uint32), finite.astype(np.float32).view(np.uint32))


def test_signed_peak_is_the_first_largest_magnitude():
    # make_qx_quants' scan keeps the first value whose magnitude beats all before it (+0.0 if none does); small
    # integers give many columns whose extremes are +a and -a, where only the order decides
    rng = np.random.default_rng(7)
    x = np.round(rng.standard_normal((16, 500)) * 3).astype(np.float32)
    x[:, 0], x[:, 1], x[::2, 2] = 0.0, -0.0, -0.0
    expected = []
    for column in x.T:
        amax = peak = np.float32(0)
        for v in column:
            if abs(v) > amax:
                amax, peak = abs(v), v
        expected.append(peak)
    np.testing.assert_array_equal(quants._signed_peak(x).view(np.int32), np.array(expected, np.float32).view(np.int32))


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


# --------------------------------------------------------------------------------- roundings just below one half
# Byte identity with ggml rests on rounding exactly as its C code does, and random data, golden vectors and ties
# almost never reach the values where roundings part ways: a float32 value just below one half (0.5 - 2**-25, where
# float32 `v + 0.5` is 1.0), exact ties (ggml's nearest_int is round-half-even, roundf rounds half away from zero)
# and a float32 sum that carries (`x + 8.5f` in Q4_0). The blocks below are built so that each rounding of
# quants.py meets those values, and each test checks the answer that ggml's C semantics give (worked out in the
# comments, so the test fails without llama.cpp too) and, where llama-cpp-python is installed, ggml's own bytes.

F32 = np.float32
BELOW_HALF = np.nextafter(F32(0.5), F32(0))  # 0.5 - 2**-25: float32 `v + 0.5` rounds up to 1.0


def check_live_ggml(x: np.ndarray, qtype) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        return  # the known answers above still ran
    np.testing.assert_array_equal(quants.quantize(x, qtype), load_make_golden().ggml_quantize_rows(x, qtype))


def f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<f2").astype(F32).reshape(-1)


def nibbles_32(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 4-bit values (value j in the low nibble of byte j, value j+16 in the high one)."""
    return np.concatenate([qs & 15, qs >> 4])


def high_bits_32(qh: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(qh).view("<u4")[0] >> np.arange(32, dtype=np.uint32)) & 1


def test_q8_0_rounds_half_away_from_zero_and_below_half_down():
    # d = 127/127 = 1 and 2**-7 (amax 127/128): x/d is exact, so q = roundf(x/d) with C's roundf
    values = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, BELOW_HALF, -BELOW_HALF, np.nextafter(F32(1.5), F32(0)),
              np.nextafter(F32(0.5), F32(1)), 0.25]
    expected = [1, -1, 2, -2, 3, -3, 127, 0, 0, 1, 1, 0]
    rows = []
    for scale in (F32(1), F32(2 ** -7)):
        block = np.zeros(32, F32)
        block[0] = 127 * scale
        block[1:1 + len(values)] = np.array(values, F32) * scale
        rows.append(block)
    # d = 2051/2048 lies halfway between two fp16 values: GGML_FP32_TO_FP16 rounds to the even one, 2052/2048
    tie_d = np.zeros(32, F32)
    tie_d[0] = F32(127 * 2051 / 2048)
    x = np.stack(rows + [tie_d])
    out = quants.quantize(x, QT.Q8_0)
    d = f16(out[:, :2])
    assert d.tolist() == [1.0, 2 ** -7, 2052 / 2048]
    q = out[:, 2:].view(np.int8)
    for row in (0, 1):
        assert q[row, 0] == 127 and q[row, 1:1 + len(values)].tolist() == expected
    check_live_ggml(x, QT.Q8_0)


def test_q4_0_and_q5_0_round_like_the_float32_sum_in_c():
    # q = MIN(qmax, (int8_t)(x/d + offset)) with the sum in float32; d = max/-8 (Q4_0) or max/-16 (Q5_0) = 1 here
    # because the block starts with -8 (-16). offset 8.5: 0.5 - 2**-21 + 8.5 = 9 - 2**-21 is a tie between two
    # float32 values and rounds to the even 9.0, so ggml stores 9 where exact arithmetic gives 8; -0.5 - 2**-22
    # gives 8 - 2**-22, a tie that rounds to 8.0 (exact: 7); 0.5 - 2**-25 rounds up to 9 as well; the value +8
    # gives 16.5 -> 16 -> MIN 15.
    cases = {
        QT.Q4_0: (8, 15, [(0.5 - 2 ** -21, 9), (0.5 - 2 ** -20, 8), (-0.5 - 2 ** -22, 8), (-0.5 - 2 ** -21, 7),
                          (8.0, 15), (-0.5, 8), (BELOW_HALF, 9), (7.4999995, 15)]),
        QT.Q5_0: (16, 31, [(0.5 - 2 ** -20, 17), (0.5 - 2 ** -19, 16), (-0.5 - 2 ** -21, 16), (-0.5 - 2 ** -20, 15),
                           (16.0, 31), (-0.5, 16), (BELOW_HALF, 17), (14.499999, 31)]),
    }
    for qtype, (half_range, qmax, pairs) in cases.items():
        block = np.zeros(32, F32)
        block[0] = -half_range
        block[1:1 + len(pairs)] = [v for v, _ in pairs]
        x = block[None]
        out = quants.quantize(x, qtype)[0]
        assert f16(out[:2])[0] == 1.0
        q = nibbles_32(out[-16:]) | (high_bits_32(out[2:6]) << 4 if qtype == QT.Q5_0 else 0)
        assert q[0] == 0 and q[1:1 + len(pairs)].tolist() == [e for _, e in pairs], qtype.name
        check_live_ggml(x, qtype)


def test_q5_1_rounds_with_the_float32_sum_half_up():
    # min 0, max 31: d = 1, q = (int8_t)((x - min)/d + 0.5f). Here float32 rounds 0.5 - 2**-25 up to 1 (ggml
    # stores 1), and ties go up: 2.5 -> 3 (round-half-even would give 2).
    pairs = [(BELOW_HALF, 1), (0.5 - 2 ** -24, 0), (2.5, 3), (1.5, 2), (30.5, 31), (0.5, 1)]
    block = np.zeros(32, F32)
    block[1] = 31
    block[2:2 + len(pairs)] = [v for v, _ in pairs]
    x = block[None]
    out = quants.quantize(x, QT.Q5_1)[0]
    assert f16(out[:4]).tolist() == [1.0, 0.0]
    q = nibbles_32(out[-16:]) | (high_bits_32(out[4:8]) << 4)
    assert q[:2].tolist() == [0, 31] and q[2:2 + len(pairs)].tolist() == [e for _, e in pairs]
    check_live_ggml(x, QT.Q5_1)


def on_grid(scale, low, levels: int) -> np.ndarray:
    """32 values low + scale*L for L = 0..levels-1 repeated: make_qkx2_quants fits them with zero error, so its
    scale and min are exactly `scale` and -low (checked below with the C formulas of its first fit)."""
    L = np.resize(np.arange(levels, dtype=F32), 32)
    x = (F32(scale) * L + F32(low)).astype(F32)
    nmax = F32(levels - 1)
    iscale = nmax / (x.max() - min(F32(low), F32(0)))
    assert F32(1) / iscale == F32(scale) and (np.rint(iscale * (x - F32(low))) == L).all()  # exact fit
    return x


def tie_operand(target: float, factor: float) -> np.float32:
    """A float32 v with float32 factor*v exactly `target` (searched among the neighbours of target/factor)."""
    v = F32(target / factor)
    for step in range(-8, 9):
        u = v
        for _ in range(abs(step)):
            u = np.nextafter(u, F32(np.sign(step)))
        if F32(factor) * u == F32(target):
            return u
    raise AssertionError(f"no float32 v with {factor}*v == {target}")


def k_quant_fields(row: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One Q4_K/Q5_K block -> (d, dmin, [(ls, lm)] * 8, the 256 values L), read as ggml's get_scale_min_k4 does."""
    d, dmin = f16(row[0:4])
    s = row[4:16]
    ls = [s[j] & 63 if j < 4 else (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4) for j in range(8)]
    lm = [s[j + 4] & 63 if j < 4 else (s[j + 4] >> 4) | ((s[j] >> 6) << 4) for j in range(8)]
    qs = row[-128:].reshape(4, 32)
    L = np.stack([qs & 15, qs >> 4], axis=1).reshape(256).astype(np.int64)
    if qtype == QT.Q5_K:
        qh = row[16:48].astype(np.int64)
        L |= (((qh[None, :] >> np.arange(8)[:, None]) & 1) << 4).reshape(256)
    return d, dmin, np.array([ls, lm]).T, L


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K], ids=lambda t: t.name)
def test_k_quant_scales_mins_and_values_round_half_to_even(qtype):
    # Sub-block 0 spans 2**-6 with min -2**-6: the largest scale and min, so inv_scale = inv_min = 63/2**-6 = 4032
    # exactly, and each other sub-block's 6-bit scale and min is nearest_int(4032 * its exact scale or min).
    levels = 16 if qtype == QT.Q4_K else 32
    t = lambda target: tie_operand(target, 4032)
    subs = [  # (scale, min) -> (ls, lm) under nearest_int (round half to even; 0.5 - 2**-25 goes down)
        ((2 ** -6, 2 ** -6), (63, 63)),
        ((t(0.5), t(2.5)), (0, 2)),
        ((t(4.5), t(BELOW_HALF)), (4, 0)),
        ((t(BELOW_HALF), t(4.5)), (0, 4)),
        ((t(48.5), t(0.5)), (48, 0)),
        ((2 ** -10, t(62.5)), (4, 62)),
    ]
    blocks = [on_grid(scale, -low, levels) for (scale, low), _ in subs]
    # Sub-blocks 6 and 7 have scale 3*d (d = the stored fp16 of 2**-6/63) and min 0, so values re-quantize as
    # nearest_int(x/(3*d)). Sub-block 6 holds one value just below half a step: 0.5 - 2**-25 goes to 0.
    # Sub-block 7 is the grid 1.125*3*d*L: x/(3*d) = 1.125*L exactly, a tie for L = 4, 12, 20, 28 (half to even).
    d16 = F32(np.float16(F32(2 ** -6) / F32(63)))
    step = F32(3) * d16
    near_half = on_grid(3 * 2 ** -12, 0.0, levels)
    near_half[1] = np.nextafter(F32(0.5) * step, F32(0))
    assert near_half[1] / step == BELOW_HALF
    ties = on_grid(F32(1.125) * step, 0.0, levels)
    x = np.concatenate(blocks + [near_half, ties])[None]

    d, dmin, scales_mins, L = k_quant_fields(quants.quantize(x, qtype)[0], qtype)
    assert d == dmin == d16
    assert scales_mins.tolist() == [list(e) for _, e in subs] + [[3, 0], [3, 0]]
    L = L.reshape(8, 32)
    grid = np.resize(np.arange(levels), 32)
    assert L[0].tolist() == grid.tolist()  # (x + 63*dmin)/(63*d) = L within 2**-8 of a step
    assert L[1].tolist() == grid.tolist() and L[3].tolist() == grid.tolist()  # ls = 0: the search's own L
    assert L[6, 1] == 0
    assert L[7].tolist() == [min(levels - 1, round(1.125 * v)) for v in grid]  # Python's round: half to even
    check_live_ggml(x, qtype)


def test_q6_k_scales_and_values_round_half_to_even():
    # Each 16-value sub-block is c*2**-e * (-32, 16, -16, 8, 0, ...): make_qx_quants finds l exactly and its
    # sums are exact in float32, so its scale is exactly c*2**-e. Sub-block 0 has the largest (2**-4):
    # iscale = -128/2**-4 = -2048, d = -2**-11, and scale byte j = nearest_int(-2048 * scale_j).
    pattern = np.array([-32, 16, -16, 8] + [0] * 12, F32)
    subs = [((1, 4), -128), ((5, 12), -2), ((7, 12), -4), ((1, 12), 0), ((1, 5), -64)]  # -2.5, -3.5, -0.5: ties
    blocks = [pattern * F32(c * 2.0 ** -e) for (c, e), _ in subs]
    # Sub-block 4 (scale byte -64: d*sc = 2**-5) re-quantizes values at k + 0.5 steps and one just below half.
    specials = {4: (2.5, 34), 5: (-2.5, 30), 6: (BELOW_HALF, 32), 7: (-3.5, 28), 8: (0.5, 32)}
    for i, (v, _) in specials.items():
        blocks[4][i] = F32(v) * F32(2 ** -5)
    x = np.concatenate(blocks + [np.zeros(16 * 11, F32)])[None]

    row = quants.quantize(x, QT.Q6_K)[0]
    assert f16(row[208:210])[0] == -(2 ** -11)
    assert row[192:208].view(np.int8)[:5].tolist() == [e for _, e in subs]
    ql, qh = row[:128].astype(np.int64).reshape(2, 2, 32), row[128:192].astype(np.int64).reshape(2, 32)
    L = np.stack([(ql[:, 0] & 15) | (qh & 3) << 4, (ql[:, 1] & 15) | (qh >> 2 & 3) << 4,
                  (ql[:, 0] >> 4) | (qh >> 4 & 3) << 4, (ql[:, 1] >> 4) | (qh >> 6 & 3) << 4], axis=1).reshape(16, 16)
    assert L[0].tolist() == (pattern + 32).astype(int).tolist()  # x/(d*sc) = l exactly
    assert L[3].tolist() == (pattern + 32).astype(int).tolist()  # scale byte 0: the search's own L
    assert {i: int(L[4, i]) for i in specials} == {i: e for i, (_, e) in specials.items()}
    check_live_ggml(x, QT.Q6_K)

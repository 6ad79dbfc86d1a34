"""GGUF block quantizers in numpy, bit-exact with llama.cpp's (ggml-quants.c), with and without an importance matrix.

Every quantizer works on all blocks of a chunk of rows at once. The searches (`make_qkx2_quants`,
`make_qx_quants`, `make_qp_quants`) keep their values element-major, shape (elements per sub-block,
sub-blocks), so a sum over a sub-block is a reduction over axis 0: numpy adds the rows one after another, which
is exactly the left-to-right float32 accumulation of the C loops (a reduction over the contiguous axis would be
pairwise and differ in the last bits). All arithmetic stays float32 in the C order of operations; numpy never
fuses a multiply-add, and neither does ggml's portable build. See docs/gguf.md#bit-exact-quantizers for the
reference algorithms and docs/gguf.md#quantizing-with-an-importance-matrix for the weighted ones.

Public entry point: `quantize(data, qtype, imatrix=...)`, returning bytes shaped like `gguf.quants.quantize`
does, so the result goes straight into `gguf.GGUFWriter.add_tensor(..., raw_dtype=qtype)`. Without an importance
matrix each type runs ggml's `quantize_row_*_ref` path; with one (the mean square of each input column's
activation), the `quantize_row_*_impl` path llama-quantize --imatrix runs. Q8_0 ignores it, as ggml does.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tinygpt.common import set_malloc

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
F32 = np.float32
MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: ggml's nearest_int adds it to round through the float32 mantissa

# Rows are quantized in chunks of about this many values: large enough to amortize numpy's per-call cost,
# small enough that the working arrays of the K-quant search (a few MB) stay in the CPU caches.
CHUNK_VALUES = 1 << 18

Weights = Optional[np.ndarray]  # per-column importance of one row (n_per_row,), or None for the reference path


def _seq_sum(terms: np.ndarray) -> np.ndarray:
    """Sum float32 `terms` of shape (n, columns) over axis 0, strictly left to right, one result per column."""
    if terms.shape[1] > 1:
        return np.add.reduce(terms, axis=0)  # row by row: sequential (checked in tests)
    return np.add.accumulate(terms[:, 0])[-1:]  # a single column would be summed pairwise as one contiguous run


def _row_seq_sum(terms: np.ndarray) -> np.ndarray:
    """Sum float32 `terms` of shape (rows, n) along each row, strictly left to right: `_seq_sum` of the
    transpose (a copy, ~2 ns a value here, where np.add.accumulate along the rows runs a scalar loop at ~4)."""
    return _seq_sum(np.ascontiguousarray(terms.T))


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even (the float32 magic-number trick), as float32; |v| < 2**22."""
    return np.rint(v)


def _nearest_int_bits(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int bit for bit, also outside |v| < 2**22 where it returns garbage (int64): needed where C
    divides by a sum that can be tiny (make_qp_quants)."""
    return ((np.asarray(v, F32) + MAGIC).view(np.int32) & 0x7FFFFF).astype(np.int64) - 0x400000


def _fp16(v: np.ndarray) -> np.ndarray:
    """Round to fp16 like GGML_FP32_TO_FP16 (nearest even) and back to float32."""
    return v.astype(np.float16).astype(F32)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """(n,) float32 -> (n, 2) little-endian fp16 bytes."""
    return v.astype("<f2").view(np.uint8).reshape(-1, 2)


_F16_SCALE = np.float32(2.0 ** 112)  # float32 exponent bias 127 minus fp16's 15
_F16_KEEP = np.int32(-0x70002000)  # 0x8FFFE000: the sign and the 15 bits below it, shifted into float32 place


def _widen(rows: np.ndarray) -> np.ndarray:
    """rows as contiguous float32, fp16 converted exactly as numpy (and ggml) do, in four passes instead of
    numpy's scalar conversion loop (~3 ns a value here): an fp16's bits shifted left by 13 are a float32 2**112
    times smaller (subnormals included), so a multiply by 2**112 finishes it. Infinities and NaNs, which that
    leaves finite (at least 2**16 in magnitude), are left to numpy."""
    if rows.dtype != np.float16:
        return np.ascontiguousarray(rows, dtype=F32)
    bits = np.ascontiguousarray(rows).view(np.int16).astype(np.int32)  # sign-extended: bit 31 is the sign
    np.left_shift(bits, 13, out=bits)
    np.bitwise_and(bits, _F16_KEEP, out=bits)
    out = bits.view(F32)
    out *= _F16_SCALE
    if out.size and (out.max() >= 65536 or out.min() <= -65536):
        return rows.astype(F32)
    return out


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=F32).reshape(-1, size)


def _element_major(x: np.ndarray, size: int) -> np.ndarray:
    """Rows cut into sub-blocks of `size` values -> (size, sub-blocks): value l of every sub-block in row l.
    Transposed 1024 sub-blocks at a time, which keeps both sides of each copy in the CPU caches (about 0.9 ns a
    value here against 1.4 for the whole chunk at once)."""
    blocks = np.asarray(x, F32).reshape(-1, size)
    out = np.empty((size, len(blocks)), F32)
    for start in range(0, len(blocks), 1024):
        np.copyto(out[:, start:start + 1024], blocks[start:start + 1024].T)
    return out


def _importance_columns(qw: np.ndarray, size: int, n_rows: int) -> np.ndarray:
    """One row's importance (n_per_row,) laid out like `_element_major` of `n_rows` rows."""
    return np.tile(np.asarray(qw, F32).reshape(-1, size).T, (1, n_rows))


def _first_equal(x: np.ndarray, key: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per column of x (n, columns): x in the first row where key equals target (a reduction of key, so some row
    does). Walked row by row, backwards, so that the first match is written last: argmin/argmax along axis 0
    walk strided memory, and along the short rows of the transpose pay per row, both ~10x slower."""
    out = x[-1]
    for i in range(len(x) - 2, -1, -1):
        out = _where(key[i] == target, x[i], out)
    return out


def _first_extreme(x: np.ndarray, reduce: np.ufunc) -> np.ndarray:
    """The min (np.minimum) or max of each column of x, the first occurrence on ties: the sign of a zero reaches
    the bytes."""
    return _first_equal(x, x, reduce.reduce(x, axis=0))


def _mask(cond: np.ndarray) -> np.ndarray:
    """A boolean array as int32 -1 (True) / 0 (False), for `_select`."""
    m = cond.view(np.int8).astype(np.int32)
    return np.negative(m, out=m)


def _select(mask: np.ndarray, a, b) -> np.ndarray:
    """np.where(cond, a, b) for float32 values, bit for bit, with mask = _mask(cond): three bitwise passes.
    np.where branches on every element, and on random conditions that costs ~40 ns an element on this kind of
    machine, more than all the arithmetic of a search step."""
    ai = np.asarray(a, F32).view(np.int32)
    bi = np.asarray(b, F32).view(np.int32)
    out = np.bitwise_xor(ai, bi)
    out &= mask
    out ^= bi
    return out.view(F32)


def _where(cond: np.ndarray, a, b) -> np.ndarray:
    """np.where(cond, a, b) for float32 values, without branches (see `_select`)."""
    return _select(_mask(cond), a, b)


# ----------------------------------------------------------------------------------------------- 32-value types

def _block_reduce(blocks: np.ndarray, op: np.ufunc) -> np.ndarray:
    """op (np.maximum, np.minimum) over each row of blocks (n, 2^k), as a tree of 1-D strided halvings: a
    reduction along short rows pays numpy's per-row cost (~50 ns a row), this pays none. Max and min are exact
    in any order (signed zeros aside: Q8_0 takes it of absolute values)."""
    flat = blocks.reshape(-1)
    for _ in range(blocks.shape[1].bit_length() - 1):
        flat = op(flat[0::2], flat[1::2])
    return flat


def _absmax_signed(blocks: np.ndarray) -> np.ndarray:
    """The value with the largest magnitude in each block (the first one on ties), as ggml picks it.

    The argmax runs on the magnitudes' bits as int32, which order like the magnitudes and take numpy's faster
    integer argmax. An all-zero block gives +0.0 even if it holds -0.0: the C loop starts from 0.0f and never
    replaces it.
    """
    first = np.bitwise_and(blocks.view(np.int32), np.int32(0x7FFFFFFF)).argmax(axis=1)
    first += np.arange(0, blocks.size, blocks.shape[1], dtype=first.dtype)
    peak = blocks.reshape(-1)[first]
    peak += F32(0)  # -0.0 + 0.0 is +0.0; every other value stays as it is
    return peak


def _first_extremes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) of each block, the first occurrence on ties: the sign of a zero reaches the stored bytes."""
    rows = np.arange(len(blocks))
    return blocks[rows, blocks.argmin(axis=1)], blocks[rows, blocks.argmax(axis=1)]


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    """1/d, and 0 where d is 0 (ggml's `id = d ? 1.0f/d : 0.0f`)."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0)).astype(F32)


def _legacy_blocks(q: np.ndarray, *fields: np.ndarray) -> np.ndarray:
    """(n, 32) quants and the block's leading fields (each n values of 2 or 4 bytes, e.g. fp16 d, m and the u32
    of high bits) -> (n, fields + 16) bytes: the fields, then 16 bytes holding value j in the low nibble of byte j
    and value j+16 in the high one (bits above the fourth are dropped). The weighted paths pass their quants as
    the search leaves them, element-major (32, blocks per row, rows), and fields shaped (rows, blocks per row).

    Numpy pays per row for anything shaped (blocks, a few bytes), so the nibbles are packed by one contiguous pass
    over uint64 words of the whole chunk (values below 16 shifted left by 4 inside a word stay in their byte)
    into the second half of 32-byte rows, the fields are written just before them as strided words, and the rows'
    tail is returned as a view: the one per-row copy left is the caller's concatenation of chunks."""
    n = len(q) if q.ndim == 2 else q.shape[1] * q.shape[2]
    rows = np.empty((n, 4), "<u8")
    row_bytes = rows.view(np.uint8)
    if q.ndim == 3:  # element-major: pack (16, blocks per row, rows) there, then transpose 16 bytes a block
        packed = (q[:16] & np.uint8(15)) | (q[16:] << np.uint8(4))
        row_bytes.reshape(q.shape[2], q.shape[1], 32)[:, :, 16:] = packed.transpose(2, 1, 0)
    else:
        words = np.ascontiguousarray(q, dtype=np.uint8).view("<u8").reshape(-1)  # values 0-7, 8-15, 16-23, 24-31
        nibbles = np.uint64(0x0F0F0F0F0F0F0F0F)
        flat = rows.reshape(-1)
        np.bitwise_and(words[2:], nibbles, out=flat[2:])
        flat[2:] <<= np.uint64(4)
        flat[2:] |= words[:-2] & nibbles  # word 4k+2 (4k+3) = values 0-7 (8-15) | values 16-23 (24-31) << 4
    start = 16
    for field in reversed(fields):
        start -= field.itemsize
        row_bytes.view(field.dtype)[:, start // field.itemsize] = field.reshape(-1)
    return row_bytes[:, start:]


def _high_bits_32(q: np.ndarray) -> np.ndarray:
    """(n, 32) 5-bit values -> (n,) little-endian u32 holding bit 4 of value j at bit j; element-major (32, blocks
    per row, rows) -> (rows, blocks per row), as `_legacy_blocks` takes them."""
    if q.ndim == 3:
        packed = np.packbits(q >> np.uint8(4), axis=0, bitorder="little")  # (4, ...): byte k of each u32
        return np.ascontiguousarray(packed.transpose(2, 1, 0)).view("<u4")[..., 0]
    return np.packbits(np.ascontiguousarray(q >> 4, np.uint8).reshape(-1), bitorder="little").view("<u4")


def _f16(v: np.ndarray) -> np.ndarray:
    """(n,) float32 -> (n,) little-endian fp16 (for `_legacy_blocks`)."""
    return v.astype("<f2")


def _legacy_weights(rows: np.ndarray, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, w) element-major over 32-value blocks, w = qw * sqrt(sigma2 + x^2) with the row's sigma2 (its mean
    square, sum_x2 / n_per_row), both (32, blocks per row * rows): the columns go block by block, each across
    the rows (column b * rows + r: block b of row r).

    That order comes from one transpose of the rows, which both sums each row's squares left to right (a
    reduction over its first axis) and, reordered without moving values within a row of it, gives the blocks
    element-major."""
    rows = np.asarray(rows, F32).reshape(-1, rows.shape[-1])
    n_rows, n = rows.shape
    by_column = np.ascontiguousarray(rows.T)  # (n, rows): value k of every row
    sigma2 = _seq_sum(by_column * by_column) / F32(n)
    xs = np.ascontiguousarray(by_column.reshape(n // 32, 32, n_rows).transpose(1, 0, 2))  # (32, blocks, rows)
    w = xs * xs
    w += sigma2
    np.sqrt(w, out=w)
    w *= np.asarray(qw, F32).reshape(n // 32, 32).T[:, :, None]
    return xs.reshape(32, -1), w.reshape(32, -1)


def _by_row(q: np.ndarray, n_rows: int) -> np.ndarray:
    """Element-major (32, blocks per row * rows) in `_legacy_weights`' column order -> (32, blocks per row,
    rows), as `_legacy_blocks` takes it."""
    return q.reshape(len(q), -1, n_rows)


def _per_block(v: np.ndarray, n_rows: int) -> np.ndarray:
    """One value per column of `_legacy_weights` -> (rows, blocks per row): row-major block order."""
    return v.reshape(-1, n_rows).T


# The largest float32 below 0.5. trunc(v + copysign(0.5, v)) is not roundf: for v = 0.49999997 the sum rounds
# up to 1. Adding this instead rounds every |v| < 2**23 as roundf does (ties away from zero): the sum of a
# value below a tie stays below the next integer, and a tie's sum rounds up to it (checked against exact
# rounding on every float32 near each tie up to 128; the golden vectors hold ties too).
_JUST_BELOW_HALF = np.nextafter(np.float32(0.5), np.float32(0))


def quantize_q8_0(x: np.ndarray, qw: Weights = None) -> np.ndarray:
    """Q8_0: per 32 values d = max|x|/127 (fp16) and int8 q = roundf(x/d), half away from zero. ggml ignores qw."""
    b = _blocks(x, 32)
    d = _block_reduce(np.abs(b), np.maximum) / F32(127)
    v = b * _safe_inverse(d)[:, None]
    v += np.copysign(_JUST_BELOW_HALF, v)
    return np.concatenate([_f16_bytes(d), v.astype(np.int8).view(np.uint8)], axis=1)  # the cast truncates


def _offset_trunc(b: np.ndarray, d: np.ndarray, offset: float, top: int) -> np.ndarray:
    """The reference Q4_0/Q5_0 quants: MIN(top, (int8_t)(x/d + offset)), the sum >= 0 so a truncating cast.
    |x/d| is at most (top + 1)/2 up to rounding, so the cast gives at most top + 1, and MIN subtracts the bit above top."""
    v = b * _safe_inverse(d)[:, None]
    v += F32(offset)
    q = v.astype(np.uint8)
    q -= q >> top.bit_length()
    return q


def _quantize_qx_0(x: np.ndarray, qw: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q4_0_impl / q5_0_impl: make_qx_quants per block with the row's weights; (d as float32,
    L as uint8, nmax + l, element-major (32, blocks per row, rows); d (rows, blocks per row)). The quants come from the search itself, not requantized with fp16(d)."""
    xs, w = _legacy_weights(x, qw)
    iscale, scale, zero = _make_qx_quants(xs, w, nmax)
    n_rows = x.size // x.shape[-1]
    return _per_block(scale, n_rows), _by_row(_qx_levels(xs, iscale, zero, nmax).astype(np.uint8), n_rows)


def quantize_q4_0(x: np.ndarray, qw: Weights = None) -> np.ndarray:
    """Q4_0: d = max/-8 for the signed absolute maximum; q = min(15, trunc(x/d + 8.5)); weighted: a search."""
    if qw is not None:
        d, q = _quantize_qx_0(x, qw, 8)
    else:
        b = _blocks(x, 32)
        d = _absmax_signed(b) / F32(-8)
        q = _offset_trunc(b, d, 8.5, 15)
    return _legacy_blocks(q, _f16(d))


def quantize_q5_0(x: np.ndarray, qw: Weights = None) -> np.ndarray:
    """Q5_0: d = max/-16 for the signed absolute maximum; q = min(31, trunc(x/d + 16.5)), bit 4 apart."""
    if qw is not None:
        d, q = _quantize_qx_0(x, qw, 16)
    else:
        b = _blocks(x, 32)
        d = _absmax_signed(b) / F32(-16)
        q = _offset_trunc(b, d, 16.5, 31)
    return _legacy_blocks(q, _f16(d), _high_bits_32(q))


def _min_max_ref(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference Q4_1/Q5_1: d = (max - min)/nmax, m = min, and (x - min)/d + 0.5 (which C truncates)."""
    b = _blocks(x, 32)
    lo, hi = _first_extremes(b)
    d = (hi - lo) / F32(nmax)
    return d, lo, (b - lo[:, None]) * _safe_inverse(d)[:, None] + F32(0.5)


def _quantize_qx_1(x: np.ndarray, qw: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q4_1_impl / q5_1_impl: make_qkx3_quants per block with the row's weights; (d, m, L uint8,
    shaped as in _quantize_qx_0)."""
    xs, w = _legacy_weights(x, qw)
    L, scale, the_min = _make_qkx_quants(xs, w, nmax, -0.9, 0.05, 36)
    n_rows = x.size // x.shape[-1]
    return _per_block(scale, n_rows), _per_block(-the_min, n_rows), _by_row(L.astype(np.uint8), n_rows)


def quantize_q4_1(x: np.ndarray, qw: Weights = None) -> np.ndarray:
    """Q4_1: d = (max - min)/15, m = min; q = min(15, trunc((x - min)/d + 0.5)). llama-quantize uses it only with
    an importance matrix (the first ffn_down layers of a Q4_0 file)."""
    if qw is not None:
        d, lo, q = _quantize_qx_1(x, qw, 15)
    else:
        d, lo, v = _min_max_ref(x, 15)
        q = np.minimum(15, np.trunc(v).astype(np.int8)).astype(np.uint8)
    return _legacy_blocks(q, _f16(d), _f16(lo))


def quantize_q5_1(x: np.ndarray, qw: Weights = None) -> np.ndarray:
    """Q5_1: d = (max - min)/31, m = min; q = trunc((x - min)/d + 0.5) (llama.cpp's fallback for Q5_K rows)."""
    if qw is not None:
        d, lo, q = _quantize_qx_1(x, qw, 31)
    else:
        d, lo, v = _min_max_ref(x, 31)
        q = np.trunc(v).astype(np.uint8)
    return _legacy_blocks(q, _f16(d), _f16(lo), _high_bits_32(q))


# ------------------------------------------------------------------------------------------------- searches

def _levels(x: np.ndarray, offset: np.ndarray | None, iscale: np.ndarray, lo: float, hi: float,
            out: np.ndarray | None = None) -> np.ndarray:
    """clamp(nearest_int(iscale * (x - offset)), lo, hi) per column (offset None: iscale * x), as float32."""
    if offset is None:
        out = np.multiply(x, iscale, out=out)
    else:
        out = np.subtract(x, offset, out=out)
        np.multiply(out, iscale, out=out)
    np.rint(out, out=out)
    return np.clip(out, lo, hi, out=out)


def _weighted_error(L: np.ndarray, scale: np.ndarray, offset: np.ndarray, x: np.ndarray, w: np.ndarray,
                    buf: np.ndarray) -> np.ndarray:
    """sum(w * (scale*L + offset - x)^2) per column, in C's order, through the scratch buffer `buf`."""
    np.multiply(L, scale, out=buf)
    buf += offset
    buf -= x
    buf *= buf
    buf *= w
    return _seq_sum(buf)


def _make_qkx_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants, and make_qkx3_quants (the same search when given weights), on each column of
    x (n, columns): a weighted least-squares fit of a scale and a min, tried at nstep+1 grid sizes.

    Returns (L as float32 (n, columns), scale, the_min) where a value is approximated by scale*L - the_min.
    Each trial's L is a function of (iscale, min), so only those are kept for the best trial and L is rebuilt
    once at the end: the search itself never writes a full-size array but its scratch buffers.
    """
    fnmax = F32(nmax)
    lo = _first_extreme(x, np.minimum)
    lo = _where(lo > 0, F32(0), lo)
    hi = x.max(axis=0)
    flat = hi <= lo  # all values equal (and <= 0): L = 0, scale 0
    t, u, wl = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(np.multiply(w, x, out=u))

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = fnmax / _where(flat, F32(1), hi - lo)
        scale = F32(1) / iscale
        best = _weighted_error(_levels(x, lo, iscale, 0, fnmax, out=t), scale, lo, x, w, u)
        L_iscale, L_lo = iscale, lo  # what made the best L

        for step in range(nstep + 1):
            # `lo` is the best min so far: the C loop reads the updated value in later trials.
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + fnmax) / (hi - lo)
            Laux = _levels(x, lo, iscale, 0, fnmax, out=t)
            np.multiply(w, Laux, out=wl)
            sum_l = _seq_sum(wl)
            sum_l2 = _seq_sum(np.multiply(wl, Laux, out=u))
            sum_xl = _seq_sum(np.multiply(wl, x, out=u))
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = this_min > 0
            m = _mask(clamp)
            this_min = _select(m, F32(0), this_min)
            this_scale = _select(m, sum_xl / sum_l2, this_scale)
            cur = _weighted_error(Laux, this_scale, this_min, x, w, u)
            better = (D > 0) & (cur < best) & ~flat
            m = _mask(better)
            L_iscale = _select(m, iscale, L_iscale)
            L_lo = _select(m, lo, L_lo)
            best = _select(m, cur, best)
            scale = _select(m, this_scale, scale)
            lo = _select(m, this_min, lo)
        L = _levels(x, L_lo, L_iscale, 0, fnmax, out=t)

    if flat.any():
        L[:, flat] = 0
    return L, _where(flat, F32(0), scale), -lo


def _signed_peak(x: np.ndarray) -> np.ndarray:
    """The signed value of the first largest magnitude in each column of x (n, columns), as C's strict `>`
    scan keeps it (0 for an all-zero column).

    From the column's max and min: where one of them has the larger magnitude, every value of that magnitude is
    that one. Only columns holding both +a and -a as extremes (or a NaN) need the first occurrence, found by a
    row walk over just those columns."""
    hi = np.maximum.reduce(x, axis=0)
    lo = np.minimum.reduce(x, axis=0)
    neg_lo = -lo
    hi_wins = hi > neg_lo
    peak = _where(hi_wins, hi, lo)
    unsure = ~(hi_wins | (neg_lo > hi))
    if unsure.any():
        zero = (hi == 0) & (lo == 0)
        peak[unsure & zero] = 0  # an all-zero column: +0.0 (C starts from 0 and never replaces it)
        tied = np.flatnonzero(unsure & ~zero)
        if tied.size:
            xt = x[:, tied]
            ax = np.abs(xt)
            first = _first_equal(xt, ax, np.maximum.reduce(ax, axis=0))
            peak[tied] = _where(first == 0, F32(0), first)
    return peak


def _make_qx_quants(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, rmse_type=1) with weights w on each column of x (n, columns). The reference Q6_K
    passes w = x^2 (what C computes when given no weights).

    Returns (iscale, scale, zero): the best trial's iscale, from which `_qx_levels` rebuilds C's L (only the
    columns that need it: Q6_K keeps the search's L only where its stored scale is 0), the scale, and the
    all-zero columns (scale 0, L 0)."""
    fnmax = F32(nmax)
    peak = _signed_peak(x)
    zero = np.abs(peak) < GROUP_MAX_EPS
    peak = _where(zero, F32(1), peak)
    wx = w * x
    t, u = np.empty_like(x), np.empty_like(x)

    def trial(iscale: np.ndarray, step: int = 0):
        if step <= -6:  # |iscale * x| <= (nmax - 0.6)(1 + 3 eps) < nmax - 0.5: the clamp would change nothing
            l = np.rint(np.multiply(x, iscale, out=t), out=t)
        else:
            l = _levels(x, None, iscale, -fnmax, fnmax - 1, out=t)
        sumlx = _seq_sum(np.multiply(wx, l, out=u))
        np.multiply(w, l, out=u)
        return sumlx, _seq_sum(np.multiply(u, l, out=u))

    iscale = -fnmax / peak
    sumlx, suml2 = trial(iscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = _where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        L_iscale = iscale
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(fnmax + F32(0.1) * F32(step)) / peak
            sumlx, suml2 = trial(iscale, step)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            m = _mask(better)
            L_iscale = _select(m, iscale, L_iscale)
            scale = _select(m, sumlx / suml2, scale)
            best = _select(m, scale * sumlx, best)
    return L_iscale, _where(zero, F32(0), scale), zero


def _qx_levels(x: np.ndarray, iscale: np.ndarray, zero: np.ndarray, nmax: int) -> np.ndarray:
    """make_qx_quants' L (nmax + l, as float32) for the columns of x from `_make_qx_quants`'s iscale and zero."""
    L = _levels(x, None, iscale, -F32(nmax), F32(nmax - 1))
    L += F32(nmax)
    if zero.any():
        L[:, zero] = 0  # an all-zero sub-block keeps L = 0, not the offset nmax
    return L


def _make_qp_quants(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qp_quants on each column of x (n, columns), x >= 0 in practice: the weighted choice of a
    K-quant block's 6-bit sub-block scales (or mins). A grid of 9 scales, then up to 5 passes that move one
    quant at a time while the weighted fit improves. Returns (L as uint8 (n, columns), scale)."""
    n = x.shape[0]
    fnmax = F32(nmax)
    top = np.zeros(x.shape[1], F32)
    for xi in x:
        top = np.where(top > xi, top, xi)  # MAX(max, x[i]): on equal values C takes x[i]
    zero = top < GROUP_MAX_EPS
    top = np.where(zero, F32(1), top)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = fnmax / top
        scale = F32(1) / iscale
        L0 = (_nearest_int_bits(iscale * x) & 0xFF).astype(F32)  # stored in a uint8
        diff = x - scale * L0
        best = _seq_sum(w * diff * diff)
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            iscale_is = (F32(0.1) * F32(step) + fnmax) / top
            scale_is = F32(1) / iscale_is
            l = np.minimum(nmax, _nearest_int_bits(iscale_is * x)).astype(F32)
            diff = x - scale_is * l
            mse = _seq_sum(w * diff * diff)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, iscale_is, iscale)

        l = np.minimum(nmax, _nearest_int_bits(iscale * x))
        lf = l.astype(F32)
        wx = w * x
        sumlx = _seq_sum(wx * lf)
        suml2 = _seq_sum(w * lf * lf)
        L = l & 0xFF  # what C keeps in its uint8 array
        for _ in range(5):  # C stops after a pass without change: a further pass would change nothing either
            changed = False
            for i in range(n):
                Li = L[i].astype(F32)
                slx = sumlx - wx[i] * Li
                sl2 = suml2 - w[i] * Li * Li
                new_l = np.minimum(nmax, _nearest_int_bits(x[i] * sl2 / slx))
                nl = new_l.astype(F32)
                slx_new = slx + wx[i] * nl
                sl2_new = sl2 + w[i] * nl * nl
                take = ((slx > 0) & (sl2 > 0) & (new_l != L[i])
                        & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
                if take.any():
                    changed = True
                    L[i] = np.where(take, new_l & 0xFF, L[i])
                    sumlx = np.where(take, slx_new, sumlx)
                    suml2 = np.where(take, sl2_new, suml2)
            if not changed:  # so no block can change in a later pass either
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    L = np.where(zero, 0, L).astype(np.uint8)
    return L, np.where(zero, F32(0), scale).astype(F32)


# ------------------------------------------------------------------------------------------------- K-quants

def _k_scales_minmax(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The reference first half of Q4_K and Q5_K: per 256-value block, 8 scales and mins as 6-bit integers.

    Returns (x as (32, 8*blocks), L from the search, ls, lm (blocks, 8) uint8, d, dmin (blocks,) fp16 values).
    """
    nb = x.shape[0] // QK_K
    xs = _element_major(x, 32)
    av_x = np.sqrt(_seq_sum(xs * xs) / F32(32))
    w = av_x + np.abs(xs)
    L, scales, mins = _make_qkx_quants(xs, w, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)

    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    # C stores nearest_int into a uint8 (wrapping) before MIN(63, .)
    ls = np.minimum(63, _nearest_int(inv_scale[:, None] * scales).astype(np.int64) & 0xFF).astype(np.uint8)
    lm = np.minimum(63, _nearest_int(inv_min[:, None] * mins).astype(np.int64) & 0xFF).astype(np.uint8)
    d = _fp16(max_scale / F32(63))
    dmin = _fp16(max_min / F32(63))
    return xs, L, ls, lm, d, dmin


def _k_scales_weighted(rows: np.ndarray, qw: np.ndarray, nmax: int, cap63: bool):
    """quantize_row_q4_K_impl / q5_K_impl's first half: per 256-value block, weights qw * sqrt(sigma2 + x^2)
    (sigma2 = twice the block's mean square), make_qkx3_quants per sub-block, then the 6-bit scales and mins
    each chosen by make_qp_quants weighted by the sub-blocks' summed weights. Same returns as _k_scales_minmax,
    ls and lm as C stores them (Q4_K does not cap them at 63, Q5_K does)."""
    rows = np.asarray(rows, F32).reshape(-1, rows.shape[-1])
    blocks = rows.reshape(-1, QK_K)
    nb = len(blocks)
    sigma2 = F32(2) * _row_seq_sum(blocks * blocks) / F32(QK_K)
    xs = _element_major(blocks, 32)
    w = _importance_columns(qw, 32, len(rows)) * np.sqrt(np.repeat(sigma2, 8) + xs * xs)
    sw = np.ascontiguousarray(_seq_sum(w).reshape(nb, 8).T)
    L, scales, mins = _make_qkx_quants(xs, w, nmax, -0.9, 0.05, 36)
    ls, d_block = _make_qp_quants(np.ascontiguousarray(scales.reshape(nb, 8).T), sw, 63)
    lm, m_block = _make_qp_quants(np.ascontiguousarray(mins.reshape(nb, 8).T), sw, 63)
    ls, lm = ls.T, lm.T
    if cap63:
        ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    return xs, L, ls, lm, _fp16(d_block), _fp16(m_block)


def _keep_search_where_zero(q: np.ndarray, L: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """np.where(sd != 0, q, L) for values (n, sub-blocks) and scales sd (sub-blocks,): a sub-block whose stored
    scale is 0 keeps the search's L. Such sub-blocks are few, so they are patched instead of selecting everywhere."""
    zero = np.flatnonzero(sd == 0)
    if zero.size:
        q[:, zero] = L[:, zero]
    return q


def _k_requantize(xs: np.ndarray, L: np.ndarray, ls, lm, d, dmin, nmax: int) -> np.ndarray:
    """Recompute L with the stored (rounded) scales; returns L as (blocks, 256) uint8 in value order."""
    sd = (d[:, None] * ls.astype(F32)).reshape(-1)  # per sub-block, float32 like the C code
    sm = (dmin[:, None] * lm.astype(F32)).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(_nearest_int((xs + sm) / sd), 0, F32(nmax))
    return _keep_search_where_zero(q, L, sd).T.reshape(-1, QK_K).astype(np.uint8)


def _pack_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> the 12-byte K-quant layout (high bits of j >= 4 in the top of bytes 0-7).
    Bits above the sixth (possible in the weighted Q4_K) spill over as C's uint8 arithmetic lets them."""
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    return np.concatenate([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 15) | ((hi_m & 15) << 4)],
                          axis=1).astype(np.uint8)


def _unpack_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's get_scale_min_k4 for j = 0..7: the scales and mins the 12 bytes actually hold."""
    q = packed.astype(np.uint8)
    sc = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 15) | ((q[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _k_quantize(x: np.ndarray, qw: Weights, nmax: int):
    """Scales, mins and requantized values of Q4_K (nmax 15) or Q5_K (nmax 31): (d, dmin, 12 scale bytes,
    L as (blocks, 4, 2, 32) uint8: value 64c + 32h + l at [c, h, l])."""
    if qw is None:
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        xs, L, ls, lm, d, dmin = _k_scales_minmax(_blocks(x, QK_K).reshape(-1), nmax, rmin, 0.1, nstep)
        packed = _pack_k_scales(ls, lm)
    else:
        xs, L, ls, lm, d, dmin = _k_scales_weighted(x, qw, nmax, cap63=nmax == 31)
        packed = _pack_k_scales(ls, lm)
        ls, lm = _unpack_k_scales(packed)
    L = _k_requantize(xs, L, ls, lm, d, dmin, nmax).reshape(-1, 4, 2, 32)
    return d, dmin, packed, L


def quantize_q4_k(x: np.ndarray, qw: Weights = None) -> np.ndarray:
    """Q4_K: 256-value blocks of 8x32, 4-bit values with 6-bit scales and mins; 144 bytes per block."""
    d, dmin, packed, L = _k_quantize(x, qw, 15)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed, qs], axis=1)


def quantize_q5_k(x: np.ndarray, qw: Weights = None) -> np.ndarray:
    """Q5_K: like Q4_K with 5-bit values (bit 4 of value 64c+j at bit 2c of qh[j]); 176 bytes per block."""
    d, dmin, packed, L = _k_quantize(x, qw, 31)
    qs = ((L[:, :, 0] & 15) | ((L[:, :, 1] & 15) << 4)).reshape(-1, 128)
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, :, None, None] + np.arange(2, dtype=np.uint8)[None, None, :, None]
    qh = np.bitwise_or.reduce(((L >> 4) << shifts).reshape(-1, 8, 32), axis=1).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed, qh, qs], axis=1)


def quantize_q6_k(x: np.ndarray, qw: Weights = None) -> np.ndarray:
    """Q6_K: 256-value blocks of 16x16, 6-bit values with int8 scales; 210 bytes per block. The sub-block search
    weighs each value by x^2, or by its column's importance when given one (quantize_row_q6_K_impl)."""
    b = _blocks(x, QK_K)
    nb = len(b)
    xs = _element_major(b, 16)  # (16, sub-blocks)
    w = xs * xs if qw is None else _importance_columns(qw, 16, b.size // len(qw))
    iscale, scales, zero = _make_qx_quants(xs, w, 32)
    scales = scales.reshape(nb, 16)

    peak = scales[np.arange(nb), np.abs(scales).argmax(axis=1)]
    zero_block = np.abs(peak) < GROUP_MAX_EPS
    block_iscale = F32(-128) / np.where(zero_block, F32(1), peak)
    d = np.where(zero_block, F32(0), _fp16(F32(1) / block_iscale))
    sc = np.minimum(127, _nearest_int(block_iscale[:, None] * scales)).astype(np.int64).astype(np.int8)
    sc[zero_block] = 0

    # requantized in value order (no transpose back): x / d per sub-block, d = fp16(d) * scale
    sd = (d[:, None] * sc.astype(F32)).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):  # where sd is 0, patched below
        q = np.divide(b.reshape(-1), np.repeat(sd, 16))
        np.rint(q, out=q)
        np.clip(q, F32(-32), F32(31), out=q)
        q += F32(32)
        L = q.astype(np.uint8).reshape(nb, QK_K)
    keep = np.flatnonzero(sd == 0)  # C skips these sub-blocks: they keep the search's L
    if keep.size:
        L.reshape(-1, 16)[keep] = _qx_levels(xs[:, keep], iscale[keep], zero[keep], 32).T
    L[zero_block] = 0
    return np.concatenate([*_pack_q6_k(L), sc.view(np.uint8), _f16_bytes(d)], axis=1)


def _pack_q6_k(L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, 256) 6-bit values -> ql (blocks, 128) and qh (blocks, 64) as quantize_row_q6_K_ref lays them out:
    per half h of 128 values, ql[64h + l] holds values l (low nibble) and l + 64 (high), ql[64h + 32 + l] values
    l + 32 and l + 96, qh[32h + l] the top two bits of values l, l + 32, l + 64, l + 96 (bits 0-1, 2-3, 4-5,
    6-7). Computed on uint64 words (8 values) of the whole chunk at once, word 16h + 4*quarter + k of a block
    holding values 32*quarter + 8k..+7 of the half; the strided views of the wanted words are returned."""
    nb = len(L)
    words = L.view("<u8").reshape(-1)
    low = words & np.uint64(0x0F0F0F0F0F0F0F0F)
    ql = np.empty_like(words)
    np.left_shift(low[8:], np.uint64(4), out=ql[:-8])
    ql[:-8] |= low[:-8]  # quarter q (0 or 1) | quarter q + 2 << 4
    top = (words >> np.uint64(4)) & np.uint64(0x0303030303030303)
    qh = np.empty_like(words)
    np.left_shift(top[12:], np.uint64(6), out=qh[:-12])
    for quarter in (2, 1):
        qh[:-12] |= top[4 * quarter:len(top) - 12 + 4 * quarter] << np.uint64(2 * quarter)
    qh[:-12] |= top[:-12]  # quarter 0, of 1 << 2, of 2 << 4, of 3 << 6
    ql = ql.reshape(nb, 2, 2, 8)[:, :, 0].view(np.uint8).reshape(nb, 128)
    qh = qh.reshape(nb, 2, 4, 4)[:, :, 0].view(np.uint8).reshape(nb, 64)
    return ql, qh


# ------------------------------------------------------------------------------------------------- dispatch

QT = GGMLQuantizationType

QUANTIZERS: dict[GGMLQuantizationType, Callable[[np.ndarray, Weights], np.ndarray]] = {
    QT.Q8_0: quantize_q8_0,
    QT.Q4_0: quantize_q4_0,
    QT.Q4_1: quantize_q4_1,
    QT.Q5_0: quantize_q5_0,
    QT.Q5_1: quantize_q5_1,
    QT.Q4_K: quantize_q4_k,
    QT.Q5_K: quantize_q5_k,
    QT.Q6_K: quantize_q6_k,
}


def quantize(data: np.ndarray, qtype: GGMLQuantizationType, threads: int = 1,
             imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize `data` (rows along the last axis) to `qtype`, as llama.cpp would.

    `imatrix`: the importance of each column (n_per_row values, or n_per_row per matrix for a stack of matrices,
    as llama-quantize passes expert tensors), which switches to ggml's weighted quantizers.
    Returns uint8 of shape (*data.shape[:-1], bytes per row) for block types, float32/float16 arrays for
    F32/F16. `threads` > 1 splits the rows over a thread pool (numpy releases the GIL in its loops).
    """
    data = np.asarray(data)
    if qtype == QT.F32:
        return data.astype(F32)
    if qtype == QT.F16:
        return data.astype(np.float16)
    if qtype not in QUANTIZERS:
        raise ValueError(f"no quantizer for {qtype.name}; supported: {', '.join(t.name for t in QUANTIZERS)}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_per_row = data.shape[-1]
    if n_per_row % block_size:
        raise ValueError(f"row length {n_per_row} is not a multiple of {qtype.name}'s block size {block_size}")
    row_bytes = n_per_row // block_size * type_size
    if imatrix is not None:
        n_mat = int(np.prod(data.shape[:-2], dtype=np.int64)) if data.ndim > 2 else 1
        weights = np.asarray(imatrix, F32).reshape(-1)
        if weights.size != n_mat * n_per_row:
            raise ValueError(f"importance matrix has {weights.size} values for {n_mat} matrices of rows of "
                             f"{n_per_row}")
        if n_mat > 1:  # one importance row per matrix
            mats = np.asarray(data).reshape(n_mat, -1, n_per_row)
            parts = [_quantize_rows(m, qtype, threads, w) for m, w in zip(mats, weights.reshape(n_mat, -1))]
            return np.stack(parts).reshape(*data.shape[:-1], row_bytes)
        return _quantize_rows(data, qtype, threads, weights).reshape(*data.shape[:-1], row_bytes)
    return _quantize_rows(data, qtype, threads, None).reshape(*data.shape[:-1], row_bytes)


@functools.cache
def _keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    Each chunk allocates and frees the same few MB of numpy temporaries. By default glibc returns a freed top
    of the heap above twice the largest freed block (and maps big blocks afresh each time), so every chunk
    faulted its working set in again, zero-filled page by page: on a VM that cost about as much CPU time as the
    arithmetic (Q4_0 file: 36,000 page faults and 0.49 s of CPU; with this, 300 and 0.23 s). The process keeps
    up to 128 MiB of free heap top; blocks up to 32 MiB (glibc's maximum) come from the heap."""
    set_malloc(mmap_threshold=32 << 20, trim_threshold=128 << 20)


def _quantize_rows(data: np.ndarray, qtype: GGMLQuantizationType, threads: int, qw: Weights) -> np.ndarray:
    _keep_freed_memory()
    n_per_row = data.shape[-1]
    rows = np.asarray(data).reshape(-1, n_per_row)  # widened to float32 chunk by chunk, in the threads
    rows_per_chunk = max(1, CHUNK_VALUES // n_per_row)
    if threads > 1:  # at least one chunk per thread, and chunks of even size, so that no thread idles at the end
        n_chunks = -(-max(-(-len(rows) // rows_per_chunk), threads) // threads) * threads
        rows_per_chunk = max(1, -(-len(rows) // n_chunks))
    chunks = [rows[i:i + rows_per_chunk] for i in range(0, len(rows), rows_per_chunk)]
    quantizer = QUANTIZERS[qtype]

    def fn(chunk: np.ndarray) -> np.ndarray:
        return quantizer(_widen(chunk), qw)

    if threads > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(fn, chunks))
    else:
        parts = [fn(c) for c in chunks]
    return np.concatenate(parts, axis=0)

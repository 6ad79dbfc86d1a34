"""Make the golden files that tests/test_quants.py, test_quantize.py and test_imatrix_quants.py compare against
llama.cpp.

    pip install llama-cpp-python      # a source build; see docs/gguf.md#build-flags for build flags
    tools/build_llama_tools.sh        # llama-quantize, for the importance-matrix files
    python tools/make_golden.py [--parts vectors files imatrix]

Not run by the tests (they need no llama.cpp); run it again after changing the test models below, and commit
what it writes. It produces:

- quant_vectors.npz: rows of float32 chosen to hit the quantizers' edge cases (all-zero and constant blocks,
  zero sub-blocks, outliers, rounding ties, values below ggml's 1e-15 threshold, -0.0) and, per block type,
  the bytes of ggml's own `ggml_quantize_chunk` (the function llama-quantize calls) on them.
- quantize_golden.json: for each test model below and each file type, the sha256 of the whole file
  llama.cpp's `llama_model_quantize` writes, and each tensor's type and sha256.
- quantize_golden_imatrix.json: the same with an importance matrix. Kernel level: for each importance vector of
  `importance_vector` and each block type, a short hash of each edge-case row as `ggml_quantize_chunk` quantizes
  it with those weights. File level: for each test model, the importance-matrix file `write_test_imatrix`
  makes, and per file type the whole file and each quantized tensor as `llama-quantize --imatrix imatrix.gguf`
  writes them (the file name is recorded in the output, so it is always that relative name).

The test models (and importance matrices) are rebuilt bit for bit by `write_test_model` (`write_test_imatrix`),
which the tests import: their values come from an integer hash, so no random number generator version or libm
can change them.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import hashlib
import importlib.util
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter, TokenType

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "tests" / "data"
FTYPES = {"q4_0": 2, "q8_0": 7, "q5_0": 8, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
QT = GGMLQuantizationType
VECTOR_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K]
# the types whose bytes an importance matrix changes (Q8_0 ignores it; Q4_1 appears only with one)
IMATRIX_VECTOR_TYPES = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K]
IMATRIX_KINDS = ["spread", "sparse", "extreme"]
IMATRIX_FILE = "imatrix.gguf"  # llama-quantize records the name it was given: always this one, relative
IMATRIX_DATASET, IMATRIX_CHUNKS, IMATRIX_CHUNK_SIZE = "tinygpt-golden", 3, 64


@dataclass(frozen=True)
class TestModel:
    """A GGUF small enough to build in a test, shaped to reach llama-quantize's branches."""
    name: str
    n_embd: int
    n_head: int
    n_layer: int
    n_ff: int
    n_vocab: int
    n_ctx: int
    float_type: GGMLQuantizationType  # type of the 2-D tensors (1-D ones are always F32)
    tied: bool  # no output.weight: token_embd doubles as the LM head
    arch: str = "gpt2"  # or "llama": separate attn_q/k/v, ffn_gate, RMSNorm weights without biases
    n_kv_head: int = 0  # llama: key/value heads (attn_k/attn_v have n_kv_head * head size rows); 0: n_head


TEST_MODELS = [
    # rows multiple of 256: no fallbacks; 4 layers: use_more_bits picks layers 2 and 3
    TestModel("k256", n_embd=256, n_head=4, n_layer=4, n_ff=512, n_vocab=300, n_ctx=64,
              float_type=QT.F16, tied=True),
    # rows of 96 and 384: K-quants fall back to 32-blocks (Q5_0, Q5_1, Q8_0); 6 layers -> layers 2 and 5
    TestModel("w96", n_embd=96, n_head=4, n_layer=6, n_ff=384, n_vocab=257, n_ctx=32,
              float_type=QT.F16, tied=True),
    # rows of 80 (not a multiple of 32: F16 from F32) and 160; separate output.weight; 8 layers -> 0, 3, 6, 7
    TestModel("w80", n_embd=80, n_head=4, n_layer=8, n_ff=160, n_vocab=300, n_ctx=32,
              float_type=QT.F32, tied=False),
    # llama, rows of 256 and 512; grouped-query attention (attn_k/attn_v have 128 rows); attn_v counted on its
    # own (use_more_bits over the attn_v tensors), ffn_down by layer, ffn_gate as ffn_up; tied token_embd
    TestModel("llama256", n_embd=256, n_head=4, n_layer=4, n_ff=512, n_vocab=300, n_ctx=64,
              float_type=QT.F16, tied=True, arch="llama", n_kv_head=2),
    # llama, rows of 96 and 320: every K-quant falls back; untied output and token_embd; 6 layers -> 2 and 5
    TestModel("llama96", n_embd=96, n_head=6, n_layer=6, n_ff=320, n_vocab=257, n_ctx=32,
              float_type=QT.F32, tied=False, arch="llama", n_kv_head=2),
    # llama, 8 layers of rows of 64 and 192: with an importance matrix, q4_0/q5_0 give layer 0's ffn_down
    # Q4_1/Q5_1 (n_layer/8 = 1); a tied token_embd of rows of 64 becomes Q8_0
    TestModel("llama64", n_embd=64, n_head=4, n_layer=8, n_ff=192, n_vocab=260, n_ctx=32,
              float_type=QT.F16, tied=True, arch="llama", n_kv_head=2),
]


# --------------------------------------------------------------------------------------- deterministic values

def hash_uniform(seed: int, n: int) -> np.ndarray:
    """n floats in [0, 1) from splitmix64 of (seed, index): the same bits on every platform and numpy."""
    z = np.arange(n, dtype=np.uint64)
    z += np.array([seed & 0xFFFFFFFF], dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps mod 2**64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def hash_normal(seed: int, n: int) -> np.ndarray:
    """Roughly standard normal values (a scaled sum of 4 uniforms: exact float64 arithmetic, no libm)."""
    u = hash_uniform(seed, 4 * n).reshape(4, n)
    return (u[0] + u[1] + u[2] + u[3] - 2.0) * 1.7320508075688772


def weight_values(seed: int, rows: int, cols: int, std: float = 0.02) -> np.ndarray:
    """Weights like a trained model's, plus the blocks that test the quantizers' corner cases."""
    x = hash_normal(seed, rows * cols) * std
    u = hash_uniform(seed + 1, rows * cols)
    x = np.where(u < 0.01, x * 8.0, x)  # outliers
    x = x.reshape(rows, cols)
    flat = x.reshape(-1)
    n = flat.size
    if n >= 4096:  # a zero 256-block, a constant block, a negative constant block, a zero 32-sub-block
        flat[256:512] = 0.0
        flat[1024:1280] = 0.0125
        flat[1536:1792] = -0.03
        flat[2048 + 64:2048 + 96] = 0.0
        flat[3072:3328] = np.abs(flat[3072:3328])  # all positive: min clamped to 0
    return x


def edge_case_rows(cols: int = 512) -> np.ndarray:
    """Rows of float32 for the kernel vectors: each row one flavour of trouble."""
    rows = [weight_values(100 + i, 1, cols)[0] for i in range(24)]
    rows.append(np.zeros(cols))
    rows.append(np.full(cols, 0.5))
    rows.append(np.full(cols, -0.25))
    rows.append(np.where(hash_uniform(7, cols) < 0.5, 0.0, -0.0))  # signed zeros
    rows.append(hash_normal(8, cols) * (hash_uniform(9, cols) < 0.05))  # sparse: mostly zero blocks
    rows.append(hash_normal(10, cols) * 1e-17)  # below GROUP_MAX_EPS
    rows.append(np.round(hash_normal(11, cols) * 8) / 8)  # ties for round-half-even
    rows.append(np.round(hash_normal(12, cols) * 40) / 16)
    rows.append(np.abs(hash_normal(13, cols)))
    rows.append(-np.abs(hash_normal(14, cols)))
    rows.append(hash_normal(15, cols) * 300.0)
    rows.append(np.tan((hash_uniform(16, cols) - 0.5) * 3.1))  # heavy tails
    x = np.stack(rows).astype(np.float32)
    f16 = x.astype(np.float16).astype(np.float32)  # real inputs are f16: add those too
    return np.concatenate([x, f16])


# --------------------------------------------------------------------------------------- test model files

def write_test_model(spec: TestModel, path: str | Path) -> None:
    """Write `spec` as a GGUF like tinygpt.export.gguf_convert does (the tests rebuild it with this function)."""
    C, F, V = spec.n_embd, spec.n_ff, spec.n_vocab
    w = GGUFWriter(str(path), spec.arch)
    w.add_name(f"test-{spec.name}")
    w.add_context_length(spec.n_ctx)
    w.add_embedding_length(C)
    w.add_feed_forward_length(F)
    w.add_block_count(spec.n_layer)
    w.add_head_count(spec.n_head)
    if spec.arch == "gpt2":
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_head_count_kv(spec.n_kv_head or spec.n_head)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_freq_base(10000.0)
        w.add_rope_dimension_count(C // spec.n_head)
        w.add_vocab_size(V)
    w.add_file_type({QT.F32: 0, QT.F16: 1, QT.BF16: 32}[spec.float_type])
    tokens = [f"<t{i}>" for i in range(V - 1)] + ["<|endoftext|>"]  # unique strings suffice to quantize
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([int(TokenType.NORMAL)] * (V - 1) + [int(TokenType.CONTROL)])
    w.add_token_merges(["0 0", "1 1"])
    w.add_bos_token_id(V - 1)
    w.add_eos_token_id(V - 1)
    w.add_add_bos_token(False)

    seed = iter(range(1, 1000))

    def matrix(name: str, rows: int, cols: int, std: float = 0.02) -> None:
        x = weight_values(next(seed) * 7919, rows, cols, std)  # float64: each type rounds it once
        if spec.float_type == QT.BF16:  # truncated to the top 16 bits of the float32
            w.add_tensor(name, (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8),
                         raw_dtype=QT.BF16)
        else:
            w.add_tensor(name, x.astype(np.float16 if spec.float_type == QT.F16 else np.float32))

    def vector(name: str, n: int, center: float) -> None:
        w.add_tensor(name, (center + hash_normal(next(seed) * 7919, n) * 0.05).astype(np.float32))

    if spec.arch == "llama":
        write_llama_tensors(spec, matrix, vector)
    else:
        write_gpt2_tensors(spec, matrix, vector)
    if not spec.tied:
        matrix("output.weight", V, C)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gpt2_tensors(spec: TestModel, matrix, vector) -> None:
    C, F, V = spec.n_embd, spec.n_ff, spec.n_vocab
    matrix("token_embd.weight", V, C)
    matrix("position_embd.weight", spec.n_ctx, C, 0.01)
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", C, 1.0)
        vector(p + "attn_norm.bias", C, 0.0)
        matrix(p + "attn_qkv.weight", 3 * C, C)
        vector(p + "attn_qkv.bias", 3 * C, 0.0)
        matrix(p + "attn_output.weight", C, C, 0.01)
        vector(p + "attn_output.bias", C, 0.0)
        vector(p + "ffn_norm.weight", C, 1.0)
        vector(p + "ffn_norm.bias", C, 0.0)
        matrix(p + "ffn_up.weight", F, C)
        vector(p + "ffn_up.bias", F, 0.0)
        matrix(p + "ffn_down.weight", C, F, 0.01)
        vector(p + "ffn_down.bias", C, 0.0)
    vector("output_norm.weight", C, 1.0)
    vector("output_norm.bias", C, 0.0)


def write_llama_tensors(spec: TestModel, matrix, vector) -> None:
    C, F, V = spec.n_embd, spec.n_ff, spec.n_vocab
    kv_rows = (spec.n_kv_head or spec.n_head) * (C // spec.n_head)
    matrix("token_embd.weight", V, C)
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", C, 1.0)
        matrix(p + "attn_q.weight", C, C)
        matrix(p + "attn_k.weight", kv_rows, C)
        matrix(p + "attn_v.weight", kv_rows, C)
        matrix(p + "attn_output.weight", C, C, 0.01)
        vector(p + "ffn_norm.weight", C, 1.0)
        matrix(p + "ffn_gate.weight", F, C)
        matrix(p + "ffn_up.weight", F, C)
        matrix(p + "ffn_down.weight", C, F, 0.01)
    vector("output_norm.weight", C, 1.0)


# --------------------------------------------------------------------------------------- importance matrices

def importance_vector(kind: str, n: int, seed: int = 0) -> np.ndarray:
    """Per-column importance (mean squared activations) of a few kinds: `spread` over 7 orders of magnitude,
    `sparse` (a third of the columns exactly 0, as for channels a calibration text never drives), `extreme`
    (1e-30 to 1e6, with runs of zeros across whole blocks)."""
    u = hash_uniform(7000 + 31 * seed + IMATRIX_KINDS.index(kind), n)
    if kind == "spread":
        v = np.exp((u - 0.5) * 16.0)
    elif kind == "sparse":
        v = np.where(u < 1 / 3, 0.0, np.exp((u - 0.5) * 6.0))
    else:
        v = np.where(u < 0.5, 1e-30, 1e6) * u
        v[: min(n, 64)] = 0.0  # a whole 32-block (and in rows of 256, two K-quant sub-blocks) weighs nothing
    return v.astype(np.float32)


def imatrix_entries(model_path: str | Path) -> dict[str, np.ndarray]:
    """The importance of each input column for the tensors llama-imatrix covers: the blocks' 2-D weights, and
    output.weight (which it covers when asked, with --process-output). Kinds rotate over the tensors."""
    entries = {}
    matrices = [t for t in GGUFReader(model_path).tensors if len(t.shape) == 2 and t.shape[1] > 1]
    for i, t in enumerate(sorted(matrices, key=lambda t: t.name)):
        if t.name.startswith("blk.") or t.name == "output.weight":
            entries[t.name] = importance_vector(IMATRIX_KINDS[i % len(IMATRIX_KINDS)], int(t.shape[0]), seed=i)
    return entries


def write_test_imatrix(entries: dict[str, np.ndarray], path: str | Path) -> None:
    """An importance-matrix file in llama-imatrix's GGUF layout (general.type imatrix, the imatrix.* keys,
    `<name>.in_sum2` and `<name>.counts` per tensor), each mean square stored as a sum over the chunks' tokens."""
    n_tokens = np.float32(IMATRIX_CHUNKS * IMATRIX_CHUNK_SIZE)
    w = GGUFWriter(str(path), arch="")
    w.kv_data[0].pop("general.architecture", None)  # an importance matrix has no architecture
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", [IMATRIX_DATASET])
    w.add_uint32("imatrix.chunk_count", IMATRIX_CHUNKS)
    w.add_uint32("imatrix.chunk_size", IMATRIX_CHUNK_SIZE)
    for name in sorted(entries):
        w.add_tensor(name + ".in_sum2", (entries[name] * n_tokens).astype(np.float32))
        w.add_tensor(name + ".counts", np.array([n_tokens], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def row_digests(rows: np.ndarray) -> list[str]:
    """A short sha256 of each row's bytes (enough to tell which row differs)."""
    return [hashlib.sha256(r.tobytes()).hexdigest()[:16] for r in rows]


def tensor_digests(path: str | Path) -> dict[str, list[str]]:
    """name -> [type name, sha256 of the tensor's bytes] for every tensor of a GGUF."""
    return {t.name: [t.tensor_type.name, hashlib.sha256(np.asarray(t.data).tobytes()).hexdigest()]
            for t in GGUFReader(path).tensors}


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------- llama.cpp side

def ggml_quantize_rows(x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml's own quantizer (ggml_quantize_chunk, with the per-column importance if given) from
    llama-cpp-python's libggml-base."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(glob.glob(str(lib_dir / "libggml-base.*"))[0])
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    x = np.ascontiguousarray(x, dtype=np.float32)
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                            None if qw is None else qw.ctypes.data)
    return out


def llama_quantize_file(src: str | Path, dst: str | Path, file_type: str, pure: bool = False) -> None:
    """Quantize a GGUF with llama.cpp's llama_model_quantize (what the llama-quantize tool runs)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[file_type]
    params.pure = pure
    params.nthread = 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {src} ({file_type})")


def llama_quantize_tool() -> Path:
    """llama-quantize, found as the tests find it (tests/llama_tools.py)."""
    spec = importlib.util.spec_from_file_location("llama_tools", ROOT / "tests" / "llama_tools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tool = module.find_llama_tool("llama-quantize")
    if tool is None:
        raise SystemExit("llama-quantize not found: run tools/build_llama_tools.sh and set LLAMA_CPP_BIN")
    return tool


def llama_quantize_imatrix(tool: Path, folder: Path, src: str, dst: str, file_type: str) -> None:
    """`llama-quantize --imatrix imatrix.gguf src dst TYPE`, run in `folder` (which holds all three files)."""
    done = subprocess.run([str(tool), "--imatrix", IMATRIX_FILE, src, dst, file_type.upper(), "1"],
                          cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama-quantize failed on {src} ({file_type}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def make_vectors(out_dir: Path) -> None:
    x = edge_case_rows()
    vectors = {"input": x}
    for qtype in VECTOR_TYPES:
        vectors[qtype.name] = ggml_quantize_rows(x, qtype)
    np.savez_compressed(out_dir / "quant_vectors.npz", **vectors)


def make_imatrix_golden(out_dir: Path) -> None:
    import llama_cpp

    tool = llama_quantize_tool()
    x = edge_case_rows()
    golden: dict = {"llama_cpp_python": llama_cpp.__version__, "vectors": {}, "models": {}}
    for kind in IMATRIX_KINDS:
        qw = importance_vector(kind, x.shape[1])
        golden["vectors"][kind] = {t.name: row_digests(ggml_quantize_rows(x, t, qw)) for t in IMATRIX_VECTOR_TYPES}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for spec in TEST_MODELS:
            src = folder / f"{spec.name}.gguf"
            write_test_model(spec, src)
            write_test_imatrix(imatrix_entries(src), folder / IMATRIX_FILE)
            entry = {"input_sha256": file_sha256(src), "imatrix_sha256": file_sha256(folder / IMATRIX_FILE),
                     "types": {}}
            for file_type in FTYPES:
                llama_quantize_imatrix(tool, folder, src.name, "out.gguf", file_type)
                digests = tensor_digests(folder / "out.gguf")
                entry["types"][file_type] = {
                    "file_sha256": file_sha256(folder / "out.gguf"),
                    "tensors": {n: f"{t}:{h[:16]}" for n, (t, h) in digests.items() if t not in ("F32", "F16")}}
                print(f"{spec.name} {file_type} imatrix: {entry['types'][file_type]['file_sha256'][:16]}",
                      file=sys.stderr)
            golden["models"][spec.name] = entry
    (out_dir / "quantize_golden_imatrix.json").write_text(json.dumps(golden, indent=0) + "\n")


def make_file_golden(out_dir: Path) -> None:
    import llama_cpp

    golden: dict = {"llama_cpp_python": llama_cpp.__version__, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in TEST_MODELS:
            src = Path(tmp) / f"{spec.name}.gguf"
            write_test_model(spec, src)
            entry = {"input_sha256": file_sha256(src), "types": {}}
            for file_type in FTYPES:
                dst = Path(tmp) / f"{spec.name}-{file_type}.gguf"
                llama_quantize_file(src, dst, file_type)
                entry["types"][file_type] = {"file_sha256": file_sha256(dst), "tensors": tensor_digests(dst)}
                print(f"{spec.name} {file_type}: {file_sha256(dst)[:16]}", file=sys.stderr)
            golden["models"][spec.name] = entry
    (out_dir / "quantize_golden.json").write_text(json.dumps(golden, indent=1) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out_dir", default=str(DATA_DIR))
    parser.add_argument("--parts", nargs="+", choices=["vectors", "files", "imatrix"],
                        default=["vectors", "files", "imatrix"])
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "vectors" in args.parts:
        make_vectors(out_dir)
    if "files" in args.parts:
        make_file_golden(out_dir)
    if "imatrix" in args.parts:
        make_imatrix_golden(out_dir)


if __name__ == "__main__":
    main()

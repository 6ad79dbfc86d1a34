"""Quantization speed per million parameters, against gguf-py and llama.cpp; optionally the perplexity it costs.

    python bench/bench_quantize.py [--layers 8 --embd 512 --vocab 4096] [--types q4_k_m q8_0 ...] [--threads N]
    python bench/bench_quantize.py --arch gpt2 llama --types q4_k_m     # both architectures, same run
    python bench/bench_quantize.py --gguf-f16 exports/tinygpt/model-f16.gguf \\
        --gguf-q exports/tinygpt/model-q4_k_m.gguf --val-bin data/tokens/val.bin     # quality (trained model)

Speed: a random model of the small preset's shape (8 layers x 512, vocab 4096; ~25M parameters) is written as
an f16 GGUF, then quantized to each type by `tinygpt.export.quantize.quantize_gguf` (the whole stage: read, quantize,
write). Peers measured in the same run: gguf-py's Q8_0 quantizer (the only type of ours it has: gguf.quants.quantize
on the same 2-D tensors, against our Q8_0 kernel on the same tensors), and, when llama-cpp-python is installed,
llama.cpp's llama_model_quantize on the same file with the same thread count (also checked byte for byte).
Quality: perplexity of the validation tokens under the f16 and the quantized GGUF, both read by tinygpt.weights.gguf_read.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.util
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
os.environ.setdefault("TINYGPT_NO_PROGRESS", "1")

import gguf  # noqa: E402

from tinygpt.export.quantize import FILE_TYPES, quantize_gguf  # noqa: E402
from tinygpt.export.quants import quantize  # noqa: E402


def load_make_golden():
    """tools/make_golden.py builds the same kind of gpt2 GGUF the tests use."""
    spec = importlib.util.spec_from_file_location("make_golden", ROOT / "tools" / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def timed(fn, repeat: int) -> float:
    """Best wall time of `repeat` runs (the least disturbed by the other work on a shared machine)."""
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def llama_quantize(src: Path, dst: Path, ftype: int, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError("llama_model_quantize failed")


def quiet_llama_logs() -> bool:
    try:
        import llama_cpp
    except ImportError:
        return False
    callback = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(lambda *a: None)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    quiet_llama_logs.keep = callback  # the C side holds a pointer to it
    return True


def bench_speed(args, arch: str) -> None:
    make_golden = load_make_golden()
    # the MLP width tinygpt's model gives each architecture (llama: SwiGLU, 8/3 x rounded up to 256)
    n_ff = 4 * args.embd if arch == "gpt2" else 256 * math.ceil(int(8 * args.embd / 3) / 256)
    spec = make_golden.TestModel("bench", n_embd=args.embd, n_head=8, n_layer=args.layers, n_ff=n_ff,
                                 n_vocab=args.vocab, n_ctx=args.ctx, float_type=gguf.GGMLQuantizationType.F16,
                                 tied=True, arch=arch)
    have_llama = quiet_llama_logs()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model-f16.gguf"
        make_golden.write_test_model(spec, src)
        reader = gguf.GGUFReader(src)
        n_params = sum(int(t.n_elements) for t in reader.tensors)
        mparams = n_params / 1e6
        print(f"model: {arch}, {args.layers} layers x {args.embd}, vocab {args.vocab}: {mparams:.1f}M parameters; "
              f"threads {args.threads}; best of {args.repeat}")

        # kernel level, one thread each: Q8_0 on every 2-D tensor, ours against gguf-py's numpy quantizer
        q8 = gguf.GGMLQuantizationType.Q8_0
        mats = [np.asarray(t.data, dtype=np.float32) for t in reader.tensors if len(t.shape) == 2]
        mat_m = sum(m.size for m in mats) / 1e6
        ours = timed(lambda: [quantize(m, q8) for m in mats], args.repeat)
        peer = timed(lambda: [gguf.quants.quantize(m, q8) for m in mats], args.repeat)
        print(f"Q8_0 kernel on {mat_m:.1f}M weights, 1 thread: tinygpt {ours / mat_m * 1e3:.1f} ms/M, "
              f"gguf-py {peer / mat_m * 1e3:.1f} ms/M (tinygpt takes {ours / peer:.2f}x gguf-py's time)")

        print(f"{'type':8} {'tinygpt s':>10} {'ms/Mparam':>10} {'llama.cpp s':>12} {'ms/Mparam':>10} "
              f"{'ours/llama':>10}  identical")
        for file_type in args.types:
            out = Path(tmp) / f"model-{file_type}.gguf"
            ours = timed(lambda: quantize_gguf(src, out, file_type, args.threads), args.repeat)
            row = f"{file_type:8} {ours:10.3f} {ours / mparams * 1e3:10.1f}"
            if have_llama:
                ref = Path(tmp) / f"llama-{file_type}.gguf"
                theirs = timed(lambda: llama_quantize(src, ref, FILE_TYPES[file_type].ftype, args.threads),
                               args.repeat)
                same = "yes" if sha256(out) == sha256(ref) else "NO"
                row += f" {theirs:12.3f} {theirs / mparams * 1e3:10.1f} {ours / theirs:10.2f}  {same}"
            else:
                row += "   (llama-cpp-python not installed: no llama.cpp peer)"
            print(row)


def perplexity(path: Path, tokens: np.ndarray, max_windows: int) -> float:
    import torch

    from tinygpt.weights.gguf_read import load_gguf

    model, _ = load_gguf(path)
    T = model.config.block_size
    n_windows = min(max_windows, (len(tokens) - 1) // T)
    if n_windows < 1:
        raise SystemExit(f"need more than {T} validation tokens, got {len(tokens)}")
    losses = []
    with torch.no_grad():
        for i in range(n_windows):
            window = torch.from_numpy(tokens[i * T:i * T + T + 1].astype(np.int64))
            _, loss = model(window[None, :-1], window[None, 1:])
            losses.append(float(loss))
    return math.exp(sum(losses) / len(losses))


def bench_quality(args) -> None:
    tokens = np.fromfile(args.val_bin, dtype=np.dtype(args.val_dtype))
    ppl_f16 = perplexity(Path(args.gguf_f16), tokens, args.val_windows)
    ppl_q = perplexity(Path(args.gguf_q), tokens, args.val_windows)
    size_f16, size_q = Path(args.gguf_f16).stat().st_size, Path(args.gguf_q).stat().st_size
    print(f"perplexity on {args.val_bin} (first {args.val_windows} windows): f16 {ppl_f16:.3f} "
          f"({size_f16 / 2**20:.1f} MiB), {Path(args.gguf_q).name} {ppl_q:.3f} ({size_q / 2**20:.1f} MiB): "
          f"+{(ppl_q / ppl_f16 - 1) * 100:.2f}% perplexity for {size_q / size_f16:.2f}x the size")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=["gpt2"], choices=["gpt2", "llama"],
                        help="architectures of the random model, each timed in turn")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--embd", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--types", nargs="+", default=list(FILE_TYPES), choices=list(FILE_TYPES))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--gguf-f16", dest="gguf_f16", help="f16 GGUF of a trained model (quality part)")
    parser.add_argument("--gguf-q", dest="gguf_q", help="the same model quantized (quality part)")
    parser.add_argument("--val-bin", dest="val_bin", help="validation tokens (data/tokens/val.bin)")
    parser.add_argument("--val-dtype", dest="val_dtype", default="uint16", choices=["uint16", "uint32"])
    parser.add_argument("--val-windows", dest="val_windows", type=int, default=200)
    parser.add_argument("--skip-speed", dest="skip_speed", action="store_true")
    args = parser.parse_args()
    if not args.skip_speed:
        for arch in args.arch:
            bench_speed(args, arch)
    quality = [args.gguf_f16, args.gguf_q, args.val_bin]
    if any(quality):
        if not all(quality):
            parser.error("the quality part needs --gguf-f16, --gguf-q and --val-bin together")
        bench_quality(args)


if __name__ == "__main__":
    main()

"""Quantization speed per million parameters, against llama-quantize in the same run; optionally the perplexity it costs.

    python bench/bench_quantize.py                                   # gpt2 and llama, every type, with and without imatrix
    python bench/bench_quantize.py --arch llama --types q4_k_m --repeat 5 --threads 2
    python bench/bench_quantize.py --gguf-f16 exports/tinygpt/model-f16.gguf \\
        --gguf-q exports/tinygpt/model-q4_k_m.gguf --val-bin data/tokens/val.bin     # quality (trained model)

Speed: a random model of the small preset's shape (8 layers x 512, vocab 4096; ~25M parameters) is written as
an f16 GGUF, with an importance matrix for it (tools/make_golden.py's synthetic one: the values do not change the
work), then quantized to each type, without and with the importance matrix, by
`tinygpt.export.quantize.quantize_gguf` (the whole stage: read, quantize, write; in this process, so without
Python's start-up) and by the `llama-quantize` program (tools/build_llama_tools.sh; found as the tests find it)
with the same thread count. The two alternate (ours, theirs, ours, theirs, ...) and each reports its best of
`--repeat` runs: on a machine shared with other work the best run is the least disturbed one. Wall time is the
headline; CPU time (ours: this process; theirs: the child's user + system time) is printed beside it, as it
suffers less from other processes. Every pair of files is compared byte for byte.
Also printed: gguf-py's Q8_0 quantizer against ours on the same tensors (the only type of ours it has).
Quality: perplexity of the validation tokens under the f16 and the quantized GGUF, both read by tinygpt.weights.gguf_read.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # llama_tools: where the llama.cpp programs are
os.environ.setdefault("TINYGPT_NO_PROGRESS", "1")

import gguf  # noqa: E402

from llama_tools import find_llama_tool  # noqa: E402
from tinygpt.common import capped_threads  # noqa: E402
from tinygpt.export.quantize import FILE_TYPES, quantize_gguf  # noqa: E402
from tinygpt.export.quants import quantize  # noqa: E402

IMATRIX = "imatrix.gguf"


def load_make_golden():
    """tools/make_golden.py builds the same kind of GGUF (and importance matrix) the tests use."""
    spec = importlib.util.spec_from_file_location("make_golden", ROOT / "tools" / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_ours(folder: Path, file_type: str, threads: int, imatrix: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of one quantize_gguf run, in `folder` (the importance matrix by its relative name);
    CPU time includes its worker processes'."""
    wall, cpu = time.perf_counter(), time.process_time() + child_cpu()
    quantize_gguf(folder / "model-f16.gguf", folder / "ours.gguf", file_type, threads,
                  imatrix=IMATRIX if imatrix else None)
    return time.perf_counter() - wall, time.process_time() + child_cpu() - cpu


def run_theirs(tool: Path, folder: Path, file_type: str, threads: int, imatrix: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of one llama-quantize run on the same file."""
    cmd = [str(tool)] + (["--imatrix", IMATRIX] if imatrix else []) + \
        ["model-f16.gguf", "llama.gguf", file_type.upper(), str(threads)]
    wall, cpu = time.perf_counter(), child_cpu()
    done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llama-quantize failed: {done.stderr[-2000:]}")
    return time.perf_counter() - wall, child_cpu() - cpu


def bench_speed(args, arch: str) -> None:
    make_golden = load_make_golden()
    # the MLP width tinygpt's model gives each architecture (llama: SwiGLU, 8/3 x rounded up to 256)
    n_ff = 4 * args.embd if arch == "gpt2" else 256 * math.ceil(int(8 * args.embd / 3) / 256)
    spec = make_golden.TestModel("bench", n_embd=args.embd, n_head=8, n_layer=args.layers, n_ff=n_ff,
                                 n_vocab=args.vocab, n_ctx=args.ctx, float_type=gguf.GGMLQuantizationType.F16,
                                 tied=True, arch=arch)
    tool = find_llama_tool("llama-quantize")
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        src = folder / "model-f16.gguf"
        make_golden.write_test_model(spec, src)
        make_golden.write_test_imatrix(make_golden.imatrix_entries(src), folder / IMATRIX)
        os.chdir(folder)  # quantize_gguf records the importance matrix's name as given, like llama-quantize
        reader = gguf.GGUFReader(src)
        n_params = sum(int(t.n_elements) for t in reader.tensors)
        mparams = n_params / 1e6
        print(f"model: {arch}, {args.layers} layers x {args.embd}, vocab {args.vocab}: {mparams:.1f}M parameters; "
              f"threads {args.threads}; best of {args.repeat}, alternating; peer: {tool or 'none found'}")

        # kernel level, one thread each: Q8_0 on every 2-D tensor, ours against gguf-py's numpy quantizer
        q8 = gguf.GGMLQuantizationType.Q8_0
        mats = [np.asarray(t.data, dtype=np.float32) for t in reader.tensors if len(t.shape) == 2]
        mat_m = sum(m.size for m in mats) / 1e6
        ours = timed(lambda: [quantize(m, q8) for m in mats], args.repeat)
        peer = timed(lambda: [gguf.quants.quantize(m, q8) for m in mats], args.repeat)
        print(f"Q8_0 kernel on {mat_m:.1f}M weights, 1 thread: tinygpt {ours / mat_m * 1e3:.1f} ms/M, "
              f"gguf-py {peer / mat_m * 1e3:.1f} ms/M (tinygpt takes {ours / peer:.2f}x gguf-py's time)")

        print(f"{'type':8} {'imatrix':7} {'tinygpt s':>9} {'llama s':>8} {'ratio':>6}   {'CPU: ours s':>11} "
              f"{'theirs s':>8} {'ratio':>6}  identical")
        try:
            for file_type in args.types:
                for imatrix in args.imatrix:
                    ours, theirs = [math.inf, math.inf], [math.inf, math.inf]
                    for _ in range(args.repeat):
                        ours = [min(a, b) for a, b in zip(ours, run_ours(folder, file_type, args.threads, imatrix))]
                        if tool:
                            theirs = [min(a, b) for a, b in zip(theirs, run_theirs(tool, folder, file_type,
                                                                                   args.threads, imatrix))]
                    row = f"{file_type:8} {'yes' if imatrix else 'no':7} {ours[0]:9.3f}"
                    if tool:
                        same = "yes" if sha256(folder / "ours.gguf") == sha256(folder / "llama.gguf") else "NO"
                        row += (f" {theirs[0]:8.3f} {ours[0] / theirs[0]:6.2f}   {ours[1]:11.3f} {theirs[1]:8.3f} "
                                f"{ours[1] / theirs[1]:6.2f}  {same}")
                    else:
                        row += "   (llama-quantize not found: run tools/build_llama_tools.sh)"
                    print(row, flush=True)
        finally:
            os.chdir(cwd)


def timed(fn, repeat: int) -> float:
    """Best wall time of `repeat` runs (the least disturbed by the other work on a shared machine)."""
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


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
    parser.add_argument("--arch", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"],
                        help="architectures of the random model, each timed in turn")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--embd", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--types", nargs="+", default=list(FILE_TYPES), choices=list(FILE_TYPES))
    parser.add_argument("--imatrix", nargs="+", default=["no", "yes"], choices=["no", "yes"],
                        help="without and/or with an importance matrix")
    parser.add_argument("--threads", type=int, default=capped_threads(None), help="default: the usable CPUs")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gguf-f16", dest="gguf_f16", help="f16 GGUF of a trained model (quality part)")
    parser.add_argument("--gguf-q", dest="gguf_q", help="the same model quantized (quality part)")
    parser.add_argument("--val-bin", dest="val_bin", help="validation tokens (data/tokens/val.bin)")
    parser.add_argument("--val-dtype", dest="val_dtype", default="uint16", choices=["uint16", "uint32"])
    parser.add_argument("--val-windows", dest="val_windows", type=int, default=200)
    parser.add_argument("--skip-speed", dest="skip_speed", action="store_true")
    args = parser.parse_args()
    args.imatrix = [choice == "yes" for choice in args.imatrix]
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

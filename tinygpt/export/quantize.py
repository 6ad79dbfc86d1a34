"""The `quantize` stage: an f16/f32/bf16 GGUF in, a quantized GGUF out, equal tensor by tensor to llama-quantize's.

    tinygpt quantize --input model-f16.gguf --out model-q4_k_m.gguf --type q4_k_m [--threads N] [--imatrix FILE]

Which tensor gets which type follows llama.cpp's src/llama-quant.cpp for the file types we offer
(docs/gguf.md#which-tensor-gets-which-type); the bytes come from tinygpt.export.quants. Tensors are written
in llama.cpp's order (by layer, then name) and the metadata is copied with general.quantization_version and
general.file_type set last, as llama.cpp does. With an importance matrix the tensors it covers take ggml's
weighted quantizers, and the `quantize.imatrix.*` keys llama-quantize adds follow
(docs/gguf.md#quantizing-with-an-importance-matrix).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
from concurrent.futures import as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from tinygpt.common import (TinyGPTError, atomic_path, capped_threads, progress, require_file, run_cli,
                            worker_context, worker_pool)
from tinygpt.export.gguf_raw import (Layout, RawTensor, encode_value, gguf_layout, read_raw_gguf, write_raw_gguf,
                                     write_tensor_at)
from tinygpt.export.imatrix import imatrix_values, load_imatrix
from tinygpt.export.quants import quantize

QT = GGMLQuantizationType


@dataclass(frozen=True)
class FileType:
    """A llama.cpp file type (LLAMA_FTYPE_*): its number in general.file_type and its default tensor type."""
    ftype: int
    default: GGMLQuantizationType


FILE_TYPES: dict[str, FileType] = {
    "q4_k_m": FileType(15, QT.Q4_K),
    "q5_k_m": FileType(17, QT.Q5_K),
    "q6_k": FileType(18, QT.Q6_K),
    "q8_0": FileType(7, QT.Q8_0),
    "q5_0": FileType(8, QT.Q5_0),
    "q4_0": FileType(2, QT.Q4_0),
}
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
# A row length that does not fit a type's blocks falls back to this type (then to F16 if that does not fit either).
FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}
# With an importance matrix, llama.cpp gives the ffn_down of the first eighth of the layers a type with a min
# in these file types ("guard against craziness in the first few ffn_down layers").
IMATRIX_FFN_DOWN = {"q4_0": QT.Q4_1, "q5_0": QT.Q5_1}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: GGMLQuantizationType
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length


def llama_order(names: Sequence[str]) -> list[str]:
    """llama.cpp's tensor order: layer number first (non-layer tensors count as layer -1), then name."""
    def key(name: str) -> tuple[int, str]:
        m = re.match(r"blk\.(\d+)\.", name)
        return (int(m.group(1)) if m else -1, name)
    return sorted(names, key=key)


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """The layers whose attention V / ffn_down llama.cpp gives more bits in the _M mixes."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def allows_quantization(t: TensorInfo) -> bool:
    """llama.cpp's tensor_allows_quantization, for the tensor names a GPT-style model can have."""
    n_dims = max((i + 1 for i, n in enumerate(t.ne) if n > 1), default=1)  # ggml_n_dims ignores trailing 1s
    return (n_dims >= 2 and t.name.endswith("weight") and "_norm.weight" not in t.name
            and t.name not in ("position_embd.weight", "token_types.weight"))


def _is_attn_v(name: str) -> bool:
    """Attention V weights, fused or not: llama.cpp counts them to spread extra bits over the layers."""
    return any(part in name for part in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight"))


def plan_tensor_types(tensors: Sequence[TensorInfo], file_type: str, n_layer: int,
                      pure: bool = False, has_imatrix: bool = False) -> dict[str, GGMLQuantizationType]:
    """The type llama-quantize gives each tensor (tensors in llama_order, whose counters this walk reproduces).

    `pure` is llama-quantize's --pure: every quantizable tensor gets the file type's own type, with no
    Q6_K for the output layer and no mix across layers (rows that do not fit it still fall back).
    `has_imatrix`: an importance matrix is given, which changes the first ffn_down layers of q4_0 and q5_0."""
    ft = FILE_TYPES[file_type]
    mixed = file_type in ("q4_k_m", "q5_k_m")
    tied = not any(t.name == "output.weight" for t in tensors)  # the token embedding doubles as the output
    n_attn_v = sum(_is_attn_v(t.name) for t in tensors)
    i_attn_v = i_ffn_down = 0
    plan: dict[str, GGMLQuantizationType] = {}
    for t in tensors:
        if not allows_quantization(t):
            plan[t.name] = t.type
            continue
        new = ft.default
        if pure:
            pass
        elif t.name == "output.weight" or (tied and t.name == "token_embd.weight"):
            if t.ne[0] % GGML_QUANT_SIZES[new][0] != 0:
                new = QT.Q8_0
            elif new != QT.Q8_0:
                new = QT.Q6_K
        elif t.name == "token_embd.weight":
            pass
        elif _is_attn_v(t.name):
            if mixed and use_more_bits(i_attn_v, n_attn_v):
                new = QT.Q6_K
            i_attn_v += 1
        elif "ffn_down" in t.name:
            if mixed and use_more_bits(i_ffn_down, n_layer):
                new = QT.Q6_K
            elif has_imatrix and file_type in IMATRIX_FFN_DOWN and i_ffn_down < n_layer // 8:
                new = IMATRIX_FFN_DOWN[file_type]
            i_ffn_down += 1
        plan[t.name] = _fallback(new, t.ne[0])
    return plan


def _fallback(qtype: GGMLQuantizationType, row_length: int) -> GGMLQuantizationType:
    if row_length % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = FALLBACK.get(qtype, qtype)
    return qtype if row_length % GGML_QUANT_SIZES[qtype][0] == 0 else QT.F16


# ------------------------------------------------------------------------------------------------ reading

def _as_float32(t: RawTensor) -> np.ndarray:
    """A float tensor as float32 in its numpy shape; BF16 widened exactly."""
    if t.type == QT.BF16:
        flat = (t.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        flat = t.data.view(np.float16 if t.type == QT.F16 else np.float32).astype(np.float32)
    return flat.reshape(t.shape)


def _convert(t: RawTensor, qtype: GGMLQuantizationType, threads: int, importance: np.ndarray | None) -> np.ndarray:
    if t.type not in FLOAT_TYPES:
        raise TinyGPTError(f"tensor {t.name} is already {t.type.name} and would need {qtype.name}; "
                           "quantize from the f16 (or f32/bf16) GGUF instead")
    if qtype in (QT.F16, QT.F32):
        return _as_float32(t).astype(np.float16 if qtype == QT.F16 else np.float32, copy=False)
    # F16 and F32 go in as stored: the quantizer widens F16 chunk by chunk in its threads
    values = _as_float32(t) if t.type == QT.BF16 else t.data.view(np.float16 if t.type == QT.F16 else np.float32)
    return quantize(values.reshape(t.shape), qtype, threads=threads, imatrix=importance)


# ------------------------------------------------------------------------------------------------ importance matrix

@dataclass(frozen=True)
class ImatrixInfo:
    """What the llama-quantize tool records about the importance matrix it applied (tools/quantize)."""
    file: str  # the file name as given on the command line
    dataset: str | None  # the first of the file's calibration datasets
    chunk_count: int  # the chunks it was computed on; 0: unknown, not recorded

    def metadata(self, n_entries: int) -> list[tuple[str, Any, GGUFValueType]]:
        """The `quantize.imatrix.*` keys in llama-quantize's order; strings cut to 127 bytes as its
        fixed-size override buffer does."""
        keys: list[tuple[str, Any, GGUFValueType]] = [
            ("quantize.imatrix.file", self.file.encode()[:127], GGUFValueType.STRING)]
        if self.dataset is not None:
            keys.append(("quantize.imatrix.dataset", self.dataset.encode()[:127], GGUFValueType.STRING))
        keys.append(("quantize.imatrix.entries_count", n_entries, GGUFValueType.UINT32))
        if self.chunk_count > 0:
            keys.append(("quantize.imatrix.chunks_count", self.chunk_count, GGUFValueType.UINT32))
        return keys


def _importance_values(imatrix, info: ImatrixInfo | None):
    """(tensor name -> per-column importance, info) from a file name or a mapping; non-finite values refused
    as llama-quantize refuses them."""
    if imatrix is None:
        return None, None
    if isinstance(imatrix, (str, os.PathLike)):
        data = load_imatrix(imatrix)
        if info is None:
            info = ImatrixInfo(os.fspath(imatrix), data.datasets[0] if data.datasets else None, data.chunk_count)
        imatrix = imatrix_values(data)
    values = {name: np.asarray(v, np.float32).reshape(-1) for name, v in imatrix.items()}
    for name, v in values.items():
        bad = v[~np.isfinite(v)]
        if bad.size:
            raise TinyGPTError(f"the importance matrix holds a non-finite value ({bad[0]}) for {name}; "
                               "compute it again from the f16 model (tinygpt imatrix)")
    return values, info


def _tensor_importance(values: Mapping[str, np.ndarray] | None, info: TensorInfo) -> np.ndarray | None:
    """The importance entry of a tensor being quantized, after llama-quantize's size check (ne0 * ne2 values)."""
    if values is None or info.name not in values:
        return None  # quantized without one, as llama-quantize does ("did not find weights")
    v = values[info.name]
    expected = info.ne[0] * (info.ne[2] if len(info.ne) > 2 else 1)
    if v.size == expected:
        return v
    if info.name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return None  # llama.cpp lets this one pass without its entry
    raise TinyGPTError(f"the importance matrix has {v.size} values for {info.name}, which has rows of "
                       f"{info.ne[0]}: it was computed for another model; compute it again from this one")


# ------------------------------------------------------------------------------------------------ the stage

@dataclass(frozen=True)
class _Job:
    """A quantization as its worker processes see it (inherited through the fork, not pickled: the tensors are
    the input file's mapped pages)."""
    by_name: dict[str, RawTensor]
    infos: list[TensorInfo]
    plan: dict[str, GGMLQuantizationType]
    importance: Mapping[str, np.ndarray] | None
    layout: Layout
    fd: int  # the output file, `layout.end` bytes long


_JOB: _Job | None = None  # in a worker


def _init_worker(job: _Job) -> None:
    global _JOB
    _JOB = job


def _write_converted(i: int) -> int:
    """In a worker: convert tensor i of the job on one thread and write it at its offset in the output."""
    job, info = _JOB, _JOB.infos[i]
    data = _convert(job.by_name[info.name], job.plan[info.name], 1, _tensor_importance(job.importance, info))
    write_tensor_at(job.fd, job.layout, i, info.name, data)
    return i


def _forking(threads: int, n_converted: int) -> multiprocessing.context.BaseContext | None:
    """How to start the worker processes that convert: by fork, from two threads and two tensors; else None, no
    workers (a spawned worker would read the model again and could not share the output file's descriptor)."""
    context = worker_context()
    return context if threads >= 2 and n_converted >= 2 and context.get_start_method() == "fork" else None


def _write_by_workers(path: Path, job: _Job, converting: list[int], threads: int, desc: str,
                      context: multiprocessing.context.BaseContext) -> None:
    """Write the quantized file with forked worker processes converting whole tensors, each on one thread, and
    writing them straight at their offsets; the biggest tensors first, so no big one is left for last.

    Processes, not threads over a tensor's rows: the quantizers are many short numpy calls, between which
    threads take turns at Python's interpreter lock (two threads cost 1.4-1.6x one thread's CPU time, and the
    wall time hardly fell). Writing in the workers, not sending the bytes back, spares the pipe (17 MB of Q4_0
    took 50 ms, a third of the whole job)."""
    order = sorted(converting, key=lambda i: -int(np.prod(job.infos[i].ne)))
    copied = sorted(set(range(len(job.infos))) - set(converting))
    with open(path, "wb") as f:
        f.write(job.layout.header)
        f.truncate(job.layout.end)
        f.flush()
        job = replace(job, fd=f.fileno())
        with worker_pool(min(threads, len(order)), _init_worker, (job,), "quantize", context) as pool:
            converted = [pool.submit(_write_converted, i) for i in order]
            bar = progress(total=len(job.infos), desc=desc, unit="tensor")  # after the fork: see worker_context
            for i in copied:  # meanwhile, as stored
                name = job.infos[i].name
                write_tensor_at(job.fd, job.layout, i, name, job.by_name[name].data)
                bar.update()
            for done in as_completed(converted):
                done.result()  # a worker's error, raised here
                bar.update()
            bar.close()


def quantize_gguf(input_path: str | os.PathLike, out_path: str | os.PathLike, file_type: str = "q4_k_m",
                  threads: int | None = None, pure: bool = False,
                  imatrix: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
                  imatrix_info: ImatrixInfo | None = None) -> dict[str, GGMLQuantizationType]:
    """Quantize a float GGUF to `file_type`, like `llama-quantize input out <TYPE>`. Returns name -> new type.

    `imatrix`: an importance-matrix file (then the output is `llama-quantize --imatrix FILE`'s, the file name as
    given recorded in quantize.imatrix.file), or tensor name -> per-column importance (as llama_model_quantize
    takes it: no quantize.imatrix.* keys unless `imatrix_info` says what to record)."""
    if file_type not in FILE_TYPES:
        raise TinyGPTError(f"unknown quantization type {file_type!r}; supported: {', '.join(FILE_TYPES)}")
    input_path = require_file(input_path, "input GGUF", "make it with: tinygpt gguf_convert")
    out_path = Path(out_path)
    if out_path.exists() and out_path.resolve() == input_path.resolve():
        raise TinyGPTError(f"--out {out_path} is the input file; choose another output path")
    threads = capped_threads(threads)
    importance, imatrix_info = _importance_values(imatrix, imatrix_info)

    model = read_raw_gguf(input_path, "pass the f16 GGUF written by tinygpt gguf_convert")
    arch = model.value("general.architecture")
    if arch is None:
        raise TinyGPTError(f"{input_path} has no general.architecture key; it is not a model GGUF")
    by_name = {t.name: t for t in model.tensors}
    infos = [TensorInfo(n, by_name[n].type, by_name[n].ne) for n in llama_order(list(by_name))]
    block_count = model.value(f"{arch}.block_count")
    if block_count is None:
        raise TinyGPTError(f"{input_path} lacks the key {arch}.block_count, which llama.cpp needs as well")
    plan = plan_tensor_types(infos, file_type, int(block_count), pure, has_imatrix=importance is not None)

    # llama.cpp copies the input's keys, then sets its own; setting a key removes it and appends it at the end
    metadata = dict(model.metadata)
    new_keys = [("general.quantization_version", QUANTIZATION_VERSION, GGUFValueType.UINT32),
                ("general.file_type", FILE_TYPES[file_type].ftype, GGUFValueType.UINT32)]
    if imatrix_info is not None and importance is not None:
        new_keys += imatrix_info.metadata(len(importance))
    for name, value, vtype in new_keys:
        metadata.pop(name, None)
        metadata[name] = encode_value(value, vtype)
    for name in ("split.no", "split.count", "split.tensors.count"):  # one output file, as llama-quantize writes
        metadata.pop(name, None)

    tensors = [(i.name, i.ne, plan[i.name]) for i in infos]
    converting = [i for i, info in enumerate(infos) if plan[info.name] != by_name[info.name].type]
    desc = f"quantize {file_type}"
    with atomic_path(out_path) as tmp:
        if forking := _forking(threads, len(converting)):
            job = _Job(by_name, infos, plan, importance, gguf_layout(metadata, tensors), fd=-1)
            _write_by_workers(tmp, job, converting, threads, desc, forking)
        else:
            bar = progress(total=len(infos), desc=desc, unit="tensor")

            def tensor_bytes(i: int):
                info, qtype = infos[i], plan[infos[i].name]
                t = by_name[info.name]
                bar.update()
                return t.data if qtype == t.type else _convert(t, qtype, threads, _tensor_importance(importance, info))

            write_raw_gguf(tmp, metadata, tensors, tensor_bytes)
            bar.close()
    return plan


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tinygpt quantize", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="f16/f32/bf16 GGUF (from tinygpt gguf_convert)")
    parser.add_argument("--out", required=True, help="quantized GGUF to write")
    parser.add_argument("--type", default="q4_k_m", metavar="TYPE",
                        help=f"quantization type: {', '.join(FILE_TYPES)} (default q4_k_m)")
    parser.add_argument("--pure", action="store_true",
                        help="one type for every quantizable tensor, no Q4_K_M-style mix (llama-quantize --pure)")
    parser.add_argument("--threads", type=int, default=None, help="worker threads (default and at most: the usable CPUs)")
    parser.add_argument("--imatrix", help="importance matrix (from tinygpt imatrix or llama-imatrix), as "
                        "llama-quantize --imatrix")
    args = parser.parse_args(argv)
    # the file name, not its values: llama-quantize records the name, datasets and chunk count in the output
    plan = quantize_gguf(args.input, args.out, args.type.lower(), args.threads, args.pure, imatrix=args.imatrix)
    counts: dict[str, int] = {}
    for qtype in plan.values():
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    print(f"wrote {args.out} ({args.type}): " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))


if __name__ == "__main__":
    run_cli(main)

"""Reading a pretrained model: peak memory and time of tinygpt's reader beside transformers' from_pretrained.

    python bench/bench_import.py                    # Qwen2.5-0.5B's shape, bf16, random weights
    python bench/bench_import.py --shape smollm2    # SmolLM2-135M's

Writes a Hugging Face folder of the real shape and vocabulary (random bf16 weights, so nothing is downloaded),
converts it to an f16 GGUF, then reads each in a fresh process and reports its peak resident memory (VmHWM)
and wall time, reading the model and touching every weight once: `read_model` on the folder and on the GGUF
file, and the peer, transformers' `AutoModelForCausalLM.from_pretrained(dtype=bfloat16)` on the folder, in the
same run. A process that only imports torch is measured too: the part of each peak that is not the model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinygpt.export.gguf_convert import convert_to_gguf  # noqa: E402
from tinygpt.export.hf import hf_config  # noqa: E402
from tinygpt.model.gpt import GPTConfig  # noqa: E402
from tinygpt.tokenizer.bpe import Tokenizer  # noqa: E402
from tinygpt.weights.names import config_dims, shape_of, tensor_names  # noqa: E402

SHAPES = {
    "qwen2.5-0.5b": GPTConfig(vocab_size=151936, arch="qwen2", n_layer=24, n_head=14, n_kv_head=2, n_embd=896,
                              n_ff=4864, block_size=32768, norm_eps=1e-6, rope_theta=1e6),
    "smollm2": GPTConfig(vocab_size=49152, arch="llama", n_layer=30, n_head=9, n_kv_head=3, n_embd=576, n_ff=1536,
                         block_size=8192, rope_theta=1e5),
}
# each reads the model and touches every weight once (safetensors maps files lazily: untouched weights cost nothing)
TOUCH = "sum(float(t.sum()) for t in {tensors})"  # no float copy: the peak stays the model's
PROGRAMS = {
    "torch import only": "import torch",
    "tinygpt read_model (HF folder)": ("from tinygpt.weights.read import read_model; "
                                       "s = read_model({path!r})[1]; " + TOUCH.format(tensors="s.values()")),
    "tinygpt read_model (f16 GGUF)": ("from tinygpt.weights.read import read_model; "
                                      "s = read_model({path!r})[1]; " + TOUCH.format(tensors="s.values()")),
    "transformers from_pretrained": ("import torch, transformers; m = transformers.AutoModelForCausalLM."
                                     "from_pretrained({path!r}, dtype=torch.bfloat16); "
                                     + TOUCH.format(tensors="m.parameters()")),
}


def write_folder(config: GPTConfig, folder: Path) -> None:
    """A Hugging Face folder of `config`'s shape: random bf16 weights, and a tokenizer of the full vocabulary
    (placeholder merges: every pair of bytes, then byte triples, as ids need no meaning here)."""
    folder.mkdir(parents=True, exist_ok=True)
    dims = config_dims(config)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name in tensor_names(config.arch, config.n_layer, config.tie_embeddings):
        shape = shape_of(name, dims)
        state[name.hf] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    pairs = [(x, y) for x in range(256) for y in range(256)]  # every 2-byte token, then 3-byte ones
    pairs += [(256 + k, z) for k in range(len(pairs)) for z in range(256)][: config.vocab_size - 257 - len(pairs)]
    tokenizer = Tokenizer(pairs)
    (folder / "config.json").write_text(json.dumps(hf_config(config, tokenizer.eot_id)))
    (folder / "tokenizer.json").write_text(tokenizer.to_json_str())


def measure(program: str) -> tuple[float, float]:
    """Peak resident memory (GB) and wall seconds of `program` in a fresh Python process."""
    # VmHWM is this process's own peak (ru_maxrss would carry over the parent's across fork and exec)
    probe = (f"import re, time; t = time.perf_counter(); {program}; "
             "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1], time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    kb, seconds = out.stdout.split()[-2:]
    return int(kb) / 1e6, float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="qwen2.5-0.5b")
    args = parser.parse_args()
    config = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        start = time.perf_counter()
        write_folder(config, folder)
        gguf = convert_to_gguf(folder, Path(tmp) / "model-f16.gguf", "f16")
        print(f"{args.shape}: folder and f16 GGUF written in {time.perf_counter() - start:.0f} s "
              f"({(folder / 'model.safetensors').stat().st_size / 1e9:.2f} GB safetensors)")
        rows = {}
        for label, program in PROGRAMS.items():
            path = gguf if "GGUF" in label else folder
            rows[label] = measure(program.format(path=str(path)))
            print(f"{label:34s} peak {rows[label][0]:5.2f} GB  {rows[label][1]:6.1f} s", flush=True)
        ours, peer = rows["tinygpt read_model (HF folder)"], rows["transformers from_pretrained"]
        print(f"peak memory tinygpt / transformers: {ours[0] / peer[0]:.2f}; time: {ours[1] / peer[1]:.2f}")


if __name__ == "__main__":
    main()

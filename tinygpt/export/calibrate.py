"""The `imatrix` stage: run the float model over calibration text and write llama.cpp's importance matrix.

    tinygpt imatrix --gguf exports/tinygpt/model-f16.gguf --tokens data/tokens/train.bin --out imatrix.gguf
    tinygpt imatrix --checkpoint checkpoints/best.pt --text calibration.txt --out imatrix.gguf [--chunks 100]

Calibration text is training text: the validation tokens measure what the quantization costs, so they must not
also steer it (llama.cpp's authors warn against calibrating on the test set). As llama-imatrix does, the tokens
are cut into chunks of `--ctx` tokens (default: the model's context), each run from position 0 without the
previous chunk's context, and every position of every chunk counts. A `--text` reads special-token text
(<|endoftext|>) as its one token, as the training tokens hold it; llama-imatrix does so only with
--parse-special (by default it tokenizes the tag's characters), so compare against it with that flag. The file
format lives in tinygpt.export.imatrix, which the quantizer reads without running a model.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np
import torch

from tinygpt.common import TinyGPTError, capped_threads, progress, run_cli
from tinygpt.export.imatrix import ImatrixData, write_imatrix
from tinygpt.model.evaluate import read_tokens
from tinygpt.model.gpt import GPT
from tinygpt.model.hardware import pick_device
from tinygpt.model.sample import load
from tinygpt.weights.names import lm_head_name, tensor_names

MIN_ROWS = 16  # llama-imatrix skips matrix products over fewer tokens than this (its `src1->ne[1] < 16`)


def covered_matrices(model: GPT, process_output: bool = False) -> dict[str, torch.nn.Linear]:
    """GGUF name -> our Linear module, for every matrix llama-imatrix collects: the blocks' weights (`blk.*`),
    and `output.weight` with `process_output` when the head is untied (a tied head multiplies by
    `token_embd.weight`, whose name llama-imatrix never collects)."""
    config = model.config
    modules = dict(model.named_modules())
    covered = {}
    for name in tensor_names(config.arch, config.n_layer, config.tie_embeddings):
        module = modules.get(name.ours.removesuffix(".weight"))
        if name.gguf.startswith("blk.") and isinstance(module, torch.nn.Linear):
            covered[name.gguf] = module
    if process_output and not config.tie_embeddings:
        covered[lm_head_name(config.arch).gguf] = model.lm_head
    return covered


@torch.no_grad()
def collect_imatrix(model: GPT, tokens: np.ndarray, n_ctx: int | None = None, chunks: int | None = None,
                    process_output: bool = False, batch_size: int = 8, dataset: str = "",
                    show_progress: bool = True) -> ImatrixData:
    """Sums of squared inputs of every covered matrix over the first `chunks` chunks of `n_ctx` tokens, as
    llama-imatrix collects them; the model runs in float32 (sums kept in float64, stored as float32)."""
    n_ctx = n_ctx or model.config.block_size
    if not MIN_ROWS <= n_ctx <= model.config.block_size:
        raise TinyGPTError(f"--ctx {n_ctx} must be between {MIN_ROWS} (llama-imatrix ignores shorter products) "
                           f"and the model's context {model.config.block_size}")
    if len(tokens) < 2 * n_ctx:  # llama-imatrix's own minimum
        raise TinyGPTError(f"the calibration text holds {len(tokens)} tokens; a context of {n_ctx} needs at least "
                           f"{2 * n_ctx}: give more text or a smaller --ctx")
    n_chunk = len(tokens) // n_ctx if not chunks else min(chunks, len(tokens) // n_ctx)
    covered = covered_matrices(model, process_output)
    device = next(model.parameters()).device
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64, device=device) for name, m in covered.items()}

    def hook(name):
        def accumulate(module, inputs):
            x = inputs[0].float()
            sums[name] += x.square().sum(dim=tuple(range(x.dim() - 1)), dtype=torch.float64)
        return accumulate

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in covered.items()]
    ids = torch.from_numpy(np.asarray(tokens[: n_chunk * n_ctx], dtype=np.int64)).view(n_chunk, n_ctx)
    try:
        for i in progress(range(0, n_chunk, batch_size), desc="imatrix", unit="batch",
                          **({} if show_progress else {"disable": True})):
            model(ids[i : i + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    counts = n_chunk * n_ctx  # every position of every chunk is one row of every product
    return ImatrixData(
        sums={name: s.float().cpu().numpy().reshape(1, -1) for name, s in sums.items()},
        counts={name: np.array([counts], dtype=np.int64) for name in sums},
        datasets=[dataset or "tokens"], chunk_count=n_chunk, chunk_size=n_ctx,
    )


def main(argv: Sequence[str] | None = None) -> ImatrixData:
    parser = argparse.ArgumentParser(prog="tinygpt imatrix", description=__doc__.split("\n\n")[0])
    model_source = parser.add_mutually_exclusive_group(required=True)
    model_source.add_argument("--gguf", help="the float GGUF to be quantized (e.g. exports/tinygpt/model-f16.gguf)")
    model_source.add_argument("--checkpoint", help="a tinygpt checkpoint (e.g. checkpoints/best.pt)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--tokens", help="training tokens written by tinygpt encode (data/tokens/train.bin)")
    data.add_argument("--text", help="a UTF-8 calibration text (training text, not validation text); "
                      "<|endoftext|> in it is one token, as llama-imatrix --parse-special reads it")
    parser.add_argument("--out", required=True, help="importance matrix to write (GGUF, as llama-imatrix writes)")
    parser.add_argument("--ctx", type=int, default=None, help="chunk length in tokens (default: the model's context)")
    parser.add_argument("--chunks", type=int, default=None, help="use only the first N chunks (default: all)")
    parser.add_argument("--process_output", action="store_true",
                        help="also collect output.weight, when it is not tied (llama-imatrix --process-output)")
    parser.add_argument("--batch_size", type=int, default=8, help="chunks per forward pass")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default and at most: the usable CPUs)")
    args = parser.parse_args(argv)
    if args.chunks is not None and args.chunks < 1:
        raise TinyGPTError(f"--chunks {args.chunks} must be at least 1")
    torch.set_num_threads(capped_threads(args.threads))
    args.hf_dir = None
    model, tokenizer = load(args.checkpoint, args.gguf, pick_device(args.device))
    model.float()
    tokens = read_tokens(args, tokenizer)
    data = collect_imatrix(model, tokens, args.ctx, args.chunks, args.process_output, args.batch_size,
                           dataset=args.tokens or args.text)
    write_imatrix(args.out, data)
    print(f"wrote {args.out}: {len(data.sums)} matrices, {data.chunk_count} chunks of {data.chunk_size} tokens",
          file=sys.stderr)
    return data


if __name__ == "__main__":
    run_cli(main)

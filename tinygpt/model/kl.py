"""How far a quantized model's predictions drift from its float reference: KL divergence, top-1 agreement and the
perplexity ratio on held-out tokens, defined as `llama-perplexity --kl-divergence` reports them.

    tinygpt evaluate --gguf model-q4_k_m.gguf --reference model-f16.gguf --tokens data/tokens/val.bin

As llama-perplexity does, the tokens are cut into chunks of n_ctx tokens (default: the model's context), each run
from position 0, and only the second half of each chunk is scored (positions n_ctx/2 .. n_ctx-2, predicting the
token after each), so that every scored prediction has at least n_ctx/2 tokens of context. For each scored
position, with p the reference's next-token distribution and q the model's:

- KL divergence sum_i p_i (log p_i - log q_i), in nats; its mean and 99th percentile over positions;
- top-1 agreement: the share of positions where both put their highest probability on the same token;
- perplexity ratio PPL(q) / PPL(p) = exp(mean(-log q[next]) - mean(-log p[next])).

llama-perplexity stores the reference's log-probabilities in 16 bits over a 16-nat range and skips tokens below
e^-16; we use the exact values, which differ from those by less than 1e-4 nats per position.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tinygpt.common import TinyGPTError, progress
from tinygpt.model.gpt import GPT
from tinygpt.weights.gguf_read import read_gguf


@dataclass
class KLDivergence:
    mean_kld: float  # nats per scored position
    mean_kld_uncertainty: float  # standard error of the mean, as llama-perplexity prints after ±
    kld_p99: float  # 99th percentile over positions (linear interpolation, as llama-perplexity)
    kld_median: float
    kld_max: float
    same_top: float  # fraction of positions with the same most likely token
    ppl: float  # perplexity of the model
    ppl_reference: float
    ppl_ratio: float  # ppl / ppl_reference
    rms_dp: float  # root mean square of the change in the probability of the actual next token
    tokens: int  # scored positions
    chunks: int
    n_ctx: int


@torch.no_grad()
def kl_divergence(model: GPT, reference: GPT, tokens: np.ndarray, n_ctx: int | None = None,
                  chunks: int | None = None, batch_size: int = 8, show_progress: bool = True) -> KLDivergence:
    """Compare `model` with `reference` (same vocabulary) on `tokens`, chunk by chunk as llama-perplexity does."""
    if model.config.vocab_size != reference.config.vocab_size:
        raise TinyGPTError(f"the model has {model.config.vocab_size} tokens and the reference "
                           f"{reference.config.vocab_size}: compare files of the same model")
    block = min(model.config.block_size, reference.config.block_size)
    n_ctx = n_ctx or block
    if not 4 <= n_ctx <= block:
        raise TinyGPTError(f"a context of {n_ctx} tokens must be between 4 and the models' context {block}")
    if len(tokens) < 2 * n_ctx:  # llama-perplexity's own minimum
        raise TinyGPTError(f"the text holds {len(tokens)} tokens; a context of {n_ctx} needs at least {2 * n_ctx}")
    n_chunk = len(tokens) // n_ctx if not chunks else min(chunks, len(tokens) // n_ctx)
    first = n_ctx // 2
    ids = torch.from_numpy(np.asarray(tokens[: n_chunk * n_ctx], dtype=np.int64)).view(n_chunk, n_ctx)
    device = next(model.parameters()).device
    ref_device = next(reference.parameters()).device
    kld, nll, nll_ref, same = [], [], [], []
    for i in progress(range(0, n_chunk, batch_size), desc="kl divergence", unit="batch",
                      **({} if show_progress else {"disable": True})):
        x = ids[i : i + batch_size]
        target = x[:, first + 1 :].reshape(-1, 1)
        # logits of positions first .. n_ctx-2, in float64 so that small divergences keep their digits
        logq = F.log_softmax(model(x.to(device))[0][:, first:-1].double().cpu(), -1).flatten(0, 1)
        logp = F.log_softmax(reference(x.to(ref_device))[0][:, first:-1].double().cpu(), -1).flatten(0, 1)
        kld.append((logp.exp() * (logp - logq)).sum(-1))
        nll.append(-logq.gather(1, target)[:, 0])
        nll_ref.append(-logp.gather(1, target)[:, 0])
        same.append(logq.argmax(-1) == logp.argmax(-1))
    kld_all, nll_all, nll_ref_all = (torch.cat(v).numpy() for v in (kld, nll, nll_ref))
    n = len(kld_all)
    dp = np.exp(-nll_all) - np.exp(-nll_ref_all)
    log_ratio = nll_all.mean() - nll_ref_all.mean()
    return KLDivergence(
        mean_kld=float(kld_all.mean()),
        mean_kld_uncertainty=float(kld_all.std() / math.sqrt(n - 1)) if n > 10 else 0.0,
        kld_p99=float(np.percentile(kld_all, 99.0)),
        kld_median=float(np.median(kld_all)),
        kld_max=float(kld_all.max()),
        same_top=float(torch.cat(same).double().mean()),
        ppl=float(math.exp(nll_all.mean())),
        ppl_reference=float(math.exp(nll_ref_all.mean())),
        ppl_ratio=float(math.exp(log_ratio)),
        rms_dp=float(math.sqrt((dp**2).mean())),
        tokens=n,
        chunks=n_chunk,
        n_ctx=n_ctx,
    )


def describe(result: KLDivergence) -> str:
    """The figures in llama-perplexity's words, one per line."""
    return "\n".join([
        f"Mean PPL(Q)           : {result.ppl:10.6f}",
        f"Mean PPL(base)        : {result.ppl_reference:10.6f}",
        f"Mean PPL(Q)/PPL(base) : {result.ppl_ratio:10.6f}",
        f"Mean    KLD           : {result.mean_kld:10.6f} ± {result.mean_kld_uncertainty:.6f}",
        f"99.0%   KLD           : {result.kld_p99:10.6f}",
        f"Median  KLD           : {result.kld_median:10.6f}",
        f"Maximum KLD           : {result.kld_max:10.6f}",
        f"RMS Δp                : {100 * result.rms_dp:6.3f} %",
        f"Same top p            : {100 * result.same_top:6.3f} %",
        f"over {result.tokens:,} positions: the second half of {result.chunks} chunks of {result.n_ctx} tokens",
    ])


def quality_rows(gguf_dir: str | Path, kl_dir: str | Path) -> list[tuple[str, ...]]:
    """For the report: each model-*.gguf in `gguf_dir` that has a KL result `kl_dir/<file stem>.json` (tinygpt
    evaluate --reference --json): whether an importance matrix made it (llama-quantize's quantize.imatrix.file
    key) and its drift from the reference."""
    rows = []
    for path in sorted(Path(gguf_dir).glob("model-*.gguf")):
        result_path = Path(kl_dir) / f"{path.stem}.json"
        if not result_path.is_file():
            continue
        try:
            result = json.loads(result_path.read_text(encoding="utf-8"))
            figures = (result["mean_kld"], result["kld_p99"], result["same_top"], result["ppl_ratio"])
        except (ValueError, KeyError, TypeError):
            raise TinyGPTError(f"{result_path} is not a result of tinygpt evaluate --reference; delete it and rerun "
                               "the workflow") from None
        imatrix = read_gguf(path).get_field("quantize.imatrix.file")
        mean_kld, kld_p99, same_top, ppl_ratio = figures
        rows.append((path.name, Path(imatrix.contents()).name if imatrix else "none", f"{mean_kld:.5f}",
                     f"{kld_p99:.4f}", f"{100 * same_top:.2f} %", f"{100 * (ppl_ratio - 1):+.2f} %"))
    return rows


QUALITY_HEADER = ("file", "importance matrix", "mean KLD", "99% KLD", "same top token", "perplexity vs f16")

"""Chat benchmark: what chat tuning teaches the toy model, what it costs, and whether llama.cpp keeps it.

    python bench/bench_chat.py --work /tmp/bench_chat            # fresh clone, build, score 200 prompts
    python bench/bench_chat.py --work /tmp/bench_chat --count 50 # reuse the build, fewer prompts

1. Build: a fresh clone of this checkout in --work runs `snakemake --cores 4 exports/tinygpt-chat/model-q4_k_m.gguf`
   (the base model, then the chat model); the wall clock of the whole build and of each chat rule, and the
   fine-tuning's tokens/s beside the base training's (from the runs' metrics, same machine, same run).
2. Scores on prompts from evaluation seeds no training conversation came from (tinygpt chat_eval): story requests
   fully honoured, story questions answered exactly. Rows: the chat model through our sampler (float, and the
   q4_k_m file dequantized), the q4_k_m file through llama.cpp's own chat handling (llama-cpp-python applies the
   file's chat template), and the base model given the same words, as plain text and in ChatML: the peer.
3. The context: the chat model works in chat.block_size tokens, the base is trained at model.block_size. The cost
   of training the base at the chat context instead: a toy training step at each context, same tokens per step.

    python bench/bench_chat.py --induction 1500                  # only: when does the toy shape learn to copy?

4. Induction (alone, with --induction STEPS): both chat tasks are copying, which needs induction heads. The toy
   shape is trained from scratch on nothing but copying (random sequences over --symbols symbols, each shown twice)
   at the base model's batch and context; the loss on second showings falls from ln(symbols) towards 0 once it
   copies. Beside it, the step at which Aoyama et al. (2025, "Predicting the formation of induction heads") predict
   induction heads to form: 10^5.7 * sqrt(batch * context) tokens.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinygpt.model.chat_eval import chat_reply, copying, describe_copying, plain_reply, score  # noqa: E402
from tinygpt.model.gpt import GPT, config_from_preset  # noqa: E402
from tinygpt.model.sample import load  # noqa: E402

TARGET = "exports/tinygpt-chat/model-q4_k_m.gguf"


def build(work: Path) -> float | None:
    """Clone this checkout into `work` and build the chat model; the wall clock, or None when it was built."""
    if (work / TARGET).exists():
        return None
    subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "--cores", "4", TARGET], cwd=work, check=True,
                   env={**os.environ, "TINYGPT_NO_PROGRESS": "1"})
    return time.perf_counter() - start


def rule_seconds(work: Path, rule: str) -> float | None:
    """The wall clock Snakemake's benchmark file records for `rule` (the mean of its runs); None if it never ran."""
    path = work / "benchmarks" / f"{rule}.tsv"
    if not path.exists():
        return None
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return sum(float(r["s"]) for r in rows) / len(rows)


def tokens_per_s(runs: Path) -> float:
    """Mean training tokens/s over the logged steps of the newest run under `runs`."""
    run = max(runs.iterdir(), key=lambda p: p.stat().st_mtime)
    rates = [r["tokens_per_s"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r.get("tokens_per_s")]
    return sum(rates) / len(rates)


def llama_cpp_reply(path: Path, context: int):
    """Replies from llama.cpp's chat completion on the GGUF file, with the chat template the file carries."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=context, n_threads=2, verbose=False, seed=0)

    def reply(messages: list[dict]) -> str:
        out = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, max_tokens=context)
        return out["choices"][0]["message"]["content"] or ""

    return reply


def step_seconds(block_size: int, batch_size: int, steps: int = 6) -> float:
    """Best time of a toy llama training step (forward, backward, AdamW) at this context, fp32 on the CPU."""
    torch.manual_seed(0)
    model = GPT(config_from_preset("toy", 4096, arch="llama", block_size=block_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(4096, (batch_size, block_size + 1))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def induction(steps: int, symbols: int, lr: float = 1e-3, batch: int = 16, context: int = 128,
              every: int = 100) -> None:
    """Train the toy llama from scratch on sequences shown twice; print the mean loss on first and second
    showings over each `every` steps."""
    torch.manual_seed(0)
    model = GPT(config_from_preset("toy", 4096, arch="llama", block_size=context))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)

    def row() -> tuple[list[int], list[bool]]:
        ids, second = [], []
        while len(ids) <= context:
            length = int(torch.randint(8, context // 2 + 1, (1,), generator=gen))
            seq = torch.randint(symbols, (length,), generator=gen).tolist()
            ids, second = ids + seq + seq, second + [False] * length + [True] * length
        return ids[: context + 1], second[1 : context + 1]

    predicted = 10**5.7 * (batch * context) ** 0.5
    print(f"induction: toy llama from scratch, {symbols} symbols, {batch} x {context} tokens a step; Aoyama et al.'s "
          f"law puts induction heads at {predicted / 1e6:.0f}M tokens, step {predicted / (batch * context):,.0f}")
    sums = torch.zeros(2)
    counts = torch.zeros(2)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        rows = [row() for _ in range(batch)]
        x = torch.tensor([r[0] for r in rows])
        second = torch.tensor([r[1] for r in rows])
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 20)
        logits, _ = model(x[:, :-1])
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        nll.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for i, mask in enumerate((~second, second)):
            sums[i] += nll.detach()[mask].sum()
            counts[i] += mask.sum()
        if step % every == 0 or step == steps:
            first, again = (sums / counts).tolist()
            print(f"  step {step:6d}: loss {first:.2f} nats on first showings, {again:.2f} on second "
                  f"(ln {symbols} = {math.log(symbols):.2f}; copying: 0)   {time.perf_counter() - start:5.0f} s",
                  flush=True)
            sums.zero_()
            counts.zero_()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_chat"), help="the clone to build in (reused)")
    parser.add_argument("--count", type=int, default=200, help="evaluation prompts per row")
    parser.add_argument("--skip_llama_cpp", action="store_true", help="leave out the llama.cpp row")
    parser.add_argument("--induction", type=int, metavar="STEPS", help="only the induction probe, this many steps")
    parser.add_argument("--symbols", type=int, default=64, help="the induction probe's alphabet")
    parser.add_argument("--lr", type=float, default=1e-3, help="the induction probe's peak learning rate")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.induction:
        induction(args.induction, args.symbols, args.lr)
        return

    wall = build(args.work)
    work = args.work
    print(f"build: {'already built' if wall is None else f'{wall:.0f} s for {TARGET} on a fresh clone'}")
    for rule in ("train", "chat_data", "chat_encode", "chat_train", "chat_export"):
        seconds = rule_seconds(work, rule)
        print(f"  {rule:12s} " + ("not run by Snakemake here" if seconds is None else f"{seconds:7.1f} s"))
    base_rate, chat_rate = tokens_per_s(work / "checkpoints/runs"), tokens_per_s(work / "checkpoints/chat/runs")
    print(f"fine-tuning: {chat_rate:,.0f} tokens/s at the chat context vs the base training's {base_rate:,.0f} "
          f"({chat_rate / base_rate:.2f}x)")

    torch.set_grad_enabled(False)
    chat, tokenizer = load(str(work / "checkpoints/chat/best.pt"), None, torch.device("cpu"))
    base, _ = load(str(work / "checkpoints/best.pt"), None, torch.device("cpu"))
    quantized, _ = load(None, str(work / TARGET), torch.device("cpu"))
    rows = {
        "chat model, float (ours)": lambda m: chat_reply(chat, tokenizer, m),
        "chat model, q4_k_m (ours)": lambda m: chat_reply(quantized, tokenizer, m),
        "base model, plain text": lambda m: plain_reply(base, tokenizer, m, max_tokens=300),
        "base model, ChatML": lambda m: chat_reply(base, tokenizer, m, max_tokens=300),
    }
    for name, model in (("base", base), ("chat", chat)):  # what both tasks need (chat_eval's docstring)
        print(f"{name} model {describe_copying(copying(model, tokenizer))}")
    if not args.skip_llama_cpp:
        rows["chat model, q4_k_m (llama.cpp)"] = llama_cpp_reply(work / TARGET, chat.config.block_size)
    print(f"\n{'':34s} {'requests honoured':>18s} {'questions exact':>16s}   ({args.count} prompts, greedy)")
    for name, reply in rows.items():
        start = time.perf_counter()
        tasks = score(reply, args.count)["tasks"]
        rates = [f"{tasks[t]['right']:>4d}/{tasks[t]['asked']:<4d} {tasks[t]['rate']:4.0%}" if t in tasks else "-"
                 for t in ("story", "qa")]
        print(f"{name:34s} {rates[0]:>18s} {rates[1]:>16s}   {time.perf_counter() - start:5.0f} s")

    torch.set_grad_enabled(True)
    short, long = step_seconds(128, 16), step_seconds(512, 4)
    print(f"\ncontext: a toy training step of 2,048 tokens takes {short * 1e3:.0f} ms at 128 tokens, "
          f"{long * 1e3:.0f} ms at 512 ({long / short:.2f}x): the base trains at 128, the chat model at 512")


if __name__ == "__main__":
    main()

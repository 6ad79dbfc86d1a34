"""Figures and tables for `snakemake --report`: the loss curve, bits per byte, tokenizer and corpus statistics,
the GGUF files' sizes and the time every rule took.

    tinygpt report --runs_dir checkpoints/runs --data_dir data/tokens \\
        --tokenizer data/tokenizer/tokenizer.json --corpus_stats data/clean/corpus.stats.json \\
        --gguf_dir exports/tinygpt --benchmarks benchmarks --skip report \\
        --loss_svg reports/loss.svg --training reports/training.html --data reports/data.html \\
        --gguf reports/gguf.html --timings reports/timings.html

Snakemake's report shows images and HTML pages inline (other files only as downloads), so every table is a small
HTML page and the loss curve an SVG drawn here, without a plotting library.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tinygpt.model.chat_eval import describe_copying
from tinygpt.model.checkpoint import load_checkpoint
from tinygpt.common import TinyGPTError, atomic_open, require_file, run_cli
from tinygpt.model.batches import TokenFile, read_meta, token_dtype
from tinygpt.model.kl import QUALITY_HEADER, quality_rows
from tinygpt.weights.gguf_read import read_gguf
from tinygpt.tokenizer.bpe import Tokenizer

Row = Sequence[object]


# --- training metrics ----------------------------------------------------------------------------------------


def checkpoint_run(checkpoint: str | Path, runs_dir: str | Path) -> Path:
    """The run folder that produced `checkpoint` (the final checkpoint names it), with its metrics.jsonl."""
    run = Path(runs_dir) / str(load_checkpoint(checkpoint).get("run", ""))
    if not (run / "metrics.jsonl").is_file():
        raise TinyGPTError(f"no metrics.jsonl for the run of {checkpoint} under {runs_dir}; rerun the train stage")
    return run


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, in step order: every one has `step` and, after step 0, `train_loss`;
    evaluations add `val_loss` and `val_bpb` (step 0's record is the evaluation before training), logging steps
    `tokens_per_s`."""
    path = require_file(path, "training metrics", "run the train stage first")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            trained = record.get("step") != 0  # step 0: the validation before the first step, no training loss
            if not isinstance(record.get("step"), int) or (trained and not isinstance(record.get("train_loss"),
                                                                                       (int, float))):
                raise ValueError("no integer 'step' or numeric 'train_loss'")
        except (ValueError, AttributeError) as e:
            raise TinyGPTError(f"{path} line {number} is not a metrics record ({e}); rerun the train stage") from None
        records.append(record)
    if not records:
        raise TinyGPTError(f"{path} holds no records; rerun the train stage")
    return sorted(records, key=lambda r: r["step"])


def evaluations(records: list[dict]) -> list[dict]:
    return [r for r in records if "val_loss" in r]


def best_evaluation(records: list[dict]) -> dict:
    """The evaluation the final checkpoint comes from: the lowest validation loss (the first one, on a tie) after
    step 0 (the untrained start is no candidate)."""
    evals = [r for r in evaluations(records) if r["step"] > 0]
    if not evals:
        raise TinyGPTError("the training metrics hold no evaluation; rerun the train stage")
    return min(evals, key=lambda r: r["val_loss"])


def training_page(records: list[dict], run_config: dict | None = None, evaluation: dict | None = None) -> str:
    best = best_evaluation(records)
    summary = []
    if evaluation:
        summary.append(
            f"Held-out validation text: <b>{evaluation['bits_per_byte']:.4f} bits per byte</b> for the final "
            f"checkpoint, every one of its {evaluation['tokens']:,} tokens scored with up to "
            f"{evaluation['block_size']} tokens of context (sliding windows, stride {evaluation['stride']}).")
    summary.append(
        f"During training: best validation <b>{best['val_bpb']:.4f}</b> bits per byte ({best['val_loss']:.4f} nats "
        f"per token, on fixed random windows) at step {best['step']:,} of {records[-1]['step']:,}: the final "
        "checkpoint.")
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    utilizations = [r["mfu"] for r in records if "mfu" in r]
    if speeds:
        mfu = f", {statistics.median(utilizations):.0%} of the measured matmul peak (MFU)" if utilizations else ""
        summary.append(f"Training throughput: {statistics.median(speeds):,.0f} tokens/s{mfu} "
                       "(medians of the logged steps).")
    if run_config:
        model, training = run_config.get("model", {}), run_config.get("training", {})
        summary.append(what_was_trained(model, training))
        summary.append(
            f"Model: {model.get('n_layer')} layers, {model.get('n_head')} heads, {model.get('n_embd')} wide, "
            f"context {model.get('block_size')}, vocabulary {model.get('vocab_size')}; "
            f"mixed precision {run_config.get('amp_chosen', training.get('amp'))} (setting {training.get('amp')}), "
            f"{training.get('world_size')} process(es)."
        )
    rows = [
        (f"{r['step']:,}", f"{r['val_bpb']:.4f}", f"{r['val_loss']:.4f}",
         f"{r['train_loss']:.4f}" if "train_loss" in r else "", "best" if r is best else "untrained" if r["step"] == 0 else "")
        for r in evaluations(records)
    ]
    table = html_table(("step", "validation bits/byte", "validation loss", "train loss", ""), rows)
    return html_page("Training", summary, table)


ARCHITECTURES = {
    "llama": "Llama-shaped: RMSNorm, rotary positions, SwiGLU MLP, no biases",
    "gpt2": "GPT-2-shaped: LayerNorm, learned positions, GELU MLP",
}
OPTIMIZERS = {"adamw": "AdamW", "muon": "Muon for the hidden weight matrices, AdamW for the rest"}


def what_was_trained(model: dict, training: dict) -> str:
    """One sentence from the run's own record (config.json): the architecture and the optimizer."""
    arch, optimizer = model.get("arch", "gpt2"), training.get("optimizer", "adamw")
    kv = model.get("n_kv_head")
    grouped = f", {kv} key/value heads" if arch == "llama" and kv and kv != model.get("n_head") else ""
    lr = f"peak learning rate {training['lr']:g}" if "lr" in training else ""
    if optimizer == "muon" and training.get("muon_lr") is not None:
        lr += f" (Muon {training['muon_lr']:g})"
    return (f"Architecture: <b>{html.escape(str(arch))}</b> ({ARCHITECTURES.get(arch, 'unknown')}{grouped}); "
            f"optimizer <b>{html.escape(OPTIMIZERS.get(optimizer, str(optimizer)))}</b>"
            f"{', ' + lr if lr else ''}, {training.get('max_steps', '?')} steps.")


# --- the loss curve ------------------------------------------------------------------------------------------


def nice_ticks(low: float, high: float, target: int = 5, integer: bool = False) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten apart; whole numbers if `integer`) covering
    [low, high]."""
    if high <= low:
        low, high = low - 0.5, high + 0.5
    raw = max((high - low) / target, 1.0) if integer else (high - low) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    multiples = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = next(m * magnitude for m in multiples if m * magnitude >= raw)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


@dataclass(frozen=True)
class Axis:
    """Maps data values in [low, high] linearly onto pixels [start, end] (end < start for a y axis)."""

    low: float
    high: float
    start: float
    end: float

    def __call__(self, value: float) -> float:
        return self.start + (value - self.low) / (self.high - self.low) * (self.end - self.start)


def loss_curve_svg(records: list[dict], width: int = 720, height: int = 400) -> str:
    """Training and validation loss against the step, as a standalone SVG."""
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in evaluations(records)]
    losses = [loss for _, loss in train + val]
    x_ticks = nice_ticks(0, max(step for step, _ in train), integer=True)
    y_ticks = nice_ticks(min(losses), max(losses))
    left, right, top, bottom = 64, width - 20, 40, height - 48
    x = Axis(x_ticks[0], x_ticks[-1], left, right)
    y = Axis(y_ticks[0], y_ticks[-1], bottom, top)

    def polyline(points: list[tuple[float, float]], color: str, name: str) -> str:
        coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
        return f'<polyline class="{name}" fill="none" stroke="{color}" stroke-width="1.8" points="{coords}"/>'

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">Loss during training</text>',
    ]
    for tick in x_ticks:
        parts.append(f'<line x1="{x(tick):.1f}" y1="{top}" x2="{x(tick):.1f}" y2="{bottom}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{x(tick):.1f}" y="{bottom + 16}" text-anchor="middle">{tick:g}</text>')
    for tick in y_ticks:
        parts.append(f'<line x1="{left}" y1="{y(tick):.1f}" x2="{right}" y2="{y(tick):.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    parts += [
        f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#888"/>',
        f'<text x="{(left + right) / 2}" y="{height - 10}" text-anchor="middle">step</text>',
        f'<text transform="translate(16 {(top + bottom) / 2}) rotate(-90)" text-anchor="middle">'
        "loss (nats per token)</text>",
        polyline(train, "#1f77b4", "train"),
        polyline(val, "#ff7f0e", "validation"),
        *(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="3" fill="#ff7f0e"/>' for s, v in val),
    ]
    for i, (name, color) in enumerate((("train", "#1f77b4"), ("validation", "#ff7f0e"))):
        row = top + 18 + 18 * i
        parts.append(f'<line x1="{right - 110}" y1="{row}" x2="{right - 86}" y2="{row}" stroke="{color}" '
                     'stroke-width="2"/>')
        parts.append(f'<text x="{right - 80}" y="{row + 4}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# --- data: tokenizer and corpus ------------------------------------------------------------------------------


def val_bytes_per_token(tokens: str | Path, tokenizer_path: str | Path, vocab_size: int) -> float:
    """Mean bytes of text per token of a token file, counted as training counts them for bits per byte (each
    token's byte length; <|endoftext|> stands for no text and counts 0)."""
    tokenizer = Tokenizer.load(tokenizer_path)
    if tokenizer.vocab_size != vocab_size:
        raise TinyGPTError(f"{tokenizer_path} has {tokenizer.vocab_size} tokens but {tokens} was encoded with "
                           f"{vocab_size}; rerun the encode stage")
    return TokenFile.open(tokens, token_dtype(vocab_size), 1).bytes_per_token(tokenizer.vocab,
                                                                   tokenizer.special_tokens.values())


def data_rows(meta: dict, bytes_per_token: float, corpus_stats: dict, tokenizer: Tokenizer) -> list[tuple[str, str]]:
    tokens, documents = meta.get("tokens", {}), meta.get("documents", {})
    rows = [
        ("vocabulary size (with special tokens)", f"{meta['vocab_size']:,}"),
        ("special tokens", " ".join(tokenizer.special_tokens)),
        ("merges learned", f"{len(tokenizer.merges):,}"),
        ("bytes per token (validation split)", f"{bytes_per_token:.3f}"),
        ("training tokens", f"{tokens.get('train', 0):,}"),
        ("validation tokens", f"{tokens.get('val', 0):,}"),
        ("training documents", f"{documents.get('train', 0):,}"),
        ("validation documents", f"{documents.get('val', 0):,}"),
    ]
    for key, value in corpus_stats.items():
        if key in ("input", "output"):
            continue
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        rows.append((f"cleaning: {key.replace('_', ' ')}", shown))
    return rows


def read_json(path: str | Path, what: str, hint: str) -> dict:
    path = require_file(path, what, hint)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TinyGPTError(f"{path} is not valid JSON ({e}); {hint}") from None
    if not isinstance(data, dict):
        raise TinyGPTError(f"{path} does not hold a JSON object; {hint}")
    return data


# --- GGUF files ----------------------------------------------------------------------------------------------


def gguf_rows(folder: str | Path) -> list[tuple[str, str, str, str, str]]:
    """Every model-*.gguf in `folder`, largest first: size, bits per weight of the tensor data, share of f16."""
    files = sorted(Path(folder).glob("model-*.gguf"), key=lambda p: (-p.stat().st_size, p.name))
    if not files:
        raise TinyGPTError(f"no model-*.gguf file in {folder}; run the gguf_convert and quantize stages first")
    sizes = {p.name: p.stat().st_size for p in files}
    f16_size = sizes.get("model-f16.gguf")
    rows = []
    for path in files:
        tensors = read_gguf(path).tensors
        bits = 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)
        share = f"{100 * sizes[path.name] / f16_size:.1f} %" if f16_size else ""
        rows.append((path.name, path.stem.removeprefix("model-"), f"{sizes[path.name] / 2**20:,.2f}", f"{bits:.2f}", share))
    return rows


# --- timings -------------------------------------------------------------------------------------------------


def timing_rows(folder: str | Path, skip: Sequence[str] = ()) -> list[tuple[str, str, str, str]]:
    """One row per benchmarks/<rule>.tsv (the mean of its lines), in the order the rules finished, and a total:
    wall-clock seconds, CPU seconds, peak resident memory (MiB)."""
    # a rule with wildcards writes <rule>-<wildcards>.tsv
    files = [p for p in Path(folder).glob("*.tsv") if p.stem.split("-")[0] not in skip]
    rows, total_wall, total_cpu = [], 0.0, 0.0
    for path in sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name)):
        with open(path, newline="") as f:
            lines = list(csv.DictReader(f, delimiter="\t"))
        wall, cpu, rss = (_mean(lines, column) for column in ("s", "cpu_time", "max_rss"))
        if wall is None:
            raise TinyGPTError(f"{path} is not a Snakemake benchmark file (no 's' column with numbers); delete it")
        total_wall += wall
        total_cpu += cpu or 0.0
        rows.append((path.stem, f"{wall:,.1f}", _number(cpu, ",.1f"), _number(rss, ",.0f")))
    rows.append(("total", f"{total_wall:,.1f}", f"{total_cpu:,.1f}", ""))
    return rows


def _mean(lines: list[dict], column: str) -> float | None:
    """The mean of a benchmark column over its lines, None where it is missing or NA."""
    try:
        values = [float(line[column]) for line in lines]
    except (KeyError, TypeError, ValueError):
        return None
    return sum(values) / len(values) if values else None


def _number(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


# --- HTML ----------------------------------------------------------------------------------------------------

STYLE = (
    "body{font-family:sans-serif;margin:1.5em;color:#222}"
    "table{border-collapse:collapse}th,td{padding:.3em .8em;border-bottom:1px solid #ddd}"
    "th{text-align:left;background:#f4f4f4}td{text-align:right}td:first-child{text-align:left}"
)


def html_table(header: Row, rows: Sequence[Row]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>"


def html_page(title: str, paragraphs: Sequence[str], table: str) -> str:
    """A standalone page; `paragraphs` are trusted HTML written by this module."""
    text = "".join(f"<p>{p}</p>\n" for p in paragraphs)
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n<h2>{html.escape(title)}</h2>\n{text}{table}\n</body></html>\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def chat_page(scores: dict) -> str:
    """The chat model's scores per task (tinygpt chat_eval) and the sample conversations, replies marked right or
    wrong."""
    rows = [(task, f["asked"], f["right"], f"{f['rate']:.0%}") for task, f in sorted(scores["tasks"].items())]
    shown = []
    for sample in scores["samples"]:
        turns = "".join(f"<b>{html.escape(m['role'])}:</b> {html.escape(m['content'])}<br>\n" for m in sample["messages"])
        verdict = "right" if sample["correct"] else "wrong"
        shown.append(f"<i>{html.escape(sample['task'])}</i><br>\n{turns}<b>assistant ({verdict}):</b> "
                     f"{html.escape(sample['reply'])}")
    intro = [f"Greedy replies of the chat model to prompts from evaluation seeds that no training conversation came "
             f"from ({sum(r[1] for r in rows)} in all); story requests are right when the reply names every part "
             "asked for, questions when the answer is exact."]
    if "copying" in scores:  # what both tasks need (tinygpt.model.chat_eval.copying)
        intro.append(f"In-context {describe_copying(scores['copying'])}.")
    return html_page("Chat", intro, html_table(("task", "asked", "right", "rate"), rows)
                     + "\n<h3>Sample conversations</h3>\n" + "".join(f"<p>{s}</p>\n" for s in shown))


# --- the stage -----------------------------------------------------------------------------------------------


def write_report(args: argparse.Namespace) -> None:
    """Read every input first, then write the outputs: bad input leaves no output behind."""
    run = checkpoint_run(args.checkpoint, args.runs_dir)
    records = read_metrics(run / "metrics.jsonl")
    run_config = read_json(run / "config.json", "run settings", "rerun the train stage")
    evaluation = args.evaluation and read_json(args.evaluation, "evaluation", "rerun the evaluate rule")
    meta = read_meta(args.data_dir)
    bytes_per_token = val_bytes_per_token(Path(args.data_dir) / "val.bin", args.tokenizer, meta["vocab_size"])
    data = data_rows(meta, bytes_per_token, read_json(args.corpus_stats, "corpus statistics", "rerun the clean stage"),
                     Tokenizer.load(args.tokenizer))
    ggufs = gguf_rows(args.gguf_dir)
    quality = quality_rows(args.gguf_dir, args.kl_dir) if args.kl_dir else []
    timings = timing_rows(args.benchmarks, args.skip)
    chat = args.chat and read_json(args.chat, "chat scores", "rerun the chat_eval rule")

    write_text(args.loss_svg, loss_curve_svg(records))
    write_text(args.training, training_page(records, run_config, evaluation))
    write_text(args.data, html_page("Tokenizer and corpus", [], html_table(("statistic", "value"), data)))
    write_text(args.gguf, html_page(
        "GGUF files", [f"In {html.escape(str(args.gguf_dir))}; bits per weight count the tensor data only."],
        html_table(("file", "type", "MiB", "bits per weight", "size of f16"), ggufs)
        + (f"\n<p>Against {html.escape(str(args.gguf_dir))}/model-f16.gguf on the validation tokens, as "
           "llama-perplexity --kl-divergence measures (docs/gguf.md#kl-divergence):</p>\n"
           + html_table(QUALITY_HEADER, quality) if quality else "")))
    write_text(args.timings, html_page(
        "Time per rule", [f"From Snakemake's benchmark files in {html.escape(str(args.benchmarks))}, "
                          "in the order the rules finished."],
        html_table(("rule", "wall clock (s)", "CPU (s)", "peak memory (MiB)"), timings)))
    if chat:
        write_text(args.chat_page, chat_page(chat))
    print(f"report: best validation loss {best_evaluation(records)['val_loss']:.4f} in run {run.name}; "
          f"{len(ggufs)} GGUF files; {len(timings) - 1} timed rules")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tinygpt report", description=__doc__.split("\n\n")[0])
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--checkpoint", required=True, help="final checkpoint of the train stage")
    inputs.add_argument("--runs_dir", required=True, help="training run folders (the checkpoint's own is reported)")
    inputs.add_argument("--data_dir", required=True, help="folder with meta.json and val.bin (encode stage)")
    inputs.add_argument("--tokenizer", required=True, help="tokenizer.json the tokens were encoded with")
    inputs.add_argument("--corpus_stats", required=True, help="corpus.stats.json of the clean stage")
    inputs.add_argument("--gguf_dir", required=True, help="folder with the model-*.gguf files")
    inputs.add_argument("--evaluation", help="JSON of tinygpt evaluate on the validation tokens (optional)")
    inputs.add_argument("--kl_dir", help="folder of tinygpt evaluate --reference results, model-<type>.json (optional)")
    inputs.add_argument("--chat", help="JSON of tinygpt chat_eval on the chat model (optional; needs --chat_page)")
    inputs.add_argument("--benchmarks", required=True, help="folder of Snakemake's benchmark files (<rule>.tsv)")
    inputs.add_argument("--skip", action="append", default=[], metavar="RULE",
                        help="leave this rule's benchmark out of the timings (repeatable)")
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--loss_svg", required=True, help="loss curve (SVG)")
    outputs.add_argument("--training", required=True, help="evaluations and bits per byte (HTML)")
    outputs.add_argument("--data", required=True, help="tokenizer and corpus statistics (HTML)")
    outputs.add_argument("--gguf", required=True, help="GGUF file sizes (HTML)")
    outputs.add_argument("--timings", required=True, help="time per rule (HTML)")
    outputs.add_argument("--chat_page", help="the chat model's scores and sample conversations (HTML)")
    args = parser.parse_args(argv)
    if bool(args.chat) != bool(args.chat_page):
        parser.error("--chat and --chat_page go together: the scores and the page they make")
    write_report(args)


if __name__ == "__main__":
    run_cli(main)

"""tinygpt.report on small fabricated inputs: the numbers in its tables, and the data points in its SVG plot."""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import gguf
import numpy as np
import pytest

from tinygpt import report
from tinygpt.model.checkpoint import save_checkpoint
from tinygpt.common import TinyGPTError
from tinygpt.tokenizer.train_bpe import train_bpe

SVG = "{http://www.w3.org/2000/svg}"

# What training writes: logging steps (throughput), evaluations (val loss, bits per byte) and steps that are both.
METRICS = [
    {"step": 10, "train_loss": 6.0, "lr": 1e-3, "tokens_per_s": 1000.0, "flops_per_s": 1e9, "mfu": 0.1},
    {"step": 20, "train_loss": 5.0, "val_loss": 5.2, "val_bpb": 2.6},
    {"step": 30, "train_loss": 4.5, "lr": 1e-3, "tokens_per_s": 3000.0, "flops_per_s": 3e9, "mfu": 0.3},
    {"step": 40, "train_loss": 4.0, "lr": 1e-3, "tokens_per_s": 2000.0, "flops_per_s": 2e9, "mfu": 0.2, "val_loss": 4.1,
     "val_bpb": 2.05},
    {"step": 50, "train_loss": 3.9, "val_loss": 4.3, "val_bpb": 2.15},
]
RUN_CONFIG = {"model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32, "vocab_size": 300},
              "training": {"amp": "bf16", "world_size": 1}}


def write_run(runs_dir: Path, name: str, records: list[dict]) -> Path:
    run = runs_dir / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "config.json").write_text(json.dumps(RUN_CONFIG))
    return run


def table_rows(page: str) -> list[list[str]]:
    """The cells of the table in one of report's HTML pages."""
    table = ET.fromstring(page[page.index("<table>"):page.index("</table>") + len("</table>")])
    return [[cell.text or "" for cell in row] for row in table]


# --- training --------------------------------------------------------------------------------------------------


def test_metrics_are_read_in_step_order_and_bad_lines_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reversed(METRICS)))
    assert report.read_metrics(path) == METRICS
    path.write_text(json.dumps(METRICS[0]) + "\n{\"step\": 20, \"train_lo")
    with pytest.raises(TinyGPTError, match="metrics.jsonl line 2"):
        report.read_metrics(path)


def test_training_page_lists_every_evaluation_and_marks_the_best():
    evaluation = {"bits_per_byte": 1.98766, "loss": 4.0, "tokens": 12345, "bytes": 50000, "block_size": 32,
                  "stride": 16}
    page = report.training_page(METRICS, RUN_CONFIG, evaluation)
    header, *rows = table_rows(page)
    assert header[:4] == ["step", "validation bits/byte", "validation loss", "train loss"]
    assert rows == [
        ["20", "2.6000", "5.2000", "5.0000", ""],
        ["40", "2.0500", "4.1000", "4.0000", "best"],
        ["50", "2.1500", "4.3000", "3.9000", ""],
    ]
    assert "Held-out validation text: <b>1.9877 bits per byte</b>" in page
    assert "12,345 tokens scored with up to 32 tokens of context (sliding windows, stride 16)" in page
    assert "best validation <b>2.0500</b> bits per byte (4.1000 nats per token" in page and "step 40 of 50" in page
    assert "2,000 tokens/s, 20% of the measured matmul peak (MFU)" in page  # medians of three logged steps
    assert "2 layers, 2 heads, 64 wide, context 32, vocabulary 300" in page


def test_step_0_is_shown_untrained_and_never_the_best_and_the_page_says_what_was_trained(tmp_path):
    start = {"step": 0, "val_loss": 3.0, "val_bpb": 1.5}  # lower than any later one: still not the final checkpoint
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [start, *METRICS]))
    records = report.read_metrics(path)
    assert records[0] == start and report.best_evaluation(records)["step"] == 40
    for arch, optimizer, expected in [("llama", "muon", "<b>llama</b> (Llama-shaped"),
                                      ("gpt2", "adamw", "<b>gpt2</b> (GPT-2-shaped")]:
        config = {"model": {**RUN_CONFIG["model"], "arch": arch},
                  "training": {**RUN_CONFIG["training"], "optimizer": optimizer, "lr": 0.002, "max_steps": 50}}
        page = report.training_page(records, config)
        assert f"Architecture: {expected}" in page and "peak learning rate 0.002, 50 steps" in page
        assert f"optimizer <b>{report.OPTIMIZERS[optimizer]}</b>" in page
    header, *rows = table_rows(page)
    assert rows[0] == ["0", "1.5000", "3.0000", "", "untrained"] and rows[2][-1] == "best"
    assert len(report.loss_curve_svg(records).split('class="train"')) == 2  # the train curve starts at step 10


def test_the_reported_run_is_the_one_the_checkpoint_names(tmp_path):
    write_run(tmp_path, "aaaa", METRICS)
    ours = write_run(tmp_path, "bbbb", METRICS[:2])  # not the newest: the checkpoint decides, not the clock
    os.utime(ours / "metrics.jsonl", ns=(1, 1))
    save_checkpoint(tmp_path / "best.pt", {"run": "bbbb", "step": 40})
    assert report.checkpoint_run(tmp_path / "best.pt", tmp_path) == ours
    save_checkpoint(tmp_path / "best.pt", {"run": "gone", "step": 40})
    with pytest.raises(TinyGPTError, match="no metrics.jsonl for the run of"):
        report.checkpoint_run(tmp_path / "best.pt", tmp_path)


# --- the plot --------------------------------------------------------------------------------------------------


def assert_affine(points: list[tuple[float, float]], values: list[tuple[float, float]]) -> None:
    """Each pixel coordinate is the same linear function of its data value (to the 0.1 px the SVG is written with),
    increasing to the right and upwards (SVG's y grows downwards)."""
    for axis, sign in ((0, 1), (1, -1)):
        pixels, data = [p[axis] for p in points], [v[axis] for v in values]
        scale = (pixels[-1] - pixels[0]) / (data[-1] - data[0])
        assert sign * scale > 0
        for pixel, value in zip(pixels, data):
            assert pixel == pytest.approx(pixels[0] + (value - data[0]) * scale, abs=0.11)


def test_loss_curve_draws_every_train_and_validation_point():
    root = ET.fromstring(report.loss_curve_svg(METRICS, width=600, height=300))
    assert root.tag == f"{SVG}svg" and root.get("width") == "600"
    lines = {el.get("class"): el for el in root.iter(f"{SVG}polyline")}

    def points(name: str) -> list[tuple[float, float]]:
        return [tuple(map(float, p.split(","))) for p in lines[name].get("points").split()]

    train, val = points("train"), points("validation")
    train_values = [(r["step"], r["train_loss"]) for r in METRICS]
    val_values = [(r["step"], r["val_loss"]) for r in METRICS if "val_loss" in r]
    assert len(train) == 5 and len(val) == 3
    assert_affine(train + val, train_values + val_values)  # one pair of axes for both curves
    assert [(float(c.get("cx")), float(c.get("cy"))) for c in root.iter(f"{SVG}circle")] == val
    labels = {el.text for el in root.iter(f"{SVG}text")}
    assert {"step", "train", "validation", "0", "50"} <= labels
    for x, y in train + val:  # inside the picture
        assert 0 < x < 600 and 0 < y < 300


@pytest.mark.parametrize("low, high, integer", [(0, 1500, True), (0, 12, True), (1.93, 7.81, False),
                                                (5.39, 5.69, False), (2.0, 2.0, False), (0, 1, True)])
def test_ticks_are_round_and_cover_the_range(low, high, integer):
    ticks = report.nice_ticks(low, high, integer=integer)
    assert ticks[0] <= low and ticks[-1] >= high
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1 and 2 <= len(ticks) <= 12
    step = steps.pop()
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert round(mantissa, 6) in ((1, 2, 5) if integer else (1, 2, 2.5, 5))
    if integer:
        assert all(float(t).is_integer() for t in ticks)


# --- data ------------------------------------------------------------------------------------------------------


def test_bytes_per_token_and_data_table(tmp_path):
    text = "The cat sat on the mat. The dog sat on the log. " * 20
    tokenizer = train_bpe([text], vocab_size=270, show_progress=False)
    tokenizer.save(tmp_path / "tokenizer.json")
    ids = tokenizer.encode_ordinary(text)
    np.array(ids, dtype=np.uint16).tofile(tmp_path / "val.bin")
    meta = {"vocab_size": tokenizer.vocab_size, "tokens": {"train": 12345, "val": len(ids)},
            "documents": {"train": 40, "val": 2}}

    bytes_per_token = report.val_bytes_per_token(tmp_path / "val.bin", tmp_path / "tokenizer.json", 270)
    assert bytes_per_token == pytest.approx(len(text.encode()) / len(ids))
    assert bytes_per_token > 2  # the merges did something

    stats = {"input": "raw.txt", "output": "corpus.txt", "split": "eot", "documents_out": 1234, "truncated": False}
    rows = dict(report.data_rows(meta, bytes_per_token, stats, tokenizer))
    assert rows["vocabulary size (with special tokens)"] == "270"
    assert rows["special tokens"] == "<|im_start|> <|im_end|> <|endoftext|>"
    assert rows["merges learned"] == "11"  # 270 ids: 256 bytes, 11 merges, 3 special tokens
    assert rows["bytes per token (validation split)"] == f"{bytes_per_token:.3f}"
    assert rows["training tokens"] == "12,345" and rows["validation documents"] == "2"
    assert rows["cleaning: documents out"] == "1,234" and rows["cleaning: truncated"] == "False"
    assert "cleaning: input" not in rows


def test_document_separators_count_no_bytes(tmp_path):
    """Bits per byte divides by the bytes of text: <|endoftext|> between documents is not 13 bytes of it."""
    docs = ["The cat sat on the mat.", "A dog sat on a log.", "Birds sing."]
    tokenizer = train_bpe(docs, vocab_size=270, show_progress=False)
    tokenizer.save(tmp_path / "tokenizer.json")
    ids = [i for doc in docs for i in [*tokenizer.encode_ordinary(doc), tokenizer.eot_id]]
    np.array(ids, dtype=np.uint16).tofile(tmp_path / "val.bin")
    text_bytes = sum(len(doc.encode()) for doc in docs)
    assert report.val_bytes_per_token(tmp_path / "val.bin", tmp_path / "tokenizer.json", 270) == pytest.approx(
        text_bytes / len(ids))


def test_bytes_per_token_refuses_tokens_from_another_tokenizer(tmp_path):
    tokenizer = train_bpe(["aaaa bbbb " * 10], vocab_size=260, show_progress=False)
    tokenizer.save(tmp_path / "tokenizer.json")
    np.zeros(10, dtype=np.uint16).tofile(tmp_path / "val.bin")
    with pytest.raises(TinyGPTError, match="val.bin was encoded with 4096"):
        report.val_bytes_per_token(tmp_path / "val.bin", tmp_path / "tokenizer.json", 4096)


# --- GGUF files ------------------------------------------------------------------------------------------------


def write_gguf(path: Path, dtype: type) -> None:
    """A GGUF file written by gguf-py itself (not our writer): two tensors of 64 x 32 and 32 values."""
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=dtype))
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_table_sizes_and_bits_per_weight(tmp_path):
    write_gguf(tmp_path / "model-f32.gguf", np.float32)
    write_gguf(tmp_path / "model-f16.gguf", np.float16)
    (tmp_path / "tokenizer.json").write_text("{}")  # not a model-*.gguf: ignored
    rows = report.gguf_rows(tmp_path)
    assert [row[:2] for row in rows] == [("model-f32.gguf", "f32"), ("model-f16.gguf", "f16")]
    size = {name: (tmp_path / name).stat().st_size for name in ("model-f32.gguf", "model-f16.gguf")}
    assert rows[0][2] == f"{size['model-f32.gguf'] / 2**20:,.2f}"
    assert [row[3] for row in rows] == ["32.00", "16.00"]
    assert rows[0][4] == f"{100 * size['model-f32.gguf'] / size['model-f16.gguf']:.1f} %"
    assert rows[1][4] == "100.0 %"
    with pytest.raises(TinyGPTError, match="no model-\\*.gguf"):
        report.gguf_rows(tmp_path / "empty")


# --- timings ---------------------------------------------------------------------------------------------------

BENCHMARK_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def write_benchmark(folder: Path, rule: str, lines: list[tuple], finished: int) -> None:
    path = folder / f"{rule}.tsv"
    path.write_text(BENCHMARK_HEADER + "".join(f"{s}\t0:00:00\t{rss}\t1\t1\t1\t0\t0\t0\t{cpu}\n" for s, rss, cpu in lines))
    os.utime(path, ns=(finished, finished))


def test_timings_follow_the_finishing_order_with_means_and_a_total(tmp_path):
    write_benchmark(tmp_path, "train", [(10.0, 300.0, 8.0), (20.0, 500.0, 12.0)], finished=3_000)
    write_benchmark(tmp_path, "download", [(1.5, "NA", "NA")], finished=1_000)
    write_benchmark(tmp_path, "quantize-q4_k_m", [(2.25, 40.0, 2.0)], finished=4_000)
    write_benchmark(tmp_path, "report", [(9.0, 9.0, 9.0)], finished=5_000)
    assert report.timing_rows(tmp_path, skip=["report"]) == [
        ("download", "1.5", "", ""),
        ("train", "15.0", "10.0", "400"),
        ("quantize-q4_k_m", "2.2", "2.0", "40"),
        ("total", "18.8", "12.0", ""),
    ]
    (tmp_path / "broken.tsv").write_text("not a benchmark\n")
    with pytest.raises(TinyGPTError, match="broken.tsv is not a Snakemake benchmark file"):
        report.timing_rows(tmp_path)


# --- the command line ------------------------------------------------------------------------------------------


def test_cli_writes_every_output_and_nothing_on_bad_input(tmp_path):
    runs, data, exports, benchmarks, out = (tmp_path / d for d in ("runs", "data", "exports", "benchmarks", "out"))
    write_run(runs, "cafe", METRICS)
    save_checkpoint(tmp_path / "best.pt", {"run": "cafe", "step": 50})
    data.mkdir()
    tokenizer = train_bpe(["one two three " * 30], vocab_size=270, show_progress=False)
    tokenizer.save(data / "tokenizer.json")
    np.array(tokenizer.encode("one two three"), dtype=np.uint16).tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps({"vocab_size": tokenizer.vocab_size}))
    (data / "stats.json").write_text(json.dumps({"documents_out": 3}))
    exports.mkdir()
    write_gguf(exports / "model-f16.gguf", np.float16)
    benchmarks.mkdir()
    write_benchmark(benchmarks, "train", [(3.0, 100.0, 2.0)], finished=1)
    outputs = {name: out / f"{name}.{'svg' if name == 'loss_svg' else 'html'}"
               for name in ("loss_svg", "training", "data", "gguf", "timings")}
    argv = ["--checkpoint", str(tmp_path / "best.pt"), "--runs_dir", str(runs), "--data_dir", str(data), "--tokenizer", str(data / "tokenizer.json"),
            "--corpus_stats", str(data / "stats.json"), "--gguf_dir", str(exports), "--benchmarks", str(benchmarks),
            "--skip", "report"]
    argv += [arg for name, path in outputs.items() for arg in (f"--{name}", str(path))]

    (data / "stats.json").write_text("{not json")
    with pytest.raises(TinyGPTError, match="stats.json is not valid JSON"):
        report.main(argv)
    assert not out.exists() or not any(out.iterdir())

    (data / "stats.json").write_text(json.dumps({"documents_out": 3}))
    report.main(argv)
    ET.fromstring(outputs["loss_svg"].read_text())
    assert ["40", "2.0500", "4.1000", "4.0000", "best"] in table_rows(outputs["training"].read_text())
    assert ["cleaning: documents out", "3"] in table_rows(outputs["data"].read_text())
    assert table_rows(outputs["gguf"].read_text())[1][:2] == ["model-f16.gguf", "f16"]
    assert table_rows(outputs["timings"].read_text())[1:] == [["train", "3.0", "2.0", "100"], ["total", "3.0", "2.0", ""]]

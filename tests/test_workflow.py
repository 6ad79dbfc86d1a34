"""The Snakemake workflow end to end: a tiny pipeline in a temporary folder, then proof that an edit to one
setting or one stage's source reruns exactly the stale stages, nothing upstream."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TARGET = "exports/tinygpt/model-q4_k_m.gguf"
PIPELINE = ["download", "clean", "train_bpe", "encode", "train", "export", "gguf_convert", "quantize"]

# Small enough to run in about a minute on 2 cores; every stage still does its real work.
TINY = {
    "download": {"size": 300_000},
    "train_bpe": {"vocab_size": 400},
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
    "train": {"max_steps": 12, "batch_size": 4, "warmup_steps": 2, "eval_interval": 6, "eval_batches": 2, "ckpt_interval": 6},
    "sample": {"max_tokens": 16, "count": 1},
    # conversations of a 400-token vocabulary take up to ~700 tokens: a 640-token context keeps most of them
    "chat": {"conversations": 60, "block_size": 640, "max_steps": 4, "batch_size": 2, "warmup_steps": 1,
             "eval_prompts": 2},
}


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TINYGPT_NO_PROGRESS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", *args],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=900,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def jobs_that_would_run(workdir: Path, target: str = TARGET) -> set[str]:
    """The rules `snakemake -n` lists in its job table."""
    out = snakemake(workdir, "-n", target).stdout
    if "Nothing to be done" in out:
        return set()
    lines = out.split("Job stats:", 1)[1].splitlines()[3:]  # after the header and its underline
    rows = [line.split() for line in lines[: lines.index("")]] if "" in lines else []
    return {row[0] for row in rows if row[0] not in ("total", "all")}


def copy_project(dest: Path) -> Path:
    """The workflow, package and config in a fresh folder, so tests may edit sources without touching the repo."""
    for name in ("Snakefile", "workflow", "tinygpt"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    for section, values in TINY.items():
        config[section].update(values)
    (dest / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def edit_config(workdir: Path, section: str, key: str, value) -> None:
    path = workdir / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config[section][key] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    workdir = copy_project(tmp_path_factory.mktemp("workflow"))
    snakemake(workdir, TARGET)
    return workdir


@pytest.fixture
def project(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built project (outputs and Snakemake's metadata included) for one edit."""
    dest = tmp_path / "project"
    shutil.copytree(built, dest, symlinks=True, copy_function=shutil.copy2)
    return dest


def test_pipeline_builds_every_stage(built: Path):
    for path in [
        "data/raw/builtin.txt", "data/clean/corpus.txt", "data/clean/corpus.stats.json",
        "data/tokenizer/tokenizer.json", "data/tokens/train.bin", "data/tokens/val.bin", "data/tokens/meta.json",
        "checkpoints/best.pt", "exports/tinygpt/model.safetensors", "exports/tinygpt/config.json",
        "exports/tinygpt/model-f16.gguf", TARGET,
    ]:
        assert (built / path).stat().st_size > 0, path
    for rule in PIPELINE:
        assert list((built / "logs").glob(f"{rule}*.log")), rule
        assert list((built / "benchmarks").glob(f"{rule}*.tsv")), rule
    assert jobs_that_would_run(built) == set(), "a finished pipeline has nothing stale"


def test_the_seed_recipe_builds_end_to_end(tmp_path: Path):
    """GPT-2 with AdamW, the seed's recipe, stays one setting away from the default (llama)."""
    workdir = copy_project(tmp_path)
    edit_config(workdir, "model", "arch", "gpt2")
    edit_config(workdir, "train", "optimizer", "adamw")
    snakemake(workdir, TARGET)
    [run_config] = (workdir / "checkpoints/runs").glob("*/config.json")
    settings = yaml.safe_load(run_config.read_text())
    assert settings["model"]["arch"] == "gpt2" and settings["training"]["optimizer"] == "adamw"
    assert (workdir / TARGET).stat().st_size > 0


def test_lint_is_clean(built: Path):
    result = snakemake(built, "--lint", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "section, key, value, first_stale",
    [
        ("download", "seed", 7, "download"),
        ("clean", "max_bytes", 200_000, "clean"),
        ("train_bpe", "vocab_size", 420, "train_bpe"),
        ("encode", "val_fraction", 0.1, "encode"),
        ("model", "attention", "explicit", "train"),
        ("train", "lr", 0.001, "train"),
        ("export", "name", "renamed", "gguf_convert"),
        ("quantize", "pure", True, "quantize"),
    ],
)
def test_a_changed_setting_reruns_its_stage_and_what_follows(project, section, key, value, first_stale):
    edit_config(project, section, key, value)
    assert jobs_that_would_run(project) == set(PIPELINE[PIPELINE.index(first_stale):])


@pytest.mark.parametrize(
    "module, first_stale",
    [
        ("data/stories/generator", "download"),
        ("data/stories/words", "download"),
        ("common", "download"),  # shared by every stage
        ("cli", "download"),  # every rule runs `python -m tinygpt <command>`: the dispatch
        ("__main__", "download"),
        ("data/clean", "clean"),
        ("tokenizer/bpe", "train_bpe"),
        ("tokenizer/train_bpe", "train_bpe"),
        ("tokenizer/encode", "encode"),
        ("model/train", "train"),
        ("model/flops", "train"),
        ("weights/names", "train"),  # train reads its starting model (init_from) through tinygpt.weights
        ("export/hf", "export"),
        ("export/gguf_convert", "gguf_convert"),
        ("weights/gguf_read", "train"),  # init_from may be a GGUF file; the quantizer reads its input with it
        ("export/quants", "quantize"),
    ],
)
def test_an_edited_stage_source_reruns_its_stage_and_what_follows(project, module, first_stale):
    source = project / "tinygpt" / f"{module}.py"
    source.write_text(source.read_text() + "\n# edited\n")
    assert jobs_that_would_run(project) == set(PIPELINE[PIPELINE.index(first_stale):])


def test_every_package_module_is_a_source_of_some_stage():
    """The derived lists cover the package: a module no stage imports is dead code or a missing import."""
    from tinygpt.cli import COMMANDS
    from tinygpt.sources import PACKAGE_DIR, stage_sources

    used = {path for module, _ in COMMANDS.values() for path in stage_sources(module)}
    unused = {p for p in PACKAGE_DIR.rglob("*.py") if p not in used}
    # colab.py: only notebooks/colab.ipynb imports it (its Drive cell), no stage runs it
    assert {p.relative_to(PACKAGE_DIR).as_posix() for p in unused} == {"colab.py", "config.py", "sources.py"}


def test_sample_seed_picks_the_samples(project):
    """Sample i uses sample.seed + i - 1: seed 5's second sample is seed 6's first."""

    def samples(seed: int) -> list[str]:
        edit_config(project, "sample", "seed", seed)
        edit_config(project, "sample", "count", 2)
        snakemake(project, "reports/samples.txt")
        text = (project / "reports/samples.txt").read_text()
        return [part.strip() for part in text.split("--- sample ")[1:]]

    five, six = samples(5), samples(6)
    assert five[0] != five[1] and five[0] != six[0]
    assert five[1].split("\n", 1)[1] == six[0].split("\n", 1)[1]  # the text after "2 ---" / "1 ---"


def test_a_config_typo_stops_before_any_job(project):
    edit_config(project, "train", "max_step", 5)
    result = snakemake(project, "-n", TARGET, check=False)
    assert result.returncode != 0
    assert "unknown key 'train.max_step': did you mean 'max_steps'?" in result.stdout + result.stderr


def test_quantizing_another_converted_file_converts_it_first(project):
    edit_config(project, "quantize", "input", "f32")
    assert jobs_that_would_run(project) == {"gguf_convert", "quantize"}


def test_other_quantization_types_reuse_the_f16_file(project):
    assert jobs_that_would_run(project, "exports/tinygpt/model-q8_0.gguf") == {"quantize"}

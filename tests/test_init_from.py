"""train.init_from: a run starts from a model's weights and shape, logs that model's validation at step 0, has the
source in its fingerprint (a new source, a new run), and settings that contradict the source stop before any job,
with one message. In the workflow the source's files are inputs: changing them reruns what depends on them."""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from test_lora import args, base, data_dir  # noqa: F401 (fixtures: the token folder and a tiny trained llama)
from test_train import metrics, run_dirs, write_token_dir
from test_workflow import PIPELINE, ROOT, copy_project, edit_config, jobs_that_would_run, snakemake
from tinygpt.common import TinyGPTError
from tinygpt.config import check_config, load_schema
from tinygpt.export.gguf_convert import convert_to_gguf
from tinygpt.export.hf import export_hf
from tinygpt.model.checkpoint import load_checkpoint, save_checkpoint
from tinygpt.model.gpt import GPT, GPTConfig
from tinygpt.model.start import RECIPES, source_shape
from tinygpt.model.train import LATER_MODEL_FIELDS, main
from tinygpt.weights.read import read_model

SCHEMA = load_schema(ROOT / "workflow/schemas/config.schema.yaml")
CONFIG = yaml.safe_load((ROOT / "config.yaml").read_text())


def test_fine_tuning_starts_from_the_model_with_its_shape_and_the_recipe(data_dir, base, tmp_path, capsys):
    main(args(data_dir, tmp_path, "--init_from", str(base), "--max_steps", "2", "--eval_interval", "2"))
    [run_dir] = run_dirs(tmp_path)
    settings = json.loads((run_dir / "config.json").read_text())
    start = load_checkpoint(base)
    # no preset: the shape is the source's (n_ff and rope_scaling, unset, are not hashed)
    unset = {k for k in LATER_MODEL_FIELDS if start["model_config"][k] is None}
    assert settings["model"] == {k: v for k, v in start["model_config"].items() if k not in unset}
    assert {k: settings["training"][k] for k in RECIPES["finetune"]} == {**RECIPES["finetune"], "max_steps": 2}
    # step 0 is the starting model itself: the same validation batches give the loss its own run ended with
    first = metrics(run_dir)[0]
    assert first["step"] == 0 and first["val_loss"] == start["val_loss"]


def test_a_scratch_run_fingerprints_as_before_fine_tuning_existed(base):
    """No start and no LoRA keys in a scratch run's settings: existing run folders keep their names (resume)."""
    [settings_path] = base.parent.glob("runs/*/config.json")
    settings = json.loads(settings_path.read_text())
    assert "start" not in settings and not any(k.startswith(("lora", "init_from")) for k in settings["training"])


def test_a_new_source_starts_a_new_run_and_the_same_source_resumes(data_dir, base, tmp_path, capsys):
    source = tmp_path / "start.pt"
    source.write_bytes(base.read_bytes())
    command = args(data_dir, tmp_path, "--init_from", str(source), "--max_steps", "2", "--eval_interval", "2")
    main(command)
    main(command)
    assert "resuming run" in capsys.readouterr().out
    ckpt = load_checkpoint(source)
    ckpt["model"]["blocks.0.attn.q.weight"] = ckpt["model"]["blocks.0.attn.q.weight"] * 1.01
    save_checkpoint(source, ckpt)
    main(command)
    out = capsys.readouterr().out
    assert "starting a fresh run" in out and "start.sha256" in out
    assert len(run_dirs(tmp_path)) == 2


@pytest.mark.parametrize("extra, message", [
    (["--n_layer", "3"], "--n_layer=3 contradicts --init_from"),
])
def test_settings_contradicting_the_source_are_clear_errors(data_dir, base, tmp_path, extra, message):
    with pytest.raises(TinyGPTError, match=message):
        main(args(data_dir, tmp_path, "--init_from", str(base), *extra))


def test_tokens_of_another_tokenizer_are_a_clear_error(base, tmp_path):
    other = write_token_dir(tmp_path / "other", n_stories=60, vocab_size=300)
    with pytest.raises(TinyGPTError, match="is not the tokenizer of --init_from"):
        main(args(other, tmp_path, "--init_from", str(base)))


# --- the config check, before any job -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_folder(base, tmp_path_factory) -> Path:
    """The tiny llama as a Hugging Face folder: what the pipeline starts from."""
    out = tmp_path_factory.mktemp("hf") / "model"
    export_hf(base, out)
    return out


def config_with(base: Path | str, **sections) -> dict:
    config = copy.deepcopy(CONFIG)
    config["train"]["init_from"] = str(base)
    for section, values in sections.items():
        config[section].update(values)
    return config


@pytest.mark.parametrize("sections, message", [
    ({"model": {"n_layer": 3}}, "model.n_layer is 3 but train.init_from .* decides the model's shape \\(the model has 2\\)"),
    ({"model": {"preset": "small"}}, "model.preset is small but train.init_from"),
    ({"model": {"arch": "gpt2"}}, "model.arch is gpt2 .*\\(the model has llama\\)"),
    ({"train_bpe": {"vocab_size": 500}}, "train_bpe.vocab_size 500 contradicts train.init_from"),
])
def test_config_contradicting_the_source_stops_before_any_job(base_folder, sections, message):
    with pytest.raises(TinyGPTError, match=message):
        check_config(config_with(base_folder, **sections), SCHEMA)


def test_a_longer_context_extends_a_rotary_source_and_stops_a_gpt2_one(base, base_folder, tmp_path):
    checked = check_config(config_with(base_folder, model={"block_size": 64}), SCHEMA)  # the llama: 16 tokens
    assert checked["model"]["block_size"] == 64
    ckpt = load_checkpoint(base)
    config = GPTConfig(**{**ckpt["model_config"], "arch": "gpt2", "n_kv_head": None})
    ckpt["model_config"], ckpt["model"] = asdict(config), GPT(config).state_dict()
    save_checkpoint(tmp_path / "gpt2.pt", ckpt)
    with pytest.raises(TinyGPTError, match="model.block_size 64 is beyond the context of train.init_from .* "
                                           "\\(16 tokens\\), whose positions are learned"):
        check_config(config_with(tmp_path / "gpt2.pt", model={"block_size": 64}), SCHEMA)


def test_config_with_a_starting_model_takes_the_fine_tuning_recipe(base_folder):
    checked = check_config(config_with(base_folder, model={"block_size": 8, "n_layer": 2}), SCHEMA)
    assert {k: checked["train"][k] for k in RECIPES["finetune"]} == RECIPES["finetune"]


def test_config_with_a_checkpoint_reads_its_shape(base):
    """A file source (here a tinygpt checkpoint) is checked against its shape like a folder."""
    with pytest.raises(TinyGPTError, match="model.n_layer is 3 but train.init_from .* \\(the model has 2\\)"):
        check_config(config_with(base, model={"n_layer": 3}), SCHEMA)
    checked = check_config(config_with(base, model={"block_size": 8, "n_layer": 2}), SCHEMA)
    assert checked["train"]["init_from"] == str(base)


def test_a_gguf_source_shape_is_its_metadata(base_folder, tmp_path):
    """The config check reads a GGUF file's shape from its header: the same config as reading the whole model."""
    gguf_file = convert_to_gguf(base_folder, tmp_path / "start.gguf", "q8_0")
    assert source_shape(str(gguf_file)) == asdict(read_model(gguf_file)[0])
    with pytest.raises(TinyGPTError, match="model.n_layer is 3 but train.init_from .* \\(the model has 2\\)"):
        check_config(config_with(gguf_file, model={"n_layer": 3}), SCHEMA)


def test_config_with_a_missing_source_or_lora_from_scratch_stops(tmp_path):
    with pytest.raises(TinyGPTError, match="train.init_from .*missing.pt does not exist"):
        check_config(config_with(tmp_path / "missing.pt"), SCHEMA)
    with pytest.raises(TinyGPTError, match="train.lora.rank is set but train.init_from is scratch"):
        check_config(config_with("scratch", train={"lora": {"rank": 8}}), SCHEMA)


# --- the workflow -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_changed_source_reruns_what_depends_on_it(base_folder, tmp_path):
    """Outputs made up to date by `snakemake --touch` (nothing runs); then a newer source makes exactly the
    stages that read it stale: the tokenizer step (it takes the model's tokenizer), encode, train and after."""
    workdir = copy_project(tmp_path)
    shutil.copytree(base_folder, workdir / "models/start")
    source = workdir / "models/start/model.safetensors"
    for key in ("n_layer", "n_head", "n_embd", "block_size"):  # the shape is the source's now
        edit_config(workdir, "model", key, None)
    edit_config(workdir, "train_bpe", "vocab_size", SCHEMA["properties"]["train_bpe"]["properties"]["vocab_size"]["default"])
    edit_config(workdir, "train", "init_from", "models/start")
    touch_pipeline(workdir)
    later = time.time() + 5
    os.utime(source, (later, later))
    assert jobs_that_would_run(workdir) == set(PIPELINE[PIPELINE.index("train_bpe"):])


def touch_pipeline(workdir: Path) -> None:
    """Every output of the pipeline, up to date by `snakemake --touch` (placeholders: nothing runs)."""
    outputs = ["data/raw/builtin.txt", "data/clean/corpus.txt", "data/clean/corpus.stats.json",
               "data/tokenizer/tokenizer.json", "data/tokens/train.bin", "data/tokens/val.bin", "data/tokens/meta.json",
               "checkpoints/best.pt", *(f"exports/tinygpt/{f}" for f in (
                   "model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                   "tokenizer_config.json", "model-f16.gguf", "model-q4_k_m.gguf"))]
    for name in outputs:
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text("made by the test")
    snakemake(workdir, "--touch", "exports/tinygpt/model-q4_k_m.gguf")
    assert jobs_that_would_run(workdir) == set()

"""The pipeline from a Hugging Face folder of each family (a test-made random transformers model with a tokenizer
trained by `tokenizers` in that family's configuration), a tinygpt checkpoint and a GGUF file through fine-tuning
to Q4_K_M: the model's tokenizer is taken, not learned; training starts from the model's own validation loss; the
export is the fine-tuned model, which transformers loads with no missing or new weights. Taking a model's tokenizer
needs the model code; learning one does not, and editing the model code leaves the learned tokenizer alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_hf_tokenizers import build
from test_import import FAMILIES
from test_init_from import touch_pipeline
from test_lora import base, data_dir  # noqa: F401 (fixtures: the token folder and a tiny trained llama)
from test_workflow import PIPELINE, TARGET, copy_project, edit_config, jobs_that_would_run, snakemake
from tinygpt.export.gguf_convert import convert_to_gguf
from tinygpt.export.hf import export_hf
from tinygpt.model.checkpoint import load_checkpoint
from tinygpt.tokenizer.bpe import Tokenizer
from tinygpt.weights.read import read_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

TOKENIZER_FAMILY = {"gpt2": "gpt2", "smollm2": "smollm", "llama3": "llama3", "qwen2": "qwen2"}


def hf_folder(family: str, folder: Path) -> Path:
    """A random transformers model of `family` (shrunk) with that family's tokenizer, saved as a HF folder."""
    tokenizer = build(TOKENIZER_FAMILY[family])
    config_class, settings = FAMILIES[family]
    config = getattr(transformers, config_class)(vocab_size=tokenizer.get_vocab_size(), **settings)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize("family, lora", [("gpt2", 0), ("smollm2", 4), ("llama3", 0), ("qwen2", 4)])
def test_a_hugging_face_folder_fine_tunes_to_q4_k_m(family, lora, tmp_path):
    workdir = copy_project(tmp_path)
    source = hf_folder(family, workdir / "models" / family)
    start_from(workdir, f"models/{family}", block_size=32)
    edit_config(workdir, "train", "lora", {"rank": lora, "alpha": 8, "targets": ["q", "v", "down"], "dropout": 0.0})
    snakemake(workdir, TARGET)

    assert Tokenizer.load(workdir / "data/tokenizer/tokenizer.json") == Tokenizer.load(source / "tokenizer.json")
    [run] = (workdir / "checkpoints/runs").glob("*/metrics.jsonl")
    first = json.loads(run.read_text().splitlines()[0])
    assert first["step"] == 0 and "val_bpb" in first  # the starting model's bits per byte
    final = load_checkpoint(workdir / "checkpoints/best.pt")
    assert not any("lora" in name for name in final["model"])  # merged: a plain model
    hf = transformers.AutoModelForCausalLM.from_pretrained(workdir / "exports/tinygpt", output_loading_info=True)
    model, info = hf
    assert not info["missing_keys"] and not info["unexpected_keys"]
    start = transformers.AutoModelForCausalLM.from_pretrained(source)
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert changed, "the export is the fine-tuned model, not the start"
    if lora:  # only the adapted layers moved
        assert all(any(t in n for t in ("q_proj", "v_proj", "down_proj")) for n in changed), changed
    assert (workdir / TARGET).stat().st_size > 0


def start_from(workdir: Path, source: str, block_size: int | None) -> None:
    """Config: start from `source`, whose shape it is; block_size is the training window (None: the model's)."""
    for key in ("n_layer", "n_head", "n_embd"):
        edit_config(workdir, "model", key, None)
    edit_config(workdir, "model", "block_size", block_size)
    edit_config(workdir, "train_bpe", "vocab_size", 4096)  # the default: unused, the model's tokenizer is taken
    edit_config(workdir, "train", "init_from", source)


@pytest.mark.parametrize("kind", ["checkpoint", "gguf"])
def test_a_checkpoint_or_gguf_file_fine_tunes_to_q4_k_m(kind, base, tmp_path):
    workdir = copy_project(tmp_path)
    models = workdir / "models"
    models.mkdir()
    if kind == "checkpoint":
        source = models / "start.pt"
        source.write_bytes(base.read_bytes())
    else:  # a quantized file: the start is its dequantized weights
        source = convert_to_gguf(export_hf(base, tmp_path / "hf"), models / "start.gguf", "q8_0")
    start_from(workdir, f"models/{source.name}", block_size=None)  # the model's context, 16 tokens
    snakemake(workdir, TARGET)

    trained_with = Tokenizer.from_json_str(load_checkpoint(base)["tokenizer_json"])
    assert Tokenizer.load(workdir / "data/tokenizer/tokenizer.json") == trained_with
    assert f"the tokenizer of models/{source.name}" in (workdir / "logs/train_bpe.log").read_text()  # taken
    [run] = (workdir / "checkpoints/runs").glob("*/metrics.jsonl")
    first = json.loads(run.read_text().splitlines()[0])
    assert first["step"] == 0 and "val_bpb" in first
    start_config, start_state, _, _ = read_model(source)
    config, state, tokenizer_json, _ = read_model(workdir / "exports/tinygpt")
    assert config == start_config and Tokenizer.from_json_str(tokenizer_json) == trained_with
    assert any(not torch.equal(state[n].float(), start_state[n].float()) for n in state), "not fine-tuned"
    assert (workdir / TARGET).stat().st_size > 0


def test_editing_the_model_code_leaves_the_learned_tokenizer_alone(tmp_path):
    """From scratch, the tokenizer is learned by code that imports no model code (taking a model's tokenizer is
    another command): editing the model, or model_tokenizer, reruns training and what follows, not train_bpe."""
    workdir = copy_project(tmp_path)
    touch_pipeline(workdir)
    for module in ("model/gpt", "weights/model_tokenizer"):
        source = workdir / "tinygpt" / f"{module}.py"
        source.write_text(source.read_text() + "\n# edited\n")
    assert jobs_that_would_run(workdir) == set(PIPELINE[PIPELINE.index("train"):])

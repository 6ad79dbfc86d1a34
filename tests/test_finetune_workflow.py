"""The pipeline from a Hugging Face folder of each family (a test-made random transformers model with a tokenizer
trained by `tokenizers` in that family's configuration) through fine-tuning to Q4_K_M: the model's tokenizer is
taken, not learned; training starts from the model's own validation loss; the export is the fine-tuned model,
which transformers loads with no missing or new weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_hf_tokenizers import build
from test_import import FAMILIES
from test_workflow import TARGET, copy_project, edit_config, snakemake
from tinygpt.model.checkpoint import load_checkpoint
from tinygpt.tokenizer.bpe import Tokenizer

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
    for key in ("n_layer", "n_head", "n_embd"):  # the shape is the model's
        edit_config(workdir, "model", key, None)
    edit_config(workdir, "model", "block_size", 32)  # the training window
    edit_config(workdir, "train_bpe", "vocab_size", 4096)  # the default: unused, the model's tokenizer is taken
    edit_config(workdir, "train", "init_from", f"models/{family}")
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

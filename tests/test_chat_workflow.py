"""The chat model through the workflow: from nothing to exports/tinygpt-chat/model-q4_k_m.gguf on a tiny config
(the base model, then conversations, masked fine-tuning at a longer context, the chat files); the base target never
builds it; a chat setting reruns the chat stages only; the chat q4_k_m is byte-identical to llama-quantize's."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import gguf
import pytest

from llama_tools import llama_tool
from test_workflow import TARGET, TINY, copy_project, edit_config, jobs_that_would_run, snakemake
from tinygpt.model.checkpoint import load_checkpoint
from tinygpt.tokenizer.chat import CHATML_TEMPLATE

pytestmark = pytest.mark.slow

CHAT_TARGET = "exports/tinygpt-chat/model-q4_k_m.gguf"
TINY_CHAT = TINY["chat"]  # copy_project's tiny settings, chat included
CHAT_RULES = {"chat_data", "chat_encode", "chat_train", "chat_eval", "chat_export", "chat_gguf_convert",
              "chat_quantize"}


@pytest.fixture(scope="module")
def chat_built(tmp_path_factory) -> Path:
    workdir = copy_project(tmp_path_factory.mktemp("chat"))
    snakemake(workdir, CHAT_TARGET, "reports/chat.json")
    return workdir


def test_the_chat_model_builds_from_nothing(chat_built: Path):
    meta = json.loads((chat_built / "data/chat/tokens/meta.json").read_text())
    assert meta["kind"] == "chat" and meta["conversations"]["train"] > 0
    chat = load_checkpoint(chat_built / "checkpoints/chat/best.pt")
    assert chat["chat_template"] == CHATML_TEMPLATE
    assert chat["model_config"]["block_size"] == TINY_CHAT["block_size"]  # the base's 32 tokens, extended
    [run] = (chat_built / "checkpoints/chat/runs").glob("*/metrics.jsonl")
    assert json.loads(run.read_text().splitlines()[0])["step"] == 0  # the base model's score on the chat data

    folder = chat_built / "exports/tinygpt-chat"
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == CHATML_TEMPLATE
    assert (folder / "Modelfile").read_text().count("FROM ./model-q4_k_m.gguf") == 1
    reader = gguf.GGUFReader(folder / "model-q4_k_m.gguf")
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == CHATML_TEMPLATE
    scores = json.loads((chat_built / "reports/chat.json").read_text())
    assert sum(task["asked"] for task in scores["tasks"].values()) == TINY_CHAT["eval_prompts"]
    assert jobs_that_would_run(chat_built, CHAT_TARGET) == set()


def test_the_base_target_leaves_the_chat_model_alone(tmp_path: Path):
    assert not jobs_that_would_run(copy_project(tmp_path), TARGET) & CHAT_RULES


def test_a_chat_setting_reruns_the_chat_training_and_what_follows(chat_built: Path, tmp_path: Path):
    project = tmp_path / "project"
    shutil.copytree(chat_built, project, symlinks=True, copy_function=shutil.copy2)
    edit_config(project, "chat", "lr", 0.001)
    assert jobs_that_would_run(project, CHAT_TARGET) == {"chat_train", "chat_export", "chat_gguf_convert",
                                                         "chat_quantize"}


def test_the_chat_q4_k_m_is_llama_quantize_s(chat_built: Path, tmp_path: Path):
    quantize = llama_tool("llama-quantize")
    folder = chat_built / "exports/tinygpt-chat"
    theirs = tmp_path / "theirs.gguf"
    subprocess.run([quantize, str(folder / "model-f16.gguf"), str(theirs), "Q4_K_M"], check=True,
                   capture_output=True)
    assert theirs.read_bytes() == (folder / "model-q4_k_m.gguf").read_bytes()

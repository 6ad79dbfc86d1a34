"""The config schema: the shipped config.yaml is valid, and each kind of mistake is named in one sentence."""

import copy
import re
from pathlib import Path

import pytest
import yaml

from tinygpt.common import TinyGPTError
from tinygpt.config import check_config, load_schema, with_recipe

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = load_schema(ROOT / "workflow/schemas/config.schema.yaml")
CONFIG = yaml.safe_load((ROOT / "config.yaml").read_text())


def test_shipped_config_is_valid_and_complete():
    checked = check_config(CONFIG, SCHEMA)
    # the schedule's nulls are the only values filled in: scratch's recipe (tinygpt.model.start.RECIPES)
    assert checked == with_recipe(copy.deepcopy(CONFIG)), "config.yaml should spell out every setting the schema knows"
    assert {k: checked["train"][k] for k in ("max_steps", "lr", "min_lr", "warmup_steps")} == {
        "max_steps": 650, "lr": 0.002, "min_lr": 0.0002, "warmup_steps": 50}


def test_every_schema_default_matches_config_yaml():
    def check(spec: dict, values: dict, where: str) -> None:
        for key, sub in spec["properties"].items():
            if sub.get("type") == "object":  # a nested section (train.lora): its own keys' defaults
                check(sub, values[key], f"{where}{key}.")
            elif "default" in sub:
                assert values[key] == sub["default"], f"{where}{key}"

    for section, spec in SCHEMA["properties"].items():
        check(spec, CONFIG[section], f"{section}.")


def test_missing_sections_get_defaults():
    checked = check_config({"train": {"max_steps": 7}}, SCHEMA)
    assert checked["train"]["max_steps"] == 7
    assert checked["train"]["lr"] == 0.002  # null in the schema: scratch's recipe
    assert checked["download"]["source"] == "builtin"


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("train", "max_step", 10, "unknown key 'train.max_step': did you mean 'max_steps'?"),
        ("train", "max_steps", -3, "train.max_steps is -3"),
        ("train", "lr", "fast", "train.lr is 'fast'"),
        ("model", "attention", "flash", "choose one of sdpa, explicit"),
        ("download", "size", "huge", "download.size is 'huge'"),
        ("download", "source", "s3", "choose one of builtin, tinystories, url, file"),
        ("encode", "val_fraction", 0.9, "encode.val_fraction is 0.9"),
        ("train_bpe", "vocab_size", 100, "train_bpe.vocab_size is 100"),
    ],
)
def test_mistakes_are_named(section, key, value, expected):
    config = copy.deepcopy(CONFIG)
    config[section][key] = value
    with pytest.raises(TinyGPTError) as info:
        check_config(config, SCHEMA)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_section():
    with pytest.raises(TinyGPTError, match="unknown key 'tokenizer'"):
        check_config({**CONFIG, "tokenizer": {}}, SCHEMA)


def test_url_entries_need_a_url_and_a_valid_checksum():
    config = copy.deepcopy(CONFIG)
    config["download"]["urls"] = [{"url": "https://example.com/a.txt", "sha256": "abc"}]
    with pytest.raises(TinyGPTError, match="sha256"):
        check_config(config, SCHEMA)


def test_command_line_values_are_read_as_yaml():
    # `snakemake --config train='{lr: 0.001, compile: true}'` hands over the leaves as text
    checked = check_config({"train": {"lr": "0.001", "compile": "true"}, "download": {"size": "20000"}}, SCHEMA)
    assert checked["train"]["lr"] == 0.001 and checked["train"]["compile"] is True
    assert checked["download"]["size"] == 20000
    assert check_config({"sample": {"prompt": "42"}}, SCHEMA)["sample"]["prompt"] == "42"


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"train": {"lr": 0.001, "min_lr": 0.01}}, "train.min_lr (0.01) is above train.lr (0.001)"),
        ({"model": {"n_embd": 90}}, "model.n_embd (90) is not a multiple of model.n_head (4)"),
        ({"model": {"preset": "small", "n_head": 3}}, "model.n_embd (512) is not a multiple of model.n_head (3)"),
        ({"download": {"size": 2000}, "model": {"block_size": 512}},
         "model.block_size 512 needs windows of 513 tokens, but validation gets about 100 bytes"),
        ({"clean": {"max_bytes": 5000}, "encode": {"val_fraction": 0.01}}, "validation gets about 50 bytes"),
        ({"model": {"arch": "gpt2", "n_kv_head": 2}}, "model.n_kv_head is set but model.arch is gpt2"),
        ({"model": {"arch": "llama", "n_kv_head": 3}}, "model.n_head (4) is not a multiple of model.n_kv_head (3)"),
        ({"model": {"arch": "llama", "n_embd": 20, "n_head": 4}}, "model.n_embd / model.n_head = 5 is odd"),
        ({"chat": {"source": "file"}}, "chat.source is file but chat.paths is empty"),
        ({"chat": {"lr": 0.001, "min_lr": 0.01}}, "chat.min_lr (0.01) is above chat.lr (0.001)"),
    ],
)
def test_contradicting_settings_are_rejected_before_any_job(changes, expected):
    config = copy.deepcopy(CONFIG)
    for section, values in changes.items():
        config[section].update(values)
    with pytest.raises(TinyGPTError, match=re.escape(expected)):
        check_config(config, SCHEMA)


def test_a_block_size_the_data_can_hold_passes():
    config = copy.deepcopy(CONFIG)
    config["download"]["size"] = 300_000
    config["model"]["block_size"] = 512
    assert check_config(config, SCHEMA)["model"]["block_size"] == 512


def test_the_conda_environment_lists_the_package_dependencies():
    """workflow/envs/tinygpt.yaml (per-rule conda environments) installs what pyproject.toml declares."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    env = yaml.safe_load((ROOT / "workflow/envs/tinygpt.yaml").read_text())
    [pip] = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert set(pip) == {d for d in declared if not d.startswith("snakemake")} | {"tensorboard>=2.14"}

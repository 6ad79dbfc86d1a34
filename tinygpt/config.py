"""Checking config.yaml against its JSON Schema, with one readable sentence per mistake."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator, ValidationError

from tinygpt.common import TinyGPTError


def load_schema(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def check_config(config: dict, schema: dict, source: str = "config.yaml") -> dict:
    """Return `config` with every default filled in, or raise a TinyGPTError naming the first wrong key."""
    config = parse_strings(config, schema)
    errors = sorted(Draft202012Validator(schema).iter_errors(config), key=lambda e: (len(e.path), list(map(str, e.path))))
    if errors:
        raise TinyGPTError(f"{source}: {describe(errors[0])}")
    config = with_recipe(with_defaults(config, schema))
    problem = contradiction(config) or start_contradiction(config, schema) or chat_contradiction(config)
    if problem:
        raise TinyGPTError(f"{source}: {problem}")
    return config


def contradiction(config: dict) -> str | None:
    """The first pair of settings that cannot hold together, which the schema's per-key rules cannot see, so
    that it stops the workflow before any job runs rather than the train stage after the data stages ran."""
    from tinygpt.data.download import parse_size  # torch-free, like the presets
    from tinygpt.model.presets import PRESETS

    model, train = config["model"], config["train"]
    if train["min_lr"] > train["lr"]:
        return f"train.min_lr ({train['min_lr']}) is above train.lr ({train['lr']}); the schedule decays lr to min_lr"
    shape = {**PRESETS[model["preset"]], **{k: v for k, v in model.items() if k in PRESETS["toy"] and v is not None}}
    if shape["n_embd"] % shape["n_head"]:
        return (f"model.n_embd ({shape['n_embd']}) is not a multiple of model.n_head ({shape['n_head']}); "
                "each head takes an equal share of the width")
    n_kv_head = model.get("n_kv_head")
    if n_kv_head is not None and model.get("arch", "gpt2") == "gpt2":
        return "model.n_kv_head is set but model.arch is gpt2, which has no grouped-query attention; use arch llama"
    if n_kv_head is not None and shape["n_head"] % n_kv_head:
        return (f"model.n_head ({shape['n_head']}) is not a multiple of model.n_kv_head ({n_kv_head}); "
                "each key/value head serves an equal group of query heads")
    if model.get("arch") == "llama" and (shape["n_embd"] // shape["n_head"]) % 2:
        return (f"model.n_embd / model.n_head = {shape['n_embd'] // shape['n_head']} is odd; rotary embeddings "
                "turn pairs of values, so llama needs an even head size")
    download, clean, encode = config["download"], config["clean"], config["encode"]
    known_bytes = [b for b in (clean["max_bytes"], download["source"] in ("builtin", "tinystories")
                               and parse_size(download["size"])) if b]
    if known_bytes:
        # a token is at least one byte, so validation holds at most this many tokens
        val_bytes = int(min(known_bytes) * encode["val_fraction"])
        if val_bytes < shape["block_size"] + 1:
            return (f"model.block_size {shape['block_size']} needs windows of {shape['block_size'] + 1} tokens, but "
                    f"validation gets about {val_bytes} bytes (encode.val_fraction {encode['val_fraction']} of "
                    f"{min(known_bytes)}); use more data, a larger val_fraction or a smaller block_size")
    return None


def with_recipe(config: dict) -> dict:
    """Schedule settings left null take the recipe of the run's starting point: scratch's, or fine-tuning's."""
    from tinygpt.model.start import recipe  # torch-free

    for key, value in recipe(config["train"]["init_from"]).items():
        if config["train"].get(key) is None:
            config["train"][key] = value
    return config


# model settings that a starting model decides; set to anything but their default, they must agree with it
SOURCE_DECIDES = ("preset", "arch", "n_layer", "n_head", "n_kv_head", "n_embd", "norm_eps", "rope_theta",
                  "tie_embeddings")


def start_contradiction(config: dict, schema: dict) -> str | None:
    """With train.init_from a model, a model setting (or train_bpe's vocabulary) that contradicts that model;
    LoRA without one. Reads the source's shape, so a missing or unsupported source also stops here."""
    from tinygpt.model.start import is_scratch, source_shape

    train, model = config["train"], config["model"]
    init_from = train["init_from"]
    if is_scratch(init_from):
        if train["lora"]["rank"]:
            return "train.lora.rank is set but train.init_from is scratch; LoRA adapts a trained model: set init_from"
        return None
    source = source_shape(init_from)
    defaults = schema["properties"]["model"]["properties"]
    for key in SOURCE_DECIDES:
        value = model.get(key)
        if value == defaults[key].get("default"):
            continue
        if key == "preset" or value != source[key]:
            has = "" if key == "preset" else f" (the model has {source[key]})"
            return (f"model.{key} is {value} but train.init_from {init_from} decides the model's shape{has}; "
                    f"remove model.{key} from the config")
    if model.get("block_size") is not None and model["block_size"] > source["block_size"] \
            and source["arch"] == "gpt2":  # rotary positions extend to a longer context, learned ones end
        return (f"model.block_size {model['block_size']} is beyond the context of train.init_from {init_from} "
                f"({source['block_size']} tokens), whose positions are learned one by one (gpt2); use at most "
                "that, or null")
    vocab_default = schema["properties"]["train_bpe"]["properties"]["vocab_size"].get("default")
    vocab = config["train_bpe"]["vocab_size"]
    if vocab != vocab_default and vocab != source["vocab_size"]:
        return (f"train_bpe.vocab_size {vocab} contradicts train.init_from {init_from}, whose tokenizer the pipeline "
                f"uses ({source['vocab_size']} tokens); remove train_bpe.vocab_size from the config")
    return None


def chat_contradiction(config: dict) -> str | None:
    """Chat settings that cannot hold together. (A context beyond what a gpt2 base's learned positions allow is
    the chat_train stage's error: a base-only build never needs the chat settings to fit.)"""
    chat = config["chat"]
    if chat["source"] == "file" and not chat["paths"]:
        return "chat.source is file but chat.paths is empty; list the JSON lines or Parquet files of conversations"
    if chat["min_lr"] > chat["lr"]:
        return f"chat.min_lr ({chat['min_lr']}) is above chat.lr ({chat['lr']}); the schedule decays lr to min_lr"
    return None


def describe(error: ValidationError) -> str:
    key = ".".join(map(str, error.absolute_path)) or "(top level)"
    if error.validator == "additionalProperties":
        known = list(error.schema.get("properties", {}))
        unknown = [k for k in error.instance if k not in known]
        where = f"{key}." if error.absolute_path else ""
        hints = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"did you mean '{hints[0]}'? " if hints else ""
        return f"unknown key '{where}{unknown[0]}': {hint}known keys here are {', '.join(known)}"
    if error.validator == "enum":
        return f"{key} is {error.instance!r}; choose one of {', '.join(map(str, error.validator_value))}"
    if error.validator == "oneOf" and "oneOf" in error.schema:
        return f"{key} is {error.instance!r}; it should be: {error.schema.get('description', 'see the schema')}"
    return f"{key} is {error.instance!r}: {error.message}"


def parse_strings(value, schema: dict):
    """`snakemake --config train='{lr: 0.001}'` delivers '0.001' as text: read such values as YAML where
    the schema wants something other than a string."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return {k: parse_strings(v, props.get(k, {})) for k, v in value.items()}
    wants_text = "string" in str(schema.get("type", "")) or any(isinstance(v, str) for v in schema.get("enum", []))
    if isinstance(value, str) and schema and not wants_text:
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return value


def with_defaults(config: dict, schema: dict) -> dict:
    """Fill in the schema's defaults, section by section (a missing section gets all its defaults)."""
    config = copy.deepcopy(config)
    for key, sub in schema.get("properties", {}).items():
        if key not in config and "default" in sub:
            config[key] = copy.deepcopy(sub["default"])
        if isinstance(config.get(key), dict) and sub.get("type") == "object":
            config[key] = with_defaults(config[key], sub)
    return config

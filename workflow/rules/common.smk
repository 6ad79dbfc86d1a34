# Shared helpers for the rules: where the package lives, and how settings become command-line flags.

import os
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod

from tinygpt.cli import COMMANDS
from tinygpt.data.formats import matching_files
from tinygpt.sources import module_sources

ROOT = Path(workflow.basedir)  # the folder holding the Snakefile, config.yaml and tinygpt/


def shell_environment():
    """The rules run `python -m tinygpt.<stage>`; let that import tinygpt from this checkout, and make
    `python` the interpreter running Snakemake (the project's environment, even when snakemake is called by
    its full path), unless a conda environment per rule was asked for, which then comes first on PATH."""
    # (doubled braces: Snakemake formats the prefix like a shell command)
    exports = [f"PYTHONPATH={shlex.quote(str(ROOT))}${{{{PYTHONPATH:+:$PYTHONPATH}}}}", "PYTHONUNBUFFERED=1"]
    if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
        exports.append(f"PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH")
    return "export " + " ".join(exports) + "; "


shell.prefix("set -euo pipefail; " + shell_environment())


def sources(command):
    """The source files a stage runs (its module and every package module it imports, derived from the
    imports): editing one reruns that stage and what follows, nothing upstream. Relative to the working
    directory, so that a copied or moved project keeps its Snakemake records."""
    return [os.path.relpath(path) for path in module_sources(COMMANDS[command][0])]


def flags(settings, skip=()):
    """{'max_steps': 10, 'compile': True, 'n_layer': None} -> '--max_steps 10 --compile' (None means unset)."""
    parts = []
    for key, value in settings.items():
        if key in skip or value is None or value is False:
            continue
        if value is True:
            parts.append(f"--{key}")
        elif isinstance(value, (list, tuple)):
            parts += [f"--{key} {shlex.quote(str(v))}" for v in value]
        else:
            parts.append(f"--{key} {shlex.quote(str(value))}")
    return " ".join(parts)


def download_flags(settings):
    """The download CLI's flags for the chosen source: only what that source uses, so that an unused
    setting (say the TinyStories URL while generating stories) never makes the text stale."""
    source = settings["source"]
    args = {"source": source}
    if source == "builtin":
        args |= {"size": settings["size"], "seed": settings["seed"]}
    elif source == "tinystories":
        args |= {"size": settings["size"], "url": settings["tinystories_url"]}
    elif source == "url":
        args["url"] = [u["url"] for u in settings["urls"]]
        args["sha256"] = [u.get("sha256", "-") for u in settings["urls"]]
    elif source == "file":
        args["path"] = settings["paths"]
    if source in ("url", "file"):
        args |= {"format": settings["format"], "text_field": settings["text_field"]}
    if source in ("tinystories", "url"):
        args |= {"timeout": settings["timeout"], "retries": settings["retries"]}
    return flags(args)


def local_files(settings):
    """Source `file`: the files themselves (a folder's too) are inputs, so that editing, adding or removing one
    reruns clean and what follows. A path that names nothing is left to the download stage to report."""
    if settings["source"] != "file":
        return []
    return sorted({str(p) for pattern in settings["paths"] for p in matching_files(pattern)})


def train_launcher(settings):
    """One process per GPU through torchrun (DistributedDataParallel) when more than one is asked for."""
    if settings["gpus"] > 1:
        return f"python -m torch.distributed.run --standalone --nproc_per_node {settings['gpus']} -m tinygpt train"
    return "python -m tinygpt train"


def train_flags(model, train):
    """Model shape and optimisation settings, in one string so that a change to either reruns training.
    tie_embeddings goes as a value: it defaults to true, so an absent flag could not say false."""
    model = {**model, "tie_embeddings": str(model.get("tie_embeddings", True)).lower()}
    return f"{flags(model)} {flags(train, skip=('gpus',))}"

# Shared helpers for the rules: where the package lives, and how settings become command-line flags.

import os
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod

from tinygpt.cli import COMMANDS
from tinygpt.data.formats import matching_files
from tinygpt.model.start import is_scratch, source_files
from tinygpt.sources import stage_sources

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
    return [os.path.relpath(path) for path in stage_sources(COMMANDS[command][0])]


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


def train_resources(settings):
    """The train rule's resources. `gpu`: the GPUs the local scheduler and SLURM give it. For SLURM also `nodes`,
    one task per node (`tasks` for CPU jobs; a GPU job gets one per node by default, and there `tasks` would mean
    --ntasks-per-gpu), with several nodes `gres` for each node's GPUs instead of `gpu` (which SLURM takes as the
    job's total), and `mpi`: present, it makes the SLURM executor run the rule in the job's batch shell rather
    than in an `srun -n1` step of its own, so that train_launcher starts the step; empty, since a named launcher
    makes the plugin demand more than one task. As snakemake-executor-plugin-slurm 2.8.0 and -jobstep 0.6.1 do it
    (pinned in pyproject.toml; tests/test_slurm_pipeline.py runs them on a real SLURM)."""
    nodes = settings["nodes"]
    gpus = settings["gpus"] if settings["device"] in ("auto", "cuda") else 0
    resources = {"nodes": nodes, "mpi": ""}
    if gpus and nodes > 1:
        resources["gres"] = f"gpu:{gpus}"
    else:
        resources["gpu"] = gpus
    if not gpus:
        resources["tasks"] = nodes
    return resources


# In a SLURM allocation (the batch shell of a SLURM executor job, or an sbatch/salloc shell running snakemake)
# but not in a job step already (`srun --pty bash`, where a second step would wait for the first's CPUs).
IN_SLURM_ALLOCATION = '[ -n "${SLURM_JOB_ID:-}" ] && [ -z "${SLURM_STEP_ID:-}" ]'
FREE_PORT = """$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"""


def train_launcher(settings):
    """The command that starts training (the rule appends its flags), the same text with and without SLURM.

    On this machine: one process, or torchrun with one process per GPU. In a SLURM allocation: an `srun` step
    with one task per node, each running the same; with nodes > 1, torchrun with a c10d rendezvous on this node
    (the batch shell runs on the first one) and the job id as rendezvous id. SLURM's --signal (the slurm profile
    asks for USR1 before the time limit) reaches the step's processes, not the batch shell or Snakemake; torchrun
    ignores SIGUSR1 (SIG_IGN is inherited, and training sets its own handler), so only the training processes
    act on it: they save last.pt and exit 75, and the job requeues itself (requeue_when_stopped) and resumes. srun
    --wait: once one node's task ends, the others get 5 minutes (a crashed node would leave them waiting in a
    collective until its timeout)."""
    nodes, gpus = settings["nodes"], settings["gpus"]
    if nodes > 1:
        one_node = (f"python -m torch.distributed.run --nnodes {nodes} --nproc_per_node {gpus} --rdzv_backend c10d"
                    f' --rdzv_endpoint "$(hostname):{FREE_PORT}" --rdzv_id "${{SLURM_JOB_ID:-}}" -m tinygpt train')
        elsewhere = (f'echo "train.nodes: {nodes} needs a SLURM allocation: run snakemake with --workflow-profile '
                     f'workflow/profiles/slurm, or start torchrun on each machine by hand (README)" >&2; return 1')
    elif gpus > 1:
        one_node = f"python -m torch.distributed.run --standalone --nproc_per_node {gpus} -m tinygpt train"
        elsewhere = '"$@"'
    else:
        one_node = "python -m tinygpt train"
        elsewhere = '"$@"'
    wait = " --wait=300" if nodes > 1 else ""
    step = f"srun --nodes={nodes} --ntasks-per-node=1{wait} bash -c 'trap \"\" USR1; exec \"$@\"' train \"$@\""
    return (f"train_step() {{ if {IN_SLURM_ALLOCATION}; then {requeue_when_stopped(step)}; else {elsewhere}; fi; }}; "
            f"train_step {one_node}")


MAX_REQUEUES = 20  # stops for a time limit or preemption that one training job may resume from


def requeue_when_stopped(step):
    """`step`, then: when training stopped on request (SIGUSR1 before the time limit, SIGTERM at preemption), it
    saved last.pt and created $TINYGPT_STOPPED_FILE (torchrun would turn its exit 75 into 1); the job puts itself
    back in the queue (`scontrol requeue`, the profile's --requeue allows it), keeping its job id, so that Snakemake
    waits for it and the next start resumes. Any other failure (divergence, a bad setting, a missing file) fails the
    job once, with its message: Snakemake retries no rule. SLURM_RESTART_COUNT caps the requeues."""
    stopped = '"$TINYGPT_STOPPED_FILE"'
    return (f'export TINYGPT_STOPPED_FILE="$PWD/.snakemake/train-stopped-$SLURM_JOB_ID"; rm -f {stopped}; '
            f"rc=0; {step} || rc=$?; "
            f'if [ -e {stopped} ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt {MAX_REQUEUES} ]; then rm -f {stopped}; '
            f'echo "training stopped on request: requeueing job $SLURM_JOB_ID, its next start resumes" >&2; '
            f'scontrol requeue "$SLURM_JOB_ID" && sleep 300; fi; return $rc')


def train_flags(model, train):
    """Model shape and optimisation settings, in one string so that a change to either reruns training.
    tie_embeddings goes as a value: it defaults to true, so an absent flag could not say false. From scratch
    without LoRA the string is what it was before either existed (no rerun); with init_from the starting model
    has the shape, and only the window (block_size), dropout and attention kernel go."""
    train, lora = {k: v for k, v in train.items() if k != "lora"}, train.get("lora", {})
    if is_scratch(train.get("init_from")):
        train.pop("init_from", None)
        model = {**model, "tie_embeddings": str(model.get("tie_embeddings", True)).lower()}
    else:
        model = {k: model.get(k) for k in ("block_size", "dropout", "attention")}
    if lora.get("rank"):
        train |= {f"lora_{k}": ",".join(v) if k == "targets" else v for k, v in lora.items()}
    return f"{flags(model)} {flags(train, skip=('gpus', 'nodes'))}"


def start_files(train):
    """The starting model's files (train.init_from), inputs of the rules that read it: a new model reruns them."""
    return [] if is_scratch(train["init_from"]) else [os.path.relpath(p) for p in source_files(train["init_from"])]


def chat_data_flags(chat):
    """The chat_data stage's flags for the chosen source, only what that source uses."""
    if chat["source"] == "builtin":
        return flags({"source": "builtin", "count": chat["conversations"], "seed": chat["seed"]})
    return flags({"source": "file", "path": chat["paths"], "format": chat["format"]})


def chat_train_flags(model, train, chat, start):
    """The base training's settings (optimizer, precision, device, evaluation), with the chat schedule and the chat
    context, starting from the trained base model (`start`): full fine-tuning, never the base run's LoRA."""
    schedule = {key: chat[key] for key in ("max_steps", "batch_size", "lr", "min_lr", "warmup_steps")}
    train = {**train, **schedule, "init_from": start, "lora": {"rank": 0}}
    return train_flags({**model, "block_size": chat["block_size"]}, train)

"""Train the GPT on the encoded tokens, resumably and bit-exactly.

    tinygpt train --data_dir data/tokens --tokenizer data/tokenizer/tokenizer.json \\
        --out checkpoints/best.pt --runs_dir checkpoints/runs --preset toy
    torchrun --nproc_per_node 2 -m tinygpt train ...      (same flags; --batch_size is per process)
    tinygpt train --data_dir data/chat/tokens --init_from checkpoints/best.pt --block_size 512 ...   (chat tuning)

AdamW (weight decay on weight matrices only), linear warmup then cosine decay, gradient accumulation and
clipping, mixed precision where the hardware is fast at it, DistributedDataParallel under torchrun.

A run lives in `<runs_dir>/<fingerprint>/`, the fingerprint hashing every setting that changes the result and
the identity of the data. `last.pt` there holds everything the run's future depends on (weights, optimizer,
scaler, RNG and data-sampler states), so killing the process at any moment and rerunning the same command
continues to the very same final weights; a changed setting gets a new folder and a fresh start.

Chat tuning is this loop on a chat token folder (meta.json kind chat, from chat_encode): windows start at
conversations, the loss counts only the assistant's tokens (the mask), validation loss and bits per byte are over
those tokens only, and the checkpoints carry the folder's chat_template. A llama (rotary) start may be tuned at a
longer --block_size than it was trained at; learned positions (gpt2) cannot be extended.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tinygpt.common import TinyGPTError, atomic_open, progress, require_file, run_cli, set_malloc
from tinygpt.model.checkpoint import load_checkpoint, save_checkpoint
from tinygpt.model.batches import (IGNORE, ChatTokens, RandomBatches, TokenFile, fixed_batches, is_chat, mean_bytes,
                                   read_meta, token_dtype)
from tinygpt.model.flops import MatmulPeak
from tinygpt.model.gpt import ARCHS, GPT, PRESETS, GPTConfig, Rotary, config_from_preset
from tinygpt.model.hardware import (AMP_CHOICES, AMP_DTYPES, DEVICES, Ranks, amp_unsupported, autocast_dtype,
                                    pick_device, threads_per_process)
from tinygpt.model.lora import TARGETS, adapter_state, apply_lora, load_adapters, merge_lora
from tinygpt.model.optim import OPTIMIZERS, configure_optimizers, cosine_lr, set_learning_rates
from tinygpt.model.runs import MetricsLog, announce_run, last_logged, run_fingerprint, trim_metrics
from tinygpt.model.start import FINETUNE_WINDOW, SCRATCH, is_scratch, read_start, recipe
from tinygpt.tokenizer.bpe import Tokenizer

MODEL_FLAGS = ("preset", "arch", "n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "dropout", "norm_eps",
               "rope_theta", "tie_embeddings", "attention")
# GPTConfig fields added after runs existed (for imported models); None means today's behaviour.
LATER_MODEL_FIELDS = ("n_ff", "rope_scaling")
# Settings that never change what a run computes, so a run may be resumed with different values of them.
RUN_NEUTRAL = ("data_dir", "tokenizer", "out", "runs_dir", "ckpt_interval", "log_interval", "device", "compile", "threads",
               "tensorboard")
# Clusters ask a job to stop with these (SLURM's --signal, preemption, time limits): save, then exit.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request, resumable; not a failure of the run
STOPPED_FILE = "TINYGPT_STOPPED_FILE"  # environment: a file to create when stopped so (the SLURM launcher requeues)


@dataclass
class TrainConfig:
    data_dir: str
    tokenizer: str
    out: str
    runs_dir: str = "checkpoints/runs"
    preset: str = "toy"
    arch: str = "gpt2"
    n_layer: int | None = None  # None: the preset's value
    n_head: int | None = None
    n_kv_head: int | None = None  # None: n_head
    n_embd: int | None = None
    block_size: int | None = None
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    attention: str = "sdpa"
    init_from: str = SCRATCH  # or a tinygpt checkpoint, a Hugging Face model folder, a GGUF file
    lora_rank: int = 0  # 0: full training; else LoRA adapters of this rank on lora_targets, the rest frozen
    lora_alpha: float = 16.0
    lora_targets: str = ",".join(TARGETS)
    lora_dropout: float = 0.0
    max_steps: int | None = None  # None: the starting point's recipe (tinygpt.model.start.RECIPES)
    batch_size: int = 16  # per process and micro-step
    grad_accum: int = 1
    lr: float | None = None
    min_lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    optimizer: str = "adamw"  # adamw | muon (hidden matrices) + adamw (the rest)
    muon_lr: float | None = None  # None: lr (Muon's update is scaled to AdamW's RMS)
    muon_momentum: float = 0.95
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 16
    ckpt_interval: int = 100
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"
    amp: str = "auto"
    compile: bool = False
    tensorboard: bool = False  # also write TensorBoard event files into the run folder
    threads: int = 0  # 0: one per usable CPU; capped at the usable CPUs

    def __post_init__(self) -> None:
        for name, value in recipe(self.init_from).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def check(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_batches", "ckpt_interval", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise TinyGPTError(f"--{name}={getattr(self, name)} must be at least 1")
        if self.lr <= 0:
            raise TinyGPTError(f"--lr={self.lr} must be positive")
        if not 0 <= self.min_lr <= self.lr:
            raise TinyGPTError(f"--min_lr={self.min_lr} must lie between 0 and --lr={self.lr}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "threads"):
            if getattr(self, name) < 0:
                raise TinyGPTError(f"--{name}={getattr(self, name)} must not be negative")
        if self.amp not in AMP_CHOICES:
            raise TinyGPTError(f"--amp={self.amp!r} must be one of {', '.join(AMP_CHOICES)}")
        if self.lora_rank and is_scratch(self.init_from):
            raise TinyGPTError("--lora_rank is set but --init_from is scratch; LoRA adapts a trained model: "
                               "give --init_from, or set lora rank 0")


def hand_back_freed_memory() -> None:
    """For fine-tuning a released model on a CPU, where memory is the limit: by default glibc keeps the freed
    activations of each step in a heap that fragments (the Qwen2.5-0.5B shape's LoRA step, 2 x 256 tokens, grew
    to a 4.76 GB peak over five steps); with blocks of 1 MiB and more mapped on their own and handed back when
    freed, 3.2 GB and stable, on one thread or two. The kernel zero-fills those pages again each step, which
    costs 10-15% of the step. (At 4 MiB the cost was lost in the noise, but on two threads the peak grew again:
    3.32, 3.52, 3.74 GB over three steps.)"""
    set_malloc(mmap_threshold=1 << 20)


class Trainer:
    """One training run: built from the settings and data, then `run()` to max_steps and `write_final()`."""

    def __init__(self, cfg: TrainConfig, ranks: Ranks, device: torch.device) -> None:
        self.cfg, self.ranks, self.device = cfg, ranks, device
        self._load_data()
        self.settings = self._settings()
        self.run_dir = Path(cfg.runs_dir) / run_fingerprint(self.settings)
        self.last_path, self.best_path = self.run_dir / "last.pt", self.run_dir / "best.pt"
        self.amp_dtype = self._choose_amp()
        self.metrics_path = self.run_dir / "metrics.jsonl"

        torch.manual_seed(cfg.seed)
        self.model = self._build_model().to(device)
        torch.manual_seed(cfg.seed + 1 + ranks.rank)  # dropout: one stream per rank, apart from the init stream
        self.optimizers = configure_optimizers(self.model, optimizer=cfg.optimizer, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                               weight_decay=cfg.weight_decay, device=device, muon_lr=cfg.muon_lr,
                                               muon_momentum=cfg.muon_momentum)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)
        self.sampler = RandomBatches(self.train_tokens, cfg.batch_size, self.window, cfg.seed,
                                     ranks.rank, ranks.world_size)
        self.step, self.best_val_loss, self.last_bpb = 0, math.inf, math.nan
        self.stop_signal: str | None = None  # set by a signal handler (see `stop_on_signals`)
        self.stopping = False  # this step is the last: some process got a stop signal
        self.metrics = MetricsLog(self.metrics_path, self.run_dir / "tensorboard" if cfg.tensorboard else None)
        self.fast_model = torch.compile(self.model) if cfg.compile else self.model
        self.train_model = DistributedDataParallel(self.fast_model) if ranks.distributed else self.fast_model

    def _build_model(self) -> GPT:
        """The model at step 0: initialised, or the starting model's weights; with LoRA, frozen and adapted
        (its base weights in bf16 when training computes in bf16, or where bf16 holds them exactly)."""
        if self.start is None:
            return GPT(self.model_config)
        if self.device.type == "cpu":
            hand_back_freed_memory()
        with torch.device("meta"):  # no random initialisation of weights that are replaced next
            model = GPT(self.model_config)
        # float32 tensor by tensor, each source (bf16) tensor let go once widened, and the source's state not kept
        # beside the model for the whole run: the peak is the model plus one tensor (a tied head widened once)
        state, self.start.state = self.start.state, {}
        widened: dict[int, torch.Tensor] = {}  # by source tensor: a tied embedding and head stay one tensor
        for name, tensor in state.items():
            if id(tensor) not in widened:
                widened[id(tensor)] = tensor.float()
            state[name] = widened[id(tensor)]
        del widened
        model.load_state_dict(state, assign=True)
        del state  # the model holds the tensors now: LoRA's narrowing below then frees each float32 weight
        if model.rotary is not None:  # a buffer computed from the config, not stored: compute it for real
            model.rotary = Rotary(self.model_config)
        if self.model_config.tie_embeddings:  # assigned one by one, the two names became two parameters
            model.lm_head.weight = model.tok_emb.weight
        model.float()  # train in float32 whatever the source stored (autocast narrows where it is fast)
        if self.cfg.lora_rank:
            # computing in bf16, its rounding is accepted; in float32, bf16 holds only the weights it holds exactly
            base_dtype = torch.bfloat16 if self.amp_dtype is torch.bfloat16 else None
            apply_lora(model, rank=self.cfg.lora_rank, alpha=self.cfg.lora_alpha,
                       targets=self.cfg.lora_targets.split(","), dropout=self.cfg.lora_dropout, base_dtype=base_dtype)
        return model

    def _load_data(self) -> None:
        cfg, data_dir = self.cfg, Path(self.cfg.data_dir)
        meta = read_meta(data_dir)
        tokenizer_path = require_file(cfg.tokenizer, "tokenizer", "run the train_bpe stage first")
        self.tokenizer_json = tokenizer_path.read_text(encoding="utf-8")
        self.tokenizer = Tokenizer.from_json_str(self.tokenizer_json, source=str(tokenizer_path))
        vocab_size = meta["vocab_size"]
        if self.tokenizer.vocab_size != vocab_size:
            raise TinyGPTError(
                f"{tokenizer_path} has {self.tokenizer.vocab_size} tokens but {data_dir / 'meta.json'} says "
                f"vocab_size={vocab_size}; the tokens were encoded with another tokenizer, rerun the encode stage"
            )
        self.start = None if is_scratch(cfg.init_from) else read_start(cfg.init_from)
        if self.start is None:
            overrides = {name: getattr(cfg, name) for name in MODEL_FLAGS if name != "preset"}
            self.model_config: GPTConfig = config_from_preset(cfg.preset, vocab_size, **overrides)
            self.window = self.model_config.block_size  # tokens per training sequence
        else:
            self.model_config, self.window = self._start_config()
        dtype = token_dtype(vocab_size)
        if meta.get("dtype", dtype.name) != dtype.name:
            raise TinyGPTError(f"{data_dir / 'meta.json'} says dtype={meta['dtype']!r} but vocab_size={vocab_size} "
                               f"needs {dtype.name}; rerun the encode stage")
        self.meta_sha256 = hashlib.sha256((data_dir / "meta.json").read_bytes()).hexdigest()
        self.chat_template: str | None = meta["chat_template"] if is_chat(meta) else None
        if self.chat_template is None:
            window = self.window + 1
            self.train_tokens = TokenFile.open(data_dir / "train.bin", dtype, window)
            self.val_tokens = TokenFile.open(data_dir / "val.bin", dtype, window)
            self.val_bytes_per_token = self.val_tokens.bytes_per_token(self.tokenizer.vocab,  # for bits per byte
                                                                       self.tokenizer.special_tokens.values())
        else:
            self.train_tokens = ChatTokens.open(data_dir, "train", dtype, self.window, meta["block_size"])
            self.val_tokens = ChatTokens.open(data_dir, "val", dtype, self.window, meta["block_size"])
        # eval_batches global batches, so the validation set does not depend on how many processes share it
        self.val_batches = fixed_batches(self.val_tokens, cfg.eval_batches * self.ranks.world_size, cfg.batch_size,
                                         self.window)
        if self.chat_template is not None:
            self.val_bytes_per_token = self._counted_bytes_per_token()

    def _counted_bytes_per_token(self) -> float:
        """Chat: mean bytes of the validation targets the loss counts (in the fixed batches), so that bits per
        byte is the counted tokens' loss over their own bytes; special tokens (<|im_end|>) count 0 bytes."""
        vocab_size = self.tokenizer.vocab_size
        counts = np.zeros(vocab_size, dtype=np.int64)
        for indices in self.val_batches:
            targets = self.val_tokens.batch(indices, self.window, torch.device("cpu")).y
            counted = targets[targets != IGNORE].numpy()
            if counted.size and counted.max() >= vocab_size:
                raise TinyGPTError(f"{self.val_tokens.tokens.path} holds token id {counted.max()}, beyond "
                                   f"vocab_size={vocab_size}; it was encoded with another tokenizer, rerun chat_encode")
            counts += np.bincount(counted, minlength=vocab_size)
        if not counts.sum():
            raise TinyGPTError(f"the validation conversations in {self.val_tokens.tokens.path} have no assistant "
                               f"tokens within their first {self.window} tokens; use a longer --block_size")
        return mean_bytes(counts, self.tokenizer.vocab, self.tokenizer.special_tokens.values())

    def _start_config(self) -> tuple[GPTConfig, int]:
        """The starting model's shape (a run may change only its dropout and attention kernel) and the training
        window: model.block_size, at most the model's context; by default that context up to FINETUNE_WINDOW."""
        cfg, source = self.cfg, self.start.config
        for name in ("n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(cfg, name) is not None and getattr(cfg, name) != getattr(source, name):
                raise TinyGPTError(f"--{name}={getattr(cfg, name)} contradicts --init_from {cfg.init_from}, which has "
                                   f"{name}={getattr(source, name)}; the shape comes from the starting model")
        if cfg.block_size is not None and cfg.block_size > source.block_size:
            if source.arch == "gpt2":
                raise TinyGPTError(
                    f"--block_size={cfg.block_size} is beyond the context of --init_from {cfg.init_from} "
                    f"({source.block_size} tokens), whose learned positions (gpt2) cannot be extended; use at most "
                    f"that, or train the base with model.block_size >= {cfg.block_size} (the chat context)")
            # rotary positions have no table: the model extends to the longer window, which tuning then teaches
            source = dataclasses.replace(source, block_size=cfg.block_size)
        if Tokenizer.from_json_str(self.start.tokenizer_json, source=cfg.init_from) != self.tokenizer:
            raise TinyGPTError(f"{cfg.tokenizer} is not the tokenizer of --init_from {cfg.init_from}; the tokens must "
                               "be encoded with the model's own tokenizer (rerun train_bpe and encode with init_from)")
        config = dataclasses.replace(source, dropout=cfg.dropout, attention=cfg.attention)
        return config, cfg.block_size or min(source.block_size, FINETUNE_WINDOW)

    def _settings(self) -> dict:
        """Everything the result depends on: hashed into the run folder's name and written as its config.json."""
        cfg = self.cfg
        training = {k: v for k, v in asdict(cfg).items() if k not in RUN_NEUTRAL and k not in MODEL_FLAGS
                    and k != "init_from" and not k.startswith("lora_")}
        if cfg.lora_rank:  # only then: a scratch run's fingerprint stays what it was before LoRA existed
            training |= {k: v for k, v in asdict(cfg).items() if k.startswith("lora_")}
        start = {} if self.start is None else {"start": {"sha256": self.start.sha256, "window": self.window}}
        model = asdict(self.model_config)
        for key in LATER_MODEL_FIELDS:  # unset, they leave the fingerprint (and so older runs' folders) as it was
            if model[key] is None:
                del model[key]
        data = {
            "meta_sha256": self.meta_sha256,  # a chat folder's meta.json holds its template and conversation counts
            "train_tokens": len(self.train_tokens),
            "val_tokens": len(self.val_tokens),
            "tokenizer_sha256": hashlib.sha256(self.tokenizer_json.encode()).hexdigest(),
        }
        if self.chat_template is not None:  # only then: a plain run's fingerprint stays what it was
            data["conversations"] = {"train": len(self.train_tokens.starts), "val": len(self.val_tokens.starts)}
        return {
            "model": model,
            **start,
            "training": {**training, "world_size": self.ranks.world_size},
            "data": data,
        }

    def _choose_amp(self) -> torch.dtype | None:
        """The autocast dtype: what --amp says, or for `auto` what this machine is fast at; a resumed run keeps
        the choice its run folder records, so that it computes as it began, and stops where this device cannot
        compute in it (fp16 begun on a GPU, resumed on a CPU). Rank 0 decides, every rank follows (a broadcast,
        errors included, so that no rank is left waiting in a collective)."""
        decision: tuple[str | None, str | None] = (None, None)  # (dtype name, error)
        if self.ranks.is_main:
            try:
                decision = (self._amp_of_this_run(), None)
            except TinyGPTError as e:
                decision = (None, str(e))
        name, error = self.ranks.broadcast(decision)
        if error:
            raise TinyGPTError(error)
        return AMP_DTYPES[name]

    def _amp_of_this_run(self) -> str:
        recorded = self.run_dir / "config.json"
        chosen = None
        if self.cfg.amp == "auto" and self.last_path.exists() and recorded.exists():
            chosen = json.loads(recorded.read_text()).get("amp_chosen")
        if chosen in AMP_DTYPES:
            why_not = amp_unsupported(AMP_DTYPES[chosen], self.device)
            if why_not:
                raise TinyGPTError(
                    f"run folder {self.run_dir} computes in {chosen} (what --amp auto chose where the run began), "
                    f"but on {self.device} {why_not}; resume it on a device like that one, or start a new run "
                    f"here with --amp off (a new run folder; this one is kept)")
            return chosen
        dtype = autocast_dtype(self.cfg.amp, self.device)
        why_not = amp_unsupported(dtype, self.device)
        if why_not:
            raise TinyGPTError(f"--amp {self.cfg.amp}: on {self.device} {why_not}; use --amp off or auto")
        return self.amp_name(dtype)

    @staticmethod
    def amp_name(dtype: torch.dtype | None) -> str:
        return next(name for name, d in AMP_DTYPES.items() if d is dtype)

    # --- state --------------------------------------------------------------------------------------------

    def resume_or_start(self) -> None:
        resumed_step = None
        if self.last_path.exists():
            self._load_state(load_checkpoint(self.last_path))
            resumed_step = self.step
        self._check_ranks_agree(resumed_step)
        if self.ranks.is_main:
            announce_run(self.run_dir, self.settings, resumed_step)
            with atomic_open(self.run_dir / "config.json", "w") as f:
                json.dump({**self.settings, "fingerprint": self.run_dir.name,
                           "amp_chosen": self.amp_name(self.amp_dtype)}, f, indent=2)
            # a fresh start drops what a run killed before its first last.pt logged (step 0's line included)
            trim_metrics(self.metrics_path, self.step if resumed_step is not None else -1)
            self.last_bpb = last_logged(self.metrics_path, "val_bpb")
            self.metrics.open(self.step)

    def _check_ranks_agree(self, resumed_step: int | None) -> None:
        """Every rank resumes from the same step, or all start afresh; else every rank stops with the same
        message (a rank that went its own way would wait forever in a collective, or train other weights).
        Ranks disagree when run folders are not on one shared file system."""
        views = self.ranks.gather(resumed_step)
        if len(set(views)) > 1:
            seen = ", ".join(f"rank {r}: {'step ' + str(v) if v is not None else 'no last.pt'}"
                             for r, v in enumerate(views))
            raise TinyGPTError(f"the processes disagree about resuming run {self.run_dir} ({seen}); put --runs_dir "
                               "on a file system every node shares, or give each node the same copy of the run folder")

    def _rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _state(self, val_loss: float) -> dict:
        """The whole training state (a collective under DDP: it gathers every rank's RNG state)."""
        # LoRA: only what changes; the frozen base is the starting model, which the fingerprint identifies
        weights = {"adapters": adapter_state(self.model)} if self.cfg.lora_rank else {"model": self.model.state_dict()}
        return {
            **weights,
            "model_config": asdict(self.model_config),
            "tokenizer_json": self.tokenizer_json,
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": self.ranks.gather(self._rng_state()),
            "step": self.step,
            "val_loss": val_loss,
            "best_val_loss": self.best_val_loss,
            "fingerprint": self.run_dir.name,
            **({} if self.chat_template is None else {"chat_template": self.chat_template}),
        }

    def _load_state(self, ckpt: dict) -> None:
        if ckpt.get("fingerprint") != self.run_dir.name or len(ckpt.get("rng", ())) != self.ranks.world_size:
            raise TinyGPTError(f"{self.last_path} was not written by this run (fingerprint or process count differs); "
                               "delete the run folder to start over")
        try:
            self._load_weights(ckpt)
            if len(ckpt["optimizers"]) != len(self.optimizers):
                raise ValueError(f"{len(ckpt['optimizers'])} optimizer states for {len(self.optimizers)} optimizers")
            for opt, state in zip(self.optimizers, ckpt["optimizers"]):
                opt.load_state_dict(state)
            self.scaler.load_state_dict(ckpt["scaler"])
            self.sampler.load_state_dict(ckpt["sampler"])
            rng = ckpt["rng"][self.ranks.rank]
            torch.set_rng_state(rng["torch"])
            if self.device.type == "cuda" and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], self.device)
            self.step, self.best_val_loss = int(ckpt["step"]), float(ckpt["best_val_loss"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise TinyGPTError(f"{self.last_path} is incomplete or damaged ({type(e).__name__}: {e}); "
                               "delete the run folder to start over") from None

    def _load_weights(self, ckpt: dict) -> None:
        if self.cfg.lora_rank:
            load_adapters(self.model, ckpt["adapters"])
        else:
            self.model.load_state_dict(ckpt["model"])

    def _diverged(self, what: str) -> TinyGPTError:
        kept = (f"keeping the last good checkpoint {self.last_path}" if self.last_path.exists()
                else "before the first checkpoint")
        return TinyGPTError(f"{what} at step {self.step}; stopped, {kept}; "
                            "lower --lr or --grad_clip, or raise --warmup_steps")

    def _check_weights_finite(self) -> None:
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise self._diverged("the model weights became nan/inf")

    # --- training -----------------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches, split over the ranks (chat: over their counted tokens)."""
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, batch (chat: token) count
        for i, offsets in enumerate(self.val_batches):
            if i % self.ranks.world_size == self.ranks.rank:
                x, y, segments = self.val_tokens.batch(offsets, self.window, self.device)
                with self._autocast():
                    if self.chat_template is None:
                        _, loss = self.fast_model(x, y)
                        count = loss.new_ones((), dtype=torch.float64)
                    else:
                        loss, count = self._summed_loss(self.fast_model, x, y, segments), (y != IGNORE).sum()
                total += torch.stack([loss.double(), count.double()])
        self.model.train()
        loss_sum, count = self.ranks.all_reduce_sum(total).tolist()
        return loss_sum / count

    @staticmethod
    def _summed_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                     segments: torch.Tensor | None) -> torch.Tensor:
        """Chat: the cross-entropy summed over the counted targets (a micro-batch may count none: 0, not nan) of
        packed rows."""
        return model(x, y, reduction="sum", segments=segments)[1]  # IGNORE is GPT.forward's ignored target

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean training loss over all ranks."""
        cfg = self.cfg
        set_learning_rates(self.optimizers, cosine_lr(self.step, lr=1.0, min_lr=cfg.min_lr / cfg.lr,
                                                      warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps))
        batches = [self.sampler.next(self.device) for _ in range(cfg.grad_accum)]
        if self.chat_template is None:
            # every micro-batch has batch_size * window targets: the mean of the means is the mean per token
            per_micro, per_step = cfg.grad_accum, cfg.grad_accum * self.ranks.world_size
        else:
            # micro-batches count different numbers of assistant tokens: each backpropagates its summed loss over
            # the global batch's count (times world_size, which DDP's gradient average divides by again), so
            # that every counted token of the step weighs the same on any split into micro-batches and ranks
            counted = sum((batch.y != IGNORE).sum() for batch in batches).double()
            per_step = self.ranks.all_reduce_sum(counted).item()
            if not per_step:
                raise TinyGPTError(f"no assistant tokens in the {cfg.grad_accum * cfg.batch_size * self.ranks.world_size} "
                                   f"conversations of step {self.step} within {self.window} tokens; use a longer "
                                   "--block_size")
            per_micro = per_step / self.ranks.world_size
        loss_sum = torch.zeros((), device=self.device)
        for micro, (x, y, segments) in enumerate(batches):
            # gradients are averaged across ranks on the last micro-step only
            skip_sync = self.ranks.distributed and micro < cfg.grad_accum - 1
            with self.train_model.no_sync() if skip_sync else contextlib.nullcontext():
                with self._autocast():
                    if self.chat_template is None:
                        _, loss = self.train_model(x, y)
                    else:
                        loss = self._summed_loss(self.train_model, x, y, segments)
                self.scaler.scale(loss / per_micro).backward()
            loss_sum += loss.detach()
        # one all-reduce carries the loss and whether any process was asked to stop, so all stop at this step
        stop = loss_sum.new_tensor(float(self.stop_signal is not None))
        loss_total, stops = self.ranks.all_reduce_sum(torch.stack([loss_sum, stop])).tolist()
        train_loss, self.stopping = loss_total / per_step, stops > 0
        if not math.isfinite(train_loss):
            raise self._diverged(f"the training loss is {train_loss}")
        if cfg.grad_clip > 0:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        for opt in self.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.step += 1
        return train_loss

    def run(self) -> None:
        cfg, main = self.cfg, self.ranks.is_main
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.ranks.world_size * self.window
        flops_per_token = self.model.estimate_flops_per_token(self.window)  # an imported model trains on less
        # MFU: achieved model FLOP/s over what this device's matmuls reach in the training dtype, all processes;
        # measured by rank 0 alone, which logs it (the others would only slow its measurement down)
        peak = MatmulPeak(self.amp_dtype or torch.float32, self.device, self.ranks.world_size) if main else None
        if main:
            print(f"model: {self.model.num_params():,} parameters, {flops_per_token / 1e6:.1f} MFLOP per "
                  f"token (forward + backward); {tokens_per_step} tokens per step on {self.ranks.world_size} "
                  f"process(es), {self.device}, amp {self.amp_name(self.amp_dtype)} ({self.cfg.amp}); "
                  f"measured matmul peak {peak.flops / 1e12:.2f} TFLOP/s")
        if self.step == 0:
            self._validate_start()
        bar = progress(total=cfg.max_steps, initial=self.step, unit="step", desc="train",
                       **({} if main else {"disable": True}))
        window_time, window_steps = 0.0, 0  # training time only: evaluation and checkpoints are not throughput
        with bar:
            while self.step < cfg.max_steps:
                started = time.perf_counter()
                train_loss = self.train_step()
                window_time += time.perf_counter() - started
                window_steps += 1
                bar.update(1)
                done = self.step == cfg.max_steps
                record: dict = {}
                if self.step % cfg.log_interval == 0 or done:
                    tokens_per_s = tokens_per_step * window_steps / window_time
                    lr = self.optimizers[0].param_groups[0]["lr"]
                    flops_per_s = tokens_per_s * flops_per_token
                    mfu = peak.mfu(flops_per_s) if peak else math.nan
                    record = {"step": self.step, "train_loss": train_loss, "lr": lr, "tokens_per_s": tokens_per_s,
                              "flops_per_s": flops_per_s, "mfu": mfu}
                    if len(self.optimizers) > 1:
                        record["muon_lr"] = self.optimizers[1].param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{train_loss:.3f}", val_bpb=f"{self.last_bpb:.3f}", lr=f"{lr:.2e}",
                                    tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.0%}", refresh=False)
                    window_time, window_steps = 0.0, 0
                val_loss, improved = math.nan, False
                if self.step % cfg.eval_interval == 0 or done:
                    val_loss = self.evaluate()
                    if not math.isfinite(val_loss):
                        raise self._diverged(f"the validation loss is {val_loss}")
                    improved = val_loss < self.best_val_loss
                    self.best_val_loss = min(self.best_val_loss, val_loss)
                    bpb = self.last_bpb = self._bits_per_byte(val_loss)
                    record = {"step": self.step, "train_loss": train_loss, **record, "val_loss": val_loss, "val_bpb": bpb}
                    if main:
                        bar.write(f"step {self.step}: validation {bpb:.4f} bits/byte (loss {val_loss:.4f}), "
                                  f"train loss {train_loss:.4f}")
                # the metrics line first: a kill between the two then leaves an extra line, which the resumed run
                # trims, rather than a checkpoint past a line that is lost for good
                if main and record:
                    self.metrics.write(record)
                save_last = self.step % cfg.ckpt_interval == 0 or done or self.stopping
                if improved or save_last:
                    self._check_weights_finite()
                    state = self._state(val_loss)  # every rank joins: it gathers their RNG states
                    if main and improved:
                        save_checkpoint(self.best_path, state)
                    if main and save_last:
                        save_checkpoint(self.last_path, state)
                if self.stopping and not done:
                    raise TrainingStopped(f"stopped by {self.stop_signal or 'another process'} at step {self.step}, "
                                          f"state saved in {self.last_path}; run the same command to resume")

    def _bits_per_byte(self, val_loss: float) -> float:
        return val_loss / (math.log(2) * self.val_bytes_per_token)

    def _validate_start(self) -> None:
        """Validation before the first step: the number the run starts from (a fine-tuned model's baseline), in
        the metrics and the progress bar at once. Evaluation draws no random numbers, so the run's stream and its
        exact resume are untouched; it is not a candidate for the best model."""
        val_loss = self.evaluate()
        if not math.isfinite(val_loss):
            raise self._diverged(f"the validation loss is {val_loss}")
        bpb = self.last_bpb = self._bits_per_byte(val_loss)
        if self.ranks.is_main:
            self.metrics.write({"step": 0, "val_loss": val_loss, "val_bpb": bpb})
            print(f"step 0: validation {bpb:.4f} bits/byte (loss {val_loss:.4f})")

    def write_final(self) -> Path:
        """The best checkpoint's model, config and tokenizer (no training state), atomically to --out."""
        best = load_checkpoint(self.best_path)
        final = {key: best[key] for key in ("model_config", "tokenizer_json", "step", "val_loss", "chat_template")
                 if key in best}
        if self.cfg.lora_rank:  # the adapters folded into the weights: a plain model from here on
            self._load_weights(best)
            final["model"] = merge_lora(self.model).state_dict()
        else:
            final["model"] = best["model"]
        final["run"] = self.run_dir.name  # which run folder holds this checkpoint's metrics (for the report)
        save_checkpoint(self.cfg.out, final)
        print(f"best val loss {best['val_loss']:.4f} at step {best['step']} -> {self.cfg.out}")
        return Path(self.cfg.out)


def train(cfg: TrainConfig) -> Path:
    """Train (or resume) the run `cfg` describes; return the path of the final checkpoint (--out)."""
    cfg.check()
    ranks = Ranks.from_env()
    torch.set_num_threads(threads_per_process(cfg.threads, ranks.local_world_size))
    device = pick_device(cfg.device, ranks.local_rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if ranks.distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        trainer = Trainer(cfg, ranks, device)
        trainer.resume_or_start()
        try:
            with stop_on_signals(trainer), trainer.metrics:
                trainer.run()
        except TrainingStopped:
            if os.environ.get(STOPPED_FILE):  # torchrun turns exit 75 into 1: say it through a file
                Path(os.environ[STOPPED_FILE]).touch()
            raise
        return trainer.write_final() if ranks.is_main else Path(cfg.out)
    finally:
        if ranks.distributed:
            dist.destroy_process_group()


class TrainingStopped(TinyGPTError):
    """A stop signal arrived: the state is saved and the same command resumes."""

    exit_code = EXIT_STOPPED


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer):
    """While training, SIGTERM and SIGUSR1 ask the trainer to save last.pt after the current step and stop
    (clusters send them before preempting a job or at its time limit); the old handlers come back after."""

    def request_stop(signum, frame):
        trainer.stop_signal = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig("", "", "")  # defaults
    p = argparse.ArgumentParser(prog="tinygpt train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("data and outputs")
    io.add_argument("--data_dir", required=True, help="folder with train.bin, val.bin and meta.json (encode stage)")
    io.add_argument("--tokenizer", required=True, help="tokenizer.json the tokens were encoded with")
    io.add_argument("--out", required=True, help="final checkpoint: the best model (by validation loss)")
    io.add_argument("--runs_dir", default=d.runs_dir, help="resumable run folders, one per settings fingerprint")
    m = p.add_argument_group("model (a preset, optionally overridden)")

    def true_or_false(text: str) -> bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(text)  # argparse: "invalid true_or_false value"
        return text.lower() == "true"

    m.add_argument("--preset", default=d.preset, choices=sorted(PRESETS))
    m.add_argument("--arch", default=d.arch, choices=ARCHS,
                   help="gpt2 (LayerNorm, learned positions, GELU) or llama (RMSNorm, RoPE, SwiGLU, no biases)")
    for name in ("n_layer", "n_head", "n_embd", "block_size"):
        m.add_argument(f"--{name}", type=int, default=None, help="default: the preset's")
    m.add_argument("--n_kv_head", type=int, default=None, help="llama: key/value heads (grouped-query attention); "
                   "default: n_head")
    m.add_argument("--dropout", type=float, default=d.dropout)
    m.add_argument("--norm_eps", type=float, default=d.norm_eps, help="LayerNorm / RMSNorm epsilon")
    m.add_argument("--rope_theta", type=float, default=d.rope_theta, help="llama: base of the rotary frequencies")
    # a value, not only a switch: the workflow passes `--tie_embeddings false` (an absent flag means the default)
    m.add_argument("--tie_embeddings", type=true_or_false, nargs="?", const=True, default=d.tie_embeddings,
                   metavar="true|false", help="the LM head is the token embedding")
    m.add_argument("--attention", default=d.attention, choices=["sdpa", "explicit"])
    st = p.add_argument_group("starting point (fine-tuning)")
    st.add_argument("--init_from", default=d.init_from, help="scratch, a tinygpt checkpoint (.pt), a Hugging Face "
                    "model folder or a GGUF file; the model's shape then comes from it (--block_size: the window)")
    st.add_argument("--lora_rank", type=int, default=d.lora_rank, help="LoRA adapters of this rank, base frozen; 0: "
                    "full fine-tuning")
    st.add_argument("--lora_alpha", type=float, default=d.lora_alpha, help="adapter scale alpha/rank")
    st.add_argument("--lora_targets", default=d.lora_targets, help=f"comma-separated layers from {','.join(TARGETS)}")
    st.add_argument("--lora_dropout", type=float, default=d.lora_dropout, help="dropout on the adapters' input")
    scratch, finetune = recipe(SCRATCH), recipe("model")
    o = p.add_argument_group("optimization (defaults: scratch's / a starting model's recipe)")
    o.add_argument("--max_steps", type=int, help=f"optimizer steps ({scratch['max_steps']} / {finetune['max_steps']})")
    o.add_argument("--batch_size", type=int, default=d.batch_size, help="sequences per micro-step and process")
    o.add_argument("--grad_accum", type=int, default=d.grad_accum, help="micro-steps per optimizer step")
    o.add_argument("--lr", type=float, help=f"peak learning rate ({scratch['lr']} / {finetune['lr']})")
    o.add_argument("--min_lr", type=float, help=f"learning rate at the end of the cosine decay ({scratch['min_lr']} / "
                   f"{finetune['min_lr']})")
    o.add_argument("--warmup_steps", type=int, help=f"({scratch['warmup_steps']} / {finetune['warmup_steps']})")
    o.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS,
                   help="adamw, or muon for the hidden weight matrices with adamw for the rest")
    o.add_argument("--muon_lr", type=float, default=d.muon_lr, help="Muon's peak learning rate; default: --lr")
    o.add_argument("--muon_momentum", type=float, default=d.muon_momentum)
    o.add_argument("--weight_decay", type=float, default=d.weight_decay, help="decay of the weight matrices")
    o.add_argument("--beta1", type=float, default=d.beta1)
    o.add_argument("--beta2", type=float, default=d.beta2)
    o.add_argument("--grad_clip", type=float, default=d.grad_clip, help="max gradient norm; 0 disables clipping")
    o.add_argument("--seed", type=int, default=d.seed)
    e = p.add_argument_group("evaluation, checkpoints, logging")
    e.add_argument("--eval_interval", type=int, default=d.eval_interval, help="steps between validation runs")
    e.add_argument("--eval_batches", type=int, default=d.eval_batches, help="fixed validation batches per run")
    e.add_argument("--ckpt_interval", type=int, default=d.ckpt_interval, help="steps between writes of last.pt")
    e.add_argument("--log_interval", type=int, default=d.log_interval, help="steps between metrics.jsonl lines")
    h = p.add_argument_group("hardware")
    h.add_argument("--device", default=d.device, choices=DEVICES, help="auto: cuda, then mps, then cpu")
    h.add_argument("--amp", default=d.amp, choices=AMP_CHOICES,
                   help="mixed precision; auto: bf16 where fast (Ampere+ GPUs, AMX/AVX512-BF16 CPUs), fp16 on older GPUs")
    h.add_argument("--no_amp", dest="amp", action="store_const", const="off", help="same as --amp off")
    h.add_argument("--compile", action="store_true", help="torch.compile the model")
    e.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files into the run folder")
    h.add_argument("--threads", type=int, default=d.threads, help="CPU threads for PyTorch; 0: one per usable CPU (never more)")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    return train(TrainConfig(**vars(args)))


if __name__ == "__main__":
    run_cli(main)

"""Chat tuning in the training loop: on a chat token folder (CHAT_SPEC's format: tokens, loss mask, conversation
starts) windows start at conversations, the loss and validation count only the assistant's tokens (checked against
a cross-entropy computed by hand from the files), bits per byte is over those tokens' bytes, a kill -9 resumes to
bit-identical weights, the checkpoints carry the chat template, and a llama start extends its context."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import killed_and_resumed, run_dirs, subprocess_env
from test_lora import args
from test_train import metrics, write_token_dir
from tinygpt.common import EOT, TinyGPTError
from tinygpt.data.stories.generator import story
from tinygpt.model.batches import PACK_LOOKAHEAD, ChatTokens, RandomBatches
from tinygpt.model.checkpoint import load_checkpoint, load_model
from tinygpt.model.hardware import Ranks
from tinygpt.model.train import TrainConfig, Trainer, build_parser, main
from tinygpt.tokenizer.bpe import Tokenizer
from tinygpt.tokenizer.chat import CHATML_TEMPLATE, IM_END, IM_START
from tinygpt.tokenizer.encode_chat import encode_conversations

TEMPLATE = CHATML_TEMPLATE
CHAT_BLOCK = 64  # the chat context: four times the base's 16 tokens
NAMES = ["Pip", "Tom", "Lily", "Max", "Sue", "Ben", "Mia", "Sam"]


def conversation(i: int) -> list[dict]:
    rng = random.Random(i)
    name = rng.choice(NAMES)
    if i % 3 == 0:  # short enough that windows pack several
        return [{"role": "user", "content": f"{name}?"}, {"role": "assistant", "content": f"{name}."}]
    first = story(rng).split(". ")[0][:60]
    return [{"role": "user", "content": f"Tell me about {name}."}, {"role": "assistant", "content": f"{name}: {first}."}]


def write_chat_dir(path: Path, tokenizer_path: Path, n: int = 60) -> Path:
    """A chat token folder written by the chat_encode stage from `n` tiny conversations (the last fifth: validation)."""
    path.mkdir(parents=True)
    lines = [json.dumps({"messages": conversation(i)}) for i in range(n)]
    (path / "conversations.jsonl").write_text("\n".join(lines) + "\n")
    encode_conversations(path / "conversations.jsonl", tokenizer_path, path / "tokens", CHAT_BLOCK, val_fraction=0.2)
    return path / "tokens"


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("TINYGPT_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Story tokens and a tokenizer with ChatML's special tokens (the base model's vocabulary is the chat's)."""
    path = write_token_dir(tmp_path_factory.mktemp("tokens"), n_stories=80)
    tokenizer = Tokenizer.from_json_str((path / "tokenizer.json").read_text())
    if IM_START not in tokenizer.special_tokens:  # train_bpe without the reserved chat tokens: add them after EOT
        tokenizer = Tokenizer(tokenizer.merges, specials=(EOT, IM_START, IM_END))
        tokenizer.save(path / "tokenizer.json")
        (path / "meta.json").write_text(json.dumps({"vocab_size": tokenizer.vocab_size, "dtype": "uint16"}))
    return path


@pytest.fixture(scope="module")
def chat_dir(data_dir, tmp_path_factory) -> Path:
    return write_chat_dir(tmp_path_factory.mktemp("chat") / "chat", data_dir / "tokenizer.json")


def base_model(data_dir: Path, out: Path, arch: str) -> Path:
    main(args(data_dir, out, "--arch", arch, "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "16",
              "--max_steps", "16", "--eval_interval", "16", "--lr", "1e-2", "--warmup_steps", "2"))
    return out / "best.pt"


@pytest.fixture(scope="module")
def base(data_dir, tmp_path_factory) -> Path:
    """A tiny llama trained at a 16-token context."""
    return base_model(data_dir, tmp_path_factory.mktemp("base"), "llama")


def chat_args(chat_dir: Path, data_dir: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return ["--data_dir", str(chat_dir), "--tokenizer", str(data_dir / "tokenizer.json"), "--out", str(out / "best.pt"),
            "--runs_dir", str(out / "runs"), "--init_from", str(base), "--block_size", str(CHAT_BLOCK),
            "--batch_size", "4", "--eval_batches", "2", "--threads", "1", "--amp", "off", "--warmup_steps", "2", *extra]


def trainer_for(argv: list[str]) -> Trainer:
    cfg = TrainConfig(**vars(build_parser().parse_args(argv)))
    cfg.check()
    return Trainer(cfg, Ranks(), torch.device("cpu"))


def read_split(chat_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.fromfile(chat_dir / f"{split}.bin", dtype=np.uint16).astype(np.int64),
            np.fromfile(chat_dir / f"{split}.mask.bin", dtype=np.uint8),
            np.fromfile(chat_dir / f"{split}.starts.bin", dtype="<i8"))


def packed_rows(chat_dir: Path, split: str, first: int) -> list[tuple[int, int]]:
    """(start, stop) in the token file of each conversation the window from conversation `first` holds, written
    from the rule (docs/formats.md), not the trainer: `first`, cut to CHAT_BLOCK + 1 tokens, then first fit the
    next PACK_LOOKAHEAD conversations into the room left. A conversation ends where the next starts; the last one
    at its last token that is not the <|endoftext|> padding."""
    tokens, _, starts = read_split(chat_dir, split)
    eot = json.loads((chat_dir / "meta.json").read_text())["eot_id"]
    ends = [int(e) for e in starts[1:]] + [int(np.nonzero(tokens != eot)[0][-1]) + 1]
    s = int(starts[first])
    chosen, room = [(s, min(ends[first], s + CHAT_BLOCK + 1))], CHAT_BLOCK + 1 - (ends[first] - s)
    for c in range(first + 1, min(first + 1 + PACK_LOOKAHEAD, len(starts))):
        if ends[c] - starts[c] <= room:
            chosen.append((int(starts[c]), ends[c]))
            room -= ends[c] - int(starts[c])
    return chosen


def hand_losses(model, chat_dir: Path, split: str, rows: list[int]) -> dict:
    """Summed cross-entropy (float64) over the targets the mask counts in each packed window, and over every target,
    with their counts and the counted targets' bytes: computed from the files, not the trainer, each conversation
    run through the model alone."""
    tokens, mask, _ = read_split(chat_dir, split)
    out = {"masked": 0.0, "all": 0.0, "count": 0, "all_count": 0, "targets": [], "conversations": 0}
    with torch.no_grad():
        for first in rows:
            for s, stop in packed_rows(chat_dir, split, first):
                sequence = torch.from_numpy(tokens[s:stop])
                logits, _ = model(sequence[None, :-1])
                nll = -torch.log_softmax(logits[0].double(), -1).gather(1, sequence[1:, None])[:, 0]
                counted = torch.from_numpy(mask[s + 1 : stop] == 1)
                out["masked"] += nll[counted].sum().item()
                out["count"] += int(counted.sum())
                out["all"] += nll.sum().item()
                out["all_count"] += len(nll)
                out["targets"] += sequence[1:][counted].tolist()
                out["conversations"] += 1
    return out


def test_the_training_loss_counts_only_the_assistant_tokens(chat_dir, data_dir, base, tmp_path):
    """Fails if the loss also counted user tokens, or weighed micro-batches instead of tokens."""
    batch, accum = 2, 3
    trainer = trainer_for(chat_args(chat_dir, data_dir, base, tmp_path, "--batch_size", str(batch),
                                    "--grad_accum", str(accum), "--max_steps", "2"))
    model = copy.deepcopy(trainer.model).eval()
    starts = read_split(chat_dir, "train")[2]
    generator = torch.Generator().manual_seed(trainer.cfg.seed)  # the windows the seeded sampler picks
    picked = torch.cat([torch.randint(len(starts), (batch,), generator=generator) for _ in range(accum)]).tolist()
    expected = hand_losses(model, chat_dir, "train", picked)
    masked, unmasked = expected["masked"] / expected["count"], expected["all"] / expected["all_count"]
    # the tolerance below is a hundred times finer than the gap between counting the assistant's tokens and all
    assert 0 < expected["count"] < expected["all_count"] and abs(masked - unmasked) > 1e-3 * masked
    assert expected["conversations"] > len(picked)  # rows are packed: some hold more than one conversation
    assert trainer.train_step() == pytest.approx(masked, rel=1e-5)


def test_validation_loss_and_bits_per_byte_count_only_the_assistant_tokens(chat_dir, data_dir, base, tmp_path):
    trainer = trainer_for(chat_args(chat_dir, data_dir, base, tmp_path, "--max_steps", "2"))
    n_val = len(read_split(chat_dir, "val")[2])
    spread = torch.linspace(0, n_val - 1, 2 * 4).round().long().tolist()  # eval_batches * batch_size, evenly
    assert torch.cat(trainer.val_batches).tolist() == spread
    expected = hand_losses(copy.deepcopy(trainer.model).eval(), chat_dir, "val", spread)
    val_loss = trainer.evaluate()
    assert val_loss == pytest.approx(expected["masked"] / expected["count"], rel=1e-5)
    tokenizer = trainer.tokenizer
    specials = set(tokenizer.special_tokens.values())
    counted_bytes = sum(0 if t in specials else len(tokenizer.vocab[t]) for t in expected["targets"])
    assert counted_bytes < sum(len(tokenizer.vocab[t]) for t in read_split(chat_dir, "val")[0][:200])  # sanity
    bpb = trainer._bits_per_byte(val_loss)
    assert bpb == pytest.approx(expected["masked"] / math.log(2) / counted_bytes, rel=1e-5)


def test_windows_start_at_conversation_starts_and_ranks_split_the_global_batch(chat_dir):
    tokens, mask, starts = read_split(chat_dir, "train")
    chat = ChatTokens.open(chat_dir, "train", np.dtype(np.uint16), CHAT_BLOCK, CHAT_BLOCK)
    single = RandomBatches(chat, batch_size=6, block_size=CHAT_BLOCK, seed=5)
    ranks = [RandomBatches(chat, batch_size=3, block_size=CHAT_BLOCK, seed=5, rank=r, world_size=2) for r in range(2)]
    cpu, seen = torch.device("cpu"), set()
    eot = json.loads((chat_dir / "meta.json").read_text())["eot_id"]

    def expected_row(first: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs, targets and segments of the window from conversation `first`, built by packed_rows' rule."""
        x, y, seg = [], [], []
        for segment, (s, stop) in enumerate(packed_rows(chat_dir, "train", first)):
            x += tokens[s:stop].tolist()
            y += [-1] + np.where(mask[s + 1 : stop] == 1, tokens[s + 1 : stop], -1).tolist()  # no first target
            seg += [segment] * (stop - s)
        pad = CHAT_BLOCK + 1 - len(x)
        x, y, seg = x + [eot] * pad, y + [-1] * pad, seg + [seg[-1] + 1] * pad
        return torch.tensor(x[:-1]), torch.tensor(y[1:]), torch.tensor(seg[:-1])

    packed = 0
    for _ in range(20):
        x, y, segments = single.next(cpu)
        parts = [r.next(cpu) for r in ranks]
        for field in range(3):
            assert torch.equal((x, y, segments)[field], torch.cat([p[field] for p in parts])), field
        for row in zip(x, y, segments):
            matches = [c for c in range(len(starts)) if all(map(torch.equal, expected_row(c), row))]
            assert matches, "a row that no conversation's packing gives"
            seen.add(matches[0])
            packed += bool(row[2][row[1] != -1].max() > 0)
    assert len(seen) > len(starts) / 2 and packed > 10  # many rows count a second conversation


def test_a_micro_batch_with_no_assistant_token_adds_nothing(chat_dir, data_dir, base, tmp_path):
    """Summed losses: a window cut before the assistant's turn contributes 0 (a mean would give nan)."""
    trainer = trainer_for(chat_args(chat_dir, data_dir, base, tmp_path, "--max_steps", "2"))
    x, y, segments = trainer.sampler.next(torch.device("cpu"))
    none = torch.full_like(y, -1)
    assert trainer._summed_loss(trainer.model, x, none, segments).item() == 0.0


def test_chat_tuning_extends_a_llama_context_and_its_checkpoints_carry_the_template(chat_dir, data_dir, base, tmp_path):
    main(chat_args(chat_dir, data_dir, base, tmp_path, "--max_steps", "4", "--eval_interval", "2"))
    [run_dir] = run_dirs(tmp_path)
    for path in (run_dir / "last.pt", run_dir / "best.pt", tmp_path / "best.pt"):
        ckpt = load_checkpoint(path)
        assert ckpt["chat_template"] == TEMPLATE and ckpt["model_config"]["block_size"] == CHAT_BLOCK, path
    assert "chat_template" not in load_checkpoint(base)  # a plain run's checkpoint has none
    model, _ = load_model(tmp_path / "best.pt")
    assert model(torch.zeros(1, CHAT_BLOCK, dtype=torch.long))[0].shape[1] == CHAT_BLOCK
    settings = json.loads((run_dir / "config.json").read_text())
    meta_sha = hashlib.sha256((chat_dir / "meta.json").read_bytes()).hexdigest()
    assert settings["data"]["meta_sha256"] == meta_sha and "sha256" in settings["start"]
    assert settings["data"]["conversations"] == json.loads((chat_dir / "meta.json").read_text())["conversations"]


def test_a_gpt2_start_cannot_extend_its_learned_positions(chat_dir, data_dir, tmp_path):
    gpt2 = base_model(data_dir, tmp_path / "gpt2", "gpt2")
    with pytest.raises(TinyGPTError, match=f"learned positions .*train the base with model.block_size >= {CHAT_BLOCK}"):
        main(chat_args(chat_dir, data_dir, gpt2, tmp_path / "chat", "--max_steps", "2"))


def test_a_window_longer_than_the_folder_was_padded_for_is_a_clear_error(chat_dir, data_dir, base, tmp_path):
    with pytest.raises(TinyGPTError, match="rerun chat_encode with --block_size 80"):
        main(chat_args(chat_dir, data_dir, base, tmp_path, "--max_steps", "2", "--block_size", "80"))


@pytest.mark.slow
def test_killed_chat_tuning_resumes_to_bit_identical_weights(chat_dir, data_dir, base, tmp_path):
    settings = ["--max_steps", "60", "--ckpt_interval", "5", "--eval_interval", "20", "--grad_accum", "2",
                "--dropout", "0.1"]
    whole_run, run_dir = killed_and_resumed(lambda out: chat_args(chat_dir, data_dir, base, out, *settings), tmp_path, 60)
    final_whole, final_resumed = load_checkpoint(tmp_path / "whole/best.pt"), load_checkpoint(tmp_path / "killed/best.pt")
    assert final_whole["step"] == final_resumed["step"] and final_whole["chat_template"] == TEMPLATE
    for name, tensor in final_whole["model"].items():
        assert torch.equal(tensor, final_resumed["model"][name]), name
    last_whole, last_resumed = load_checkpoint(whole_run / "last.pt"), load_checkpoint(run_dir / "last.pt")
    assert all(torch.equal(t, last_resumed["model"][n]) for n, t in last_whole["model"].items())


def test_micro_batches_weigh_every_counted_token_alike(chat_dir, data_dir, base, tmp_path, monkeypatch):
    """Batch 4 in one micro-step and batch 1 in four read the same windows (one sampler stream); their conversations
    count different numbers of assistant tokens, so a mean of per-micro-batch means would change the gradient. The
    norm before clipping is compared: AdamW's first steps would hide a mis-weighting in the weights."""
    norms, clip = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: norms.append(float(clip(*a, **k))) or 0.0)
    losses = []
    for batch, accum in ((4, 1), (1, 4)):
        trainer = trainer_for(chat_args(chat_dir, data_dir, base, tmp_path / str(batch), "--batch_size", str(batch),
                                        "--grad_accum", str(accum), "--max_steps", "3"))
        losses.append([trainer.train_step() for _ in range(3)])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and norms[3:] == pytest.approx(norms[:3], rel=1e-5)


@pytest.mark.slow
def test_two_process_ddp_chat_tuning_matches_one_process_with_the_same_global_batch(chat_dir, data_dir, base, tmp_path):
    common = ["--max_steps", "4", "--eval_interval", "2", "--log_interval", "1", "--grad_accum", "2"]
    env = subprocess_env()
    single = chat_args(chat_dir, data_dir, base, tmp_path / "single", *common, "--batch_size", "4")
    subprocess.run([sys.executable, "-m", "tinygpt.model.train", *single], env=env, check=True, capture_output=True)
    pair = chat_args(chat_dir, data_dir, base, tmp_path / "ddp", *common, "--batch_size", "2")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "tinygpt.model.train", *pair], env=env, check=True, capture_output=True)
    one, two = metrics(run_dirs(tmp_path / "single")[0]), metrics(run_dirs(tmp_path / "ddp")[0])
    assert [m.get("train_loss") for m in two[1:]] == pytest.approx([m.get("train_loss") for m in one[1:]], rel=1e-5)
    val_one, val_two = ([m["val_loss"] for m in run if "val_loss" in m] for run in (one, two))
    assert len(val_one) == 3 and val_two == pytest.approx(val_one, rel=1e-5)
    a, b = (load_checkpoint(tmp_path / name / "best.pt")["model"] for name in ("single", "ddp"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)

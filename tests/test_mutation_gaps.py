"""Gaps that mutation testing (tools/mutation.py, docs/testing.md#mutation-testing) found: a mutant that changed
this behaviour survived the rest of the suite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train import metrics, train_args, write_token_dir
from tinygpt.common import TinyGPTError
from tinygpt.data import clean
from tinygpt.model.checkpoint import load_checkpoint
from tinygpt.model.gpt import GPT, GPTConfig
from tinygpt.model.optim import configure_optimizers
from tinygpt.model.train import TrainConfig, build_parser, main
from tinygpt.tokenizer.bpe import Tokenizer


@pytest.mark.parametrize("missing", ["--input", "--out"])
def test_clean_without_a_required_path_is_a_usage_error_naming_it(tmp_path, capsys, missing):
    # mutant: `--input` became optional, and clean then failed later without saying which flag was missing
    args = {"--input": str(tmp_path / "raw.txt"), "--out": str(tmp_path / "clean.txt")}
    (tmp_path / "raw.txt").write_text("hello\n", encoding="utf-8")
    del args[missing]
    with pytest.raises(SystemExit) as stop:
        clean.main([part for pair in args.items() for part in pair])
    assert stop.value.code == 2
    assert missing in capsys.readouterr().err
    assert not (tmp_path / "clean.txt").exists()


def test_a_missing_tokenizer_says_which_file_and_how_to_make_it(tmp_path):
    # mutant: the hint's text changed (upper case) and no test read it
    missing = tmp_path / "tokenizer.json"
    with pytest.raises(TinyGPTError, match=r"tokenizer not found: .*tokenizer\.json; run `tinygpt train_bpe`"):
        Tokenizer.load(missing)


def cleaned(path) -> list[str]:
    return list(clean.iter_documents(path))


def test_a_last_document_followed_by_much_whitespace_is_kept(tmp_path):
    # mutant: `_split` forgot that it had passed on a piece of the last document (`started`), so when the file
    # ended in 12 or more whitespace characters (what a cut <|endoftext|> needs held back) that document was
    # never finished and vanished from the output
    raw = tmp_path / "raw.txt"
    for tail in ["\n" * 12, " \n" * 20, "\n"]:
        raw.write_text(f"A first story.\n<|endoftext|>\nThe last story.{tail}", encoding="utf-8")
        clean.clean_corpus(raw, tmp_path / "clean.txt", split="eot")
        assert cleaned(tmp_path / "clean.txt") == ["A first story.", "The last story."], repr(tail)


@pytest.mark.parametrize("case", ["duplicate", "over the cap"])
def test_a_long_document_that_is_dropped_leaves_none_of_its_bytes(tmp_path, monkeypatch, case):
    # mutant: a document longer than a block, written to the output as it came (`spilled`), was not cut back
    # off when it turned out to be a duplicate or over --max_bytes: its text stayed in the corpus
    monkeypatch.setattr(clean, "BLOCK", 64)  # "longer than a block" without megabytes of test data
    long_story = " ".join(f"word{i}" for i in range(100))
    docs = ["short one", long_story, "short two"] + ([long_story, "short three"] if case == "duplicate" else [])
    raw = tmp_path / "raw.txt"
    raw.write_text("".join(f"{doc}\n<|endoftext|>\n" for doc in docs), encoding="utf-8")
    cap = {"max_bytes": 100} if case == "over the cap" else {}
    stats = clean.clean_corpus(raw, tmp_path / "clean.txt", split="eot", **cap)
    expected = ["short one", long_story, "short two", "short three"] if case == "duplicate" else ["short one"]
    assert cleaned(tmp_path / "clean.txt") == expected
    assert (tmp_path / "clean.txt").stat().st_size == stats["bytes_out"]


def test_a_first_document_over_the_cap_says_how_to_split_a_plain_text(tmp_path):
    # mutants: the `--split blank_line` hint garbled, or never shown (compared with "EOT")
    raw = tmp_path / "raw.txt"
    raw.write_text("One long paragraph of a book.\n\nAnother paragraph.\n" * 20, encoding="utf-8")
    with pytest.raises(TinyGPTError, match=r"already over --max_bytes/--max_lines; raise the cap or --split "
                                           r"blank_line to cut a text without <\|endoftext\|> at its blank lines$"):
        clean.clean_corpus(raw, tmp_path / "clean.txt", split="eot", max_bytes=100)
    with pytest.raises(TinyGPTError, match=r"raise the cap$"):  # blank_line: the hint would be no help
        clean.clean_corpus(raw, tmp_path / "clean.txt", split="blank_line", max_bytes=10)


def test_a_missing_raw_corpus_says_which_file_and_how_to_get_it(tmp_path):
    # mutant: the hint's text changed (upper case) and no test read it
    with pytest.raises(TinyGPTError, match=r"raw\.txt.*run `tinygpt download` first"):
        clean.clean_corpus(tmp_path / "raw.txt", tmp_path / "clean.txt")


# --- training (tinygpt/model/train.py, optim.py) ----------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_token_dir(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(autouse=True)
def constant_matmul_peak(monkeypatch):
    """MFU's yardstick measures a 2048x2048 matmul, seconds per run on a small CPU; only MFU depends on it."""
    from tinygpt.model import flops

    monkeypatch.setattr(flops, "matmul_peak", lambda *args, **kwargs: 1e12)


def fast_args(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    return train_args(data_dir, out_dir, "--amp", "off", "--threads", "1", *extra)


def the_run(out_dir: Path) -> Path:
    [run_dir] = [p for p in (out_dir / "runs").iterdir() if p.is_dir()]
    return run_dir


def test_train_flags_give_the_config_defaults_and_typed_values():
    # mutants: a flag's default dropped (--runs_dir, --lora_rank, --eval_batches, --optimizer: the config then
    # held None) or its type (--weight_decay, --ckpt_interval: a string), `--tie_embeddings` without a value or
    # with `false` refused; tests pass most flags explicitly, so none noticed
    required = ["--data_dir", "d", "--tokenizer", "t", "--out", "o"]
    assert TrainConfig(**vars(build_parser().parse_args(required))) == TrainConfig("d", "t", "o")
    given = {"runs_dir": "r", "preset": "small", "arch": "llama", "n_layer": 3, "n_head": 4, "n_kv_head": 2,
             "n_embd": 48, "block_size": 24, "dropout": 0.25, "norm_eps": 1e-6, "rope_theta": 5e5, "attention": "explicit",
             "init_from": "m.pt", "lora_rank": 4, "lora_alpha": 8.0, "lora_targets": "q,v", "lora_dropout": 0.125,
             "max_steps": 7, "batch_size": 3, "grad_accum": 2, "lr": 0.5, "min_lr": 0.25, "warmup_steps": 5,
             "weight_decay": 0.05, "optimizer": "muon", "muon_lr": 0.02, "muon_momentum": 0.9, "beta1": 0.8,
             "beta2": 0.99, "grad_clip": 0.5, "eval_interval": 11, "eval_batches": 3, "ckpt_interval": 13,
             "log_interval": 17, "seed": 19, "device": "cpu", "amp": "bf16", "threads": 2}
    argv = required + [part for name, value in given.items() for part in (f"--{name}", str(value))]
    expected = TrainConfig("d", "t", "o", **given)
    assert TrainConfig(**vars(build_parser().parse_args(argv))) == expected
    flags = {"--tie_embeddings false": False, "--tie_embeddings FALSE": False, "--tie_embeddings true": True,
             "--tie_embeddings": True, "--compile --tensorboard --no_amp": None}
    for flag, tied in flags.items():
        parsed = TrainConfig(**vars(build_parser().parse_args(required + flag.split())))
        if tied is None:
            assert (parsed.compile, parsed.tensorboard, parsed.amp) == (True, True, "off")
        else:
            assert parsed.tie_embeddings is tied, flag


def test_fine_tuning_trains_with_the_dropout_flag(data_dir, tmp_path):
    # mutant: the starting model's config kept its own dropout, and --dropout was silently ignored
    main(fast_args(data_dir, tmp_path / "base", "--max_steps", "1", "--eval_interval", "1"))
    main(fast_args(data_dir, tmp_path / "tuned", "--init_from", str(tmp_path / "base" / "best.pt"), "--dropout",
                   "0.25", "--max_steps", "1", "--eval_interval", "1"))
    recorded = json.loads((the_run(tmp_path / "tuned") / "config.json").read_text())["model"]
    assert recorded["dropout"] == 0.25
    assert load_checkpoint(tmp_path / "tuned" / "best.pt")["model_config"]["dropout"] == 0.25


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_logged_learning_rates_follow_warmup_then_cosine(data_dir, tmp_path, optimizer):
    # mutants: the metrics key "lr" renamed, Muon's peak or a group's peak_lr lost: no test read the log's rates
    lr, min_lr, warmup, steps, muon_lr = 1e-2, 1e-3, 2, 6, 3e-2
    main(fast_args(data_dir, tmp_path, "--max_steps", str(steps), "--eval_interval", "100", "--log_interval", "1",
                   "--lr", str(lr), "--min_lr", str(min_lr), "--warmup_steps", str(warmup), "--optimizer", optimizer,
                   "--muon_lr", str(muon_lr)))

    def expected(step: int, peak: float) -> float:  # the rate the optimizer step `step` (1-based) was taken at
        if step <= warmup:
            return peak * step / warmup
        return (min_lr + 0.5 * (1 + math.cos(math.pi * (step - 1 - warmup) / (steps - warmup))) * (lr - min_lr)) * peak / lr

    logged = [m for m in metrics(the_run(tmp_path)) if "lr" in m]
    assert [m["step"] for m in logged] == list(range(1, steps + 1))
    assert [m["lr"] for m in logged] == pytest.approx([expected(s, lr) for s in range(1, steps + 1)], rel=1e-9)
    if optimizer == "muon":
        assert [m["muon_lr"] for m in logged] == pytest.approx([expected(s, muon_lr) for s in range(1, steps + 1)],
                                                               rel=1e-9)
    else:
        assert not any("muon_lr" in m for m in logged)


def test_bits_per_byte_count_the_end_of_text_token_as_no_bytes(data_dir, tmp_path):
    # mutant: the special tokens were left out of bytes_per_token's arguments, so each <|endoftext|> in the
    # validation text counted as its 13 characters and every logged bits-per-byte came out too low
    main(fast_args(data_dir, tmp_path, "--max_steps", "1", "--eval_interval", "1"))
    tokenizer = Tokenizer.load(data_dir / "tokenizer.json")
    ids = np.fromfile(data_dir / "val.bin", dtype=np.uint16)
    eot = tokenizer.encode("<|endoftext|>")
    assert len(eot) == 1 and (ids == eot[0]).any()
    text_bytes = sum(len(tokenizer.vocab[i]) for i in ids.tolist() if i != eot[0])
    for line in metrics(the_run(tmp_path)):
        assert line["val_bpb"] == pytest.approx(line["val_loss"] / math.log(2) * len(ids) / text_bytes, rel=1e-9)


def test_muon_leaves_an_untied_head_to_adamw_with_decay_and_takes_its_momentum():
    # mutants: the untied LM head not recognised (so Muon orthogonalised it as a hidden matrix), and
    # --muon_momentum not passed to Muon (its default, 0.95, is ours too, so only another value shows it)
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8, arch="llama",
                          tie_embeddings=False))
    adamw, muon = configure_optimizers(model, optimizer="muon", lr=1e-3, betas=(0.8, 0.9), weight_decay=0.1,
                                       device=torch.device("cpu"), muon_momentum=0.7)
    names = {id(p): n for n, p in model.named_parameters()}
    assert "lm_head.weight" not in {names[id(p)] for g in muon.param_groups for p in g["params"]}
    decayed = [names[id(p)] for g in adamw.param_groups if g["weight_decay"] == 0.1 for p in g["params"]]
    assert decayed == ["lm_head.weight"]
    assert [(g["momentum"], g["weight_decay"]) for g in muon.param_groups] == [(0.7, 0.1)]
    assert [g["betas"] for g in adamw.param_groups] == [(0.8, 0.9)] * 2


def test_an_unknown_optimizer_is_an_error_naming_the_choices():
    # mutant: the list of choices garbled (argparse and the config schema stop such a name first)
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8))
    with pytest.raises(ValueError, match=r"^unknown optimizer 'sgd'; choose one of adamw, muon$"):
        configure_optimizers(model, optimizer="sgd", lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                             device=torch.device("cpu"))

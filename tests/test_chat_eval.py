"""chat_eval's measures: the task scores (an oracle that answers every check scores 100%, a fixed reply 0%) and
the copying test (a model that copies from its context scores near 0 on the second showing, a random one no
better than on the first)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from tinygpt.data.stories.chat_tasks import eval_prompts
from tinygpt.model.chat_eval import COPY_LENGTH, copying, score
from tinygpt.model.gpt import GPT, GPTConfig
from tinygpt.tokenizer.bpe import RESERVED_SPECIALS, Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer([(104, 105), (256, 33)], specials=RESERVED_SPECIALS)  # "hi", "hi!" and the chat tokens


class Copier(nn.Module):
    """Predicts, from position `length` - 1 on, the token `length` places back: a perfect induction head."""

    def __init__(self, vocab_size: int, length: int) -> None:
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab_size, block_size=4 * length)
        self.tok_emb = nn.Embedding(vocab_size, 1)
        self.length = length

    def forward(self, idx: torch.Tensor):
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        earlier = idx[:, : idx.shape[1] - self.length + 1]  # the target at t repeats input t + 1 - length
        logits[:, self.length - 1 :].scatter_(2, earlier[..., None], 30.0)
        return logits, None


def test_copying_tells_a_model_that_copies_from_one_that_does_not(tokenizer):
    copier = copying(Copier(tokenizer.vocab_size, COPY_LENGTH), tokenizer)
    assert copier["second"] < 1e-6 and copier["first"] > 5 and copier["length"] == COPY_LENGTH
    torch.manual_seed(0)
    random = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, arch="llama", n_layer=1, n_head=2, n_embd=16,
                           block_size=64)).eval()
    with torch.no_grad():
        figures = copying(random, tokenizer)
    assert figures["length"] == 32  # half the context
    assert abs(figures["second"] - figures["first"]) < 0.2
    assert figures["first"] == pytest.approx(math.log(tokenizer.vocab_size), rel=0.05)


def test_copying_draws_only_ordinary_tokens(tokenizer, monkeypatch):
    seen = []

    class Spy(Copier):
        def forward(self, idx):
            seen.append(idx)
            return super().forward(idx)

    copying(Spy(tokenizer.vocab_size, COPY_LENGTH), tokenizer)
    specials = torch.tensor(list(tokenizer.added_tokens.values()))
    assert not torch.isin(seen[0], specials).any() and seen[0].max() < tokenizer.vocab_size


def test_score_rates_each_task_by_its_checks():
    prompts = {json.dumps(messages): check for _, messages, check in eval_prompts(1, 30)}

    def oracle(messages):  # the answer each check wants: the exact answer, or a sentence naming every part
        check = prompts[json.dumps(messages)]
        return check["answer"] if "answer" in check else "A story with " + ", ".join(check["parts"]) + "."

    perfect = score(oracle, 30)
    assert sum(t["asked"] for t in perfect["tasks"].values()) == 30
    assert set(perfect["tasks"]) == {"story", "qa"} and all(t["rate"] == 1.0 for t in perfect["tasks"].values())
    assert len(perfect["samples"]) == 6 and all(s["correct"] for s in perfect["samples"])
    wrong = score(lambda messages: "Once upon a time.", 30)
    assert all(t["right"] == 0 for t in wrong["tasks"].values())

"""How well a chat model does the built-in tasks, scored automatically on conversations it never saw.

    tinygpt chat_eval --checkpoint checkpoints/chat/best.pt --json reports/chat.json

The prompts come from the built-in conversation generator with evaluation seeds, which no training conversation
is drawn from (tinygpt.data.stories.chat_tasks): story requests (does the reply contain every part asked for?) and
questions about a story (is the answer exact?). Replies are greedy, so the figures are a property of the model.
`--plain` prompts a base model with the same words as plain text (the messages' contents, one per line), the
baseline that shows what chat tuning adds.

Beside the scores, `copying`: whether the model copies from its context at all (an induction test, after Olsson
et al. 2022), which both tasks need (a requested name in the story, the answer from the story). Random sequences
of ordinary tokens are shown twice; a model that copies predicts the second showing almost exactly (near 0 nats a
token), one that does not, no better than the first (about ln(vocab)). A small model trained briefly can tell
stories in the right form long before it copies: the chat scores stay near 0 until this moves.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from tinygpt.common import TinyGPTError, atomic_open, progress, run_cli
from tinygpt.data.stories.chat_tasks import eval_prompts, score_reply
from tinygpt.model.gpt import GPT
from tinygpt.model.hardware import pick_device
from tinygpt.model.sample import generate, load
from tinygpt.tokenizer.bpe import Tokenizer
from tinygpt.tokenizer.chat import IM_END, encode_chat

EVAL_SEED = 1  # the evaluation seeds are their own namespace in chat_tasks: any value is unseen in training
SAMPLES = 6  # conversations shown in the report
COPY_ROWS, COPY_LENGTH = 16, 48  # the copying test: sequences, and tokens in each (at most half the context)


def chat_reply(model: GPT, tokenizer: Tokenizer, messages: list[dict], max_tokens: int | None = None) -> str:
    """The model's greedy reply to `messages` in ChatML, up to <|im_end|> or the end of its context."""
    ids, _ = encode_chat(tokenizer, messages, add_generation_prompt=True)
    return _greedy(model, tokenizer, ids, max_tokens, tokenizer.special_tokens[IM_END])


def plain_reply(model: GPT, tokenizer: Tokenizer, messages: list[dict], max_tokens: int | None = None) -> str:
    """A base model's greedy continuation of the messages' contents as plain text, one per line."""
    ids = tokenizer.encode("\n".join(m["content"] for m in messages) + "\n", bos=True)
    return _greedy(model, tokenizer, ids, max_tokens, tokenizer.eot_id)


def _greedy(model: GPT, tokenizer: Tokenizer, ids: list[int], max_tokens: int | None, stop: int) -> str:
    """Greedy text after `ids` up to `stop`: by default what fits in the model's context; with max_tokens, that
    many at most, sliding the window over a prompt longer than the context (a base model's 128 tokens)."""
    if max_tokens is None:
        max_tokens = model.config.block_size - len(ids)
        if max_tokens <= 0:
            raise TinyGPTError(f"the prompt takes {len(ids)} tokens, the model's whole context "
                               f"({model.config.block_size})")
    return tokenizer.decode(list(generate(model, ids, max_tokens, temperature=0, eot_id=stop)))


def copying(model: GPT, tokenizer: Tokenizer, seed: int = EVAL_SEED) -> dict:
    """Mean loss (nats a token) on the first and on the second showing of COPY_ROWS random sequences of ordinary
    tokens, each shown twice in a row (see the module docstring); the first showing's first token is no target."""
    length = min(COPY_LENGTH, model.config.block_size // 2)
    ordinary = torch.tensor(sorted(set(range(tokenizer.vocab_size)) - set(tokenizer.added_tokens.values())))
    picks = torch.randint(len(ordinary), (COPY_ROWS, length), generator=torch.Generator().manual_seed(seed))
    sequence = ordinary[picks]
    ids = torch.cat([sequence, sequence], dim=1).to(model.tok_emb.weight.device)
    logits = model(ids[:, :-1])[0].float()
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return {"first": nll[:, : length - 1].mean().item(), "second": nll[:, length - 1 :].mean().item(),
            "length": length, "rows": COPY_ROWS}


def score(reply: Callable[[list[dict]], str], count: int, seed: int = EVAL_SEED) -> dict:
    """Ask `count` evaluation prompts through `reply` (messages -> text); per task: asked, right, rate; and the
    first SAMPLES conversations with their replies."""
    asked, right, samples = Counter(), Counter(), []
    for task, messages, check in progress(eval_prompts(seed, count), total=count, desc="chat_eval"):
        text = reply(messages)
        ok = score_reply(check, text)
        asked[task] += 1
        right[task] += ok
        if len(samples) < SAMPLES:
            samples.append({"task": task, "messages": messages, "reply": text, "correct": ok})
    tasks = {task: {"asked": asked[task], "right": right[task], "rate": right[task] / asked[task]} for task in asked}
    return {"tasks": tasks, "samples": samples, "seed": seed}


def describe_copying(figures: dict) -> str:
    return (f"copying: {figures['second']:.2f} nats a token on the second showing of a random sequence, "
            f"{figures['first']:.2f} on the first (a model that copies: near 0)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tinygpt chat_eval", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="chat model checkpoint (.pt)")
    source.add_argument("--gguf", help="GGUF file (dequantized into our model)")
    source.add_argument("--hf_dir", help="Hugging Face folder written by tinygpt export")
    parser.add_argument("--count", type=int, default=100, help="evaluation prompts (default 100)")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="evaluation seed (never a training seed)")
    parser.add_argument("--plain", action="store_true", help="prompt with the plain text of the messages (a base model)")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or mps (default cpu: the same figures everywhere)")
    parser.add_argument("--json", help="write the scores and sample conversations here")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be at least 1, not {args.count}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    model, tokenizer = load(args.checkpoint, args.gguf, pick_device(args.device), args.hf_dir)
    answer = plain_reply if args.plain else chat_reply
    result = score(lambda messages: answer(model, tokenizer, messages), args.count, args.seed)
    result["model"] = args.checkpoint or args.gguf or args.hf_dir
    result["prompt"] = "plain" if args.plain else "chatml"
    result["copying"] = copying(model, tokenizer, args.seed)
    for task, figures in result["tasks"].items():
        print(f"{task}: {figures['right']}/{figures['asked']} right ({figures['rate']:.0%})")
    print(describe_copying(result["copying"]))
    if args.json:
        with atomic_open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    run_cli(main)

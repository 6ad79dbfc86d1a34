"""Talk to a chat model in the terminal: a checkpoint, a GGUF file or a Hugging Face folder.

    tinygpt chat --checkpoint checkpoints/chat/best.pt
    tinygpt chat --gguf exports/tinygpt-chat/model-q4_k_m.gguf --message "Tell me a story about a fox."

The conversation is ChatML (tinygpt.tokenizer.chat), the format the chat model was tuned on: the whole history is
encoded for every reply with `encode_chat(..., add_generation_prompt=True)`, the ids transformers and llama.cpp
give for the same messages. The reply is generated with sample.py's KV-cached decoding, printed piece by piece
as it comes, and ends at <|im_end|>, at --max_tokens or when the context is full; it joins the history as text.

The history stays within the model's context: before each reply the oldest exchanges (a user message and the
reply to it) are dropped until the prompt leaves room for a reply of min(--max_tokens, context / 2) tokens; the
system prompt always stays. A model whose files carry no chat template (a base model) gets one warning and
ChatML anyway.

Interactive use reads one message per line from stdin; /reset forgets the conversation, /system TEXT starts a
new one with that system prompt (no TEXT: none), /quit or the end of input leaves; Ctrl-C during a reply stops
that reply only. --message (repeatable)
sends scripted turns instead, prints each reply and exits.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from tinygpt.common import TinyGPTError, run_cli
from tinygpt.model.gpt import GPT
from tinygpt.model.hardware import pick_device
from tinygpt.model.sample import (add_model_and_sampling_args, check_sampling_args, generate, load,
                                  sampling_kwargs, text_pieces)
from tinygpt.tokenizer.bpe import Tokenizer
from tinygpt.tokenizer.chat import CHATML_TEMPLATE, IM_END, chat_token_ids, encode_chat
from tinygpt.weights.read import read_chat_template

HELP = "commands: /reset (new conversation), /system TEXT (new conversation with this system prompt), /quit"


@dataclass
class ChatSession:
    """A model, its tokenizer and one conversation: an optional system prompt and the turns after it."""

    model: GPT
    tokenizer: Tokenizer
    system: str | None = None
    max_tokens: int = 256
    sampling: dict = field(default_factory=dict)  # generate's temperature, top_k, top_p, generator, use_cache
    turns: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        chat_token_ids(self.tokenizer)  # a tokenizer without <|im_start|>/<|im_end|> cannot chat: say so now

    def messages(self, turns: Sequence[dict] | None = None) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + list(self.turns if turns is None else turns)

    def reset(self) -> None:
        """Forget the conversation; the system prompt stays."""
        self.turns = []

    def set_system(self, system: str | None) -> None:
        """Start a new conversation with this system prompt (empty or None: none)."""
        self.system, self.turns = system or None, []

    @property
    def reply_room(self) -> int:
        """Tokens the prompt must leave free for the reply."""
        return max(1, min(self.max_tokens, self.model.config.block_size // 2))

    def prompt_ids(self, turns: list[dict]) -> tuple[list[int], int]:
        """The prompt for a reply after `turns` (ending with a user message) and how many leading turns were
        dropped to fit it into the context with reply_room tokens to spare; TinyGPTError if even the system
        prompt and the last message do not fit."""
        limit = self.model.config.block_size - self.reply_room
        dropped = 0
        while True:
            ids, _ = encode_chat(self.tokenizer, self.messages(turns[dropped:]), add_generation_prompt=True)
            if len(ids) <= limit:
                return ids, dropped
            if len(turns) - dropped <= 1:
                raise TinyGPTError(
                    f"the message {'and the system prompt ' if self.system else ''}take {len(ids)} tokens; the "
                    f"model's context holds {self.model.config.block_size}, of which {self.reply_room} are kept "
                    "for the reply: send a shorter message" + (" or set a shorter /system" if self.system else ""))
            dropped += 2  # the oldest exchange: turns are user, assistant, ..., user

    def reply(self, message: str) -> Iterator[str]:
        """Send a user message; yield the reply as text pieces as they are generated. The exchange joins the
        history when the reply is complete (the oldest turns leave it if the context needs their room)."""
        turns = self.turns + [{"role": "user", "content": message}]
        ids, dropped = self.prompt_ids(turns)
        room = self.model.config.block_size - len(ids)  # never slide: that would cut the system prompt
        tokens = generate(self.model, ids, min(self.max_tokens, room),
                          eot_id=self.tokenizer.special_tokens[IM_END], **self.sampling)
        pieces = []
        for piece in text_pieces(self.tokenizer, tokens):
            pieces.append(piece)
            yield piece
        self.turns = turns[dropped:] + [{"role": "assistant", "content": "".join(pieces)}]


def say(session: ChatSession, message: str, out: TextIO) -> str:
    """Stream the reply to `message` into `out` (flushed per piece), end it with a newline; return its text."""
    text = []
    for piece in session.reply(message):
        out.write(piece)
        out.flush()
        text.append(piece)
    out.write("\n")
    out.flush()
    return "".join(text)


def converse(session: ChatSession, lines: Iterable[str], out: TextIO, notes: TextIO, prompt: str = "") -> None:
    """The interactive loop over input lines: messages and /commands, until /quit or the end of the lines.
    Replies go to `out`; prompts, notices and errors about one message to `notes`."""
    lines = iter(lines)
    while True:
        notes.write(prompt)
        notes.flush()
        line = next(lines, None)
        if line is None:  # end of input
            notes.write("\n" if prompt else "")
            return
        text = line.rstrip("\r\n")
        command, _, argument = text.strip().partition(" ")
        if not text.strip():
            continue
        if command == "/quit":
            return
        if command == "/reset":
            session.reset()
            notes.write("(new conversation)\n")
        elif command == "/system":
            session.set_system(argument.strip())
            notes.write(f"(new conversation, system prompt: {session.system!r})\n")
        elif command.startswith("/") and command[1:].isalpha():
            notes.write(f"unknown command {command}; {HELP}\n")
        else:
            try:
                say(session, text, out)
            except TinyGPTError as e:  # one message too long: the conversation goes on
                notes.write(f"error: {e}\n")
            except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat; the exchange is not kept
                out.write("\n")
                out.flush()
                notes.write("(reply interrupted; the message and the partial reply are forgotten)\n")


def warn_template(template: str | None, source: str, notes: TextIO) -> None:
    if template is None:
        notes.write(f"warning: {source} carries no chat template (a base model?); chatting in ChatML anyway\n")
    elif template != CHATML_TEMPLATE:
        notes.write(f"warning: {source} carries a chat template other than tinygpt's ChatML; chatting in ChatML\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tinygpt chat", description=__doc__.split("\n")[0],
                                     epilog=HELP + "; end of input also quits")
    add_model_and_sampling_args(parser, max_tokens=256, per="reply")
    parser.add_argument("--system", help="system prompt (the conversation's first message)")
    parser.add_argument("--message", action="append",
                        help="a user message: answer it, print the reply and exit without reading stdin; "
                             "repeat for several turns of one conversation")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    check_sampling_args(args.max_tokens, args.temperature, args.top_k, args.top_p)
    source = args.checkpoint or args.gguf or args.hf_dir
    model, tokenizer = load(args.checkpoint, args.gguf, pick_device(args.device), args.hf_dir)
    warn_template(read_chat_template(source), source, sys.stderr)
    sampling = sampling_kwargs(args, torch.Generator().manual_seed(args.seed))
    session = ChatSession(model, tokenizer, args.system or None, args.max_tokens, sampling)
    if args.message:
        for message in args.message:
            say(session, message, sys.stdout)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {Path(source).name}; {HELP}", file=sys.stderr)
    converse(session, sys.stdin, sys.stdout, sys.stderr, prompt="> " if interactive else "")


if __name__ == "__main__":
    run_cli(main)

"""The chat format: ChatML, its templates (Jinja for transformers and llama.cpp, Go for Ollama), and its encoding.

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": str}, rendered as

    <|im_start|>{role}\\n{content}<|im_end|>\\n      (each message)
    <|im_start|>assistant\\n                        (the generation prompt, when asked for)

`<|im_start|>` and `<|im_end|>` are special tokens that every tokenizer `train_bpe` writes (beside
`<|endoftext|>`). `encode_chat` gives each of them as its single id and encodes everything else as plain text
(`Tokenizer.encode_ordinary`): a literal "<|im_start|>" typed into a message stays those characters' ordinary
tokens and never becomes the control token, so data cannot open or close a turn (prompt injection).
transformers' `apply_chat_template` would turn such text into the special token; whenever the content holds no
special-token text, our ids equal its ids exactly (tests/test_chat_template.py; docs/formats.md#chat-format).

The loss mask is 1 on the tokens an assistant message's content is made of and on its `<|im_end|>`, 0 on
everything else (the `<|im_start|>assistant\\n` header, the "\\n" after `<|im_end|>`, other roles). When the
content begins with whitespace, the pre-tokenizer may join the header's "\\n" with it into one token; that token
holds content, so it is a target.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from tinygpt.common import TinyGPTError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant")

# The standard ChatML template (as in transformers' chat-templating docs): llama.cpp recognises it by its
# "<|im_start|>" (llm_chat_detect_template in src/llama-chat.cpp) and renders the same text.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The same format in Ollama's Go-template syntax (the Modelfile's TEMPLATE). For a chat, Ollama passes every
# message as .Messages, the Modelfile's SYSTEM prepended as a system message unless the request has one (it also
# joins the system messages into .System, which this template does not use, so an empty one is kept as ours
# is). The template itself opens the assistant's turn after a last message that is not the assistant's; a last
# assistant message is left open (Ollama continues it). Without .Messages (a legacy prompt) it renders .System,
# .Prompt and .Response alike. Checked with Go's text/template in tests/test_chat_template.py.
OLLAMA_TEMPLATE = """{{- if .Messages }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ if $last }}<|im_start|>assistant
{{ end }}
{{- end }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}{{ if .Response }}<|im_end|>
{{ end }}
{{- end }}"""


def _role_and_content(message: Mapping, index: int) -> tuple[str, str]:
    """A message's role and content; TinyGPTError if it is not a {role, content} of a known role and text."""
    role = message.get("role") if isinstance(message, Mapping) else None
    content = message.get("content") if isinstance(message, Mapping) else None
    if role not in ROLES or not isinstance(content, str):
        raise TinyGPTError(f"message {index} is not {{'role': one of {list(ROLES)}, 'content': text}}: "
                           f"{str(message)[:80]!r}")
    return role, content


def render_chat(messages: Sequence[Mapping], add_generation_prompt: bool = False) -> str:
    """The ChatML text of a conversation (what CHATML_TEMPLATE renders)."""
    parts = []
    for index, message in enumerate(messages):
        role, content = _role_and_content(message, index)
        parts.append(f"{IM_START}{role}\n{content}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def chat_token_ids(tokenizer) -> tuple[int, int]:
    """The ids of <|im_start|> and <|im_end|>; TinyGPTError if the tokenizer lacks them as special tokens."""
    special = tokenizer.special_tokens
    missing = [t for t in (IM_START, IM_END) if t not in special]
    if missing:
        raise TinyGPTError(f"the tokenizer has no special token {' or '.join(missing)}, which the chat format "
                           "(ChatML) needs; use a tokenizer written by `tinygpt train_bpe` (it reserves them) "
                           "or one whose tokenizer.json lists them as special added tokens")
    return special[IM_START], special[IM_END]


def _tokens_within(tokenizer, ids: Sequence[int], n_bytes: int) -> int:
    """How many leading tokens of `ids` end within the first n_bytes bytes of their text."""
    vocab, end = tokenizer.vocab, 0
    for count, i in enumerate(ids):
        end += len(vocab[i])
        if end > n_bytes:
            return count
    return len(ids)


def encode_chat(tokenizer, messages: Sequence[Mapping],
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and the loss mask (1 = a training target), of equal length.

    Each "{role}\\n{content}" is encoded as one plain text, as transformers encodes the text between two special
    tokens; see the module docstring for the mask and for special-token text inside content.
    """
    start, end = chat_token_ids(tokenizer)
    newline = tokenizer.encode_ordinary("\n")
    ids: list[int] = []
    mask: list[int] = []
    for index, message in enumerate(messages):
        role, content = _role_and_content(message, index)
        header = role + "\n"
        body = tokenizer.encode_ordinary(header + content)
        ids.append(start)
        ids += body
        ids.append(end)
        ids += newline
        if role == "assistant":
            n_header = _tokens_within(tokenizer, body, len(header))  # roles are ASCII: len is the byte count
            mask += [0] * (1 + n_header) + [1] * (len(body) - n_header + 1) + [0] * len(newline)
        else:
            mask += [0] * (len(body) + 2 + len(newline))
    if add_generation_prompt:
        prompt = tokenizer.encode_ordinary("assistant\n")
        ids += [start, *prompt]
        mask += [0] * (1 + len(prompt))
    return ids, mask

"""The text side of a byte-level BPE tokenizer, read from a Hugging Face `tokenizer.json`: normalizer and
pre-tokenizer pipeline, as the families we support configure them.

A pipeline is a normalizer (none, or Unicode NFC/NFD/NFKC/NFKD) and steps that each cut every piece of text
into smaller pieces: `Split` by a regex (behavior Isolated or Removed), `Digits` (each digit alone, or runs of
digits), and `ByteLevel` (with use_regex: GPT-2's regex; add_prefix_space: a space before a piece that has
none). BPE then merges within each piece.

The known pipelines (GPT-2's, ours, SmolLM's, Llama 3's, Qwen2's) are recognised by their regex and steps: they
name the pre-tokenizer llama.cpp implements for them (`tokenizer.ggml.pre`) and the points where a long text may
be cut without changing its pieces (`pieces`). Every regex runs through the standard library's `re` with its
Unicode classes spelled out, for text within the Basic Multilingual Plane, as `regex` reads them (two to three
times as fast as `regex`); text with characters beyond it goes through `regex`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator

import regex

from tinygpt.common import TinyGPTError

# GPT-2's pre-tokenization regex, verbatim (also ByteLevel's use_regex); llama.cpp's "gpt-2" splits the same way.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# SmolLM's Digits (each digit alone) then GPT-2's regex, as one regex with the same pieces: a digit is a piece,
# and a whitespace run before a digit ends its piece (as the end of the text does for the regex after Digits).
SMOLLM_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD")
SUPPORTED = ("byte-level BPE tokenizers as GPT-2, SmolLM/SmolLM2, Llama 3.x, Qwen2/2.5 and tinygpt's train_bpe "
             "configure them")
SENTENCEPIECE = ("SentencePiece-style tokenizers (Llama 2, Mistral, TinyLlama: Metaspace, byte_fallback) are not "
                 "supported; tinygpt reads " + SUPPORTED)


@dataclass(frozen=True)
class Step:
    kind: str  # "split" | "digits" | "prefix_space"
    pattern: str = ""  # split: the regex
    remove: bool = False  # split: behavior Removed (drop the matches, or with invert the text between them)
    invert: bool = False
    individual: bool = True  # digits: each digit alone (else runs of digits)


@dataclass(frozen=True)
class Known:
    """A pipeline llama.cpp implements: its `tokenizer.ggml.pre` name and what it implies."""
    gguf_pre: str
    ignore_merges: bool
    # Bytes where a long text may be cut (see `pieces`): the ASCII byte before an ASCII whitespace byte, when
    # no piece ever spans that byte and the whitespace after it.
    safe_before: bytes
    # Where splitting a text at its spaces would give other pieces than the pipeline (see Tokenizer): a space
    # with whitespace before it and whitespace or the end after it (the regex's whitespace rules join it to its
    # left), or with Digits first, a digit after it (the digit ends the piece the space is in).
    space_split_breaker: str = r"\s (?:\s|\Z)"
    # One regex that gives the pieces of all the steps, when they are more than one (one pass instead of two).
    fused: str | None = None
    # Its name in class_rules, which splits long texts by numpy rules equal to its regex.
    rules: str = ""


ASCII_SPACE_BYTES = rb"\t\n\x0b\x0c\r "
GPT2_SAFE_BEFORE = rb"[^" + ASCII_SPACE_BYTES + rb"\x80-\xff]"  # any ASCII byte but whitespace
_GPT2 = Known("gpt-2", False, GPT2_SAFE_BEFORE, rules="gpt2")
_LLAMA_SAFE = rb"[A-Za-z0-9]"  # " ?[^\s\p{L}\p{N}]+[\r\n]*" keeps newlines after punctuation: cut after alnum only
KNOWN: dict[tuple[str | None, tuple[Step, ...]], Known] = {
    (None, (Step("split", GPT2_PATTERN),)): _GPT2,
    (None, (Step("digits"), Step("split", GPT2_PATTERN))): Known("smollm", False, _GPT2.safe_before,
                                                                 r"\s (?:[\s\p{N}]|\Z)", SMOLLM_PATTERN, "smollm"),
    (None, (Step("split", LLAMA3_PATTERN),)): Known("llama-bpe", True, _LLAMA_SAFE, rules="llama3"),
    ("NFC", (Step("split", QWEN2_PATTERN),)): Known("qwen2", False, _LLAMA_SAFE, rules="qwen2"),
}


# ---- bytes as characters (ByteLevel) ---------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are shifted to
    code points 256 and up, in byte order, so that every token is a visible string without spaces.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in mapping)
    for offset, b in enumerate(shifted):
        mapping[b] = chr(256 + offset)
    return dict(sorted(mapping.items()))


BYTE_TO_UNICODE: dict[int, str] = _bytes_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_UNICODE.items()}


def bytes_to_token_string(data: bytes) -> str:
    return "".join(BYTE_TO_UNICODE[b] for b in data)


def token_string_to_bytes(token: str) -> bytes:
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in token)
    except KeyError as e:
        raise TinyGPTError(f"token {token!r} has character {e.args[0]!r} outside GPT-2's byte alphabet; "
                           "only byte-level BPE tokenizers are supported") from None


_TO_LATIN1 = {ord(c): chr(b) for c, b in UNICODE_TO_BYTE.items()}


def token_strings_to_bytes(tokens: list[str]) -> list[bytes]:
    """token_string_to_bytes of many tokens at once (a 128k vocabulary in a fraction of the time)."""
    outside = set("".join(tokens)) - UNICODE_TO_BYTE.keys()
    if outside:
        token_string_to_bytes(next(t for t in tokens if not outside.isdisjoint(t)))  # raises, naming it
    return [t.translate(_TO_LATIN1).encode("latin-1") for t in tokens]


# ---- regexes through `re` -----------------------------------------------------------------------------------

def _class_ranges(prop: str, text: str) -> str:
    """The characters of `text` that `regex` puts in class `prop`, as ranges for a `re` character class."""
    return "".join(f"\\u{m.start():04x}-\\u{m.end() - 1:04x}" for m in regex.finditer(prop + "+", text))


@lru_cache(maxsize=None)
def bmp_classes() -> dict[str, str]:
    """\\p{L}, \\p{N} and \\s over U+0000..U+FFFF as `regex` reads them, spelled out for `re` (about 0.1 s)."""
    bmp = "".join(map(chr, range(0x10000)))
    return {name: _class_ranges(prop, bmp) for name, prop in (("L", r"\p{L}"), ("N", r"\p{N}"), ("s", r"\s"))}


_TOKEN = re.compile(r"\\p\{(\w+)\}|\\P\{\w+\}|\\[sS]|\\.|\[\^?|\]|.", re.S)


def bmp_translation(pattern: str) -> str | None:
    """`pattern` for `re`, with \\p{L}, \\p{N}, \\s and \\S spelled out for BMP text; None when it uses anything
    else `re` might read differently (another Unicode property, \\S inside a class, nested classes)."""
    classes, out, in_class = bmp_classes(), [], False
    for m in _TOKEN.finditer(pattern):
        token = m.group()
        if m.group(1) is not None:
            if m.group(1) not in ("L", "N"):
                return None
            ranges = classes[m.group(1)]
            out.append(ranges if in_class else f"[{ranges}]")
        elif token.startswith(r"\P"):
            return None
        elif token in (r"\s", r"\S"):
            if in_class and token == r"\S":
                return None
            negate = "^" if token == r"\S" else ""
            out.append(classes["s"] if in_class else f"[{negate}{classes['s']}]")
        elif token.startswith("["):
            if in_class:
                return None
            in_class = True
            out.append(token)
        elif token == "]" and in_class:
            in_class = False
            out.append(token)
        else:
            out.append(token)
    try:
        return re.compile("".join(out)).pattern
    except re.error:
        return None


_BEYOND_BMP = re.compile("[\U00010000-\U0010ffff]")


class Splitter:
    """A regex's pieces of a text: its matches and (behavior Isolated) the text between them, or (Removed) one
    of the two. `re` runs the BMP translation on text without characters beyond U+FFFF, `regex` the rest."""

    def __init__(self, pattern: str, remove: bool = False, invert: bool = False) -> None:
        self.pattern = pattern
        self.full = regex.compile(pattern)
        translated = bmp_translation(pattern)
        self.bmp = re.compile(translated) if translated is not None else None
        self.remove, self.invert = remove, invert
        # These regexes (GPT-2's, Llama 3's, Qwen2's, SmolLM's) match every character: findall gives the pieces.
        self.total = pattern in (GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, SMOLLM_PATTERN)

    def compiled(self, text: str, bmp: bool | None = None):
        """The regex for `text`; bmp: whether the caller knows it holds no character beyond U+FFFF (None: look)."""
        if bmp is None:
            bmp = not _BEYOND_BMP.search(text)
        return self.bmp if self.bmp is not None and bmp else self.full

    def __call__(self, text: str, bmp: bool | None = None) -> list[str]:
        compiled = self.compiled(text, bmp)
        if self.total and not self.remove:
            return compiled.findall(text)
        pieces, pos = [], 0
        for m in compiled.finditer(text):
            if m.start() > pos and not (self.remove and self.invert):
                pieces.append(text[pos:m.start()])
            if m.end() > m.start() and not (self.remove and not self.invert):
                pieces.append(m.group())
            pos = m.end()
        if pos < len(text) and not (self.remove and self.invert):
            pieces.append(text[pos:])
        return pieces


@dataclass
class Pipeline:
    """Normalizer and pre-tokenizer steps of a tokenizer.json (see the module docstring)."""
    normalizer: str | None
    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        self.known: Known | None = KNOWN.get((self.normalizer, self.steps))
        if self.known is not None and self.known.fused is not None:
            self._cut: list[Callable[..., list[str]]] = [Splitter(self.known.fused)]
        else:
            self._cut = [_step_function(s) for s in self.steps]
        self._safe = None if self.known is None else safe_points_in_text(self.known.safe_before)

    def normalize(self, text: str) -> str:
        if self.normalizer is None or unicodedata.is_normalized(self.normalizer, text):
            return text
        return unicodedata.normalize(self.normalizer, text)

    def pretokenize(self, text: str) -> list[str]:
        """The pieces of (normalized) text that BPE merges within."""
        if not _BEYOND_BMP.search(text):  # looked for once here, not again by each step
            return self._pretokenize_whole(text, bmp=True)
        if self._safe is None:
            return self._pretokenize_whole(text, bmp=False)
        return [p for stretch, bmp in split_beyond_bmp(text, self._safe) for p in self._pretokenize_whole(stretch, bmp)]

    def _pretokenize_whole(self, text: str, bmp: bool | None = None) -> list[str]:
        if not text or not self._cut:
            return [text] if text else []
        first, *rest = self._cut
        pieces = first(text, bmp)  # (the known pipelines have one step: no copy of a list of a million pieces)
        for cut in rest:
            pieces = [p for piece in pieces for p in cut(piece, bmp or None)]  # (False: some pieces are BMP)
        return pieces


def split_beyond_bmp(text: str, safe: re.Pattern) -> Iterator[tuple[str, bool]]:
    """text as consecutive stretches cut at safe points (where its pieces do not change), each character beyond
    U+FFFF in a stretch as short as the safe points allow; with each, whether it is within the BMP (so that the
    regexes need not look again).

    Such a character sends its whole text to `regex` (see Splitter), at a third of `re`'s speed; cut out, only
    the stretches around them go to `regex`, the rest to `re`.
    """
    pos = 0
    beyond = _BEYOND_BMP.search(text)
    while beyond is not None:
        start = _last_safe_point(safe, text, pos, beyond.start())
        match = safe.search(text, beyond.end())
        end = len(text) if match is None else match.end()
        if start > pos:
            yield text[pos:start], True
        yield text[start:end], False
        pos = end
        beyond = _BEYOND_BMP.search(text, pos)
    if pos < len(text):
        yield text[pos:], True


@lru_cache(maxsize=None)
def safe_points_in_text(safe_before: bytes) -> re.Pattern:
    """A known pipeline's safe points (see Known.safe_before) in str text: each match ends at one."""
    ascii_class = safe_before.decode("latin-1")  # an ASCII character of the class, before ASCII whitespace
    return re.compile(r"(?=[\x00-\x7f])" + ascii_class + "(?=[" + ASCII_SPACE_BYTES.decode() + "])")


def _last_safe_point(safe: re.Pattern, text: str, lo: int, hi: int) -> int:
    """The last safe point p with lo < p < hi, or lo if there is none (looking back from hi, window by window)."""
    window = 256
    while True:
        start = max(lo, hi - window)
        found = lo
        for match in safe.finditer(text, start, hi):
            found = match.end()
        if found > lo or start == lo:
            return found
        window *= 16


def _step_function(step: Step) -> Callable[..., list[str]]:
    if step.kind == "split":
        return Splitter(step.pattern, step.remove, step.invert)
    if step.kind == "digits":
        return Splitter(r"\p{N}" if step.individual else r"\p{N}+")
    return lambda text, bmp=None: [text if text.startswith(" ") else " " + text]  # prefix_space


# ---- tokenizer.json -> Pipeline ---------------------------------------------------------------------------------

def _normalizer(spec: dict | None, source: str) -> str | None:
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        found = [_normalizer(s, source) for s in spec.get("normalizers", [])]
        found = [n for n in found if n is not None]
        if len(found) > 1:
            raise TinyGPTError(f"{source}: normalizer {found} chains several Unicode forms; only one is supported")
        return found[0] if found else None
    if kind in NORMALIZERS:
        return kind
    if kind in ("Prepend", "Replace"):
        raise TinyGPTError(f"{source}: normalizer {kind}: {SENTENCEPIECE}")
    raise TinyGPTError(f"{source}: normalizer {kind!r} is not supported (only none, {', '.join(NORMALIZERS)}); "
                       f"tinygpt reads {SUPPORTED}")


def _pattern(spec: dict, source: str) -> str:
    pattern = spec.get("pattern") or {}
    if "Regex" in pattern:
        return pattern["Regex"]
    if "String" in pattern:
        return regex.escape(pattern["String"])
    raise TinyGPTError(f"{source}: Split pre-tokenizer has no pattern (Regex or String)")


def _steps(spec: dict | None, source: str) -> tuple[list[Step], bool]:
    """The steps of a pre-tokenizer spec, and whether it ends with ByteLevel's byte mapping."""
    if spec is None:
        return [], False
    kind = spec.get("type")
    if kind == "Sequence":
        steps, byte_level = [], False
        for sub in spec.get("pretokenizers", []):
            if byte_level:
                raise TinyGPTError(f"{source}: pre-tokenizer {sub.get('type')!r} after ByteLevel is not supported; "
                                   "ByteLevel must come last")
            more, byte_level = _steps(sub, source)
            steps += more
        return steps, byte_level
    if kind == "Split":
        behavior = str(spec.get("behavior", "")).lower()
        if behavior not in ("isolated", "removed"):
            raise TinyGPTError(f"{source}: Split behavior {spec.get('behavior')!r} is not supported (Isolated, "
                               "Removed)")
        pattern = _pattern(spec, source)
        try:
            regex.compile(pattern)
        except regex.error as e:
            raise TinyGPTError(f"{source}: Split regex {pattern!r} does not compile ({e})") from None
        invert = bool(spec.get("invert", False))
        return [Step("split", pattern, remove=behavior == "removed", invert=invert)], False
    if kind == "Digits":
        return [Step("digits", individual=bool(spec.get("individual_digits", False)))], False
    if kind == "ByteLevel":
        steps = [Step("prefix_space")] if spec.get("add_prefix_space") else []
        if spec.get("use_regex", True):
            steps.append(Step("split", GPT2_PATTERN))
        return steps, True
    if kind == "Metaspace":
        raise TinyGPTError(f"{source}: pre-tokenizer Metaspace: {SENTENCEPIECE}")
    raise TinyGPTError(f"{source}: pre-tokenizer {kind!r} is not supported (Sequence, Split, Digits, ByteLevel); "
                       f"tinygpt reads {SUPPORTED}")


def pipeline_from_spec(spec: dict, source: str) -> Pipeline:
    """The Pipeline of a parsed tokenizer.json; TinyGPTError for anything tinygpt cannot reproduce exactly."""
    steps, byte_level = _steps(spec.get("pre_tokenizer"), source)
    if not byte_level:
        raise TinyGPTError(f"{source}: the pre-tokenizer has no ByteLevel step, so tokens are not byte-level; "
                           f"tinygpt reads {SUPPORTED}")
    return Pipeline(_normalizer(spec.get("normalizer"), source), tuple(steps))

"""The known pre-tokenizer regexes as rules over character classes, run by numpy on a whole text.

Python's `re` finds a regex's pieces at ~120-180 ns each, most of it the cost of a match whatever the pattern,
and that was half of what tinygpt's encode spent. But for these regexes where a piece starts follows from each
character's class (L letter, N number, NL \\r or \\n, S other whitespace, O anything else) and its neighbours':
one pass of array operations finds every start, and one `bytes.split` makes the pieces (as UTF-8).

GPT-2's regex (tinygpt's own, GPT-2's, and with digits alone SmolLM's):

    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

A piece starts wherever the class kind (L, N, O, whitespace) changes, except at a run of L, N or O right after a
space, which ` ?` takes (the last of a whitespace run always starts a piece: `\\s+(?!\\S)` ends before it); and also
at the last of two or more whitespace characters before a non-whitespace one, and after a contraction (`'s`,
...) that starts where a run of O does. SmolLM's digits are pieces of one, and whitespace before one is one piece.

Llama 3's and Qwen2's regex (Qwen2's with \\p{N} for \\p{N}{1,3}):

    (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+

A piece starts wherever the class kind changes, except:
  - a letter run right after an S character: `[^\\r\\n\\p{L}\\p{N}]?\\p{L}+` takes that character (the last of its
    whitespace run, which always starts a piece: the whitespace rules end before it);
  - a letter run right after an O character that starts a piece and has no O before it: the same, or a
    contraction (`'s`, ...) that starts there;
  - an O run right after a space: ` ?[^\\s\\p{L}\\p{N}]+` takes the space;
  - newlines right after an O run: `[\\r\\n]*` takes them;
and pieces also start
  - at an S character followed by a non-whitespace character: `\\s+(?!\\S)` stops before it;
  - at an S run after a newline, when it ends the whitespace run (`\\s*[\\r\\n]+` ends at the last newline) or when
    the newlines before it were taken by an O run;
  - after a contraction, and every 3 digits within a number run (Qwen2: every digit).
tests/test_hf_tokenizers.py checks these pieces against the `regex` module's on random strings of the
characters that matter to the rules.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import regex

L, N, O, S, NL = range(5)
CONTRACTIONS = {"llama": regex.compile(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"), "gpt2": regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d")}
FAMILIES = ("gpt2", "smollm", "llama3", "qwen2")
# A byte the text does not hold marks where pieces start, for bytes.split (control characters, rare in text).
_MARKS = [bytes([c]) for c in (*range(0, 9), *range(14, 32), 127)]


@lru_cache(maxsize=None)
def class_table() -> np.ndarray:
    """The class of every code point, as the `regex` module reads \\p{L}, \\p{N} and \\s (about 0.2 s)."""
    points = np.array([*range(0xD800), *range(0xE000, 0x110000)], np.int64)  # surrogates are not characters
    text = "".join(map(chr, points.tolist()))
    table = np.full(0x110000, O, np.uint8)
    for prop, code in ((r"\p{L}", L), (r"\p{N}", N), (r"\s", S)):
        for m in regex.finditer(prop + "+", text):
            table[points[m.start()]:points[m.end() - 1] + 1] = code
    table[[ord("\r"), ord("\n")]] = NL
    return table


def _run_ends(mask: np.ndarray) -> np.ndarray:
    """Every p where a run of True ends (mask[p - 1] and not mask[p], or p == len(mask))."""
    ends = np.flatnonzero(mask[:-1] & ~mask[1:]) + 1
    return np.append(ends, len(mask)) if mask[-1] else ends


class ClassRules:
    """The pieces of a known pre-tokenizer regex (`family`: one of FAMILIES), as UTF-8 bytes."""

    def __init__(self, family: str) -> None:
        assert family in FAMILIES
        self.family = family
        self._starts = self._gpt2_starts if family in ("gpt2", "smollm") else self._llama_starts

    def __call__(self, text: str) -> list[bytes] | None:
        """text's pieces, encoded; None if this cannot split it (lone surrogates; every marker byte in it)."""
        if not text:
            return []
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            return None
        mark = next((m for m in _MARKS if m not in data), None)
        if mark is None:
            return None
        is_ascii = len(data) == len(text)
        points = np.frombuffer(data if is_ascii else text.encode("utf-32-le"), np.uint8 if is_ascii else np.uint32)
        start = self._starts(text, points, class_table()[points])
        start[len(points)] = False
        starts = np.flatnonzero(start)
        if not is_ascii:  # character positions -> byte offsets
            width = 1 + (points >= 0x80).astype(np.int32) + (points >= 0x800) + (points >= 0x10000)
            starts = np.cumsum(width, dtype=np.int32 if len(data) < 2**31 else np.int64)[starts - 1]
        # The text with the marker byte before each piece but the first (as np.insert, which is slower).
        marked = np.empty(len(data) + len(starts), np.uint8)
        at = starts + np.arange(len(starts))
        marked[at] = mark[0]
        text_bytes = np.ones(len(marked), bool)
        text_bytes[at] = False
        marked[text_bytes] = np.frombuffer(data, np.uint8)
        return marked.tobytes().split(mark)

    def _contractions(self, text: str, start: np.ndarray, candidates: np.ndarray, pattern: regex.Pattern) -> None:
        """A piece also starts after each contraction found at a candidate position (apostrophes, rare)."""
        for i in candidates.tolist():
            match = pattern.match(text, i)
            if match:  # one piece: no start inside it (GPT-2's: O, then L), one after it
                start[i + 1:match.end()] = False
                start[match.end()] = True

    def _gpt2_starts(self, text: str, points: np.ndarray, cls: np.ndarray) -> np.ndarray:
        """start[i]: a piece starts at i, for 0 < i < n (see the module docstring)."""
        n = len(points)
        is_l, is_n, is_o, is_w = (cls == L), (cls == N), (cls == O), (cls >= S)
        space = points == 32
        start = np.zeros(n + 1, bool)
        inner = start[1:n]  # start[i] for 0 < i < n, computed from characters i - 1 and i
        np.not_equal(is_l[1:], is_l[:-1], out=inner)
        inner |= (is_n[1:] != is_n[:-1]) | (is_o[1:] != is_o[:-1])
        joins = ~is_w[1:] & space[:-1]  # ` ?X+` takes the space before
        last_space = is_w[:-2] & is_w[1:-1] & ~is_w[2:]  # `\s+(?!\S)` stops before it
        if self.family == "smollm":  # digits are pieces of one, and the whitespace before one is one piece
            joins &= ~is_n[1:]
            inner |= is_n[1:]
            last_space &= ~is_n[2:]
        inner &= ~joins
        start[1:n - 1] |= last_space
        candidates = np.flatnonzero((points[:-1] == 39) & is_l[1:])
        if len(candidates):
            candidates = candidates[start[candidates] | (candidates == 0)]  # where a piece starts (not " '")
            self._contractions(text, start, candidates, CONTRACTIONS["gpt2"])
        return start

    def _llama_starts(self, text: str, points: np.ndarray, cls: np.ndarray) -> np.ndarray:
        """start[i]: a piece starts at i, for 0 < i < n (see the module docstring)."""
        digits = 3 if self.family == "llama3" else 1
        n = len(points)
        is_l, is_n, is_o, is_s, is_nl = (cls == L), (cls == N), (cls == O), (cls == S), (cls == NL)
        space = points == 32
        o_starts = is_o.copy()  # O characters that start a piece
        o_starts[1:] &= ~(is_o[:-1] | space[:-1])
        start = np.zeros(n + 1, bool)
        inner = start[1:n]  # start[i] for 0 < i < n, computed from characters i - 1 and i
        np.not_equal(is_l[1:], is_l[:-1], out=inner)
        inner |= (is_n[1:] != is_n[:-1]) | (is_o[1:] != is_o[:-1])
        inner &= ~((is_l[1:] & (is_s[:-1] | o_starts[:-1])) | (is_o[1:] & space[:-1]) | (is_nl[1:] & is_o[:-1]))
        start[1:n - 1] |= is_s[1:-1] & (cls[2:] <= O)
        after_newline = np.flatnonzero(is_nl[:-1] & is_s[1:]) + 1
        if len(after_newline):
            s_ends = _run_ends(is_s)
            end = s_ends[np.searchsorted(s_ends, after_newline)]
            keep = ~is_nl[np.minimum(end, n - 1)]  # (a run that ends the text: its last character is S)
            taken = np.flatnonzero(is_o[:-1] & is_nl[1:]) + 1  # newline runs an O run takes
            if len(taken):
                nl_ends = _run_ends(is_nl)
                taken_until = np.zeros(n + 1, bool)
                taken_until[nl_ends[np.searchsorted(nl_ends, taken)]] = True
                keep |= taken_until[after_newline]
            start[after_newline[keep]] = True
        if digits == 1:
            start[1:n] |= is_n[1:]
        else:
            number_starts = np.flatnonzero(is_n[1:] & ~is_n[:-1]) + 1
            if is_n[0]:
                number_starts = np.concatenate(([0], number_starts))
            if len(number_starts):
                more = (_run_ends(is_n) - number_starts - 1) // digits  # starts inside each number
                if more.any():
                    first = np.repeat(number_starts, more)
                    k = np.arange(len(first)) - np.repeat(np.cumsum(more) - more, more) + 1
                    start[first + digits * k] = True
        candidates = np.flatnonzero((points[:-1] == 39) & o_starts[:-1] & is_l[1:])
        self._contractions(text, start, candidates, CONTRACTIONS["llama"])
        return start

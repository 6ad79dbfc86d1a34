"""Read a Hugging Face `tokenizer.json` into a `Tokenizer`: ours (train_bpe's), or a byte-level BPE of a family
we support (GPT-2, SmolLM/SmolLM2, Llama 3.x, Qwen2/2.5), exactly as the `tokenizers` library would encode.

Read: the model (BPE: vocab, merges as "a b" strings or [a, b] lists, ignore_merges), the normalizer and
pre-tokenizer (see `pipeline`), the added tokens (special or not, `normalized`, lstrip/rstrip) and the
post-processor's beginning-of-sequence token (TemplateProcessing "BOS $A", alone or in a Sequence with
ByteLevel). Anything that would make our ids differ stops with one error saying what is supported.

The end-of-text token (what ends each document in the token files) is not in tokenizer.json: it is the given
one, else the first of EOT_NAMES among the special tokens (each family's base-model end of text).
"""

from __future__ import annotations

import json
from itertools import chain
from typing import TYPE_CHECKING

from tinygpt.common import EOT, TinyGPTError
from tinygpt.tokenizer.pipeline import GPT2_PATTERN, SENTENCEPIECE, SUPPORTED, pipeline_from_spec, token_strings_to_bytes

if TYPE_CHECKING:
    from tinygpt.tokenizer.bpe import Tokenizer

EOT_NAMES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
REBUILD = "re-run train_bpe to rebuild it"
# What train_bpe writes: such a file must have tinygpt's id layout (checked strictly, as before).
OWN_PRE_TOKENIZER_TYPES = ["Split", "ByteLevel"]


def _invalid(source: str, e: Exception) -> TinyGPTError:
    return TinyGPTError(f"{source} is not a valid Hugging Face tokenizer.json ({type(e).__name__}: {e}); "
                        f"use the tokenizer.json of a supported model or {REBUILD}")


def _is_own(spec: dict) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") or []
    return (pre.get("type") == "Sequence" and [s.get("type") for s in steps] == OWN_PRE_TOKENIZER_TYPES
            and steps[0].get("pattern") == {"Regex": GPT2_PATTERN} and not steps[1].get("use_regex", True)
            and spec.get("normalizer") is None and spec.get("post_processor") is None
            and not spec["model"].get("ignore_merges"))


def _check_model(model: dict, source: str) -> None:
    if model.get("type") != "BPE":
        raise TinyGPTError(f"{source}: model type is {model.get('type')!r}, expected 'BPE'; tinygpt reads "
                           f"{SUPPORTED}")
    if model.get("byte_fallback"):
        raise TinyGPTError(f"{source}: byte_fallback: {SENTENCEPIECE}")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise TinyGPTError(f"{source}: model.{key} {model[key]!r} is not supported; tinygpt reads {SUPPORTED}")
    if model.get("dropout"):
        raise TinyGPTError(f"{source}: model.dropout {model['dropout']} makes encoding random; set it to null")


def _merge_pairs(merges: list, source: str) -> list[list[str]]:
    """Each merge ("left right", or [left, right] as newer files write them) as [left, right]."""
    pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]
    # (checked in bulk, without a Python call per merge: a 128k vocabulary has as many merges)
    if set(map(type, pairs)) <= {list} and set(map(len, pairs)) <= {2} and \
            set(map(type, chain.from_iterable(pairs))) <= {str}:
        return pairs
    rank = next(r for r, p in enumerate(pairs)
                if not isinstance(p, list) or len(p) != 2 or not all(isinstance(t, str) for t in p))
    raise TinyGPTError(f"{source}: merge {rank} {merges[rank]!r} is not two tokens")


def _bos(post: dict | None, source: str) -> str | None:
    """The token the post-processor puts before a single sequence, or None; TinyGPTError for other templates."""
    if post is None or post.get("type") == "ByteLevel":  # ByteLevel only trims offsets
        return None
    if post.get("type") == "Sequence":
        found = [t for t in (_bos(p, source) for p in post.get("processors", [])) if t is not None]
        if len(found) > 1:
            raise TinyGPTError(f"{source}: the post-processor adds several beginning tokens {found}")
        return found[0] if found else None
    if post.get("type") == "TemplateProcessing":
        single = post.get("single", [])
        kinds = [next(iter(item)) for item in single]
        if kinds == ["Sequence"]:
            return None
        if kinds == ["SpecialToken", "Sequence"] and single[1]["Sequence"].get("id") == "A":
            return single[0]["SpecialToken"]["id"]
        raise TinyGPTError(f"{source}: post-processor template {single} is not supported (only a beginning "
                           "token before the text, as Llama 3's)")
    raise TinyGPTError(f"{source}: post-processor {post.get('type')!r} is not supported (ByteLevel, "
                       "TemplateProcessing with a beginning token, or a Sequence of those)")


def parse_tokenizer_json(cls: type[Tokenizer], text: str, source: str, eot_token: str | None) -> Tokenizer:
    try:
        spec = json.loads(text)
        model = spec["model"]
        _check_model(model, source)
        vocab = {str(t): int(i) for t, i in model["vocab"].items()}
        added = [a for a in spec.get("added_tokens") or []]
        added_by_id = {int(a["id"]): str(a["content"]) for a in added}
        merges = _merge_pairs(model["merges"], source)
        post = spec.get("post_processor")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise _invalid(source, e) from None
    if _is_own(spec):
        return _own_layout(cls, vocab, added, merges, source, eot_token or EOT)
    pipeline = pipeline_from_spec(spec, source)
    for a in added:
        if a.get("single_word"):
            raise TinyGPTError(f"{source}: added token {a['content']!r} has single_word, which is not supported")
    by_id = {i: t for t, i in vocab.items()}
    by_id.update(added_by_id)
    n = len(by_id)
    if sorted(by_id) != list(range(n)):
        raise TinyGPTError(f"{source}: token ids are not contiguous from 0 (vocab and added_tokens); "
                           f"use the tokenizer.json that came with the model")
    ordinary = token_strings_to_bytes([by_id[i] for i in range(n) if i not in added_by_id])[::-1]
    token_bytes = [by_id[i].encode("utf-8") if i in added_by_id else ordinary.pop() for i in range(n)]
    lefts, rights = [m[0] for m in merges], [m[1] for m in merges]
    ids = [list(map(vocab.get, tokens)) for tokens in (lefts, rights, map(str.__add__, lefts, rights))]
    if any(None in column for column in ids):
        rank = next(r for r, found in enumerate(zip(*ids)) if None in found)
        raise TinyGPTError(f"{source}: merge {rank} ({lefts[rank]!r}, {rights[rank]!r}) uses or makes a token not "
                           "in the vocabulary")
    pairs, merged = list(zip(ids[0], ids[1])), ids[2]
    added_ids = {a["content"]: int(a["id"]) for a in added}
    special = {a["content"] for a in added if a.get("special")}
    eot = eot_token or next((t for t in EOT_NAMES if t in special), None)
    if eot not in added_ids:
        raise TinyGPTError(f"{source}: no end-of-text token {eot_token or ' or '.join(EOT_NAMES)} among its added "
                           "tokens; name the model's end-of-text token")
    bos = _bos(post, source)
    if bos is not None and bos not in added_ids:
        raise TinyGPTError(f"{source}: the post-processor's beginning token {bos!r} is not an added token")
    tok = cls.__new__(cls)
    tok._setup(token_bytes, pairs, merged, added_ids, special, eot, pipeline, bos,
               bool(model.get("ignore_merges")), spec,
               normalized={a["content"] for a in added if a.get("normalized")},
               lstrip={a["content"] for a in added if a.get("lstrip")},
               rstrip={a["content"] for a in added if a.get("rstrip")})
    return tok


def _own_layout(cls: type[Tokenizer], vocab: dict[str, int], added: list[dict], merges: list[tuple[str, str]],
                source: str, eot_token: str) -> Tokenizer:
    """What train_bpe writes: 256 bytes in byte order, merge k at 256 + k, then the special tokens."""
    by_id = {i: t for t, i in vocab.items()}
    specials = [a["content"] for a in added if a.get("special")]
    for a in added:
        by_id[int(a["id"])] = a["content"]
    if sorted(by_id) != list(range(len(by_id))):
        raise TinyGPTError(f"{source}: token ids are not contiguous from 0; {REBUILD}")
    tokens = [by_id[i] for i in range(len(by_id))]
    tail = tokens[256 + len(merges):]
    if sorted(tail) != sorted(specials):
        raise TinyGPTError(f"{source}: tokens after the merges must be the special tokens {specials}, "
                           f"found {tail[:5]}")
    return cls.from_token_strings(tokens, [f"{a} {b}" for a, b in merges], eot_token)

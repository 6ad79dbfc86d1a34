import itertools
import random
import re
from collections import Counter

import pytest

from tinygpt.stories import ARCS, EOT, Teller, iter_story_chunks, story, story_chunk


def many_stories(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [story(rng) for _ in range(n)]


def test_same_seed_same_text_and_different_seeds_differ():
    assert story_chunk(5, 3, n_stories=50) == story_chunk(5, 3, n_stories=50)
    assert story_chunk(5, 3, n_stories=50) != story_chunk(6, 3, n_stories=50)
    assert story_chunk(5, 3, n_stories=50) != story_chunk(5, 4, n_stories=50)


def test_chunks_from_a_process_pool_equal_chunks_made_in_process():
    serial = list(itertools.islice(iter_story_chunks(11, workers=1), 3))
    pooled = list(itertools.islice(iter_story_chunks(11, workers=2), 3))
    assert pooled == serial
    assert serial[0] == story_chunk(11, 0)


def test_chunk_is_documents_each_followed_by_a_separator_line():
    text = story_chunk(1, 0, n_stories=20).decode()
    docs = text.split(f"\n{EOT}\n")
    assert docs[-1] == "" and len(docs) == 21
    assert all(doc and doc == doc.strip() and EOT not in doc for doc in docs[:-1])


@pytest.mark.parametrize("arc", ARCS, ids=lambda arc: arc.__name__)
def test_every_arc_tells_well_formed_stories(arc):
    rng = random.Random(arc.__name__)
    for _ in range(60):
        teller = Teller(rng)
        text = "\n\n".join(" ".join(s for s in p if s) for p in arc(teller))
        name = teller.ctx["name"]
        assert "{" not in text and "}" not in text, text  # every template field was filled
        assert text.count(name) >= 2, text  # the hero recurs
        assert text.count('"') % 2 == 0, text  # quotes are balanced
        assert text[0].isupper() and text.rstrip('"')[-1] in ".!?", text
        assert not re.search(r"\. [a-z]", text), text  # sentences start with a capital letter
        assert not re.search(r"  | [.,!?]|\.\.", text), text
        assert not re.search(r"\ba [aeiou]|\ban [^aeiou\s]", text, flags=re.I), text  # articles agree


def test_pronouns_agree_when_only_girls_appear():
    rng = random.Random(3)
    checked = 0
    for _ in range(3000):
        teller = Teller(rng)
        c = teller.ctx
        if c["he"] != "she" or c["fhe"] != "she" or c["phe"] != "she":
            continue
        arc = rng.choice(ARCS)
        text = " ".join(" ".join(p) for p in arc(teller))
        assert not re.search(r"\b(he|him|his|himself)\b", text, flags=re.I), text
        checked += 1
    assert checked > 100


def test_stories_are_varied():
    texts = many_stories(2000)
    assert len(set(texts)) == len(texts)
    assert len({t.split(".")[0] for t in texts}) > len(texts) // 4  # first sentences
    words = Counter(w for t in texts for w in re.findall(r"[A-Za-z']+", t))
    assert len(words) > 600  # a real vocabulary, not a handful of templates
    lengths = sorted(len(t) for t in texts)
    assert lengths[len(lengths) // 10] < lengths[9 * len(lengths) // 10] * 0.8  # lengths vary


def test_stories_read_like_tinystories():
    texts = many_stories(500, seed=1)
    assert sum(t.startswith("Once upon a time") for t in texts) > 0.2 * len(texts)
    assert sum('"' in t for t in texts) > 0.9 * len(texts)  # dialogue
    assert sum("\n\n" in t for t in texts) > 0.5 * len(texts)  # paragraphs
    assert all(len(t) < 3000 for t in texts)


def test_a_chunk_is_big_enough_to_amortise_a_process_hop_and_small_enough_to_cut():
    assert 300_000 < len(story_chunk(0, 0)) < 2_000_000

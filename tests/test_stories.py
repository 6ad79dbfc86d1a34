import itertools
import os
import random
import re
from collections import Counter

import pytest

from tinygpt.data.stories.generator import (
    ARCS,
    EOT,
    Teller,
    article,
    iter_story_chunks,
    past,
    story,
    story_chunk,
    tell,
)

WORD = re.compile(r"[A-Za-z]+")
MALE = re.compile(r"\b(he|him|his|himself)\b", flags=re.IGNORECASE)
FEMALE = re.compile(r"\b(she|her|hers|herself)\b", flags=re.IGNORECASE)


def many_stories(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [story(rng) for _ in range(n)]


def bad_articles(text: str) -> list[str]:
    """'a'/'an' before the wrong sound, judged by a small independent list of exceptions."""
    you_sound = ("uni", "use", "eu", "one")  # a unicorn, a useful..., a one-eyed...
    silent_h = ("hour", "honest", "honor")
    wrong = []
    for art, word in re.findall(r"\b(a|an|A|An) ([A-Za-z][\w-]*)", text):
        w = word.lower()
        vowel_sound = (w[0] in "aeiou" and not w.startswith(you_sound)) or w.startswith(silent_h)
        if (art.lower() == "an") != vowel_sound:
            wrong.append(f"{art} {word}")
    return wrong


def test_same_seed_same_text_and_different_seeds_differ():
    assert story_chunk(5, 3, n_stories=50) == story_chunk(5, 3, n_stories=50)
    assert story_chunk(5, 3, n_stories=50) != story_chunk(6, 3, n_stories=50)
    assert story_chunk(5, 3, n_stories=50) != story_chunk(5, 4, n_stories=50)
    assert many_stories(50, seed=9) == many_stories(50, seed=9)


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
    for _ in range(150):
        teller = Teller(rng)
        text = "\n\n".join(tell(teller, arc))
        name = teller.ctx["name"]
        assert "{" not in text and "}" not in text, text  # every template field was filled
        assert text.count(name) >= 2, text  # the hero recurs
        assert text.count('"') % 2 == 0, text  # quotes are balanced
        assert text[0].isupper() and text.rstrip('"')[-1] in ".!?", text
        assert not re.search(r"[.!?] [a-z]", text), text  # sentences start with a capital letter
        assert not re.search(r"  | [.,!?]|\.\.|,,|\.,|,\.", text), text
        assert not re.search(r"\b(\w+) \1\b", text, flags=re.IGNORECASE), text  # no doubled words
        assert not bad_articles(text), (bad_articles(text), text)


def test_articles_agree_over_many_stories():
    text = "\n".join(many_stories(3000, seed=4))
    assert not bad_articles(text), bad_articles(text)[:20]


def test_article_and_past_tense_helpers():
    cases = {"apple": "an", "ball": "a", "umbrella": "an", "unicorn": "a", "honest": "an", "hat": "a",
             "orange": "an", "useful": "a", "egg": "an", "one-eyed": "a", "hour": "an", "ice": "an"}
    assert {w: article(w) for w in cases} == cases
    pasts = {"play ball": "played ball", "run": "ran", "hop like a frog": "hopped like a frog", "bake": "baked",
             "carry it": "carried it", "swing high": "swung high", "build a fort": "built a fort", "stay": "stayed",
             "dig": "dug", "skip stones": "skipped stones", "feed the ducks": "fed the ducks", "go": "went",
             "watch": "watched", "tell jokes": "told jokes", "dance": "danced", "cry": "cried"}
    assert {p: past(p) for p in pasts} == pasts


@pytest.mark.parametrize("sex", ["girls", "boys"])
def test_pronouns_agree_when_the_whole_cast_is_one_sex(sex):
    """With hero, friend, parent and pet all girls (or all boys), no pronoun of the other sex may appear."""
    rng = random.Random(3)
    want, forbidden = ("she", MALE) if sex == "girls" else ("he", FEMALE)
    checked = Counter()
    for _ in range(6000):
        teller = Teller(rng)
        c = teller.ctx
        if not c["he"] == c["fhe"] == c["phe"] == c["pet_he"] == want:
            continue
        arc = ARCS[len(checked) % len(ARCS)] if len(checked) < len(ARCS) else rng.choice(ARCS)
        text = " ".join(tell(teller, arc))
        assert not forbidden.search(text), (arc.__name__, text)
        checked[arc.__name__] += 1
    assert len(checked) == len(ARCS) and sum(checked.values()) > 200


def test_there_are_many_distinct_plots():
    assert len(ARCS) >= 20
    assert len({arc.__name__ for arc in ARCS}) == len(ARCS)


def test_stories_are_varied():
    texts = many_stories(2000)
    assert len(set(texts)) == len(texts)
    assert len({t.split(".")[0] for t in texts}) > len(texts) // 2  # first sentences
    lengths = sorted(len(t) for t in texts)
    assert lengths[len(lengths) // 10] < lengths[9 * len(lengths) // 10] * 0.7  # lengths vary


def test_a_megabyte_of_stories_has_a_rich_vocabulary():
    text = b"".join(story_chunk(7, i) for i in range(2))[:1_000_000].decode(errors="ignore")
    assert len(text) > 990_000
    counts = Counter(WORD.findall(text))
    assert len(counts) > 2600, len(counts)
    top = sum(n for _, n in counts.most_common(100)) / sum(counts.values())
    assert top < 0.75  # the common words do not crowd everything out


def test_stories_read_like_tinystories():
    texts = many_stories(500, seed=1)
    assert sum(t.startswith("Once upon a time") for t in texts) > 0.2 * len(texts)
    assert sum('"' in t for t in texts) > 0.9 * len(texts)  # dialogue
    assert sum("\n\n" in t for t in texts) > 0.5 * len(texts)  # paragraphs
    assert all(len(t) < 3000 for t in texts)


def test_a_chunk_is_big_enough_to_amortise_a_process_hop_and_small_enough_to_cut():
    assert 300_000 < len(story_chunk(0, 0)) < 2_000_000


def test_generator_processes_never_exceed_the_usable_cpus(monkeypatch):
    import tinygpt.data.stories.generator as generator

    sizes = []

    class RecordingPool:
        def __init__(self, workers, mp_context=None):
            sizes.append(workers)
            raise RuntimeError("stop here")

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(generator, "ProcessPoolExecutor", RecordingPool)
    with pytest.raises(RuntimeError, match="stop here"):
        next(generator.iter_story_chunks(1, workers=8))
    assert sizes == [2]

"""The built-in chat conversations (tinygpt.data.stories.chat_tasks) and the chat_data stage (tinygpt.data.chat).

Answers are checked against the story text by this file's own reading of it (word lists, no code of the module),
and file sources against what was written with json / pyarrow.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tinygpt.cli import main as cli_main
from tinygpt.common import TinyGPTError
from tinygpt.data.chat import chat_data, check_messages
from tinygpt.data.stories.chat_tasks import (
    CHUNK, EVAL_NAMESPACE, MAX_CHARS, conversation_chunk, conversations, eval_prompts, score_reply,
)
from tinygpt.data.stories.generator import Teller, story_chunk
from tinygpt.data.stories.words import PETS, PLACES

SAMPLE = list(conversations(7, 600))


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9_]+", text.lower())


def contains(text: str, phrase: str) -> bool:
    """Whether the words of `phrase` occur, in a row, among the words of `text` (this file's whole-word test)."""
    hay, needle = words(text), words(phrase)
    return any(hay[i : i + len(needle)] == needle for i in range(len(hay) - len(needle) + 1))


def story_of(messages: list[dict]) -> str:
    """The story that the last question of `messages` is about: the latest long message, the assistant's story
    as it is, or the user's story without its question (the line ending in '?', the first line or the last)."""
    story = next(m for m in reversed(messages) if len(m["content"]) > 300)
    if story["role"] == "assistant":
        return story["content"]
    lines = story["content"].split("\n")
    return "\n".join(lines[:-1] if lines[-1].endswith("?") else lines[1:])


def scored_turns(conv: dict):
    """(messages before the reply, reply, check) per assistant message."""
    messages, checks = conv["messages"], iter(conv["check"])
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            yield messages[:i], m["content"], next(checks)


# ------------------------------------------------------------------------------------------- the generator


def test_the_story_corpus_is_unchanged():
    # sha256 of the first 200 stories of seed 1337 as the generator wrote them before Teller.fix was added
    assert hashlib.sha256(story_chunk(1337, 0, 200)).hexdigest() == \
        "ea836a3faa15c86ceda82dba60219579b6b7f496648bf98aae8a1d2c22f306ba"


def test_fix_keeps_the_cast_consistent():
    for seed in range(40):
        t = Teller(random.Random(seed))
        t.fix(name="Mia", kind="girl", pet="Rex", pet_kind="guinea pig", place="lake", obj="kite")
        c = t.ctx
        assert (c["name"], c["kind"], c["he"], c["his"], c["a_kind"]) == ("Mia", "girl", "she", "her", "a girl")
        assert c["friend"] not in ("Mia", "Rex") and c["pet_sound"] == dict(PETS)["guinea pig"]
        assert c["at_place"] == dict(PLACES)["lake"] and c["obj_desc"].endswith("kite") and c["a_obj"].endswith("kite")
        assert c["Name"] == "Mia" and c["himself"] == "herself"
        t.fix(kind="owl", name="Hoot")
        assert c["a_kind"] == "an owl" and c["Name"] == "Hoot"


# ------------------------------------------------------------------------------------------- conversations


def test_conversations_are_deterministic_and_chunked():
    again = list(conversations(7, 600))
    assert json.dumps(again) == json.dumps(SAMPLE)
    assert json.dumps(list(conversations(8, 50))) != json.dumps(SAMPLE[:50])
    assert SAMPLE[CHUNK : CHUNK + 20] == conversation_chunk(7, 1)[:20]


def test_conversations_are_well_formed_and_short():
    tasks = {c["task"] for c in SAMPLE}
    assert tasks == {"story", "qa", "chat"}
    for conv in SAMPLE:
        assert check_messages(conv["messages"], "x") == conv["messages"]
        assert sum(len(m["content"]) for m in conv["messages"]) <= MAX_CHARS
        assert len(conv["check"]) == sum(m["role"] == "assistant" for m in conv["messages"])
        assert conv["messages"][-1]["role"] == "assistant"


def test_every_story_reply_holds_what_was_asked():
    requests = [(before[-1]["content"], reply, check) for c in SAMPLE for before, reply, check in scored_turns(c)
                if "parts" in check]
    assert len(requests) > 250 and sum(c["task"] == "chat" for c in SAMPLE) > 20
    seen_counts = set()
    for request, reply, check in requests:
        seen_counts.add(len(check["parts"]))
        for part in check["parts"]:
            assert contains(request, part), (part, request)  # asked for ...
            assert contains(reply, part), (part, reply)  # ... and told
        assert score_reply(check, reply)
    assert seen_counts == {1, 2, 3, 4, 5, 6}  # a hero or pet is two words (name, kind): 1 to 4 parts


def check_answer(story: str, question: str, answer: str) -> None:
    """The answer is right for the story, by this file's reading of it."""
    opening = story[:250]
    if m := re.fullmatch(r"The story is about an? ([\w ]+) named ([\w-]+)\.", answer):
        kind, name = m.groups()
        assert contains(opening, kind) and contains(opening, name)
    elif m := re.fullmatch(r"([\w-]+) is an? ([\w ]+)\.", answer):
        name, kind = m.groups()
        assert contains(question, name) and contains(opening, name) and contains(opening, kind)
    elif m := re.fullmatch(r"([\w-]+)'s friend is ([\w-]+)\.", answer):
        name, friend = m.groups()
        assert name != friend and contains(story, friend) and contains(opening, name)
    elif m := re.fullmatch(r"([\w-]+) has an? ([\w ]+) named ([\w-]+)\.", answer) or \
            re.fullmatch(r"The ()([\w ]+) is called ([\w-]+)\.", answer):
        _, kind, pet = m.groups()
        near = [story[max(0, i - 60) : i + 60] for i in (x.start() for x in re.finditer(re.escape(pet), story))]
        assert any(contains(text, kind) for text in near), (pet, kind)
    elif m := re.fullmatch(r"The story happens (.+)\.", answer):
        at_place = m.group(1)
        place = next(p for p, at in PLACES if at == at_place)
        assert contains(story, at_place) or contains(story, f"to the {place}")
    elif m := re.fullmatch(r"Yes, there is an? ([\w -]+) in the story\.", answer):
        assert contains(question, m.group(1)) and contains(story, m.group(1))
    elif m := re.fullmatch(r"No, there is no ([\w -]+) in the story\.", answer):
        assert contains(question, m.group(1)) and not contains(story, m.group(1))
    elif m := re.fullmatch(r"The ([\w -]+) is in the story\.", answer):
        options = re.search(r"an? ([\w -]+?) or an? ([\w -]+?)(?: in the story)?\?", question).groups()
        assert m.group(1) in options and contains(story, m.group(1))
        assert not contains(story, next(o for o in options if o != m.group(1)))
    else:
        raise AssertionError(f"an answer of no known form: {answer!r}")


def test_answers_are_right_for_the_story():
    kinds = set()
    asked = 0
    for conv in SAMPLE:
        for before, reply, check in scored_turns(conv):
            if "answer" in check and check.get("task") != "chat":
                assert reply == check["answer"]
                check_answer(story_of(before), before[-1]["content"], reply)
                kinds.add(reply.split()[0] if reply.split()[0] in ("Yes,", "No,") else re.sub(r"[A-Z]\w+", "N", reply)[:12])
                asked += 1
    assert asked > 500 and len(kinds) >= 6
    assert max(len([t for t in scored_turns(c)]) for c in SAMPLE if c["task"] == "qa") == 4  # follow-up questions


def test_requests_are_phrased_many_ways():
    skeletons, systems = set(), 0
    for conv in list(conversations(3, 500)):
        if conv["task"] != "story":
            continue
        before, _, check = next(scored_turns(conv))
        request = before[-1]["content"]
        for part in sorted(check["parts"], key=len, reverse=True):
            request = re.sub(re.escape(part), "X", request, flags=re.IGNORECASE)
        skeletons.add(request)
        systems += conv["messages"][0]["role"] == "system"
    assert len(skeletons) > 150, len(skeletons)
    assert 30 < systems < 200


def test_evaluation_conversations_are_never_training_ones():
    def scored(convs):  # small talk alone repeats (a few greetings), and eval_prompts passes it over
        return {json.dumps(c, sort_keys=True) for c in convs if len(c["check"]) > 1 or "task" not in c["check"][0]}

    train = scored(c for seed in (1, 2) for c in conversations(seed, 400))
    held_out = scored(c for seed in (1, 2) for c in conversations(seed, 400, EVAL_NAMESPACE))
    assert len(held_out) > 700 and not train & held_out
    train_stories = {m["content"] for seed in (1, 2) for c in conversations(seed, 400) for m in c["messages"][:3]
                     if len(m["content"]) > 300}
    prompts = eval_prompts(1, 200)
    assert {task for task, _, _ in prompts} == {"story", "qa"}
    for task, messages, check in prompts:
        assert messages[-1]["role"] == "user" and not train_stories & {m["content"] for m in messages}
        assert ("parts" in check) == (task == "story")


def test_eval_prompts_are_deterministic_and_answerable():
    prompts = eval_prompts(4, 60)
    assert prompts == eval_prompts(4, 60)
    for _, messages, check in prompts:
        full = next(c for c in conversations(4, 200, EVAL_NAMESPACE) if c["messages"][: len(messages)] == messages)
        reply = full["messages"][len(messages)]["content"]
        assert score_reply(check, reply)


def test_small_talk_has_one_reply_per_intent():
    replies: dict[str, set] = {}
    for conv in SAMPLE:
        for before, reply, check in scored_turns(conv):
            if check.get("task") == "chat":
                assert conv["task"] == "chat" and reply == check["answer"]
                replies.setdefault(before[-1]["content"].lower().strip("!?. "), set()).add(reply)
    assert len(replies) > 15 and all(len(r) == 1 for r in replies.values())


def test_score_reply_rules():
    parts = {"parts": ["Mia", "girl", "guinea pig", "town square"]}
    assert score_reply(parts, "A GIRL named mia had a Guinea Pig in the town square.")
    assert not score_reply(parts, "A girl named Mia had a guinea pig in the town.")  # a part left out
    assert not score_reply(parts, "A girl named Miami had a guinea pig in the town square.")  # not a whole word
    assert not score_reply(parts, "Girls named Mia had a guinea pig in the town square.")
    answer = {"answer": "The story is about a girl named Mia."}
    assert score_reply(answer, "  the story is   about a girl named mia ")
    assert score_reply(answer, "The story is about a girl named Mia!")
    assert not score_reply(answer, "The story is about Mia.")
    assert not score_reply(answer, "The story is about a girl named Mia. She is nice.")


# ------------------------------------------------------------------------------------------------- the stage


GOOD = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "weight": 1}]
BAD = [
    ([{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}], "message 1 has role 'robot'"),
    ([{"role": "user", "content": "x"}], "the conversation has no assistant message"),
    ([{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}], "message 1 (user) has content that is list, not text"),
    ([{"role": "user", "content": None}, {"role": "assistant", "content": "y"}], "message 1 (user) has content that is null"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}],
     "message 2 is a system message after the first"),
    ([], "'messages' is empty"),
    ([{"role": "user"}, {"role": "assistant", "content": "y"}], "message 1 is not an object with 'role' and 'content'"),
]


def test_check_messages():
    assert check_messages(GOOD, "x") == [{k: m[k] for k in ("role", "content")} for m in GOOD]
    for messages, message in BAD:
        with pytest.raises(TinyGPTError, match=r"^data/x\.jsonl line 17: " + re.escape(message)):
            check_messages(messages, "data/x.jsonl line 17")
    with pytest.raises(TinyGPTError, match="'messages' is str, not a list"):
        check_messages("hello", "x")


def write_jsonl(path: Path, rows: list) -> Path:
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_builtin_source_writes_what_conversations_gives(tmp_path, capsys):
    out = tmp_path / "chat" / "conversations.jsonl"
    cli_main(["chat_data", "--source", "builtin", "--count", "300", "--seed", "7", "--out", str(out)])
    assert read_jsonl(out) == SAMPLE[:300]
    tasks = Counter(c["task"] for c in SAMPLE[:300])
    assert f"300 conversations (chat {tasks['chat']}, qa {tasks['qa']}, story {tasks['story']})" in capsys.readouterr().out


def test_file_sources_jsonl_and_parquet(tmp_path):
    rows = [{"messages": GOOD, "id": 1}, {"messages": [{"role": "user", "content": "Q"},
                                                      {"role": "assistant", "content": "A"}]}]
    expected = [{"messages": check_messages(r["messages"], "x")} for r in rows]
    write_jsonl(tmp_path / "a.jsonl.gz", rows)
    pq.write_table(pa.table({"messages": [[{"role": m["role"], "content": m["content"]} for m in r["messages"]]
                                          for r in rows], "id": [1, 2]}), tmp_path / "b.parquet")
    out = tmp_path / "out.jsonl"
    tasks = chat_data("file", out, paths=[str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.parquet")])
    assert read_jsonl(out) == expected + expected and tasks == {"file": 4}
    chat_data("file", out, paths=[str(tmp_path / "a.jsonl.gz")], format="jsonl")
    assert read_jsonl(out) == expected


def expect_error(tmp_path: Path, paths: list[Path], message: str) -> None:
    """The stage fails with one error matching `message` and keeps the previous output."""
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    with pytest.raises(TinyGPTError, match=message):
        chat_data("file", out, paths=[str(p) for p in paths])
    assert out.read_text() == "previous\n" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("messages, message", BAD)
def test_a_malformed_json_line_names_file_and_line(tmp_path, messages, message):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": GOOD}, {"messages": GOOD}, {"messages": messages}])
    expect_error(tmp_path, [path], re.escape(f"{path} line 3: {message}"))


def test_malformed_json_lines(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": GOOD}) + "\n\n" + json.dumps({"text": "x"}) + "\n")
    expect_error(tmp_path, [path], re.escape(f"{path} line 3 has no field 'messages' (its fields: 'text')"))
    path.write_text(json.dumps({"messages": GOOD}) + "\n{not json\n")
    expect_error(tmp_path, [path], re.escape(f"{path} line 2 is not valid JSON"))
    path.write_text(json.dumps([GOOD]) + "\n")
    expect_error(tmp_path, [path], re.escape(f"{path} line 1 is a JSON list, not an object"))


@pytest.mark.parametrize("messages, message", [b for b in BAD if b[0] and all("content" in m for m in b[0])
                                               and all(isinstance(m["content"], (str, type(None))) for m in b[0])])
def test_a_malformed_parquet_row_names_file_and_row(tmp_path, messages, message):
    path = tmp_path / "chat.parquet"
    good = [{"role": m["role"], "content": m["content"]} for m in GOOD]
    pq.write_table(pa.table({"messages": [good, good, good, messages]}), path, row_group_size=2)
    expect_error(tmp_path, [path], re.escape(f"{path} row 4: {message}"))


def test_malformed_parquet_files(tmp_path):
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), path)
    expect_error(tmp_path, [path], re.escape(f"{path} has no column 'messages' (its columns: 'text')"))
    pq.write_table(pa.table({"messages": ["a", "b"]}), path)
    expect_error(tmp_path, [path], re.escape(f"{path}: column 'messages' holds string, not lists of messages"))
    good = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    pq.write_table(pa.table({"messages": [good, None]}), path)
    expect_error(tmp_path, [path], re.escape(f"{path} row 2: column 'messages' is null"))


def test_stage_refusals(tmp_path):
    with pytest.raises(TinyGPTError, match="needs at least one --path"):
        chat_data("file", tmp_path / "out.jsonl")
    with pytest.raises(TinyGPTError, match="neither JSON lines nor Parquet"):
        chat_data("file", tmp_path / "out.jsonl", paths=[str(write_jsonl(tmp_path / "a.txt", []))])
    with pytest.raises(TinyGPTError, match="hold no conversation"):
        chat_data("file", tmp_path / "out.jsonl", paths=[str(write_jsonl(tmp_path / "a.jsonl", []))])
    path = write_jsonl(tmp_path / "b.jsonl", [{"messages": GOOD}])
    with pytest.raises(TinyGPTError, match="also an input --path"):
        chat_data("file", path, paths=[str(path)])
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_reports_a_malformed_file_in_one_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": BAD[0][0]}])
    with pytest.raises(SystemExit) as exit:
        cli_main(["chat_data", "--source", "file", "--path", str(path), "--out", str(tmp_path / "out.jsonl")])
    assert exit.value.code != 0
    err = capsys.readouterr().err
    assert f"{path} line 1: message 1 has role 'robot'" in err and err.count("\n") <= 2

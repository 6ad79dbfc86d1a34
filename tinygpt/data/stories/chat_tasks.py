"""Built-in conversations for chat fine-tuning, made with the story generator, and how to score a reply.

Three tasks, each with replies a program can check:

  story  The user asks for a story with one to four named parts: the hero (`a girl named Mia`), a pet
         (`a dog named Rex`), a place (`the park`) and an object (`a kite`), in many phrasings (a sentence, a
         list, a few short sentences, key = value; parts in any order; an optional system prompt; some requests in
         lower case). The assistant tells a story of the generator with those parts fixed in its cast; every part
         appears in it (the story is redrawn until it does). Check: {"parts": [words]}, the words that must appear.
         A share (FOLLOW_UP_CHANCE) goes on with one question about the story told, as in qa.
  qa     The user gives a short story and asks about it: who it is about, who the hero is, the hero's friend and
         pet, where it happens, whether something is in it, which of two things is in it; then follow-up
         questions in the same conversation (one to four in all). Every answer has one fixed form per kind of
         question (`The story is about a girl named Mia.`, `Mia's friend is Sam.`, `The story happens in the
         park.`, `No, there is no kite in the story.`), built from words of the story. Check: {"answer": text}.
  chat   Small talk with one fixed reply per intent (hello, who are you, what can you do, thanks, bye), often
         around a story request: how a conversation opens and closes. Check: {"answer": text, "task": "chat"}.
         Not among the SCORED_TASKS that `eval_prompts` asks (its story requests are).

A conversation is {"messages": [{"role", "content"}, ...], "task": "story" | "qa" | "chat", "check": [one check
per assistant message, in order]}. `score_reply(check, reply)` scores one assistant message:
  story  every word of check["parts"] occurs in the reply as a whole word (not inside a longer word), ignoring case;
  qa, chat  the reply equals check["answer"] after both are normalised: case folded, runs of whitespace made one
         space, leading and trailing whitespace and final `.`, `!` or `?` characters removed. Nothing else is
         forgiven (a missing article or another word order is wrong).

Determinism and held-out seeds: conversations are made in chunks of CHUNK conversations, chunk `i` of seed `s`
from `random.Random("tinygpt-chat:s:i")`; `eval_prompts` draws from `random.Random("tinygpt-chat-eval:s:i")`, a
namespace training never uses, so evaluation conversations are unseen for every pair of seeds (the stories are
drawn afresh, and a whole conversation coinciding with a training one is vanishingly unlikely; tests check it).
Every conversation fits MAX_CHARS characters of content: with a 4,096-token BPE trained on the stories, rendered in
ChatML, 5,000 conversations took 262 tokens at the median and 473 at most, within a 512-token context.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
from collections.abc import Iterator, Sequence

from tinygpt.data.stories.generator import ARCS, Teller, tell, with_article
from tinygpt.data.stories.words import ANIMAL_KINDS, ANIMAL_NAMES, BOY_NAMES, GIRL_NAMES, INTRO_PET, OBJECTS, PETS, PLACES

TASKS = ("story", "qa", "chat")
TASK_WEIGHTS = (0.45, 0.45, 0.1)
SCORED_TASKS = ("story", "qa")  # what eval_prompts asks: the tasks with a goal
CHUNK = 256  # conversations per chunk: one rng each, so chunks can be made in any order
MAX_CHARS = 1600  # a whole conversation, all messages' contents together
MAX_STORY_CHARS = 1150  # a requested story
FOLLOW_UP_CHANCE = 0.3  # story requests followed by one question about the story told
MAX_QA_STORY_CHARS = 850  # a story that questions are asked about: room for several questions and answers
TRAIN_NAMESPACE = "tinygpt-chat"
EVAL_NAMESPACE = "tinygpt-chat-eval"

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly storyteller for children.",
    "You are TinyGPT, a small model that tells stories and answers questions about them.",
    "You tell short, happy stories for kids.",
    "Answer in one sentence when you are asked a question.",
    "You are a kind assistant. Keep your answers short and clear.",
    "You are a storyteller. Use simple words.",
    "Be helpful and friendly.",
)
PART_NAMES = ("hero", "pet", "place", "object")
_OBJECT_WORDS = frozenset(o.lower() for o in OBJECTS)
_PET_NAMES = tuple(n for n in ANIMAL_NAMES if n.lower() not in _OBJECT_WORDS)  # "Acorn" the pet vs an acorn


def pick(rng: random.Random, options: Sequence):
    return options[int(rng.random() * len(options))]


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


@functools.lru_cache(maxsize=4096)
def _word_pattern(word: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)


def has_word(text: str, word: str) -> bool:
    """Whether `word` (or phrase) occurs in `text` as a whole word (no letter, digit or _ just before or after
    it), ignoring case."""
    return _word_pattern(word).search(text) is not None


def _join(rng: random.Random, items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c' (sometimes with the serial comma)."""
    if len(items) == 1:
        return items[0]
    comma = ", and " if rng.random() < 0.3 else " and "
    return ", ".join(items[:-1]) + comma + items[-1]


def _message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _system(rng: random.Random, p: float = 0.35) -> list[dict]:
    return [_message("system", pick(rng, SYSTEM_PROMPTS))] if rng.random() < p else []


def _told(t: Teller, paragraphs: list[str]) -> str:
    """Paragraphs as the corpus writes a story: blank lines between them, or (30%) one paragraph."""
    return " ".join(paragraphs) if t.chance(0.3) else "\n\n".join(paragraphs)


# ---------------------------------------------------------------------------------------- story on request


def _draw_parts(rng: random.Random) -> dict[str, str]:
    """Which parts are asked for (one to four) and their values: fields for `Teller.fix`."""
    asked = rng.sample(PART_NAMES, 1 + int(rng.random() * 4))
    fixed: dict[str, str] = {}
    if "hero" in asked:
        if rng.random() < 0.7:
            fixed["kind"] = pick(rng, ("girl", "boy"))
            fixed["name"] = pick(rng, GIRL_NAMES if fixed["kind"] == "girl" else BOY_NAMES)
        else:
            fixed["kind"], fixed["name"] = pick(rng, ANIMAL_KINDS), pick(rng, ANIMAL_NAMES)
    if "pet" in asked:
        fixed["pet_kind"] = pick(rng, PETS)[0]
        fixed["pet"] = pick(rng, _PET_NAMES)
        while fixed["pet"] == fixed.get("name"):
            fixed["pet"] = pick(rng, _PET_NAMES)
    if "place" in asked:
        fixed["place"] = pick(rng, PLACES)[0]
    if "object" in asked:
        fixed["obj"] = pick(rng, OBJECTS)
    return fixed


HERO_PHRASES = ("{a_kind} named {name}", "{a_kind} called {name}", "{a_kind} whose name is {name}",
                "a little {kind} named {name}", "{name} the {kind}", "{name}, {a_kind}")
PET_PHRASES = ("{a_pet_kind} named {pet}", "a pet {pet_kind} called {pet}", "{pet} the {pet_kind}",
               "{a_pet_kind} whose name is {pet}", "a pet {pet_kind} named {pet}")
OBJECT_PHRASES = ("{a_obj}", "{a_obj}", "a special {obj}", "an old {obj}")
PLACE_PHRASES = ("set {at_place}", "that happens {at_place}", "{at_place}", "that takes place {at_place}")
ABOUT_LEADS = (
    "Tell me a story about", "Can you tell me a story about", "Please write a story about", "Write a story about",
    "I would like a story about", "Write a short story about", "Tell a bedtime story about", "Make up a story about",
    "Could you make up a story about", "Give me a story about", "I want to hear a story about",
    "Please tell me a short story about", "Story time! Tell me one about", "Can I have a story about",
    "Tell me a story with", "Write a story with", "Please make up a story with", "I want a story with",
)
SENTENCES = {
    "hero": ("The hero is {hero}.", "The main character is {hero}.", "It should be about {hero}.",
             "The story is about {hero}.", "Make the hero {hero}."),
    "pet": ("There is {pet}.", "Include {pet}.", "Put {pet} in it.", "The hero has {pet}.", "Add {pet}."),
    "place": ("It happens {at_place}.", "Set it {at_place}.", "The place is the {place}.",
              "It takes place {at_place}.", "Let it happen {at_place}."),
    "object": ("Put {a_obj} in it.", "Include {a_obj}.", "There should be {a_obj}.", "Add {a_obj}.",
               "Somebody has {a_obj}."),
}
SENTENCE_LEADS = ("Tell me a story.", "Please write a story.", "I want a story.", "Can you make up a story?",
                  "Write a short story for me.", "Story time!")
SENTENCE_ENDS = ("Now tell me the story.", "Thank you!", "Please tell it to me.", "Go!", "")
LIST_LEADS = ("Write a story with:", "Tell me a story with these parts:", "A story, please, with:",
              "Make up a story. Use these:", "Story request:", "Please write a story that has:")
LIST_KEYS = {"hero": ("hero", "main character", "who"), "pet": ("pet", "animal friend", "pet"),
             "place": ("place", "setting", "where"), "object": ("object", "thing", "toy")}
LIST_VALUES = {"hero": "{hero}", "pet": "{pet}", "place": "the {place}", "object": "{a_obj}"}
BULLETS = ("- ", "* ", "{n}. ", "")


def _request(rng: random.Random, asked: list[str], fields: dict[str, str]) -> str:
    """The user's request for a story with the parts `asked` (in this order), in one of several styles."""
    f = dict(fields, hero=pick(rng, HERO_PHRASES).format_map(fields) if "hero" in asked else "",
             pet=pick(rng, PET_PHRASES).format_map(fields) if "pet" in asked else "")
    style = rng.random()
    if style < 0.4:  # one sentence: lead, the things, then the place
        things = [{"hero": f["hero"], "pet": f["pet"], "object": pick(rng, OBJECT_PHRASES).format_map(f)}[p]
                  for p in asked if p != "place"]
        lead = pick(rng, ABOUT_LEADS)
        if not things:
            lead = lead.rsplit(" ", 1)[0]  # "Tell me a story about" -> "Tell me a story"
        text = f"{lead} {_join(rng, things)}" if things else lead
        if "place" in asked:
            text += (", " if things and rng.random() < 0.5 else " ") + pick(rng, PLACE_PHRASES).format_map(f)
        text += "?" if lead.startswith(("Can", "Could")) else "."
    elif style < 0.7:  # a few short sentences, the request before or after them
        parts = [pick(rng, SENTENCES[p]).format_map(f) for p in asked]
        if rng.random() < 0.5:
            text = " ".join([pick(rng, SENTENCE_LEADS)] + parts)
        else:
            text = " ".join(parts + [pick(rng, SENTENCE_ENDS)]).strip()
    elif style < 0.9:  # a list, one part a line
        bullet = pick(rng, BULLETS)
        key_case = pick(rng, (str, _capital))
        lines = [bullet.format(n=n) + key_case(pick(rng, LIST_KEYS[p])) + ": " + LIST_VALUES[p].format_map(f)
                 for n, p in enumerate(asked, 1)]
        text = "\n".join([pick(rng, LIST_LEADS)] + lines)
    else:  # key = value on one line
        values = {"hero": "{name} ({kind})", "pet": "{pet} ({pet_kind})", "place": "{place}", "object": "{obj}"}
        text = "story: " + "; ".join(f"{LIST_KEYS[p][0]} = {values[p].format_map(f)}" for p in asked)
    if rng.random() < 0.15:
        text = text.lower()
    return text


def _requested_story(rng: random.Random, fixed: dict[str, str], words: list[str], limit: int) -> tuple[str, dict]:
    """A story with the parts `fixed` in its cast, in which every one of `words` appears; its fields."""
    for _ in range(1000):
        t = Teller(rng)
        t.fix(**fixed)
        if t.ctx["name"] == t.ctx["pet"]:
            continue
        paragraphs = tell(t, t.pick(ARCS))
        if "pet" in fixed and not all(has_word(" ".join(paragraphs), w) for w in (fixed["pet"], fixed["pet_kind"])):
            paragraphs[0] += " " + t.say(INTRO_PET)  # the pet the user asked for is introduced with the hero
        text = _told(t, paragraphs)
        if len(text) <= limit and all(has_word(text, w) for w in words):
            return text, t.ctx
    raise RuntimeError(f"no story with {fixed} in 1000 tries")  # never seen: a part no arc can tell would be a bug


def story_request(rng: random.Random) -> dict:
    """A conversation: the user asks for a story with some named parts, the assistant tells one."""
    system = _system(rng)
    fixed = _draw_parts(rng)
    words = list(fixed.values())  # each fixed field is a word (or phrase) that the story must contain
    asked = [p for p in PART_NAMES if {"hero": "name", "pet": "pet", "place": "place", "object": "obj"}[p] in fixed]
    rng.shuffle(asked)
    limit = min(MAX_STORY_CHARS, MAX_CHARS - 250)
    text, fields = _requested_story(rng, fixed, words, limit)
    fields = dict(fields, a_obj=with_article(fields["obj"]))  # the request names the plain object; the story may adorn it
    request = _request(rng, asked, fields)
    messages = system + [_message("user", request), _message("assistant", text)]
    checks: list[dict] = [{"parts": words}]
    if rng.random() < FOLLOW_UP_CHANCE:  # a question about the story just told
        facts = _facts(fields, text)
        question, answer = _question(rng, pick(rng, _question_kinds(facts) + ["no"]), facts, text)
        turn = [_message("user", pick(rng, FOLLOW_UPS).format(question=question, lower=question[:1].lower() + question[1:])),
                _message("assistant", answer)]
        if sum(len(m["content"]) for m in messages + turn) <= MAX_CHARS:
            messages += turn
            checks.append({"answer": answer})
    return {"messages": messages, "task": "story", "check": checks}


# ------------------------------------------------------------------------------------- questions on a story


def _facts(c: dict, text: str) -> dict[str, str]:
    """Fields of the cast `c` (a Teller's context) that the story `text` actually mentions (whole words)."""
    facts = {"name": c["name"], "kind": c["kind"]}
    if has_word(text, c["friend"]) and c["friend"] != c["name"]:
        facts["friend"] = c["friend"]
    if has_word(text, c["pet"]) and has_word(text, c["pet_kind"]):
        facts.update(pet=c["pet"], pet_kind=c["pet_kind"])
    if has_word(text, c["at_place"]) or has_word(text, f"to the {c['place']}"):  # not just "near the woods"
        facts.update(place=c["place"], at_place=c["at_place"])
    if has_word(text, c["obj"]):
        facts["obj"] = c["obj"]
    return facts


QUESTIONS = {  # kind of question -> (phrasings, each ending in "?"; the one answer form); fields from `_facts`, x, y
    "about": (("Who is the story about?", "Who is this story about?", "Who is the main character?",
               "Who is the hero of the story?", "Who is the story mostly about?"),
              "The story is about {a_kind} named {name}."),
    "hero": (("Who is {name}?", "What is {name}?", "What kind of character is {name}?", "Can you tell me who {name} is?"),
             "{name} is {a_kind}."),
    "friend": (("Who is {name}'s friend?", "What is the name of {name}'s friend?", "Who is the friend of {name}?",
                "Does {name} have a friend? Who?"),
               "{name}'s friend is {friend}."),
    "pet": (("What pet does {name} have?", "Does {name} have a pet?", "What about {name}'s pet?",
             "Which animal lives with {name}?"),
            "{name} has {a_pet_kind} named {pet}."),
    "pet_name": (("What is the name of the {pet_kind}?", "What is the {pet_kind} called?",
                  "What is the {pet_kind}'s name?"),
                 "The {pet_kind} is called {pet}."),
    "place": (("Where does the story happen?", "Where is the story set?", "Where does the story take place?",
               "Where did {name} go?"),
              "The story happens {at_place}."),
    "yes": (("Is there {a_x} in the story?", "Does the story have {a_x} in it?", "Is {a_x} in the story?"),
            "Yes, there is {a_x} in the story."),
    "no": (("Is there {a_x} in the story?", "Does the story have {a_x} in it?", "Is {a_x} in the story?"),
           "No, there is no {x} in the story."),
    "which": (("Which one is in the story, {a_x} or {a_y}?", "Is there {a_x} or {a_y} in the story?",
               "What is in the story: {a_x} or {a_y}?"),
              "The {answer} is in the story."),
}
FIRST_TURNS = (
    "Read this story and answer my question.\n\n{story}\n\n{question}",
    "{story}\n\n{question}",
    "Here is a story:\n\n{story}\n\n{question}",
    "Story:\n{story}\n\nQuestion: {question}",
    "{question}\n\n{story}",
    "Please read this.\n\n{story}\n\nNow answer: {question}",
    "I will give you a story. {question}\n\n{story}",
)
FOLLOW_UPS = ("{question}", "{question}", "And {lower}", "One more question: {question}", "Next: {question}",
              "Thanks. {question}", "Another question. {question}", "Okay. {question}")


def _absent(rng: random.Random, text: str, table: Sequence[str]) -> str:
    """A thing from `table` that the story does not mention."""
    while has_word(text, x := pick(rng, table)):
        pass
    return x


def _question(rng: random.Random, kind: str, facts: dict[str, str], text: str) -> tuple[str, str]:
    """(question, answer) of this kind about the story `text`."""
    f = dict(facts, a_kind=with_article(facts["kind"]))
    if "pet_kind" in f:
        f["a_pet_kind"] = with_article(f["pet_kind"])
    if kind == "yes":
        f["x"] = pick(rng, [f[k] for k in ("obj", "pet_kind") if k in f])
    elif kind == "no":
        f["x"] = _absent(rng, text, OBJECTS if rng.random() < 0.7 else [p for p, _ in PETS])
    elif kind == "which":
        f["answer"], wrong = f["obj"], _absent(rng, text, OBJECTS)
        f["x"], f["y"] = (f["obj"], wrong) if rng.random() < 0.5 else (wrong, f["obj"])
        f["a_y"] = with_article(f["y"])
    if "x" in f:
        f["a_x"] = with_article(f["x"])
    phrasings, answer = QUESTIONS[kind]
    return pick(rng, phrasings).format_map(f), answer.format_map(f)


def _question_kinds(facts: dict[str, str]) -> list[str]:
    """The kinds of question this story can answer."""
    kinds = ["about", "hero"]
    kinds += ["friend"] if "friend" in facts else []
    kinds += ["pet", "pet_name"] if "pet" in facts else []
    kinds += ["place"] if "place" in facts else []
    kinds += ["yes"] if "obj" in facts or "pet" in facts else []
    kinds += ["which"] if "obj" in facts else []
    return kinds


def story_questions(rng: random.Random) -> dict:
    """A conversation: a short story from the user, then one to four questions about it, each answered."""
    while True:
        t = Teller(rng)
        text = _told(t, tell(t, t.pick(ARCS)))
        if len(text) <= MAX_QA_STORY_CHARS:
            break
    facts = _facts(t.ctx, text)
    kinds = _question_kinds(facts) + (["no"] if rng.random() < 0.5 else [])
    rng.shuffle(kinds)
    messages = _system(rng)
    checks = []
    for n, kind in enumerate(kinds[: 1 + int(rng.random() * 4)]):
        question, answer = _question(rng, kind, facts, text)
        if n == 0:
            content = pick(rng, FIRST_TURNS).format(story=text, question=question)
        else:
            content = pick(rng, FOLLOW_UPS).format(question=question, lower=question[:1].lower() + question[1:])
        turn = [_message("user", content), _message("assistant", answer)]
        if n and sum(len(m["content"]) for m in messages + turn) > MAX_CHARS:
            break
        messages += turn
        checks.append({"answer": answer})
    return {"messages": messages, "task": "qa", "check": checks}


# ---------------------------------------------------------------------------------------------- small talk


SMALL_TALK = {  # intent -> (what the user says, the one reply)
    "hello": (("Hi!", "Hello!", "Hello", "Hi there!", "Hey!", "Good morning!", "Hello, how are you?", "hi"),
              "Hello! I can tell you a story or answer questions about one. What would you like?"),
    "who": (("Who are you?", "What are you?", "What is your name?", "Tell me about yourself.", "who are you"),
            "I am TinyGPT, a small model that tells stories and answers questions about them."),
    "help": (("What can you do?", "How can you help me?", "What do you do?", "Help", "What can I ask you?"),
             "I can tell you a story with the hero, pet, place and things you choose, or answer questions about a "
             "story you give me."),
    "thanks": (("Thank you!", "Thanks!", "Thanks a lot.", "That was nice, thank you.", "thanks"),
               "You are welcome!"),
    "bye": (("Bye!", "Goodbye!", "See you later!", "Good night!", "bye"), "Goodbye! Come back for another story soon."),
}


def _small_talk_turn(rng: random.Random, intent: str) -> tuple[list[dict], dict]:
    said, reply = SMALL_TALK[intent]
    return [_message("user", pick(rng, said)), _message("assistant", reply)], {"answer": reply, "task": "chat"}


def small_talk(rng: random.Random) -> dict:
    """A conversation: a greeting or a question about the assistant, often then a story request and thanks."""
    messages, first = _small_talk_turn(rng, pick(rng, ("hello", "who", "help")))
    messages, checks = _system(rng) + messages, [first]
    if rng.random() < 0.6:
        request = story_request(rng)
        turns = [m for m in request["messages"] if m["role"] != "system"]
        if sum(len(m["content"]) for m in messages + turns) <= MAX_CHARS - 100:
            messages, checks = messages + turns, checks + request["check"]
            if rng.random() < 0.5:
                closing, check = _small_talk_turn(rng, pick(rng, ("thanks", "bye")))
                messages, checks = messages + closing, checks + [check]
    return {"messages": messages, "task": "chat", "check": checks}


# ------------------------------------------------------------------------------------------- the stream


MAKERS = {"story": story_request, "qa": story_questions, "chat": small_talk}


def conversation(rng: random.Random) -> dict:
    """One built-in conversation, its task drawn by TASK_WEIGHTS (see the module docstring for its form)."""
    task = rng.choices(TASKS, TASK_WEIGHTS)[0]
    return MAKERS[task](rng)


def conversation_chunk(seed: int, index: int, namespace: str = TRAIN_NAMESPACE) -> list[dict]:
    """Chunk `index` of the conversations for `seed`: CHUNK conversations that depend on nothing else."""
    rng = random.Random(f"{namespace}:{seed}:{index}")
    return [conversation(rng) for _ in range(CHUNK)]


def conversations(seed: int, count: int, namespace: str = TRAIN_NAMESPACE) -> Iterator[dict]:
    """The first `count` training conversations for `seed`, always the same ones."""
    chunks = (conversation_chunk(seed, index, namespace) for index in itertools.count())
    return itertools.islice(itertools.chain.from_iterable(chunks), count)


def eval_prompts(seed: int, n: int) -> list[tuple[str, list[dict], dict]]:
    """`n` held-out prompts: (task, the messages before the scored assistant message, its check).

    Drawn from EVAL_NAMESPACE (never used for training), one scored turn per conversation, a random one of its
    assistant messages of a SCORED_TASKS task, with the earlier turns (right answers) as the history; the task is
    the scored turn's (`check_task`): a question after a requested story counts as "qa", a story requested after
    a greeting as "story". Conversations of small talk alone are passed over.
    """
    prompts = []
    rng = random.Random(f"{EVAL_NAMESPACE}-turns:{seed}")
    for conv in conversations(seed, 1 << 62, EVAL_NAMESPACE):
        if len(prompts) == n:
            break
        turns = [(i, check) for i, check in zip((i for i, m in enumerate(conv["messages"]) if m["role"] == "assistant"),
                                                conv["check"]) if check_task(check) in SCORED_TASKS]
        if turns:
            i, check = turns[int(rng.random() * len(turns))]
            prompts.append((check_task(check), conv["messages"][:i], check))
    return prompts


def check_task(check: dict) -> str:
    """The task a check scores: "story" (parts that must appear), "qa" (an exact answer about a story) or "chat"
    (the exact reply to small talk)."""
    return check.get("task") or ("story" if "parts" in check else "qa")


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold().rstrip(".!?").rstrip()


def score_reply(check: dict, reply: str) -> bool:
    """Whether one assistant message `reply` passes `check` (see the module docstring for the exact rules)."""
    if "parts" in check:
        return all(has_word(reply, word) for word in check["parts"])
    return _normalise(reply) == _normalise(check["answer"])

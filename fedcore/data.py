"""Dialogue-summarization data: Samsum files, a built-in synthetic corpus, splits.

Data never leaves a device in a real deployment; these helpers exist so that
demos, tests and simulations can give each client its own deterministic shard.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

import numpy as np

log = logging.getLogger("fedcore.data")

T = TypeVar("T")


class DataError(ValueError):
    """A data file that cannot be used; the message names file, place and problem."""


@dataclass(frozen=True)
class Example:
    """One dialogue and its reference summary; ``topic`` drives non-IID splits."""

    id: str
    dialogue: str
    summary: str
    topic: str = ""


# --------------------------------------------------------------------------
# Samsum files
# --------------------------------------------------------------------------

def _example_from_obj(obj: Any, where: str) -> Example | None:
    """Validate one Samsum record; None for a record to skip (empty text)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with id, dialogue, summary, got {type(obj).__name__}")
    missing = [k for k in ("id", "dialogue", "summary") if k not in obj]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    ident = obj["id"]
    if not isinstance(ident, (str, int)) or isinstance(ident, bool):
        raise DataError(f"{where}: field 'id' must be a string or integer, got {type(ident).__name__}")
    for key in ("dialogue", "summary"):
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}")
    topic = obj.get("topic", "")
    if not isinstance(topic, str):
        raise DataError(f"{where}: field 'topic' must be a string, got {type(topic).__name__}")
    if not obj["dialogue"].strip() or not obj["summary"].strip():
        # The public Samsum train split contains an empty dialogue; refusing the
        # whole file for it would make the real data set unusable.
        return None
    return Example(id=str(ident), dialogue=obj["dialogue"], summary=obj["summary"], topic=topic)


def load_samsum(path: str | Path) -> list[Example]:
    """Read a Samsum JSON list or JSONL file into Examples.

    Records with an empty dialogue or summary are skipped with a warning;
    anything malformed raises DataError naming the file and index or line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None

    records: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
        records = [(f"{path}: item {i}", obj) for i, obj in enumerate(data)]
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} column {e.colno}: invalid JSON: {e.msg}") from None
            records.append((f"{path}: line {lineno}", obj))

    examples: list[Example] = []
    skipped = 0
    for where, obj in records:
        ex = _example_from_obj(obj, where)
        if ex is None:
            skipped += 1
        else:
            examples.append(ex)
    if skipped:
        log.warning("%s: skipped %d record(s) with an empty dialogue or summary", path, skipped)
    if not examples:
        raise DataError(f"{path}: no usable examples")
    return examples


# --------------------------------------------------------------------------
# Built-in synthetic corpus
# --------------------------------------------------------------------------

# Slot values are short on purpose: the byte-level tokenizer spends one token
# per character and targets stop at 95 tokens, so every summary must stay
# within 90 bytes (checked by a test). Names have at most 4 letters, times 4.
_NAMES = (
    "Anna", "Tom", "Mia", "Ben", "Lena", "Omar", "Sara", "Leo", "Nina", "Paul",
    "Eva", "Max", "Ida", "Sam", "Zoe", "Jon", "Amy", "Luca", "Rosa", "Karl",
)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_TIMES = ("9 am", "noon", "1 pm", "2 pm", "4 pm", "5 pm", "6 pm", "7 pm", "8 pm")

# topic -> (verb phrase, places, things to bring); verbs <= 12, places <= 10,
# objects <= 9 characters.
_ACTIVITIES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "cinema": ("watch a film", ("the Odeon", "the Roxy", "Cine City"), ("snacks", "popcorn", "tissues")),
    "hiking": ("go hiking", ("Mount Ash", "the lake", "Pine Hill"), ("water", "a map", "bread")),
    "dinner": ("have dinner", ("Luigi's", "Thai Spice", "Bistro 9"), ("wine", "dessert", "cash")),
    "football": ("play soccer", ("the park", "the field", "the gym"), ("a ball", "cones", "drinks")),
    "concert": ("see a show", ("the arena", "Club Blue", "town hall"), ("earplugs", "tickets", "a jacket")),
    "study": ("do homework", ("the library", "Cafe Moka", "room 12"), ("notes", "a laptop", "coffee")),
    "swimming": ("go swimming", ("the pool", "the beach", "the lake"), ("towels", "goggles", "sunscreen")),
    "shopping": ("go shopping", ("the mall", "the market", "Main St"), ("bags", "a list", "cash")),
}

# Several phrasings per summary template: slots move around, are worded
# differently and sometimes come with a decoy (a rejected day), so a model
# must locate them rather than copy fixed offsets. {a},{b},{c} are speakers;
# the speaker of the "I'll bring"/"I can bring" line is the one who brings.
_DIALOGUES_2 = (
    "{a}: Hey {b}, do you want to {verb} on {day}?\n{b}: Sure! Where?\n{a}: How about {place}?\n"
    "{b}: Good idea. What time?\n{a}: {time}?\n{b}: OK, see you there. I'll bring {obj}.",
    "{b}: Are you free on {decoy}, {a}?\n{a}: No, I work on {decoy}. {day} is better.\n"
    "{b}: OK, {day} then. We could {verb} at {place}.\n{a}: Sounds great. Is {time} fine?\n"
    "{b}: Perfect.\n{a}: I'll bring {obj} then.",
    "{a}: I'm bored. Let's {verb} this week!\n{b}: Yes! {day} works for me.\n{a}: {day} is good. {place}?\n"
    "{b}: Sure, at {time}.\n{a}: Great, I can bring {obj}.",
    "{b}: {a}, what are you doing on {day}?\n{a}: Nothing yet.\n{b}: Want to {verb}? I know {place}.\n"
    "{a}: Why not. When?\n{b}: Let's meet at {time}. Don't forget {obj}!\n{a}: I'll bring {obj}, promise.",
    "{a}: Quick question, {b}: {verb} on {day} at {time}?\n{b}: Where?\n{a}: {place}, as usual.\n"
    "{b}: Deal. I'll bring {obj}.\n{a}: Thanks! I was hoping you would say that.",
)
_DIALOGUES_3 = (
    "{a}: Hi {b} and {c}! Let's {verb} on {day}.\n{b}: I'm in. Where?\n{a}: {place}.\n"
    "{c}: Fine by me. At {time}?\n{a}: Yes, {time}.\n{c}: I'll bring {obj}.",
    "{b}: Guys, {day} at {time}, {place}. We {verb}?\n{c}: Count me in!\n{a}: Me too.\n"
    "{b}: Who brings {obj}?\n{a}: I'll bring {obj}.",
    "{c}: Anyone free on {decoy}?\n{a}: Not me, sorry. {day}?\n{b}: {day} is fine. Shall we {verb}?\n"
    "{c}: Good idea, at {place}.\n{a}: {time} ok?\n{b}: OK. I'll bring {obj}.",
)
# Small talk around the arrangement: realistic length and noise with no slots.
_OPENERS = (
    "{b}: Hi {a}!\n", "{a}: Hi!\n{b}: Hello :)\n", "{a}: Hey, how are you?\n{b}: Fine, thanks. You?\n{a}: Good!\n",
    "{b}: Long time no see!\n{a}: I know, busy weeks.\n", "{a}: Good morning!\n{b}: Morning :)\n",
)
_CLOSERS = (
    "", "\n{a}: See you!", "\n{b}: Can't wait :)\n{a}: Me neither!", "\n{a}: Bye!\n{b}: Bye, take care.",
    "\n{b}: I'll tell the others.\n{a}: Good, thanks.",
)


def _bringer(template: str, a: str, b: str, c: str) -> str:
    """Who says "I'll bring" / "I can bring" in a template (that line's speaker)."""
    for line in template.split("\n"):
        if "I'll bring" in line or "I can bring" in line:
            return {"{a}": a, "{b}": b, "{c}": c}[line.split(":", 1)[0]]
    raise AssertionError("every template names a bringer")


def synthetic_corpus(n: int, seed: int = 0) -> list[Example]:
    """``n`` deterministic dialogues about arranging an activity, with template summaries.

    Two speakers: "<A> and <B> will <verb> at <place> on <day> at <time>. <X> brings <obj>."
    Three speakers: "<A>, <B> and <C> will <verb> at <place> on <day> at <time>." (the
    bring sentence would push three names past the 90-byte target budget).
    """
    if n < 0:
        raise ValueError(f"synthetic_corpus: n must be >= 0, got {n}")
    rng = random.Random(seed)
    topics = sorted(_ACTIVITIES)
    out: list[Example] = []
    for i in range(n):
        topic = rng.choice(topics)
        verb, places, objects = _ACTIVITIES[topic]
        three = rng.random() < 0.3
        a, b, c = rng.sample(_NAMES, 3)
        day, decoy = rng.sample(_DAYS, 2)
        template = rng.choice(_DIALOGUES_3 if three else _DIALOGUES_2)
        slots = dict(a=a, b=b, c=c, verb=verb, place=rng.choice(places), day=day, decoy=decoy,
                     time=rng.choice(_TIMES), obj=rng.choice(objects))
        body = template.format(**slots)
        dialogue = rng.choice(_OPENERS).format(**slots) + body + rng.choice(_CLOSERS).format(**slots)
        # Names in order of first appearance as speakers: a rule the model can
        # read off the dialogue, unlike the templates' internal roles.
        order = list(dict.fromkeys(line.split(":", 1)[0] for line in dialogue.split("\n")))
        when = f"will {verb} at {slots['place']} on {day} at {slots['time']}."
        if three:
            summary = f"{order[0]}, {order[1]} and {order[2]} {when}"
        else:
            summary = f"{order[0]} and {order[1]} {when} {_bringer(template, a, b, c)} brings {slots['obj']}."
        out.append(Example(id=f"synth-{seed}-{i:06d}", dialogue=dialogue, summary=summary, topic=topic))
    return out


def load_corpus(source: str, n: int, seed: int) -> list[Example]:
    """``"builtin"`` -> synthetic_corpus(n, seed); else a Samsum path, first ``n`` (all if n <= 0)."""
    if source == "builtin":
        return synthetic_corpus(n, seed)
    examples = load_samsum(source)
    return examples[:n] if n > 0 else examples


# --------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------

def train_eval_split(examples: Sequence[T], eval_size: int, seed: int) -> tuple[list[T], list[T]]:
    """Deterministic random hold-out of ``eval_size`` items; both parts keep input order."""
    if not 0 <= eval_size <= len(examples):
        raise ValueError(f"eval_size {eval_size} not in [0, {len(examples)}]")
    held = set(random.Random(seed).sample(range(len(examples)), eval_size))
    train = [e for i, e in enumerate(examples) if i not in held]
    ev = [e for i, e in enumerate(examples) if i in held]
    return train, ev


def dirichlet_partition(
    n_items: int,
    num_clients: int,
    alpha: float = 1.0,
    seed: int = 0,
    labels: list[str] | None = None,
    min_per_client: int = 1,
) -> list[list[int]]:
    """Split ``range(n_items)`` over clients with Dirichlet(alpha) skew.

    With ``labels``: each label's items are divided by its own Dirichlet draw
    (label skew, the usual non-IID benchmark split). Without: client sizes
    follow one Dirichlet draw (quantity skew). Every index appears exactly
    once; each client gets at least ``min_per_client`` (sorted) indices.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_per_client < 0:
        raise ValueError(f"min_per_client must be >= 0, got {min_per_client}")
    if n_items < num_clients * min_per_client:
        raise ValueError(f"cannot give {num_clients} clients {min_per_client} item(s) each from {n_items} items")
    if labels is not None and len(labels) != n_items:
        raise ValueError(f"labels has {len(labels)} entries for {n_items} items")
    rng = np.random.default_rng(seed)

    if labels is None:
        props = rng.dirichlet(np.full(num_clients, alpha))
        counts = min_per_client + rng.multinomial(n_items - num_clients * min_per_client, props)
        order = rng.permutation(n_items)
        bounds = np.cumsum(counts)[:-1]
        return [sorted(int(i) for i in part) for part in np.split(order, bounds)]

    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label in sorted(set(labels)):
        idx = rng.permutation([i for i, lab in enumerate(labels) if lab == label])
        props = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for client, chunk in enumerate(np.split(idx, cuts)):
            parts[client].extend(int(i) for i in chunk)
    # Small alpha can leave a client empty; move items from the largest client
    # rather than redrawing, so the result is deterministic and always terminates.
    for client in range(num_clients):
        while len(parts[client]) < min_per_client:
            donor = max(range(num_clients), key=lambda c: (len(parts[c]), -c))
            parts[client].append(parts[donor].pop())
    return [sorted(p) for p in parts]

"""The offline base's pretraining distribution: other dialogues, other topics, other summaries, and denoising.

The federated task (fedcore.data.synthetic_corpus) is friends arranging a
leisure activity, summarized as "<A> and <B> will <verb> at <place> on <day>
at <time>. <X> brings <obj>." The base is pretrained on what a FLAN-T5
checkpoint would have seen before that task, and nothing of the task itself:
errands and work arrangements between other people (no name, topic, place or
template of the federated corpus), summarized in other wordings, plus T5's
span-corruption denoising of the same dialogues. What transfers is general:
reading speakers, days and times out of a chat and copying them into a
sentence. A test checks that no name, topic verb or place is shared.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from fedcore.data import Example

#: the preset the base is built for: the only one that pretrains in minutes on a CPU (here, not in
#: fedlab.base, so that reading a config needs no torch)
BASE_PRESET = "tiny"

# Names, places and times are drawn from large generated sets, not short lists: a model pretrained on
# 20 names memorizes them and then writes them into every summary; one that sees thousands must learn to
# copy what the chat says, which is the skill the federated task reuses. None of them, nor any topic verb
# or template, is the federated corpus's (tests/test_base.py checks).
_ONSETS = "BDFGHKMPTVWY"  # no L, N, R, S, Z, C, A, E, I, O: no generated name can be one of fedcore.data's
_VOWELS = "aeiou"
_CODAS = ("", "", "n", "r", "s", "l")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# topic -> (verb phrase, place patterns, what someone will bring); {n} is a number, {N} a generated name
TOPICS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "meeting": ("review the budget", ("office {n}", "the annex", "{N}'s desk"), ("the slides", "the figures")),
    "doctor": ("see the doctor", ("the clinic", "Dr {N}'s", "ward {n}"), ("the forms", "a card")),
    "repair": ("fix the sink", ("{N}'s flat", "the kitchen", "unit {n}"), ("the tools", "a new tap")),
    "moving": ("move the sofa", ("{N} Road", "flat {n}", "the van"), ("straps", "boxes")),
    "travel": ("catch the train", ("platform {n}", "the station", "{N} Gate"), ("the passes", "passports")),
    "exam": ("revise maths", ("the lab", "lecture hall {n}", "{N} Hall"), ("old papers", "a calculator")),
    "delivery": ("pick up a parcel", ("the depot", "kiosk {n}", "{N}'s shop"), ("the receipt", "an ID")),
}

DIALOGUES = (
    "{a}: We need to {verb}. Can you do {day}?\n{b}: {day} is fine. What time?\n{a}: {time}, at {place}.\n"
    "{b}: OK. I will bring {obj}.",
    "{a}: Is {decoy} still on?\n{b}: Sorry, {decoy} is bad. Try {day}?\n"
    "{a}: {day} at {time} then. We {verb} at {place}.",
    "{b}: Reminder: {verb} on {day}.\n{a}: Where?\n{b}: {place}, {time} sharp.\n{a}: Thanks.",
    "{a}: {b}, free on {day}?\n{b}: Yes, after {time}.\n{a}: Let's {verb}.\n{b}: At {place}?\n{a}: Perfect.",
)
OPENERS = ("", "", "{a}: Hello {b}.\n", "{b}: Got a minute?\n{a}: Sure.\n")
CLOSERS = ("", "", "\n{a}: Thanks a lot.", "\n{b}: Bye.")
# Summaries in wordings other than the federated task's; slots are the same kinds of facts.
SUMMARIES = (
    "{first} and {second} plan to {verb} on {day} at {time} at {place}.",
    "On {day} at {time}, {first} and {second} {verb} at {place}.",
    "{first} asks {second} to {verb} at {place} on {day}, {time}.",
)


def _name(rng: random.Random) -> str:
    return (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_ONSETS.lower()) + rng.choice(_VOWELS)
            + rng.choice(_CODAS))


def _time(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"{rng.randint(1, 12)} {rng.choice(('am', 'pm'))}"
    return f"{rng.randint(7, 21)}:{rng.choice(('00', '15', '30', '45'))}"


@dataclass(frozen=True)
class Denoising:
    """T5's span corruption, in bytes: mask ~``noise`` of the text in spans of ~``mean_span`` bytes."""

    noise: float = 0.15
    mean_span: int = 6


@dataclass(frozen=True)
class Chat:
    """One pretraining dialogue, its summary, and the facts a question can ask for."""

    example: Example
    facts: tuple[tuple[str, str], ...]  # (question, answer): FLAN-style short extraction tasks


def dialogue_corpus(n: int, seed: int) -> list[Chat]:
    """``n`` deterministic pretraining dialogues with their summaries and facts."""
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    out = []
    for i in range(n):
        topic = rng.choice(topics)
        verb, places, objects = TOPICS[topic]
        a, b = _name(rng), _name(rng)
        while b == a:
            b = _name(rng)
        day, decoy = rng.sample(DAYS, 2)
        place = rng.choice(places).format(n=rng.randint(1, 99), N=_name(rng))
        slots = dict(a=a, b=b, verb=verb, place=place, day=day, decoy=decoy, time=_time(rng), obj=rng.choice(objects))
        dialogue = (rng.choice(OPENERS) + rng.choice(DIALOGUES) + rng.choice(CLOSERS)).format(**slots)
        first, second = dict.fromkeys(line.split(":", 1)[0] for line in dialogue.split("\n"))
        summary = rng.choice(SUMMARIES).format(first=first, second=second, **slots)
        facts = (("who", f"{first} and {second}"), ("when", f"{day} at {slots['time']}"), ("where", place))
        out.append(Chat(Example(id=f"base-{seed}-{i:06d}", dialogue=dialogue, summary=summary, topic=topic), facts))
    return out


def corrupt(ids: list[int], sentinels: list[int], rng: random.Random, how: Denoising) -> tuple[list[int], list[int]]:
    """(input, target) of span corruption over token ids: spans in the input become sentinels, the target
    lists each sentinel then the span it replaced (T5's objective, at byte granularity)."""
    n = len(ids)
    n_spans = max(1, min(len(sentinels) - 1, round(n * how.noise / how.mean_span)))
    starts = sorted(rng.sample(range(max(1, n - how.mean_span)), n_spans))
    inp: list[int] = []
    tgt: list[int] = []
    pos = 0
    for k, start in enumerate(starts):
        start = max(start, pos)
        if start >= n:
            break
        length = max(1, min(n - start, round(rng.expovariate(1 / how.mean_span))))
        inp += ids[pos:start] + [sentinels[k]]
        tgt += [sentinels[k]] + ids[start:start + length]
        pos = start + length
    inp += ids[pos:]
    return inp, tgt

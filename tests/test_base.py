"""The offline pretrained base: its distribution is not the federated task's, it builds deterministically, it is
cached and checked, and `fedserver simulate` starts from it by default."""
from __future__ import annotations

import dataclasses
import json
import random
import re

import pytest

from fedcore import data as fed_data
from fedcore.config import ConfigError
from fedlab import basecorpus
from fedlab.simulate import SimulateConfig, held_out_line

# A recipe small enough for a test (a few seconds); the code path is the default recipe's.
SMALL = dict(steps=3, batch_size=4, examples=24, held_out=4, warmup_steps=1)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z']+", text))


def test_pretraining_corpus_shares_no_name_topic_or_place_with_the_federated_task():
    chats = basecorpus.dialogue_corpus(3000, seed=0)
    names = {w for c in chats for w in _words(c.example.dialogue) if w[:1].isupper()}
    assert not names & set(fed_data._NAMES), "a federated-task name in the pretraining corpus"
    fed_topics = fed_data._ACTIVITIES
    assert not set(basecorpus.TOPICS) & set(fed_topics)
    fed_phrases = {v for verb, places, objs in fed_topics.values() for v in (verb, *places, *objs)}
    base_text = "\n".join(c.example.dialogue + "\n" + c.example.summary for c in chats)
    shared = sorted(p for p in fed_phrases if re.search(rf"\b{re.escape(p)}\b", base_text))
    assert shared == [], f"federated-task phrases in the pretraining corpus: {shared}"
    # The summaries are worded otherwise: the federated task's "will <verb>" and "brings" never appear.
    assert not any(" will " in c.example.summary or " brings " in c.example.summary for c in chats)
    assert len(names) > 1000, "names are drawn from a large set, so copying beats memorizing"


def test_pretraining_corpus_is_deterministic_and_facts_are_in_the_dialogue():
    a, b = basecorpus.dialogue_corpus(50, seed=3), basecorpus.dialogue_corpus(50, seed=3)
    assert a == b and a != basecorpus.dialogue_corpus(50, seed=4)
    for chat in a:
        who, when, where = (answer for _, answer in chat.facts)
        for name in who.split(" and "):
            assert f"{name}:" in chat.example.dialogue
        assert when.split(" at ")[0] in chat.example.dialogue and where in chat.example.dialogue


@pytest.mark.parametrize("seed", range(20))
def test_span_corruption_loses_nothing(seed):
    rng = random.Random(seed)
    ids = [rng.randrange(3, 259) for _ in range(rng.randrange(1, 400))]
    sentinels = list(range(1000, 1100))
    inp, tgt = basecorpus.corrupt(ids, sentinels, rng, basecorpus.Denoising())
    spans: dict[int, list[int]] = {}
    current = None
    for t in tgt:
        if t in sentinels:
            current = spans.setdefault(t, [])
        else:
            assert current is not None, "the target starts with a sentinel"
            current.append(t)
    rebuilt = [x for t in inp for x in (spans[t] if t in sentinels else [t])]
    assert rebuilt == ids and set(spans) == {t for t in inp if t in sentinels}
    assert all(spans.values()), "every masked span is at least one token"


def test_recipe_key_names_every_setting():
    from fedlab.base import Recipe

    keys = {Recipe().key()}
    for f in dataclasses.fields(Recipe):
        v = getattr(Recipe(), f.name)
        changed = (dataclasses.replace(v, noise=0.2) if f.name == "denoising"
                   else "small" if isinstance(v, str) else v + 1)
        keys.add(dataclasses.replace(Recipe(), **{f.name: changed}).key())
    assert len(keys) == len(dataclasses.fields(Recipe)) + 1


@pytest.mark.slow
def test_building_twice_gives_the_same_digest_and_a_loadable_hf_directory(tmp_path):
    from fedcore.models import build_model, load_tokenizer
    from fedcore.wire import digest
    from fedlab.base import BaseInfo, Recipe, build, load_state_digest

    recipe = Recipe(**SMALL)
    one, two = build(recipe, tmp_path / "one"), build(recipe, tmp_path / "two")
    a, b = BaseInfo.read(one), BaseInfo.read(two)
    assert a.digest == b.digest and a.digest.startswith("sha256:")
    assert load_state_digest(one) == a.digest, "the saved weights are the ones the digest was taken of"
    # A plain Hugging Face directory: the loaders a real FLAN-T5 directory goes through read it.
    assert digest(build_model("tiny", one).state_dict()) == a.digest
    assert load_tokenizer(one)("Hi").input_ids == load_tokenizer(None)("Hi").input_ids
    assert set(a.held_out) == {"n", "summary_loss", "summary_rougeL", "answer_who", "answer_when", "answer_where"}
    other = BaseInfo.read(build(dataclasses.replace(recipe, seed=1), tmp_path / "three"))
    assert other.digest != a.digest, "the digest depends on the recipe"


@pytest.mark.slow
def test_ensure_builds_once_then_reuses_and_rebuilds_a_damaged_cache(tmp_path, monkeypatch):
    from fedlab import base

    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    recipe = base.Recipe(**SMALL)
    lines: list[str] = []
    path, info = base.ensure(recipe, echo=lines.append)
    assert path.parent == tmp_path / "cache" / "base" and "building" in lines[0]
    assert not [p for p in path.parent.glob(".*") if p.is_dir()], "no temporary directory left behind"

    def no_build(*_a, **_k):
        raise AssertionError("an intact cached base was built again")

    monkeypatch.setattr(base, "build", no_build)
    again: list[str] = []
    assert base.ensure(recipe, echo=again.append) == (path, info) and again == []
    with pytest.raises(AssertionError, match="built again"):
        base.ensure(recipe, echo=again.append, force=True)  # `fedserver base --force`

    # A run that starts while another builds waits for that build, then reuses it.
    import fcntl
    import threading

    waited: list[str] = []
    result: list = []
    waiting = threading.Event()

    def echo(line: str) -> None:
        waited.append(line)
        waiting.set()

    with open(path.parent / f".{path.name}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        t = threading.Thread(target=lambda: result.append(base.ensure(recipe, echo=echo)))
        t.start()
        assert waiting.wait(timeout=60)
        assert waited == [f"base: another process is building {base.shown(path)}; waiting for it"] and not result
    t.join(timeout=60)
    assert result == [(path, info)]

    weights = path / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF  # flip a bit of the last tensor's data: still a loadable file, other weights
    weights.write_bytes(bytes(raw))
    monkeypatch.undo()
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    rebuilt: list[str] = []
    path2, info2 = base.ensure(recipe, echo=rebuilt.append)
    assert path2 == path and info2.digest == info.digest
    assert "does not match its recorded digest" in rebuilt[0]


# ---------------------------------------------------------------- simulate
def test_simulate_starts_from_the_base_for_tiny_unless_told_otherwise(tmp_path):
    assert SimulateConfig.of().pretrained_base(), "the default run starts from the pretrained base"
    assert not SimulateConfig.of(base="random").pretrained_base()
    assert not SimulateConfig.of(preset="small").pretrained_base(), "auto: no offline base for small"
    assert not SimulateConfig.of(weights_dir=tmp_path).pretrained_base()
    with pytest.raises(ConfigError, match="built for preset tiny.*--weights-dir.*--base random"):
        SimulateConfig.of(preset="small", base="pretrained")
    with pytest.raises(ConfigError, match="give one"):
        SimulateConfig.of(base="random", weights_dir=tmp_path)
    with pytest.raises(ConfigError, match="base"):
        SimulateConfig.of(base="imagenet")


def test_the_fleet_gives_the_server_and_every_device_the_base(tmp_path, monkeypatch):
    from fedlab import base
    from fedlab.simulate import Fleet

    info = base.BaseInfo(digest="sha256:" + "ab" * 32, recipe=dataclasses.asdict(base.Recipe()), build_s=1.0,
                         parameters=1, torch="x", final_loss=1.0, held_out={})
    made = tmp_path / "the-base"
    made.mkdir()
    monkeypatch.setattr(base, "ensure", lambda **_: (made, info))
    fleet = Fleet(SimulateConfig.of(out=tmp_path / "run", devices=2, devices_per_round=2, insecure=True))
    assert fleet.base_info is info and fleet.cfg.server.weights_dir == made
    assert f'weights_dir = "{made}"' in (tmp_path / "run" / "server.toml").read_text()
    args = fleet.cfg.client_args(1, "127.0.0.1:1")
    assert args[args.index("--weights-dir") + 1] == str(made)
    assert json.loads((tmp_path / "run" / "simulate.json").read_text())["base"] == "auto"


def test_held_out_line_compares_round_zero_with_the_last_round():
    rounds = [dict(round=0, rougeL=14.09, eval_loss=4.1873), dict(round=1, rougeL=20.0, eval_loss=2.0),
              dict(round=8, rougeL=27.9, eval_loss=0.874)]
    assert held_out_line(rounds, "the pretrained base") == (
        "held-out ROUGE-L 14.09 before round 1 (the pretrained base) -> 27.90 after round 8; "
        "eval loss 4.1873 -> 0.8740")
    assert held_out_line(rounds[:1], "x") is None
    assert held_out_line([dict(round=0, rougeL=None, eval_loss=None), rounds[2]], "x") is None


def test_an_unwritable_cache_says_what_to_do(tmp_path, monkeypatch):
    from fedlab import base

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("FEDTUNE_CACHE", str(blocker))
    with pytest.raises(OSError, match="cannot write the pretrained base.*FEDTUNE_CACHE.*--base random"):
        base.ensure(base.Recipe(**SMALL), echo=lambda _: None)


def test_paths_under_home_are_shown_with_a_tilde(tmp_path):
    from pathlib import Path

    from fedlab.base import shown

    assert shown(Path.home() / ".cache" / "fedtune" / "base") == "~/.cache/fedtune/base"
    outside = Path("/") / "srv" / "fedtune"
    if not str(outside.resolve()).startswith(str(Path.home().resolve())):
        assert shown(outside) == str(outside)

"""Samsum loading, the synthetic corpus, and deterministic splits."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedcore.data import (
    DataError,
    Example,
    dirichlet_partition,
    load_corpus,
    load_samsum,
    synthetic_corpus,
    train_eval_split,
)

RECORDS = [
    {"id": "13818513", "dialogue": "Amanda: I baked cookies. Do you want some?\r\nJerry: Sure!",
     "summary": "Amanda baked cookies and will bring Jerry some tomorrow."},
    {"id": 7, "dialogue": "A: hi\nB: hello", "summary": "A and B greet.", "topic": "greeting"},
]


# ---------------------------------------------------------------- loading

def test_load_json_list(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    got = load_samsum(path)
    assert got == [
        Example("13818513", RECORDS[0]["dialogue"], RECORDS[0]["summary"]),
        Example("7", "A: hi\nB: hello", "A and B greet.", "greeting"),
    ]


def test_load_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n", encoding="utf-8")
    assert [e.id for e in load_samsum(path)] == ["13818513", "7"]


def test_empty_dialogue_is_skipped_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(RECORDS + [{"id": "x", "dialogue": "", "summary": "s"}]), encoding="utf-8")
    assert len(load_samsum(path)) == 2


@pytest.mark.parametrize(
    "content, where, what",
    [
        ('{"id": "1", "dialogue": "d", "summary": "s"}\n{"id": "2", "dialogue": "d"}\n', "line 2", "summary"),
        ('{"id": "1", "dialogue": "d", "summary": "s"}\n{"id": "2", "dialogue": \n', "line 2", "invalid JSON"),
        ('[{"id": "1", "dialogue": "d", "summary": "s"}, {"id": "2", "dialogue": 5, "summary": "s"}]',
         "item 1", "'dialogue' must be a string"),
        ('[{"id": "1", "dialogue": "d", "summary": "s"},\n 3]', "item 1", "expected an object"),
        ('[{"id": "1", "dialogue": "d",\n "summary": }]', "line 2", "invalid JSON"),
    ],
)
def test_errors_name_file_place_and_problem(tmp_path: Path, content: str, where: str, what: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_samsum(path)
    msg = str(info.value)
    assert str(path) in msg and where in msg and what in msg
    assert "\n" not in msg
    assert isinstance(info.value, ValueError)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_samsum(tmp_path / "nope.json")


def test_load_corpus_sources(tmp_path: Path) -> None:
    assert load_corpus("builtin", 5, 3) == synthetic_corpus(5, 3)
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    assert len(load_corpus(str(path), 1, 0)) == 1
    assert len(load_corpus(str(path), 0, 0)) == 2


# ---------------------------------------------------------------- synthetic corpus

def test_synthetic_corpus_is_deterministic_and_seeded() -> None:
    assert synthetic_corpus(50, seed=1) == synthetic_corpus(50, seed=1)
    assert synthetic_corpus(50, seed=1) != synthetic_corpus(50, seed=2)
    assert synthetic_corpus(10, seed=1) == synthetic_corpus(50, seed=1)[:10]


def test_synthetic_corpus_shape() -> None:
    ex = synthetic_corpus(2000, seed=0)
    assert len({e.id for e in ex}) == 2000
    # One byte is one token: dialogues fit 512 input tokens, summaries 95 target tokens.
    assert all(120 <= len(e.dialogue.encode()) <= 400 for e in ex)
    assert all(len(e.summary.encode()) <= 90 for e in ex)
    topics = Counter(e.topic for e in ex)
    assert len(topics) >= 6 and min(topics.values()) > 100
    # Several phrasings: many distinct first lines for the same kind of content.
    assert len({e.dialogue.split("\n")[1].split(":")[1][:12] for e in ex}) > 10


def test_synthetic_summary_fills_slots_from_dialogue() -> None:
    for e in synthetic_corpus(200, seed=4):
        speakers = list(dict.fromkeys(line.split(":")[0] for line in e.dialogue.split("\n")))
        assert e.summary.startswith(speakers[0])
        assert all(name in e.summary for name in speakers)
        day = e.summary.split(" on ")[1].split(" at ")[0]
        assert day in e.dialogue


# ---------------------------------------------------------------- splits

def test_train_eval_split() -> None:
    items = list(range(100))
    train, ev = train_eval_split(items, 10, seed=3)
    assert len(ev) == 10 and sorted(train + ev) == items
    assert train == sorted(train) and ev == sorted(ev)
    assert (train, ev) == train_eval_split(items, 10, seed=3)
    assert ev != train_eval_split(items, 10, seed=4)[1]
    with pytest.raises(ValueError):
        train_eval_split(items, 101, seed=0)


def _check_cover(parts: list[list[int]], n: int) -> None:
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))


def test_partition_without_labels() -> None:
    parts = dirichlet_partition(1000, 10, alpha=1.0, seed=0)
    _check_cover(parts, 1000)
    assert parts == dirichlet_partition(1000, 10, alpha=1.0, seed=0)
    assert parts != dirichlet_partition(1000, 10, alpha=1.0, seed=1)
    assert min(len(p) for p in parts) >= 1
    # Dirichlet(1) sizes are uneven; a huge alpha makes them near-equal.
    assert max(len(p) for p in parts) > 2 * min(len(p) for p in parts)
    even = dirichlet_partition(1000, 10, alpha=1e4, seed=0)
    assert max(len(p) for p in even) - min(len(p) for p in even) < 40


def test_partition_with_labels_is_skewed_and_complete() -> None:
    labels = [e.topic for e in synthetic_corpus(1000, seed=0)]
    parts = dirichlet_partition(1000, 10, alpha=0.1, seed=0, labels=labels)
    _check_cover(parts, 1000)
    assert parts == dirichlet_partition(1000, 10, alpha=0.1, seed=0, labels=labels)

    def dominant_share(alpha: float) -> float:
        ps = dirichlet_partition(1000, 10, alpha=alpha, seed=0, labels=labels)
        return sum(Counter(labels[i] for i in p).most_common(1)[0][1] / len(p) for p in ps) / len(ps)

    # Small alpha: each client is dominated by few topics; large alpha: near the global mix (1/8).
    assert dominant_share(0.1) > 0.5
    assert dominant_share(1000.0) < 0.25


def test_partition_min_per_client() -> None:
    labels = [e.topic for e in synthetic_corpus(200, seed=0)]
    parts = dirichlet_partition(200, 20, alpha=0.01, seed=0, labels=labels, min_per_client=5)
    _check_cover(parts, 200)
    assert min(len(p) for p in parts) >= 5
    parts = dirichlet_partition(30, 10, alpha=0.01, seed=0, min_per_client=3)
    assert [len(p) for p in parts] == [3] * 10
    with pytest.raises(ValueError):
        dirichlet_partition(29, 10, min_per_client=3)
    with pytest.raises(ValueError):
        dirichlet_partition(10, 2, labels=["a"] * 9)

"""The routing examples written for this project: size, kinds, balance, labels with reasons, conversations,
no copies of the shared datasets; and the loader's validation of odd files."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest

from sot.eval.dataset import DatasetError
from sot.router.data import dataset_files, digest, load_examples, own_data_dir, parse_examples

SHARED = Path(__file__).parents[1].parent / "shared"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared is not present")
KINDS = {
    "brainstorm", "advice", "compare", "hypothetical", "explain", "procedure", "estimate", "code", "math",
    "puzzle", "classify", "rewrite", "factual", "creative", "roleplay", "constrained", "multi-turn",
}  # fmt: skip


@pytest.fixture(scope="module")
def examples() -> list:  # type: ignore[type-arg]
    return load_examples(own_data_dir())


def test_size_kinds_and_balance(examples: list) -> None:  # type: ignore[type-arg]
    assert len(examples) >= 600
    kinds = collections.Counter(e.kind for e in examples)
    assert set(kinds) == KINDS and min(kinds.values()) >= 20
    share = sum(e.label for e in examples) / len(examples)
    assert 1 / 3 <= share <= 1 / 2  # a realistic balance, not half and half
    # Every kind users send that should be answered normally is represented by normal-labelled examples.
    for kind in ("code", "math", "puzzle", "estimate", "classify", "rewrite", "factual", "creative", "procedure"):
        assert sum(not e.label for e in examples if e.kind == kind) >= 20, kind


def test_every_example_has_an_id_a_label_and_a_one_line_reason(examples: list) -> None:  # type: ignore[type-arg]
    ids = [e.id for e in examples]
    assert len(set(ids)) == len(ids)
    for e in examples:
        assert isinstance(e.label, bool)
        assert e.reason.strip() and "\n" not in e.reason and len(e.reason) <= 80, e.id
        assert e.question.strip(), e.id
    questions = [e.question for e in examples if not e.multi_turn]
    assert len(set(questions)) == len(questions)


def test_conversations_end_with_the_turn_they_are_labelled_for(examples: list) -> None:  # type: ignore[type-arg]
    conversations = [e for e in examples if e.multi_turn]
    assert len(conversations) >= 36
    assert all(e.kind == "multi-turn" and e.messages[-1].role == "user" for e in conversations)
    assert sum(e.messages[0].role == "system" for e in conversations) >= 4
    assert 0.3 <= sum(e.label for e in conversations) / len(conversations) <= 0.6


def test_the_data_ships_with_its_licence_and_readme() -> None:
    readme = (own_data_dir() / "README.md").read_text(encoding="utf-8")
    assert "CC0" in readme and "How they were labelled" in readme
    assert len(dataset_files(own_data_dir())) == 5 and len(digest([own_data_dir()])) == 64


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


@needs_shared
def test_nothing_was_copied_from_the_shared_datasets(examples: list) -> None:  # type: ignore[type-arg]
    shared = []
    for name in ("lima_router.jsonl", "vicuna80.jsonl"):
        lines = (SHARED / "data" / name).read_text(encoding="utf-8").splitlines()
        shared += [_words(json.loads(line)["question"]) for line in lines if line.strip()]
    for e in examples:
        mine = _words(e.question)
        closest = max(len(mine & theirs) / len(mine | theirs) for theirs in shared if mine | theirs)
        assert closest < 0.7, e.id


def test_loader_reads_both_label_fields_and_conversations() -> None:
    lines = [
        '{"id": "a", "question": "Tips?", "sot_suitable": true, "category": "generic"}',
        '{"question": "2+2?", "label": false}',
        '{"question": "Unlabelled?"}',
        json.dumps(
            {
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
                "label": False,
            }
        ),
    ]
    a, b, c = parse_examples(lines, "x.jsonl")
    assert (a.id, a.kind, a.label, a.question) == ("a", "generic", True, "Tips?")
    assert b.id == "x-2" and b.label is False
    assert c.multi_turn and c.question == "Why?" and c.messages[0].role == "system"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"question": "Hi?", "label": "yes"}', "true or false"),
        ('{"label": true}', "'question'"),
        ('{"messages": [], "label": true}', "non-empty list"),
        (
            '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "label": true}',
            "end",
        ),
        ('{"messages": [{"role": "robot", "content": "Hi"}], "label": true}', "role"),
        ("not json", "not valid JSON"),
    ],
)
def test_loader_names_the_bad_line(line: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        parse_examples(["", line], "bad.jsonl")


def test_loader_errors_for_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_examples(tmp_path / "absent.jsonl")
    with pytest.raises(DatasetError, match=r"no \.jsonl"):
        load_examples(tmp_path)

"""Evaluation datasets: JSONL questions loaded and validated with line-numbered errors (no answering here).

One JSON object a line: `question` (required), and optionally `id`, `category` and `sot_suitable` (a human
label: does this question suit a skeleton answer; the router is scored against it). Blank lines are
skipped. A question without an `id` gets one derived from its text, so resuming a run still finds it after
lines are added or reordered.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sot.errors import InputError

DEFAULT_CATEGORY = "uncategorized"


class DatasetError(InputError):
    """The dataset file cannot be used as given; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Question:
    """One question of a dataset."""

    id: str
    question: str
    category: str = DEFAULT_CATEGORY
    sot_suitable: bool | None = None


def question_id(text: str) -> str:
    """A stable id for a question that has none: a short hash of its text.

    >>> question_id("How are you?")
    'q-df287dfc14'
    """
    return "q-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def json_objects(
    lines: Iterable[str], source: str, error: type[Exception] = DatasetError
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line number, "source:line", object) for each non-blank JSONL line; `error` names the bad line."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise error(f"{where}: each line must be a JSON object, not {type(row).__name__}")
        yield number, where, row


def parse_dataset(lines: Iterable[str], source: str = "<dataset>") -> list[Question]:
    """Questions from JSONL lines; raises `DatasetError` naming `source` and the line number."""
    questions: list[Question] = []
    seen: dict[str, int] = {}
    for number, where, row in json_objects(lines, source):
        text = row.get("question")
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{where}: 'question' must be a non-empty string")
        text = text.strip()
        raw_id = row.get("id")
        if raw_id is None:
            qid = question_id(text)
        elif isinstance(raw_id, str | int) and not isinstance(raw_id, bool) and str(raw_id).strip():
            qid = str(raw_id).strip()
        else:
            raise DatasetError(f"{where}: 'id' must be a non-empty string or an integer")
        if qid in seen:
            raise DatasetError(f"{where}: duplicate id {qid!r} (first on line {seen[qid]})")
        seen[qid] = number
        category = row.get("category", DEFAULT_CATEGORY)
        if category is None:
            category = DEFAULT_CATEGORY
        if not isinstance(category, str) or not category.strip():
            raise DatasetError(f"{where}: 'category' must be a non-empty string")
        suitable = row.get("sot_suitable")
        if suitable is not None and not isinstance(suitable, bool):
            raise DatasetError(f"{where}: 'sot_suitable' must be true, false or null")
        questions.append(Question(id=qid, question=text, category=category.strip(), sot_suitable=suitable))
    if not questions:
        raise DatasetError(f"{source}: no questions")
    return questions


def load_dataset(path: str | os.PathLike[str]) -> list[Question]:
    """Read and validate a JSONL dataset file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{file}: no such dataset file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{file}: cannot read it ({exc})") from None
    return parse_dataset(text.splitlines(), source=str(file))


def select(
    questions: Sequence[Question],
    *,
    ids: Sequence[str] = (),
    categories: Sequence[str] = (),
    limit: int | None = None,
    per_category: int | None = None,
    suitable_only: bool = False,
) -> list[Question]:
    """A subset, in dataset order: by id, by category, labelled suitable for SoT (not labelled unsuitable),
    the first `per_category` of each, then the first `limit`."""
    chosen = [q for q in questions if not (suitable_only and q.sot_suitable is False)]
    if ids:
        known = {q.id for q in chosen}
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise DatasetError(f"unknown question id(s): {', '.join(unknown)}")
        wanted = set(ids)
        chosen = [q for q in chosen if q.id in wanted]
    if categories:
        wanted = set(categories)
        chosen = [q for q in chosen if q.category in wanted]
    if per_category is not None:
        taken: dict[str, int] = {}
        kept: list[Question] = []
        for q in chosen:
            if taken.get(q.category, 0) < per_category:
                taken[q.category] = taken.get(q.category, 0) + 1
                kept.append(q)
        chosen = kept
    if limit is not None:
        chosen = chosen[:limit]
    return chosen

"""Replayed answer shapes for the test upstream: per question, the token counts a real model's answers had.

A `sot eval run` results file holds, for each question, a normal answer and a SoT answer (its skeleton and
each point's expansion, with their token counts). `ReplayBook.load` keeps only those counts, as an
`AnswerShape` per question that has both: the normal answer's tokens, the skeleton's (the SoT answer's
tokens minus its points'), and each point's. With ``--replay FILE`` the test upstream answers a request for
a known question with that question's lengths: a full answer gets the normal answer's tokens, a skeleton
gets as many points (and about as many tokens) as the real skeleton, and point k gets point k's tokens.
Timing stays the upstream's (``--ttft``, ``--tokens-per-second``), so `sot bench --replay FILE` estimates
question by question what SoT buys on an API that streams at that rate, from answers a real model wrote.

A request is matched to a question by the question's text appearing in one of its user messages (the
latest such message wins, so few-shot examples earlier in the prompt do not match); the point being
expanded is read from "point N" in the last user message or from a continued "N. ..." reply. Requests
that match nothing get the upstream's usual lengths.
"""

from __future__ import annotations

import os
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sot.errors import InputError
from sot.eval.records import AnswerRecord, load_records
from sot.testing.upstream_answers import Msg
from sot.testing.upstream_options import Kind

_POINT_REF = re.compile(r"\bpoint\s*#?\s*(\d+)", re.IGNORECASE)
_NUMBERED_PREFILL = re.compile(r"(?:^|\n)\s*(\d+)\.[ \t]*\S[^\n]*$")


@dataclass(frozen=True, slots=True)
class AnswerShape:
    """The token counts of one question's real answers."""

    question_id: str
    category: str
    question: str
    sot_suitable: bool | None
    normal_tokens: int
    skeleton_tokens: int
    point_tokens: tuple[int, ...]

    def skeleton_words(self) -> list[int]:
        """Words after each point's number, so that numbers and words add up to the skeleton's tokens.

        >>> AnswerShape("q", "c", "Q?", None, 100, 20, (10, 12, 9)).skeleton_words()
        [6, 6, 5]
        """
        points = len(self.point_tokens)
        words = max(points, self.skeleton_tokens - points)  # each line's number is a token of its own
        return [words // points + (1 if i < words % points else 0) for i in range(points)]

    def point(self, index: int) -> int:
        """Tokens of point `index` (1-based); the median point for an index the real answer did not have."""
        if 1 <= index <= len(self.point_tokens):
            return self.point_tokens[index - 1]
        return round(statistics.median(self.point_tokens))


@dataclass(frozen=True, slots=True)
class ReplayLengths:
    """What one request should get: a skeleton's points and words per point, or a prose answer's tokens."""

    points: int | None = None
    skeleton_words: tuple[int, ...] | None = None
    tokens: int | None = None


def shape_of(normal: AnswerRecord, sot: AnswerRecord) -> AnswerShape | None:
    """One question's shape from its normal and SoT records; None unless both succeeded and SoT had points."""
    if normal.result is None or sot.result is None or sot.result.mode_used != "sot":
        return None
    points = sorted(sot.result.stats.points, key=lambda p: p.index)
    point_tokens = tuple(max(1, p.tokens) for p in points)
    if not point_tokens or normal.result.stats.completion_tokens < 1:
        return None
    skeleton = sot.result.stats.completion_tokens - sum(point_tokens)
    return AnswerShape(
        question_id=sot.question_id,
        category=sot.category,
        question=sot.question,
        sot_suitable=sot.sot_suitable,
        normal_tokens=normal.result.stats.completion_tokens,
        skeleton_tokens=max(2 * len(point_tokens), skeleton),
        point_tokens=point_tokens,
    )


class ReplayBook:
    """The answer shapes of a results file, and the lengths they give each request."""

    def __init__(self, shapes: Sequence[AnswerShape]) -> None:
        self.shapes = tuple(shapes)
        # Longest question first: a question that contains another one must win the match.
        self._by_length = sorted(self.shapes, key=lambda s: len(s.question), reverse=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReplayBook:
        """The shapes of every question with a successful normal and SoT answer in a `sot eval run` file."""
        records = load_records(path, AnswerRecord)
        ok = {r.key: r for r in records.ok}
        shapes = []
        for (question_id, mode), record in ok.items():
            normal = ok.get((question_id, "normal"))
            if mode == "sot" and normal is not None and (shape := shape_of(normal, record)) is not None:
                shapes.append(shape)
        if not shapes:
            raise InputError(f"{path}: no question with both a normal and a SoT answer to replay")
        return cls(shapes)

    def questions(self, *, only_suitable: bool = True, limit: int | None = None) -> list[dict[str, Any]]:
        """The replayed questions as `sot bench` rows (id, category, question), in file order."""
        rows = [
            {"id": s.question_id, "category": s.category, "question": s.question}
            for s in self.shapes
            if not (only_suitable and s.sot_suitable is False)
        ]
        return rows[:limit] if limit else rows

    def find(self, messages: Sequence[Msg]) -> AnswerShape | None:
        """The shape whose question appears in the latest user message that holds one."""
        for message in reversed(messages):
            if message.role != "user":
                continue
            for shape in self._by_length:
                if shape.question in message.content:
                    return shape
        return None

    def lengths(self, messages: Sequence[Msg], kind: Kind) -> ReplayLengths | None:
        """The lengths a request of this kind gets, or None for a question the book does not know."""
        shape = self.find(messages)
        if shape is None:
            return None
        if kind == "skeleton":
            return ReplayLengths(points=len(shape.point_tokens), skeleton_words=tuple(shape.skeleton_words()))
        if kind == "full":
            return ReplayLengths(tokens=shape.normal_tokens)
        index = point_index(messages)
        return ReplayLengths(tokens=shape.point(index if index is not None else 0))


def point_index(messages: Sequence[Msg]) -> int | None:
    """Which point a request expands: "point N" in its last user message, or a continued "N. ..." reply.

    >>> point_index([Msg("user", "Now expand point 3, briefly.")])
    3
    >>> point_index([Msg("user", "Explain each point."), Msg("assistant", "2. Use caching:")])
    2
    """
    last = messages[-1]
    if last.role == "assistant":
        numbered = _NUMBERED_PREFILL.search(last.content)
        if numbered:
            return int(numbered.group(1))
    last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
    found = _POINT_REF.search(last_user)
    return int(found.group(1)) if found else None

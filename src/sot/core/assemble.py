"""Assemble point expansions into the final answer, removing what the model repeated of each prefix.

Pure string functions. They do not decide whether a point is complete: truncation is tracked by the engine
and reported beside the answer, never hidden inside it.

>>> clean_point_text(2, "Eat greens", "2. Eat greens: Leafy vegetables help.")
'Leafy vegetables help.'
>>> assemble_answer(["Sleep", "Eat greens"], ["Aim for 8 hours.", "Leafy vegetables help."])
'1. Sleep: Aim for 8 hours.\\n2. Eat greens: Leafy vegetables help.'
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NUMBER_PREFIX = re.compile(r"^\s*(?:\*\*)?\s*\d{1,3}\s*[.)]\s*")
_SEPARATOR = re.compile(r"^\s*(?:\*\*)?\s*[:：\-–—]\s*")
_NEXT_POINT = re.compile(r"\n\s*\d{1,3}[.)]\s")


def _strip_point_echo(text: str, point: str) -> str:
    """Drop a leading copy of the point's own text (case-insensitive, tolerant of bold markers)."""
    probe = text.lstrip().lstrip("*").lstrip()
    if probe.casefold().startswith(point.casefold()):
        return probe[len(point) :].lstrip("*")
    return text


def clean_point_text(index: int, point: str, raw: str) -> str:
    """The expansion of point `index`, without the number, point text or separator the model echoed.

    `raw` is whatever the model wrote after the prefill (or the whole reply, for instruction-style
    prompts, where the model is asked to start with "{index}. {point}").
    """
    text = raw.replace("\r\n", "\n")
    cut = _NEXT_POINT.search(text)
    if cut:
        text = text[: cut.start()]  # the model went on to the next point: that is not ours
    numbered = _NUMBER_PREFIX.match(text)
    if numbered:
        text = text[numbered.end() :]
    text = _strip_point_echo(text, point)
    text = _SEPARATOR.sub("", text, count=1)
    return text.strip()


def format_point(index: int, point: str, expansion: str) -> str:
    """One item of the answer: its number, its skeleton text, then its expansion.

    An expansion that runs over several lines (a model that starts a sub-list) is indented under its
    item, so the answer stays one numbered list instead of lines that look like points of their own.

    >>> format_point(5, "Use apps", "Two kinds:\\na) Timers\\n b) Trackers")
    '5. Use apps: Two kinds:\\n   a) Timers\\n   b) Trackers'
    """
    if not expansion:
        return f"{index}. {point}"
    joiner = " " if point.endswith((".", ":", "?", "!")) else ": "
    first, *rest = expansion.split("\n")
    body = "\n".join([first, *(f"   {line.strip()}" if line.strip() else "" for line in rest)])
    return f"{index}. {point}{joiner}{body}"


def assemble_answer(points: Sequence[str], expansions: Sequence[str]) -> str:
    """Join the expanded points in skeleton order, one numbered paragraph each."""
    if len(points) != len(expansions):
        raise ValueError(f"{len(points)} points but {len(expansions)} expansions")
    return "\n".join(format_point(i, p, e) for i, (p, e) in enumerate(zip(points, expansions, strict=True), start=1))

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

# The number the model echoed ("2.", "**2)"). Whitespace runs are possessive and never adjacent, so a match
# or a failure is decided in one pass (the old `\s*(?:\*\*)?\s*` backtracked quadratically on long blanks).
NUMBER_PREFIX = re.compile(r"\s*+(?:\*\*\s*+)?\d{1,3}\s*+[.)]\s*+")
# The separator after the echoed point ("Eat greens: ...", "Eat greens** - ...").
SEPARATOR = re.compile(r"\s*+(?:\*\*\s*+)?[:：\-–—]\s*+")
# A maximal run of whitespace followed by a number marker: where it holds a newline, the next point starts.
_RUN_BEFORE_MARKER = re.compile(r"(?<!\s)\s++(?=\d{1,3}[.)]\s)")
_SPACE = re.compile(r"\s*+")
_STARS = re.compile(r"\**+")


def skip_space(text: str, at: int) -> int:
    """Index of the first non-whitespace character of `text` at or after `at` (len(text) if none)."""
    match = _SPACE.match(text, at)
    return match.end() if match else at


def skip_stars(text: str, at: int) -> int:
    """Index of the first character of `text` at or after `at` that is not `*`."""
    match = _STARS.match(text, at)
    return match.end() if match else at


def find_next_point(text: str, start: int = 0) -> int | None:
    """Index of the newline where the model went on to write the next point ("...\\n2. "), or None.

    That is the first newline of the first whitespace run (beginning at or after `start`) that holds a newline
    and is followed by a number marker and whitespace.
    """
    for run in _RUN_BEFORE_MARKER.finditer(text, start):
        newline = text.find("\n", run.start(), run.end())
        if newline >= 0:
            return newline
    return None


def probe_start(text: str, at: int) -> int:
    """Where an echo of the point would start: after whitespace, `*` markers, whitespace."""
    return skip_space(text, skip_stars(text, skip_space(text, at)))


def clean_normalized(point: str, text: str) -> str:
    """`clean_point_text` for a text whose "\\r\\n" are already "\\n"."""
    cut = find_next_point(text)
    if cut is not None:
        text = text[:cut]  # the model went on to the next point: that is not ours
    numbered = NUMBER_PREFIX.match(text)
    at = numbered.end() if numbered else 0
    # A leading copy of the point's own text (case-insensitive, tolerant of bold markers).
    probe = probe_start(text, at)
    if len(text) - probe >= len(point) and text[probe : probe + len(point)].casefold() == point.casefold():
        at = skip_stars(text, probe + len(point))
    separator = SEPARATOR.match(text, at)
    if separator:
        at = separator.end()
    return text[at:].strip()


def clean_point_text(index: int, point: str, raw: str) -> str:
    """The expansion of point `index`, without the number, point text or separator the model echoed.

    `raw` is whatever the model wrote after the prefill (or the whole reply, for instruction-style
    prompts, where the model is asked to start with "{index}. {point}"). The result has no leading or trailing
    whitespace of any kind. Linear in the length of `raw`; `sot.core.live.LivePoint` computes it while `raw`
    streams.

    >>> clean_point_text(1, "Sleep", " **Sleep**: Aim for 8 hours. \\u2028\\n2. Eat")
    'Aim for 8 hours.'
    """
    return clean_normalized(point, raw.replace("\r\n", "\n"))


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

"""Parse a model's skeleton (a numbered list of short points) into clean point texts.

Robust where the reference implementation is not: accepts `1.` / `1)` / `-` / `*` / `•` markers, points
that wrap onto the next line, duplicate and out-of-order numbers, a preamble line, decimals such as
`3.5 million` (never a point), and indented sub-points (folded into their parent rather than dropped).
It stops at a runaway skeleton (a new "Question:", a list that restarts at 1, prose after a blank line)
and caps the number of points and each point's length. Whitespace inside a point (tabs, Unicode line separators,
NEL...) becomes single spaces. Linear in the text. It does not judge whether points are good.

>>> parse_skeleton("Here is a plan:\\n1. Sleep well\\n2) Eat *greens*\\n   - kale\\n3. Move").points
('Sleep well', 'Eat greens (kale)', 'Move')
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

DEFAULT_MAX_POINTS = 10
DEFAULT_MAX_POINT_CHARS = 120

# A list item: optional indent, then a number with `.` or `)` followed by space (so "3.5 million" is not
# one), or a bullet. Letters ("a)") and dotted numbers ("1.2") only ever mark sub-points.
_ITEM = re.compile(
    r"^(?P<indent>[ \t]*)(?:(?P<num>\d{1,3})[.)](?=\s|$)|(?P<sub>\d{1,3}\.\d{1,3}\.?|[a-zA-Z][.)])(?=\s)"
    r"|(?P<bullet>[-*•+]))[ \t]*(?P<text>.*)$"
)
# Lines that mean the model has left the skeleton and started a new exchange.
_RUNAWAY = re.compile(
    r"^\s*(?:#+\s*)?(?:question|skeleton|q|a|user|assistant|answer|human|now,? please)\s*[:：]"
    r"|^\s*\[ROLESWITCHING",
    re.IGNORECASE,
)
_TEMPLATE_TOKEN = re.compile(r"<\|(?:im_end|im_start|endoftext|eot_id)\|>|</s>")
_MARKUP = re.compile(r"\*\*|__|`|(?<!\w)\*(?!\s)|(?<=\S)\*(?!\w)")


@dataclass(frozen=True, slots=True)
class SkeletonParse:
    """The outcome of parsing: the points, and whether the text showed the skeleton is over.

    `ended` lets a streaming caller stop generation early: it is true once a line was seen that cannot
    belong to the skeleton (a runaway question, a restarted list, prose after the list, the point cap).
    """

    points: tuple[str, ...]
    ended: bool


@dataclass(slots=True)
class _Item:
    parts: list[str]  # the marker line's text, then any wrapped lines
    subs: list[list[str]]  # each sub-point's lines
    closed: bool = False


def _clean(text: str) -> str:
    """`text` without markup, with each run of whitespace (tabs, Unicode separators, NEL...) as one space."""
    return " ".join(_MARKUP.sub("", text).split()).rstrip(" .;,")


# Words a point cannot end on: where one does, the point was cut mid-phrase (by a length cap, or by a
# streaming caller that cut a sentence-long point), and the word only dangles.
# fmt: off
_DANGLING = frozenset({
    "a", "an", "the", "and", "or", "but", "nor", "so", "that", "which", "who", "whose", "whom", "of", "to",
    "for", "at", "with", "by", "from", "as", "than", "like", "such", "is", "are", "was", "were", "be", "can",
    "could", "will", "would", "may", "might", "its", "their", "your", "our", "my", "his", "her", "this", "these",
    "those", "when", "where", "while", "because", "if",
})
# fmt: on
_CUT_PUNCTUATION = ",;:."


def _drop_dangling(text: str) -> str:
    """`text` without trailing words that cannot end a phrase (at least one word is kept), nor the
    punctuation left before them.

    >>> _drop_dangling("It can process information in multiple dimensions at")
    'It can process information in multiple dimensions'
    >>> _drop_dangling("Plan ahead with the: details"), _drop_dangling("Plan ahead for the ;")
    ('Plan ahead with the: details', 'Plan ahead')
    >>> _drop_dangling("Sign in"), _drop_dangling("The")
    ('Sign in', 'The')
    """
    words = text.split()
    while len(words) > 1:
        word = words[-1].casefold().strip(_CUT_PUNCTUATION)
        if word and word not in _DANGLING:
            break
        words.pop()  # a dangling word, or punctuation alone
    return " ".join(words).rstrip(" " + _CUT_PUNCTUATION)


def _cap(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars`, at a space where there is one."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0]
    return (cut or text[:max_chars]).rstrip(" ,;:")


def _indent_width(indent: str) -> int:
    return len(indent.expandtabs(4))


class _Parser:
    """The line-by-line state of `parse_skeleton`: a point is finished when the next one starts."""

    def __init__(self, max_points: int, max_point_chars: int) -> None:
        self.max_points, self.max_point_chars = max_points, max_point_chars
        self.points: list[str] = []
        self.keys: set[str] = set()  # the points, casefolded
        self.heads: set[str] = set()  # the marker lines' texts, casefolded: a repeated one is skipped
        self.item: _Item | None = None  # the latest point
        self.items = 0
        self.first_indent = 0
        self.top_kind: str | None = None  # "num" or "bullet": the marker style of the first point
        self.last_num = 0
        self.blank_before = False

    def line(self, raw: str) -> bool:
        """Read one line; True once it shows the skeleton is over."""
        if not raw.strip():
            self.blank_before = True
            return False
        if _RUNAWAY.search(raw):
            return self.item is not None  # a "Skeleton:" header before the list is harmless
        match = _ITEM.match(raw)
        # "1.1 fruit" under point 1 is a sub-point; "3.5 million" under point 1 is just text.
        sub = match["sub"] if match is not None else None
        if sub and "." in sub[:-1] and (self.item is None or int(sub.split(".")[0]) != self.last_num):
            match = None
        if match is None:
            return self._text(raw)
        return self._marker(match)

    def _text(self, raw: str) -> bool:
        if self.item is None:
            self.blank_before = False
            return False  # preamble before the first point
        if self.blank_before:
            return True  # prose after the list: the skeleton is over
        # A wrapped line: it continues the latest point (or its latest sub-point).
        extra = _clean(raw)
        if extra:
            (self.item.subs[-1] if self.item.subs else self.item.parts).append(extra)
        return False

    def _marker(self, match: re.Match[str]) -> bool:
        indent = _indent_width(match["indent"])
        kind = "num" if match["num"] else "bullet" if match["bullet"] else "sub"
        body = _clean(match["text"])
        if self.item is None and kind == "sub":
            return False
        if self.item is not None and (kind == "sub" or kind != self.top_kind or indent > self.first_indent):
            if body:
                self.item.subs.append([body])
            self.blank_before = False
            return False
        if kind == "num":
            number = int(match["num"])
            if number == 1 and self.last_num >= 2 and (self.blank_before or self.items >= 2):
                return True  # the list restarted: the model began a new answer
            self.last_num = number
        self.blank_before = False
        key = body.casefold()
        if body and key in self.heads:
            return False
        self.close()
        if len(self.points) >= self.max_points:
            return True  # the point cap (an empty marker counts: a following line may fill it)
        if self.item is None:
            self.top_kind, self.first_indent = kind, indent
        if body:
            self.heads.add(key)
        self.item = _Item(parts=[body] if body else [], subs=[])
        self.items += 1
        return False

    def close(self) -> None:
        """Finish the latest point: join its lines and sub-points, cap it, keep it unless empty or repeated."""
        item = self.item
        if item is None or item.closed:
            return
        item.closed = True
        text = " ".join(item.parts)
        if item.subs:
            subs = "; ".join(" ".join(lines) for lines in item.subs)
            text = f"{text} ({subs})" if text else subs
        text = _clean(text)
        if text:
            text = _drop_dangling(_cap(text, self.max_point_chars))
        key = text.casefold()
        if text and key not in self.keys and len(self.points) < self.max_points:
            self.keys.add(key)
            self.points.append(text)


def parse_skeleton(
    text: str,
    *,
    max_points: int = DEFAULT_MAX_POINTS,
    max_point_chars: int = DEFAULT_MAX_POINT_CHARS,
    final: bool = True,
) -> SkeletonParse:
    """Extract the skeleton's points from `text` (which should include any prefilled "1.").

    With `final=False` the last line is treated as still being written: it is not parsed, so a
    streaming caller can call this after every chunk. Linear in the length of `text`.
    """
    ended_by_token = False
    cut = _TEMPLATE_TOKEN.search(text)
    if cut:
        text, final, ended_by_token = text[: cut.start()], True, True  # the reply is over
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if not final:
        lines = lines[:-1]
    parser = _Parser(max_points, max_point_chars)
    ended = any(parser.line(raw) for raw in lines)
    parser.close()
    return SkeletonParse(points=tuple(parser.points), ended=ended or ended_by_token)


_OPEN_ITEM = re.compile(r"[ \t]*(\d{1,3})[.)][ \t]+")
_WORD = re.compile(r"\S+")


def overlong_point(text: str, max_words: int) -> tuple[int, int] | None:
    """If the line being written is a numbered point with more than `max_words` words: (index just after its
    `max_words`-th word, the point's number); else None.

    Small models sometimes write whole sentences as skeleton points, which makes the skeleton, the slowest
    sequential part of SoT, several times longer. A streaming caller can cut such a line here, then end
    the skeleton or start the next point itself.

    >>> text = "1. Sleep\\n2. Quantum computing is a field that uses quantum"
    >>> overlong_point(text, 6)
    (45, 2)
    >>> text[:45]
    '1. Sleep\\n2. Quantum computing is a field that'
    >>> overlong_point("1. Sleep well", 6) is None, overlong_point(text, 0) is None
    (True, True)
    """
    if max_words < 1:
        return None  # no limit
    start = text.rfind("\n") + 1
    item = _OPEN_ITEM.match(text, start)
    if item is None:
        return None
    ends = [word.end() for word in itertools.islice(_WORD.finditer(text, item.end()), max_words + 1)]
    if len(ends) <= max_words:
        return None
    return ends[max_words - 1], int(item.group(1))

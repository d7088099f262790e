"""Parse a model's skeleton (a numbered list of short points) into clean point texts.

Robust where the reference implementation is not: accepts `1.` / `1)` / `-` / `*` / `•` markers, points
that wrap onto the next line, duplicate and out-of-order numbers, a preamble line, decimals such as
`3.5 million` (never a point), and indented sub-points (folded into their parent rather than dropped).
It stops at a runaway skeleton (a new "Question:", a list that restarts at 1, prose after a blank line)
and caps the number of points and each point's length. It does not judge whether points are good.

>>> parse_skeleton("Here is a plan:\\n1. Sleep well\\n2) Eat *greens*\\n   - kale\\n3. Move").points
('Sleep well', 'Eat greens (kale)', 'Move')
"""

from __future__ import annotations

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
    text: str
    indent: int
    subs: list[str]


def _clean(text: str) -> str:
    text = _MARKUP.sub("", text).strip()
    return text.rstrip(" .;,").strip()


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


def _drop_dangling(text: str) -> str:
    """`text` without trailing words that cannot end a phrase (at least one word is kept).

    >>> _drop_dangling("It can process information in multiple dimensions at")
    'It can process information in multiple dimensions'
    >>> _drop_dangling("Sign in"), _drop_dangling("The")
    ('Sign in', 'The')
    """
    words = text.split(" ")
    while len(words) > 1 and words[-1].casefold().strip(",;:") in _DANGLING:
        words.pop()
    return " ".join(words).rstrip(" ,;:")


def _cap(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0]
    return (cut or text[:max_chars]).rstrip(" ,;:")


def _indent_width(indent: str) -> int:
    return len(indent.expandtabs(4))


def parse_skeleton(
    text: str,
    *,
    max_points: int = DEFAULT_MAX_POINTS,
    max_point_chars: int = DEFAULT_MAX_POINT_CHARS,
    final: bool = True,
) -> SkeletonParse:
    """Extract the skeleton's points from `text` (which should include any prefilled "1.").

    With `final=False` the last line is treated as still being written: it is not parsed, so a
    streaming caller can call this after every chunk.
    """
    ended_by_token = False
    cut = _TEMPLATE_TOKEN.search(text)
    if cut:
        text, final, ended_by_token = text[: cut.start()], True, True  # the reply is over
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if not final:
        lines = lines[:-1]
    items: list[_Item] = []
    top_kind: str | None = None  # "num" or "bullet": the marker style of the first point
    last_num = 0
    seen: set[str] = set()
    blank_before = False
    ended = False
    for raw in lines:
        if not raw.strip():
            blank_before = True
            continue
        if _RUNAWAY.search(raw):
            if items:
                ended = True
                break
            continue  # a "Skeleton:" header before the list is harmless
        match = _ITEM.match(raw)
        # "1.1 fruit" under point 1 is a sub-point; "3.5 million" under point 1 is just text.
        sub = match["sub"] if match is not None else None
        if sub and "." in sub[:-1] and (not items or int(sub.split(".")[0]) != last_num):
            match = None
        if match is None:
            if items and not blank_before:
                # A wrapped line: it continues the latest point (or its latest sub-point).
                target = items[-1]
                extra = _clean(raw)
                if extra:
                    if target.subs:
                        target.subs[-1] = f"{target.subs[-1]} {extra}"
                    else:
                        target.text = f"{target.text} {extra}".strip()
                continue
            if items:
                ended = True  # prose after the list: the skeleton is over
                break
            blank_before = False
            continue  # preamble before the first point
        indent = _indent_width(match["indent"])
        kind = "num" if match["num"] else "bullet" if match["bullet"] else "sub"
        body = _clean(match["text"])
        is_sub = bool(items) and (kind == "sub" or kind != top_kind or indent > items[0].indent)
        if kind == "sub" and not items:
            continue
        if is_sub:
            if body:
                items[-1].subs.append(body)
            blank_before = False
            continue
        if top_kind is None:
            top_kind = kind
        if kind == "num":
            number = int(match["num"])
            if number == 1 and last_num >= 2 and (blank_before or len(items) >= 2):
                ended = True  # the list restarted: the model began a new answer
                break
            last_num = number
        blank_before = False
        key = body.casefold()
        if not body:
            # An empty marker line; a following wrapped line may still fill it.
            items.append(_Item(text="", indent=indent, subs=[]))
            continue
        if key in seen:
            continue
        seen.add(key)
        if sum(1 for item in items if item.text) >= max_points:
            ended = True
            break
        items.append(_Item(text=body, indent=indent, subs=[]))

    points: list[str] = []
    for item in items:
        text_ = item.text
        if item.subs:
            subs = "; ".join(item.subs)
            text_ = f"{text_} ({subs})" if text_ else subs
        text_ = _clean(text_)
        if text_:
            text_ = _drop_dangling(_cap(text_, max_point_chars))
        if not text_ or text_.casefold() in {p.casefold() for p in points}:
            continue
        points.append(text_)
    return SkeletonParse(points=tuple(points[:max_points]), ended=ended or ended_by_token)


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
    >>> overlong_point("1. Sleep well", 6) is None
    True
    """
    start = text.rfind("\n") + 1
    item = _OPEN_ITEM.match(text, start)
    if item is None:
        return None
    ends = [word.end() for word in _WORD.finditer(text, item.end())]
    if len(ends) <= max_words:
        return None
    return ends[max_words - 1], int(item.group(1))

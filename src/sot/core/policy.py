"""SoT's decisions, as pure functions: which skeleton points to keep, when a skeleton is prose, how to share
a token budget, and when to give up on SoT for normal decoding.

The engine calls these and only orchestrates; the reference implementation (`sot.engine.reference`) calls
the same ones, so both answer alike.

>>> keep_points(["Sleep", "Eat greens", "Mo"], finish="length", ended=False, started=0)
['Sleep', 'Eat greens']
>>> too_few_points(["Sleep"], min_points=2)
'the skeleton had 1 usable point(s); at least 2 are needed'
>>> point_budget(None, point_max_tokens=160, points=4)
160
>>> point_budget(100, point_max_tokens=160, points=4)
25
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sot.core.skeleton import overlong_point

# Where a skeleton's points run into prose, it is cut at this many points (the prompts ask for 3 to 8).
POINTS_BEFORE_PROSE_ENDS = 3


def keep_points(points: Sequence[str], *, finish: str, ended: bool, started: int) -> list[str]:
    """The skeleton's usable points: the last one goes when the token limit cut it mid-line.

    `started` points are already being expanded (overlap mode): they stay whatever happens.
    """
    kept = list(points)
    if finish == "length" and not ended and len(kept) > started:
        kept.pop()
    return kept


def too_few_points(points: Sequence[str], *, min_points: int) -> str | None:
    """The fallback reason when a skeleton has too few points for SoT to pay off; else None."""
    if len(points) < min_points:
        return f"the skeleton had {len(points)} usable point(s); at least {min_points} are needed"
    return None


@dataclass(frozen=True, slots=True)
class SkeletonCut:
    """Where a prose skeleton line is cut, and what the skeleton continues with (the next number, or nothing)."""

    end: int  # index in the candidate text just after the last allowed word
    marker: str  # "\n4." to prefill the next point, or "" when the skeleton ends at the cut

    @property
    def goes_on(self) -> bool:
        return bool(self.marker)


def cut_prose_point(
    candidate: str, *, max_words: int | None, generated: int, max_tokens: int, max_points: int
) -> SkeletonCut | None:
    """If the line being written is a point longer than `max_words` words, where to cut it and how to go on.

    A point that long means the model is writing prose, not a skeleton, and every extra word is paid for
    one token at a time before any point can start. The skeleton ends at the cut once it has
    `POINTS_BEFORE_PROSE_ENDS` points; with fewer it goes on with the next number prefilled (left to
    itself after a cut line the model goes on with the sentence).

    >>> cut_prose_point("1. Quantum computing is a field that uses quantum", max_words=6, generated=9,
    ...                 max_tokens=160, max_points=10)
    SkeletonCut(end=36, marker='\\n2.')
    """
    if not max_words:
        return None
    found = overlong_point(candidate, max_words)
    if found is None:
        return None
    end, number = found
    more = number < min(POINTS_BEFORE_PROSE_ENDS, max_points) and generated < max_tokens
    return SkeletonCut(end=end, marker=f"\n{number + 1}." if more else "")


def point_budget(tokens_left: int | None, *, point_max_tokens: int, points: int) -> int:
    """Each point's token limit: its own cap, and an equal share of what is left of the answer's budget."""
    if tokens_left is None:
        return point_max_tokens
    return max(0, min(point_max_tokens, tokens_left // max(1, points)))


def stage_budget(tokens_left: int | None, cap: int) -> int:
    """A single request's token limit: its own cap within what is left of the answer's budget."""
    return cap if tokens_left is None else max(0, min(cap, tokens_left))

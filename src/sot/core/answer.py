"""The answer as a reader receives it, streamed: one growing text whose pieces add up to `Result.answer`.

Pure and incremental. `AnswerStream` is the rule for any answer (no leading or trailing whitespace, so a
piece is sent only once it cannot be stripped); `PointsInOrder` lays SoT's points out in skeleton order as
`assemble_answer` does: point 1 live, each later point as soon as every point before it is done, so the
text sent is always a prefix of the assembled answer and never has to be taken back.

>>> answer = PointsInOrder(["Sleep", "Eat greens"])
>>> answer.start()
'1. Sleep'
>>> answer.add(2, "Leafy vegetables help.")
''
>>> answer.add(1, "Aim for 8 hours")
': Aim for 8 hours'
>>> answer.point_done(1, "Aim for 8 hours.")
'.\\n2. Eat greens: Leafy vegetables help.'
>>> answer.point_done(2, "Leafy vegetables help.")
''
>>> answer.text == assemble_answer(["Sleep", "Eat greens"], ["Aim for 8 hours.", "Leafy vegetables help."])
True
"""

from __future__ import annotations

from collections.abc import Sequence

from sot.core.assemble import assemble_answer, format_point

__all__ = ["AnswerStream", "PointsInOrder", "assemble_answer", "join_continuation"]


class AnswerStream:
    """Text pieces in, the stripped answer out: what `push` returns adds up to `"".join(pieces).strip()`.

    Trailing whitespace is held until more text follows it (or dropped at the end); leading whitespace of
    the whole answer is dropped. `prefix` is text already sent (an answer being continued).

    >>> stream = AnswerStream()
    >>> [stream.push(p) for p in ["  Hello", " ", "world \\n", ""]], stream.text
    (['Hello', '', ' world', ''], 'Hello world')
    """

    def __init__(self, prefix: str = "") -> None:
        self._parts = [prefix] if prefix else []
        self.length = len(prefix)  # of the text sent so far
        self._held = ""

    @property
    def text(self) -> str:
        """Everything sent so far (the prefix included)."""
        return "".join(self._parts)

    def push(self, piece: str) -> str:
        combined = self._held + piece
        if not self.length:
            combined = combined.lstrip()
        kept = combined.rstrip()
        self._held = combined[len(kept) :]
        if kept:
            self._parts.append(kept)
            self.length += len(kept)
        return kept


def join_continuation(sent: str, piece: str) -> str:
    """The first piece of a continuation that was asked for in a new turn (not prefilled), fit to what was sent.

    A model asked to continue starts a fresh reply, without the space a continued text would have.

    >>> join_continuation("1. Sleep well: aim for eight", "hours a night.")
    ' hours a night.'
    >>> join_continuation("1. Sleep well.", " Eat greens.")
    ' Eat greens.'
    """
    if sent and piece and sent[-1].isalnum() and piece[0].isalnum():
        return " " + piece
    return piece


class PointsInOrder:
    """SoT's answer text, streamed in skeleton order (see the module docstring).

    `add(index, text)` takes more of point `index`'s clean expansion (never ending in whitespace, as
    `sot.core.live.LivePoint` gives it); `point_done(index, text)` its final clean expansion. Each returns
    the answer text that can be sent now. `text` is everything sent so far.
    """

    def __init__(self, points: Sequence[str]) -> None:
        self.points = list(points)
        self._sent: list[str] = []
        self._expansions = ["" for _ in self.points]
        self._done = [False for _ in self.points]
        self._head = 0  # the first point not yet sent whole (0-based)
        self._head_sent = ""  # the part of the head point's item already sent

    @property
    def text(self) -> str:
        """Everything sent so far."""
        return "".join(self._sent)

    @property
    def expansions(self) -> list[str]:
        """Each point's clean expansion as known so far."""
        return list(self._expansions)

    @property
    def head(self) -> int:
        """The 1-based index of the point being sent now (len(points) + 1 when all are sent)."""
        return self._head + 1

    def body_sent(self, index: int) -> bool:
        """Whether any of point `index`'s expansion has been sent (then it cannot be written again)."""
        if index - 1 < self._head:
            return True
        return index - 1 == self._head and len(self._head_sent) > len(self._header(self._head))

    def reset(self, index: int) -> None:
        """Forget point `index`'s text (a retry starts it again); only allowed while none of it was sent."""
        if self.body_sent(index):
            raise ValueError(f"point {index}'s text was already sent")
        self._expansions[index - 1] = ""

    def start(self) -> str:
        """Send the first point's number and text as soon as the skeleton is known."""
        return self._advance()

    def add(self, index: int, text: str) -> str:
        self._expansions[index - 1] += text
        return self._advance()

    def point_done(self, index: int, text: str) -> str:
        self._expansions[index - 1] = text
        self._done[index - 1] = True
        return self._advance()

    def _header(self, i: int) -> str:
        return ("\n" if i else "") + format_point(i + 1, self.points[i], "")

    def _advance(self) -> str:
        sent: list[str] = []
        while self._head < len(self.points):
            i = self._head
            item = ("\n" if i else "") + format_point(i + 1, self.points[i], self._expansions[i])
            if not item.startswith(self._head_sent):
                # Text once sent cannot be taken back: live expansions must only ever grow.
                raise ValueError(f"point {i + 1}'s text changed after it was sent: {self._head_sent!r} -> {item!r}")
            sent.append(item[len(self._head_sent) :])
            self._head_sent = item
            if not self._done[i]:
                break
            self._head, self._head_sent = i + 1, ""
        out = "".join(sent)
        self._sent.append(out)
        return out

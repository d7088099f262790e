"""Clean a point's expansion while it streams: show only text that the final cleaning keeps.

>>> live = LivePoint(2, "Eat greens")
>>> [live.push(delta) for delta in ["2. Eat", " greens: Leafy", " vegetables ", "help.\\n3", ". Move"]]
['', 'Leafy', ' vegetables', ' help.', '']
>>> live.flush()
''
"""

from __future__ import annotations

import re
from collections import deque

from sot.core.assemble import (
    NUMBER_PREFIX,
    SEPARATOR,
    clean_normalized,
    find_next_point,
    probe_start,
    skip_space,
    skip_stars,
)

# What could still grow into a match of NUMBER_PREFIX or SEPARATOR (anything after it is not there yet).
_NUMBER_OPEN = re.compile(r"\s*+(?:\*|\*\*\s*+(?:\d{1,3}\s*+)?|\d{1,3}\s*+)?")
_SEPARATOR_OPEN = re.compile(r"\s*+(?:\*|\*\*\s*+)?")
# A number marker that is complete but for the whitespace after it: the point may end just before it.
_MARKER_DONE = re.compile(r"\d[.)]\s")
_MARKER_TAIL = re.compile(r"\d{1,3}[.)]?")
_RUN = re.compile(r"\s+")
# The start is checked on every push while the text is short, then each time it grew by a quarter (amortized
# linear even for a start that stays open, e.g. thousands of blanks or "*").
_EVERY_PUSH = 256


def _settled(pattern: re.Pattern[str], opening: re.Pattern[str], text: str, at: int) -> int | None:
    """Where `pattern` (matched at `at`) leaves off, or `at` if it cannot match; None while more text could
    still change that."""
    match = pattern.match(text, at)
    if match is not None:
        return match.end() if match.end() < len(text) else None  # its trailing whitespace may go on
    return None if opening.fullmatch(text, at) else at


def _settled_echo(text: str, at: int, point: str) -> int | None:
    """Where a leading copy of `point` leaves off (`at` if there is none); None while that is undecided."""
    probe = probe_start(text, at)
    if probe == len(text):
        return None
    if len(text) - probe < len(point):
        return None if point.casefold().startswith(text[probe:].casefold()) else at
    if text[probe : probe + len(point)].casefold() != point.casefold():
        return at
    end = skip_stars(text, probe + len(point))
    return end if end < len(text) else None


def _settled_start(text: str, point: str) -> int | None:
    """Index in `text` where its clean text starts, if no continuation of `text` can change it; else None.

    Mirrors `clean_normalized` step by step: the echoed number, the echoed point, the separator, blanks.
    """
    at: int | None = _settled(NUMBER_PREFIX, _NUMBER_OPEN, text, 0)
    if at is not None:
        at = _settled_echo(text, at, point)
    if at is not None:
        at = _settled(SEPARATOR, _SEPARATOR_OPEN, text, at)
    if at is None:
        return None
    start = skip_space(text, at)
    return start if start < len(text) else None


class LivePoint:
    """`clean_point_text(index, point, raw)` computed while `raw` streams in.

    `push(delta)` returns the newly displayable clean text, and `flush()` the rest once the stream is over, such
    that for any split of `raw` into deltas ``"".join(pushes) + flush() == clean_point_text(index, point, raw)``.
    Held back until decided: the start while it may still be an echo of "N. point:", trailing whitespace, a
    tail that may become the next point's number ("\\n2. "), and a trailing "\\r" (of a "\\r\\n"). Once the next
    point has started, the text is final: later pushes return "". Each push costs time linear in its delta
    (amortized), so a whole stream is linear in its length.
    """

    def __init__(self, index: int, point: str) -> None:
        self.index = index
        self.point = point
        self.done = False  # the clean text is complete (the next point started, or flush was called)
        self._text = ""  # the raw text so far with "\r\n" as "\n", but for a trailing "\r"
        self._cr = ""  # a trailing "\r", held until the next delta tells whether a "\n" follows
        self._start: int | None = None  # where the clean text starts in `_text`, once decided
        self._check_at = 0  # the length of `_text` at which to try deciding `_start` again
        self._sent = 0  # clean characters returned so far
        self._held = 0  # where the text that may still be cut or stripped begins
        self._run = (0, 0, -1)  # the last whitespace run in `_text`: start, end, index of its first "\n" or -1

    def push(self, delta: str) -> str:
        """The clean text that became certain with `delta` (often "")."""
        if self.done or not delta:
            return ""
        chunk = self._cr + delta
        self._cr = "\r" if chunk.endswith("\r") else ""
        chunk = chunk[: len(chunk) - len(self._cr)].replace("\r\n", "\n")
        if not chunk:
            return ""
        begin = len(self._text)
        # Appended through a local that holds the only reference, which CPython extends in place (linear over
        # a stream, where `self._text += chunk` copies the whole text on every push).
        text, self._text = self._text, ""
        text += chunk
        self._text = text
        self._track_run(chunk, begin)
        # A next-point marker completes only with the whitespace after it, which is in the new text.
        if _MARKER_DONE.search(self._text, max(0, begin - 2)):
            cut = find_next_point(self._text, self._held)
            if cut is not None:
                return self._finish(self._text[:cut])
        self._held = self._undecided()
        if self._start is None and len(self._text) >= self._check_at:
            self._start = _settled_start(self._text, self.point)
            size = len(self._text)
            self._check_at = size + 1 if size < _EVERY_PUSH else size + size // 4
        if self._start is None or self._held <= self._start + self._sent:
            return ""
        out = self._text[self._start + self._sent : self._held]
        self._sent += len(out)
        return out

    def flush(self) -> str:
        """The rest of the clean text, at the end of the stream."""
        if self.done:
            return ""
        self._text += self._cr
        self._cr = ""
        return self._finish(self._text)

    def _finish(self, text: str) -> str:
        final = clean_normalized(self.point, text)
        self.done = True
        out, self._sent = final[self._sent :], len(final)
        return out

    def _track_run(self, chunk: str, begin: int) -> None:
        """Update the last whitespace run after `chunk` was appended at `begin`."""
        runs = deque(_RUN.finditer(chunk), maxlen=1)
        if not runs:
            return
        last = runs[0]
        start, end = begin + last.start(), begin + last.end()
        run_start, run_end, newline = self._run
        if start == begin and run_end == begin and run_end > run_start:
            start = run_start  # the chunk continues the run the text ended with
        else:
            newline = -1
        if newline < 0:
            newline = self._text.find("\n", max(start, begin), end)
        self._run = (start, end, newline)

    def _undecided(self) -> int:
        """Where the tail that cleaning may still strip or cut begins: trailing whitespace, or a run holding a
        newline followed by a partial number marker ("\\n1", "\\n12.")."""
        start, end, newline = self._run
        size = len(self._text)
        if end == size and end > start:
            return start
        if newline >= 0 and size - end <= 4 and _MARKER_TAIL.fullmatch(self._text, end):
            return start
        return size

"""Where a point's expansion ends, and where a stream stops: pure functions and small stateful cutters.

A point ends at a blank line, where the next point's number starts, or (optionally) after its N-th sentence.
The functions look at the text generated so far, for streaming callers; all are linear in its length.

>>> find_point_end("Sleep well.\\n2. Eat greens: yes")
11
>>> find_point_end("Sleep well. Aim for 8 hours, e.g. by 10 p.m. every day. More.", max_sentences=2)
55
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Small models chatter after a blank line, or go on to write the next point themselves.
_BLOCK_END = re.compile(r"\n[ \t]*\n|\n[ \t]*\*{0,2}\d{1,3}[.)]\s")
# What may follow a newline in a tail that could still grow into a block end (held back until decided).
_OPEN_LINE = re.compile(r"[ \t]*(?:\*{0,2}\d{0,3}[.)]?)?")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)")
_ABBREVIATIONS = frozenset({"e.g", "i.e", "etc", "vs", "dr", "mr", "mrs", "ms", "st", "no", "approx", "p.m", "a.m"})


def _is_sentence_end(text: str, position: int) -> bool:
    """Whether the punctuation at `position` ends a sentence rather than an abbreviation or initial.

    Looks only at the word before `position` (letters, digits, "_", ".", "'"), so scanning a whole text is linear.
    """
    if text[position] != ".":
        return True
    start = position
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_.'’"):
        start -= 1
    token = text[start:position].lower()
    return not (token in _ABBREVIATIONS or (len(token) == 1 and token.isalpha()) or token.isdigit())


def find_point_end(text: str, *, max_sentences: int | None = None, start: int = 0) -> int | None:
    """Index where the point's text should be cut, or None if it may go on.

    `start` lets a streaming caller skip text it has already scanned for a block end (a little overlap is kept
    by the caller, since a block end spans characters); sentences are always counted from the beginning.
    """
    block = _BLOCK_END.search(text, start)
    end = block.start() if block else None
    if max_sentences:
        count = 0
        for match in _SENTENCE_END.finditer(text):
            if end is not None and match.start() >= end:
                break
            if _is_sentence_end(text, match.start()):
                count += 1
                if count >= max_sentences:
                    return match.end()
    return end


def undecided_tail(text: str) -> int:
    """Index from which `text` might still turn into a point end (hold it back); len(text) if none.

    That is the earliest newline followed only by spaces, tabs, a partial "**12." and at most one more newline at
    the very end; only the last two lines can hold one.

    >>> undecided_tail("Keep a routine.\\n**1"), undecided_tail("Keep a routine.\\n \\n"), undecided_tail("Keep.")
    (15, 15, 5)
    """
    last = text.rfind("\n")
    if last < 0:
        return len(text)
    if last == len(text) - 1:
        before = text.rfind("\n", 0, last)
        if before >= 0 and _OPEN_LINE.fullmatch(text, before + 1, last):
            return before
        return last
    return last if _OPEN_LINE.fullmatch(text, last + 1) else len(text)


class StopHoldback:
    """Cuts a stream of text at the first of some stop strings (which are not emitted).

    `push(text)` returns what is safe to emit now: everything before the first stop string, minus a tail that
    could still be the start of one (held back until the next push decides it). `flush()` returns the held tail
    at the end of the stream ("" once a stop was hit). `stopped` tells whether a stop was hit. Empty stop strings
    are ignored. For any split of a text into pushes, the output is the text up to the earliest occurrence of any
    stop string, as for the whole text at once (a stop found after a longer one began is held until the longer one
    is decided). Each push costs time linear in its text plus the held tail (shorter than the longest stop).

    >>> cut = StopHoldback(["</s>"])
    >>> cut.push("Hello</"), cut.push("s> more"), cut.stopped, cut.flush()
    ('Hello', '', True, '')
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(dict.fromkeys(stop for stop in stops if stop))
        self.stopped = False
        self._held = ""

    def push(self, text: str) -> str:
        """The text now safe to emit, given the next piece of the stream."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        # A stop can only start inside the held tail or the new text: the held tail is the longest suffix of
        # everything so far that is a proper prefix of a stop, so an earlier start would have been held too.
        buffer = self._held + text
        first = self._first_stop(buffer)
        keep = max(_prefix_suffix(buffer, stop) for stop in self.stops)
        if first is not None and first <= len(buffer) - keep:
            self.stopped, self._held = True, ""
            return buffer[:first]
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """The held tail at the end of the stream ("" if a stop was hit)."""
        out, self._held = self._held, ""
        if self.stopped:
            return ""
        first = self._first_stop(out)  # a stop held while a longer one that began earlier was undecided
        if first is not None:
            self.stopped = True
            return out[:first]
        return out

    def _first_stop(self, text: str) -> int | None:
        found = [at for at in (text.find(stop) for stop in self.stops) if at >= 0]
        return min(found) if found else None


def _prefix_suffix(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    at = max(0, len(text) - len(stop) + 1)
    while (at := text.find(stop[0], at)) >= 0:
        if stop.startswith(text[at:]):
            return len(text) - at
        at += 1
    return 0

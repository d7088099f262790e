"""Where a point's expansion ends: at a blank line, where the next point's number starts, or (optionally)
after its N-th sentence. Pure functions over the text generated so far, for streaming callers.

>>> find_point_end("Sleep well.\\n2. Eat greens: yes")
11
>>> find_point_end("Sleep well. Aim for 8 hours, e.g. by 10 p.m. every day. More.", max_sentences=2)
55
"""

from __future__ import annotations

import re

# Small models chatter after a blank line, or go on to write the next point themselves.
_BLOCK_END = re.compile(r"\n[ \t]*\n|\n[ \t]*\*{0,2}\d{1,3}[.)]\s")
# A tail that could still grow into a block end; a streaming caller holds it back until it is decided.
_BLOCK_END_PREFIX = re.compile(r"\n[ \t]*(?:\*{0,2}\d{0,3}[.)]?)?$")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)")
_ABBREVIATIONS = frozenset({"e.g", "i.e", "etc", "vs", "dr", "mr", "mrs", "ms", "st", "no", "approx", "p.m", "a.m"})


def _is_sentence_end(text: str, position: int) -> bool:
    """Whether the punctuation at `position` ends a sentence rather than an abbreviation or initial."""
    if text[position] != ".":
        return True
    word = re.search(r"[\w.'’]*$", text[:position])
    token = word.group(0).lower() if word else ""
    return not (token in _ABBREVIATIONS or (len(token) == 1 and token.isalpha()) or token.isdigit())


def find_point_end(text: str, *, max_sentences: int | None = None, start: int = 0) -> int | None:
    """Index where the point's text should be cut, or None if it may go on.

    `start` lets a streaming caller skip text it has already scanned (a little overlap is kept by the
    caller, since a block end spans characters).
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
    """Index from which `text` might still turn into a point end (hold it back); len(text) if none."""
    held = _BLOCK_END_PREFIX.search(text)
    return held.start() if held else len(text)
